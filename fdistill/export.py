"""A distilled generator as a diffusers-format folder that loads back with ``from_pretrained``.

EDM pixel runs (pipelines ``mnist``, ``image``, ``imagenet64``) export to

    OUT/model_index.json                     {"_class_name": "OneStepPipeline", "unet": ["diffusers", "UNet2DModel"],
                                              "scheduler": ["fdistill.export", "EDMOneStepScheduler"]}
    OUT/unet/config.json                     the generator's UNet2DModel (safetensors weights beside it)
    OUT/scheduler/scheduler_config.json      the EDM preconditioning: sigma_max (the generator's input noise level),
                                             sigma_data
    OUT/fdistill_export.json                 where it came from (checkpoint, weights, step, divergence)

and load with

    from fdistill.export import OneStepPipeline
    pipe = OneStepPipeline.from_pretrained(OUT)
    images = pipe(class_labels=[3, 5], seeds=[0, 1]).images

which computes x = D(sigma_max z, sigma_max, y) with EDM's preconditioning around the UNet, z from one generator
per seed: the same images as ``fdistill sample`` on the checkpoint. Importing this module (and not diffusers) is
enough for ``from_pretrained`` to resolve the ``fdistill.export`` entries: diffusers resolves a library that is not
its own from the modules already imported, and never imports one because a folder names it.

Stable Diffusion runs (``coco_t2i``) export to a stock ``StableDiffusionPipeline`` folder (fdistill.export_sd).

The pipeline classes are created on first use (module ``__getattr__``) so that ``fdistill export --help`` and
errors about the source do not wait for diffusers to import.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch

EDM_PIPELINES = ("mnist", "image", "imagenet64")
SD_PIPELINES = ("coco_t2i",)
EXPORT_META = "fdistill_export.json"
EXPORT_FORMAT = "fdistill-one-step-edm-v1"
_MARKER = "denoiser.backbone."  # OneStepGenerator -> EDMPrecondUNet -> UNet2DModel


# ------------------------------------------------------------------------------------------------------------
# the diffusers classes (created lazily)

_LAZY = ("OneStepPipeline", "EDMOneStepScheduler")
# diffusers picks a component's loading method by looking its base classes up in the component's module.
_DIFFUSERS_BASES = ("DiffusionPipeline", "SchedulerMixin", "ModelMixin")


def __getattr__(name: str):
    if name in _LAZY or name in _DIFFUSERS_BASES:
        _define_classes()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_classes():
    if "OneStepPipeline" in globals():
        return
    from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin, SchedulerMixin
    from diffusers.configuration_utils import ConfigMixin, register_to_config

    class EDMOneStepScheduler(SchedulerMixin, ConfigMixin):
        """The preconditioning of a one-step EDM generator (there is no schedule: one step at ``sigma_max``).

        x = D(sigma_max z, sigma_max, y), with D(x, s, y) = c_skip x + c_out F(c_in x, log(s)/4, y),
        c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2), sd = sigma_data."""

        config_name = "scheduler_config.json"
        order = 1

        @register_to_config
        def __init__(self, sigma_max: float = 80.0, sigma_data: float = 0.5, precond: str = "edm"):
            if precond != "edm":
                raise ValueError(f"EDMOneStepScheduler: unsupported preconditioning {precond!r} (only 'edm')")

        @property
        def init_noise_sigma(self) -> float:
            return float(self.config.sigma_max)

    class OneStepPipeline(DiffusionPipeline):
        """One-step sampling from a distilled EDM generator (``fdistill export``)."""

        model_cpu_offload_seq = "unet"

        def __init__(self, unet, scheduler):
            super().__init__()
            self.register_modules(unet=unet, scheduler=scheduler)

        @property
        def num_classes(self) -> int:
            return int(self.unet.config.num_class_embeds or 0)

        @property
        def latent_shape(self) -> tuple[int, int, int]:
            s = self.unet.config.sample_size
            h, w = (s, s) if isinstance(s, int) else tuple(s)
            return (int(self.unet.config.in_channels), int(h), int(w))

        def generator_module(self):
            """The pipeline's UNet (shared, not copied) as the package's OneStepGenerator."""
            from .denoisers import EDMPrecondUNet
            from .generator import OneStepGenerator

            c = self.scheduler.config
            return OneStepGenerator(EDMPrecondUNet(self.unet, float(c.sigma_data), ()), float(c.sigma_max),
                                    self.latent_shape)

        @torch.no_grad()
        def __call__(self, class_labels=None, num_images: int | None = None, seeds=None, generator=None,
                     latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True):
            """Generate images in one network evaluation.

            Latents: ``seeds`` (one ``torch.Generator().manual_seed(seed)`` per image, as ``fdistill sample``:
            the same seed gives the same image whatever the batch), else ``latents`` [N, C, H, W], else
            ``num_images`` draws from ``generator`` (one torch.Generator, or a list with one per image).
            ``class_labels``: an int, a list or a tensor of N ints (class-conditional models). None draws them:
            with ``seeds``, from each seed's generator after its latent (EDM's generate.py), else from
            ``generator``. ``output_type``: 'pil', 'np' (float [0, 1] NHWC), 'pt' (float [0, 1] NCHW) or 'raw'
            (the generator's output, float [-1, 1] NCHW, unclamped)."""
            from .sampling import per_image_latents, per_image_random_labels

            if output_type not in ("pil", "np", "pt", "raw"):
                raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'raw', got {output_type!r}")
            shape, k = self.latent_shape, self.num_classes
            if seeds is not None:
                seeds = [int(s) for s in seeds]
                latents = per_image_latents(seeds, shape)
            elif latents is None:
                if isinstance(generator, (list, tuple)):
                    latents = torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generator])
                else:
                    n = num_images or (len(class_labels) if isinstance(class_labels, (list, tuple, torch.Tensor))
                                       else 1)
                    dev = generator.device if generator is not None else "cpu"
                    latents = torch.randn((n, *shape), generator=generator, device=dev)
            n = latents.shape[0]
            if num_images is not None and num_images != n:
                raise ValueError(f"num_images={num_images} but there are {n} latents/seeds")
            if tuple(latents.shape[1:]) != shape:
                raise ValueError(f"latents must have shape [N, {', '.join(map(str, shape))}], got "
                                 f"{list(latents.shape)}")
            if k == 0:
                if class_labels is not None:
                    raise ValueError("this generator is unconditional: leave class_labels=None")
                labels = None
            elif class_labels is None:
                if seeds is not None:
                    labels = per_image_random_labels(seeds, shape, k)
                elif isinstance(generator, (list, tuple)):  # each image's generator, after its latent
                    labels = torch.stack([torch.randint(0, k, (), generator=g, device=g.device) for g in generator])
                else:
                    g = generator if isinstance(generator, torch.Generator) else None
                    labels = torch.randint(0, k, (n,), generator=g, device=g.device if g is not None else "cpu")
            else:
                labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
                if labels.numel() == 1:
                    labels = labels.expand(n)
                if labels.numel() != n:
                    raise ValueError(f"{labels.numel()} class labels for {n} images")
                if bool(((labels < 0) | (labels >= k)).any()):
                    bad = labels[(labels < 0) | (labels >= k)].tolist()
                    raise ValueError(f"class labels must lie in [0, {k}), got {bad[:5]}")
            dev = self.unet.device
            x = self.generator_module()(latents.to(dev, torch.float32),
                                        None if labels is None else labels.to(dev)).float()
            if output_type == "raw":
                images = x
            else:
                images = (x / 2 + 0.5).clamp(0, 1)  # diffusers' [0, 1] convention
                if output_type in ("np", "pil"):
                    images = images.permute(0, 2, 3, 1).cpu().numpy()
                if output_type == "pil":
                    from .sampling import to_uint8

                    from PIL import Image
                    u8 = to_uint8(x).numpy()
                    images = [Image.fromarray(a[:, :, 0] if a.shape[-1] == 1 else a) for a in u8]
            if not return_dict:
                return (images,)
            return ImagePipelineOutput(images=images)

    for cls in (EDMOneStepScheduler, OneStepPipeline):
        cls.__qualname__ = cls.__name__
    globals().update(EDMOneStepScheduler=EDMOneStepScheduler, OneStepPipeline=OneStepPipeline,
                     DiffusionPipeline=DiffusionPipeline, SchedulerMixin=SchedulerMixin, ModelMixin=ModelMixin)


