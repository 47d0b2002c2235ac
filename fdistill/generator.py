"""The one-step generator: z -> x in a single network evaluation.

For image teachers the generator is a copy of the teacher denoiser evaluated once at the largest noise level
(EDM: G(z) = D(80 z, sigma=80); a VP teacher: the scaled input at its last timestep). For vector toys it can
be a plain MLP from a latent of any dimension.

An image generator can also be a k-step student (``fdistill.student``): ``set_stages`` gives it k noise levels,
after which ``G(z, c)`` samples in k evaluations and ``G(x_t, c, sigma=s)`` is the single evaluation at level s
that training by backward simulation calls.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .denoisers import Denoiser
from .student import sample as few_step_sample


class OneStepGenerator(nn.Module):
    """x = D(prior_scale(sigma_g) * z, sigma_g, cond) at the generator's noise level sigma_g (``generator_sigma``:
    the config's noise.generator_sigma, by default the grid's largest sigma), D initialised from the teacher; a
    k-step student after ``set_stages`` (module docstring)."""

    def __init__(self, denoiser: Denoiser, generator_sigma: float, latent_shape: Sequence[int]):
        super().__init__()
        self.denoiser = denoiser
        self.generator_sigma = float(generator_sigma)
        self.latent_shape = tuple(latent_shape)
        self.stage_sigmas: tuple[float, ...] = (self.generator_sigma,)

    @property
    def sigma(self) -> float:
        """Deprecated name of ``generator_sigma``."""
        return self.generator_sigma

    def set_stages(self, sigmas: Sequence[float]) -> None:
        """The k noise levels of a few-step student; sigmas[0] must be the generator's level."""
        sigmas = tuple(float(s) for s in sigmas)
        if not sigmas or sigmas[0] != self.generator_sigma:
            raise ValueError(f"the first stage level must be the generator's ({self.generator_sigma:g}), got {sigmas}")
        self.stage_sigmas = sigmas

    def forward(self, z: torch.Tensor, cond=None, sigma=None, noise=None) -> torch.Tensor:
        """G(z, cond): a sample from latents z (k evaluations for a k-step student; ``noise``: its re-noising
        noise, ``fdistill.student.sample``). With ``sigma`` (a float or one per sample): the one evaluation at
        that level, z being the EDM-form input x_t there."""
        if sigma is not None:
            return self.denoiser(z, sigma, cond)
        if len(self.stage_sigmas) == 1:
            return self.denoiser(z * self.denoiser.prior_scale(self.generator_sigma), self.generator_sigma, cond)
        return few_step_sample(lambda x_t, s: self.denoiser(x_t, s, cond),
                               z * self.denoiser.prior_scale(self.generator_sigma), self.stage_sigmas, noise)

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


def num_steps(module: nn.Module) -> int:
    """Network evaluations per sample of a generator (also wrapped): 1, or a few-step student's k."""
    return len(getattr(unwrap(module), "stage_sigmas", (None,)))


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / accelerate / torch.compile wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):  # torch.compile's OptimizedModule
            module = module._orig_mod
        elif hasattr(module, "module"):
            module = module.module
        else:
            return module
