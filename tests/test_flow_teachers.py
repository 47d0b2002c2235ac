"""Today's teachers behind the Denoiser contract: SD3 / SD3.5 and FLUX.1 through the flow-matching adapter, SDXL
through the VP adapter with its added conditions.

Each test builds a tiny random-weight pipeline of the real diffusers class (tests/tiny_teachers.py) and checks that
our denoiser, driven by a plain Euler sampler in EDM sigma space, reproduces the pipeline's own sampling (same
latents, same steps, same guidance), and that the f-distill generator gradient through the flow adapter is the
gradient of the f-divergence (an analytic Gaussian teacher written as a velocity model).
"""

import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn as nn

torch.set_num_threads(1)

from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline  # noqa: E402
from diffusers import StableDiffusionXLPipeline  # noqa: E402

import tiny_teachers  # noqa: E402  (tests/ is on sys.path)
from fdistill.denoisers_flow import (FlowMatchDenoiser, euler_edm, euler_sample, flow_grid, pack_latents,  # noqa: E402
                                     pipeline_times, sigma_from_t, t_from_sigma, unpack_latents)
from fdistill.denoisers_vp import CFGDenoiser, VPUNetDenoiser  # noqa: E402
from fdistill.generator import OneStepGenerator  # noqa: E402

PROMPTS = ["a red bus on a street", "two dogs playing in the snow"]


@pytest.fixture(scope="module")
def sd3_pipe(tmp_path_factory):
    return StableDiffusion3Pipeline.from_pretrained(tiny_teachers.tiny_sd3(tmp_path_factory.mktemp("sd3")))


@pytest.fixture(scope="module")
def flux_pipe(tmp_path_factory):
    return FluxPipeline.from_pretrained(tiny_teachers.tiny_flux(tmp_path_factory.mktemp("flux")))


@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory):
    return StableDiffusionXLPipeline.from_pretrained(tiny_teachers.tiny_sdxl(tmp_path_factory.mktemp("sdxl")))


# ----------------------------------------------------------------------------------------------------------------
# the maps and the grids


def test_flow_edm_maps_are_inverse_and_exact():
    t = torch.tensor([1e-3, 0.1, 0.5, 0.9, 0.999], dtype=torch.float64)
    torch.testing.assert_close(t_from_sigma(sigma_from_t(t)), t)
    assert t_from_sigma(torch.tensor([math.inf])).item() == 1.0
    # x_t = (1 - t) x0 + t eps  <=>  x_EDM = x_t / (1 - t) = x0 + sigma eps
    x0, eps = torch.randn(2, 5, dtype=torch.float64)
    for ti in t:
        s = sigma_from_t(ti)
        torch.testing.assert_close(((1 - ti) * x0 + ti * eps) / (1 - ti), x0 + s * eps)


def test_flow_grid_is_the_schedulers_training_grid():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's
    grid = flow_grid(dict(sched.config))
    ref = sched.sigmas.double()[1:].flip(0)  # the scheduler's t (float32), t = 1 (sigma = inf) left out, ascending
    torch.testing.assert_close(t_from_sigma(grid.double()), ref, rtol=1e-6, atol=0)
    assert len(grid) == 999 and (grid.diff() > 0).all()


def test_dynamic_shift_times_equal_flux_pipeline(flux_pipe):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    flux_pipe(prompt=PROMPTS[:1], latents=pack_latents(z), num_inference_steps=3, height=32, width=32,
              output_type="latent")
    times = pipeline_times(3, dict(flux_pipe.scheduler.config), image_seq_len=64)
    torch.testing.assert_close(times, flux_pipe.scheduler.sigmas, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(times, pipeline_times(3, {"shift": 1.0}))  # the shift did something


def test_pack_unpack_roundtrip_and_matches_pipeline():
    x = torch.randn(2, 4, 8, 6)
    torch.testing.assert_close(unpack_latents(pack_latents(x), 8, 6), x, rtol=0, atol=0)
    torch.testing.assert_close(pack_latents(x), FluxPipeline._pack_latents(x, 2, 4, 8, 6), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# pipeline parity: our Euler sampler in sigma space == the model's own diffusers pipeline


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_sd3_euler_in_sigma_space_equals_pipeline(sd3_pipe, guidance):
    pipe = sd3_pipe
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = pipe(prompt=PROMPTS, latents=z.clone(), num_inference_steps=4, guidance_scale=guidance, height=32,
                   width=32, output_type="latent").images
        times = pipe.scheduler.sigmas.clone()
        pe, npe, pp, npp = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=True)
    den = FlowMatchDenoiser(pipe.transformer)
    teacher = CFGDenoiser(den, guidance, {"encoder_hidden_states": npe[:1], "pooled_projections": npp[:1]})
    x = euler_sample(teacher, z, times, {"encoder_hidden_states": pe, "pooled_projections": pp})
    torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-4)
    assert times[0] == 1.0  # the first step is at the top of the path (sigma = inf)


