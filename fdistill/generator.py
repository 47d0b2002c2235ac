"""The one-step generator: z -> x in a single network evaluation.

For image teachers the generator is a copy of the teacher denoiser evaluated once at the largest noise level
(EDM: G(z) = D(80 z, sigma=80); a VP teacher: the scaled input at its last timestep). For vector toys it can
be a plain MLP from a latent of any dimension.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .denoisers import Denoiser


class OneStepGenerator(nn.Module):
    """x = D(prior_scale(sigma_max) * z, sigma_max, cond), D initialised from the teacher."""

    def __init__(self, denoiser: Denoiser, sigma: float, latent_shape: Sequence[int]):
        super().__init__()
        self.denoiser = denoiser
        self.sigma = float(sigma)
        self.latent_shape = tuple(latent_shape)

    def forward(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        return self.denoiser(z * self.denoiser.prior_scale(self.sigma), self.sigma, cond)

    def sample_latents(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        return torch.randn((n, *self.latent_shape), generator=generator, device=device)


class MLPGenerator(nn.Module):
    """z (latent_dim) -> x (out_dim). A latent wider than the data lets a continuous map tear less between modes."""

    def __init__(self, latent_dim: int = 8, out_dim: int = 2, hidden: int = 256, depth: int = 4):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(latent_dim, hidden), nn.SiLU()]
        for _ in range(depth - 2):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, out_dim))
        self.net = nn.Sequential(*layers)
        self.latent_shape = (latent_dim,)

    def forward(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        return self.net(z)

    def sample_latents(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        return torch.randn((n, *self.latent_shape), generator=generator, device=device)


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / accelerate / torch.compile wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):  # torch.compile's OptimizedModule
            module = module._orig_mod
        elif hasattr(module, "module"):
            module = module.module
        else:
            return module
