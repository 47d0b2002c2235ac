"""Text-to-image distillation of a Stable Diffusion teacher (SD1.5: the paper's MS-COCO experiment).

Teacher: a diffusers SD folder or hub id (unet, vae, text_encoder, tokenizer, scheduler subfolders). Its UNet is
a VP epsilon (or v) model behind ``VPUNetDenoiser``, guided with classifier-free guidance in x0 space
(``CFGDenoiser``, the empty prompt as the unconditional input). The generator and the fake score start as fp32
copies of its UNet; the generator is evaluated once at timestep 999 on N(0, I) latents.

Noise levels: the teacher's own DDPM grid (T = 1000, ``vp_sigmas(alphas_cumprod)``); the distribution-matching term
draws timesteps uniformly in [noise.dm_index_min, noise.dm_index_max]: 1..998 with ``recipe: fastgen`` (FastGen's
floor(1000 t), t ~ U[0.001, 0.999]; its UNet is told the integer timestep, FastGen's the real-valued 1000 t), where
the fake score's loss is an unweighted x0 MSE at the same draws; 20..980 with ``recipe: dmd2``, where it is an
epsilon MSE over all 1000 timesteps. ``task.text_mask`` masks the prompts' padding tokens in cross-attention
(FastGen's SD15 network; the recipe decides).

Prompts (``prompts=``): a COCO captions JSON (2014 format: every caption is a prompt), a text file with one prompt
per line, or a JSON list. They are embedded once by the teacher's CLIP text encoder (its last hidden state, as
StableDiffusionPipeline does) and kept in memory, or in a float16 .npy memmap on disk, or - for very large prompt
sets - embedded per batch (``task.text_cache``).

Real data (``data=``) for the GAN term: a folder of images (searched recursively), resized on the short side and
centre-cropped to the resolution, encoded once by the VAE (posterior mean x scaling factor) into a float16 .npy
memmap that later runs reuse; or a .npy of such latents [N, C, h, w]. The teacher judges a real latent with its
own caption where one is known (a COCO captions JSON matched on file names, or a text file with one caption per
image in sorted order), otherwise with a random training prompt.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..denoisers import freeze
from ..denoisers_vp import CFGDenoiser, VPUNetDenoiser
from ..discriminator import Discriminator
from ..generator import OneStepGenerator
from ..hub import load_kwargs
from ..imageio import save_grid
from ..noise import NoiseSchedule, vp_sigmas
from ..prompts import coco_captions_by_file, read_prompts
from ..sampler import per_image_latents
from ..utils import DTYPES, IMAGE_EXTENSIONS, atomic_npy, barrier, is_local_writer
from ..task import Task, check_task_keys

DEFAULTS = {
    "teacher_dtype": "bfloat16",
    # Frozen teacher UNet precision (paper: bf16); the trainable copies are fp32 either way.
    "guidance_scale": 1.75,
    # CFG of the teacher in x0 space (paper: 1.75; also 5).
    "prediction_type": "",
    # '' = the teacher scheduler's (SD1.5: epsilon; SD2.x-768: v_prediction).
    "generator_timestep": 999,
    # The one-step generator's timestep (SD: 999 on N(0, I) latents).
    "resolution": 0,
    # Image side for the real data; 0 = unet.sample_size x the VAE's downsampling factor (512 for SD1.5).
    "latent_cache": "",
    # .npy of the real images' VAE latents; '' = <out>/cache/latents-<key>.npy.
    "real_captions": "",
    # Captions of the real images: COCO JSON (by file name) or .txt (one per image, sorted order); '' = prompts
    # when it is a COCO JSON naming the images, else random prompts.
    "text_cache": "auto",
    # memory | disk | online | auto (memory up to max_cached_prompts prompts, online above).
    "max_cached_prompts": 20000,
    "text_cache_dir": "",
    # Where text_cache=disk writes its .npy; '' = <out>/cache.
    "max_prompts": 0,
    # Use the first N prompts only (0 = all).
    "max_real": 0,
    # Use the first N real images only (sorted; 0 = all).
    "encode_batch_size": 16,
    "vae_dtype": "float32",
    "xformers": False,
    # xformers attention in all three UNets (pip install xformers; CUDA only).
    "variant": "",
    # Weight variant of the teacher folder (e.g. 'fp16'); '' = the default files.
    "eval_prompts": 16,
    # Prompts in the sample grid written every log.sample_every steps and at the end.
    "feature_modules": ["mid_block"],
    # Teacher modules whose outputs feed the discriminator (SD1.5 mid block: 1280 x 8 x 8 at 64x64 latents).
    "text_mask": False,
    # Mask the prompts' padding tokens in the UNets' cross-attention (FastGen's SD15 network passes the tokenizer's
    # attention mask as encoder_attention_mask); False = stock SD1.5, which attends to them. Set by `recipe`.
}

# ------------------------------------------------------------------------------------------------------------
# prompts (read by fdistill.prompts; the hub and cache helpers are fdistill.hub and fdistill.utils)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """CLIP last hidden states [N, L, D] (float32, on the encoder's device), exactly as StableDiffusionPipeline's
    encode_prompt computes them: padded to model_max_length, truncated, attention mask only if the encoder's config
    asks for one."""
    device = next(text_encoder.parameters()).device
    use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
    out = []
    for i in range(0, len(prompts), batch_size):
        tok = tokenizer(list(prompts[i:i + batch_size]), padding="max_length",
                        max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
        mask = tok.attention_mask.to(device) if use_mask else None
        out.append(text_encoder(tok.input_ids.to(device), attention_mask=mask)[0].float())
    return torch.cat(out)


def token_lengths(tokenizer, texts: Sequence[str], chunk: int = 4096) -> torch.Tensor:
    """Tokens of each text that are not padding (BOS and EOS included), as the SD tokenizer pads them."""
    out = []
    for i in range(0, len(texts), chunk):
        tok = tokenizer(list(texts[i:i + chunk]), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
        out.append(tok.attention_mask.sum(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def text_mask(lengths: torch.Tensor, max_length: int, device) -> torch.Tensor:
    """[N, max_length] cross-attention mask (1 = attend) from token lengths."""
    return (torch.arange(max_length, device=device)[None, :] < lengths.to(device)[:, None]).float()


class PromptBank:
    """Text embeddings of a fixed list of texts, computed once (memory / disk) or per batch (online)."""

    def __init__(self, texts: list[str], tokenizer, text_encoder, mode: str = "memory",
                 cache_path: Path | None = None, batch_size: int = 64):
        if mode not in ("memory", "disk", "online"):
            raise ValueError(f"task.text_cache must be memory, disk, online or auto, got {mode!r}")
        self.texts, self.mode = texts, mode
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.batch_size = batch_size
        self.table = None
        if mode == "memory":
            # float16 storage: half the host memory, relative rounding 5e-4 (CLIP states are |x| < ~30)
            self.table = torch.cat([encode_prompts(tokenizer, text_encoder, texts[i:i + 4096], batch_size).cpu()
                                    .half() for i in range(0, len(texts), 4096)])
        elif mode == "disk":
            if not cache_path.is_file() and is_local_writer():
                probe = encode_prompts(tokenizer, text_encoder, texts[:1])

                def fill(arr):
                    for i in range(0, len(texts), 4096):
                        e = encode_prompts(tokenizer, text_encoder, texts[i:i + 4096], batch_size)
                        arr[i:i + len(e)] = e.cpu().half().numpy()
                atomic_npy(cache_path, (len(texts), *probe.shape[1:]), np.float16, fill)
            barrier()  # every process, whether or not it wrote (a conditional barrier can deadlock)
            self.table = np.load(cache_path, mmap_mode="r")
            if len(self.table) != len(texts):
                raise ValueError(f"{cache_path} holds {len(self.table)} embeddings, expected {len(texts)}; delete it")
        if mode != "online":
            self.text_encoder = None  # no longer needed on the device

    def __len__(self):
        return len(self.texts)

    def get(self, ids: torch.Tensor, device) -> torch.Tensor:
        ids = ids.cpu()
        if self.mode == "memory":
            e = self.table[ids]
        elif self.mode == "disk":
            e = torch.from_numpy(np.ascontiguousarray(self.table[ids.numpy()]))
        else:
            return encode_prompts(self.tokenizer, self.text_encoder, [self.texts[i] for i in ids.tolist()],
                                  self.batch_size).to(device)
        return e.to(device, non_blocking=True).float()


# ------------------------------------------------------------------------------------------------------------
# real images -> VAE latents


def list_images(root: str | os.PathLike) -> list[str]:
    """Image files under ``root`` (recursive), as sorted posix paths relative to it."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image(path, resolution: int) -> torch.Tensor:
    """RGB image -> [3, R, R] float in [-1, 1]: short side resized to R (bicubic, antialiased), centre crop."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = resolution / min(w, h)
        im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    return x.float() / 127.5 - 1


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> model-space latents: (posterior mean - shift_factor) x scaling_factor, as the diffusers
    pipelines scale them (SD3 / Flux VAEs have a shift factor); deterministic, so the cache is too."""
    p = next(vae.parameters())
    dist = vae.encode(images.to(p.device, p.dtype)).latent_dist
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (dist.mean.float() - shift) * vae.config.scaling_factor


def latent_cache(data: str, vae, resolution: int, cache_path: Path | None, cache_dir: Path, max_real: int = 0,
                 batch_size: int = 16, teacher_id: str = "") -> tuple[np.ndarray, list[str]]:
    """(latents memmap [N, C, h, w] float16, file names). Encodes ``data`` once; later calls read the cache."""
    src = Path(data)
    if src.suffix == ".npy":
        arr = np.load(src, mmap_mode="r")
        meta = src.with_suffix(".json")
        files = json.loads(meta.read_text())["files"] if meta.is_file() else []
        return arr, files
    if not src.is_dir():
        raise FileNotFoundError(f"data={data}: expected a folder of images (e.g. COCO train2014/) or a .npy of "
                                "VAE latents")
    files = list_images(src)
    if max_real:
        files = files[:max_real]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {src}")
    key = hashlib.sha1(json.dumps([str(src.resolve()), len(files), files[0], files[-1], resolution, teacher_id,
                                   float(vae.config.scaling_factor)]).encode()).hexdigest()[:12]
    path = Path(cache_path) if cache_path else cache_dir / f"latents-{key}.npy"
    meta_path = path.with_suffix(".json")
    if not path.is_file() and is_local_writer():

        h = resolution // (2 ** (len(vae.config.block_out_channels) - 1))
        shape = (len(files), vae.config.latent_channels, h, h)

        def fill(arr):
            for i in tqdm(range(0, len(files), batch_size), desc=f"VAE-encoding {src.name}", unit="batch",
                          disable=len(files) <= batch_size):
                x = torch.stack([load_image(src / f, resolution) for f in files[i:i + batch_size]])
                arr[i:i + len(x)] = encode_images(vae, x).cpu().half().numpy()
        # the file list first: whoever sees the .npy can rely on it
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps({"data": str(src.resolve()), "files": files, "resolution": resolution,
                                         "teacher": teacher_id, "encoding": "vae posterior mean x scaling_factor",
                                         "dtype": "float16"}))
        atomic_npy(path, shape, np.float16, fill)
    barrier()
    arr = np.load(path, mmap_mode="r")
    if len(arr) != len(files):
        raise ValueError(f"latent cache {path} holds {len(arr)} latents but {src} has {len(files)} images; delete the "
                         "cache (or set task.latent_cache to another path)")
    return arr, files


