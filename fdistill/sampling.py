"""Sampling: the one-step generator, and the teacher's multi-step EDM sampler (the baseline).

The EDM sampler is Heun's 2nd-order method on the probability-flow ODE over the Karras sigma steps
(Karras et al. 2022, Algorithm 1, deterministic: S_churn = 0), costing 2 * num_steps - 1 network evaluations.
"""

from __future__ import annotations

import torch

from .noise import edm_sampler_sigmas


@torch.no_grad()
def edm_sample(denoiser, latents: torch.Tensor, cond=None, num_steps: int = 18, sigma_min: float = 0.002,
               sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """x ~ teacher, starting from x = sigma_max * latents. Returns x0 in the data space."""
    t_steps = edm_sampler_sigmas(num_steps, sigma_min, sigma_max, rho).to(latents.device)
    x = latents.float() * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        d_cur = (x - denoiser(x, t_cur.expand(x.shape[0]), cond).float()) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if i < num_steps - 1:  # Heun correction, except at the last step (to sigma = 0)
            d_next = (x_next - denoiser(x_next, t_next.expand(x.shape[0]), cond).float()) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x


def edm_nfe(num_steps: int) -> int:
    return 2 * num_steps - 1


@torch.no_grad()
def one_step_sample(generator, latents: torch.Tensor, cond=None) -> torch.Tensor:
    return generator(latents, cond).float()


def per_image_latents(seeds, shape, device="cpu") -> torch.Tensor:
    """One latent per seed, each from its own generator: the same seed gives the same image whatever the batch."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float NCHW -> uint8 NHWC (EDM's convention)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_grid(images: torch.Tensor, path, nrow: int = 10, pad: int = 2, titles: list[str] | None = None):
    """Save [-1, 1] NCHW images as one PNG grid; several grids side by side if ``images`` is a list."""
    from PIL import Image, ImageDraw

    groups = images if isinstance(images, (list, tuple)) else [images]
    tiles = []
    for g in groups:
        u8 = to_uint8(g).numpy()
        n, h, w, c = u8.shape
        rows = (n + nrow - 1) // nrow
        canvas = Image.new("RGB", (nrow * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
        for i in range(n):
            im = Image.fromarray(u8[i, :, :, 0] if c == 1 else u8[i], "L" if c == 1 else "RGB").convert("RGB")
            canvas.paste(im, (pad + (i % nrow) * (w + pad), pad + (i // nrow) * (h + pad)))
        tiles.append(canvas)
    scale = max(1, 256 // max(t.width for t in tiles))
    tiles = [t.resize((t.width * scale, t.height * scale), Image.NEAREST) for t in tiles]
    top = 16 if titles else 0
    W = sum(t.width for t in tiles) + 8 * (len(tiles) - 1)
    H = max(t.height for t in tiles) + top
    out = Image.new("RGB", (W, H), (255, 255, 255))
    xoff = 0
    draw = ImageDraw.Draw(out)
    for i, t in enumerate(tiles):
        out.paste(t, (xoff, top))
        if titles:
            draw.text((xoff + 2, 2), titles[i], fill=(0, 0, 0))
        xoff += t.width + 8
    out.save(path)
    return out


# ------------------------------------------------------------------------------------------------------------
# `fdistill sample`: N images from a run directory, a checkpoint or an exported folder
#
# Image i has seed s_i; its latent comes from torch.Generator().manual_seed(s_i) alone, so a seed gives the same
# image whatever the batch size and whichever images were generated before (resumption).


def per_image_random_labels(seeds, shape, num_classes: int) -> torch.Tensor:
    """EDM's random class labels (generate.py): each seed's own generator draws the latent, then the label, so a
    label depends on its seed only."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        torch.randn(shape, generator=g)  # the latent comes first from the same stream
        out.append(int(torch.randint(0, num_classes, (), generator=g)))
    return torch.tensor(out, dtype=torch.long)


def parse_int_list(spec: str, what: str = "seeds") -> list[int]:
    """'0-999', '3,5', '0-9,20' -> integers (ranges inclusive, as EDM's --seeds)."""
    out = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                lo, hi = int(lo), int(hi)
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"--{what} {spec!r}: expected comma-separated non-negative integers or ranges "
                             "such as 0-999,2000") from None
    if not out:
        raise ValueError(f"--{what} {spec!r} is empty")
    return out


