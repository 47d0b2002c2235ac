"""COCO-30k zero-shot evaluation of a text-to-image model (the f-distill / DMD2 MS-COCO protocol).

1. Captions: from the val2014 captions JSON, 30,000 distinct images drawn with a fixed seed (numpy PCG64, images in
   ascending id order, then a permutation), one caption per image drawn with the same generator. The selection is
   written to OUT/selection.json, so a run is checkable; ``--prompts FILE`` uses a given caption list instead.
2. Generation: any StableDiffusionPipeline folder - an exported one-step student (``fdistill export``; 1 step,
   guidance 1) or the teacher (``--steps 50 --guidance 3``) - with one latent per caption index i from
   ``torch.Generator().manual_seed(seed_offset + i)``. Images go to OUT/images/{i:05d}.png in chunks; a rerun
   skips the images already written (resumable).
3. FID against the selected val2014 images, both sides centre-cropped to a square and resized to 256 with PIL
   Lanczos, then clean-fid's ``clean`` mode (docs/evaluation.md); the reference statistics are cached in OUT.
   CLIP score with open_clip ViT-g-14 (laion2b_s12b_b42k), DMD2's preprocessing and prefix (fdistill.metrics.clip_score).

    fdistill eval coco MODEL_DIR --captions annotations/captions_val2014.json --images val2014/ --out OUT \
        --clip-pretrained open_clip_vit_g14.bin

(the command: ``fdistill.commands.coco_eval``)
"""

from __future__ import annotations

import json
import os
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
from ..prompts import clean
from ..sampler import per_image_latents
from ..student import RENOISE_SEED_OFFSET

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
    # a few-step export (fdistill/student.py): its timesteps, each image re-noised from its own stream
    meta_path = Path(model_dir) / "fdistill_export.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    few = len(meta.get("timesteps") or []) == steps > 1
    when = {"timesteps": meta["timesteps"]} if few else {"num_inference_steps": steps}
    chunks = [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]
    if progress:
        chunks = tqdm(chunks, desc="COCO generation", unit="batch")
    with ThreadPoolExecutor(4) as pool:
        for idx in chunks:
            z = per_image_latents([seed_offset + i for i in idx], shape, device).to(dtype)
            gens = [torch.Generator().manual_seed(seed_offset + i + RENOISE_SEED_OFFSET) for i in idx] if few \
                else None
            with torch.no_grad():
                imgs = pipe([captions[i] for i in idx], guidance_scale=guidance, latents=z, generator=gens,
                            output_type="np", **when).images
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
