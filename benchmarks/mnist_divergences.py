"""The MNIST divergence table (docs/discriminator.md): reverse_kl, js, forward_kl x seeds on the embedded default.

    python benchmarks/mnist_divergences.py --seeds 0 1 2 --out benchmarks/mnist_divergences.json

Each run is `fdistill demo --divergence D --out RUNS/D_S seed=S` (configs/mnist.yaml, 500-sample FID against the
shipped reference); precision and recall are `fdistill eval pr` on the student's Inception features, which the
demo keeps in student_features.npz, against the shipped reference features (k=3). The weights' ESS is read from
metrics.jsonl: its mean over the logged rows, its minimum, and the mean of the smallest-sigma bin's. Results are
written after every run, and runs already in the JSON are skipped, so the script can be stopped and restarted.
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "fdistill.cli", *args]


REFERENCE = ROOT / "assets/mnist_teacher/ref_features.npz"  # the shipped reference features, as `eval pr` reads them


def precision_recall(run: Path, ref: Path, env: dict) -> dict:
    """`fdistill eval pr` of a demo run's student features (kept in student_features.npz) against ``ref`` (k=3)."""
    pr_json = run / "pr.json"
    subprocess.run(_cli("eval", "pr", str(run / "student_features.npz"), str(ref), "--num", "all", "--out",
                        str(pr_json), "--quiet"), check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads(pr_json.read_text())


def ess_summary(metrics_jsonl: Path) -> dict:
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    ess = [r["h_ess"] for r in rows if "h_ess" in r]
    bin0 = [r["h_ess_bin0"] for r in rows if "h_ess_bin0" in r]
    per_bin = [v for r in rows for k, v in r.items() if k.startswith("h_ess_bin")]
    acc = [r["disc_acc"] for r in rows if "disc_acc" in r and r["step"] > 50]
    return {"h_ess_mean": float(np.mean(ess)), "h_ess_min": float(np.min(ess)),
            "h_ess_bin0_mean": float(np.mean(bin0)) if bin0 else None,
            "h_ess_bin_min": float(np.min(per_bin)) if per_bin else None,  # lowest over bins and logged rows
            "disc_acc_after_50": float(np.mean(acc)) if acc else None,
            "disc_acc_after_50_min": float(np.min(acc)) if acc else None}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--divergences", nargs="+", default=["reverse_kl", "js", "forward_kl"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", default="benchmarks/mnist_divergences.json")
    p.add_argument("--runs", default="runs/mnist_divergences")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (wall times then overlap)")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides passed to every run")
    a = p.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    out = Path(a.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    runs = Path(a.runs)
    runs.mkdir(parents=True, exist_ok=True)
    todo = [(d, s) for s in a.seeds for d in a.divergences if f"{d}/{s}" not in results]  # seeds outermost

    def one(job):
        d, s = job
        run = runs / f"{d}_{s}"
        # --jobs N: each run gets an equal share of the cores (on 2 cores one thread per run trains as fast as two)
        job_env = dict(env, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // a.jobs))) if a.jobs > 1 else env
        subprocess.run(_cli("demo", "--divergence", d, "--out", str(run), f"seed={s}", "log.progress=false",
                            *a.overrides), check=True, env=job_env, cwd=ROOT, stdout=subprocess.DEVNULL)
        m = json.loads((run / "metrics.json").read_text())
        pr = precision_recall(run, REFERENCE, env)
        return f"{d}/{s}", {"divergence": d, "seed": s, "fid_student": m["fid_student"],
                            "fid_teacher": m.get("fid_teacher"), "precision": pr["precision"],
                            "recall": pr["recall"], "gen_steps": m["gen_steps"],
                            "demo_wall_sec": m.get("demo_wall_sec"), **ess_summary(run / "metrics.jsonl")}

    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        for key, row in pool.map(one, todo):  # results written in order, after every run
            results[key] = row
            out.write_text(json.dumps(dict(sorted(results.items(), key=_order(a))), indent=1))
            print(key, json.dumps(row), flush=True)
    print(table(results))


def _order(a):
    """Sort key of a results item: seed, then the divergence's position on the command line."""
    rank = {d: i for i, d in enumerate(a.divergences)}
    return lambda kv: (kv[1]["seed"], rank.get(kv[1]["divergence"], len(rank)))


def table(results: dict) -> str:
    """Markdown: mean and min-max over seeds per divergence."""
    lines = ["| divergence | seeds | FID | precision | recall | mean h_ess | min h_ess | min h_ess per bin |",
             "|---|---|---|---|---|---|---|---|"]
    for d in dict.fromkeys(r["divergence"] for r in results.values()):
        rs = [r for r in results.values() if r["divergence"] == d]

        def f(k, nd=3):
            v = [r[k] for r in rs]
            return f"{np.mean(v):.{nd}f} ({min(v):.{nd}f}-{max(v):.{nd}f})"
        lines.append(f"| {d} | {len(rs)} | {f('fid_student', 1)} | {f('precision')} | {f('recall')} | "
                     f"{f('h_ess_mean')} | {f('h_ess_min')} | "
                     f"{f('h_ess_bin_min') if all(r.get('h_ess_bin_min') is not None for r in rs) else '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
