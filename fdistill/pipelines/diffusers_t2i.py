"""Text-to-image distillation of today's diffusers teachers: SDXL, Stable Diffusion 3 / 3.5 and FLUX.1.

``pipeline: sdxl | sd3 | flux``. The teacher is a diffusers folder or hub id of the family's pipeline
(``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``); everything model-specific is done
the way that pipeline does it - its own ``encode_prompt`` embeds the prompts (SDXL: two CLIPs, pooled embeds and the
size/crop ``time_ids``; SD3: two CLIPs + T5; Flux: CLIP pooled + T5), its VAE encodes the real images (scaling and
shift factor), and the exported student is that pipeline class with the student's network and a one-step schedule.

Denoisers:
 - SDXL: epsilon-prediction ``UNet2DConditionModel`` through ``VPUNetDenoiser`` (DDPM grid of the teacher's
   scheduler; generator at timestep 999 on N(0, I) latents, as for SD1.5), CFG in x0 space.
 - SD3 / SD3.5, FLUX.1: rectified-flow transformers through ``FlowMatchDenoiser``; the noise grid is the
   scheduler's shifted training grid (SD3: ``shift``; Flux: dynamic shift at the training resolution's sequence
   length); the generator evaluates the teacher at t = 1 (sigma = inf) on N(0, I) latents. SD3 uses CFG in x0
   space; FLUX.1-dev is guidance-distilled: ``guidance_scale`` feeds its guidance embedding and no CFG pass runs.

Prompt embeddings are computed once and kept in host memory (float16) up to ``task.max_cached_prompts`` texts;
above that they are computed per batch (``text_cache: online``; T5 states are large: 4096 x 256 per SD3 prompt).

Export (``fdistill export RUN OUT``): the teacher's pipeline folder with the generator's network (LoRA merged) and
a schedule whose single step is the generator: SDXL gets a trailing-spacing DDIM scheduler (timestep 999, x0 out);
flow models keep their own ``FlowMatchEulerDiscreteScheduler``, whose one-step schedule is t = 1 -> 0 with the
Euler update z - v = x0 at t = 1, exactly the generator. Call it with ``num_inference_steps=1`` and
``guidance_scale`` as recorded in ``fdistill_export.json`` (1 for SDXL/SD3: the student is unguided; Flux-dev: the
distillation's guidance value, its embedding input).

A few-step student (``student.steps``, fdistill/student.py) is exported with a scheduler whose steps re-noise the
network's x0 with fresh noise to the next level: SDXL with ``LCMScheduler`` at the student's DDPM timesteps (as
SD1.5, fdistill/export_sd.py), flow models with ``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True,
shift=1)``, whose step is (1 - t_next) x0 + t_next eps, at the student's flow times t = sigma / (1 + sigma) passed
unshifted as ``sigmas=[...]``. ``fdistill_export.json`` records the call (``call_kwargs``). diffusers' SD3 and Flux
pipelines draw that step's noise from torch's global stream (they do not pass ``generator`` to the step), so
``fdistill sample`` makes flow students' images one per call after ``torch.manual_seed(seed + 2**32)``
(``flow_few_step_image``), which a stock pipeline call reproduces.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file

from ..denoisers import freeze
from ..denoisers_flow import FlowMatchDenoiser, flow_grid, pack_latents
from ..denoisers_vp import CFGDenoiser, VPUNetDenoiser
from ..discriminator import Discriminator
from ..generator import OneStepGenerator
from ..noise import NoiseSchedule, vp_sigmas
from .. import weights as ex
from ..hub import load_kwargs
from ..imageio import save_grid
from ..lora import LoraSpec, adapter_state, lora_networks, merge, save_lora_weights
from ..sampler import SampleSource, per_image_latents
from ..student import RENOISE_SEED_OFFSET
from ..task import Task, check_task_keys
from .coco_t2i import _real_caption_table, latent_cache, task_prompts

FAMILIES = {
    # pipeline key: (diffusers pipeline class, denoising network subfolder, noise grid)
    "sdxl": ("StableDiffusionXLPipeline", "unet", "vp"),
    "sd3": ("StableDiffusion3Pipeline", "transformer", "flow"),
    "flux": ("FluxPipeline", "transformer", "flow"),
}
PIPELINE_CLASSES = {v[0]: k for k, v in FAMILIES.items()}
EXPORT_FORMAT = "fdistill-one-step-diffusers-v1"

DEFAULTS = {
    "teacher_dtype": "bfloat16",
    # Precision of the frozen teacher and its text encoders (the trainable copies are fp32).
    "guidance_scale": 0.0,
    # Teacher guidance: CFG scale in x0 space (SDXL, SD3) or Flux-dev's guidance embedding; 0 = the family's
    # diffusers default (SDXL 5.0, SD3 7.0, Flux 3.5).
    "resolution": 0,
    # Image side; 0 = the teacher's default (SDXL 1024, SD3.5 1024, Flux 1024; tiny test models: their own).
    "max_sequence_length": 0,
    # T5 tokens (SD3 / Flux); 0 = the pipeline's default (256 SD3, 512 Flux-dev).
    "feature_modules": [],
    # Discriminator features; [] = SDXL's mid block, a transformer's middle block (image tokens on the grid).
    "generator_timestep": 999,
    # SDXL only: the one-step generator's DDPM timestep.
    "latent_cache": "",
    "real_captions": "",
    "text_cache": "auto",
    # memory | online | auto (memory up to max_cached_prompts texts)
    "max_cached_prompts": 2000,
    "max_prompts": 0,
    "max_real": 0,
    "encode_batch_size": 8,
    "vae_dtype": "float32",
    "variant": "",
    "eval_prompts": 8,
    "lora_rank": 0,
    # LoRA students (0 = full fine-tuning): rank of the adapters of the generator and the fake score.
    "lora_alpha": 0.0,
    # LoRA scale numerator (alpha / rank); 0 = rank (scale 1).
    "lora_targets": [],
    # Module names (suffixes) the adapters wrap; [] = the attention projections of the family.
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DEFAULT_GUIDANCE = {"sdxl": 5.0, "sd3": 7.0, "flux": 3.5}


# ------------------------------------------------------------------------------------------------------------
# the teacher pipeline


def load_pipeline(teacher: str, family: str, dtype=torch.float32, variant: str = "", **components):
    """The family's diffusers pipeline from a folder or hub id (components=None skips loading one)."""
    import diffusers

    if teacher is None:
        raise ValueError(f"teacher= is required for pipeline {family}: a diffusers folder or hub id of a "
                         f"{FAMILIES[family][0]} (e.g. configs/{_example_config(family)})")
    cls = getattr(diffusers, FAMILIES[family][0])
    try:
        return cls.from_pretrained(teacher, torch_dtype=dtype, **load_kwargs(teacher, variant), **components)
    except OSError as e:
        raise FileNotFoundError(f"cannot load the {family} teacher {teacher!r}: {e}\nDownload it once with "
                                f"`huggingface-cli download {teacher} --local-dir DIR` and pass teacher=DIR") from None


