"""Tasks: each assembles a teacher, the trainable networks, real data and conditioning for the trainer.

A task is built from a ``DistillConfig`` by ``build_task(cfg, device)`` (the registry below, keyed by the config's
``pipeline``); the contract it fulfils is ``fdistill.task.Task``. The trainer never branches on which task it runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from ..task import Task, check_task_keys  # noqa: F401 (re-exported first: task modules may import them from here)
from . import coco_t2i, diffusers_t2i, image, imagenet64, mnist, toy2d

BUILDERS = {
    "toy2d": toy2d.build,
    "mnist": mnist.build,
    "imagenet64": imagenet64.build,
    "image": image.build,
    "coco_t2i": coco_t2i.build,
    "sdxl": diffusers_t2i.build,  # SDXL, SD3 / SD3.5, FLUX.1 through their diffusers pipelines (docs/teachers.md)
    "sd3": diffusers_t2i.build,
    "flux": diffusers_t2i.build,
}
"""config ``pipeline`` -> build(cfg, device) -> Task."""

LEGACY_TASK_DEFAULTS = {
    # MNIST's discriminator read only the teacher's 4x4 bottleneck until the head fix of docs/discriminator.md
    "mnist": {"feature_modules": ["mid_block"]},
}
"""Task defaults that changed after runs were written with them. A run directory whose saved config lacks such a
key was built with the old value, so resuming it uses that value (its checkpoints hold networks of that shape)."""


def build_task(cfg, device) -> Task:
    name = cfg.pipeline
    if name not in BUILDERS:
        raise ValueError(f"unknown pipeline {name!r}; choose one of {', '.join(BUILDERS)}")
    return BUILDERS[name](cfg, device)


def build_run_task(cfg) -> Task:
    """The task that ``fdistill.trainer.distill(cfg, task)`` trains, built as every process must build it: on this
    process's device, with the global seed set to ``cfg.seed`` first (the same initial weights on every process;
    DDP broadcasts them, FSDP shards them as they are)."""
    from accelerate import PartialState  # heavy (imports accelerate's whole stack); the device accelerate will use

    device = PartialState(cpu=not torch.cuda.is_available()).device
    legacy = legacy_task_keys(cfg)
    if legacy:
        cfg.task = {**cfg.task, **legacy}
    torch.manual_seed(cfg.seed)
    task = build_task(cfg, device)  # validates the task keys, teacher and data before anything is written
    task.info["legacy_task_keys"] = legacy  # the trainer's resume check counts them as the saved run's
    return task


def legacy_task_keys(cfg) -> dict:
    """The task keys a resumed run needs at their old defaults (``LEGACY_TASK_DEFAULTS``): those its saved config
    lacks and this config does not set. Empty unless ``cfg.out`` holds a started run of the same pipeline."""
    old = LEGACY_TASK_DEFAULTS.get(cfg.pipeline)
    saved = Path(cfg.out) / "config.json"
    if not old or not saved.is_file() or ckpt.latest_checkpoint(Path(cfg.out)) is None:
        return {}
    try:
        saved_cfg = json.loads(saved.read_text())
    except (OSError, ValueError):
        return {}  # unreadable: the trainer's resume check reports it
    if saved_cfg.get("pipeline") != cfg.pipeline:
        return {}
    saved_task = saved_cfg.get("task") or {}
    return {k: v for k, v in old.items() if k not in saved_task and k not in (cfg.task or {})}
