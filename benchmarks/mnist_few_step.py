"""The MNIST few-step table (docs/few_step.md): 1-, 2- and 4-step students x seeds on the embedded default, each
student given the same CPU budget.

    python benchmarks/mnist_few_step.py --seeds 0 1 2 --out benchmarks/mnist_few_step.json

Budget: the one-step student trains for ``--budget-steps`` generator steps (200: configs/mnist.yaml's when the
table was measured; 400 now). A k-step student's generator and critic iterations cost more (its backward
simulation runs the generator k - 1 more times without gradient, on a shrinking share of the batch), so it gets
``round(budget_steps * t_1 / t_k)`` steps, where t_k is the seconds per generator step of a short calibration run
(``--calibrate-steps``, seed 0, no FID) measured at the start on this machine. The calibration is stored in the
JSON and reused on restart.

``--untrained`` adds the starting point of each student: the teacher's weights run as a k-step student (its own
x0 re-noised to the student's levels), the same FID / precision / recall protocol, no training.

Each run is `fdistill demo --student-steps K --steps N --out RUNS/K_S seed=S` (JS, 500-sample FID against the
shipped reference, the same balanced labels and seeds for every student); precision and recall are `fdistill eval
pr` on the student's Inception features (kept by the demo in student_features.npz) against the shipped reference
features (k=3). Results are written after every run; runs already in the JSON are skipped, so the script can be
stopped and restarted.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from mnist_divergences import REFERENCE, precision_recall  # benchmarks/ is on the path of its scripts

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "fdistill.cli", *args]


def _demo(k: int, steps: int, out: Path, seed: int, env: dict, extra=()) -> dict:
    subprocess.run(_cli("demo", "--student-steps", str(k), "--steps", str(steps), "--out", str(out), f"seed={seed}",
                        "log.progress=false", *extra), check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def calibrate(ks, steps: int, runs: Path, env: dict) -> dict:
    """Seconds per generator step of each k-step student (a short run, no FID)."""
    out = {}
    for k in ks:
        m = _demo(k, steps, runs / f"calibrate_{k}", 0, env, ["task.eval_samples=0", "task.grid_samples=10",
                                                             "log.ckpt_every=100000"])
        out[str(k)] = m["sec_per_gen_step"]
        print(f"calibration: {k}-step student {m['sec_per_gen_step']:.3f} s per generator step", flush=True)
    return out


def untrained(k: int, run: Path) -> dict:
    """FID of the teacher's weights as a k-step student (the students' initialisation), as the demo measures."""
    sys.path.insert(0, str(ROOT))  # this checkout's package, as the runs' PYTHONPATH
    import torch

    from fdistill import student
    from fdistill.config import load_config
    from fdistill.pipelines import build_task

    run.mkdir(parents=True, exist_ok=True)
    cfg = load_config(ROOT / "configs/mnist.yaml", [f"student.steps={k}", f"out={run}", "log.progress=false"])
    torch.manual_seed(cfg.seed)
    task = build_task(cfg, "cpu")
    student.attach(cfg.student, task)
    return task.evaluate(task.generator, run, final=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student-steps", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budget-steps", type=int, default=200, help="generator steps of the one-step student")
    p.add_argument("--calibrate-steps", type=int, default=12)
    p.add_argument("--out", default="benchmarks/mnist_few_step.json")
    p.add_argument("--runs", default="runs/mnist_few_step")
    p.add_argument("--untrained", action="store_true", help="also the teacher's weights as k-step students")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides passed to every run")
    a = p.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    runs = Path(a.runs)
    runs.mkdir(parents=True, exist_ok=True)
    meta = results.setdefault("_budget", {})
    if "sec_per_gen_step" not in meta:
        meta.update({"budget_steps_one_step": a.budget_steps, "calibrate_steps": a.calibrate_steps,
                     "sec_per_gen_step": calibrate(sorted(set(a.student_steps) | {1}), a.calibrate_steps, runs,
                                                   env)})
        out.write_text(json.dumps(results, indent=1))
    t = meta["sec_per_gen_step"]
    for k in a.student_steps if a.untrained else []:
        key = f"untrained/{k}"
        if key in results:
            continue
        run = runs / f"untrained_{k}"
        m = untrained(k, run)
        pr = precision_recall(run, REFERENCE, env)
        results[key] = {"student_steps": k, "nfe": m["nfe_student"], "fid_student": m["fid_student"],
                        "precision": pr["precision"], "recall": pr["recall"]}
        out.write_text(json.dumps(results, indent=1))
        print(key, json.dumps(results[key]), flush=True)
    for s in a.seeds:  # seeds outermost: a stopped table still has every student for the first seeds
        for k in a.student_steps:
            key = f"{k}/{s}"
            if key in results:
                continue
            steps = max(1, round(meta["budget_steps_one_step"] * t["1"] / t[str(k)]))
            run = runs / f"{k}step_{s}"
            m = _demo(k, steps, run, s, env, a.overrides)
            pr = precision_recall(run, REFERENCE, env)
            results[key] = {"student_steps": k, "seed": s, "gen_steps": m["gen_steps"], "nfe": m["nfe_student"],
                            "fid_student": m["fid_student"], "fid_teacher": m.get("fid_teacher"),
                            "fid_teacher_one_step": m.get("fid_teacher_one_step"), "precision": pr["precision"],
                            "recall": pr["recall"], "sec_per_gen_step": m["sec_per_gen_step"],
                            "train_sec": round(m["sec_per_gen_step"] * m["gen_steps"], 1),
                            "demo_wall_sec": m.get("demo_wall_sec")}
            out.write_text(json.dumps(results, indent=1))
            print(key, json.dumps(results[key]), flush=True)
    print(table(results))


def table(results: dict) -> str:
    """Markdown: mean and min-max over seeds per number of steps."""
    lines = ["| student | NFE | seeds | generator steps | train s | FID | precision | recall |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [r for key, r in results.items() if not key.startswith(("_", "untrained"))]
    for k in sorted({r["student_steps"] for r in rows}):
        rs = [r for r in rows if r["student_steps"] == k]

        def f(key, nd=3):
            v = [r[key] for r in rs]
            return f"{np.mean(v):.{nd}f} ({min(v):.{nd}f}-{max(v):.{nd}f})"
        lines.append(f"| {k}-step | {rs[0]['nfe']} | {len(rs)} | {rs[0]['gen_steps']} | {f('train_sec', 0)} | "
                     f"{f('fid_student', 1)} | {f('precision')} | {f('recall')} |")
    init = [r for key, r in results.items() if key.startswith("untrained")]
    for r in sorted(init, key=lambda r: r["student_steps"]):
        lines.append(f"| {r['student_steps']}-step, untrained (the teacher's weights) | {r['nfe']} | - | 0 | 0 | "
                     f"{r['fid_student']:.1f} | {r['precision']:.3f} | {r['recall']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