def network_class(family: str):
    import diffusers

    return getattr(diffusers, {"sdxl": "UNet2DConditionModel", "sd3": "SD3Transformer2DModel",
                               "flux": "FluxTransformer2DModel"}[family])


def load_network(teacher: str, family: str, dtype=torch.float32, variant: str = ""):
    """The family's denoising network (UNet / transformer) from the teacher's folder or hub id."""
    try:
        return network_class(family).from_pretrained(teacher, subfolder=FAMILIES[family][1], torch_dtype=dtype,
                                                     **load_kwargs(teacher, variant))
    except OSError as e:
        raise FileNotFoundError(f"cannot load the {family} teacher's {FAMILIES[family][1]} from {teacher!r}: {e}") \
            from None


def _example_config(family):
    return {"sdxl": "sdxl_js.yaml", "sd3": "sd35_medium_js.yaml", "flux": "flux_dev_js.yaml"}[family]


def _network(pipe, family):
    return getattr(pipe, FAMILIES[family][1])


def vae_factor(pipe) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def latent_side(pipe, family: str, resolution: int) -> int:
    net = _network(pipe, family)
    f = vae_factor(pipe)
    if resolution:
        if resolution % (2 * f):
            raise ValueError(f"task.resolution={resolution} must be a multiple of {2 * f} (VAE factor x 2)")
        return resolution // f
    if family == "flux":  # FluxPipeline's default: default_sample_size 128 latents (1024 px)
        return getattr(pipe, "default_sample_size", 128)
    return net.config.sample_size


