"""A distilled generator as a diffusers-format folder that loads back with ``from_pretrained``.

EDM pixel runs (pipelines ``mnist``, ``image``, ``imagenet64``) export to

    OUT/model_index.json                     {"_class_name": "OneStepPipeline", "unet": ["diffusers", "UNet2DModel"],
                                              "scheduler": ["fdistill.onestep", "EDMOneStepScheduler"]}
    OUT/unet/config.json                     the generator's UNet2DModel (safetensors weights beside it)
    OUT/scheduler/scheduler_config.json      the EDM preconditioning: sigma_max (the generator's input noise level),
                                             sigma_data
    OUT/fdistill_export.json                 where it came from (checkpoint, weights, step, divergence)

and load with

    from fdistill.export import OneStepPipeline
    pipe = OneStepPipeline.from_pretrained(OUT)
    images = pipe(class_labels=[3, 5], seeds=[0, 1]).images

which computes x = D(sigma_max z, sigma_max, y) with EDM's preconditioning around the UNet, z from one generator
per seed: the same images as ``fdistill sample`` on the checkpoint. Import ``OneStepPipeline`` from here (or from
``fdistill.onestep``) before ``from_pretrained``: diffusers resolves a library that is not its own from the
modules already imported.

Stable Diffusion runs (``coco_t2i``) export to a stock ``StableDiffusionPipeline`` folder (fdistill.export_sd).

The pipeline classes live in ``fdistill.onestep``; they are re-exported here because folders exported before
that module existed name ``fdistill.export`` as their library. Importing this module imports diffusers: the
``fdistill export`` command imports it once its arguments are parsed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin, UNet2DModel  # noqa: F401 (see below)

from . import model_card
from .checkpoint import CheckpointError
from .export_sd import export_from_checkpoint
from .onestep import EDMOneStepScheduler, OneStepPipeline
from .paths import MNIST_TEACHER_DIR
from .weights import backbone_state_dict, checkpoint_meta, resolve_checkpoint, weights_name

# diffusers' loader looks a component's base classes (DiffusionPipeline, SchedulerMixin, ModelMixin) up in the
# module its folder names: for folders naming ``fdistill.export``, this one.

__all__ = ["EDMOneStepScheduler", "OneStepPipeline", "export", "generator_spec", "load_exported",
           "pipeline_from_checkpoint", "resolve_checkpoint", "checkpoint_meta", "weights_name"]

EDM_PIPELINES = ("mnist", "image", "imagenet64")
SD_PIPELINES = ("coco_t2i",)
FAMILY_PIPELINES = ("sdxl", "sd3", "flux")
EXPORT_META = "fdistill_export.json"
EXPORT_FORMAT = "fdistill-one-step-edm-v1"
ONE_STEP_USAGE = """from fdistill.onestep import OneStepPipeline

pipe = OneStepPipeline.from_pretrained("FOLDER")
images = pipe(class_labels=[0, 1, 2, 3], seeds=[0, 1, 2, 3]).images  # PIL images; one network evaluation
# (a few-step student: scheduler_config.json lists its noise levels, one network evaluation each)
# unconditional models: pipe(seeds=[0, 1, 2, 3]).images"""


