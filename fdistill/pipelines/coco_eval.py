"""COCO-30k zero-shot evaluation of a text-to-image model (the f-distill / DMD2 MS-COCO protocol).

1. Captions: from the val2014 captions JSON, 30,000 distinct images drawn with a fixed seed (numpy PCG64, images in
   ascending id order, then a permutation), one caption per image drawn with the same generator. The selection is
   written to OUT/selection.json, so a run is checkable; ``--prompts FILE`` uses a given caption list instead.
2. Generation: any StableDiffusionPipeline folder - an exported one-step student (``fdistill export``; 1 step,
   guidance 1) or the teacher (``--steps 50 --guidance 3``) - with one latent per caption index i from
   ``torch.Generator().manual_seed(seed_offset + i)``. Images go to OUT/images/{i:05d}.png in chunks; a rerun
   skips the images already written (resumable).
3. FID against the selected val2014 images, both sides centre-cropped to a square and resized to 256 with PIL
   Lanczos, then clean-fid's ``clean`` mode (docs/evaluation.md); the reference statistics are cached in OUT. CLIP score
   with open_clip ViT-g-14 (laion2b_s12b_b42k), DMD2's preprocessing and prefix (fdistill.metrics.clip_score).

    fdistill eval coco MODEL_DIR --captions annotations/captions_val2014.json --images val2014/ --out OUT \
        --clip-pretrained open_clip_vit_g14.bin
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..hub import load_kwargs
from ..metrics.clip_score import clip_similarities
from ..metrics.fid import (center_crop_resize, fid_from_stats, inception_features, load_stats, save_stats,
                           stats_from_features)
from ..prompts import clean, read_prompts
from ..sampler import per_image_latents

NUM = 30_000
SEED = 0
PRE_RESIZE = 256  # GigaGAN / DMD2: centre crop + Lanczos to 256 before Inception and CLIP


def select_captions(captions_json: str | os.PathLike, num: int = NUM, seed: int = SEED) -> list[dict]:
    """``num`` distinct images of a COCO captions JSON and one caption each: [{image_id, file_name, caption}].

    Deterministic for a given file and seed: images sorted by id, a numpy PCG64 permutation picks them, the same
    generator then picks one of each image's captions (in annotation-id order)."""
    data = json.loads(Path(captions_json).read_text())
    if not (isinstance(data, dict) and "images" in data and "annotations" in data):
        raise ValueError(f"{captions_json} is not a COCO captions JSON (needs 'images' and 'annotations')")
    caps: dict[int, list[tuple[int, str]]] = {}
    for a in data["annotations"]:
        caps.setdefault(a["image_id"], []).append((a["id"], clean(a["caption"])))
    names = {im["id"]: im["file_name"] for im in data["images"]}
    ids = sorted(i for i in names if i in caps)
    if len(ids) < num:
        raise ValueError(f"{captions_json} has {len(ids)} captioned images, fewer than the {num} asked for "
                         "(the COCO-30k protocol needs val2014's 40,504)")
    rng = np.random.default_rng(seed)
    chosen = [ids[k] for k in rng.permutation(len(ids))[:num]]
    out = []
    for i in chosen:
        options = [c for _, c in sorted(caps[i])]
        out.append({"image_id": int(i), "file_name": names[i], "caption": options[int(rng.integers(len(options)))]})
    return out


# ------------------------------------------------------------------------------------------------------------
# generation


def _png_writer(path: Path, arr: np.ndarray):
    tmp = path.with_name(path.stem + ".tmp.png")
    Image.fromarray(arr).save(tmp, compress_level=1)
    os.replace(tmp, path)  # a killed run never leaves a truncated image that a rerun would skip


