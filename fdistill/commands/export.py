"""``fdistill export``: a run's generator as a diffusers-format folder (``fdistill.export``,
``fdistill.export_sd``)."""

from __future__ import annotations

import argparse
import json

from ..utils import DTYPES
from . import call


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
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="Stable Diffusion runs: save the UNet in this dtype (default: as trained, float32)")
    p.add_argument("--safety-checker", action="store_true",
                   help="Stable Diffusion runs: copy the teacher's safety checker into the folder")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from ..export import EXPORT_META, export  # diffusers: only once the arguments are good

    out, rc = call("fdistill export", export, a.source, a.out, a.which, a.force, a.teacher,
                   DTYPES[a.dtype] if a.dtype else None, a.safety_checker)
    if rc:
        return rc
    meta_path = out / EXPORT_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    print(json.dumps({"out": str(out), "format": meta.get("format"), "weights": meta.get("weights"),
                      "usage": meta.get("usage")}, indent=1))
    return 0
