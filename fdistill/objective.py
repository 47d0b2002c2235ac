"""FDivergenceObjective: the generator loss and the critic loss of f-distill (Xu, Nie, Vahdat 2025, arXiv 2502.15681, s.3-4).

Generator iteration (one generator forward+backward, one teacher forward, one fake-score forward):

    x        = G(z, c)                           a k-step student: its stage-s output by backward simulation
    x_t      = x + sigma * eps,                  sigma from the distribution-matching range
    x0_real, feats = teacher(x_t, sigma, c)      one pass: the score and the discriminator's features
    x0_fake  = fake_score(x_t, sigma, c)         no gradient
    logit    = D(feats)                          estimated log(p_t / q_t)
    h        = two-stage normalised h_f(exp(logit))
    g        = h * (x0_fake - x0_real) / mean|x - x0_real|            (stop-gradient; NaN -> 0)
    L_gen    = 0.5 * mean (x - sg(x - g))^2  +  gan_weight * mean softplus(-logit)

Since x0_fake - x0_real = sigma^2 (grad log q_t - grad log p_t), the first term's gradient is, up to the
positive per-sample factor sigma^2 / mean|x - x0_real|, -h(r) (grad log p_t - grad log q_t) dx_t/dtheta:
the gradient of D_f(p_t || q_t) (paper, Theorem 1). With h = 1 it is DMD's.

Critic iteration: the fake score learns the generator's distribution by denoising, the discriminator head learns
log(p_t/q_t) with the non-saturating logistic loss on real data (noised at an independently drawn sigma) versus
generated data. Two recipes (``recipe`` in the config): DMD2's denoises over the whole grid with EDM weighting (or
SD's epsilon MSE) and shows the discriminator generated data at a fresh draw; FastGen's (the authors' code,
fastgen/methods/distribution_matching/dmd2.py, ``_fake_score_discriminator_update_step``) denoises with an
unweighted x0 MSE at the distribution-matching noise levels and shows the discriminator that same noised batch.

A few-step student (``fdistill.student.FewStep``) changes only where x comes from: each sample's output at a drawn
stage, its input simulated by the generator itself (DMD2's backward simulation); both losses act on that x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .denoisers import as_sigma
from .divergences import Divergence
from .noise import NoiseSchedule, edm_loss_weight
from .ratio import RatioNormalizer
from .student import FewStep


@dataclass
class ObjectiveConfig:
    gan_weight: float = 1e-3
    """Weight of the non-saturating GAN term in the generator loss (paper: 1e-3 CIFAR/SD, 3e-3 ImageNet-64)."""
    disc_weight: float = 1.0
    """Weight of the discriminator's logistic loss in the critic loss."""
    disc_features: str = "teacher"
    """'teacher': head on the frozen teacher's bottleneck (FastGen); 'fake': on the fake score's (DMD2), whose
    trunk is then trained by the GAN loss too, with weight ``fake_trunk_gan_weight``."""
    fake_trunk_gan_weight: float = 1e-2
    """DMD2's weight of the discriminator loss on the fake-score trunk (only with disc_features='fake')."""
    r1_gamma: float = 0.0
    """R1 penalty on real data, gamma/2 * |grad_x logit|^2 (paper: 1 CIFAR-10 / SD, 0 ImageNet-64)."""
    dmd_normalize: bool = True
    """Divide the score difference by mean |x - x0_real| per sample (DMD's normaliser)."""
    dmd_eps: float = 0.0
    """Added to that divisor (FastGen's variational_score_distillation_loss: 1e-6; DMD2: none)."""
    sigma_data: float = 0.5
    """EDM's sigma_data in the fake score's loss weighting 1/sigma^2 + 1/sigma_data^2."""
    denoise_loss: str = "edm"
    """Fake score's loss. 'edm': x0 MSE with EDM weighting (DMD2, EDM teacher). 'eps': epsilon MSE (DMD2, SD).
    Both at ``denoise_levels``. 'x0': unweighted x0 MSE at noise levels drawn like the distribution-matching
    term's (FastGen, both teachers)."""
    denoise_levels: str = "grid"
    """Noise levels of the 'edm' and 'eps' fake-score losses: 'grid' (the whole grid, DMD2) or 'dm' (the
    distribution-matching range, where the generator reads the fake score; the 'x0' loss always uses it)."""
    disc_fake_noise: str = "independent"
    """Noised generated batch the discriminator sees: 'independent' (its own sigma and eps, DMD2) or 'denoise'
    (the fake-score loss's own sigma and eps, FastGen)."""
    log_bins: bool = True
    """Log the discriminator's accuracy and mean logits, and the weights' ESS, per noise-level bin (the ratio
    normaliser's bins): ``disc_acc_binK``, ``logit_real_binK``, ``logit_fake_binK``, ``h_ess_binK``."""


