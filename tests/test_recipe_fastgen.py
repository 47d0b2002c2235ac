"""`recipe: fastgen` against the authors' code, NVlabs/FastGen, on fixed inputs.

The expected numbers come from FastGen's algorithms written out here in numpy / plain torch, independently of the
package (its source: fastgen/methods/distribution_matching/f_distill.py ``_get_f_div_weighting_h``,
fastgen/methods/common_loss.py ``variational_score_distillation_loss``, fastgen/networks/noise_schedule.py
``EDMNoiseSchedule`` / ``AlphasNoiseSchedule``, fastgen/callbacks/ema.py, fastgen/configs/experiments/*):

- the ratio normaliser's weights, across steps with bin EMA 0.5 (and 0), for every FastGen divergence key;
- the generator loss of ``FDistill`` and its gradient, against FastGen's variational-score-distillation form;
- the critic step: unweighted x0 loss at the DM draws, the discriminator's fake branch at the same (sigma, eps);
- the noise draws' ranges (EDM grid index [2, 998]; SD floor(1000 t) for t ~ U[0.001, 0.999]);
- the generator EMA, advanced every iteration as FastGen's callback does;
- the recipe switch itself: rows resolved, explicit keys win, dmd2 = the behaviour before recipes.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fdistill.config import DistillConfig, from_dict, load_config, load_yaml, to_dict
from fdistill.divergences import get_divergence
from fdistill.noise import NoiseSchedule, karras_sigmas
from fdistill.objective import FDistill, ObjectiveConfig
from fdistill.pipelines import build_run_task
from fdistill.ratio import RatioConfig, RatioNormalizer
from fdistill.recipes import recipe_rows

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# FastGen's f_div keys -> weighting h(r) (f_distill.py, all_f_div_weighting_function), in float64
FASTGEN_H = {
    "rkl": lambda r: np.ones_like(r),
    "kl": lambda r: r,
    "js": lambda r: 1 - 1 / (1 + r),
    "sf": lambda r: 1 / (1 + r),
    "neyman": lambda r: 1 / np.maximum(r, 1e-8),
    "sh": lambda r: r ** 0.5,
    "jf": lambda r: 1 + r,
}


class FastGenBins:
    """FastGen's _get_f_div_weighting_h with ratio_normalization on, written out (bins start at 1)."""

    def __init__(self, min_t, max_t, ema, num=10, lower=0.1, upper=20.0):
        self.min_t, self.max_t, self.ema, self.num = min_t, max_t, ema, num
        self.lower, self.upper = lower, upper
        self.bins = np.ones(num)

    def __call__(self, fake_logits, t, f_div):
        logit = np.clip(np.asarray(fake_logits, np.float64).reshape(len(t), -1).mean(1), -10.0, 10.0)
        r = np.clip(np.exp(logit), self.lower, self.upper)
        width = (self.max_t - self.min_t) / self.num
        idx = np.clip(np.floor((np.asarray(t, np.float64) - self.min_t) / width).astype(int), 0, self.num - 1)
        cnt = np.bincount(idx, minlength=self.num).astype(np.float64)
        tot = np.bincount(idx, weights=r, minlength=self.num)
        valid = cnt > 0
        new = tot / (cnt + 1e-6)
        self.bins[valid] = self.bins[valid] * self.ema + (1 - self.ema) * new[valid]
        r = r / (self.bins[idx] + 1e-6)
        h = FASTGEN_H[f_div](r)
        return h / (h.mean() + 1e-6)


def _steps(seed=0, n=64):
    """Three batches of (logits, sigma): EDM-grid draws; only bins 0 and 3 (the others keep their state);
    logits beyond the clamp."""
    g = torch.Generator().manual_seed(seed)
    grid = karras_sigmas()
    s0 = grid[torch.randint(2, 999, (n,), generator=g)]
    l0 = torch.randn(n, generator=g) * 2
    s1 = torch.where(torch.rand(n, generator=g) < 0.5, torch.full((n,), 1.5), torch.full((n,), 30.0))
    l1 = torch.randn(n, generator=g) + 0.7
    s2 = grid[torch.randint(2, 999, (n,), generator=g)]
    l2 = torch.randn(n, generator=g) * 8  # many beyond +-10 and outside r in [0.1, 20]
    return [(l0, s0), (l1, s1), (l2, s2)]