def generator_spec(cfg: dict, teacher: str | None = None, meta: dict | None = None) -> dict:
    """What rebuilds an EDM run's generator: its UNet2DModel config, sigma_data and the generator's noise level.
    Checkpoints keep it (``meta["generator_spec"]``); older ones are read from the run's config and its teacher
    folder. ``teacher`` overrides both: the spec is then the one of that folder."""
    stored = (meta or {}).get("generator_spec")
    if stored and not teacher:
        return {**stored, "teacher": cfg.get("teacher") or "(not needed)", "from": "checkpoint"}
    pipeline = cfg.get("pipeline")
    if pipeline not in EDM_PIPELINES:
        raise ValueError(f"pipeline {pipeline!r} has no EDM pixel generator to rebuild (these do: "
                         f"{', '.join(EDM_PIPELINES)}; coco_t2i runs export to a StableDiffusionPipeline)")
    tdir = teacher or cfg.get("teacher")
    if not tdir and pipeline == "mnist":
        tdir = MNIST_TEACHER_DIR
    if not tdir:
        raise ValueError("the run's config names no teacher; pass --teacher DIR (the UNet2DModel folder the run "
                         "was distilled from)")
    tdir = Path(tdir)
    if not (tdir / "config.json").is_file():
        raise FileNotFoundError(f"teacher folder {tdir} (from the run's config) has no config.json; the export "
                                "rebuilds the generator from the teacher's UNet2DModel config: pass --teacher DIR, "
                                "the folder the run was distilled from")
    unet_config = dict(UNet2DModel.load_config(str(tdir)))
    pre_path = tdir / "fdistill_config.json"
    precond = json.loads(pre_path.read_text()) if pre_path.is_file() else {}
    if precond.get("precond", "edm") != "edm":
        raise ValueError(f"{pre_path}: preconditioning {precond.get('precond')!r} is not EDM's")
    noise = cfg.get("noise") or {}
    # Mirrors the pipelines: mnist starts the generator at noise.sigma_max, image/imagenet64 at
    # noise.generator_sigma when set.
    sigma = noise.get("sigma_max", 80.0)
    if pipeline != "mnist" and noise.get("generator_sigma"):
        sigma = noise["generator_sigma"]
    task = cfg.get("task") or {}
    if pipeline != "mnist" and "dropout" in unet_config and task.get("dropout") is not None:
        unet_config["dropout"] = float(task["dropout"])  # what the trainable copy was built with
    return {"pipeline": pipeline, "teacher": str(tdir), "unet_config": unet_config,
            "sigma_data": float(precond.get("sigma_data", 0.5)), "sigma_max": float(sigma), "from": "teacher"}


def pipeline_from_checkpoint(source: str | os.PathLike, which: str = "ema", teacher: str | None = None):
    """An in-memory ``OneStepPipeline`` with a checkpoint's generator (an EDM run directory or ckpt folder).
    ``pipe.fdistill_source`` records the checkpoint and weights it came from."""
    ckpt = resolve_checkpoint(source)
    meta = checkpoint_meta(ckpt)
    cfg = meta.get("config") or {}
    spec = generator_spec(cfg, teacher, meta)
    name = weights_name(ckpt, which, cfg)
    sd = backbone_state_dict(ckpt, name)
    unet = UNet2DModel.from_config(spec["unet_config"])
    if spec["from"] == "checkpoint":
        what = f"the UNet config stored in {ckpt / 'meta.json'}"
        hint = ("The weights file does not belong to this checkpoint (copied in from another run?): use the "
                "checkpoint folder as training wrote it")
    else:
        what = f"the UNet of teacher {spec['teacher']}"
        hint = "Was the run distilled from another teacher? Pass --teacher DIR with that one"
    try:
        missing, unexpected = unet.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{ckpt / (name + '.safetensors')} does not fit {what}: "
                              f"{str(e).splitlines()[-1].strip()}. {hint}") from None
    if missing or unexpected:
        raise CheckpointError(f"{ckpt / (name + '.safetensors')} does not match {what}: missing "
                              f"{list(missing)[:3]} ({len(missing)}), unexpected {list(unexpected)[:3]} "
                              f"({len(unexpected)}). {hint}")
    unet.eval()
    sigmas = meta.get("student_sigmas")  # a few-step student's levels (absent: one step)
    sched = EDMOneStepScheduler(sigma_max=spec["sigma_max"], sigma_data=spec["sigma_data"],
                                sigmas=[float(v) for v in sigmas] if sigmas and len(sigmas) > 1 else None)
    pipe = OneStepPipeline(unet=unet, scheduler=sched)
    pipe.fdistill_source = {"source": str(ckpt), "weights": name, "gen_step": meta.get("gen_step"),
                            "kimg": (meta.get("images_seen") or 0) / 1000, "pipeline": spec["pipeline"],
                            "divergence": cfg.get("divergence"), "teacher": spec["teacher"]}
    return pipe