def generate(model_dir: str, captions: list[str], out_dir: Path, steps: int = 1, guidance: float = 1.0,
             batch_size: int = 16, seed_offset: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32,
             progress: bool = True) -> int:
    """Images for ``captions`` as out_dir/{i:05d}.png; returns how many were generated now (others existed)."""
    from diffusers import StableDiffusionPipeline

    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(len(captions)) if not (out_dir / f"{i:05d}.png").is_file()]
    if not todo:
        return 0
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=dtype,
                                                   local_files_only=load_kwargs(model_dir)["local_files_only"])
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    lat = pipe.unet.config.sample_size
    shape = (pipe.unet.config.in_channels, lat, lat)
    chunks = [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]
    if progress:
        chunks = tqdm(chunks, desc="COCO generation", unit="batch")
    with ThreadPoolExecutor(4) as pool:
        for idx in chunks:
            z = per_image_latents([seed_offset + i for i in idx], shape, device).to(dtype)
            with torch.no_grad():
                imgs = pipe([captions[i] for i in idx], num_inference_steps=steps, guidance_scale=guidance,
                            latents=z, output_type="np").images
            u8 = (np.clip(imgs, 0, 1) * 255).round().astype(np.uint8)
            list(pool.map(_png_writer, [out_dir / f"{i:05d}.png" for i in idx], list(u8)))
    return len(todo)


# ------------------------------------------------------------------------------------------------------------
# metrics


def _load_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def reference_stats(image_dir: Path, file_names: list[str], out_path: Path, inception=None, device="cpu",
                    batch_size: int = 50, progress: bool = True):
    """(mu, sigma) of the selected val2014 images after the protocol's centre crop + Lanczos 256; cached."""
    key = {"num": len(file_names), "first": file_names[0], "last": file_names[-1], "pre_resize": PRE_RESIZE,
           "mode": "clean"}
    if out_path.is_file():
        mu, sigma, meta = load_stats(out_path, with_meta=True)
        if all(meta.get(k) == v for k, v in key.items()) and (callable(inception) == bool(meta.get("custom"))):
            return mu, sigma
    crop = center_crop_resize(PRE_RESIZE)
    missing = [f for f in file_names if not (image_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} selected val2014 images are missing from {image_dir}, e.g. "
                                f"{missing[0]}")

    def batches():
        for k in range(0, len(file_names), batch_size):
            yield np.stack([crop(_load_rgb(image_dir / f)) for f in file_names[k:k + batch_size]])
    feats = inception_features(batches(), batch_size=batch_size, device=device, mode="clean", weights=inception,
                               progress=progress)
    mu, sigma = stats_from_features(feats)
    save_stats(out_path, mu, sigma, **key, custom=callable(inception), source=str(image_dir))
    return mu, sigma


def evaluate(gen_dir: Path, captions: list[str], ref: tuple | None, clip: dict | None, inception=None,
             device="cpu", batch_size: int = 50, progress: bool = True) -> dict:
    """FID (against ``ref`` = (mu, sigma)) and CLIP score of gen_dir/{i:05d}.png for i < len(captions)."""
    files = [gen_dir / f"{i:05d}.png" for i in range(len(captions))]
    result: dict = {"num": len(files)}
    if ref is not None:
        crop = center_crop_resize(PRE_RESIZE)

        def batches():
            for k in range(0, len(files), batch_size):
                yield np.stack([crop(_load_rgb(f)) for f in files[k:k + batch_size]])
        feats = inception_features(batches(), batch_size=batch_size, device=device, mode="clean", weights=inception,
                                   progress=progress)
        result["fid"] = fid_from_stats(*stats_from_features(feats), *ref)
    if clip is not None:
        sims = []
        for k in range(0, len(files), 1000):  # bounded memory: the metric loads its images at once
            sims.append(clip_similarities([str(f) for f in files[k:k + 1000]], captions[k:k + 1000], device=device,
                                          pre_resize=PRE_RESIZE, **clip))
        result["clip_score"] = float(np.concatenate(sims).mean())
    return result


