"""FSDP through accelerate, on two CPU processes (gloo): the same training as DDP, exact resume after a kill,
and checkpoints that are plain full state dicts a single process loads.

accelerate turns FSDP on only for accelerators; tests/fsdp_cpu_distill.py switches its state to FSDP on CPU (see
there, also for what of the GPU path it does not run), after which the trainer runs accelerate's FSDP1 / FSDP2
code paths. On the toy, FSDP1 runs without an auto-wrap policy: the toy's final evaluation calls its own
references to the networks, which FSDP1's nested units do not allow on one process, and the trainer refuses that
combination up front (README, FSDP section; tested below, with ratio=oracle under FSDP1); FSDP2 wraps every Linear
and the fake score's MLPBackbone as units. The MNIST pipeline (two copies of one UNet) runs FSDP1 with nested
units.

The runs clip (grad_clip below the gradient norms) and accumulate two micro-batches, so the global gradient
norm and no_sync are both exercised. DDP and FSDP agree to float rounding (the norms are summed in another
order); a resumed FSDP run, whose optimizer states only the main process reads and broadcasts, agrees with the
uninterrupted one bit for bit. Under FSDP2 every unit reshards after forward after an evaluation as it did before.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_edm_teacher  # noqa: E402  (tests/ is on sys.path)

from fdistill.config import load_config

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
STEPS, B, ACCUM = 4, 16, 2
ARGS = [f"steps={STEPS}", f"batch_size={B}", f"optim.grad_accum={ACCUM}", "optim.grad_clip=0.05", "task.hidden=32",
        "task.fake_hidden=32", "task.eval_samples=500", "task.kde_samples=64", "schedule.critic_per_gen=2",
        "log.every=2", "log.ckpt_every=2", "log.sample_every=2", "log.progress=false"]
NAMES = ("generator", "fake_score", "discriminator", "ema_0.99", "ratio", "optim_gen", "optim_critic")
# FSDP1: accelerate's sync_module_states and cpu_ram_efficient_loading need an accelerator device. FSDP2:
# cpu_ram_efficient_loading breaks on a parameter held by the root module (the toy's anchors) in accelerate 1.15.
FSDP = {1: ["--fsdp_version", "1", "--fsdp_sync_module_states", "false", "--fsdp_cpu_ram_efficient_loading", "false"],
        # MLPBackbone is only in the fake score: each network is wrapped at the classes it has
        2: ["--fsdp_version", "2", "--fsdp_cpu_ram_efficient_loading", "false", "--fsdp_auto_wrap_policy",
            "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", "Linear,MLPBackbone"]}


def _launch(out, version=None, kill_at=None, fsdp_args=None, config="configs/toy2d.yaml", args=ARGS):
    mode = ["--use_fsdp", *(fsdp_args or FSDP[version])] if version else ["--multi_gpu"]
    script = "tests/fsdp_cpu_distill.py" if version else "tests/distill_hooks.py"
    cmd = [ACCELERATE, "launch", *mode, "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(ROOT / script), str(ROOT / config), f"out={out}", *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DISTILL_DUMP_RANKS="1")
    if kill_at is not None:
        env["DISTILL_KILL_AT_STEP"] = str(kill_at)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def _check_reshard_kept(stdout: str, evaluations: int):
    """fsdp_cpu_distill.py's reports of the FSDP2 units' reshard-after-forward settings around evaluations."""
    reports = re.findall(r"reshard_after_forward around an evaluation: before ([TF]*) after ([TF]*)", stdout)
    assert len(reports) == 2 * evaluations, stdout[-2000:]  # every process, every evaluation
    for before, after in reports:
        assert after == before, (before, after)
    # meaningful: the roots do not reshard after forward (accelerate leaves them to torch), the inner units do
    assert set(reports[0][0]) == {"T", "F"}, reports[0]


def _files(out, step=STEPS):
    return {name: load_file(str(out / f"ckpt-{step:08d}" / f"{name}.safetensors")) for name in NAMES}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    r = _launch(out)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_trains_as_ddp_resumes_exactly_and_saves_full_tensors(tmp_path, ddp, version):
    a, b = tmp_path / "a", tmp_path / "b"
    r = _launch(a, version)
    assert r.returncode == 0, r.stderr[-4000:]
    wrapper = "FullyShardedDataParallel" if version == 1 else "FSDPModule"
    for rank in (0, 1):  # all three networks were sharded
        assert r.stdout.count(f"rank {rank}: prepared {wrapper}") == 3, r.stdout[-2000:]

    # every process ends with the same generator, and that is DDP's (to float rounding)
    g0, g1 = (load_file(str(a / f"rank{k}_generator.safetensors")) for k in (0, 1))
    gd = load_file(str(ddp / "rank0_generator.safetensors"))
    assert g0.keys() == g1.keys() == gd.keys()
    for k in g0:
        assert torch.equal(g0[k], g1[k]), k
        torch.testing.assert_close(g0[k], gd[k], rtol=1e-5, atol=1e-6)
    # checkpoints: the same keys and shapes as DDP's (full tensors), the same values to float rounding
    fa, fd = _files(a), _files(ddp)
    for name in NAMES:
        assert fa[name].keys() == fd[name].keys(), name
        for k in fa[name]:
            assert fa[name][k].shape == fd[name][k].shape, (name, k)
            torch.testing.assert_close(fa[name][k], fd[name][k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
    for name in ("optim_gen", "optim_critic"):
        ck = f"ckpt-{STEPS:08d}"
        assert json.loads((a / ck / f"{name}.json").read_text()) == json.loads((ddp / ck / f"{name}.json").read_text())
    meta = json.loads((a / f"ckpt-{STEPS:08d}" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["images_seen"] == STEPS * B * ACCUM * 2
    # logged gradient norms are the global ones: DDP's
    la, ld = ([json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()] for out in (a, ddp))
    for ra, rd in zip(la, ld, strict=True):
        for key in ("grad_norm_gen", "grad_norm_fake", "grad_norm_disc"):
            assert ra[key] > 0.05 and abs(ra[key] - rd[key]) <= 1e-5 * rd[key], (key, ra[key], rd[key])
    assert (a / "samples_000002.png").is_file() and json.loads((a / "metrics.json").read_text())["gen_steps"] == STEPS
    if version == 2:  # grids at steps 2 and 4, and the final evaluation
        _check_reshard_kept(r.stdout, evaluations=3)

    # killed after step 3 (newest checkpoint: step 2), then resumed: bit for bit the uninterrupted run
    r = _launch(b, version, kill_at=3)
    assert r.returncode != 0 and (b / "ckpt-00000002").is_dir() and not (b / "metrics.json").exists()
    r = _launch(b, version)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resumed from" in r.stdout + r.stderr
    # the main process alone read the optimizer states (and broadcast them)
    assert r.stdout.count("rank 0: read optimizer") == 2 and "rank 1: read optimizer" not in r.stdout, r.stdout[-2000:]
    if version == 2:  # grid at step 4, final evaluation
        _check_reshard_kept(r.stdout, evaluations=2)
    fb = _files(b)
    for name in NAMES:
        assert fa[name].keys() == fb[name].keys(), name
        for k in fa[name]:
            assert torch.equal(fa[name][k], fb[name][k]), (name, k)

    # one process loads the checkpoint into the plain networks and optimizers
    from torch.optim.swa_utils import AveragedModel

    from fdistill import checkpoint as ckpt
    from fdistill.config import DistillConfig, from_dict
    from fdistill.pipelines import build_task

    folder = a / f"ckpt-{STEPS:08d}"
    cfg = from_dict(DistillConfig, json.loads((folder / "meta.json").read_text())["config"])
    task = build_task(cfg, "cpu")
    ema = AveragedModel(task.generator)
    for name, m in (("generator", task.generator), ("fake_score", task.fake_score),
                    ("discriminator", task.discriminator), ("ema_0.99", ema)):
        ckpt.load_module(m, folder / f"{name}.safetensors")
    torch.optim.AdamW(task.generator.parameters()).load_state_dict(ckpt.read_optimizer(folder, "gen"))
    sf, sd = ckpt.split_optim_state(ckpt.read_optimizer(folder, "critic"),
                                    [len(list(task.fake_score.parameters())), len(list(task.discriminator.parameters()))])
    torch.optim.AdamW(task.fake_score.parameters()).load_state_dict(sf)
    torch.optim.AdamW(task.discriminator.parameters()).load_state_dict(sd)
    for k, v in task.generator.state_dict().items():
        assert torch.equal(v, fa["generator"][k]), k
    with torch.no_grad():
        x = ema.module(task.generator.sample_latents(8, torch.Generator().manual_seed(0)))
    assert x.shape == (8, 2) and torch.isfinite(x).all()


def test_unet_pipeline_under_fsdp1_with_nested_units_is_ddp(tmp_path):
    """Generator and fake score are two copies of one UNet (accelerate's clip_grad_norm_ cannot tell them
    apart); FSDP1 wraps every ResnetBlock2D and Attention as its own unit (evaluation then runs on a plain
    copy). Without clipping this is DDP bit for bit."""
    teacher = tiny_edm_teacher(tmp_path / "teacher")
    args = [f"teacher={teacher}", "steps=2", "batch_size=2", "optim.grad_clip=0", "task.eval_samples=0",
            "task.grid_samples=4", "log.every=1", "log.sample_every=1", "log.progress=false"]
    fsdp1 = ["--fsdp_version", "1", "--fsdp_sync_module_states", "false", "--fsdp_cpu_ram_efficient_loading", "false",
             "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap",
             "ResnetBlock2D,Attention"]
    runs = {}
    for name, version in (("ddp", None), ("fsdp1", 1)):
        runs[name] = tmp_path / name
        r = _launch(runs[name], version, fsdp_args=fsdp1, config="configs/mnist.yaml", args=args)
        assert r.returncode == 0, r.stderr[-4000:]
    assert (runs["fsdp1"] / "samples_000001.png").is_file() and (runs["fsdp1"] / "metrics.json").is_file()
    for f in ["rank0_generator", "rank1_generator"] + [f"ckpt-00000002/{n}" for n in NAMES if n != "ema_0.99"] + \
            [f"ckpt-00000002/ema_{d}" for d in load_config(ROOT / "configs/mnist.yaml", []).ema]:
        x, y = (load_file(str(runs[name] / f"{f}.safetensors")) for name in ("ddp", "fsdp1"))
        assert x.keys() == y.keys(), f
        for k in x:
            assert torch.equal(x[k], y[k]), (f, k)


NESTED = ["--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", "Linear"]


@pytest.mark.parametrize("fsdp_args, args, message", [
    (FSDP[1] + NESTED, [], "evaluates through its own references"),
    (FSDP[1], ["ratio=oracle"], "ratio=oracle calls the generator outside its FSDP1 wrapper")])
def test_what_fsdp1_cannot_run_on_the_toy_is_refused_up_front(tmp_path, fsdp_args, args, message):
    """Run, these hang in the final evaluation (nested units on one process) or fail in the first generator
    iteration (the oracle's KDE calls the generator's flat shards); the trainer refuses them before wrapping."""
    r = _launch(tmp_path / "run", 1, fsdp_args=fsdp_args, args=ARGS + args)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-4000:]
    assert "prepared" not in r.stdout and not (tmp_path / "run").exists()