# ------------------------------------------------------------------------------------------------------------
# checkpoints


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A ``ckpt-<step>`` folder, or the newest finished one of a run directory."""
    from .checkpoint import latest_checkpoint

    p = Path(source)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    if (p / "meta.json").is_file():
        return p
    last = latest_checkpoint(p) if p.is_dir() else None
    if last is None:
        unfinished = sorted(x.name for x in p.glob("ckpt-*.tmp")) if p.is_dir() else []
        hint = (f" (only an unfinished {unfinished[-1]}: the run stopped while writing it; rerun its distill "
                "command to resume)" if unfinished else "")
        raise FileNotFoundError(f"no checkpoint in {p}{hint}: expected a run directory holding ckpt-<step>/ "
                                "folders with meta.json (written every log.ckpt_every steps and at the end of "
                                "`fdistill distill`), or one such folder")
    return last


def checkpoint_meta(ckpt: Path) -> dict:
    from .checkpoint import CheckpointError

    try:
        return json.loads((Path(ckpt) / "meta.json").read_text())
    except Exception as e:
        raise CheckpointError(f"cannot read {Path(ckpt) / 'meta.json'}: {e}") from None


def weights_name(ckpt: Path, which: str = "ema", cfg: dict | None = None) -> str:
    """The weights file stem: 'ema' = the run's first EMA (the one its final evaluation used) or, without EMA,
    the raw generator; 'generator'; or a stem such as 'ema_0.9999'."""
    ckpt = Path(ckpt)
    have = sorted(p.stem for p in ckpt.glob("*.safetensors")
                  if p.stem == "generator" or p.stem.startswith("ema_"))
    if which == "ema":
        decays = (cfg or {}).get("ema") or []
        first = f"ema_{float(decays[0]):g}" if decays else None
        emas = [h for h in have if h.startswith("ema_")]
        name = first if first in have else (emas[0] if emas else "generator")
    else:
        name = which
    if not (ckpt / f"{name}.safetensors").is_file():
        raise FileNotFoundError(f"{ckpt} has no {name}.safetensors; generator weights there: {have or 'none'} "
                                "(--which ema | generator | one of these names)")
    return name


def generator_state_dict(ckpt: Path, name: str) -> dict:
    """The generator's UNet weights from ``<name>.safetensors`` (a OneStepGenerator state dict, or an
    AveragedModel's: keys prefixed ``module.`` plus ``n_averaged``)."""
    from safetensors.torch import load_file

    from .checkpoint import CheckpointError

    path = Path(ckpt) / f"{name}.safetensors"
    try:
        sd = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {e}. The file is corrupt; use another checkpoint") from None
    # Whatever wraps the generator ('module.' of an AveragedModel or DDP, '_orig_mod.' of torch.compile), its
    # UNet's keys follow the marker.
    out = {k.split(_MARKER, 1)[1]: v for k, v in sd.items() if _MARKER in k}
    if not out:
        raise CheckpointError(f"{path} holds no generator UNet weights (keys '{_MARKER}*' or "
                              f"'module.{_MARKER}*'); its first keys: {list(sd)[:4]}")
    return out


