"""Few-step students: a generator evaluated at k noise levels, trained by backward simulation.

A one-step student maps pure noise to a sample in one network evaluation, x = G(sigma_0 z, sigma_0). A k-step
student evaluates the same network at k decreasing noise levels sigma_0 > sigma_1 > ... > sigma_{k-1}: each
evaluation's output x^(j) is re-noised to the next level with fresh noise and denoised again,

    x_t^(0) = prior_scale(sigma_0) z,     x^(j) = G(x_t^(j), sigma_j),     x_t^(j+1) = x^(j) + sigma_{j+1} eps_j,

and the sample is x^(k-1). Everything is in the package's EDM form x_t = x + sigma eps, which each teacher
family's denoiser maps to its own input: a VP model (SD1.5, SDXL) sees sqrt(abar) x_t = sqrt(abar) x +
sqrt(1 - abar) eps, its DDPM forward process at the grid level of sigma; a flow model (SD3, FLUX.1) sees
x_t / (1 + sigma) = (1 - t) x + t eps, its interpolation path at t = sigma / (1 + sigma).

Training by backward simulation (DMD2, Yin et al. 2024, arXiv 2405.14867, its multi-step generator; public code
tianweiy/DMD2, main/sd_unified_model.py, ``sample_backward``): the input the generator gets at an intermediate
level is its own earlier output, re-noised, not a noised data sample. Per sample a stage
s in {0..k-1} is drawn; the generator runs without gradient through stages 0..s-1 (the simulation), then the
graded evaluation at stage s gives x, on which the distribution-matching and GAN terms act exactly as for a
one-step student; the critic learns from the same mixture of stage outputs. Stages are drawn stratified: every
batch of n >= k samples holds each stage floor(n/k) or ceil(n/k) times, in random order, so every process
runs the same k - 1 simulation passes (a sharded generator's passes are collective). DMD2 instead draws one stage
per batch, shared by every process; NVlabs/FastGen's multi-step students (``student_sample_steps``) feed the
generator noised real data at its intermediate levels, no simulation.

With k = 1 nothing of this runs: the objective calls ``G(z, c)`` as before, with the same random draws.

The stage levels (``student.sigmas`` or, on a grid, ``student.timesteps``) default to DMD2's rule on the
teacher's grid: indices T-1, T-1-T/k, ..., e.g. the DDPM timesteps 999, 749, 499, 249 on SD's grid and, on EDM's
1000-level Karras grid, sigma 80, 17.5, 2.5, 0.17 for four steps. Stage 0 is always the generator's own level.

Sampling (``fdistill sample``, the exported pipelines) draws the re-noising noise of image i from its own
stream, ``torch.Generator().manual_seed(seed_i + 2**32)`` (stage 1 first), apart from its latent's stream: the
same seed gives the same image whatever the batch, as for one step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .noise import NoiseSchedule, karras_sigmas

RENOISE_SEED_OFFSET = 2 ** 32
"""Image i's re-noising stream is seeded seed_i + 2**32: apart from its latent's stream (seed_i)."""


@dataclass
class StudentConfig:
    steps: int = 1
    """Network evaluations per sample (1: the one-step generator of f-distill, arXiv 2502.15681; 2 or 4:
    few-step students trained by backward simulation as DMD2's multi-step generator)."""
    sigmas: list | None = None
    """The k noise levels (EDM-form sigma, descending; the first is the generator's level, ``.inf`` for a flow
    teacher). None: ``timesteps`` if given, else DMD2's rule on the teacher's grid (module docstring)."""
    timesteps: list | None = None
    """The k levels as indices of the teacher's noise grid, descending (SD / SDXL: DDPM timesteps, DMD2's
    [999, 749, 499, 249] for four steps); the grid's top index stands for the generator's level. Only one of
    ``sigmas`` and ``timesteps``."""


def default_timesteps(num_levels: int, steps: int) -> list[int]:
    """DMD2's stage indices on a grid of ``num_levels``: T-1, T-1-T//k, ... (SD, k=4: 999, 749, 499, 249)."""
    stride = num_levels // steps
    return [num_levels - 1 - j * stride for j in range(steps)]


def stage_sigmas(cfg: StudentConfig, schedule: NoiseSchedule, generator_sigma: float) -> list[float]:
    """The k stage levels of ``cfg`` on ``schedule`` (stage 0 = ``generator_sigma``); a bad setting is a
    ValueError naming the key."""
    k = int(cfg.steps)
    if k < 1:
        raise ValueError(f"config key student.steps must be >= 1, got {cfg.steps!r}")
    if cfg.sigmas is not None and cfg.timesteps is not None:
        raise ValueError("config keys student.sigmas and student.timesteps both set; give the stage levels once")
    top = float(generator_sigma)
    if k == 1 and cfg.sigmas is None and cfg.timesteps is None:
        return [top]
    grid = schedule.sigmas
    if cfg.sigmas is not None:
        sig = [float(s) for s in cfg.sigmas]
        key = "student.sigmas"
    else:
        n = len(grid) if grid is not None else 1000
        idx = list(cfg.timesteps) if cfg.timesteps is not None else default_timesteps(n, k)
        key = "student.timesteps"
        if any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n for i in idx):
            raise ValueError(f"config key {key} must hold grid indices in [0, {n - 1}], got {idx!r}")
        if grid is None:  # a continuous schedule: the indices of a 1000-level Karras grid over its range
            grid = karras_sigmas(n, schedule.sigma_min, schedule.sigma_max)
        sig = [float(grid[i]) for i in idx]
        if idx[0] == n - 1:  # the grid's top stands for the generator's level (an image run's
            sig[0] = top     # noise.generator_sigma; a flow teacher's t = 1, sigma = inf)
    if len(sig) != k:
        raise ValueError(f"config key {key} must hold student.steps = {k} levels, got {len(sig)}: {sig}")
    if not _close(sig[0], top):
        raise ValueError(f"config key {key}: the first level must be the generator's ({top:g}), got {sig[0]:g}")
    sig[0] = top
    if any(not (b < a) or not b > 0 or math.isnan(b) for a, b in zip(sig[:-1], sig[1:])):
        raise ValueError(f"config key {key} must be strictly decreasing and > 0, got {sig}")
    return sig


