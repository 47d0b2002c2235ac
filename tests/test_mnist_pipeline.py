"""The MNIST (image) pipeline: exact resume after a hard kill, as for the toy; the shipped teacher's assets."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from tiny_models import tiny_edm_teacher  # noqa: E402  (tests/ is on sys.path)

from fdistill import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


def _run_cmd(teacher, out):
    return [sys.executable, str(ROOT / "tests/distill_hooks.py"), str(ROOT / "configs/mnist.yaml"), f"out={out}",
            f"teacher={teacher}", "steps=6", "batch_size=4", "log.ckpt_every=2", "log.every=2", "log.progress=false",
            "task.eval_samples=0", "task.grid_samples=4", "ema=[0.9]"]


def _env(env=None):
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))


def _run(teacher, out, env=None):
    return subprocess.run(_run_cmd(teacher, out), capture_output=True, text=True, env=_env(env), cwd=ROOT,
                          timeout=600)


def test_mnist_kill_and_resume_is_exact(tmp_path):
    teacher = tmp_path / "teacher"
    tiny_edm_teacher(teacher)
    a, b = tmp_path / "a", tmp_path / "b"
    r = _run(teacher, a)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(teacher, b, {"DISTILL_KILL_AT_STEP": "3"})
    assert r.returncode != 0 and (b / "ckpt-00000002").is_dir() and not (b / "ckpt-00000004").exists()
    r = _run(teacher, b)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("generator", "fake_score", "discriminator", "ema_0.9", "ratio"):
        sa = load_file(str(a / "ckpt-00000006" / f"{name}.safetensors"))
        sb = load_file(str(b / "ckpt-00000006" / f"{name}.safetensors"))
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (name, k)
    for name in ("optim_gen", "optim_critic"):
        sa = load_file(str(a / "ckpt-00000006" / f"{name}.safetensors"))
        sb = load_file(str(b / "ckpt-00000006" / f"{name}.safetensors"))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_run_from_before_the_head_fix_resumes_with_its_old_heads(tmp_path):
    """Runs written before MNIST's discriminator read three teacher maps have no task.feature_modules in their
    config and one head on mid_block in their checkpoints: resumed with their own config, they keep that head
    (fdistill.pipelines.LEGACY_TASK_DEFAULTS) instead of failing on tensor shapes."""
    teacher = tmp_path / "teacher"
    tiny_edm_teacher(teacher)
    run = tmp_path / "old"
    r = subprocess.run([*_run_cmd(teacher, run), "steps=2", "task.feature_modules=[mid_block]"], capture_output=True,
                       text=True, env=_env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.loads((run / "config.json").read_text())
    del saved["task"]["feature_modules"]  # as an older fdistill wrote it
    (run / "config.json").write_text(json.dumps(saved))
    (run / "config.yaml").write_text(json.dumps(saved))  # JSON is YAML
    r = subprocess.run([sys.executable, "-m", "fdistill.cli", "distill", str(run / "config.yaml"), f"out={run}",
                        "steps=4"], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    old = load_file(str(run / "ckpt-00000002" / "discriminator.safetensors"))
    new = load_file(str(run / "ckpt-00000004" / "discriminator.safetensors"))
    assert sorted(old) == sorted(new) and all(old[k].shape == new[k].shape for k in old)
    assert not any(k.startswith("heads.1.") for k in new)  # one head, as the run was started


def test_a_checkpoint_of_other_shapes_names_the_mismatch_and_the_fix(tmp_path):
    (tmp_path / "ckpt-00000002").mkdir()
    path = tmp_path / "ckpt-00000002" / "discriminator.safetensors"
    ckpt.save_file({"weight": torch.zeros(3, 2), "bias": torch.zeros(3)}, str(path))
    try:
        ckpt.load_module(torch.nn.Linear(2, 4), path)
    except ckpt.CheckpointError as e:
        msg = str(e)
    else:
        raise AssertionError("a checkpoint of other shapes was loaded")
    assert "size mismatch" in msg and str(tmp_path / "config.yaml") in msg and f"out={tmp_path}" in msg


def test_shipped_teacher_assets_are_complete():
    """The embedded default's files: weights load, metadata holds the command and the measured figures."""
    from fdistill.pipelines.mnist import TEACHER_DIR, load_teacher
    from fdistill.pipelines.mnist_demo import REF_IMAGES, reference_features

    teacher, meta = load_teacher(TEACHER_DIR)
    assert sum(p.numel() for p in teacher.parameters()) < 2_500_000
    for key in ("train_command", "fid_teacher", "fid_teacher_one_step", "fid_num_samples", "nfe_teacher"):
        assert key in meta, key
    assert meta["fid_teacher"] < meta["fid_teacher_one_step"]
    feats = reference_features(TEACHER_DIR)
    assert feats.shape == (REF_IMAGES, 2048) and (feats >= 0).all()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        out = teacher(x * 80, torch.full((2,), 80.0), torch.tensor([3, 7]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_bf16_autocast_trains_on_the_cpu(tmp_path):
    """mixed_precision=bf16 on a CPU (accelerate's CPU autocast; measured faster on the demo, docs/discriminator.md):
    the losses stay finite, the master weights stay float32 and move off the teacher."""
    teacher = tmp_path / "teacher"
    tiny_edm_teacher(teacher)
    out = tmp_path / "bf16"
    cmd = [sys.executable, "-m", "fdistill.cli", "distill", str(ROOT / "configs/mnist.yaml"), f"out={out}",
           f"teacher={teacher}", "steps=3", "batch_size=4", "mixed_precision=bf16", "log.every=1",
           "log.ckpt_every=3", "log.progress=false", "task.eval_samples=0", "task.grid_samples=4", "ema=[0.9]"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [row[k] for row in rows for k in ("loss_gen", "loss_critic") if k in row]
    assert len(losses) >= 4 and all(torch.isfinite(torch.tensor(losses))), losses
    gen = load_file(str(out / "ckpt-00000003" / "generator.safetensors"))
    init = load_file(str(teacher / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float32 for v in gen.values())
    prefix = "denoiser.backbone."  # the generator wraps the teacher's UNet in its EDM preconditioning
    shared = [k for k in gen if k.startswith(prefix) and k[len(prefix):] in init]
    assert len(shared) == len(init)
    assert any(not torch.equal(gen[k], init[k[len(prefix):]]) for k in shared), "the generator did not move"
