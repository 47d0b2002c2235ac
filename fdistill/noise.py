"""Noise levels: grids, samplers and loss weightings (f-distill, arXiv 2502.15681, s.4 and App. C).

Everything in the package speaks EDM's variance-exploding form, x_t = x0 + sigma * eps. A schedule knows
 - the sigmas of the distribution-matching term (``sample_dm``): an index range of a discrete grid
   (EDM Karras grid, or a DDPM/VP grid mapped to sigma) or a continuous log-uniform range,
 - the sigmas of the fake-score denoising loss (``sample_denoise``): the whole grid,
 - sigma_max, where the one-step generator starts,
 - the scheduler's time t of a sigma and its whole range (``time_of``, ``t_range``): what FastGen's ratio bins
   are linear in (EDM: t = sigma; a DDPM/VP grid: t = timestep / T in [0, (T-1)/T]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def karras_sigmas(n: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's grid (Karras et al. 2022, eq. 5), returned ascending: sigmas[0] = sigma_min, sigmas[-1] = sigma_max."""
    i = torch.arange(n, dtype=torch.float64) / (n - 1)
    inv = sigma_max ** (1 / rho) + i * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return (inv ** rho).flip(0).float()


def vp_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """A DDPM/VP grid as VE sigmas: sigma_t = sqrt((1 - abar_t) / abar_t); index t = DDPM timestep."""
    a = alphas_cumprod.double()
    return ((1 - a) / a).sqrt().float()


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float = 0.5) -> torch.Tensor:
    """EDM's lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 = 1/sigma^2 + 1/sigma_data^2."""
    return 1.0 / sigma ** 2 + 1.0 / sigma_data ** 2