def _close(a: float, b: float) -> bool:
    return a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= 1e-4 * max(abs(a), abs(b)))


def take(cond: Any, idx: torch.Tensor) -> Any:
    """The rows ``idx`` of a batch's conditioning (None, a tensor, or a dict / list of them)."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: take(v, idx) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(take(v, idx) for v in cond)
    return cond[idx] if torch.is_tensor(cond) and cond.ndim > 0 else cond


def _draw(noise, j: int, like: torch.Tensor) -> torch.Tensor:
    """The re-noising noise of stage j + 1: from a list (one tensor per stage), a torch.Generator, or the
    global stream (None)."""
    if isinstance(noise, (list, tuple)):
        return noise[j].to(like.device, torch.float32)
    dev = noise.device if noise is not None else like.device
    return torch.randn(like.shape, generator=noise, device=dev, dtype=torch.float32).to(like.device)


def sample(denoise: Callable[[torch.Tensor, float], torch.Tensor], x_top: torch.Tensor, sigmas: Sequence[float],
           noise=None) -> torch.Tensor:
    """The k-step sampler: ``denoise(x_t, sigma)`` (one network evaluation) at each of ``sigmas``, starting
    from ``x_top`` (the generator's input at sigmas[0]), re-noising each output to the next level. ``noise``:
    None (global random stream), a torch.Generator, or a list of k-1 tensors (stage 1 first)."""
    x_t = x_top
    for j, s in enumerate(sigmas):
        x = denoise(x_t, s)
        if j == len(sigmas) - 1:
            return x
        x_t = x.float() + float(sigmas[j + 1]) * _draw(noise, j, x)
    raise ValueError("sample needs at least one level")


def per_image_renoise(seeds: Sequence[int], shape, steps: int, device="cpu") -> list[torch.Tensor]:
    """Stage 1..k-1 re-noising noise of each image, from its own stream seeded seed + 2**32 (module docstring)."""
    if steps <= 1:
        return []
    per = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s) + RENOISE_SEED_OFFSET)
        per.append([torch.randn(tuple(shape), generator=g) for _ in range(steps - 1)])
    return [torch.stack([p[j] for p in per]).to(device) for j in range(steps - 1)]


class FewStep:
    """A k-step student's training-time generation by backward simulation (module docstring).

    ``sigmas``: the k stage levels; ``top_scale``: prior_scale(sigmas[0]), the factor that makes the latent z
    the generator's input at stage 0."""

    def __init__(self, sigmas: Sequence[float], top_scale: float):
        self.sigmas = [float(s) for s in sigmas]
        self.top_scale = float(top_scale)

    @property
    def steps(self) -> int:
        return len(self.sigmas)

    def draw_stages(self, n: int, rng: torch.Generator | None, device) -> torch.Tensor:
        """Per-sample stage in {0..k-1}, stratified: each stage floor(n/k) or ceil(n/k) times, randomly placed."""
        return torch.randperm(n, generator=rng, device=device) % self.steps

    def generate(self, generator: torch.nn.Module, z: torch.Tensor, cond: Any, rng: torch.Generator | None = None,
                 stages: torch.Tensor | None = None) -> torch.Tensor:
        """x for the objective: each sample's stage-s output, its input simulated by the generator itself
        (no gradient) through the stages before s. ``generator(x_t, cond, sigma=...)`` is one evaluation; the
        last call (all samples, each at its stage) carries the gradient if grad mode is on."""
        n, k = z.shape[0], self.steps
        if stages is None:
            stages = self.draw_stages(n, rng, z.device)
        x_t = z.float() * self.top_scale
        with torch.no_grad():
            for j in range(k - 1):
                idx = (stages > j).nonzero().reshape(-1)
                if idx.numel() == 0:
                    continue
                x = generator(x_t[idx], take(cond, idx), sigma=self.sigmas[j]).float()
                eps = torch.randn(x.shape, generator=rng, device=x.device, dtype=torch.float32)
                x_t = x_t.clone()
                x_t[idx] = x + self.sigmas[j + 1] * eps
        sig = torch.tensor(self.sigmas, device=z.device, dtype=torch.float32)[stages]
        return generator(x_t, cond, sigma=sig)


def attach(cfg: StudentConfig, task) -> FewStep | None:
    """Resolve ``cfg``'s stage levels on ``task``'s schedule and make its generator a k-step one (its forward
    without ``sigma`` then samples in k steps: evaluation and sample grids). Returns the backward simulation
    the objective uses, None for a one-step student (nothing changes)."""
    gen = task.generator
    k = int(cfg.steps)
    if k == 1 and cfg.sigmas is None and cfg.timesteps is None:
        return None
    if not hasattr(gen, "set_stages"):
        raise ValueError(f"student.steps={k} needs a generator that takes a noise level (an image teacher's "
                         f"copy); this task's {type(gen).__name__} maps a latent in one step only: set "
                         "student.steps=1")
    sigmas = stage_sigmas(cfg, task.schedule, gen.generator_sigma)
    gen.set_stages(sigmas)
    task.info["student_sigmas"] = sigmas
    return FewStep(sigmas, gen.denoiser.prior_scale(sigmas[0])) if len(sigmas) > 1 else None