def test_flux_dev_euler_in_sigma_space_equals_pipeline(flux_pipe):
    pipe = flux_pipe
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = pipe(prompt=PROMPTS, latents=pack_latents(z), num_inference_steps=4, guidance_scale=3.5, height=32,
                   width=32, output_type="latent").images
        times = pipe.scheduler.sigmas.clone()
        pe, pp, _ = pipe.encode_prompt(prompt=PROMPTS, prompt_2=None)
    den = FlowMatchDenoiser(pipe.transformer, guidance=3.5)  # guidance-distilled: the embedding, not CFG
    x = euler_sample(den, z, times, {"encoder_hidden_states": pe, "pooled_projections": pp})
    torch.testing.assert_close(x, unpack_latents(ref, 16, 16), rtol=1e-4, atol=1e-4)
    # the guidance embedding is live: another scale gives another x0
    cond = {"encoder_hidden_states": pe, "pooled_projections": pp}
    with torch.no_grad():
        a = den(z * 2, 1.0, cond)
        den.guidance = 1.0
        b = den(z * 2, 1.0, cond)
    den.guidance = 3.5
    assert (a - b).abs().max() > 1e-6


def test_flux_schnell_without_guidance_embedding_equals_pipeline(tmp_path):
    pipe = FluxPipeline.from_pretrained(tiny_teachers.tiny_flux(tmp_path / "schnell", seed=1, guidance_embeds=False))
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = pipe(prompt=PROMPTS[:1], latents=pack_latents(z), num_inference_steps=2, guidance_scale=0.0,
                   height=32, width=32, output_type="latent").images
        times = pipe.scheduler.sigmas.clone()
        pe, pp, _ = pipe.encode_prompt(prompt=PROMPTS[:1], prompt_2=None)
    x = euler_sample(FlowMatchDenoiser(pipe.transformer), z, times, {"encoder_hidden_states": pe,
                                                                    "pooled_projections": pp})
    torch.testing.assert_close(x, unpack_latents(ref, 16, 16), rtol=1e-4, atol=1e-4)


def test_sdxl_euler_in_sigma_space_equals_pipeline(sdxl_pipe):
    pipe = sdxl_pipe
    guidance = 5.0
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = pipe(prompt=PROMPTS, latents=z.clone(), num_inference_steps=4, guidance_scale=guidance, height=32,
                   width=32, output_type="latent").images
        sigmas = pipe.scheduler.sigmas.clone()
        start = pipe.scheduler.init_noise_sigma
        pe, npe, pp, npp = pipe.encode_prompt(prompt=PROMPTS, do_classifier_free_guidance=True)
    # SDXL's added time ids: (original size, crop top-left, target size), as the pipeline builds them at 32x32
    tids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
    den = VPUNetDenoiser(pipe.unet, pipe.scheduler.alphas_cumprod, "epsilon")
    teacher = CFGDenoiser(den, guidance, {"encoder_hidden_states": npe[:1], "text_embeds": npp[:1], "time_ids": tids})
    x = euler_edm(teacher, z * start, sigmas, {"encoder_hidden_states": pe, "text_embeds": pp,
                                               "time_ids": tids.expand(2, 6)})
    torch.testing.assert_close(x, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# features and the generator


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_transformer_features_are_image_tokens_on_the_latent_grid(family, sd3_pipe, flux_pipe):
    pipe = sd3_pipe if family == "sd3" else flux_pipe
    den = FlowMatchDenoiser(pipe.transformer)
    assert den.feature_modules == (["transformer_blocks.1"] if family == "sd3" else ["single_transformer_blocks.0"])
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 16, 16, generator=g)
    cond = {"encoder_hidden_states": torch.randn(2, 7, 64, generator=g),
            "pooled_projections": torch.randn(2, 64 if family == "sd3" else 32, generator=g)}
    with torch.no_grad():
        feats = den(x, 2.0, cond, mode="features")
        x0b, feats_b = den(x, 2.0, cond, mode="both")
        x0 = den(x, 2.0, cond)
    width = pipe.transformer.inner_dim if family == "sd3" else 32
    assert [f.shape for f in feats] == [torch.Size([2, width, 8, 8])]
    torch.testing.assert_close(feats_b[0], feats[0], rtol=0, atol=0)
    torch.testing.assert_close(x0b, x0, rtol=0, atol=0)
    # tokens are laid out row-major on the grid: moving the input's top-left patch changes that cell most
    x2 = x.clone()
    x2[:, :, :2, :2] += 3.0
    with torch.no_grad():
        d = (den(x2, 2.0, cond, mode="features")[0] - feats[0]).abs().mean(dim=(0, 1))
    assert d[0, 0] == d.max()