@pytest.mark.parametrize("f_div", sorted(FASTGEN_H))
@pytest.mark.parametrize("ema", [0.5, 0.0])
def test_ratio_weights_equal_fastgen_across_steps(f_div, ema):
    ours = RatioNormalizer(RatioConfig(bin_spacing="linear", bin_ema=ema), (0.002, 80.0))
    ref = FastGenBins(0.002, 80.0, ema)
    div = get_divergence(f_div)  # FastGen's key, accepted as an alias with FastGen's meaning
    for logits, sigma in _steps():
        h, _ = ours(logits, sigma, div)
        want = ref(logits.numpy(), sigma.numpy(), f_div)
        np.testing.assert_allclose(h.numpy(), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours.bin_mean.numpy(), ref.bins, rtol=1e-5)


def test_ratio_weights_on_sd_time_range():
    """SD: bins linear in t over FastGen's AlphasNoiseSchedule range [0, 0.999]."""
    ours = RatioNormalizer(RatioConfig(bin_spacing="linear", bin_ema=0.5), (0.0, 0.999))
    ref = FastGenBins(0.0, 0.999, 0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        t = torch.randint(1, 999, (48,), generator=g).double() / 1000
        logits = torch.randn(48, generator=g) * 2
        h, _ = ours(logits, t, get_divergence("js"))
        np.testing.assert_allclose(h.numpy(), ref(logits.numpy(), t.numpy(), "js"), rtol=1e-5, atol=1e-6)


def test_log_sigma_bins_are_not_fastgens():
    """The dmd2 recipe's bins differ on the same inputs: the switch matters."""
    ours = RatioNormalizer(RatioConfig(bin_spacing="log_sigma", bin_ema=0.5), (0.002, 80.0))
    ref = FastGenBins(0.002, 80.0, 0.5)
    logits, sigma = _steps()[0]
    h, _ = ours(logits, sigma, get_divergence("js"))
    assert np.abs(h.numpy() - ref(logits.numpy(), sigma.numpy(), "js")).max() > 1e-3


def test_fastgen_divergence_names_and_ambiguous_ones():
    want = {"rkl": "reverse_kl", "kl": "forward_kl", "js": "js", "sf": "softened_rkl", "neyman": "neyman",
            "sh": "squared_hellinger", "jf": "jeffreys"}
    r = torch.tensor([0.2, 1.0, 3.0])
    for key, name in want.items():
        d = get_divergence(key)
        assert d.name == name
        h = d.weight(r.log()).double().numpy()
        fg = FASTGEN_H[key](r.double().numpy())
        np.testing.assert_allclose(h / h.mean(), fg / fg.mean(), rtol=1e-6)  # same h up to a constant
    cfg = load_config(CONFIGS / "toy2d.yaml", ["divergence=kl"])
    assert get_divergence(cfg.divergence).name == "forward_kl"
    with pytest.raises(ValueError, match="ambiguous.*pearson, neyman"):
        get_divergence("chi2")


# ------------------------------------------------------------------------------------------------------------
# the objective against FastGen's loss, with small deterministic stand-in networks


class _Gen(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4, 4) * 0.5)

    def forward(self, z, cond=None):
        return torch.tanh(z * self.w + 0.1)