def _real_caption_table(files: list[str], real_captions: str, prompts_path: str | None):
    """Per real image, its captions (list of lists; empty = unknown)."""
    if real_captions:
        p = Path(real_captions)
        if p.suffix.lower() == ".json":
            by_file = coco_captions_by_file(p)
            return [by_file.get(Path(f).name, []) for f in files]
        caps = read_prompts(p)
        if len(caps) != len(files):
            raise ValueError(f"task.real_captions={p} has {len(caps)} captions for {len(files)} images")
        return [[c] for c in caps]
    if prompts_path and Path(prompts_path).suffix.lower() == ".json" and files:
        data = json.loads(Path(prompts_path).read_text())
        if isinstance(data, dict) and "images" in data:
            by_file = coco_captions_by_file(prompts_path)
            table = [by_file.get(Path(f).name, []) for f in files]
            if any(table):
                return table
    return [[] for _ in files]


# ------------------------------------------------------------------------------------------------------------
# teacher


def load_teacher_parts(teacher: str, variant: str = ""):
    """(unet fp32, scheduler config dict, vae, text_encoder, tokenizer) of an SD-family folder or hub id."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    if teacher is None:
        raise ValueError("teacher= is required: a diffusers Stable Diffusion folder or hub id, e.g. "
                         "stable-diffusion-v1-5/stable-diffusion-v1-5 (see docs/sd.md)")
    kw = load_kwargs(teacher, variant)
    try:
        unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet", torch_dtype=torch.float32, **kw)
        sched = DDPMScheduler.from_pretrained(teacher, subfolder="scheduler", local_files_only=kw["local_files_only"])
        vae = AutoencoderKL.from_pretrained(teacher, subfolder="vae", torch_dtype=torch.float32, **kw)
        text_encoder = CLIPTextModel.from_pretrained(teacher, subfolder="text_encoder", torch_dtype=torch.float32,
                                                     **kw)
        tokenizer = CLIPTokenizer.from_pretrained(teacher, subfolder="tokenizer",
                                                  local_files_only=kw["local_files_only"])
    except OSError as e:
        raise FileNotFoundError(
            f"cannot load the Stable Diffusion teacher {teacher!r}: {e}\nDownload it once with "
            "`huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir SD15` and pass "
            "teacher=SD15 (docs/sd.md).") from None
    return unet, sched, vae, text_encoder, tokenizer


def vae_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """SD latents -> images in [-1, 1] (float32)."""
    p = next(vae.parameters())
    x = vae.decode(latents.to(p.device, p.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return x.float().clamp(-1, 1)


# ------------------------------------------------------------------------------------------------------------
# the task


def task_prompts(path, max_prompts: int) -> list[str]:
    """The training prompts of a text-to-image task: ``path`` read by the one prompt reader, the first
    ``max_prompts`` of them (0: all); an empty list is an error."""
    prompts = read_prompts(path)
    if max_prompts:
        prompts = prompts[:max_prompts]
    if not prompts:
        raise ValueError(f"no prompts in {path}")
    return prompts


def build(cfg, device) -> Task:
    settings = check_task_keys(cfg.task, DEFAULTS, "coco_t2i")
    if cfg.noise.grid != "vp":
        raise ValueError("pipeline coco_t2i uses the teacher's DDPM grid: set noise.grid: vp")
    if settings["teacher_dtype"] not in DTYPES or settings["vae_dtype"] not in DTYPES:
        raise ValueError(f"task.teacher_dtype / task.vae_dtype must be one of {list(DTYPES)}")
    if not cfg.prompts:
        raise ValueError("prompts= is required for coco_t2i: a COCO captions JSON or a text file, one prompt per line")
    device = torch.device(device)
    unet, sched, vae, text_encoder, tokenizer = load_teacher_parts(cfg.teacher, settings["variant"])
    pred = settings["prediction_type"] or sched.config.prediction_type
    ac = sched.alphas_cumprod.clone()
    T = len(ac)
    if not 0 <= settings["generator_timestep"] < T:
        raise ValueError(f"task.generator_timestep must lie in [0, {T - 1}]")
    sigmas = vp_sigmas(ac)
    schedule = NoiseSchedule(sigmas, (cfg.noise.dm_index_min, cfg.noise.dm_index_max),
                             generator_sigma=float(sigmas[settings["generator_timestep"]]), time="index",
                             disc_index_max=cfg.noise.disc_index_max, disc_levels=cfg.noise.disc_levels)
    fm = list(settings["feature_modules"])

    # Generator and fake score: fp32 copies of the teacher (paper s.4), made before the teacher is cast to bf16.
    gen_den = VPUNetDenoiser(copy.deepcopy(unet), ac, pred, fm).requires_grad_(True).train()
    fake = VPUNetDenoiser(copy.deepcopy(unet), ac, pred, fm).requires_grad_(True).train()
    teacher_vp = freeze(VPUNetDenoiser(unet.to(DTYPES[settings["teacher_dtype"]]), ac, pred, fm))
    if settings["xformers"]:
        try:
            for net in (gen_den, fake, teacher_vp):
                net.unet.enable_xformers_memory_efficient_attention()
        except Exception as e:
            raise RuntimeError(f"task.xformers=true but xformers attention is unavailable ({e}); pip install "
                               "xformers (CUDA only) or set task.xformers=false (PyTorch SDPA is used then)") from e

    res = settings["resolution"] or unet.config.sample_size * vae_factor(vae)
    if res % vae_factor(vae):
        raise ValueError(f"task.resolution={res} must be a multiple of the VAE factor {vae_factor(vae)}")
    lat = res // vae_factor(vae)
    generator = OneStepGenerator(gen_den, schedule.generator_sigma, (unet.config.in_channels, lat, lat))

    text_encoder.to(device).eval().requires_grad_(False)
    vae.to(device, DTYPES[settings["vae_dtype"]]).eval().requires_grad_(False)
    uncond = encode_prompts(tokenizer, text_encoder, [""])
    max_len = tokenizer.model_max_length
    if not isinstance(settings["text_mask"], bool):
        raise ValueError(f"task.text_mask must be true or false, got {settings['text_mask']!r}")
    uncond_cond = {"encoder_hidden_states": uncond}
    if settings["text_mask"]:  # the empty prompt's BOS and EOS only
        uncond_cond["encoder_attention_mask"] = text_mask(token_lengths(tokenizer, [""]), max_len, uncond.device)
    teacher = freeze(CFGDenoiser(teacher_vp, settings["guidance_scale"], uncond_cond))

    # The discriminator head is built from the teacher's feature shapes (same init on every process: the trainer
    # seeded the global RNG; nothing process-dependent has drawn from it yet).
    with torch.no_grad():
        probe = teacher_vp.to(device)(torch.zeros(1, unet.config.in_channels, lat, lat, device=device),
                                      sigmas[T // 2:T // 2 + 1].to(device), uncond, mode="features")
    disc = Discriminator.for_feature_shapes([f.shape[1:] for f in probe])

    # prompts and the real images' captions, embedded once
    prompts = task_prompts(cfg.prompts, settings["max_prompts"])
    cache_dir = Path(cfg.out) / "cache"
    if cfg.data:
        cache = Path(settings["latent_cache"]) if settings["latent_cache"] else None
        latents, files = latent_cache(cfg.data, vae, res, cache, cache_dir, settings["max_real"],
                                      settings["encode_batch_size"], str(cfg.teacher))
        if latents.shape[1:] != (unet.config.in_channels, lat, lat):
            raise ValueError(f"real latents have shape {latents.shape[1:]}, the generator makes "
                             f"{(unet.config.in_channels, lat, lat)}; check task.resolution")
        real_caps = _real_caption_table(files, settings["real_captions"], cfg.prompts) if files else \
            [[] for _ in range(len(latents))]
    else:
        warnings.warn("coco_t2i without data=: the GAN term sees no real images (the discriminator then has "
                      "nothing to compare with); pass data=IMAGES_DIR")
        latents, real_caps = None, []
    texts = list(dict.fromkeys(prompts + [c for caps in real_caps for c in caps]))
    text_id = {s: i for i, s in enumerate(texts)}
    prompt_ids = torch.tensor([text_id[s] for s in prompts], dtype=torch.long)
    counts = torch.tensor([len(c) for c in real_caps], dtype=torch.long)
    offsets = torch.cumsum(counts, 0) - counts
    cap_ids = torch.tensor([text_id[c] for caps in real_caps for c in caps], dtype=torch.long)
    n_paired = int((counts > 0).sum())
    if latents is not None and n_paired < len(latents):
        warnings.warn(f"{len(latents) - n_paired} of {len(latents)} real images have no caption; the teacher judges "
                      "them with random training prompts (pass task.real_captions=... to pair them)")

    mode = settings["text_cache"]
    if mode == "auto":
        mode = "memory" if len(texts) <= settings["max_cached_prompts"] else "online"
    key = hashlib.sha1(json.dumps([texts[:1000], len(texts), str(cfg.teacher)]).encode()).hexdigest()[:12]
    bank = PromptBank(texts, tokenizer, text_encoder, mode,
                      Path(settings["text_cache_dir"] or cache_dir) / f"text-{key}.npy", settings["encode_batch_size"])
    eval_prompts = prompts[:settings["eval_prompts"]]
    eval_cond = encode_prompts(tokenizer, text_encoder, eval_prompts)
    lengths = token_lengths(tokenizer, texts) if settings["text_mask"] else None
    eval_lengths = token_lengths(tokenizer, eval_prompts) if settings["text_mask"] else None
    if mode != "online":
        text_encoder.cpu()

    def _randint(high, n, rng, dev):
        dev = rng.device if rng is not None else dev
        return torch.randint(0, high, (n,), generator=rng, device=dev).cpu()

    def cond_of(ids, dev):
        c = {"encoder_hidden_states": bank.get(ids, dev)}
        if lengths is not None:
            c["encoder_attention_mask"] = text_mask(lengths[ids], max_len, dev)
        return c

    def sample_cond(n, rng, dev):
        ids = prompt_ids[_randint(len(prompt_ids), n, rng, dev)]
        return cond_of(ids, dev)

    def sample_real(n, rng, dev):
        if latents is None:
            raise ValueError("coco_t2i needs real data for the GAN term: pass data=IMAGES_DIR (or a latents .npy)")
        idx = _randint(len(latents), n, rng, dev)
        order = torch.argsort(idx)  # read the memmap in file order
        x = torch.empty((n, *latents.shape[1:]))
        x[order] = torch.from_numpy(np.asarray(latents[idx[order].numpy()], dtype=np.float32))
        u = torch.rand(n, generator=rng, device=rng.device if rng is not None else dev).cpu()
        c = counts[idx]
        ids = prompt_ids[_randint(len(prompt_ids), n, rng, dev)]
        if len(cap_ids):  # a caption of the image itself, uniformly among its captions
            j = offsets[idx] + torch.minimum((u * c).long(), (c - 1).clamp(min=0))
            ids = torch.where(c > 0, cap_ids[j.clamp(max=len(cap_ids) - 1)], ids)
        return x.to(dev), cond_of(ids, dev)

    def evaluate(gen, run_dir, final=False, step=0):

        k = len(eval_prompts)
        z = per_image_latents(range(k), generator.latent_shape, device)
        imgs = []
        with torch.no_grad():
            for i in range(0, k, 8):
                c = {"encoder_hidden_states": eval_cond[i:i + 8].to(device)}
                if lengths is not None:
                    c["encoder_attention_mask"] = text_mask(eval_lengths[i:i + 8], max_len, device)
                x = gen(z[i:i + 8], c).float()
                imgs.append(decode(vae, x).cpu())
        save_grid(torch.cat(imgs), Path(run_dir) / (f"samples_{step:06d}.png" if not final else
                                                    "samples_student.png"), nrow=min(8, k))
        return {}

    info = {"teacher": str(cfg.teacher), "prediction_type": pred, "resolution": res, "latent_shape": [
        unet.config.in_channels, lat, lat], "num_prompts": len(prompts), "num_real": 0 if latents is None else
        len(latents), "real_paired": n_paired, "text_cache": mode, "vae": vae, "tokenizer": tokenizer,
        "eval_prompts": eval_prompts}
    return Task(teacher=teacher, generator=generator, fake_score=fake, discriminator=disc, schedule=schedule,
                sample_cond=sample_cond, sample_real=sample_real, evaluate=evaluate, sigma_data=0.5, info=info)
