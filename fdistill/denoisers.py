"""The Denoiser contract and its adapters. Only this layer knows model families.

Every network the algorithm touches is a denoiser in EDM's variance-exploding form:

    x0_hat          = denoiser(x_t, sigma, cond)
    feats           = denoiser(x_t, sigma, cond, mode="features")   # encoder bottleneck; stops there
    x0_hat, feats   = denoiser(x_t, sigma, cond, mode="both")       # one pass gives both
    x0_hat, feats   = denoiser(..., mode="both", x0_grad=False)      # gradients only through feats

``mode`` goes through ``forward`` so that a DistributedDataParallel wrapper sees every call.
Features are read with forward hooks on named submodules (``feature_modules``, default the UNet's mid block);
with ``mode="features"`` the pass is cut short right after the last of them, so the decoder never runs. With
``x0_grad=False`` the decoder runs without recording a graph: the generator iteration needs x0 only as a
constant, and the decoder's saved activations are then never kept (memory, not compute).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn


class _StopForward(Exception):
    """Raised by a feature hook to cut a features-only pass short after the bottleneck."""


def as_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma as a float32 tensor broadcastable against x (shape [N, 1, 1, ...])."""
    if isinstance(sigma, (int, float)):  # a Python number: fill on the device, no host-to-device copy
        return torch.full((x.shape[0],) + (1,) * (x.ndim - 1), float(sigma), dtype=torch.float32, device=x.device)
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if s.ndim == 0:
        s = s.expand(x.shape[0])
    return s.reshape(-1, *([1] * (x.ndim - 1)))


def resolve_module_name(root: nn.Module, name: str) -> str:
    """The ``named_modules`` name of submodule ``name`` of ``root``. Parts that are integers index a module list and
    may be negative (``up_blocks.-1``: the decoder's last block, whatever the UNet's depth), so that one config
    fits teachers of different depths."""
    m, parts = root, []
    for part in name.split("."):
        children = dict(m.named_children())
        if part not in children and part.lstrip("-").isdigit() and -len(children) <= int(part) < len(children):
            part = list(children)[int(part)]
        if part not in children:
            raise ValueError(f"feature module {name!r} not found in {type(root).__name__}; "
                             f"top-level modules: {[n for n, _ in root.named_children()]}")
        m = children[part]
        parts.append(part)
    return ".".join(parts)


class Denoiser(nn.Module):
    """Base class: subclasses implement ``denoise(x_t, sigma, cond)`` and name their feature modules.

    ``calls`` counts passes by mode; tests and benchmarks read it to check that nothing runs twice.
    """

    def __init__(self, backbone: nn.Module | None = None, feature_modules: Sequence[str] = ()):
        super().__init__()
        self.backbone = backbone
        self.feature_modules = list(feature_modules)
        self._capture: list | None = None
        self._stop_after_features = False
        self._nograd_after_features = False
        self.calls = {"x0": 0, "features": 0, "both": 0}
        if backbone is not None:  # names as given, or with negative indices counted from the end
            self.feature_modules = [resolve_module_name(backbone, name) for name in self.feature_modules]

    def _make_hook(self, i: int):
        def hook(_module, _inp, out):
            if self._capture is None:
                return
            if isinstance(out, (tuple, list)):  # down blocks return (hidden, residuals)
                out = out[0]
            self._capture[i] = out
            if all(c is not None for c in self._capture):
                if self._stop_after_features:
                    raise _StopForward
                if self._nograd_after_features:
                    torch.set_grad_enabled(False)  # the rest of the pass (decoder) records no graph
        return hook

    # --- to implement -------------------------------------------------------------------------------------
    def denoise(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        raise NotImplementedError

    def prior_scale(self, sigma: float) -> float:
        """Std of x_t at the largest sigma when x0 has unit-ish scale: sigma (VE); VP adapters override."""
        return sigma

    # --- the contract ---------------------------------------------------------------------------------------
    def forward(self, x_t, sigma, cond=None, mode: str = "x0", x0_grad: bool = True):
        if mode not in self.calls:
            raise ValueError(f"mode must be one of {list(self.calls)}, got {mode!r}")
        self.calls[mode] += 1
        if mode == "x0":
            return self.denoise(x_t, sigma, cond)
        if not self.feature_modules:
            raise RuntimeError(f"{type(self).__name__} has no feature modules configured")
        self._capture = [None] * len(self.feature_modules)
        self._stop_after_features = mode == "features"
        self._nograd_after_features = mode == "both" and not x0_grad
        grad_was = torch.is_grad_enabled()
        # Hooks live only for this call: a deep copy of this denoiser (generator and fake score start as
        # copies of the teacher) must not inherit hooks that write into the original.
        mods = dict(self.backbone.named_modules())
        handles = [mods[name].register_forward_hook(self._make_hook(i)) for i, name in enumerate(self.feature_modules)]
        try:
            try:
                x0 = self.denoise(x_t, sigma, cond)
            except _StopForward:
                x0 = None
            feats = list(self._capture)
        finally:
            torch.set_grad_enabled(grad_was)
            for h in handles:
                h.remove()
            self._capture = None
            self._stop_after_features = self._nograd_after_features = False
        if any(f is None for f in feats):
            raise RuntimeError("a feature module did not run during the forward pass")
        feats = [f.float() for f in feats]
        return feats if mode == "features" else (x0, feats)

    def reset_calls(self):
        for k in self.calls:
            self.calls[k] = 0


def edm_precond(sigma: torch.Tensor, sigma_data: float):
    """EDM's preconditioning (Karras et al. 2022, Table 1): c_skip, c_out, c_in, c_noise for sigma [N, 1, ...]."""
    sd = sigma_data
    c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
    c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sd ** 2).sqrt()
    c_noise = (sigma.log() / 4).reshape(-1)
    return c_skip, c_out, c_in, c_noise