class SampleSource:
    """What `fdistill sample` draws from: ``generate(seeds, records) -> uint8 NHWC`` where a record is
    {'label': int}, {'prompt': str} or {}. ``info`` identifies the weights (checked when resuming)."""

    def __init__(self, kind: str, generate, num_classes: int, info: dict, latent_shape=None):
        self.kind, self.generate, self.num_classes, self.info = kind, generate, num_classes, info
        self.latent_shape = latent_shape


def _sd_source(pipe, info: dict, steps: int, guidance: float, device, dtype) -> SampleSource:
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    lat = pipe.unet.config.sample_size
    shape = (pipe.unet.config.in_channels, lat, lat)

    def generate(seeds, records):
        import numpy as np

        z = per_image_latents(seeds, shape, device).to(dtype)  # as `fdistill eval coco` does
        with torch.no_grad():
            imgs = pipe([r["prompt"] for r in records], num_inference_steps=steps, guidance_scale=guidance,
                        latents=z, output_type="np").images
        return (np.clip(imgs, 0, 1) * 255).round().astype(np.uint8)

    return SampleSource("sd", generate, 0, {**info, "steps": steps, "guidance": guidance})


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
    import json
    from pathlib import Path

    from . import export as ex

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    p = Path(source)
    if (p / "model_index.json").is_file():
        if which != "ema" or teacher is not None:
            raise ValueError(f"{p} is an exported folder: --which and --teacher apply to checkpoints only")
        cls = json.loads((p / "model_index.json").read_text()).get("_class_name")
        meta_path = p / ex.EXPORT_META
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        info = {"source": str(p.resolve()), "class": cls, "weights": meta.get("weights"),
                "gen_step": meta.get("gen_step")}
        if cls == "OneStepPipeline":
            return _edm_source(ex.load_exported(p), info, device, dtype)
        from .pipelines import diffusers_t2i as t2i
        if cls in t2i.PIPELINE_CLASSES and meta.get("format") == t2i.EXPORT_FORMAT:  # SDXL / SD3 / Flux exports
            return t2i.sample_source(p, device=device, dtype=dtype)
        if cls == "StableDiffusionPipeline":
            from diffusers import StableDiffusionPipeline

            if steps is None:
                steps = meta.get("num_inference_steps")
                if steps is None:
                    raise ValueError(f"{p} is not a one-step fdistill export: pass --steps (and --guidance) for it")
            guidance = meta.get("guidance_scale", 1.0) if guidance is None else guidance
            pipe = StableDiffusionPipeline.from_pretrained(str(p), torch_dtype=dtype, local_files_only=True)
            return _sd_source(pipe, info, steps, guidance, device, dtype)
        raise ValueError(f"{p} holds a {cls}; `fdistill sample` reads OneStepPipeline and StableDiffusionPipeline "
                         "folders, run directories and ckpt-<step> folders")
    ckpt = ex.resolve_checkpoint(p)
    cfg = ex.checkpoint_meta(ckpt).get("config") or {}
    pipeline = cfg.get("pipeline")
    if pipeline in ex.EDM_PIPELINES:
        pipe = ex.pipeline_from_checkpoint(ckpt, which, teacher)
        return _edm_source(pipe, dict(pipe.fdistill_source, source=str(ckpt.resolve())), device, dtype)
    if pipeline in ("sdxl", "sd3", "flux"):
        from .pipelines.diffusers_t2i import sample_source
        return sample_source(ckpt, which, teacher, device, dtype)
    if pipeline in ex.SD_PIPELINES:
        from diffusers import StableDiffusionPipeline
        from transformers import CLIPTextModel, CLIPTokenizer

        from diffusers import AutoencoderKL

        from .export_sd import one_step_scheduler, unet_from_checkpoint
        from .pipelines.coco_t2i import load_kwargs

        unet, meta = unet_from_checkpoint(ckpt, teacher, which)
        tdir = teacher or cfg["teacher"]
        kw = load_kwargs(str(tdir))
        # the exported folder's pipeline, in memory: the teacher's VAE and text encoder, the one-step scheduler
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL.from_pretrained(tdir, subfolder="vae", **kw),
            text_encoder=CLIPTextModel.from_pretrained(tdir, subfolder="text_encoder", **kw),
            tokenizer=CLIPTokenizer.from_pretrained(tdir, subfolder="tokenizer",
                                                    local_files_only=kw["local_files_only"]),
            unet=unet, scheduler=one_step_scheduler(str(tdir), kw["local_files_only"]), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False).to(dtype=dtype)
        info = {"source": str(ckpt.resolve()), "weights": meta["weights"], "gen_step": meta.get("gen_step")}
        return _sd_source(pipe, info, 1 if steps is None else steps, 1.0 if guidance is None else guidance,
                          device, dtype)
    raise ValueError(f"{ckpt} is a {pipeline!r} run; `fdistill sample` makes images of the image pipelines "
                     f"({', '.join(ex.EDM_PIPELINES + ex.SD_PIPELINES)})")


