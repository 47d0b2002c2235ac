"""The hostile-but-fair sweep behind docs/robustness.md: each bad input against the command line, with what it got.

    python benchmarks/bad_inputs.py [--work DIR] [--only SUBSTRING]

Prints one markdown row per input: the input, the exit code, the first line of the error (or the outcome), and
whether a raw traceback was printed. Runs on CPU in a few minutes (tiny models: the 2-D toy and a 16x16 teacher).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
TOY = str(ROOT / "configs/toy2d.yaml")
SMALL = ["batch_size=64", "task.hidden=32", "task.fake_hidden=32", "task.eval_samples=2000", "task.kde_samples=256",
         "log.every=2", "log.progress=false", "schedule.critic_per_gen=2"]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def fd(*args, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fdistill.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=900, input=stdin)


def shell(cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=900)


def toy(out, *extra):
    return fd("distill", TOY, f"out={out}", *SMALL, *extra)


def summary(r: subprocess.CompletedProcess) -> tuple[str, bool]:
    err = r.stderr.strip().splitlines()
    tb = "Traceback (most recent call last)" in r.stderr
    msgs = [line for line in err if "error" in line.lower() or line.startswith(("warning", "fdistill"))]
    if r.returncode == 0:  # what a successful command said about the input: its warnings, else its last line
        warns = [line for line in err + r.stdout.splitlines() if line.startswith("warning")]
        out = [line for line in r.stdout.strip().splitlines() if line.strip() not in ("{", "}")]
        return ((warns[0] if warns else "ok: " + (out[-1] if out else "")).strip()[:220]), tb
    line = (msgs[-1] if msgs else (err[-1] if err else (r.stdout.strip().splitlines() or [""])[-1]))
    return line.strip()[:220], tb


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=None)
    p.add_argument("--only", default=None)
    a = p.parse_args(argv)
    w = Path(a.work or tempfile.mkdtemp(prefix="fdistill_bad_"))
    w.mkdir(parents=True, exist_ok=True)
    from tiny_models import tiny_edm_teacher

    teacher = tiny_edm_teacher(w / "teacher")
    rng = np.random.default_rng(0)
    np.savez(w / "data.npz", x=rng.integers(0, 256, (8, 16, 16, 1), dtype=np.uint8), y=np.arange(8) % 10)
    image = ["distill", ROOT / "configs/image.yaml", f"teacher={teacher}", f"data={w / 'data.npz'}", "steps=2",
             "batch_size=2", "schedule.critic_per_gen=1", "ema=[0.9]", "task.grid_samples=2", "task.loader_threads=0",
             "log.progress=false"]
    good_run = w / "image_run"
    assert fd(*image, f"out={good_run}").returncode == 0, "the tiny image run failed"

    cases = []

    def case(name):
        def deco(fn):
            cases.append((name, fn))
            return fn
        return deco

    for override in ("batch_size=0", "batch_size=-3", "steps=0", "optim.lr_gen=-1", "optim.lr_critic=-1e-3",
                     "ema=[1.5]", "divergence=alpha:x", "divergence=alpha:", "log.ckpt_every=0", "ratio=learnd",
                     "optim.betas=[0.9,1.2]", "mixed_precision=fp16", "schedule.scheme=dmd3", "divergance=js",
                     "log.trackers=tensorbord"):
        case(f"distill toy `{override}`")(lambda o=override: toy(w / f"bad_{o.split('=')[0]}", o))

    @case("distill: config file not found")
    def _():
        return fd("distill", w / "nope.yaml")

    @case("distill: empty config file")
    def _():
        (w / "empty.yaml").write_text("")
        return fd("distill", w / "empty.yaml", f"out={w / 'empty_run'}")

    @case("distill: config file not YAML")
    def _():
        (w / "bad.yaml").write_text("a: [1, 2\n")
        return fd("distill", w / "bad.yaml")

    @case("distill: `steps` below the step reached")
    def _():
        toy(w / "lower", "steps=4", "log.ckpt_every=2")
        return toy(w / "lower", "steps=2")

    @case("distill: resume with another divergence")
    def _():
        return toy(w / "lower", "steps=4", "divergence=forward_kl")

    @case("distill: `out=` an existing file")
    def _():
        (w / "afile").write_text("x")
        return toy(w / "afile", "steps=2")

    @case("distill: read-only run directory")
    def _():
        toy(w / "ro", "steps=2", "log.ckpt_every=2")
        os.chmod(w / "ro", 0o555)
        try:
            return toy(w / "ro", "steps=4")
        finally:
            os.chmod(w / "ro", 0o755)

    @case("distill --dry-run | head -1")
    def _():
        return shell(f"{sys.executable} -m fdistill.cli distill {TOY} --dry-run | head -1")

    @case("distill: Ctrl-C during training")
    def _():
        out = w / "ctrlc"
        proc = subprocess.Popen([sys.executable, "-m", "fdistill.cli", "distill", TOY, f"out={out}", *SMALL,
                                 "steps=100000", "log.ckpt_every=5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=ENV, cwd=ROOT)
        deadline = time.time() + 300
        while time.time() < deadline and not list(out.glob("ckpt-*")):
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        so, se = proc.communicate(timeout=120)
        return subprocess.CompletedProcess(proc.args, proc.returncode, so, se)

    @case("distill: a second run on the same `out`")
    def _():
        out = w / "locked"
        out.mkdir()
        (out / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
        return toy(out, "steps=2")

    @case("distill: learning rates 1e10 (diverges)")
    def _():
        return toy(w / "nan", "steps=30", "optim.lr_gen=1e10", "optim.lr_critic=1e10", "log.ckpt_every=2")

    @case("distill: newest checkpoint's tensor bytes damaged")
    def _():
        out = w / "damaged"
        toy(out, "steps=4", "log.ckpt_every=2", "log.keep_ckpts=2")
        f = out / "ckpt-00000004" / "generator.safetensors"
        raw = bytearray(f.read_bytes())
        n = 8 + int.from_bytes(raw[:8], "little")
        raw[n:] = b"\xff" * (len(raw) - n)
        f.write_bytes(bytes(raw))
        return toy(out, "steps=6", "log.ckpt_every=2", "log.keep_ckpts=2")

    for missing in ("optim_gen.json", "rng_rank0.json"):
        @case(f"distill: newest checkpoint without `{missing}`")
        def _(missing=missing):
            out = w / f"missing_{missing}"
            toy(out, "steps=4", "log.ckpt_every=2", "log.keep_ckpts=2")
            (out / "ckpt-00000004" / missing).unlink()
            return toy(out, "steps=6", "log.ckpt_every=2", "log.keep_ckpts=2")

    @case("distill image: truncated teacher safetensors")
    def _():
        t = w / "teacher_cut"
        shutil.copytree(teacher, t)
        f = t / "diffusion_pytorch_model.safetensors"
        f.write_bytes(f.read_bytes()[:5000])
        return fd(*image, f"teacher={t}", f"out={w / 'cut_run'}")

    @case("distill image: teacher folder of another model")
    def _():
        t = tiny_edm_teacher(w / "teacher_other", block_out_channels=(16, 32))
        cfg = json.loads((teacher / "config.json").read_text())
        (t / "config.json").write_text(json.dumps(cfg))  # the config of one model, the weights of another
        return fd(*image, f"teacher={t}", f"out={w / 'other_run'}")

    @case("distill image: RGB data for a one-channel teacher")
    def _():
        np.savez(w / "rgb.npz", x=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), y=np.arange(8) % 10)
        return fd(*image, f"data={w / 'rgb.npz'}", f"out={w / 'rgb_run'}")

    def nan_run():
        out = w / "nan_ckpt"
        if not out.exists():
            shutil.copytree(good_run, out)
            for f in out.glob("ckpt-*/*.safetensors"):
                if f.name.startswith(("generator", "ema")):
                    from safetensors.torch import load_file, save_file
                    sd = load_file(str(f))
                    save_file({k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in sd.items()},
                              str(f))
        return out

    @case("sample: a checkpoint with NaN weights")
    def _():
        return fd("sample", nan_run(), "--num", 4, "--outdir", w / "nan_samples", "--quiet")

    @case("export: a checkpoint with NaN weights")
    def _():
        return fd("export", nan_run(), w / "nan_export")

    @case("sample: truncated sample chunk in --npz")
    def _():
        fd("sample", good_run, "--num", 4, "--npz", w / "s.npz", "--quiet")
        parts = w / "s.npz.parts"  # the staging chunks of an interrupted run, one of them cut short
        parts.mkdir(exist_ok=True)
        (parts / "chunk-000000.npz").write_bytes((w / "s.npz").read_bytes()[:300])
        return fd("sample", good_run, "--num", 8, "--npz", w / "s.npz", "--quiet")

    @case("export: into a non-empty folder")
    def _():
        (w / "full").mkdir(exist_ok=True)
        (w / "full" / "x.txt").write_text("x")
        return fd("export", good_run, w / "full")

    def stats(name, **arrays):
        np.savez(w / name, **arrays)
        return w / name

    @case("eval fid: statistics with NaN")
    def _():
        mu = np.zeros(2048)
        mu[0] = np.nan
        return fd("eval", "fid", "--num", "all", w / "data.npz", stats("nan_stats.npz", mu=mu, sigma=np.eye(2048)))

    @case("eval fid: statistics of the wrong shape")
    def _():
        return fd("eval", "fid", "--num", "all", w / "data.npz", stats("shape.npz", mu=np.zeros(4), sigma=np.eye(3)))

    @case("eval fid: statistics file without mu/sigma")
    def _():
        return fd("eval", "fid", "--num", "all", w / "data.npz", stats("nomu.npz", m=np.zeros(4)))

    @case("eval fid: truncated npz")
    def _():
        raw = (w / "data.npz").read_bytes()
        (w / "cut.npz").write_bytes(raw[: len(raw) // 2])
        return fd("eval", "fid", "--num", "all", w / "cut.npz", w / "data.npz")

    @case("eval fid: npz holding object arrays")
    def _():
        np.savez(w / "obj.npz", x=np.array([{"a": 1}], dtype=object))
        return fd("eval", "fid", "--num", "all", w / "obj.npz", w / "data.npz")

    @case("eval fid: an image file that is not an image")
    def _():
        d = w / "notimg"
        d.mkdir(exist_ok=True)
        (d / "a.png").write_text("not an image")
        return fd("eval", "fid", "--num", "all", d, w / "data.npz")

    @case("eval fid --mode legacy_tensorflow: mixed image sizes")
    def _():
        from PIL import Image
        d = w / "mixed"
        d.mkdir(exist_ok=True)
        Image.new("RGB", (16, 16)).save(d / "a.png")
        Image.new("RGB", (20, 20)).save(d / "b.png")
        return fd("eval", "fid", "--num", "all", d, w / "data.npz", "--mode", "legacy_tensorflow")

    @case("eval pr: one image")
    def _():
        np.savez(w / "one.npz", x=rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8))
        return fd("eval", "pr", "--num", "all", w / "one.npz", w / "one.npz")

    for name, data in (("empty", b""), ("truncated", b"\x80\x04\x95\x10\x00"), ("not a pickle", b"hello world\n")):
        @case(f"convert-edm: {name} file")
        def _(name=name, data=data):
            f = w / f"net_{name.replace(' ', '_')}.pkl"
            f.write_bytes(data)
            return fd("convert-edm", f, w / f"conv_{name.replace(' ', '_')}")

    @case("lm dpo `beta=0`")
    def _():
        return fd("lm", "dpo", "beta=0", f"out={w / 'lm_beta'}")

    @case("lm fdpg `target=rlhf beta=0`")
    def _():
        return fd("lm", "fdpg", "target=rlhf", "beta=0", f"out={w / 'lm_rlhf'}")

    @case("lm fdpg: empty prompts file")
    def _():
        (w / "prompts.txt").write_text("\n")
        return fd("lm", "fdpg", f"prompts={w / 'prompts.txt'}", "steps=1", f"out={w / 'lm_empty'}")

    @case("lm dpo: `out` holding a run with another config")
    def _():
        out = w / "lm_reuse"
        out.mkdir(exist_ok=True)
        from fdistill.lm.config import DPOConfig, dump_yaml
        (out / "config.yaml").write_text("# fdistill lm dpo\n" + dump_yaml(DPOConfig(out=str(out), beta=0.5)))
        return fd("lm", "dpo", f"out={out}", "steps=1")

    print("| input | rc | what it gets | traceback |")
    print("|---|---|---|---|")
    tracebacks = 0
    for name, fn in cases:
        if a.only and a.only not in name:
            continue
        r = fn()
        line, tb = summary(r)
        tracebacks += tb
        print(f"| {name} | {r.returncode} | {line.replace('|', '/')} | {'yes' if tb else 'no'} |", flush=True)
    print(f"\n{tracebacks} raw traceback(s) among {len(cases)} inputs; work folder {w}")
    return 1 if tracebacks else 0


if __name__ == "__main__":
    sys.exit(main())