class EDMPrecondUNet(Denoiser):
    """EDM preconditioning around a diffusers ``UNet2DModel`` (Karras et al. 2022, Table 1):

        D(x, sigma, y) = c_skip x + c_out F(c_in x, c_noise, y)
        c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2),
        c_noise = log(sigma) / 4.

    ``cond``: integer class labels [N], or label vectors [N, C] as EDM takes them (one-hot, or any vector: the
    class embedding is linear, so a vector embeds as ``vector @ W``: a one-hot gives its class's row, a zero vector
    the label-free embedding), or None for an unconditional net. The UNet may hold bf16 weights (a frozen
    teacher); inputs are cast to its dtype and x0 returned in float32.
    """

    def __init__(self, unet: nn.Module, sigma_data: float = 0.5, feature_modules: Sequence[str] = ("mid_block",)):
        super().__init__(unet, feature_modules)
        self.sigma_data = float(sigma_data)

    @property
    def unet(self):
        return self.backbone

    def denoise(self, x_t, sigma, cond=None):
        c_skip, c_out, c_in, c_noise = edm_precond(as_sigma(sigma, x_t), self.sigma_data)
        x32 = x_t.float()
        dtype = next(self.unet.parameters()).dtype
        labels, hook = cond, None
        embedding = getattr(self.unet, "class_embedding", None)
        if cond is not None and embedding is not None:
            if cond.dtype.is_floating_point:  # label vectors: the embedding's linear map applied to them
                vec = cond.reshape(x_t.shape[0], -1)
                labels = torch.zeros(x_t.shape[0], dtype=torch.long, device=x_t.device)
                hook = embedding.register_forward_hook(lambda mod, inp, out: vec.to(mod.weight.dtype) @ mod.weight)
            elif cond.ndim == 2:  # integer one-hot rows
                labels = cond.argmax(dim=1)
        try:
            F_x = self.unet((c_in * x32).to(dtype), c_noise.to(dtype), class_labels=labels, return_dict=False)[0]
        finally:
            if hook is not None:
                hook.remove()
        return c_skip * x32 + c_out * F_x.float()


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
        a = t.float()[:, None] * freqs[None]
        return torch.cat([a.cos(), a.sin()], dim=1)


class MLPBackbone(nn.Module):
    """F(c_in x, c_noise) for vector data: the small network of the 2-D toy."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, emb_dim: int = 32):
        super().__init__()
        self.emb = SinusoidalEmbedding(emb_dim)
        self.inp = nn.Linear(dim + emb_dim, hidden)
        self.blocks = nn.ModuleList([nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth - 1)])
        self.mid = nn.Identity()  # the "bottleneck" features for a discriminator
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, c_noise):
        h = self.inp(torch.cat([x, self.emb(c_noise)], dim=1))
        for b in self.blocks:
            h = h + b(h)
        return self.out(self.mid(h))


class EDMPrecondMLP(Denoiser):
    """EDM preconditioning around an MLP (vector data); features = the last hidden layer."""

    def __init__(self, backbone: MLPBackbone, sigma_data: float = 1.0, feature_modules: Sequence[str] = ("mid",)):
        super().__init__(backbone, feature_modules)
        self.sigma_data = float(sigma_data)

    def denoise(self, x_t, sigma, cond=None):
        c_skip, c_out, c_in, c_noise = edm_precond(as_sigma(sigma, x_t), self.sigma_data)
        return c_skip * x_t + c_out * self.backbone(c_in * x_t, c_noise)


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


def score_from_x0(x_t: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    """grad_x log p_sigma(x_t) = (D(x_t, sigma) - x_t) / sigma^2 (Tweedie)."""
    s = as_sigma(sigma, x_t)
    return (x0 - x_t) / s ** 2


__all__ = ["Denoiser", "EDMPrecondUNet", "EDMPrecondMLP", "MLPBackbone", "freeze", "score_from_x0", "as_sigma"]