# ------------------------------------------------------------------------------------------------------------
# export


def _check_out(out: Path, force: bool, ckpt: Path):
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is a file; choose a folder name")
    src = ckpt.resolve()
    if out.resolve() == src or out.resolve() in src.parents:
        raise ValueError(f"{out} holds the checkpoint being exported; choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty; pass --force to replace an earlier export, or "
                                  "choose another folder")
        if not (out / "model_index.json").is_file():
            # --force deletes the folder: only ever one that an export wrote
            raise FileExistsError(f"{out} is not an earlier export (no model_index.json); --force only replaces "
                                  "exports. Remove it yourself or choose another folder")


def _replace(tmp: Path, out: Path):
    """Move a finished folder into place; an existing output stays until the new one is there."""
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists():
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export(source: str | os.PathLike, out_dir: str | os.PathLike, which: str = "ema", force: bool = False,
           teacher: str | None = None, dtype: torch.dtype | None = None, safety_checker: bool = False) -> Path:
    """Write a run's generator (``source``: run directory = its newest checkpoint, or a ckpt-<step> folder) as
    a diffusers folder: OneStepPipeline for EDM runs, StableDiffusionPipeline for coco_t2i runs. Written to a
    temporary folder and renamed; a non-empty ``out_dir`` is replaced only with ``force`` (and only if it is an
    earlier export). ``dtype`` and ``safety_checker`` apply to Stable Diffusion runs (the UNet's saved dtype; copy
    the teacher's safety checker)."""
    ckpt = resolve_checkpoint(source)
    cfg = checkpoint_meta(ckpt).get("config") or {}
    out = Path(out_dir)
    _check_out(out, force, ckpt)
    pipeline = cfg.get("pipeline")
    if pipeline in SD_PIPELINES:
        return export_from_checkpoint(ckpt, out, teacher, which, overwrite=out.exists(), dtype=dtype,
                                      safety_checker=safety_checker)
    if pipeline in FAMILY_PIPELINES:  # SDXL / SD3 / Flux: the family's own diffusers pipeline class, one step
        from .pipelines.diffusers_t2i import export_from_checkpoint as export_family

        if safety_checker:
            raise ValueError(f"--safety-checker applies to coco_t2i runs; {pipeline} pipelines have none")
        return export_family(ckpt, out, teacher, which, overwrite=out.exists(), dtype=dtype)
    if pipeline not in EDM_PIPELINES:
        raise ValueError(f"{ckpt} is a {pipeline!r} run; export supports the image pipelines "
                         f"({', '.join(EDM_PIPELINES + SD_PIPELINES)})")
    if dtype is not None or safety_checker:
        raise ValueError("--dtype and --safety-checker apply to Stable Diffusion (coco_t2i) runs; an EDM export "
                         "keeps the generator's float32 weights")
    pipe = pipeline_from_checkpoint(ckpt, which, teacher)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        sc = pipe.scheduler.config
        meta = {"format": EXPORT_FORMAT, **pipe.fdistill_source, "sigma_max": sc.sigma_max,
                "sigma_data": sc.sigma_data, "num_steps": pipe.num_steps, "sigmas": pipe.scheduler.stage_sigmas, "num_classes": pipe.num_classes, "latent_shape": list(pipe.latent_shape),
                "usage": "from fdistill.export import OneStepPipeline; "
                         "OneStepPipeline.from_pretrained(folder)(class_labels=..., seeds=...).images"}
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=1))
        model_card.write(tmp, kind="one-step", config=cfg, meta=meta, usage=ONE_STEP_USAGE)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_exported(path: str | os.PathLike, device=None, torch_dtype: torch.dtype | None = None):
    """``OneStepPipeline.from_pretrained`` with a clear error for folders that are not one."""
    p = Path(path)
    index = p / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{p} is not an exported pipeline (no model_index.json)")
    name = json.loads(index.read_text()).get("_class_name")
    if name != "OneStepPipeline":
        raise ValueError(f"{p} holds a {name}, not a OneStepPipeline")
    pipe = OneStepPipeline.from_pretrained(str(p), torch_dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe
