"""Variance-preserving (DDPM-family) teachers behind the Denoiser contract, and classifier-free guidance.

The package speaks EDM's variance-exploding form x_t = x0 + sigma * eps. A VP model such as Stable Diffusion's
``UNet2DConditionModel`` was trained on x_VP = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps at DDPM timesteps t. The two
are the same process up to a scale (docs/method.md, "Setting"):

    sigma_t = sqrt((1 - abar_t) / abar_t),    x_VP = x_t / sqrt(1 + sigma^2),    sqrt(abar_t) = 1 / sqrt(1 + sigma^2)

so the adapter scales the input, maps sigma to the model's timestep, and turns the prediction into x0:

    epsilon:     x0 = x_t - sigma * eps_hat
    v:           x0 = x_VP / sqrt(1 + sigma^2) - sigma / sqrt(1 + sigma^2) * v_hat
    sample:      x0 = model output

sigma -> timestep: a sigma on the teacher's grid (what ``NoiseSchedule`` samples) maps to its exact integer
timestep; a sigma between two grid values maps to a fractional timestep, linear in log(sigma) between its
neighbours (the UNet's sinusoidal time embedding takes real-valued timesteps); outside the grid it is clamped to
[0, T-1]. The input scale and the x0 conversion use sigma itself, so off the grid they stay exact for the VP
process at that sigma, only the timestep the network is told is interpolated.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
import torch.nn as nn

from .denoisers import Denoiser, as_sigma
from .noise import vp_sigmas

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
ADDED_COND_KEYS = ("text_embeds", "time_ids")  # SDXL's UNet added conditions (pooled text, size/crop ids)


class VPUNetDenoiser(Denoiser):
    """A DDPM-parameterised UNet (epsilon, v or x0 prediction) as an EDM-form denoiser.

    ``cond``: a dict of keyword arguments for the UNet, at least ``{"encoder_hidden_states": [N, L, D]}``, or that
    tensor alone; SDXL's ``text_embeds`` / ``time_ids`` are passed as ``added_cond_kwargs``. The UNet may hold bf16 weights (frozen teacher): inputs are cast to its dtype, x0 returned in
    float32. ``alphas_cumprod``: the teacher scheduler's [T] cumulative alphas (the grid of timesteps).
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 feature_modules: Sequence[str] = ("mid_block",)):
        super().__init__(unet, feature_modules)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.prediction_type = prediction_type
        # The grid is kept out of the module's buffers on purpose: `.to(bfloat16)` / `.float()` on the denoiser
        # must never round it (sigmas would stop matching the schedule's grid exactly), and checkpoints should
        # hold network weights only. Copies per device are cached lazily.
        self._log_sigmas = vp_sigmas(torch.as_tensor(alphas_cumprod)).double().log().float()
        self._grid_cache: dict = {}

    @property
    def unet(self):
        return self.backbone

    @property
    def num_timesteps(self) -> int:
        return len(self._log_sigmas)

    @property
    def sigmas(self) -> torch.Tensor:
        """The teacher's grid as VE sigmas, ascending; index = DDPM timestep."""
        return self._log_sigmas.exp()

    def prior_scale(self, sigma: float) -> float:
        # x_t = sqrt(1 + sigma^2) * z  <=>  x_VP = z ~ N(0, I): the pure-noise input of the VP model.
        return float((1.0 + float(sigma) ** 2) ** 0.5)

    def _log_grid(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._grid_cache:
            self._grid_cache[key] = self._log_sigmas.to(device)
        return self._grid_cache[key]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """Real-valued DDPM timestep [N] of VE sigmas [N]: exact integers on the grid, log-sigma interpolation
        between grid values, clamped to [0, T-1] outside."""
        s = sigma.reshape(-1).float()
        log_grid = self._log_grid(s.device)
        log_s = s.log()
        lo = (torch.searchsorted(log_grid, log_s, right=True) - 1).clamp(0, len(log_grid) - 2)
        a, b = log_grid[lo], log_grid[lo + 1]
        frac = ((log_s - a) / (b - a)).clamp(0.0, 1.0)
        # a grid value gives frac exactly 0 (or 1 at the top): an integral timestep, as the scheduler's
        return lo.float() + frac

    def denoise(self, x_t, sigma, cond=None):
        s = as_sigma(sigma, x_t)
        scale = (1 + s ** 2).rsqrt()  # sqrt(abar_t)
        t = self.timestep(s.reshape(-1))
        kwargs = dict(cond) if isinstance(cond, dict) else {"encoder_hidden_states": cond}
        dtype = next(self.unet.parameters()).dtype
        kwargs = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}
        # SDXL's added conditions travel as flat cond keys (batched and concatenated like any other) and reach
        # the UNet as its added_cond_kwargs
        added = {k: kwargs.pop(k) for k in ADDED_COND_KEYS if k in kwargs}
        if added:
            kwargs["added_cond_kwargs"] = added
        out = self.unet((scale * x_t.float()).to(dtype), t, return_dict=False, **kwargs)[0].float()
        if self.prediction_type == "epsilon":
            return x_t.float() - s * out
        if self.prediction_type == "v_prediction":
            return scale ** 2 * x_t.float() - s * scale * out
        return out

    def forward(self, x_t, sigma, cond=None, mode: str = "x0", x0_grad: bool = True):
        # R1 differentiates the discriminator's features twice w.r.t. the real input; the fused SDPA kernels
        # (flash / memory-efficient) have no double backward, so that pass uses the math kernel. Only a features
        # pass of a frozen net whose input requires grad is such a pass (the generator's pass is mode='both').
        if mode == "features" and torch.is_grad_enabled() and x_t.requires_grad:
            ctx = _math_sdpa()
        else:
            ctx = contextlib.nullcontext()
        with ctx:
            return super().forward(x_t, sigma, cond, mode, x0_grad)