@torch.no_grad()
def encode_texts(pipe, family: str, texts: Sequence[str], max_sequence_length: int = 0) -> dict:
    """Prompt embeddings exactly as the pipeline computes them, as a dict of [N, ...] float32 tensors on the text
    encoders' device: SDXL {encoder_hidden_states, text_embeds}; SD3 / Flux {encoder_hidden_states,
    pooled_projections}."""
    texts = list(texts)
    kw = {"max_sequence_length": max_sequence_length} if max_sequence_length and family != "sdxl" else {}
    if family == "sdxl":
        pe, _, pooled, _ = pipe.encode_prompt(texts, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": pe.float(), "text_embeds": pooled.float()}
    if family == "sd3":
        pe, _, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False, **kw)
    else:
        pe, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, **kw)
    return {"encoder_hidden_states": pe.float(), "pooled_projections": pooled.float()}


@torch.no_grad()
def encode_uncond(pipe, family: str, max_sequence_length: int = 0) -> dict:
    """The unconditional input of CFG for one sample, as the pipeline builds it (SDXL with
    force_zeros_for_empty_prompt: zeros; SD3: the empty prompt's embeddings)."""
    if family == "sdxl":
        _, npe, _, npp = pipe.encode_prompt([""], do_classifier_free_guidance=True)
        return {"encoder_hidden_states": npe.float(), "text_embeds": npp.float()}
    return encode_texts(pipe, family, [""], max_sequence_length)


def sdxl_time_ids(resolution: int) -> torch.Tensor:
    """SDXL's added time ids (original size, crop top-left, target size) for an uncropped square image [1, 6]."""
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)


def default_lora_targets(family: str) -> list[str]:
    """The attention projections, as diffusers' DreamBooth-LoRA training examples target them."""
    if family == "sdxl":
        return ["to_q", "to_k", "to_v", "to_out.0"]
    # SD3 / Flux joint attention: the image stream's projections and the text stream's
    return ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def make_denoiser(net, family: str, alphas_cumprod=None, feature_modules=None, guidance: float = 3.5):
    if family == "sdxl":
        fm = feature_modules or ["mid_block"]
        return VPUNetDenoiser(net, alphas_cumprod, "epsilon", fm)
    return FlowMatchDenoiser(net, feature_modules or None, guidance=guidance)


# ------------------------------------------------------------------------------------------------------------
# the task


