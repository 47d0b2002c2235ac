"""Pre-encoding a coco_t2i run's real images to SD latents once, before a multi-process launch
(``python -m fdistill.commands.encode_latents encode-latents ...``; then train with ``data=LATENTS.npy``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from ..hub import load_kwargs
from ..pipelines.coco_t2i import latent_cache, vae_factor


def main(argv: list[str] | None = None) -> int:
    """python -m fdistill.commands.encode_latents encode-latents --teacher T --data IMAGES --out LATENTS.npy"""
    p = argparse.ArgumentParser(prog="python -m fdistill.commands.encode_latents",
                                description="Encode real images to SD latents once (float16 .npy memmap + a .json "
                                            "of file names); then train with data=LATENTS.npy.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("encode-latents")
    e.add_argument("--teacher", required=True)
    e.add_argument("--data", required=True, help="image folder (recursive)")
    e.add_argument("--out", required=True, help="output .npy (a .json with the file list is written beside it)")
    e.add_argument("--resolution", type=int, default=0, help="0 = unet.sample_size x VAE factor (SD1.5: 512)")
    e.add_argument("--max-images", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--device", default=None)
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    kw = load_kwargs(a.teacher)
    vae = AutoencoderKL.from_pretrained(a.teacher, subfolder="vae", **kw).to(device).eval()
    res = a.resolution or UNet2DConditionModel.load_config(
        a.teacher, subfolder="unet", local_files_only=kw["local_files_only"])["sample_size"] * vae_factor(vae)
    out = Path(a.out)
    if out.suffix != ".npy":
        raise SystemExit("--out must end in .npy")
    arr, files = latent_cache(a.data, vae, res, out, out.parent, a.max_images, a.batch_size, str(a.teacher))
    print(json.dumps({"out": str(out), "num": len(files), "shape": list(arr.shape), "resolution": res}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