def generator_spec(cfg: dict, teacher: str | None = None, meta: dict | None = None) -> dict:
    """What rebuilds an EDM run's generator: its UNet2DModel config, sigma_data and the generator's noise level.
    Checkpoints keep it (``meta["generator_spec"]``); older ones are read from the run's config and its teacher
    folder. ``teacher`` overrides both: the spec is then the one of that folder."""
    from diffusers import UNet2DModel

    stored = (meta or {}).get("generator_spec")
    if stored and not teacher:
        return {**stored, "teacher": cfg.get("teacher") or "(not needed)", "from": "checkpoint"}
    pipeline = cfg.get("pipeline")
    if pipeline not in EDM_PIPELINES:
        raise ValueError(f"pipeline {pipeline!r} has no EDM pixel generator to rebuild (these do: "
                         f"{', '.join(EDM_PIPELINES)}; coco_t2i runs export to a StableDiffusionPipeline)")
    tdir = teacher or cfg.get("teacher")
    if not tdir and pipeline == "mnist":
        from .pipelines.mnist import TEACHER_DIR
        tdir = TEACHER_DIR
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
    from diffusers import UNet2DModel

    from .checkpoint import CheckpointError

    _define_classes()
    ckpt = resolve_checkpoint(source)
    meta = checkpoint_meta(ckpt)
    cfg = meta.get("config") or {}
    spec = generator_spec(cfg, teacher, meta)
    name = weights_name(ckpt, which, cfg)
    sd = generator_state_dict(ckpt, name)
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
    sched = EDMOneStepScheduler(sigma_max=spec["sigma_max"], sigma_data=spec["sigma_data"])  # noqa: F821
    pipe = OneStepPipeline(unet=unet, scheduler=sched)  # noqa: F821
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
           teacher: str | None = None) -> Path:
    """Write a run's generator (``source``: run directory = its newest checkpoint, or a ckpt-<step> folder) as
    a diffusers folder: OneStepPipeline for EDM runs, StableDiffusionPipeline for coco_t2i runs. Written to a
    temporary folder and renamed; a non-empty ``out_dir`` is replaced only with ``force`` (and only if it is an
    earlier export)."""
    ckpt = resolve_checkpoint(source)
    cfg = checkpoint_meta(ckpt).get("config") or {}
    out = Path(out_dir)
    _check_out(out, force, ckpt)
    pipeline = cfg.get("pipeline")
    if pipeline in SD_PIPELINES:
        from .export_sd import export_from_checkpoint

        return export_from_checkpoint(ckpt, out, teacher, which, overwrite=out.exists())
    if pipeline in ("sdxl", "sd3", "flux"):  # the family's own diffusers pipeline class, one step
        from .pipelines.diffusers_t2i import export_from_checkpoint as export_family

        return export_family(ckpt, out, teacher, which, overwrite=out.exists())
    if pipeline not in EDM_PIPELINES:
        raise ValueError(f"{ckpt} is a {pipeline!r} run; export supports the image pipelines "
                         f"({', '.join(EDM_PIPELINES + SD_PIPELINES)})")
    pipe = pipeline_from_checkpoint(ckpt, which, teacher)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        sc = pipe.scheduler.config
        meta = {"format": EXPORT_FORMAT, **pipe.fdistill_source, "sigma_max": sc.sigma_max,
                "sigma_data": sc.sigma_data, "num_classes": pipe.num_classes, "latent_shape": list(pipe.latent_shape),
                "usage": "from fdistill.export import OneStepPipeline; "
                         "OneStepPipeline.from_pretrained(folder)(class_labels=..., seeds=...).images"}
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=1))
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
    _define_classes()
    pipe = OneStepPipeline.from_pretrained(str(p), torch_dtype=torch_dtype)  # noqa: F821
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