class _Den(nn.Module):
    """An EDM-form denoiser x0(x_t, sigma) with features tanh(a x_t); records what it saw."""

    def __init__(self, scale, shift):
        super().__init__()
        self.scale, self.shift = scale, shift
        self.a = torch.linspace(0.5, 1.5, 3).reshape(1, 3, 1, 1)
        self.seen = []

    def x0(self, x_t, s):
        return self.scale * x_t / (1 + s ** 2) + self.shift

    def forward(self, x_t, sigma, cond=None, mode="x0", x0_grad=True):
        s = sigma.reshape(-1, 1, 1, 1)
        self.seen.append((mode, x_t.detach().clone(), sigma.detach().clone()))
        feats = [torch.tanh(self.a * x_t)]
        if mode == "features":
            return feats
        with torch.set_grad_enabled(x0_grad and torch.is_grad_enabled()):
            x0 = self.x0(x_t, s)
        return (x0, feats) if mode == "both" else x0


class _Disc(nn.Module):
    def __init__(self):
        super().__init__()
        self.v = nn.Parameter(torch.tensor([6.0, -4.0, 3.0]))

    def forward(self, feats):
        return (feats[0].mean(dim=(2, 3)) * self.v).sum(1)


def _objective(gan_weight=3e-3, ema=0.5):
    torch.manual_seed(0)
    gen, teacher, fake, disc = _Gen(), _Den(0.9, 0.0), _Den(0.7, 0.05), _Disc()
    schedule = NoiseSchedule.edm(dm_index_range=(2, 998))
    cfg = ObjectiveConfig(gan_weight=gan_weight, denoise_loss="x0", disc_fake_noise="denoise", dmd_eps=1e-6)
    ratio = RatioNormalizer(RatioConfig(bin_spacing="linear", bin_ema=ema), schedule.t_range)
    return FDistill(gen, teacher, fake, disc, get_divergence("js"), ratio, schedule, cfg), gen, teacher, fake, disc


def _fastgen_vsd(gen_data, teacher_x0, fake_score_x0, h):
    """common_loss.variational_score_distillation_loss, written out."""
    with torch.no_grad():
        w = 1 / ((gen_data - teacher_x0).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-6)
        w = w * h.reshape(-1, 1, 1, 1)
        target = gen_data - (fake_score_x0 - teacher_x0) * w
    return 0.5 * F.mse_loss(gen_data, target)


def test_generator_loss_and_gradient_equal_fastgen():
    obj, gen, teacher, fake, disc = _objective()
    ref = FastGenBins(0.002, 80.0, 0.5)
    rng = torch.Generator().manual_seed(5)
    for step in range(3):
        z = torch.randn(16, 3, 4, 4, generator=rng)
        teacher.seen.clear()
        gen.zero_grad()
        loss, logs = obj.generator_loss(z, None, rng)
        loss.backward()
        ours_grad = gen.w.grad.clone()
        (_, x_t, sigma), = [s for s in teacher.seen if s[0] == "both"]

        # FastGen's student step on the same draws: perturbed = gen_data + sigma * eps
        gen.zero_grad()
        gen_data = gen(z)
        s = sigma.reshape(-1, 1, 1, 1)
        eps = (x_t - gen_data.detach()) / s
        perturbed = gen_data + s * eps
        teacher_x0 = teacher.x0(perturbed, s).detach()
        fake_x0 = fake.x0(perturbed, s).detach()
        fake_logits = disc([torch.tanh(teacher.a * perturbed)]).reshape(-1, 1)
        h = torch.from_numpy(ref(fake_logits.detach().numpy(), sigma.numpy(), "js")).float()
        want = _fastgen_vsd(gen_data, teacher_x0, fake_x0, h) + 3e-3 * F.softplus(-fake_logits).mean()
        want.backward()
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours_grad, gen.w.grad, rtol=1e-5, atol=1e-8)
        assert ours_grad.abs().sum() > 0