# --- where the images go: a PNG folder, or chunks that become an npz -------------------------------------------

_SAMPLE_META = "sample_meta.json"


def _check_settings(root, settings: dict):
    import json

    path = root / _SAMPLE_META
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise ValueError(f"{root} holds images from other weights or settings ({', '.join(diff)} differ: "
                             f"{ {k: old.get(k) for k in diff} } there, { {k: settings.get(k) for k in diff} } now); "
                             "choose another output, or delete it to start over")
    else:
        path.write_text(json.dumps(settings, indent=1))


def _check_record(root, seed: int, have: dict, want: dict):
    if have != want:
        raise ValueError(f"{root} holds seed {seed} generated with {have}, but this run asks for {want}: the "
                         "label/prompt settings changed. Choose another output, or delete it to start over")


class _PngStore:
    """DIR/{seed:06d}.png, plus DIR/index.jsonl recording each seed's label or prompt. The index line is appended
    after the image is in place (written to a temporary name and renamed), so an image counts as done only when
    both exist; a killed run leaves nothing half-written that a rerun would skip."""

    def __init__(self, root, settings: dict):
        import json

        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        _check_settings(root, settings)
        self.records: dict[int, dict] = {}
        index = root / "index.jsonl"
        if index.is_file():
            for line in index.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                self.records[int(r.pop("seed"))] = r

    def path(self, seed: int):
        return self.root / f"{seed:06d}.png"

    def has(self, seed: int, record: dict) -> bool:
        if seed not in self.records or not self.path(seed).is_file():
            return False
        _check_record(self.root, seed, self.records[seed], record)
        return True

    def write(self, seeds, images, records):
        import json
        import os
        from concurrent.futures import ThreadPoolExecutor

        from PIL import Image

        def save(args):
            seed, img = args
            tmp = self.root / f".{seed:06d}.tmp.png"
            Image.fromarray(img[:, :, 0] if img.shape[-1] == 1 else img).save(tmp, compress_level=1)
            os.replace(tmp, self.path(seed))

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(save, zip(seeds, images)))
        with open(self.root / "index.jsonl", "a") as f:
            for seed, r in zip(seeds, records):
                f.write(json.dumps({"seed": int(seed), **r}) + "\n")
                self.records[int(seed)] = dict(r)

    def flush(self):
        pass

    def read(self, seeds):
        import numpy as np
        from PIL import Image

        out = []
        for s in seeds:
            with Image.open(self.path(s)) as im:
                a = np.asarray(im)
            out.append(a[:, :, None] if a.ndim == 2 else a)
        return np.stack(out)


