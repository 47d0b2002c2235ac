"""Density ratio r = p/q from discriminator logits, and the paper's two-stage normalisation (f-distill,
arXiv 2502.15681, s.3).

Stage 1 (per noise level): r is divided by the mean r of its noise-level bin, so that the weights compare samples
at the same noise level only (the discriminator is better calibrated at some levels than others). Where the bins
sit is ``RatioConfig.bin_spacing``:

- ``log_sigma``: uniform in log sigma over the distribution-matching range; a bin's first visit takes the batch
  mean as it is, later visits blend with ``bin_ema``.
- ``linear``: the authors' code (NVlabs/FastGen, fastgen/methods/distribution_matching/f_distill.py,
  ``_get_f_div_weighting_h``): uniform in the scheduler's time t over its whole range (EDM: t = sigma in
  [0.002, 80], so every sigma < 8 shares bin 0; SD: t in [0, 0.999]); bins start at 1 and the EMA applies from
  the first visit; bin mean = sum / (count + 1e-6), r / (bin + 1e-6), h / (mean h + 1e-6).
Stage 2 (per batch): h = h_f(r) is divided by its batch mean, so mean h = 1 and the step size does not depend
on the divergence.

Both means are taken over every process's batch (all-reduce) so that N processes on N shards give the weights
one process would give on the concatenated batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .divergences import Divergence


@dataclass
class RatioConfig:
    logit_clamp: float = 10.0
    """Discriminator logits are clamped to [-logit_clamp, logit_clamp] before exp (f-distill paper, s.3)."""
    r_min: float = 0.1
    """r = exp(logit) is clamped to [r_min, r_max] (paper: [0.1, 20])."""
    r_max: float = 20.0
    num_bins: int = 10
    """Stage 1: the noise range is split into this many bins (paper: 10)."""
    bin_spacing: str = "log_sigma"
    """'log_sigma': bins uniform in log sigma over the distribution-matching range. 'linear': FastGen's, uniform
    in the scheduler's time t over its whole range, EMA from the first visit, eps 1e-6 (see the module doc)."""
    bin_ema: float = 0.0
    """EMA rate of the per-bin means across steps (paper: 0.5 on ImageNet-64, 0 elsewhere)."""
    normalize_ratio: bool = True
    """Stage 1 on/off."""
    normalize_weight: bool = True
    """Stage 2 on/off."""


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class RatioNormalizer(torch.nn.Module):
    """logits -> normalised weights h, with the per-bin means as (checkpointed) buffers."""

    def __init__(self, cfg: RatioConfig, sigma_range: tuple[float, float]):
        super().__init__()
        self.cfg = cfg
        if cfg.bin_spacing not in ("log_sigma", "linear"):
            raise ValueError(f"ratio_norm.bin_spacing must be 'log_sigma' or 'linear', got {cfg.bin_spacing!r}")
        lo, hi = sigma_range
        self.linear = cfg.bin_spacing == "linear"
        if self.linear:  # the range is the scheduler's time t (EDM: sigma; SD: [0, 0.999])
            if not lo < hi:
                raise ValueError(f"time range must be ordered, got {sigma_range}")
            self.t_lo, self.t_hi = float(lo), float(hi)
        else:
            if not (0 < lo <= hi):
                raise ValueError(f"sigma range must be positive and ordered, got {sigma_range}")
            self.log_sigma_lo, self.log_sigma_hi = math.log(lo), math.log(hi)
        self.register_buffer("bin_mean", torch.ones(cfg.num_bins))
        self.register_buffer("bin_seen", torch.zeros(cfg.num_bins, dtype=torch.bool))

    def bin_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """Bin of each noise level: ``sigma`` is the scheduler's time t when bin_spacing is 'linear'."""
        if self.linear:
            width = (self.t_hi - self.t_lo) / self.cfg.num_bins
            return ((sigma.double() - self.t_lo) / width).floor().long().clamp(0, self.cfg.num_bins - 1)
        span = max(self.log_sigma_hi - self.log_sigma_lo, 1e-12)
        pos = (torch.log(sigma.float()) - self.log_sigma_lo) / span
        return (pos * self.cfg.num_bins).floor().long().clamp(0, self.cfg.num_bins - 1)

    def ratio(self, logits: torch.Tensor) -> torch.Tensor:
        """Clamped r = exp(clamp(logit))."""
        c = self.cfg
        return torch.exp(logits.float().clamp(-c.logit_clamp, c.logit_clamp)).clamp(c.r_min, c.r_max)

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, sigma: torch.Tensor, divergence: Divergence,
                update: bool = True) -> tuple[torch.Tensor, dict]:
        """Returns (h, stats) for a batch of discriminator logits at noise levels sigma.

        ``update`` commits the batch's bin means to the state (EMA); it is False for evaluation.
        """
        c = self.cfg
        logits = logits.reshape(-1).float()
        r = self.ratio(logits)
        r_raw = r
        if c.normalize_ratio:
            idx = self.bin_index(sigma.reshape(-1))
            sums = torch.zeros(c.num_bins, device=r.device).index_add_(0, idx, r)
            counts = torch.zeros(c.num_bins, device=r.device).index_add_(0, idx, torch.ones_like(r))
            both = _all_reduce_sum(torch.stack([sums, counts]))
            sums, counts = both[0], both[1]
            present = counts > 0
            if self.linear:  # FastGen: the EMA from the initial 1 on, eps in both divisions
                batch_mean = sums / (counts + 1e-6)
                blend = torch.full_like(batch_mean, c.bin_ema)
                eps = 1e-6
            else:  # EMA only where the bin was seen before; a first visit takes the batch mean as it is
                batch_mean = torch.where(present, sums / counts.clamp(min=1), self.bin_mean)
                blend = torch.where(self.bin_seen, torch.full_like(batch_mean, c.bin_ema), torch.zeros_like(batch_mean))
                eps = 0.0
            new_mean = torch.where(present, blend * self.bin_mean + (1 - blend) * batch_mean, self.bin_mean)
            r = r / (new_mean[idx] + eps)
            if update:
                self.bin_mean.copy_(new_mean)
                self.bin_seen |= present
        h = divergence.weight(torch.log(r))
        if c.normalize_weight:
            tot = _all_reduce_sum(torch.stack([h.sum(), h.new_full((), float(h.numel()))]))
            mean_h = tot[0] / tot[1]
            h = h / (mean_h + 1e-6) if self.linear else h / mean_h.clamp(min=1e-12)
        stats = {
            "r_mean": r_raw.mean(), "r_min": r_raw.min(), "r_max": r_raw.max(),
            "h_mean": h.mean(), "h_min": h.min(), "h_max": h.max(),
            # effective sample size of the weights, as a fraction of the batch
            "h_ess": h.sum() ** 2 / (h.pow(2).sum() * h.numel()).clamp(min=1e-12),
        }
        return h, stats