def test_one_step_generator_at_t1_is_the_teachers_x0_of_pure_noise(sd3_pipe):
    den = FlowMatchDenoiser(sd3_pipe.transformer)
    gen = OneStepGenerator(den, math.inf, (4, 16, 16))
    g = torch.Generator().manual_seed(5)
    z = gen.sample_latents(2, g)
    cond = {"encoder_hidden_states": torch.randn(2, 7, 64, generator=g), "pooled_projections": torch.randn(2, 64,
                                                                                                          generator=g)}
    with torch.no_grad():
        x = gen(z, cond)
        v = sd3_pipe.transformer(z, timestep=torch.full((2,), 1000.0), return_dict=False, **cond)[0]
    torch.testing.assert_close(x, z - v, rtol=1e-6, atol=1e-6)  # x0 = x_t - t v at t = 1


# ----------------------------------------------------------------------------------------------------------------
# the gradient identity through the flow adapter


class GaussVelocity(nn.Module):
    """The exact velocity of N(mean, var) data on the straight path x_t = (1 - t) x0 + t eps:
    v = (x_t - E[x0 | x_t]) / t, E[x0 | x_t] = m + (1 - t) var / ((1 - t)^2 var + t^2) (x_t - (1 - t) m)."""

    def __init__(self, mean_fn, var_fn):
        super().__init__()
        self.mean_fn, self.var_fn = mean_fn, var_fn
        self.inp = nn.Identity()  # the discriminator's "features": x_t itself

    def forward(self, x_t, t):
        x_t = self.inp(x_t)
        t = t.reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        m, v = self.mean_fn(), self.var_fn()
        x0 = m + (1 - t) * v / ((1 - t) ** 2 * v + t ** 2) * (x_t - (1 - t) * m)
        return (x_t - x0) / t


def test_flow_adapter_of_gaussian_velocity_is_the_exact_denoiser():
    den = FlowMatchDenoiser(GaussVelocity(lambda: 0.3, lambda: 2.0), feature_modules=["inp"])
    x = torch.randn(64, 1, dtype=torch.float64)
    for sigma in (0.05, 0.5, 3.0, 40.0):
        exact = 0.3 + 2.0 / (2.0 + sigma ** 2) * (x - 0.3)  # the EDM-form denoiser of N(0.3, 2)
        torch.testing.assert_close(den(x, sigma).double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,mu,s", [("js", 0.5, 1.3), ("reverse_kl", 0.7, 0.8), ("forward_kl", 0.5, 1.3)])
def test_generator_gradient_matches_divergence_gradient_through_flow_adapter(name, mu, s):
    from test_objective_gradient import M_P, SIGMA, V_P, GaussGenerator, log_normal, reference_gradient

    from fdistill.divergences import get_divergence
    from fdistill.noise import NoiseSchedule
    from fdistill.objective import FDistill, ObjectiveConfig
    from fdistill.ratio import RatioConfig, RatioNormalizer

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref = reference_gradient(name, mu, s)
        ests = []
        for seed in range(4):
            gen = GaussGenerator(mu, s)
            teacher = FlowMatchDenoiser(GaussVelocity(lambda: torch.tensor(M_P), lambda: torch.tensor(V_P)), ["inp"])
            fake = FlowMatchDenoiser(GaussVelocity(lambda: gen.mu.detach(), lambda: gen.log_s.detach().exp() ** 2),
                                     ["inp"])

            class ExactRatio(nn.Module):
                def forward(self, feats):
                    x = feats[0].reshape(-1) * (1 + SIGMA)  # the features are x_t; x_EDM = x_t (1 + sigma)
                    vq = gen.log_s.detach().exp() ** 2 + SIGMA ** 2
                    return log_normal(x, torch.tensor(M_P), torch.tensor(V_P + SIGMA ** 2)) - \
                        log_normal(x, gen.mu.detach(), vq)

            off = RatioConfig(logit_clamp=1e4, r_min=0.0, r_max=float("inf"), normalize_ratio=False,
                              normalize_weight=False)
            obj = FDistill(gen, teacher, fake, ExactRatio(), get_divergence(name),
                           RatioNormalizer(off, (SIGMA, SIGMA)), NoiseSchedule.continuous(SIGMA, SIGMA),
                           ObjectiveConfig(gan_weight=0.0, dmd_normalize=False))
            rng = torch.Generator().manual_seed(seed)
            loss, _ = obj.generator_loss(torch.randn(100_000, 1, generator=rng), None, rng)
            ests.append(torch.stack(list(torch.autograd.grad(loss, [gen.mu, gen.log_s]))) / SIGMA ** 2)
        ests = torch.stack(ests).double()
        est, se = ests.mean(0), ests.std(0) / 2 + 1e-4
        assert ((est - ref).abs() <= 5 * se + 0.02 * ref.abs()).all(), (name, est, ref, se)
        assert (ref.abs() > 1e-3).all()
    finally:
        torch.set_default_dtype(old)
