"""Flow-matching (rectified-flow) teachers behind the Denoiser contract: SD3 / SD3.5 and FLUX.1.

A rectified-flow model predicts the velocity v = eps - x0 of the straight path

    x_t = (1 - t) x0 + t eps,        t in [0, 1]

(Esser et al. 2024, "Scaling Rectified Flow Transformers", eq. 1-3; diffusers' ``FlowMatchEulerDiscreteScheduler``).
Dividing by (1 - t) gives EDM's variance-exploding form exactly (Karras et al. 2022, Table 1):

    x_EDM = x_t / (1 - t) = x0 + sigma eps,     sigma = t / (1 - t),     t = sigma / (1 + sigma)

so the adapter maps (x_EDM, sigma) -> (x_t = x_EDM / (1 + sigma), t), asks the network for v, and returns
x0 = x_t - t v. Any point of any flow-matching schedule is a point of this one: the scheduler's timestep *shift*
(``shift`` for SD3, resolution-dependent ``use_dynamic_shifting`` for FLUX.1) only changes *which* t are drawn, i.e.
the noise grid (``flow_grid``), never the adapter. t = 1 (sigma = inf, pure noise) has no finite EDM point; there
the input is the limit x_EDM / (1 + sigma) = x_t = eps itself (``prior_scale(inf) = 1``), so the one-step
generator ``OneStepGenerator(denoiser, generator_sigma=inf)`` evaluates the teacher's path at its top, z ~ N(0, I).

Models (detected from the backbone's class):
 - ``SD3Transformer2DModel`` (SD3, SD3.5): timestep input t * num_train_timesteps; cond
   ``{"encoder_hidden_states", "pooled_projections"}``; classifier-free guidance in x0 space by wrapping in
   ``CFGDenoiser`` (x0 is affine in v at fixed x_t, so this equals the pipeline's CFG on v).
 - ``FluxTransformer2DModel`` (FLUX.1-dev / schnell): latents [N, C, H, W] are packed into 2x2 patches
   ([N, H/2 * W/2, 4C]) with position ids (0, row, col) as ``FluxPipeline`` does; timestep input t; FLUX.1-dev is
   guidance-distilled: ``guidance`` feeds its guidance embedding (no CFG pass). cond
   ``{"encoder_hidden_states", "pooled_projections"}`` (txt_ids are zeros, as in the pipeline).
 - anything else: a velocity model called as ``backbone(x_t, t, **cond)`` (tests' analytic teachers).

Discriminator features: the image tokens of chosen transformer blocks (default the middle block of all blocks, in
execution order), reshaped to the token grid [N, D, h, w] so the convolutional head applies unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn

from .denoisers import Denoiser, as_sigma


# ------------------------------------------------------------------------------------------------------------
# time <-> EDM sigma, and the scheduler's grid


def sigma_from_t(t: torch.Tensor) -> torch.Tensor:
    """EDM sigma = t / (1 - t) of a rectified-flow time t in [0, 1)."""
    return t / (1 - t)


def t_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """Rectified-flow time t = sigma / (1 + sigma) of an EDM sigma (sigma = inf gives t = 1)."""
    return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """The dynamic shift mu of FLUX.1 (diffusers' ``calculate_shift``): linear in the packed sequence length."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def shift_t(t: torch.Tensor, config: dict, image_seq_len: int | None = None) -> torch.Tensor:
    """Apply a ``FlowMatchEulerDiscreteScheduler`` config's timestep shift to times t in (0, 1]:
    static ``shift``: s t / (1 + (s - 1) t); dynamic: exp(mu) / (exp(mu) + (1/t - 1)) (exponential type) or
    mu / (mu + (1/t - 1)) (linear type), mu from the image's packed sequence length."""
    t = t.double()
    if config.get("use_dynamic_shifting", False):
        if image_seq_len is None:
            raise ValueError("a dynamically shifted schedule (FLUX.1) needs the image's sequence length")
        mu = flux_mu(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                     config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        if config.get("time_shift_type", "exponential") == "linear":
            return mu / (mu + (1 / t - 1))
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    s = float(config.get("shift", 1.0))
    return s * t / (1 + (s - 1) * t)


def flow_grid(config: dict, image_seq_len: int | None = None) -> torch.Tensor:
    """The scheduler's training times t_i = shift(i / T), i = 1..T-1, as EDM sigmas, ascending (float32).

    i = T (t = 1, sigma = inf) is left out: it is the generator's input, not a level the losses can noise to.
    """
    T = int(config.get("num_train_timesteps", 1000))
    t = shift_t(torch.arange(1, T, dtype=torch.float64) / T, config, image_seq_len)
    return sigma_from_t(t).float()


def pipeline_times(num_steps: int, config: dict, image_seq_len: int | None = None) -> torch.Tensor:
    """The times of the diffusers SD3 / Flux pipelines' default sampling: linspace(1, 1/n, n) shifted, then 0."""
    t = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    t = shift_t(t, config, image_seq_len).float()
    return torch.cat([t, torch.zeros(1)])


# ------------------------------------------------------------------------------------------------------------
# Flux latent packing


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, H/2 * W/2, 4C]: 2x2 patches as ``FluxPipeline._pack_latents``."""
    n, c, h, w = x.shape
    x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of ``pack_latents`` for a latent grid of h x w."""
    n, _, d = x.shape
    x = x.view(n, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, d // 4, h, w)


def flux_image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Position ids (0, row, col) of the packed tokens of an h x w latent grid [h/2 * w/2, 3]."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------------------
# the adapter


def model_kind(backbone: nn.Module) -> str:
    name = type(backbone).__name__
    if name == "FluxTransformer2DModel":
        return "flux"
    if name == "SD3Transformer2DModel":
        return "sd3"
    return "velocity"


def transformer_blocks(backbone: nn.Module) -> list[str]:
    """Names of the transformer blocks in execution order (Flux: the double-stream blocks, then the single)."""
    names = []
    for attr in ("transformer_blocks", "single_transformer_blocks"):
        blocks = getattr(backbone, attr, None)
        if blocks is not None:
            names += [f"{attr}.{i}" for i in range(len(blocks))]
    return names


def default_feature_modules(backbone: nn.Module) -> list[str]:
    """The middle transformer block (of all blocks in execution order)."""
    names = transformer_blocks(backbone)
    return [names[len(names) // 2]] if names else []


class FlowMatchDenoiser(Denoiser):
    """A rectified-flow velocity model as an EDM-form denoiser (module docstring).

    ``feature_modules``: names of blocks whose image tokens feed the discriminator; None = the middle block.
    ``guidance``: FLUX.1-dev's distilled guidance scale (its guidance embedding); ignored by models without one.
    ``num_train_timesteps``: the scale of SD3's timestep input (t * 1000).
    The transformer may hold bf16 weights (a frozen teacher): inputs are cast to its dtype, x0 returned in float32.
    """

    def __init__(self, backbone: nn.Module, feature_modules: Sequence[str] | None = None, guidance: float = 3.5,
                 num_train_timesteps: int = 1000):
        self.kind = model_kind(backbone)
        if feature_modules is None:
            feature_modules = default_feature_modules(backbone)
        super().__init__(backbone, feature_modules)
        self.guidance = float(guidance)
        self.num_train_timesteps = int(num_train_timesteps)
        self._grid_hw: tuple[int, int] | None = None  # the latent grid of the current pass (to reshape tokens)

    @property
    def transformer(self):
        return self.backbone

    def prior_scale(self, sigma: float) -> float:
        # x_EDM = x_t (1 + sigma): pure noise x_t = eps has scale 1 + sigma; at sigma = inf the input is x_t itself
        return 1.0 if math.isinf(float(sigma)) else 1.0 + float(sigma)

    def _make_hook(self, i: int):
        inner = super()._make_hook(i)

        def hook(module, inp, out):
            if isinstance(out, (tuple, list)):  # SD3 / Flux blocks return (text tokens, image tokens)
                out = out[-1]
            if out.ndim == 3 and self._grid_hw is not None:  # image tokens [N, L, D] -> [N, D, h, w]
                h, w = self._grid_hw
                out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)
            return inner(module, inp, out)
        return hook

    def denoise(self, x_t, sigma, cond=None):
        s = as_sigma(sigma, x_t)
        x = x_t.float()
        # sigma = inf (t = 1): x_EDM is infinite, so the input there is its finite limit x_EDM / (1 + sigma) = x_t
        x_flow = torch.where(torch.isinf(s), x, x / (1 + s))
        return self.denoise_flow(x_flow, t_from_sigma(s), cond)

    def velocity(self, x_t: torch.Tensor, t, cond: Any = None) -> torch.Tensor:
        """The network's v = eps - x0 at flow point x_t, time t (float32)."""
        t = as_sigma(t, x_t).reshape(-1)
        cond = dict(cond) if isinstance(cond, dict) else ({} if cond is None else {"encoder_hidden_states": cond})
        if self.kind == "velocity":
            return self.backbone(x_t, t, **cond).float()
        p = next(self.backbone.parameters())
        cast = {k: (v.to(p.dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in cond.items()}
        n = x_t.shape[0]
        h, w = x_t.shape[-2:]
        if self.kind == "sd3":
            self._grid_hw = (h // self.backbone.config.patch_size, w // self.backbone.config.patch_size)
            v = self.backbone(x_t.to(p.dtype), timestep=(t * self.num_train_timesteps).to(p.dtype),
                              return_dict=False, **cast)[0]
            return v.float()
        # flux
        self._grid_hw = (h // 2, w // 2)
        ehs = cast["encoder_hidden_states"]
        kw = {"encoder_hidden_states": ehs, "pooled_projections": cast["pooled_projections"],
              "txt_ids": torch.zeros(ehs.shape[1], 3, device=x_t.device, dtype=p.dtype),
              "img_ids": flux_image_ids(h, w, x_t.device, p.dtype)}
        if getattr(self.backbone.config, "guidance_embeds", False):
            kw["guidance"] = torch.full((n,), self.guidance, device=x_t.device, dtype=torch.float32)
        v = self.backbone(pack_latents(x_t.to(p.dtype)), timestep=t.to(p.dtype), return_dict=False, **kw)[0]
        return unpack_latents(v.float(), h, w)

    def denoise_flow(self, x_t: torch.Tensor, t, cond: Any = None) -> torch.Tensor:
        """x0 = x_t - t v at flow point x_t and time t (t = 1 allowed: the generator's pure-noise input)."""
        tt = as_sigma(t, x_t)
        return x_t.float() - tt * self.velocity(x_t, tt, cond)


@torch.no_grad()
def euler_edm(denoiser: Denoiser, x: torch.Tensor, sigmas: Sequence[float], cond: Any = None) -> torch.Tensor:
    """A plain Euler sampler in EDM sigma space: x at sigmas[0] down to sigmas[-1] (usually 0).

    Each step moves along the denoiser's own estimate eps = (x - x0) / sigma: x_next = x0 + sigma_next eps. For a
    flow teacher this is, in flow coordinates, diffusers' Euler step x_t + (t_next - t) v; for a VP teacher it is
    ``EulerDiscreteScheduler``'s step. At sigma = inf (a flow teacher's t = 1) x is the pure noise itself and
    eps = x (``FlowMatchDenoiser``'s convention). ``denoiser`` may be a CFG wrapper."""
    x = x.float()
    sig = [float(s) for s in sigmas]
    for s, s_next in zip(sig[:-1], sig[1:]):
        x0 = denoiser(x, s, cond)
        eps = x if math.isinf(s) else (x - x0) / s
        x = x0 + s_next * eps
    return x


def euler_sample(denoiser: Denoiser, z: torch.Tensor, times: torch.Tensor, cond: Any = None) -> torch.Tensor:
    """``euler_edm`` from pure noise z at flow times ``times`` (descending, times[0] = 1 allowed, last 0)."""
    sig = sigma_from_t(torch.as_tensor(times).double().clamp(max=1.0))
    x = z if torch.isinf(sig[0]) else z * (1 + sig[0])
    return euler_edm(denoiser, x, sig.tolist(), cond)


__all__ = ["FlowMatchDenoiser", "euler_edm", "euler_sample", "flow_grid", "pipeline_times", "shift_t",
           "sigma_from_t", "t_from_sigma", "pack_latents", "unpack_latents", "flux_mu"]
