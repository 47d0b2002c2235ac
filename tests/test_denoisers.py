"""The EDM adapter around diffusers UNet2DModel, its features, and the network calls per iteration."""

import copy

import pytest
import torch

from fdistill.denoisers import EDMPrecondUNet, freeze, resolve_module_name
from tiny_models import tiny_edm_unet
from fdistill.discriminator import Discriminator
from fdistill.divergences import get_divergence
from fdistill.generator import OneStepGenerator
from fdistill.noise import NoiseSchedule
from fdistill.objective import FDistill, ObjectiveConfig
from fdistill.ratio import RatioConfig, RatioNormalizer


def tiny_unet(classes=10):
    return tiny_edm_unet(classes)


def test_edm_preconditioning_by_hand():
    unet = tiny_unet()
    den = EDMPrecondUNet(unet, sigma_data=0.5)
    x = torch.randn(3, 1, 16, 16)
    sigma = torch.tensor([0.01, 1.0, 80.0])
    y = torch.tensor([1, 2, 3])
    sd = 0.5
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip = sd ** 2 / (s ** 2 + sd ** 2)
    c_out = s * sd / (s ** 2 + sd ** 2) ** 0.5
    c_in = 1 / (s ** 2 + sd ** 2) ** 0.5
    F = unet(c_in * x, torch.log(sigma) / 4, class_labels=y).sample
    torch.testing.assert_close(den(x, sigma, y), c_skip * x + c_out * F)
    # one-hot labels are the same conditioning
    torch.testing.assert_close(den(x, sigma, torch.nn.functional.one_hot(y, 10).float()), den(x, sigma, y))


def test_features_are_the_mid_block_output_and_stop_early():
    unet = tiny_unet()
    den = EDMPrecondUNet(unet)
    x, sigma, y = torch.randn(2, 1, 16, 16), torch.tensor([0.5, 3.0]), torch.tensor([0, 7])
    seen = {}
    h1 = unet.mid_block.register_forward_hook(lambda m, i, o: seen.__setitem__("mid", o))
    ran_up = []
    h2 = unet.up_blocks[0].register_forward_hook(lambda m, i, o: ran_up.append(1))
    x0_full = den(x, sigma, y)
    mid = seen["mid"]
    ran_up.clear()
    feats = den(x, sigma, y, mode="features")
    assert ran_up == []  # the decoder never ran
    torch.testing.assert_close(feats[0], mid)
    x0, feats2 = den(x, sigma, y, mode="both")
    assert ran_up == [1]
    torch.testing.assert_close(x0, x0_full)
    torch.testing.assert_close(feats2[0], mid)
    h1.remove(), h2.remove()
    with pytest.raises(ValueError, match="mode"):
        den(x, sigma, y, mode="bottleneck")


def _saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward while fn runs."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def test_both_without_x0_grad_keeps_no_decoder_graph():
    den = freeze(EDMPrecondUNet(tiny_unet()))
    x, sigma, y = torch.randn(4, 1, 16, 16), torch.tensor([0.1, 0.5, 3.0, 20.0]), torch.tensor([0, 1, 2, 3])
    w = torch.randn(1, 64, 8, 8)

    def run(x0_grad):
        xi = x.clone().requires_grad_(True)
        (x0, feats), saved = _saved_bytes(lambda: den(xi, sigma, y, mode="both", x0_grad=x0_grad))
        (feats[0] * w).sum().backward()
        return x0, feats[0], xi.grad, saved

    x0_a, f_a, g_a, saved_a = run(True)
    assert torch.is_grad_enabled()
    x0_b, f_b, g_b, saved_b = run(False)
    assert torch.is_grad_enabled()  # grad mode restored after the pass
    assert x0_a.requires_grad and not x0_b.requires_grad
    torch.testing.assert_close(x0_b, x0_a.detach())
    torch.testing.assert_close(f_b, f_a)
    torch.testing.assert_close(g_b, g_a)  # the features' gradient is untouched
    # the encoder's activations are still saved, the decoder's are not
    feats_only = _saved_bytes(lambda: den(x.clone().requires_grad_(True), sigma, y, mode="features"))[1]
    assert saved_b == feats_only < saved_a
    # restored even when the pass fails
    with pytest.raises(Exception):
        den(x[:, :, :7], sigma, y, mode="both", x0_grad=False)
    assert torch.is_grad_enabled()


def _objective(disc_features="teacher"):
    teacher = freeze(EDMPrecondUNet(tiny_unet()))
    gen = OneStepGenerator(copy.deepcopy(teacher).requires_grad_(True), 80.0, (1, 16, 16))
    fake = copy.deepcopy(teacher).requires_grad_(True)
    feats = teacher(torch.zeros(1, 1, 16, 16), torch.ones(1), torch.zeros(1, dtype=torch.long), mode="features")
    disc = Discriminator.for_feature_shapes([f.shape[1:] for f in feats])
    sched = NoiseSchedule.edm()
    obj = FDistill(gen, teacher, fake, disc, get_divergence("js"), RatioNormalizer(RatioConfig(), sched.dm_sigma_range),
                   sched, ObjectiveConfig(disc_features=disc_features, gan_weight=3e-3))
    return obj, teacher, gen, fake, disc