@dataclass
class NoiseSchedule:
    """A grid of sigmas (ascending) with the index ranges the two losses draw from.

    If ``sigmas`` is None the schedule is continuous: log-uniform in [sigma_min, sigma_max] for both losses
    (used by the 2-D toy, whose analytic teacher has no grid).
    """

    sigmas: torch.Tensor | None = None
    dm_index_range: tuple[int, int] = (20, 980)  # DMD2: index uniform in [20, 980]; FastGen [2, 998]
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    # Where the generator starts; defaults to the largest sigma of the grid.
    generator_sigma: float | None = None
    # The scheduler's time t: 'sigma' (EDM, t = sigma) or 'index' (DDPM/VP grid, t = index / len(grid)).
    time: str = "sigma"
    # Upper index of the discriminator's levels (real and generated) and of the generator's GAN term, inside the
    # DM range; None = the DM range itself (the paper). See ``sample_disc``.
    disc_index_max: int | None = None
    # How the discriminator's levels are spread over its range: 'dm' as the DM term's (uniform in grid index),
    # 'log_sigma' uniform in log sigma (snapped to the grid). See ``sample_disc``.
    disc_levels: str = "dm"

    def __post_init__(self):
        if self.sigmas is not None:
            self.sigmas = torch.as_tensor(self.sigmas, dtype=torch.float32)
            lo, hi = self.dm_index_range
            n = len(self.sigmas)
            if not (0 <= lo <= hi < n):
                raise ValueError(f"dm_index_range {self.dm_index_range} must lie in [0, {n - 1}] for a grid of {n}")
            self.sigma_min = float(self.sigmas[0])
            self.sigma_max = float(self.sigmas[-1])
            if self.disc_index_max is not None and not (lo <= self.disc_index_max <= hi):
                raise ValueError(f"disc_index_max {self.disc_index_max} must lie in the DM range [{lo}, {hi}]")
        elif self.disc_index_max is not None:
            raise ValueError("disc_index_max needs a grid of noise levels (noise.grid edm, vp or flow)")
        if self.disc_levels not in ("dm", "log_sigma"):
            raise ValueError(f"disc_levels must be 'dm' or 'log_sigma', got {self.disc_levels!r}")
        if self.time not in ("sigma", "index") or (self.time == "index" and self.sigmas is None):
            raise ValueError(f"time must be 'sigma', or 'index' for a grid, got {self.time!r}")
        if self.generator_sigma is None:
            self.generator_sigma = self.sigma_max
        self._grid_on: dict = {}  # the grid per device: copied once, not on every draw (a host-device copy)

    def _grid(self, device) -> torch.Tensor:
        key = str(device)
        if key not in self._grid_on:
            self._grid_on[key] = self.sigmas.to(device)
        return self._grid_on[key]

    @classmethod
    def edm(cls, n=1000, sigma_min=0.002, sigma_max=80.0, rho=7.0, dm_index_range=(20, 980), disc_index_max=None,
            disc_levels="dm"):
        return cls(karras_sigmas(n, sigma_min, sigma_max, rho), dm_index_range, disc_index_max=disc_index_max,
                   disc_levels=disc_levels)

    @classmethod
    def continuous(cls, sigma_min: float, sigma_max: float, generator_sigma: float | None = None):
        return cls(None, (0, 0), sigma_min, sigma_max, generator_sigma)

    @property
    def dm_sigma_range(self) -> tuple[float, float]:
        """The sigma range of the distribution-matching term (bins of the ratio normaliser live here)."""
        if self.sigmas is None:
            return self.sigma_min, self.sigma_max
        lo, hi = self.dm_index_range
        return float(self.sigmas[lo]), float(self.sigmas[hi])

    @property
    def t_range(self) -> tuple[float, float]:
        """The scheduler's whole time range: EDM [sigma_min, sigma_max]; a VP grid of T levels [0, (T-1)/T]."""
        if self.time == "index":
            n = len(self.sigmas)
            return 0.0, (n - 1) / n
        return self.sigma_min, self.sigma_max

    def ratio_bin_range(self, bin_spacing: str) -> tuple[float, float]:
        """Where the ratio normaliser's bins live: FastGen's 'linear' bins span the scheduler's whole time range,
        the 'log_sigma' bins the distribution-matching sigma range."""
        return self.t_range if bin_spacing == "linear" else self.dm_sigma_range

    def time_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """The scheduler's time t of each sigma: sigma itself, or the nearest grid index / T on a VP grid."""
        if self.time == "sigma":
            return sigma
        grid = self._grid(sigma.device).log()
        idx = (grid[None, :] - sigma.float().log().reshape(-1, 1)).abs().argmin(dim=1)
        return idx.double() / len(self.sigmas)

    def _loguniform(self, n, lo, hi, generator, device):
        u = torch.rand(n, generator=generator, device=device)
        return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))

    def sample_dm(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        """Sigmas for the distribution-matching term and the discriminator."""
        if self.sigmas is None:
            return self._loguniform(n, self.sigma_min, self.sigma_max, generator, device)
        lo, hi = self.dm_index_range
        idx = torch.randint(lo, hi + 1, (n,), generator=generator, device=device)
        return self._grid(device)[idx]

    @property
    def own_disc_range(self) -> bool:
        """Whether the discriminator draws from a narrower range than the DM term."""
        return self.disc_index_max is not None and self.disc_index_max < self.dm_index_range[1]

    @property
    def own_disc_levels(self) -> bool:
        """Whether the discriminator's levels are drawn otherwise than the DM term's (range or spread)."""
        return self.own_disc_range or (self.disc_levels != "dm" and self.sigmas is not None)

    @property
    def disc_sigma_max(self) -> float:
        """The largest sigma the discriminator is trained at."""
        if not self.own_disc_range:
            return self.dm_sigma_range[1]
        return float(self.sigmas[self.disc_index_max])

    def sample_disc(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        """Sigmas for the discriminator's real and generated samples, in the DM range or its low end
        [dm_index_min, disc_index_max]: uniform in grid index like the DM term ('dm'), or uniform in log sigma
        ('log_sigma').

        Small images are near pure noise at the DM range's top (16x16 digits above sigma ~2), where real and
        generated samples cannot be told apart. Capping the range leaves the head untrained there; spreading the
        draws evenly in log sigma keeps every level but moves draws to the low levels, which EDM's grid (rho = 7)
        samples sparsely. Real and generated samples share the spread, so the optimal logit at each level is still
        log p_t / q_t: the spread decides where the head's capacity goes, not what it estimates."""
        if not self.own_disc_levels:
            return self.sample_dm(n, generator, device)
        lo = self.dm_index_range[0]
        hi = self.disc_index_max if self.own_disc_range else self.dm_index_range[1]
        grid = self._grid(device)
        if self.disc_levels == "dm" or hi == lo:
            idx = torch.randint(lo, hi + 1, (n,), generator=generator, device=device)
            return grid[idx]
        # log-uniform over [sigma_lo, sigma_hi], each draw snapped to the nearest grid level in log sigma
        log_grid = grid[lo:hi + 1].log()
        u = torch.rand(n, generator=generator, device=device)
        target = log_grid[0] + u * (log_grid[-1] - log_grid[0])
        j = torch.searchsorted(log_grid, target).clamp(1, len(log_grid) - 1)
        j = torch.where(target - log_grid[j - 1] <= log_grid[j] - target, j - 1, j)
        return grid[lo + j]

    def sample_denoise(self, n: int, generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
        """Sigmas for the fake score's denoising loss: the whole grid."""
        if self.sigmas is None:
            return self._loguniform(n, self.sigma_min, self.sigma_max, generator, device)
        idx = torch.randint(0, len(self.sigmas), (n,), generator=generator, device=device)
        return self._grid(device)[idx]


def edm_sampler_sigmas(num_steps: int = 18, sigma_min: float = 0.002, sigma_max: float = 80.0,
                       rho: float = 7.0) -> torch.Tensor:
    """The EDM sampler's descending sigma steps followed by 0 (Karras et al. 2022, eq. 5)."""
    s = karras_sigmas(num_steps, sigma_min, sigma_max, rho).flip(0)
    return torch.cat([s, torch.zeros(1)])
