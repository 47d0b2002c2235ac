"""A distilled SD generator as a stock ``StableDiffusionPipeline`` folder that samples in one step.

The folder is the teacher's pipeline with the generator's UNet and a scheduler under which one pipeline step is
exactly our generator:

    DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, thresholding=False)

With ``num_inference_steps=1`` and trailing spacing the only timestep is T - 1 = 999 (the generator's), the
pipeline feeds the UNet z ~ N(0, I) (init_noise_sigma = 1, no input scaling), and DDIM's step to the final
alpha of 1 returns its predicted x0: (z - sqrt(1 - abar_999) eps) / sqrt(abar_999) for epsilon prediction (the v
form for v models) - the x0 that ``VPUNetDenoiser`` computes at sigma_999 from x_t = sqrt(1 + sigma^2) z. Guidance
must be off (guidance_scale <= 1): the student was distilled from a guided teacher and is unguided itself.

    pipe = StableDiffusionPipeline.from_pretrained(OUT)
    image = pipe(prompt, num_inference_steps=1, guidance_scale=1.0).images[0]

A few-step student (``fdistill.student``, timesteps t_0 = 999 > t_1 > ... > t_{k-1}) is exported with diffusers'
``LCMScheduler(original_inference_steps=k)``: each step takes the UNet's x0 and re-noises it with fresh noise to
the next timestep, sqrt(abar) x0 + sqrt(1 - abar) eps, which is our sampler's x0 + sigma eps in VP coordinates.
LCM's boundary scalings at these timesteps (c_skip <= 4e-8 at t >= 249) leave x0 as it is to float precision.
With k steps its default timesteps are DMD2's ones, 999, 999 - 1000/k, ... (``student.timesteps``' default);
other timesteps are passed as ``timesteps=[...]`` (the export's fdistill_export.json and model card list them).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from . import model_card
from .hub import load_kwargs
from .noise import vp_sigmas
from .weights import backbone_state_dict, checkpoint_meta, resolve_checkpoint, weights_name

SD_USAGE = """from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained("FOLDER")
image = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=1.0).images[0]  # one UNet evaluation"""
ONE_STEP_SCHEDULER = {"timestep_spacing": "trailing", "set_alpha_to_one": True, "clip_sample": False,
                      "thresholding": False}


def _as_unet(model):
    """The UNet2DConditionModel inside a OneStepGenerator / VPUNetDenoiser / AveragedModel / DDP wrapper."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "module"):  # DDP, AveragedModel
            model = model.module
        elif hasattr(model, "denoiser"):  # OneStepGenerator
            model = model.denoiser
        elif hasattr(model, "backbone") and model.backbone is not None:  # Denoiser
            model = model.backbone
        else:
            break
    if not isinstance(model, UNet2DConditionModel):
        raise TypeError(f"expected a UNet2DConditionModel (or a generator holding one), got {type(model).__name__}")
    return model


def one_step_scheduler(teacher: str, local_files_only: bool = True):
    """The teacher's noise schedule in a DDIM scheduler whose single step returns x0 at timestep 999."""
    cfg = DDIMScheduler.load_config(teacher, subfolder="scheduler", local_files_only=local_files_only)
    return DDIMScheduler.from_config(cfg, **ONE_STEP_SCHEDULER)


def few_step_scheduler(teacher: str, timesteps, local_files_only: bool = True):
    """The teacher's noise schedule in a scheduler that runs a k-step student at ``timesteps``: one-step DDIM
    for k = 1, LCMScheduler (x0, then fresh noise to the next timestep) for k > 1 (module docstring)."""
    if timesteps is None or len(timesteps) <= 1:
        return one_step_scheduler(teacher, local_files_only)
    cfg = LCMScheduler.load_config(teacher, subfolder="scheduler", local_files_only=local_files_only)
    return LCMScheduler.from_config(cfg, original_inference_steps=len(timesteps), clip_sample=False,
                                    thresholding=False)


def default_lcm_timesteps(scheduler) -> list[int]:
    """The timesteps an LCMScheduler takes for ``num_inference_steps = original_inference_steps``."""
    k = int(scheduler.config.original_inference_steps)
    scheduler.set_timesteps(k)
    return [int(t) for t in scheduler.timesteps]


def student_timesteps(teacher: str, sigmas, local_files_only: bool = True) -> list[int] | None:
    """A few-step student's levels (checkpoint meta ``student_sigmas``) as the teacher's DDPM timesteps; None for
    one step. Levels off the teacher's grid are an error (the stock schedulers take integer timesteps)."""
    if not sigmas or len(sigmas) <= 1:
        return None
    cfg = DDIMScheduler.load_config(teacher, subfolder="scheduler", local_files_only=local_files_only)
    grid = vp_sigmas(DDIMScheduler.from_config(cfg).alphas_cumprod).double()
    out = []
    for s in sigmas:
        i = int((grid.log() - torch.tensor(float(s)).double().log()).abs().argmin())
        if abs(float(grid[i]) - float(s)) > 1e-4 * float(s):
            raise ValueError(f"the student's level sigma={s:g} is not on the teacher's DDPM grid; the exported "
                             "scheduler takes integer timesteps: train with student.timesteps")
        out.append(i)
    return out