class _ChunkStore:
    """PATH.parts/chunk-*.npz, each holding some images with their seeds and labels/prompts (written atomically
    every ``chunk`` images): the resumable staging area of an npz when no --outdir is given."""

    def __init__(self, root, settings: dict, chunk: int = 1000):
        import numpy as np

        self.root, self.chunk = root, chunk
        root.mkdir(parents=True, exist_ok=True)
        _check_settings(root, settings)
        self.records: dict[int, dict] = {}
        self.where: dict[int, tuple] = {}
        self.files = sorted(root.glob("chunk-*.npz"))
        for f in self.files:
            with np.load(f, allow_pickle=False) as d:
                for row, s in enumerate(d["seeds"].tolist()):
                    self.records[s] = _record_from(d, row)
                    self.where[s] = (f, row)
        self.buf: list = []

    def has(self, seed: int, record: dict) -> bool:
        if seed not in self.records:
            return False
        _check_record(self.root, seed, self.records[seed], record)
        return True

    def write(self, seeds, images, records):
        self.buf.extend(zip(seeds, images, records))
        if len(self.buf) >= self.chunk:
            self.flush()

    def flush(self):
        import os

        import numpy as np

        if not self.buf:
            return
        seeds, images, records = zip(*self.buf)
        f = self.root / f"chunk-{len(self.files):06d}.npz"
        tmp = self.root / f".{f.stem}.tmp.npz"
        arrays = {"images": np.stack(images), "seeds": np.asarray(seeds, dtype=np.int64)}
        arrays.update(_record_arrays(records))
        np.savez(tmp, **arrays)
        os.replace(tmp, f)
        self.files.append(f)
        for row, (s, r) in enumerate(zip(seeds, records)):
            self.records[int(s)] = dict(r)
            self.where[int(s)] = (f, row)
        self.buf = []

    def read(self, seeds):
        import numpy as np

        cache: dict = {}
        out = []
        for s in seeds:
            f, row = self.where[int(s)]
            if f not in cache:
                cache.clear()  # chunks are read in order: keep one open
                with np.load(f, allow_pickle=False) as d:
                    cache[f] = d["images"]
            out.append(cache[f][row])
        return np.stack(out)


def _record_arrays(records) -> dict:
    import numpy as np

    out = {}
    if any("label" in r for r in records):
        out["labels"] = np.asarray([r["label"] for r in records], dtype=np.int64)
    if any("prompt" in r for r in records):
        out["prompts"] = np.asarray([r["prompt"] for r in records], dtype=str)
    return out


def _record_from(d, row: int) -> dict:
    r = {}
    if "labels" in d:
        r["label"] = int(d["labels"][row])
    if "prompts" in d:
        r["prompt"] = str(d["prompts"][row])
    return r


