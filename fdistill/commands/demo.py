"""``fdistill demo``: distill the shipped MNIST teacher on CPU, then report FID against the teacher's figures
(the protocol: ``fdistill.pipelines.mnist_demo``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..config import load_config
from ..divergences import get_divergence
from ..paths import CONFIGS
from ..pipelines import build_run_task
from ..trainer import distill

CONFIG = CONFIGS / "mnist.yaml"


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
    p.add_argument("--student-steps", type=int, default=1, choices=(1, 2, 4),
                   help="network evaluations of the student: 1 (default), or a 2- or 4-step student trained by "
                        "backward simulation (docs/few_step.md)")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides (see configs/mnist.yaml)")
    a = p.parse_args(argv)
    name = get_divergence(a.divergence).name
    suffix = "" if a.student_steps == 1 else f"_{a.student_steps}step"
    out = a.out or f"runs/demo_{name.replace(':', '_')}{suffix}"
    overrides = [f"divergence={name}", f"out={out}", f"student.steps={a.student_steps}"]
    if a.long:
        overrides.append(f"steps={4 * load_config(CONFIG).steps}")
    if a.steps is not None:
        overrides.append(f"steps={a.steps}")
    cfg = load_config(CONFIG, overrides + list(a.overrides))
    t0 = time.time()
    res = distill(cfg, build_run_task(cfg))
    res["demo_wall_sec"] = round(time.time() - t0, 1)
    (Path(out) / "metrics.json").write_text(json.dumps(res, indent=1))
    keys = ("fid_student", "fid_teacher", "fid_teacher_one_step", "fid_num_samples", "nfe_teacher", "nfe_student",
            "sampling_speedup", "gen_steps", "demo_wall_sec")
    print("\n".join(f"{k:>22}: {res.get(k)}" for k in keys))
    print(f"{'run directory':>22}: {out}  (samples.png, metrics.json, checkpoints)")
    return 0
