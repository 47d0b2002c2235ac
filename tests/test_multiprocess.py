"""Several processes through accelerate (CPU, gloo): identical parameters on every rank, end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from tiny_models import tiny_edm_teacher  # noqa: E402  (tests/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def _launch(config, out, *overrides):
    # `--multi_gpu` is accelerate's torchrun launcher; without CUDA the processes use gloo on the CPU.
    # (`--cpu --num_processes 2` would start a single process unless MPI is installed.)
    cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(ROOT / "tests/distill_hooks.py"), str(config), f"out={out}", "log.progress=false",
           *overrides]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DISTILL_DUMP_RANKS="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


def _same_on_both_ranks(out):
    a = load_file(str(out / "rank0_generator.safetensors"))
    b = load_file(str(out / "rank1_generator.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return a


def test_toy_two_processes_keep_ranks_identical(tmp_path):
    out = tmp_path / "toy"
    r = _launch(ROOT / "configs/toy2d.yaml", out, "steps=4", "batch_size=32", "task.hidden=32", "task.fake_hidden=32",
                "task.eval_samples=1000", "log.every=2", "schedule.critic_per_gen=2")
    assert r.returncode == 0, r.stderr[-4000:]
    params = _same_on_both_ranks(out)
    ck = load_file(str(out / "ckpt-00000004" / "generator.safetensors"))
    for k in params:
        assert torch.equal(params[k], ck[k])
    meta = json.loads((out / "ckpt-00000004" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["images_seen"] == 4 * 32 * 2
    assert (out / "ckpt-00000004" / "rng_rank1.safetensors").is_file()
    assert json.loads((out / "metrics.json").read_text())["gen_steps"] == 4


def test_mnist_pipeline_two_processes(tmp_path):
    teacher = tiny_edm_teacher(tmp_path / "teacher")
    out = tmp_path / "mnist"
    r = _launch(ROOT / "configs/mnist.yaml", out, f"teacher={teacher}", "steps=2", "batch_size=2",
                "task.eval_samples=0", "task.grid_samples=4", "log.every=1")
    assert r.returncode == 0, r.stderr[-4000:]
    _same_on_both_ranks(out)
    assert (out / "samples.png").is_file() and (out / "ckpt-00000002").is_dir()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