def _count_calls(*mods):
    counts = {}
    hooks = []
    for name, m in mods:
        counts[name] = 0
        hooks.append(m.register_forward_pre_hook(lambda mod, i, name=name: counts.__setitem__(name, counts[name] + 1)))
    return counts, hooks


def test_network_calls_per_iteration_are_minimal():
    obj, teacher, gen, fake, disc = _objective()
    rng = torch.Generator().manual_seed(0)
    z, y = torch.randn(2, 1, 16, 16), torch.tensor([1, 2])
    for m in (teacher, fake):
        m.reset_calls()
    unet_counts, hooks = _count_calls(("teacher", teacher.unet), ("fake", fake.unet),
                                      ("gen", gen.denoiser.unet), ("disc", disc))
    dec_counts, hooks2 = _count_calls(("teacher_dec", teacher.unet.up_blocks[0]))
    loss, _ = obj.generator_loss(z, y, rng)
    loss.backward()
    # generator iteration: one generator pass, ONE teacher pass (x0 and features together), one fake pass
    assert unet_counts == {"teacher": 1, "fake": 1, "gen": 1, "disc": 1}
    assert teacher.calls == {"x0": 0, "features": 0, "both": 1}
    assert fake.calls == {"x0": 1, "features": 0, "both": 0}
    for k in unet_counts:
        unet_counts[k] = 0
    dec_counts["teacher_dec"] = 0
    teacher.reset_calls()
    loss, _ = obj.critic_loss(z, y, torch.randn(2, 1, 16, 16), y, rng)
    loss.backward()
    # critic iteration: generator once (no grad), fake score once, teacher once for fake+real features
    # (batched), stopped at the bottleneck; the head once on the batch
    assert unet_counts == {"teacher": 1, "fake": 1, "gen": 1, "disc": 1}
    assert teacher.calls == {"x0": 0, "features": 1, "both": 0}
    assert dec_counts["teacher_dec"] == 0
    for h in hooks + hooks2:
        h.remove()


@pytest.mark.parametrize("disc_features", ["teacher", "fake"])
def test_a_few_iterations_change_all_three_trainable_networks(disc_features):
    obj, teacher, gen, fake, disc = _objective(disc_features)
    before = {n: [p.detach().clone() for p in m.parameters()] for n, m in (("gen", gen), ("fake", fake), ("disc", disc))}
    t_before = [p.detach().clone() for p in teacher.parameters()]
    opt_g = torch.optim.AdamW(gen.parameters(), lr=1e-3)
    opt_c = torch.optim.AdamW(list(fake.parameters()) + list(disc.parameters()), lr=1e-3)
    rng = torch.Generator().manual_seed(0)
    for _ in range(2):
        y = torch.randint(0, 10, (2,), generator=rng)
        loss, logs = obj.critic_loss(torch.randn(2, 1, 16, 16), y, torch.randn(2, 1, 16, 16), y, rng)
        opt_c.zero_grad()
        loss.backward()
        opt_c.step()
        loss, logs = obj.generator_loss(torch.randn(2, 1, 16, 16), y, rng)
        assert torch.isfinite(loss)
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
    for n, m in (("gen", gen), ("fake", fake), ("disc", disc)):
        changed = sum(not torch.equal(a, b) for a, b in zip(before[n], m.parameters()))
        assert changed > len(before[n]) // 2, n
    assert all(torch.equal(a, b) for a, b in zip(t_before, teacher.parameters()))


def test_feature_modules_count_from_the_end():
    """task.feature_modules may index module lists from the end (up_blocks.-1: the decoder's last block), so one
    config fits UNets of any depth; the denoiser reads the same map as with the explicit name, and a name that is
    not there is refused naming it."""
    unet = tiny_edm_unet(seed=0)  # two levels: up_blocks.0 and up_blocks.1
    assert resolve_module_name(unet, "up_blocks.-1") == "up_blocks.1"
    assert resolve_module_name(unet, "up_blocks.-2") == "up_blocks.0"
    assert resolve_module_name(unet, "down_blocks.0.resnets.-1") == "down_blocks.0.resnets.0"
    assert resolve_module_name(unet, "mid_block") == "mid_block"
    for bad in ("up_blocks.-3", "up_blocks.2", "up_block.-1"):
        with pytest.raises(ValueError, match="not found"):
            resolve_module_name(unet, bad)
    a = EDMPrecondUNet(unet, 0.5, ["mid_block", "up_blocks.-1"])
    b = EDMPrecondUNet(unet, 0.5, ["mid_block", "up_blocks.1"])
    assert a.feature_modules == b.feature_modules == ["mid_block", "up_blocks.1"]
    x, sigma = torch.randn(2, unet.config.in_channels, 8, 8), torch.tensor([0.5, 2.0])
    cond = torch.tensor([1, 2]) if unet.config.num_class_embeds else None
    with torch.no_grad():
        fa, fb = a(x, sigma, cond, mode="features"), b(x, sigma, cond, mode="features")
    assert all(torch.equal(u, v) for u, v in zip(fa, fb))
