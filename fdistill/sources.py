"""What ``fdistill sample`` draws from: a run directory or ckpt-<step> folder (EDM or coco_t2i run), an exported
OneStepPipeline folder, or a StableDiffusionPipeline folder, each opened as a ``SampleSource``.

Imports diffusers and transformers (through the exports): the sample command imports this module only once its
arguments are parsed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from transformers import CLIPTextModel, CLIPTokenizer

from .checkpoint import check_finite
from .export import EDM_PIPELINES, EXPORT_META, SD_PIPELINES, load_exported, pipeline_from_checkpoint
from .export_sd import few_step_scheduler, student_timesteps, unet_from_checkpoint
from .hub import load_kwargs
from .imageio import to_uint8
from .sampler import SampleSource, per_image_latents
from .student import RENOISE_SEED_OFFSET
from .weights import checkpoint_meta, resolve_checkpoint


def _sd_source(pipe, info: dict, steps: int, guidance: float, device, dtype, timesteps=None) -> SampleSource:
    """``timesteps``: a few-step student's (its LCMScheduler re-noises each image from the image's own stream,
    seed + 2**32, as the EDM students do)."""
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    lat = pipe.unet.config.sample_size
    shape = (pipe.unet.config.in_channels, lat, lat)
    few = timesteps is not None and len(timesteps) > 1
    when = {"timesteps": list(timesteps)} if few else {"num_inference_steps": steps}

    def generate(seeds, records):
        z = per_image_latents(seeds, shape, device).to(dtype)  # as `fdistill eval coco` does
        gens = [torch.Generator().manual_seed(int(s) + RENOISE_SEED_OFFSET) for s in seeds] if few else None
        with torch.no_grad():
            imgs = pipe([r["prompt"] for r in records], guidance_scale=guidance, latents=z, generator=gens,
                        output_type="np", **when).images
        return (np.clip(imgs, 0, 1) * 255).round().astype(np.uint8)

    extra = {"timesteps": list(timesteps)} if few else {}
    return SampleSource("sd", generate, 0, {**info, "steps": len(timesteps) if few else steps,
                                             "guidance": guidance, **extra})


def _edm_source(pipe, info: dict, device, dtype) -> SampleSource:
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device) if dtype == torch.float32 else pipe.to(device, dtype)  # .to(dtype) warns even when a no-op

    def generate(seeds, records):
        labels = [r["label"] for r in records] if pipe.num_classes else None
        x = pipe(class_labels=labels, seeds=seeds, output_type="raw").images
        return to_uint8(x).numpy()

    return SampleSource("edm", generate, pipe.num_classes, info, pipe.latent_shape)


def open_source(source, which: str = "ema", teacher: str | None = None, device=None, dtype=torch.float32,
                steps: int | None = None, guidance: float | None = None) -> SampleSource:
    """A run directory or ckpt-<step> folder (EDM or coco_t2i run), an exported OneStepPipeline folder, or a
    StableDiffusionPipeline folder."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    p = Path(source)
    if (p / "model_index.json").is_file():
        if which != "ema" or teacher is not None:
            raise ValueError(f"{p} is an exported folder: --which and --teacher apply to checkpoints only")
        cls = json.loads((p / "model_index.json").read_text()).get("_class_name")
        meta_path = p / EXPORT_META
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        info = {"source": str(p.resolve()), "class": cls, "weights": meta.get("weights"),
                "gen_step": meta.get("gen_step")}
        if cls == "OneStepPipeline":
            pipe = load_exported(p)
            check_finite(pipe.unet.state_dict(), f"{p / 'unet'}", "export it again from a finite checkpoint")
            return _edm_source(pipe, info, device, dtype)
        from .pipelines import diffusers_t2i as t2i
        if cls in t2i.PIPELINE_CLASSES and meta.get("format") == t2i.EXPORT_FORMAT:  # SDXL / SD3 / Flux exports
            return t2i.sample_source(p, device=device, dtype=dtype)
        if cls == "StableDiffusionPipeline":
            if steps is None:
                steps = meta.get("num_inference_steps")
                if steps is None:
                    raise ValueError(f"{p} is not a one-step fdistill export: pass --steps (and --guidance) for it")
            guidance = meta.get("guidance_scale", 1.0) if guidance is None else guidance
            pipe = StableDiffusionPipeline.from_pretrained(str(p), torch_dtype=dtype, local_files_only=True)
            check_finite(pipe.unet.state_dict(), f"{p / 'unet'}", "export it again from a finite checkpoint")
            ts = meta.get("timesteps") if steps == meta.get("num_inference_steps") else None  # a few-step export
            return _sd_source(pipe, info, steps, guidance, device, dtype, ts)
        raise ValueError(f"{p} holds a {cls}; `fdistill sample` reads OneStepPipeline and StableDiffusionPipeline "
                         "folders, run directories and ckpt-<step> folders")
    ckpt = resolve_checkpoint(p)
    cfg = checkpoint_meta(ckpt).get("config") or {}
    pipeline = cfg.get("pipeline")
    if pipeline in EDM_PIPELINES:
        pipe = pipeline_from_checkpoint(ckpt, which, teacher)
        return _edm_source(pipe, dict(pipe.fdistill_source, source=str(ckpt.resolve())), device, dtype)
    if pipeline in ("sdxl", "sd3", "flux"):
        from .pipelines.diffusers_t2i import sample_source
        return sample_source(ckpt, which, teacher, device, dtype)
    if pipeline in SD_PIPELINES:
        unet, meta = unet_from_checkpoint(ckpt, teacher, which)
        tdir = teacher or cfg["teacher"]
        kw = load_kwargs(str(tdir))
        ts = student_timesteps(str(tdir), meta.get("student_sigmas"), kw["local_files_only"])  # few-step: k
        # the exported folder's pipeline, in memory: the teacher's VAE and text encoder, the one-step scheduler
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL.from_pretrained(tdir, subfolder="vae", **kw),
            text_encoder=CLIPTextModel.from_pretrained(tdir, subfolder="text_encoder", **kw),
            tokenizer=CLIPTokenizer.from_pretrained(tdir, subfolder="tokenizer",
                                                    local_files_only=kw["local_files_only"]),
            unet=unet, scheduler=few_step_scheduler(str(tdir), ts, kw["local_files_only"]), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False).to(dtype=dtype)
        info = {"source": str(ckpt.resolve()), "weights": meta["weights"], "gen_step": meta.get("gen_step")}
        k = len(ts) if ts else 1
        return _sd_source(pipe, info, k if steps is None else steps, 1.0 if guidance is None else guidance,
                          device, dtype, ts if steps in (None, k) else None)
    raise ValueError(f"{ckpt} is a {pipeline!r} run; `fdistill sample` makes images of the image pipelines "
                     f"({', '.join(EDM_PIPELINES + SD_PIPELINES)})")
