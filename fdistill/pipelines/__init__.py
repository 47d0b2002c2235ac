"""Tasks: each assembles a teacher, the trainable networks, real data and conditioning for the trainer.

A task is built from a ``DistillConfig`` by ``build_task(cfg, device)`` (the registry below, keyed by the config's
``pipeline``); the contract it fulfils is ``fdistill.task.Task``. The trainer never branches on which task it runs.
"""

from __future__ import annotations

import torch

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
    torch.manual_seed(cfg.seed)
    return build_task(cfg, device)  # validates the task keys, teacher and data before anything is written
