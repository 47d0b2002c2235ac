"""The Task contract: what a task hands the trainer (teacher, trainable networks, noise schedule, conditioning and
real-data samplers, evaluation). The trainer never branches on which task it runs; tasks are registered in
``fdistill.pipelines``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .config import unknown_key
from .noise import NoiseSchedule


@dataclass
class Task:
    teacher: torch.nn.Module
    generator: torch.nn.Module
    fake_score: torch.nn.Module
    discriminator: torch.nn.Module
    schedule: NoiseSchedule
    sample_cond: Callable[[int, torch.Generator, Any], Any]
    """(n, rng, device) -> conditioning for n generated samples (labels, text embeddings, or None)."""
    sample_real: Callable[[int, torch.Generator, Any], tuple[torch.Tensor, Any]]
    """(n, rng, device) -> (real x0, their conditioning) for the discriminator."""
    evaluate: Callable[..., dict] | None = None
    """(generator, run_dir, final: bool) -> metrics dict; writes samples.png. Main process only."""
    oracle_log_ratio: Callable | None = None
    """Exact log(p_t/q_t)(x_t, sigma, cond) where the task knows it (toy2d)."""
    evaluate_uses_networks: bool = False
    """True if ``evaluate`` calls the trainable networks through the task's own references (toy2d's calibration
    report): under FSDP they then hold their full parameters on every process while it runs."""
    sigma_data: float = 0.5
    info: dict = field(default_factory=dict)


def check_task_keys(task_cfg: dict, defaults: dict, pipeline: str) -> dict:
    """Merge ``task:`` settings over a pipeline's defaults; an unknown key is an error naming it."""
    out = dict(defaults)
    for k, v in (task_cfg or {}).items():
        if k not in defaults:
            raise unknown_key(k, defaults, "task.", f"pipeline {pipeline}")
        d = defaults[k]
        if d is not None and v is not None and not isinstance(v, type(d)) and not (
                isinstance(d, float) and isinstance(v, int)):
            raise ValueError(f"config key task.{k} must be {type(d).__name__}, got {v!r}")
        out[k] = float(v) if isinstance(d, float) and isinstance(v, int) else v
    return out