# Prefixes of the per-bin (sum, count) log entries that the trainer turns into one mean per bin.
PER_BIN_NUM, PER_BIN_DEN = "_num:", "_den:"


def _cat_cond(a: Any, b: Any) -> Any:
    if a is None and b is None:
        return None
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


def _per_sample_mean(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).mean(dim=1)


def weighted_score_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor, h: torch.Tensor,
                        dmd_normalize: bool = True, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * mean (x - sg(x - g))^2 with g = h (x0_fake - x0_real) / mean|x - x0_real|; returns (loss, g)."""
    with torch.no_grad():
        diff = (x0_fake - x0_real).float()
        hv = h.reshape(-1, *([1] * (x.ndim - 1))).float()
        g = hv * diff
        if dmd_normalize:
            denom = (x.detach().float() - x0_real.float()).abs().reshape(x.shape[0], -1).mean(1) + eps
            g = g / denom.reshape(-1, *([1] * (x.ndim - 1)))
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        target = x.detach().float() - g
    return 0.5 * F.mse_loss(x.float(), target), g


class FDivergenceObjective(nn.Module):
    """The objective (f-distill's losses, arXiv 2502.15681 Sec. 3-4). Networks are passed in (possibly wrapped by accelerate/DDP); it owns none of them
    except the ratio normaliser, whose per-bin means are training state."""

    def __init__(self, generator: nn.Module, teacher: nn.Module, fake_score: nn.Module, discriminator: nn.Module,
                 divergence: Divergence, ratio: RatioNormalizer, schedule: NoiseSchedule, cfg: ObjectiveConfig,
                 oracle_log_ratio: Callable | None = None, use_oracle_weights: bool = False,
                 student: FewStep | None = None):
        super().__init__()
        # plain attributes, not submodules: the trainer owns and checkpoints the networks
        self.__dict__["generator"] = generator
        self.__dict__["teacher"] = teacher
        self.__dict__["fake_score"] = fake_score
        self.__dict__["discriminator"] = discriminator
        self.divergence = divergence
        self.ratio = ratio
        self.schedule = schedule
        self.cfg = cfg
        self.oracle_log_ratio = oracle_log_ratio
        self.use_oracle_weights = use_oracle_weights
        self.student = student  # None: the one-step generator, x = G(z, c)
        if cfg.disc_features not in ("teacher", "fake"):
            raise ValueError(f"objective.disc_features must be 'teacher' or 'fake', got {cfg.disc_features!r}")
        if cfg.denoise_loss not in ("edm", "eps", "x0"):
            raise ValueError(f"objective.denoise_loss must be 'edm', 'eps' or 'x0', got {cfg.denoise_loss!r}")
        if cfg.denoise_levels not in ("grid", "dm"):
            raise ValueError(f"objective.denoise_levels must be 'grid' or 'dm', got {cfg.denoise_levels!r}")
        if cfg.disc_fake_noise not in ("independent", "denoise"):
            raise ValueError("objective.disc_fake_noise must be 'independent' or 'denoise', "
                             f"got {cfg.disc_fake_noise!r}")
        if schedule.own_disc_levels and cfg.disc_fake_noise == "denoise":
            raise ValueError("noise.disc_index_max / noise.disc_levels give the discriminator its own noise levels; "
                             "objective.disc_fake_noise=denoise shares the fake-score batch's: use 'independent'")

    def generate(self, z: torch.Tensor, cond: Any, rng: torch.Generator | None = None) -> torch.Tensor:
        """The generated batch both losses act on: G(z, c), or a few-step student's backward simulation."""
        if self.student is None:
            return self.generator(z, cond)
        return self.student.generate(self.generator, z, cond, rng)

    def _noise(self, x, sigma, rng):
        eps = torch.randn(x.shape, generator=rng, device=x.device, dtype=torch.float32)
        return x + as_sigma(sigma, x) * eps, eps

    # --- generator ----------------------------------------------------------------------------------------
    def generator_loss(self, z: torch.Tensor, cond: Any, rng: torch.Generator | None = None):
        cfg = self.cfg
        x = self.generate(z, cond, rng)
        n = x.shape[0]
        sigma = self.schedule.sample_dm(n, rng, x.device)
        x_t, _ = self._noise(x, sigma, rng)
        if cfg.disc_features == "teacher":
            # gradients reach x_t through feats only; x0_real is a constant (its decoder keeps no graph)
            x0_real, feats = self.teacher(x_t, sigma, cond, mode="both", x0_grad=False)
            with torch.no_grad():
                x0_fake = self.fake_score(x_t.detach(), sigma, cond)
        else:
            with torch.no_grad():
                x0_real = self.teacher(x_t.detach(), sigma, cond)
            x0_fake, feats = self.fake_score(x_t, sigma, cond, mode="both", x0_grad=False)
        logit = self.discriminator(feats).float()
        oracle = None
        if self.oracle_log_ratio is not None and self.use_oracle_weights:
            with torch.no_grad():
                oracle = self.oracle_log_ratio(x_t.detach(), sigma, cond).float()
        log_r = oracle if (self.use_oracle_weights and oracle is not None) else logit.detach()
        trained = None  # samples at levels the discriminator is trained at (None: all of them)
        if self.schedule.own_disc_range:
            trained = sigma.reshape(-1) <= self.schedule.disc_sigma_max
            if oracle is None or not self.use_oracle_weights:
                # above its range the head has seen nothing; there the images are near pure noise and p_t ~ q_t,
                # so r = 1: those samples get h(1), DMD2's weight
                log_r = torch.where(trained.reshape(log_r.shape), log_r, torch.zeros_like(log_r))
        # FastGen's linear bins live in the scheduler's time t (EDM: sigma; SD: timestep / 1000)
        bin_t = self.schedule.time_of(sigma) if getattr(self.ratio, "linear", False) else sigma
        h, stats = self.ratio(log_r, bin_t, self.divergence, update=True)
        loss_dm, g = weighted_score_loss(x, x0_real.detach(), x0_fake.detach(), h, cfg.dmd_normalize, cfg.dmd_eps)
        if trained is None:
            loss_gan = F.softplus(-logit).mean()
        else:  # the GAN term on the samples inside the discriminator's range
            w = trained.reshape(logit.shape).float()
            loss_gan = (w * F.softplus(-logit)).sum() / w.sum().clamp(min=1.0)
        loss = loss_dm + cfg.gan_weight * loss_gan
        logs = {"loss_gen": loss.detach(), "loss_dm": loss_dm.detach(), "loss_gan_gen": loss_gan.detach(),
                "logit_gen": logit.detach().mean(), **stats}
        # share of samples whose r sits at a clamp: a confident discriminator puts every generated sample at
        # r_min, where the weights are uniform again
        rc = self.ratio.cfg
        r_raw = torch.exp(log_r.reshape(-1).float().clamp(-rc.logit_clamp, rc.logit_clamp))
        logs["r_clamped"] = ((r_raw <= rc.r_min) | (r_raw >= rc.r_max)).float().mean()
        if cfg.log_bins:
            logs.update(binned_ess(h, self.ratio.bin_index(sigma.reshape(-1)), self.ratio.cfg.num_bins))
        if oracle is not None:
            logs.update(calibration(logit.detach(), oracle))
        return loss, logs

    # --- critic -------------------------------------------------------------------------------------------
    def critic_loss(self, z: torch.Tensor, cond: Any, x_real: torch.Tensor, cond_real: Any,
                    rng: torch.Generator | None = None):
        cfg = self.cfg
        with torch.no_grad():
            x = self.generate(z, cond, rng).float()
        n, m = x.shape[0], x_real.shape[0]
        if cfg.denoise_loss == "x0" or cfg.denoise_levels == "dm":
            sigma_dn = self.schedule.sample_dm(n, rng, x.device)
        else:
            sigma_dn = self.schedule.sample_denoise(n, rng, x.device)
        x_t_dn, eps = self._noise(x, sigma_dn, rng)
        # the discriminator sees real samples at an independent draw from the DM range (or its own,
        # noise.disc_index_max); generated ones at another independent draw (DMD2) or at the denoising batch's own
        # (FastGen)
        shared = cfg.disc_fake_noise == "denoise"
        sigma_f = sigma_dn if shared else self.schedule.sample_disc(n, rng, x.device)
        sigma_r = self.schedule.sample_disc(m, rng, x.device)
        x_t_f = x_t_dn if shared else self._noise(x, sigma_f, rng)[0]
        x_t_r, _ = self._noise(x_real.float(), sigma_r, rng)
        if cfg.r1_gamma > 0:
            x_t_r.requires_grad_(True)
        disc_in = torch.cat([x_t_f, x_t_r])
        disc_sigma = torch.cat([sigma_f, sigma_r])
        disc_cond = _cat_cond(cond, cond_real)

        if cfg.disc_features == "teacher":
            x0 = self.fake_score(x_t_dn, sigma_dn, cond)
            ctx = torch.enable_grad() if cfg.r1_gamma > 0 else torch.no_grad()
            with ctx:
                feats = self.teacher(disc_in, disc_sigma, disc_cond, mode="features")
        else:
            # One pass of the fake score over [denoising batch, disc batch]: a wrapped (DDP) module must run
            # once per backward. Its trunk gets the GAN loss through the features.
            x0_all, feats_all = self.fake_score(torch.cat([x_t_dn, disc_in]), torch.cat([sigma_dn, disc_sigma]),
                                                _cat_cond(cond, disc_cond), mode="both")
            x0 = x0_all[:n]
            # the head sees the features; the trunk's gradient from them is scaled by fake_trunk_gan_weight
            w = cfg.fake_trunk_gan_weight
            feats = [f[n:].detach() + w * (f[n:] - f[n:].detach()) for f in feats_all]
        logits = self.discriminator(feats).float()
        logit_f, logit_r = logits[:n], logits[n:]

        if cfg.denoise_loss == "edm":
            w = edm_loss_weight(as_sigma(sigma_dn, x), cfg.sigma_data)
            loss_dn = (w * (x0.float() - x) ** 2).mean()
        elif cfg.denoise_loss == "x0":  # FastGen: F.mse_loss(x0, x0_hat), no weighting
            loss_dn = ((x0.float() - x) ** 2).mean()
        else:  # epsilon MSE: eps_hat = (x_t - x0_hat) / sigma
            s = as_sigma(sigma_dn, x)
            loss_dn = (((x_t_dn - x0.float()) / s - eps) ** 2).mean()
        loss_d = F.softplus(-logit_r).mean() + F.softplus(logit_f).mean()
        loss = loss_dn + cfg.disc_weight * loss_d
        logs = {"loss_denoise": loss_dn.detach(), "loss_disc": loss_d.detach(),
                "logit_real": logit_r.detach().mean(), "logit_fake": logit_f.detach().mean(),
                "disc_acc": 0.5 * ((logit_r > 0).float().mean() + (logit_f < 0).float().mean()).detach()}
        if cfg.log_bins:
            # accuracy per noise-level bin (the ratio normaliser's bins), real and generated pooled
            nb = self.ratio.cfg.num_bins
            idx = self.ratio.bin_index(disc_sigma.reshape(-1))
            correct = torch.cat([(logit_f < 0), (logit_r > 0)]).float().detach()
            logs.update(binned_stats("disc_acc", correct, idx, nb))
            logs.update(binned_stats("logit_real", logit_r.detach(), idx[n:], nb))
            logs.update(binned_stats("logit_fake", logit_f.detach(), idx[:n], nb))
        if cfg.r1_gamma > 0:
            (grad,) = torch.autograd.grad(logit_r.sum(), x_t_r, create_graph=True)
            r1 = grad.pow(2).reshape(m, -1).sum(1).mean()
            loss = loss + 0.5 * cfg.r1_gamma * r1
            logs["r1"] = r1.detach()
        logs["loss_critic"] = loss.detach()
        return loss, logs


FDistill = FDivergenceObjective
"""Deprecated name of ``FDivergenceObjective`` (the package is f-distill; the class is its objective), kept so that
older code importing it still runs."""


def binned_stats(name: str, values: torch.Tensor, idx: torch.Tensor, num_bins: int) -> dict:
    """Per-noise-level-bin means of ``values`` as ``PER_BIN_NUM + name_binK`` / ``PER_BIN_DEN + name_binK`` pairs
    (sum and count in the bin). The trainer averages both over its logging interval and processes and writes
    their quotient as ``name_binK``: the pooled mean over every sample that fell in bin K (absent if none did)."""
    values, idx = values.reshape(-1).float(), idx.reshape(-1)
    sums = values.new_zeros(num_bins).index_add_(0, idx, values)
    counts = values.new_zeros(num_bins).index_add_(0, idx, torch.ones_like(values))
    out = {}
    for b in range(num_bins):
        out[f"{PER_BIN_NUM}{name}_bin{b}"] = sums[b]
        out[f"{PER_BIN_DEN}{name}_bin{b}"] = counts[b]
    return out


def binned_ess(h: torch.Tensor, idx: torch.Tensor, num_bins: int) -> dict:
    """Per-bin effective sample size of the weights, (sum h)^2 / (n sum h^2) within each bin, as
    ``binned_stats`` pairs (one value per bin that the batch visits; the trainer averages it over batches)."""
    h, idx = h.reshape(-1).float(), idx.reshape(-1)
    s1 = h.new_zeros(num_bins).index_add_(0, idx, h)
    s2 = h.new_zeros(num_bins).index_add_(0, idx, h * h)
    n = h.new_zeros(num_bins).index_add_(0, idx, torch.ones_like(h))
    present = (n > 0).float()
    ess = torch.where(n > 0, s1 ** 2 / (n * s2).clamp(min=1e-12), torch.zeros_like(s1))
    out = {}
    for b in range(num_bins):
        out[f"{PER_BIN_NUM}h_ess_bin{b}"] = ess[b]
        out[f"{PER_BIN_DEN}h_ess_bin{b}"] = present[b]
    return out


def calibration(logit: torch.Tensor, oracle: torch.Tensor) -> dict:
    """How well the discriminator's log-ratio matches an exact one: correlation and least-squares slope of
    the oracle on the logit (1 = calibrated; < 1 = logits too spread; > 1 = too flat, weights flattened)."""
    a = logit.float() - logit.float().mean()
    b = oracle.float() - oracle.float().mean()
    corr = (a * b).sum() / (a.norm() * b.norm()).clamp(min=1e-12)
    slope = (a * b).sum() / (a * a).sum().clamp(min=1e-12)
    return {"calib_corr": corr, "calib_slope": slope}