def write_image_npz(path, n: int, image_shape, blocks, extra: dict):
    """An npz in EDM's sample format, streamed: ``arr_0`` uint8 [n, H, W, C] written block by block (stored, not
    compressed, so readers can memory-map it), plus the arrays in ``extra`` (seeds, labels, prompts). Written to
    a temporary file and renamed."""
    import os
    import zipfile
    from pathlib import Path

    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    written = 0
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                         "fortran_order": False, "shape": (n, *image_shape)})
                for block in blocks:
                    block = np.ascontiguousarray(block, dtype=np.uint8)
                    if tuple(block.shape[1:]) != tuple(image_shape):
                        raise ValueError(f"image block of shape {block.shape[1:]} in an npz of {image_shape} images")
                    f.write(block.tobytes())
                    written += len(block)
            if written != n:
                raise RuntimeError(f"{written} images written to {path}, expected {n}")
            for k, v in extra.items():
                with zf.open(f"{k}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(v), allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# --- the command ----------------------------------------------------------------------------------------------


def build_sample_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="fdistill sample",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate images with a distilled one-step generator.\n\n"
                    "SOURCE: a run directory (its newest checkpoint), a ckpt-<step> folder, a OneStepPipeline\n"
                    "folder (`fdistill export`) or a StableDiffusionPipeline folder (with prompts).\n\n"
                    "Image i has seed i (or the i-th of --seeds); its latent comes from that seed alone, so a\n"
                    "seed gives the same image whatever --batch.\n\n"
                    "Outputs, any of:\n"
                    "  --outdir DIR  DIR/{seed:06d}.png, and DIR/index.jsonl with each seed's label or prompt\n"
                    "  --npz FILE    EDM's format: arr_0 (uint8 NHWC), seeds, labels or prompts\n"
                    "  --grid PNG    the first --grid-max images\n"
                    "With --outdir or --npz a rerun skips the images already written.\n\n"
                    "examples:\n"
                    "  fdistill sample runs/imagenet64_js --seeds 0-49999 --batch 256 --npz samples.npz\n"
                    "  fdistill sample runs/mnist --num 100 --labels balanced --grid grid.png\n"
                    "  fdistill sample exported_sd/ --prompts prompts.txt --outdir images/")
    p.add_argument("source", help="run directory, ckpt-<step> folder, or exported pipeline folder")
    p.add_argument("--num", type=int, default=None, help="number of images (seeds 0..N-1 unless --seeds)")
    p.add_argument("--seeds", default=None, help="seeds, e.g. 0-999 or 3,5,100-199 (default 0..N-1)")
    p.add_argument("--labels", default=None,
                   help="class labels of a class-conditional generator: 'random' (default; drawn from each "
                        "seed's generator after its latent, as EDM's generate.py), 'balanced' (seed s -> class s "
                        "mod C), or a list such as 3,5 or 0-9 (image i gets the (i mod len)-th)")
    p.add_argument("--balanced", action="store_true", help="same as --labels balanced")
    p.add_argument("--prompts", default=None, help="prompt file (.txt one per line, COCO captions JSON, or JSON "
                                                  "list); image i gets prompt i mod len (text-to-image sources)")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable), instead of --prompts")
    p.add_argument("--batch", type=int, default=64, help="images per forward pass (does not change the images)")
    p.add_argument("--outdir", default=None, help="folder of PNGs {seed:06d}.png (resumable)")
    p.add_argument("--npz", default=None, help="npz of uint8 images NHWC (arr_0) with seeds and labels/prompts "
                                               "(resumable: staged in NPZ.parts/ unless --outdir is given)")
    p.add_argument("--grid", default=None, help="PNG grid of the first --grid-max images")
    p.add_argument("--grid-max", type=int, default=100, help="images in the grid (default 100)")
    p.add_argument("--nrow", type=int, default=10, help="grid columns (default 10)")
    p.add_argument("--which", default="ema", help="checkpoint weights: 'ema' (default; the raw generator if the "
                                                   "run kept no EMA), 'generator', or a stem like ema_0.9999")
    p.add_argument("--teacher", default=None, help="teacher folder, if it moved since training (checkpoints)")
    p.add_argument("--steps", type=int, default=None, help="inference steps (StableDiffusionPipeline folders that "
                                                           "are not one-step exports)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale of a StableDiffusionPipeline "
                                                                "(one-step exports: 1)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _plan(a, src: SampleSource) -> tuple[list[int], list[dict]]:
    """Seeds and per-image records (label / prompt / nothing), each a function of the seed or the position."""
    seeds = parse_int_list(a.seeds) if a.seeds is not None else None
    prompts = None
    if a.prompts or a.prompt:
        if src.kind != "sd":
            raise ValueError("--prompts/--prompt need a text-to-image source (a coco_t2i run or a "
                             "StableDiffusionPipeline folder)")
        if a.prompts:
            from .pipelines.coco_t2i import read_prompts
            prompts = read_prompts(a.prompts)
        prompts = (prompts or []) + list(a.prompt or [])
        if not prompts:
            raise ValueError(f"{a.prompts}: no prompts")
    elif src.kind == "sd":
        raise ValueError("a text-to-image source needs --prompts FILE or --prompt TEXT")
    n = a.num
    if n is None:
        n = len(seeds) if seeds is not None else (len(prompts) if prompts else None)
    if n is None:
        raise ValueError("say how many images: --num N (seeds 0..N-1) or --seeds 0-999")
    if n <= 0:
        raise ValueError(f"--num must be positive, got {n}")
    if seeds is None:
        seeds = list(range(n))
    elif len(seeds) != n:
        raise ValueError(f"--num {n} but --seeds gives {len(seeds)} seeds; pass one of them, or both agreeing")
    if len(set(seeds)) != len(seeds):
        raise ValueError("--seeds repeats a seed (images are named by seed)")

    spec = "balanced" if a.balanced else a.labels
    if a.balanced and a.labels not in (None, "balanced"):
        raise ValueError("--balanced and --labels both given")
    k = src.num_classes
    if prompts:
        if spec is not None:
            raise ValueError("--labels/--balanced are for class-conditional generators, not text-to-image ones")
        return seeds, [{"prompt": prompts[i % len(prompts)]} for i in range(n)]
    if not k:
        if spec is not None:
            raise ValueError("this generator is unconditional: drop --labels/--balanced")
        return seeds, [{} for _ in range(n)]
    spec = spec or "random"
    if spec == "random":
        labels = per_image_random_labels(seeds, src.latent_shape, k).tolist()
    elif spec == "balanced":
        labels = [s % k for s in seeds]
    else:
        lst = parse_int_list(spec, "labels")
        bad = [x for x in lst if not 0 <= x < k]
        if bad:
            raise ValueError(f"--labels {spec}: {bad} outside the generator's classes 0..{k - 1}")
        labels = [lst[i % len(lst)] for i in range(n)]
    return seeds, [{"label": int(lab)} for lab in labels]


def _u8_to_float(u8) -> torch.Tensor:
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1


def sample(a) -> dict:
    """The command on parsed arguments; returns a summary."""
    from pathlib import Path

    import numpy as np

    if not (a.grid or a.outdir or a.npz):
        raise ValueError("nothing to write: pass --outdir DIR, --npz FILE and/or --grid PNG")
    if a.batch <= 0:
        raise ValueError(f"--batch must be positive, got {a.batch}")
    src = open_source(a.source, a.which, a.teacher, a.device, getattr(torch, a.dtype), a.steps, a.guidance)
    seeds, records = _plan(a, src)
    n = len(seeds)
    settings = {**src.info, "dtype": a.dtype}
    store = None
    if a.outdir:
        store = _PngStore(Path(a.outdir), settings)
    elif a.npz:
        store = _ChunkStore(Path(str(a.npz) + ".parts"), settings, chunk=max(1000, a.batch))
    # without a store only the grid is wanted: generate just what it shows
    n_make = n if store is not None else min(n, a.grid_max)
    todo = [i for i in range(n_make) if store is None or not store.has(seeds[i], records[i])]
    memory: dict[int, np.ndarray] = {}
    pbar = None
    if not a.quiet:
        from tqdm.auto import tqdm
        pbar = tqdm(total=n_make, initial=n_make - len(todo), desc="sample", unit="img", dynamic_ncols=True)
    for start in range(0, len(todo), a.batch):
        idx = todo[start:start + a.batch]
        u8 = src.generate([seeds[i] for i in idx], [records[i] for i in idx])
        if store is not None:
            store.write([seeds[i] for i in idx], list(u8), [records[i] for i in idx])
        else:
            memory.update(zip(idx, u8))
        if pbar is not None:
            pbar.update(len(idx))
    if pbar is not None:
        pbar.close()
    if store is not None:
        store.flush()

    def images(lo, hi):
        if store is None:
            return np.stack([memory[i] for i in range(lo, hi)])
        return store.read(seeds[lo:hi])

    out = {"source": src.info.get("source"), "weights": src.info.get("weights"), "num": n,
           "generated_now": len(todo), "seeds": f"{seeds[0]}..{seeds[-1]}" if n > 1 else str(seeds[0])}
    if a.grid:
        k = min(n, a.grid_max)
        save_grid(_u8_to_float(images(0, k)), a.grid, nrow=min(a.nrow, k))
        out["grid"] = str(a.grid)
        if store is None and n > k:
            out["note"] = f"the grid shows the first {k} of {n} images (--grid-max); nothing else was written"
    if a.npz:
        shape = images(0, 1).shape[1:]
        extra = {"seeds": np.asarray(seeds, dtype=np.int64), **_record_arrays(records)}
        write_image_npz(a.npz, n, shape, (images(lo, min(n, lo + 1000)) for lo in range(0, n, 1000)), extra)
        out["npz"] = str(a.npz)
        if not a.outdir:  # the staging chunks are now in the npz
            import shutil
            shutil.rmtree(store.root, ignore_errors=True)
    if a.outdir:
        out["outdir"] = str(a.outdir)
    return out


def main(argv: list[str] | None = None) -> int:
    import json
    import sys

    from .checkpoint import CheckpointError

    a = build_sample_parser().parse_args(argv)
    try:
        out = sample(a)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, CheckpointError) as e:
        print(f"fdistill sample: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1))
    return 0