def test_critic_step_is_fastgens():
    """x0 MSE without weighting at DM-distributed noise; the discriminator's fake branch at that same x_t."""
    obj, gen, teacher, fake, disc = _objective()
    rng = torch.Generator().manual_seed(2)
    z, x_real = torch.randn(32, 3, 4, 4, generator=rng), torch.rand(32, 3, 4, 4, generator=rng) * 2 - 1
    loss, logs = obj.critic_loss(z, None, x_real, None, rng)
    (_, x_t, sigma), = fake.seen
    (_, disc_in, disc_sigma), = [s for s in teacher.seen if s[0] == "features"]
    assert torch.equal(disc_in[:32], x_t) and torch.equal(disc_sigma[:32], sigma)
    assert not torch.equal(disc_sigma[32:], sigma)  # real data: an independent draw
    grid = obj.schedule.sigmas
    assert bool(((sigma >= grid[2]) & (sigma <= grid[998])).all())
    x = gen(z).detach()
    want = F.mse_loss(x, fake.x0(x_t, sigma.reshape(-1, 1, 1, 1)))  # denoising_score_matching_loss('x0')
    torch.testing.assert_close(logs["loss_denoise"], want, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------------------
# noise draws


def test_edm_grid_and_index_range_are_fastgens():
    # EDMNoiseSchedule: ramp = linspace(0, 1, 1000); sigmas = flip((max^(1/rho) + ramp (min^(1/rho) - max^(1/rho)))^rho)
    ramp = np.linspace(0, 1, 1000)
    fg = ((80.0 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7)[::-1]
    np.testing.assert_allclose(karras_sigmas().double().numpy(), fg, rtol=1e-6)
    lo, hi = int(0.002 * 1000), int(0.998 * 1000)  # min_step_percent / max_step_percent, randint(lo, hi + 1)
    rows = recipe_rows("fastgen", "imagenet64")
    assert (rows["noise.dm_index_min"], rows["noise.dm_index_max"]) == (lo, hi) == (2, 998)
    sched = NoiseSchedule.edm(dm_index_range=(lo, hi))
    s = sched.sample_dm(200_000, torch.Generator().manual_seed(0))
    idx = torch.searchsorted(sched.sigmas, s)
    assert torch.equal(sched.sigmas[idx], s)  # grid values only
    assert (int(idx.min()), int(idx.max())) == (2, 998)
    assert sched.t_range == (pytest.approx(0.002), pytest.approx(80.0))  # FastGen's [min_t, max_t]


def test_sd_timestep_range_is_fastgens():
    # SD15 config: t ~ U[0.001, 0.999] (float64); alpha, sigma at int(1000 t) (AlphasNoiseSchedule._t_to_idx)
    g = torch.Generator().manual_seed(0)
    t = torch.rand(2_000_000, generator=g, dtype=torch.float64) * (0.999 - 0.001) + 0.001
    idx = (1000 * t).long()
    rows = recipe_rows("fastgen", "coco_t2i")
    assert (rows["noise.dm_index_min"], rows["noise.dm_index_max"]) == (int(idx.min()), int(idx.max())) == (1, 998)
    assert len(torch.unique(idx)) == 998
    # our VP schedule: t = timestep / 1000 over FastGen's [0, 0.999]
    abar = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)
    sched = NoiseSchedule(((1 - abar) / abar).sqrt(), (1, 998), time="index")
    assert sched.t_range == (0.0, 0.999)
    k = torch.tensor([1, 17, 500, 998])
    torch.testing.assert_close(sched.time_of(sched.sigmas[k]), k.double() / 1000)


# ------------------------------------------------------------------------------------------------------------
# generator EMA: every iteration


def test_ema_advances_every_iteration_as_fastgens(tmp_path, monkeypatch):
    """FastGen's EMA callback: ema <- beta ema + (1 - beta) net after every iteration (critic-only ones too),
    starting from the initial network; with 4 critic-only iterations first that is our first update's copy."""
    from safetensors.torch import load_file

    from fdistill import iteration, trainer
    from fdistill.generator import unwrap

    snaps = []
    orig = iteration.update_emas

    def spy(par, emas, generator):
        snaps.append({k: v.detach().clone() for k, v in unwrap(generator).named_parameters()})
        return orig(par, emas, generator)

    monkeypatch.setattr(iteration, "update_emas", spy)
    out = tmp_path / "run"
    cfg = load_config(CONFIGS / "toy2d.yaml", [
        "recipe=fastgen", "schedule.scheme=fastgen", "schedule.critic_per_gen=5", "steps=2", "ema=[0.9]",
        f"out={out}", "batch_size=32",
        "task.hidden=16", "task.fake_hidden=16", "task.eval_samples=500", "task.kde_samples=64",
        "log.progress=false", "log.every=1"])
    assert (cfg.schedule.ema_every, cfg.schedule.scheme) == ("iteration", "fastgen")
    trainer.distill(cfg, build_run_task(cfg))
    assert len(snaps) == 10  # 2 generator steps x (4 critic-only + 1 generator iteration)
    init = snaps[0]
    assert all(torch.equal(snaps[i][k], init[k]) for i in range(4) for k in init)  # critic-only: unchanged
    ema = {k: v.double() for k, v in init.items()}
    for s in snaps:
        for k in ema:
            ema[k] = 0.9 * ema[k] + 0.1 * s[k].double()
    saved = load_file(str(out / "ckpt-00000002" / "ema_0.9.safetensors"))
    for k, v in ema.items():
        torch.testing.assert_close(saved[f"module.{k}"].double(), v, rtol=1e-5, atol=1e-7)
    meta = json.loads((out / "ckpt-00000002" / "meta.json").read_text())
    assert meta["iteration"] == 10


# ------------------------------------------------------------------------------------------------------------
# the switch


def test_dry_run_prints_the_resolved_recipe(capsys):
    from fdistill.cli import main as cli

    assert cli(["distill", str(CONFIGS / "imagenet64_js.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for line in ("recipe: fastgen", "dm_index_min: 2", "dm_index_max: 998", "bin_spacing: linear",
                 "denoise_loss: x0", "disc_fake_noise: denoise", "scheme: fastgen", "ema_every: iteration",
                 "clip_critic: false", "gen_cond: real", "allow_tf32: true", "- down_blocks.3"):
        assert line in out, line
    assert cli(["distill", str(CONFIGS / "imagenet64_js.yaml"), "recipe=dmd2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for line in ("recipe: dmd2", "dm_index_min: 20", "dm_index_max: 980", "bin_spacing: log_sigma",
                 "denoise_loss: edm", "scheme: dmd2", "ema_every: generator", "- mid_block"):
        assert line in out, line
    assert cli(["distill", str(CONFIGS / "coco_sd15_js.yaml"), "recipe=dmd2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "denoise_loss: eps" in out and "r1_gamma: 1.0" in out and "text_mask: false" in out
    assert cli(["distill", str(CONFIGS / "toy2d.yaml"), "recipe=fastgen2", "--dry-run"]) == 2
    assert "recipe must be one of fastgen, dmd2" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["toy2d.yaml", "mnist.yaml", "image.yaml"])
def test_configs_without_recipe_are_unchanged_by_it(name):
    """No `recipe` key = dmd2, which leaves these configs exactly as they were read before recipes existed."""
    raw = load_yaml(CONFIGS / name)
    assert "recipe" not in raw
    assert to_dict(load_config(CONFIGS / name)) == to_dict(from_dict(DistillConfig, raw))


def test_old_saved_config_resumes_as_dmd2():
    """A run directory's config.json written before recipes lacks the new keys; filled with the defaults
    (trainer._with_defaults) they are DMD2's rows, the behaviour that run had."""
    from fdistill.trainer import _with_defaults

    new_keys = {"recipe", "allow_tf32", "gen_cond"}
    old = {k: v for k, v in to_dict(DistillConfig()).items() if k not in new_keys}
    old["ratio_norm"].pop("bin_spacing")
    old["objective"].pop("disc_fake_noise")
    old["objective"].pop("dmd_eps")
    old["schedule"].pop("ema_every")
    old["optim"].pop("clip_critic")
    cfg = from_dict(DistillConfig, _with_defaults(old, json.loads(json.dumps(to_dict(DistillConfig())))))
    d = to_dict(cfg)
    for key, value in recipe_rows("dmd2", "toy2d").items():
        node = d
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    assert math.isclose(cfg.ratio_norm.bin_ema, 0.0)
