"""``fdistill eval coco``: the COCO-30k protocol (``fdistill.pipelines.coco_eval``) on a StableDiffusionPipeline
folder: caption selection, resumable generation, FID and CLIP score."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..metrics.fid import load_stats
from ..pipelines.coco_eval import NUM, PRE_RESIZE, SEED, evaluate, generate, reference_stats, select_captions
from ..prompts import read_prompts
from ..utils import DTYPES
from . import call


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
    p.add_argument("--steps", type=int, default=None, help="inference steps (default: the export's, "
                   "fdistill_export.json num_inference_steps; else 1)")
    p.add_argument("--guidance", type=float, default=1.0, help="pipeline CFG scale (1 = none; students: 1)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
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
    dtype = DTYPES[a.dtype]
    if a.steps is None:  # an fdistill export records its steps (a few-step student: k)
        meta_path = Path(a.model) / "fdistill_export.json"
        a.steps = int(json.loads(meta_path.read_text()).get("num_inference_steps", 1)) if meta_path.is_file() else 1
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
    result, rc = call("fdistill eval coco", run, a)
    if rc:
        return rc
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