def export_sd_pipeline(generator_unet, teacher_dir: str, out_dir: str | os.PathLike, *, dtype: torch.dtype | None =
                       None, safety_checker: bool = False, variant: str = "", overwrite: bool = False,
                       extra_meta: dict | None = None, config: dict | None = None,
                       timesteps: list[int] | None = None) -> Path:
    """Write ``out_dir``: the teacher's text encoder, tokenizer and VAE (re-saved), the generator's UNet and the
    one-step DDIM scheduler (a few-step student, ``timesteps`` t_0 > ... > t_{k-1}: the k-step LCMScheduler). ``generator_unet``: a UNet2DConditionModel or a module holding one (our generator,
    its EMA). ``dtype``: save the UNet in this dtype (default: as it is, fp32 after training). The teacher's
    safety checker is copied only with ``safety_checker=True``. Written to a temporary folder, then renamed."""
    unet = _as_unet(generator_unet)
    out = Path(out_dir)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) or choose another folder")
    kw = load_kwargs(str(teacher_dir), variant)
    lfo = kw["local_files_only"]
    vae = AutoencoderKL.from_pretrained(teacher_dir, subfolder="vae", **kw)
    text_encoder = CLIPTextModel.from_pretrained(teacher_dir, subfolder="text_encoder", **kw)
    tokenizer = CLIPTokenizer.from_pretrained(teacher_dir, subfolder="tokenizer", local_files_only=lfo)
    checker = extractor = None
    if safety_checker:  # the checker's classes import only when asked for
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor
        checker = StableDiffusionSafetyChecker.from_pretrained(teacher_dir, subfolder="safety_checker", **kw)
        extractor = CLIPImageProcessor.from_pretrained(teacher_dir, subfolder="feature_extractor",
                                                       local_files_only=lfo)
    unet_out = unet
    if dtype is not None and next(unet.parameters()).dtype != dtype:
        unet_out = copy.deepcopy(unet).to(dtype)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet_out,
                                   scheduler=few_step_scheduler(str(teacher_dir), timesteps, lfo),
                                   safety_checker=checker,
                                   feature_extractor=extractor, requires_safety_checker=safety_checker)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    meta = {"format": "fdistill-one-step-sd-v1", "teacher": str(teacher_dir), "num_inference_steps": 1,
            "guidance_scale": 1.0, "timestep": int(pipe.scheduler.config.num_train_timesteps) - 1,
            "scheduler": {"class": "DDIMScheduler", **ONE_STEP_SCHEDULER},
            "usage": "StableDiffusionPipeline.from_pretrained(folder)(prompt, num_inference_steps=1, "
                     "guidance_scale=1.0)", **(extra_meta or {})}
    usage = SD_USAGE
    if timesteps is not None and len(timesteps) > 1:
        k = len(timesteps)
        ts = [int(t) for t in timesteps]
        call = f"num_inference_steps={k}" if default_lcm_timesteps(copy.deepcopy(pipe.scheduler)) == ts else \
            f"timesteps={ts}"
        meta.update({"format": "fdistill-few-step-sd-v1", "num_inference_steps": k, "timesteps": ts,
                     "timestep": ts[0], "scheduler": {"class": "LCMScheduler", "original_inference_steps": k},
                     "usage": f"StableDiffusionPipeline.from_pretrained(folder)(prompt, {call}, guidance_scale=1.0)"})
        usage = SD_USAGE.replace("num_inference_steps=1", call).replace("one UNet evaluation",
                                                                        f"{k} UNet evaluations")
    (tmp / "fdistill_export.json").write_text(json.dumps(meta, indent=1))
    model_card.write(tmp, kind="sd", config=config or {}, meta=meta, usage=usage)  # ``config``: the run's
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------------------------------------
# from a run directory / checkpoint


def unet_from_checkpoint(ckpt: str | os.PathLike, teacher: str | None = None, which: str = "ema"):
    """The generator's UNet2DConditionModel from a coco_t2i checkpoint (a ckpt-<step> folder or a run directory).

    ``which``: 'ema' (the EMA training evaluated: the run's first configured one; the raw generator if it kept
    none), 'generator', or a file stem such as 'ema_0.9999' (``fdistill.weights``). Returns (unet, checkpoint
    meta)."""
    folder = resolve_checkpoint(ckpt)
    meta = checkpoint_meta(folder)
    cfg = meta.get("config", {})
    teacher = teacher or cfg.get("teacher")
    if not teacher:
        raise ValueError("the checkpoint does not name its teacher; pass teacher= (--teacher DIR)")
    name = weights_name(folder, which, cfg)
    unet_sd = backbone_state_dict(folder, name)
    kw = load_kwargs(str(teacher))
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(
        teacher, subfolder="unet", local_files_only=kw["local_files_only"]))
    unet.load_state_dict(unet_sd, strict=True)
    return unet, {**meta, "weights": name}


def export_from_checkpoint(ckpt, out_dir, teacher: str | None = None, which: str = "ema", **kw) -> Path:
    unet, meta = unet_from_checkpoint(ckpt, teacher, which)
    cfg = meta.get("config", {})
    ts = (cfg.get("task") or {}).get("generator_timestep", 999)
    if ts != 999:  # trailing DDIM's single timestep is T - 1 (SD: T = 1000)
        raise ValueError(f"the generator was trained at timestep {ts}; the one-step DDIM export needs 999")
    tdir = teacher or cfg["teacher"]
    timesteps = student_timesteps(str(tdir), meta.get("student_sigmas"), load_kwargs(str(tdir))["local_files_only"])
    return export_sd_pipeline(unet, tdir, out_dir, timesteps=timesteps, extra_meta={
        "source": str(ckpt), "weights": meta["weights"], "gen_step": meta.get("gen_step"),
        "divergence": cfg.get("divergence"), "guidance_scale_teacher": (cfg.get("task") or {}).get("guidance_scale")},
        config=cfg, **kw)