def build(cfg, device) -> Task:
    family = cfg.pipeline
    settings = check_task_keys(cfg.task, DEFAULTS, family)
    grid = FAMILIES[family][2]
    if cfg.noise.grid != grid:
        raise ValueError(f"pipeline {family} uses the teacher's own {'DDPM' if grid == 'vp' else 'flow-matching'} "
                         f"grid: set noise.grid: {grid}")
    if settings["teacher_dtype"] not in _DTYPES or settings["vae_dtype"] not in _DTYPES:
        raise ValueError(f"task.teacher_dtype / task.vae_dtype must be one of {list(_DTYPES)}")
    if not cfg.prompts:
        raise ValueError(f"prompts= is required for {family}: a COCO captions JSON or a text file, one prompt per line")
    if settings["lora_rank"] < 0:
        raise ValueError(f"task.lora_rank must be >= 0 (0 = full fine-tuning), got {settings['lora_rank']}")
    if settings["lora_rank"] and cfg.ema:
        raise ValueError("LoRA students keep no EMA (an EMA would copy the shared base): set ema: []")
    if settings["text_cache"] not in ("auto", "memory", "online"):
        raise ValueError(f"task.text_cache must be auto, memory or online, got {settings['text_cache']!r}")
    device = torch.device(device)
    tdtype = _DTYPES[settings["teacher_dtype"]]
    # the pipeline without its network (text encoders and VAE); the network apart: fp32 for full fine-tuning (the
    # trainable copies start from the exact teacher weights), the teacher's dtype for a LoRA base
    pipe = load_pipeline(cfg.teacher, family, tdtype, settings["variant"], **{FAMILIES[family][1]: None})
    net = load_network(cfg.teacher, family, tdtype if settings["lora_rank"] else torch.float32, settings["variant"])
    guidance = settings["guidance_scale"] or _DEFAULT_GUIDANCE[family]
    lat = latent_side(pipe, family, settings["resolution"])
    res = lat * vae_factor(pipe)
    channels = net.config.in_channels // (4 if family == "flux" else 1)
    latent_shape = (channels, lat, lat)
    fm = list(settings["feature_modules"]) or None

    # noise grid and the generator's level
    if grid == "vp":
        ac = pipe.scheduler.alphas_cumprod.clone()
        sigmas = vp_sigmas(ac)
        if not 0 <= settings["generator_timestep"] < len(ac):
            raise ValueError(f"task.generator_timestep must lie in [0, {len(ac) - 1}]")
        generator_sigma = float(sigmas[settings["generator_timestep"]])
    else:
        ac = None
        sigmas = flow_grid(dict(pipe.scheduler.config), image_seq_len=(lat // 2) ** 2)
        generator_sigma = math.inf  # t = 1: pure noise
    schedule = NoiseSchedule(sigmas, (cfg.noise.dm_index_min, cfg.noise.dm_index_max), generator_sigma=generator_sigma,
                             disc_index_max=cfg.noise.disc_index_max, disc_levels=cfg.noise.disc_levels)

    # networks: fp32 trainable copies (full fine-tuning) or LoRA adapters on one frozen base

    lora = LoraSpec(settings["lora_rank"], settings["lora_alpha"],
                    list(settings["lora_targets"]) or default_lora_targets(family))
    mk = lambda n: make_denoiser(n, family, ac, fm, guidance)  # noqa: E731
    if lora.rank:
        net.to(tdtype)
        # the trainer sees the adapters only, so the base's checkpointing is set here (adapter-aware recompute)
        gen_den, fake, teacher_inner = lora_networks(net, lora, mk, cfg.gradient_checkpointing)
    else:
        gen_den = mk(copy.deepcopy(net).float()).requires_grad_(True).train()
        fake = mk(copy.deepcopy(net).float()).requires_grad_(True).train()
        teacher_inner = freeze(mk(net.to(tdtype)))
    generator = OneStepGenerator(gen_den, generator_sigma, latent_shape)

    for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None), getattr(pipe, "text_encoder_3", None)):
        if m is not None:
            m.to(device).eval().requires_grad_(False)
    pipe.vae.to(device, _DTYPES[settings["vae_dtype"]]).eval().requires_grad_(False)
    msl = settings["max_sequence_length"]
    extra = {"time_ids": sdxl_time_ids(res)} if family == "sdxl" else {}
    uncond = {**encode_uncond(pipe, family, msl), **extra}
    # FLUX.1 is guidance-distilled (its embedding, set above); the others get CFG in x0 space
    teacher = teacher_inner if family == "flux" else CFGDenoiser(teacher_inner, guidance,
                                                                 {k: v.to(device) for k, v in uncond.items()})
    # with LoRA the teacher's base holds the students' adapters too: freeze the base only (done by lora.inject)
    teacher = teacher.eval() if lora.rank else freeze(teacher)

    # the discriminator head from the teacher's feature shapes
    with torch.no_grad():
        mid = float(sigmas[len(sigmas) // 2])
        probe = teacher_inner.to(device)(torch.zeros(1, *latent_shape, device=device), mid,
                                         {k: v.to(device) for k, v in uncond.items()}, mode="features")
    disc = Discriminator.for_feature_shapes([f.shape[1:] for f in probe])

    prompts = task_prompts(cfg.prompts, settings["max_prompts"])
    cache_dir = Path(cfg.out) / "cache"
    if cfg.data:
        cache = Path(settings["latent_cache"]) if settings["latent_cache"] else None
        latents, files = latent_cache(cfg.data, pipe.vae, res, cache, cache_dir, settings["max_real"],
                                      settings["encode_batch_size"], str(cfg.teacher))
        if tuple(latents.shape[1:]) != latent_shape:
            raise ValueError(f"real latents have shape {latents.shape[1:]}, the generator makes {latent_shape}; "
                             "check task.resolution")
        real_caps = _real_caption_table(files, settings["real_captions"], cfg.prompts) if files else \
            [[] for _ in range(len(latents))]
    else:
        warnings.warn(f"{family} without data=: the GAN term sees no real images; pass data=IMAGES_DIR")
        latents, real_caps = None, []
    texts = list(dict.fromkeys(prompts + [c for caps in real_caps for c in caps]))
    text_id = {s: i for i, s in enumerate(texts)}
    prompt_ids = torch.tensor([text_id[s] for s in prompts], dtype=torch.long)
    mode = settings["text_cache"]
    if mode == "auto":
        mode = "memory" if len(texts) <= settings["max_cached_prompts"] else "online"
    bs = settings["encode_batch_size"]

    def _encode(ts):
        out = [encode_texts(pipe, family, ts[i:i + bs], msl) for i in range(0, len(ts), bs)]
        return {k: torch.cat([o[k] for o in out]) for k in out[0]}

    table = None
    if mode == "memory":
        table = {k: v.cpu().half() for k, v in _encode(texts).items()}
        for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None), getattr(pipe, "text_encoder_3", None)):
            if m is not None:  # not needed again: T5-XXL alone is 9.5 GB in bf16
                m.cpu()

    def embed(ids: torch.Tensor, dev) -> dict:
        if table is not None:
            c = {k: v[ids].to(dev, torch.float32) for k, v in table.items()}
        else:
            c = {k: v.to(dev) for k, v in _encode([texts[i] for i in ids.tolist()]).items()}
        if extra:
            c["time_ids"] = extra["time_ids"].to(dev).expand(len(ids), -1)
        return c

    eval_prompts = prompts[:settings["eval_prompts"]]
    eval_ids = prompt_ids[:len(eval_prompts)]

    def _randint(high, n, rng, dev):
        dev = rng.device if rng is not None else dev
        return torch.randint(0, high, (n,), generator=rng, device=dev).cpu()

    def sample_cond(n, rng, dev):
        return embed(prompt_ids[_randint(len(prompt_ids), n, rng, dev)], dev)

    counts = torch.tensor([len(c) for c in real_caps], dtype=torch.long)
    offsets = torch.cumsum(counts, 0) - counts
    cap_ids = torch.tensor([text_id[c] for caps in real_caps for c in caps], dtype=torch.long)

    def sample_real(n, rng, dev):
        if latents is None:
            raise ValueError(f"{family} needs real data for the GAN term: pass data=IMAGES_DIR (or a latents .npy)")
        idx = _randint(len(latents), n, rng, dev)
        order = torch.argsort(idx)
        x = torch.empty((n, *latents.shape[1:]))
        x[order] = torch.from_numpy(np.asarray(latents[idx[order].numpy()], dtype=np.float32))
        u = torch.rand(n, generator=rng, device=rng.device if rng is not None else dev).cpu()
        c = counts[idx]
        ids = prompt_ids[_randint(len(prompt_ids), n, rng, dev)]
        if len(cap_ids):
            j = offsets[idx] + torch.minimum((u * c).long(), (c - 1).clamp(min=0))
            ids = torch.where(c > 0, cap_ids[j.clamp(max=len(cap_ids) - 1)], ids)
        return x.to(dev), embed(ids, dev)

    def evaluate(gen, run_dir, final=False, step=0):

        k = len(eval_prompts)
        z = per_image_latents(range(k), latent_shape, device)
        imgs = []
        with torch.no_grad():
            for i in range(0, k, 8):
                x = gen(z[i:i + 8], embed(eval_ids[i:i + 8], device)).float()
                imgs.append(decode(pipe.vae, x).cpu())
        save_grid(torch.cat(imgs), Path(run_dir) / (f"samples_{step:06d}.png" if not final else
                                                    "samples_student.png"), nrow=min(8, k))
        return {}

    info = {"teacher": str(cfg.teacher), "family": family, "resolution": res, "latent_shape": list(latent_shape),
            "guidance_scale": guidance, "num_prompts": len(prompts), "text_cache": mode, "lora_rank": lora.rank,
            "num_real": 0 if latents is None else len(latents), "eval_prompts": eval_prompts}
    return Task(teacher=teacher, generator=generator, fake_score=fake, discriminator=disc, schedule=schedule,
                sample_cond=sample_cond, sample_real=sample_real, evaluate=evaluate, sigma_data=0.5, info=info)


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> images in [-1, 1]: latents / scaling_factor + shift_factor, as the pipelines do."""
    p = next(vae.parameters())
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    x = vae.decode(latents.to(p.device, p.dtype) / vae.config.scaling_factor + shift, return_dict=False)[0]
    return x.float().clamp(-1, 1)


# ------------------------------------------------------------------------------------------------------------
# export and sampling through the family's own pipeline class


def network_from_checkpoint(ckpt, teacher: str | None = None, which: str = "ema"):
    """(the generator's denoising network with any LoRA merged, the LoRA state dict or None, family, meta)."""

    ckpt = ex.resolve_checkpoint(ckpt)
    meta = ex.checkpoint_meta(ckpt)
    cfg = meta.get("config") or {}
    family = cfg.get("pipeline")
    if family not in FAMILIES:
        raise ValueError(f"{ckpt} is a {family!r} run, not one of {list(FAMILIES)}")
    teacher = teacher or cfg.get("teacher")
    name = ex.weights_name(ckpt, which, cfg)

    sd = load_file(str(Path(ckpt) / f"{name}.safetensors"))
    sub = FAMILIES[family][1]
    net_cls = network_class(family)
    kw = load_kwargs(str(teacher))
    tcfg = cfg.get("task") or {}
    lora_sd = None
    if int(tcfg.get("lora_rank", 0) or 0):  # the teacher's weights + the generator's adapters, merged

        spec = LoraSpec(int(tcfg["lora_rank"]), float(tcfg.get("lora_alpha", 0) or 0))
        lora_sd = adapter_state(sd)
        net = load_network(str(teacher), family, torch.float32, tcfg.get("variant", "") or "")
        merge(net, lora_sd, spec.scale)
        lora_sd = {"adapters": lora_sd, "scale": spec.scale}
    else:
        marker = "denoiser.backbone."
        sd = {k.split(marker, 1)[1]: v for k, v in sd.items() if marker in k}
        net = net_cls.from_config(net_cls.load_config(teacher, subfolder=sub, local_files_only=kw["local_files_only"]))
        net.load_state_dict(sd, strict=True)
    return net, lora_sd, family, {**meta, "weights": name, "teacher": str(teacher)}


def one_step_pipeline(net, family: str, teacher: str, dtype=torch.float32, student_sigmas=None):
    """The teacher's pipeline (text encoders, tokenizers, VAE) around ``net`` with its one-step schedule (a
    few-step student's ``student_sigmas``: its k-step schedule, module docstring)."""
    pipe = load_pipeline(teacher, family, dtype, **{FAMILIES[family][1]: net.to(dtype)})
    k = len(student_sigmas) if student_sigmas else 1
    if family == "sdxl" and k > 1:
        from diffusers import LCMScheduler

        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=k,
                                                  clip_sample=False, thresholding=False)
    elif family == "sdxl":
        from diffusers import DDIMScheduler

        from ..export_sd import ONE_STEP_SCHEDULER

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, **ONE_STEP_SCHEDULER)
    elif k > 1:  # flow: Euler steps that re-noise x0 to the next t, at the student's own (unshifted) times
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config, stochastic_sampling=True, shift=1.0, use_dynamic_shifting=False,
            shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
    return pipe


