"""``fdistill sample``: N images from a run directory, a checkpoint or an exported folder.

Image i has seed s_i; its latent comes from torch.Generator().manual_seed(s_i) alone, so a seed gives the same
image whatever the batch size and whichever images were generated before (resumption).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..imageio import ChunkStore, PngStore, record_arrays, save_grid, u8_to_float, write_image_npz
from ..prompts import read_prompts
from ..sampler import per_image_random_labels
from ..utils import DTYPES
from . import call


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




def build_sample_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _plan(a, src) -> tuple[list[int], list[dict]]:
    """Seeds and per-image records (label / prompt / nothing), each a function of the seed or the position."""
    seeds = parse_int_list(a.seeds) if a.seeds is not None else None
    prompts = None
    if a.prompts or a.prompt:
        if src.kind != "sd":
            raise ValueError("--prompts/--prompt need a text-to-image source (a coco_t2i run or a "
                             "StableDiffusionPipeline folder)")
        if a.prompts:
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


def sample(a) -> dict:
    """The command on parsed arguments; returns a summary."""
    from ..sources import open_source  # diffusers and transformers: only once the arguments are good

    if not (a.grid or a.outdir or a.npz):
        raise ValueError("nothing to write: pass --outdir DIR, --npz FILE and/or --grid PNG")
    if a.batch <= 0:
        raise ValueError(f"--batch must be positive, got {a.batch}")
    src = open_source(a.source, a.which, a.teacher, a.device, DTYPES[a.dtype], a.steps, a.guidance)
    seeds, records = _plan(a, src)
    n = len(seeds)
    settings = {**src.info, "dtype": a.dtype}
    store = None
    if a.outdir:
        store = PngStore(Path(a.outdir), settings)
    elif a.npz:
        store = ChunkStore(Path(str(a.npz) + ".parts"), settings, chunk=max(1000, a.batch))
    # without a store only the grid is wanted: generate just what it shows
    n_make = n if store is not None else min(n, a.grid_max)
    todo = [i for i in range(n_make) if store is None or not store.has(seeds[i], records[i])]
    memory: dict[int, np.ndarray] = {}
    pbar = None
    if not a.quiet:
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
        save_grid(u8_to_float(images(0, k)), a.grid, nrow=min(a.nrow, k))
        out["grid"] = str(a.grid)
        if store is None and n > k:
            out["note"] = f"the grid shows the first {k} of {n} images (--grid-max); nothing else was written"
    if a.npz:
        shape = images(0, 1).shape[1:]
        extra = {"seeds": np.asarray(seeds, dtype=np.int64), **record_arrays(records)}
        write_image_npz(a.npz, n, shape, (images(lo, min(n, lo + 1000)) for lo in range(0, n, 1000)), extra)
        out["npz"] = str(a.npz)
        if not a.outdir:  # the staging chunks are now in the npz
            shutil.rmtree(store.root, ignore_errors=True)
    if a.outdir:
        out["outdir"] = str(a.outdir)
    return out


def main(argv: list[str] | None = None) -> int:
    a = build_sample_parser().parse_args(argv)
    out, rc = call("fdistill sample", sample, a)
    if rc:
        return rc
    print(json.dumps(out, indent=1))
    return 0