def _math_sdpa():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.MATH])
    except ImportError:  # pragma: no cover - old torch
        return contextlib.nullcontext()


def _expand_cond(c: Any, n: int) -> Any:
    if isinstance(c, dict):
        return {k: _expand_cond(v, n) for k, v in c.items()}
    if torch.is_tensor(c) and c.shape[0] == 1 and n != 1:
        return c.expand(n, *c.shape[1:])
    return c


def _cat(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in a}
    if torch.is_tensor(a):
        return torch.cat([a, b.to(a.dtype)])
    return a


class CFGDenoiser(Denoiser):
    """Classifier-free guidance in x0 space around a conditional denoiser (the guided teacher of DMD2 and f-distill);
    x0 is affine in the predicted noise at fixed x_t, so this equals guidance on eps (or v):

        x0 = x0_c + (w - 1) (x0_c - x0_u)

    The conditional and unconditional passes run as one batched forward of the inner denoiser. ``uncond`` is the
    empty-prompt conditioning for one sample (a dict like ``cond`` with batch 1, or its encoder_hidden_states
    tensor). Features (mode 'features' / 'both') are the conditional half's: the discriminator judges the
    conditional model. A features-only pass runs the conditional half alone. At w = 1 no unconditional pass runs.
    """

    def __init__(self, denoiser: Denoiser, guidance_scale: float, uncond: Any):
        super().__init__(None, ())
        self.inner = denoiser
        self.guidance_scale = float(guidance_scale)
        if torch.is_tensor(uncond):
            uncond = {"encoder_hidden_states": uncond}
        # buffers so that .to(device) moves them; not persistent (not training state)
        self._uncond_keys = list(uncond)
        for k, v in uncond.items():
            self.register_buffer(f"uncond_{k}", v.detach().clone(), persistent=False)

    def uncond(self, n: int) -> dict:
        return {k: _expand_cond(getattr(self, f"uncond_{k}"), n) for k in self._uncond_keys}

    def prior_scale(self, sigma: float) -> float:
        return self.inner.prior_scale(sigma)

    def denoise(self, x_t, sigma, cond=None):
        return self.forward(x_t, sigma, cond, "x0")

    def forward(self, x_t, sigma, cond=None, mode: str = "x0", x0_grad: bool = True):
        if mode not in self.calls:
            raise ValueError(f"mode must be one of {list(self.calls)}, got {mode!r}")
        self.calls[mode] += 1
        w = self.guidance_scale
        if mode == "features" or w == 1.0:
            return self.inner(x_t, sigma, cond, mode=mode, x0_grad=x0_grad)
        n = x_t.shape[0]
        s = as_sigma(sigma, x_t).reshape(-1)
        c = cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}
        both = _cat(c, self.uncond(n))
        out = self.inner(torch.cat([x_t, x_t]), torch.cat([s, s]), both, mode=mode, x0_grad=x0_grad)
        x0, feats = (out, None) if mode == "x0" else out
        x0_c, x0_u = x0[:n], x0[n:]
        guided = x0_c + (w - 1.0) * (x0_c - x0_u)
        if mode == "x0":
            return guided
        return guided, [f[:n] for f in feats]


__all__ = ["VPUNetDenoiser", "CFGDenoiser", "PREDICTION_TYPES"]