# ------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fdistill eval coco",
        description="COCO-30k zero-shot: pick captions from val2014 (fixed seed, one per image), generate with a "
                    "StableDiffusionPipeline folder, report FID against the val2014 images (centre crop + Lanczos "
                    "256, clean-fid) and CLIP score (open_clip ViT-g-14). Resumable.")
    p.add_argument("model", help="StableDiffusionPipeline folder (e.g. from `fdistill export`) or hub id")
    p.add_argument("--captions", help="captions_val2014.json (COCO 2014 format)")
    p.add_argument("--prompts", default=None, help="use this caption list instead (.txt, one per line); the FID "
                                                   "reference must then come from --ref-stats")
    p.add_argument("--images", default=None, help="val2014 image folder (for the FID reference)")
    p.add_argument("--ref-stats", default=None, help="precomputed reference statistics .npz (skips --images)")
    p.add_argument("--out", required=True, help="output folder: selection.json, images/, ref_stats.npz, result.json")
    p.add_argument("--num", type=int, default=NUM, help=f"captions / images (default {NUM:,})")
    p.add_argument("--seed", type=int, default=SEED, help="caption-selection seed (default 0)")
    p.add_argument("--seed-offset", type=int, default=0, help="latent of caption i: seed offset + i")
    p.add_argument("--steps", type=int, default=1, help="inference steps (1 for a one-step export)")
    p.add_argument("--guidance", type=float, default=1.0, help="pipeline CFG scale (1 = none; students: 1)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--inception", default=None, help="TorchScript Inception (default lookup; never downloads)")
    p.add_argument("--clip-model", default="ViT-g-14", help="open_clip architecture or local-dir:FOLDER")
    p.add_argument("--clip-pretrained", default=None, help="CLIP checkpoint file (laion2b_s12b_b42k)")
    p.add_argument("--skip-fid", action="store_true")
    p.add_argument("--skip-clip", action="store_true")
    p.add_argument("--generate-only", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p


def run(a, inception=None, clip_model=None) -> dict:
    """The command, callable with an already loaded Inception extractor / CLIP (model, preprocess, tokenizer)."""
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.prompts:
        captions = read_prompts(a.prompts)[:a.num]
        if len(captions) < a.num:
            raise ValueError(f"{a.prompts} has {len(captions)} prompts, fewer than --num {a.num}")
        selection = [{"caption": c} for c in captions]
    else:
        if not a.captions:
            raise ValueError("pass --captions captions_val2014.json (or --prompts FILE)")
        selection = select_captions(a.captions, a.num, a.seed)
        captions = [s["caption"] for s in selection]
    sel_path = out / "selection.json"
    if sel_path.is_file() and json.loads(sel_path.read_text())["selection"] != selection:
        raise ValueError(f"{out} holds images for another caption selection; use another --out")
    sel_path.write_text(json.dumps({"seed": a.seed, "num": a.num, "captions_file": a.captions or a.prompts,
                                    "selection": selection}))
    (out / "captions.txt").write_text("\n".join(captions) + "\n")  # image order, for `fdistill eval clip`
    dtype = getattr(torch, a.dtype)
    made = generate(a.model, captions, out / "images", a.steps, a.guidance, a.batch_size, a.seed_offset, device,
                    dtype, not a.quiet)
    result = {"model": a.model, "num": a.num, "generated_now": made, "steps": a.steps, "guidance": a.guidance,
              "protocol": {"captions": "val2014, one caption per image, numpy PCG64 seed %d" % a.seed,
                           "fid": f"clean-fid clean mode after centre crop + Lanczos {PRE_RESIZE}, vs the selected "
                                  "val2014 images", "clip": "open_clip, 'A photo depicts ' prefix, crop+Lanczos 256"}}
    if a.generate_only:
        return result
    ref = None
    if not a.skip_fid:
        if a.ref_stats:
            ref = load_stats(a.ref_stats)
        else:
            if a.prompts or not a.images:
                raise ValueError("FID needs --images VAL2014_DIR (or --ref-stats, or --skip-fid)")
            ref = reference_stats(Path(a.images), [s["file_name"] for s in selection], out / "ref_stats.npz",
                                  inception if inception is not None else a.inception, device,
                                  progress=not a.quiet)
    clip = None
    if not a.skip_clip:
        if clip_model is not None:
            m, pre, tok = clip_model
            clip = {"model": m, "preprocess": pre, "tokenizer": tok}
        else:
            clip = {"model_name": a.clip_model, "pretrained": a.clip_pretrained}
    result.update(evaluate(out / "images", captions, ref, clip, inception if inception is not None else a.inception,
                           device, progress=not a.quiet))
    result["clip_model"] = None if a.skip_clip else (a.clip_model, a.clip_pretrained)
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        result = run(a)
    except (FileNotFoundError, ValueError) as e:
        print(f"fdistill eval coco: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
