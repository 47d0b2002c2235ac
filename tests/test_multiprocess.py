"""Several processes through accelerate (CPU, gloo): identical parameters on every rank, end to end (toy, MNIST,
and the flow-matching teachers SD3 / FLUX.1 in full and with LoRA students)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import tiny_teachers  # noqa: E402  (tests/ is on sys.path)
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


# ----------------------------------------------------------------------------------------------------------------
# Today's teachers (tests/tiny_teachers.py): a flow-matching transformer trained in full and a LoRA student


def _flow_task(family, tmp_path):
    """A tiny teacher of the family, four real images and prompts: (teacher folder, the run's overrides)."""
    teacher = getattr(tiny_teachers, f"tiny_{family}")(tmp_path / "teacher")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(images / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("a red bus\ntwo dogs in the snow\na plate of food\na man on a horse\n")
    return teacher, [f"teacher={teacher}", f"prompts={tmp_path / 'prompts.txt'}", f"data={images}",
                     "task.teacher_dtype=float32", "task.resolution=32", "task.max_sequence_length=16",
                     "task.eval_prompts=2", "steps=2", "batch_size=2", "log.every=1"]


@pytest.mark.parametrize("family,config,extra", [
    # full fine-tuning (slow: ~30-40 s on 2 shared cores; the FSDP2 test below runs it as its reference too)
    pytest.param("sd3", "configs/sd35_medium_js.yaml", ("gradient_checkpointing=false",), id="sd3-full",
                 marks=pytest.mark.slow),
    # LoRA students: the two adapters on one checkpointed base, under DDP
    pytest.param("flux", "configs/flux_dev_js.yaml", ("task.lora_rank=4", "gradient_checkpointing=true"),
                 id="flux-lora")])
def test_flow_teacher_two_processes_keep_ranks_identical_and_export(family, config, extra, tmp_path):
    from diffusers import DiffusionPipeline

    from fdistill.cli import main as cli_main

    teacher, args = _flow_task(family, tmp_path)
    out = tmp_path / "run"
    r = _launch(ROOT / config, out, *args, *extra)
    assert r.returncode == 0, r.stderr[-4000:]
    params = _same_on_both_ranks(out)
    ck = out / "ckpt-00000002"
    gen = load_file(str(ck / "generator.safetensors"))
    assert all(torch.equal(params[k], gen[k]) for k in params)
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["images_seen"] == 2 * 2 * 2
    if family == "flux":  # adapters only, in the generator and the fake score; B left zero, so training moved it
        fake = load_file(str(ck / "fake_score.safetensors"))
        assert all(".lora." in k for k in gen) and all(k.startswith("lora.") for k in fake)
        assert max(v.abs().max() for k, v in gen.items() if k.endswith("B.weight")) > 0
    else:  # the trained copy moved away from the teacher's weights
        base = load_file(str(teacher / "transformer" / "diffusion_pytorch_model.safetensors"))
        prefix = "denoiser.backbone."
        assert {k[len(prefix):] for k in gen} == set(base)
        assert any(not torch.equal(gen[prefix + k], base[k]) for k in base)
    # the two-process checkpoint exports the family's own pipeline (LoRA merged)
    assert cli_main(["export", str(out), str(tmp_path / "export")]) == 0
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "export", local_files_only=True)
    assert type(pipe).__name__ == {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family]
    assert (tmp_path / "export" / "lora").is_dir() == (family == "flux")


@pytest.mark.slow
def test_sd3_full_fine_tuning_under_fsdp2_trains_as_ddp(tmp_path):
    """docs/teachers.md's 8-GPU launch (FSDP2, JointTransformerBlock units) on two CPU processes: the same run as
    DDP up to the order of the gradient reductions (tests/fsdp_cpu_distill.py puts accelerate's FSDP on the CPU)."""
    _, args = _flow_task("sd3", tmp_path)
    args = [str(ROOT / "configs/sd35_medium_js.yaml"), *args, "gradient_checkpointing=false", "log.progress=false"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", DISTILL_DUMP_RANKS="1")
    fsdp = [ACCELERATE, "launch", "--use_fsdp", "--fsdp_version", "2", "--fsdp_cpu_ram_efficient_loading", "false",
            "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap",
            "JointTransformerBlock", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", str(ROOT / "tests/fsdp_cpu_distill.py"), *args, f"out={tmp_path / 'fsdp'}"]
    r = subprocess.run(fsdp, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    for rank in (0, 1):  # the trainable networks sharded (the frozen teacher is not prepared)
        assert r.stdout.count(f"rank {rank}: prepared FSDPModule") == 3, r.stdout[-2000:]
    r = _launch(args[0], tmp_path / "ddp", *args[1:])
    assert r.returncode == 0, r.stderr[-4000:]
    _same_on_both_ranks(tmp_path / "fsdp")
    for name in ("generator", "fake_score", "discriminator"):
        a, b = (load_file(str(tmp_path / run / "ckpt-00000002" / f"{name}.safetensors")) for run in ("fsdp", "ddp"))
        assert a.keys() == b.keys(), name
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=f"{name} {k}")