def few_step_call(family: str, teacher: str, student_sigmas) -> dict:
    """The pipeline-call arguments that run a student: ``num_inference_steps=1``, or a few-step student's
    ``timesteps`` (SDXL's DDPM timesteps) / ``sigmas`` (flow times t = sigma / (1 + sigma))."""
    if not student_sigmas or len(student_sigmas) <= 1:
        return {"num_inference_steps": 1}
    if family == "sdxl":
        from ..export_sd import student_timesteps

        return {"timesteps": student_timesteps(str(teacher), student_sigmas, load_kwargs(str(teacher))["local_files_only"])}
    return {"sigmas": [1.0 if math.isinf(float(s)) else float(s) / (1.0 + float(s)) for s in student_sigmas]}


def export_from_checkpoint(ckpt, out_dir, teacher: str | None = None, which: str = "ema", overwrite: bool = False,
                           lora_only: bool = True, dtype: torch.dtype | None = None) -> Path:
    """Write the generator as the family's diffusers pipeline (LoRA merged; all weights in ``dtype``, default
    float32) plus, for LoRA runs, the adapter weights alone (``lora/``, loadable with the teacher pipeline's
    ``load_lora_weights``)."""
    net, lora_sd, family, meta = network_from_checkpoint(ckpt, teacher, which)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --force or choose another folder")
    sig = meta.get("student_sigmas")  # a few-step student's levels (absent: one step)
    pipe = one_step_pipeline(net, family, meta["teacher"], dtype or torch.float32, sig)
    call = few_step_call(family, meta["teacher"], sig)
    cfg = meta.get("config") or {}
    tcfg = cfg.get("task") or {}
    guidance = float(tcfg.get("guidance_scale") or _DEFAULT_GUIDANCE[family]) if family == "flux" else 1.0
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    if lora_sd is not None and lora_only:

        save_lora_weights(lora_sd["adapters"], FAMILIES[family][1], lora_sd["scale"], tmp / "lora")
    (tmp / "fdistill_export.json").write_text(json.dumps({
        "format": EXPORT_FORMAT, "family": family, "teacher": meta["teacher"],
        "num_inference_steps": len(sig) if sig else 1, "call_kwargs": call,
        "guidance_scale": guidance, "weights": meta["weights"], "gen_step": meta.get("gen_step"),
        "divergence": cfg.get("divergence"), "latent_shape": _latent_shape(pipe, family, tcfg),
        "max_sequence_length": int(tcfg.get("max_sequence_length", 0) or 0),
        "lora": lora_sd is not None,
        "usage": f"{FAMILIES[family][0]}.from_pretrained(folder)(prompt, "
                 f"{', '.join(f'{k}={v}' for k, v in call.items())}, "
                 f"guidance_scale={guidance}" + ("" if family == "sdxl" or not tcfg.get("max_sequence_length") else
                                                 f", max_sequence_length={tcfg['max_sequence_length']}") + ")"},
        indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def flow_few_step_image(pipe, prompt: str, latent: torch.Tensor, seed: int, kw: dict):
    """One image of a few-step flow student (SD3 / FLUX.1) through its stock pipeline. Those pipelines do not hand
    their ``generator`` to the scheduler's step, so the re-noising noise comes from torch's global stream: it is
    seeded seed + 2**32 for this one image (on CPU the same noise as the image's own stream elsewhere), and the
    global state is restored afterwards."""
    devices = [latent.device] if latent.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + RENOISE_SEED_OFFSET)
        return pipe([prompt], latents=latent, **kw).images


def _latent_shape(pipe, family, tcfg):
    lat = latent_side(pipe, family, int(tcfg.get("resolution", 0) or 0))
    c = _network(pipe, family).config.in_channels // (4 if family == "flux" else 1)
    return [c, lat, lat]


def sample_source(source, which: str = "ema", teacher: str | None = None, device=None, dtype=torch.float32):
    """A ``fdistill sample`` source for an exported folder or a run / checkpoint of these pipelines."""

    p = Path(source)
    if (p / "model_index.json").is_file():
        meta = json.loads((p / "fdistill_export.json").read_text())
        family = meta["family"]
        pipe = load_pipeline(str(p), family, dtype)
        info = {"source": str(p.resolve()), "weights": meta.get("weights"), "gen_step": meta.get("gen_step")}
        shape, guidance = tuple(meta["latent_shape"]), meta["guidance_scale"]
        msl = meta.get("max_sequence_length", 0)
        call = meta.get("call_kwargs") or {"num_inference_steps": 1}  # older exports: one step
    else:
        net, _, family, meta = network_from_checkpoint(p, teacher, which)
        pipe = one_step_pipeline(net, family, meta["teacher"], dtype, meta.get("student_sigmas"))
        call = few_step_call(family, meta["teacher"], meta.get("student_sigmas"))
        tcfg = (meta.get("config") or {}).get("task") or {}
        shape = tuple(_latent_shape(pipe, family, tcfg))
        guidance = float(tcfg.get("guidance_scale") or _DEFAULT_GUIDANCE[family]) if family == "flux" else 1.0
        msl = int(tcfg.get("max_sequence_length", 0) or 0)
        info = {"source": str(p.resolve()), "weights": meta["weights"], "gen_step": meta.get("gen_step")}
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    side = shape[-1] * vae_factor(pipe)
    # the T5 length the generator was trained with (padding tokens change T5's states)
    extra = {"max_sequence_length": msl} if msl and family != "sdxl" else {}

    few = "num_inference_steps" not in call

    def generate(seeds, records):
        z = per_image_latents(seeds, shape, device).to(dtype)
        if family == "flux":
            z = pack_latents(z)
        prompts = [r["prompt"] for r in records]
        kw = dict(guidance_scale=guidance, height=side, width=side, output_type="np", **call, **extra)
        with torch.no_grad():
            if few and family != "sdxl":
                imgs = np.concatenate([flow_few_step_image(pipe, p, z[i:i + 1], int(s), kw)
                                       for i, (p, s) in enumerate(zip(prompts, seeds))])
            else:
                # a few-step student re-noises each image from its own stream (seed + 2**32), as the others do
                gens = [torch.Generator().manual_seed(int(s) + RENOISE_SEED_OFFSET) for s in seeds] if few else None
                imgs = pipe(prompts, latents=z, generator=gens, **kw).images
        return (np.clip(imgs, 0, 1) * 255).round().astype(np.uint8)

    k = len(next(iter(call.values()))) if few else 1
    return SampleSource("sd", generate, 0, {**info, "steps": k, "guidance": guidance})


__all__ = ["FAMILIES", "build", "encode_texts", "export_from_checkpoint", "sample_source", "load_pipeline",
           "decode"]
