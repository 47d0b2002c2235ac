"""A 2-D Gaussian-mixture teacher whose noisy denoiser is exact, for checking the algorithm end to end.

Teacher: p = sum_k w_k N(mu_k, s^2 I), 8 modes on a ring, unequal weights (lightest ~ 1/10 of heaviest).
Noised: p_sigma = sum_k w_k N(mu_k, (s^2 + sigma^2) I), and the exact denoiser is
    E[x0 | x_t] = sum_k gamma_k(x_t) (sigma^2 mu_k + s^2 x_t) / (s^2 + sigma^2),   gamma_k = posterior of mode k.
Generator: an MLP from an 8-D Gaussian latent ending in a softmax over learned anchor points (``generator=mlp``:
a plain MLP; ``generator=denoiser``: the teacher's exact denoiser plus a trainable residual, evaluated at sigma_max
from a 2-D latent as the image pipelines' generators are, the one that can be a few-step student); fake score: an
EDM-preconditioned MLP; discriminator: an MLP head on the teacher's "features" (its scaled input and noise level:
an analytic teacher has no hidden layers).
Oracle ratio (``ratio=oracle``): log p_sigma(x_t) (exact) minus log of a Gaussian kernel density estimate of the
generator's noisy distribution.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
from PIL import Image, ImageDraw

from ..denoisers import Denoiser, EDMPrecondMLP, MLPBackbone, as_sigma, edm_precond
from ..discriminator import MLPHead, Discriminator
from ..generator import MLPGenerator, OneStepGenerator, num_steps
from ..noise import NoiseSchedule
from ..objective import calibration
from ..task import Task, check_task_keys

DEFAULTS = {
    "num_modes": 8,
    "radius": 4.0,
    "mode_std": 0.25,
    "weight_ratio": 10.0,  # heaviest / lightest mode weight (weights geometric around the ring)
    "sigma_min": 0.05,
    "sigma_max": 8.0,
    "latent_dim": 8,
    "generator": "anchors",  # 'anchors': MLP -> softmax over learned anchor points (tears with moderate weights);
                             # 'mlp': a plain MLP (spectral bias: bridges between modes for thousands of steps);
                             # 'denoiser': the teacher's denoiser made trainable (ResidualDenoiser), at sigma_max
                             # from a 2-D latent (latent_dim unused); the only one that takes a noise level, so
                             # the only one for student.steps > 1
    "anchors": 128,          # number of learned anchor points of the 'anchors' generator
    "anchor_init": 4.0,      # std of the anchors' initial positions (the data's scale: ring radius 4)
    "spread_max": 0.5,       # soft bound on the linear spread's total std ||A||_F (a mode's: 0.25 sqrt 2 = 0.35);
                             # 0: unbounded (streaks across the ring on some seeds: docs/robustness.md)
    "latent_components": 0,  # >0 ('mlp' only): the latent also holds a one-hot of K equiprobable components
    "hidden": 256,        # generator MLP width
    "fake_hidden": 256,   # fake-score MLP width: it must resolve the student's modes at low sigma
    "fake_depth": 4,
    "disc_hidden": 128,   # discriminator head width (its input: the teacher's scaled x_t and log sigma)
    "eval_samples": 20000,
    "kde_samples": 4096,
    "kde_bandwidth": 0.1,
    "init": "random",  # 'random' or 'collapsed': pre-fit the generator to the 3 heaviest modes
    "init_steps": 300,
}


class GMM:
    def __init__(self, means: torch.Tensor, weights: torch.Tensor, std: float):
        self.means, self.weights, self.std = means, weights / weights.sum(), float(std)

    def to(self, device):
        return GMM(self.means.to(device), self.weights.to(device), self.std)

    def log_prob(self, x: torch.Tensor, sigma) -> torch.Tensor:
        var = self.std ** 2 + as_sigma(sigma, x).reshape(-1, 1) ** 2  # [N, 1]
        d2 = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)  # [N, K]
        logk = -0.5 * d2 / var - math.log(2 * math.pi) - torch.log(var)
        return torch.logsumexp(logk + self.weights.log()[None], dim=1)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        s2 = as_sigma(sigma, x).reshape(-1, 1) ** 2
        var = self.std ** 2 + s2
        d2 = ((x[:, None, :] - self.means[None]) ** 2).sum(-1)
        gamma = torch.softmax(-0.5 * d2 / var + self.weights.log()[None], dim=1)  # [N, K]
        post_mean = (s2[:, None] * self.means[None] + self.std ** 2 * x[:, None, :]) / var[:, None]
        return (gamma[..., None] * post_mean).sum(1)

    def sample(self, n: int, rng: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        k = torch.multinomial(self.weights.to(device), n, replacement=True, generator=rng)
        return self.means.to(device)[k] + self.std * torch.randn(n, 2, generator=rng, device=device)


def ring_gmm(num_modes=8, radius=4.0, std=0.25, weight_ratio=10.0) -> GMM:
    ang = torch.arange(num_modes) * 2 * math.pi / num_modes
    means = radius * torch.stack([ang.cos(), ang.sin()], 1)
    weights = weight_ratio ** (-torch.arange(num_modes, dtype=torch.float32) / max(num_modes - 1, 1))
    return GMM(means, weights, std)


class GMMDenoiser(Denoiser):
    """Exact denoiser of a noised GMM; its features are its EDM-scaled input and c_noise."""

    def __init__(self, gmm: GMM, feature_scale: float):
        super().__init__(None, ())
        self.gmm = gmm
        self.feature_scale = feature_scale
        self.register_buffer("means", gmm.means.clone())
        self.register_buffer("weights", gmm.weights.clone())

    def _gmm(self):
        return GMM(self.means, self.weights, self.gmm.std)

    def denoise(self, x_t, sigma, cond=None):
        return self._gmm().denoise(x_t.float(), sigma)

    def features(self, x_t, sigma):
        s = as_sigma(sigma, x_t).reshape(-1, 1)
        c_in = 1 / (s ** 2 + self.feature_scale ** 2).sqrt()
        return [torch.cat([x_t * c_in, s.log() / 4], dim=1)]

    def forward(self, x_t, sigma, cond=None, mode="x0", x0_grad=True):
        self.calls[mode] += 1
        if mode == "x0":
            return self.denoise(x_t, sigma)
        feats = self.features(x_t, sigma)
        return feats if mode == "features" else (self.denoise(x_t, sigma), feats)


class ResidualDenoiser(GMMDenoiser):
    """The teacher's exact denoiser made trainable: D(x_t, sigma) = D_gmm(x_t, sigma) + c_out F(c_in x_t, c_noise),
    with EDM's c_out, c_in, c_noise (sigma_data = the ring radius) and F an MLP whose last layer starts at zero.

    At initialisation D is the teacher, bit for bit: the toy's analogue of the image pipelines' generator, a copy
    of the teacher's weights (arXiv 2502.15681, s.4). Wrapped in a ``OneStepGenerator`` at sigma_max it takes a
    noise level, so it can also be a few-step student (``fdistill.student``)."""

    def __init__(self, gmm: GMM, sigma_data: float, hidden: int = 256, depth: int = 3):
        super().__init__(gmm, feature_scale=sigma_data)
        self.sigma_data = float(sigma_data)
        self.residual = MLPBackbone(2, hidden, depth)
        nn.init.zeros_(self.residual.out[1].weight)  # F = 0: the generator starts as the teacher
        nn.init.zeros_(self.residual.out[1].bias)

    def denoise(self, x_t, sigma, cond=None):
        x = x_t.float()
        _, c_out, c_in, c_noise = edm_precond(as_sigma(sigma, x), self.sigma_data)
        return super().denoise(x, sigma) + c_out * self.residual(c_in * x, c_noise)


class MixtureLatentGenerator(MLPGenerator):
    """An MLP whose latent is a Gaussian plus a one-hot of K equiprobable components: it can send components to
    different modes without tearing a continuous map (mass per mode in steps of 1/K)."""

    def __init__(self, latent_dim: int, components: int, out_dim: int = 2, hidden: int = 256):
        super().__init__(latent_dim + components, out_dim, hidden, depth=4)
        self.latent_dim, self.components = latent_dim, components

    def sample_latents(self, n, generator=None, device="cpu"):
        z = torch.randn(n, self.latent_dim, generator=generator, device=device)
        k = torch.randint(0, self.components, (n,), generator=generator, device=device)
        return torch.cat([z, torch.nn.functional.one_hot(k, self.components).float()], 1)


class AnchorGenerator(MLPGenerator):
    """x = softmax(MLP(z)) @ anchors + A z: an MLP from a Gaussian latent whose last layer is a softmax over K learned
    anchor points, plus a learned linear spread.

    ``spread_max`` > 0 bounds the spread's total standard deviation ||A||_F softly (A -> A b tanh(|A|/b) / |A|), so
    that the spread can shape each anchor's blob but not carry mass between modes: unbounded, A grew into streaks
    across the ring on some seeds (a third of the samples between modes); moving mass is the softmax's job.

    Still a continuous map from Gaussian noise, but its softmax switches between anchors with moderate weights, so
    it can tear between modes in a few hundred steps. A plain MLP must grow large weights to make a staircase
    (spectral bias): driven by the exact fake score it still had 38-51% of its samples on bridges after 800 steps,
    while this generator reached 6-9% (3 seeds, benchmarks/RESULTS.md). The number of anchors is not the number of
    modes.
    """

    def __init__(self, latent_dim: int = 8, out_dim: int = 2, hidden: int = 256, anchors: int = 64,
                 anchor_init: float = 3.0, spread_max: float = 0.0):
        super().__init__(latent_dim, anchors, hidden, depth=3)  # self.net: z -> anchor logits
        self.anchors = nn.Parameter(anchor_init * torch.randn(anchors, out_dim))
        self.spread = BoundedSpread(latent_dim, out_dim, spread_max)
        nn.init.zeros_(self.spread.bias)
        with torch.no_grad():
            self.spread.weight.mul_(0.1)  # start nearly at the anchors; the spread is learned

    @property
    def spread_max(self) -> float:
        return self.spread.spread_max

    def forward(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        return torch.softmax(self.net(z), dim=1) @ self.anchors + self.spread(z) + self.spread.bias


class BoundedSpread(nn.Module):
    """The anchor generator's linear spread z -> A z with ||A||_F bounded softly at ``spread_max`` (0: unbounded).
    The bound is applied inside this module's forward, where a sharding wrapper (FSDP2) has gathered A; its
    parameters are named and initialised as an ``nn.Linear``'s (``weight``, ``bias``; the bias is added by the
    caller)."""

    def __init__(self, in_features: int, out_features: int, spread_max: float = 0.0):
        super().__init__()
        lin = nn.Linear(in_features, out_features)  # nn.Linear's initialisation, the same random draws
        self.weight, self.bias = nn.Parameter(lin.weight.detach().clone()), nn.Parameter(lin.bias.detach().clone())
        self.spread_max = float(spread_max)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        A = self.weight
        if self.spread_max > 0:  # the soft bound on ||A||_F (AnchorGenerator's docstring)
            norm = A.norm().clamp(min=1e-12)
            A = A * (self.spread_max * torch.tanh(norm / self.spread_max) / norm)
        return z @ A.T


def mode_metrics(x: torch.Tensor, gmm: GMM) -> dict:
    """mode_coverage: fraction of modes receiving at least 1/4 of their true mass;
    mode_mass_tv: total variation between the generated mass per mode (among on-mode samples) and the weights;
    off_mode_fraction: samples farther than 3 std from every mode."""
    d = torch.cdist(x.float(), gmm.means.float())
    dmin, k = d.min(1)
    on = dmin <= 3 * gmm.std
    counts = torch.bincount(k[on], minlength=len(gmm.weights)).float()
    mass = counts / counts.sum().clamp(min=1)
    w = gmm.weights.float()
    return {
        "mode_coverage": float((mass >= 0.25 * w).float().mean()),
        "mode_mass_tv": float(0.5 * (mass - w).abs().sum()),
        "off_mode_fraction": float(1 - on.float().mean()),
        "mode_mass": [round(float(m), 4) for m in mass],
    }


def scatter_png(panels: list[tuple[str, np.ndarray]], path, lim: float = 6.0, size: int = 320):
    """Side-by-side scatter plots as a PNG (PIL only; density shown by darkness)."""
    W = size * len(panels)
    img = Image.new("L", (W, size + 20), 255)
    draw = ImageDraw.Draw(img)
    for i, (title, pts) in enumerate(panels):
        hist, _, _ = np.histogram2d(pts[:, 1], pts[:, 0], bins=size, range=[[-lim, lim], [-lim, lim]])
        dens = np.log1p(hist)
        dens = (255 * (1 - dens / max(dens.max(), 1e-9))).astype(np.uint8)[::-1]
        img.paste(Image.fromarray(dens), (i * size, 20))
        draw.text((i * size + 5, 4), title, fill=0)
        draw.line([(i * size, 0), (i * size, size + 20)], fill=0)
    img.save(path)


def build(cfg, device) -> Task:
    t = check_task_keys(cfg.task, DEFAULTS, "toy2d")
    gmm = ring_gmm(t["num_modes"], t["radius"], t["mode_std"], t["weight_ratio"])
    sd = float(t["radius"])  # data scale for the preconditioning
    teacher = GMMDenoiser(gmm, feature_scale=sd)
    K = t["latent_components"]
    steps = int(getattr(getattr(cfg, "student", None), "steps", 1))
    if steps > 1 and t["generator"] != "denoiser":  # before anything is built or written
        raise ValueError(f"student.steps={steps} needs a generator that takes a noise level: set "
                         f"task.generator=denoiser (task.generator={t['generator']} maps a latent in one step only)")
    if K and t["generator"] != "mlp":
        raise ValueError("task.latent_components needs task.generator=mlp")
    if t["generator"] == "anchors":
        generator = AnchorGenerator(t["latent_dim"], 2, t["hidden"], t["anchors"], t["anchor_init"],
                                    t["spread_max"])
    elif t["generator"] == "denoiser":  # x = D(sigma_max z, sigma_max), D starting as the teacher
        generator = OneStepGenerator(ResidualDenoiser(gmm, sd, t["hidden"]), t["sigma_max"], latent_shape=(2,))
    elif t["generator"] == "mlp":
        generator = (MixtureLatentGenerator(t["latent_dim"], K, 2, t["hidden"]) if K > 0
                     else MLPGenerator(t["latent_dim"], 2, t["hidden"], depth=4))
    else:
        raise ValueError(f"task.generator must be 'anchors', 'mlp' or 'denoiser', got {t['generator']!r}")
    fake = EDMPrecondMLP(MLPBackbone(2, t["fake_hidden"], depth=t["fake_depth"]), sigma_data=sd)
    if int(t["eval_samples"]) < 1:
        raise ValueError(f"task.eval_samples must be >= 1 for the toy (its evaluation counts the samples in each "
                         f"mode), got {t['eval_samples']}")
    disc = Discriminator([MLPHead(3, t["disc_hidden"])])
    schedule = NoiseSchedule.continuous(t["sigma_min"], t["sigma_max"])

    if t["init"] == "collapsed":
        _fit_collapsed(generator, gmm, t["init_steps"])
    elif t["init"] != "random":
        raise ValueError(f"task.init must be 'random' or 'collapsed', got {t['init']!r}")

    kde_rng = torch.Generator(device=device).manual_seed(cfg.seed + 12345)

    def oracle_log_ratio(x_t, sigma, cond=None):
        # exact log p_sigma over a KDE of the current generator pushed through the same noise
        with torch.no_grad():
            z = generator.sample_latents(t["kde_samples"], kde_rng, x_t.device)
            xs = generator(z).float()
        var = as_sigma(sigma, x_t).reshape(-1, 1) ** 2 + t["kde_bandwidth"] ** 2
        d2 = torch.cdist(x_t.float(), xs) ** 2
        log_q = torch.logsumexp(-0.5 * d2 / var, 1) - math.log(xs.shape[0]) - math.log(2 * math.pi) - var[:, 0].log()
        return gmm.to(x_t.device).log_prob(x_t.float(), sigma) - log_q

    def sample_real(n, rng, dev):
        return gmm.sample(n, rng, dev), None

    def evaluate(gen, run_dir, final=False, step=0):
        n = t["eval_samples"] if final else 4000
        erng = torch.Generator(device=device).manual_seed(777)
        with torch.no_grad():
            z = gen.sample_latents(n, erng, device)
            x = gen(z).float().cpu()
        real = gmm.sample(n, torch.Generator().manual_seed(778))
        m = mode_metrics(x, gmm)
        name = "samples.png" if final else f"samples_{step:06d}.png"
        scatter_png([("teacher", real.numpy()), (f"student ({cfg.divergence}, step {step})", x.numpy())],
                    run_dir / name, lim=t["radius"] + 2)
        if final:
            m["eval_samples"] = n
            m["nfe_student"] = num_steps(gen)  # network evaluations per sample: student.steps
            m["true_mass"] = [round(float(w), 4) for w in gmm.weights]
            m.update(_calibration_report(gen, teacher, disc, oracle_log_ratio, schedule, t, device))
        return m

    return Task(teacher=teacher, generator=generator, fake_score=fake, discriminator=disc, schedule=schedule,
                sample_cond=lambda n, rng, dev: None, sample_real=sample_real, evaluate=evaluate,
                oracle_log_ratio=oracle_log_ratio, evaluate_uses_networks=True, sigma_data=sd, info={"gmm": gmm})


@torch.no_grad()
def _calibration_report(gen, teacher, disc, oracle_fn, schedule, t, device) -> dict:
    """The discriminator's log-ratio against the oracle's on fresh generator samples, per noise range."""
    rng = torch.Generator(device=device).manual_seed(999)
    out = {}
    for name, (lo, hi) in {"low": (schedule.sigma_min, 0.3), "mid": (0.3, 2.0), "high": (2.0, schedule.sigma_max)}.items():
        n = 2048
        x = gen(gen.sample_latents(n, rng, device)).float()
        sigma = torch.exp(math.log(lo) + torch.rand(n, generator=rng, device=device) * (math.log(hi) - math.log(lo)))
        x_t = x + sigma[:, None] * torch.randn(x.shape, generator=rng, device=device)
        logit = disc(teacher(x_t, sigma, mode="features"))
        c = calibration(logit, oracle_fn(x_t, sigma))
        out[f"calib_corr_{name}"] = round(float(c["calib_corr"]), 4)
        out[f"calib_slope_{name}"] = round(float(c["calib_slope"]), 4)
    return out


def _fit_collapsed(generator: nn.Module, gmm: GMM, steps: int):
    """Pre-fit the generator to the 3 heaviest modes (a mode-collapsed start, as in the issue's prototype)."""
    sub = GMM(gmm.means[:3], gmm.weights[:3], gmm.std)
    opt = torch.optim.Adam(generator.parameters(), lr=1e-3)
    rng = torch.Generator().manual_seed(0)
    for _ in range(steps):
        z = torch.randn(512, generator.latent_shape[0], generator=rng)
        x = generator(z)
        target = sub.sample(512, rng)
        # match by sorting along a random projection (sliced Wasserstein), enough for a rough collapsed start
        proj = torch.randn(2, 16, generator=rng)
        loss = ((x @ proj).sort(0)[0] - (target @ proj).sort(0)[0]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