# ------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fdistill export",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a distilled generator as a diffusers-format folder.\n\n"
                    "EDM runs (mnist, image, imagenet64) -> a OneStepPipeline folder (unet/, scheduler/, "
                    "model_index.json):\n"
                    "    from fdistill.export import OneStepPipeline\n"
                    "    pipe = OneStepPipeline.from_pretrained(OUT)\n"
                    "    images = pipe(class_labels=[3, 5], seeds=[0, 1]).images\n"
                    "Stable Diffusion runs (coco_t2i) -> a stock StableDiffusionPipeline folder:\n"
                    "    StableDiffusionPipeline.from_pretrained(OUT)(prompt, num_inference_steps=1, "
                    "guidance_scale=1.0)\n\n"
                    "The generator's UNet config is stored in the checkpoint; checkpoints written before\n"
                    "it was need the teacher folder named in the run's config (or pass --teacher).")
    p.add_argument("source", help="run directory (its newest checkpoint) or a ckpt-<step> folder")
    p.add_argument("out", help="output folder (written to a temporary folder, then renamed)")
    p.add_argument("--which", default="ema", help="weights: 'ema' (default: the run's first EMA, or the raw "
                                                   "generator if it kept none), 'generator', or a file stem such "
                                                   "as ema_0.9999")
    p.add_argument("--teacher", default=None, help="teacher folder (default: the one in the run's config)")
    p.add_argument("--force", action="store_true", help="replace OUT if it holds an earlier export")
    return p


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError

    a = build_parser().parse_args(argv)
    try:
        out = export(a.source, a.out, a.which, a.force, a.teacher)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, CheckpointError) as e:
        print(f"fdistill export: error: {e}", file=sys.stderr)
        return 2
    meta_path = out / EXPORT_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    print(json.dumps({"out": str(out), "format": meta.get("format"), "weights": meta.get("weights"),
                      "usage": meta.get("usage")}, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
