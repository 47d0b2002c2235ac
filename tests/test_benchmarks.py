"""The benchmark scripts run on the tiny CPU configuration and report every field they promise.

Timings are not checked (CPU load varies); the counted network calls are, since they are exact.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fdistill.config import load_config
from fdistill.iteration import TrainingIteration
from fdistill.objective import PER_BIN_DEN, PER_BIN_NUM
from fdistill.pipelines import build_run_task
from fdistill.trainer import distill

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args, tmp_path, name):
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--threads", "1",
                           "--out", str(out)], check=False, capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(out.read_text()), last


PHASE_KEYS = {"time_s_median", "time_s_min", "time_s_max", "time_s_all", "images_per_s", "peak_mem_mb",
              "peak_mem_kind", "calls", "denoiser_calls_per_iter"}
NETS = {"generator", "teacher", "fake_score", "discriminator"}


def test_step_benchmark_tiny(tmp_path):
    r, summary = _run("step.py", "--config", "tiny", "--iters", "2", "--warmup", "1", "--repeats", "2",
                      tmp_path=tmp_path, name="step")
    assert r["complete"] and r["config"] == "tiny" and r["device"] == "cpu"
    assert summary.startswith("[step] tiny") and summary == r["summary"]
    for key in ("loadavg", "cpu_count"):
        assert key in r["load_start"] and key in r["load_end"]
    assert len(r["load_start"]["loadavg"]) == 3
    s = r["settings"]
    assert s["divergences"] == ["js", "reverse_kl"] and s["warmup"] == 1 and s["iters"] == 2 and s["repeats"] == 2
    assert set(r["phases"]) == {"js", "reverse_kl"}
    for div in ("js", "reverse_kl"):
        for ph in ("generator", "critic"):
            p = r["phases"][div][ph]
            assert PHASE_KEYS <= set(p), PHASE_KEYS - set(p)
            assert len(p["time_s_all"]) == 2 and p["time_s_min"] <= p["time_s_median"] <= p["time_s_max"]
            assert p["time_s_median"] > 0 and p["images_per_s"] == pytest.approx(s["batch"] / p["time_s_median"])
            assert p["peak_mem_mb"] > 0 and p["peak_mem_kind"] in ("cpu_rss", "cpu_ru_maxrss")
            assert set(p["calls"]) >= NETS
        assert r["phases"][div]["generator_step"]["critic_per_gen"] == s["critic_per_gen"]
    assert r["generator"] == r["phases"]["js"]["generator"] and r["critic"] == r["phases"]["js"]["critic"]

    # The cost model: a generator iteration is one generator forward+backward, ONE teacher pass (score and features)
    # with the gradient flowing back through it to x_t, one fake-score forward without backward
    g = r["calls_per_iter"]["generator"]
    assert {n: (g[n]["forward"], g[n]["backward"]) for n in NETS} == {
        "generator": (1, 1), "teacher": (1, 1), "fake_score": (1, 0), "discriminator": (1, 1)}
    assert g["teacher"]["modes"] == {"x0": 0, "features": 0, "both": 1} and not g["teacher"]["param_grads"]
    # a critic iteration: generator without grad, fake score trained, teacher features of fake + real in one pass
    c = r["calls_per_iter"]["critic"]
    assert {n: (c[n]["forward"], c[n]["backward"]) for n in NETS} == {
        "generator": (1, 0), "teacher": (1, 0), "fake_score": (1, 1), "discriminator": (1, 1)}
    assert c["teacher"]["modes"]["features"] == 1 and c["teacher"]["rows"] == 2 * s["batch"]
    assert r["phases"]["js"]["critic"]["denoiser_calls_per_iter"]["teacher"]["features"] == 1.0

    ov = r["overhead"]
    assert ov["divergence"] == "js" and ov["baseline"] == "reverse_kl"
    for key in ("generator_time_ratio", "critic_time_ratio", "generator_step_time_ratio",
                "generator_time_ratio_paired_median", "weighting_fraction_of_generator_iter"):
        assert isinstance(ov[key], float)
    assert set(ov["weighting_us"]) == {"js", "reverse_kl"}
    assert r["flops_per_iter"]["generator"] > 0 and r["flops_per_iter"]["critic"] > 0
    assert r["host_syncs_per_iter"] == {"generator": None, "critic": None}  # CUDA only


@pytest.mark.parametrize("recipe", [["recipe=dmd2"], ["recipe=fastgen", "schedule.critic_per_gen=1"]])
def test_step_benchmark_runs_the_trainers_iteration(tmp_path, recipe):
    """benchmarks/step.py has no update step of its own: its Runner drives the trainer's TrainingIteration, so its
    first critic + generator iteration gives the losses and gradient norms of the trainer's first generator step
    bit for bit (same config, seed and initial weights; one process, the same computation), under either recipe
    (fastgen: conditions of the real batch, unclipped critic, per-iteration EMAs)."""
    spec = importlib.util.spec_from_file_location("step_benchmark", ROOT / "benchmarks" / "step.py")
    step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step)
    assert not {"critic_update", "generator_update", "critic_loss", "generator_loss"} & set(vars(step))
    cfg = load_config(ROOT / "configs" / "toy2d.yaml", [
        f"out={tmp_path / 'run'}", "steps=1", "batch_size=32", "schedule.critic_warmup=0", "log.every=1",
        "log.progress=false", "task.hidden=16", "task.fake_hidden=16", "task.eval_samples=500",
        "task.kde_samples=64", *recipe])
    distill(cfg, build_run_task(cfg))
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])

    a = step.parse_args(["--divergence", cfg.divergence, "--baseline", ""])
    device = torch.device("cpu")
    step.resolve_args(a, cfg, device)
    runner = step.Runner(build_run_task(cfg), cfg, [cfg.divergence], device, a)
    it = runner.iterations[cfg.divergence]
    assert type(it) is TrainingIteration and it.batch_size == cfg.batch_size
    runner.critic(cfg.divergence)
    runner.generator_iter(cfg.divergence)
    logs = {k: v for k, v in it.logs.items() if not k.startswith((PER_BIN_NUM, PER_BIN_DEN))}
    assert {"loss_dm", "grad_norm_fake", "grad_norm_disc", "grad_norm_gen"} <= set(logs)
    for key, values in logs.items():
        assert len(values) == 1 and float(values[0]) == row[key], key


def test_batch_search_backs_off_on_out_of_memory(tmp_path):
    """--batch auto (what gpu.sh uses) on a simulated device that runs out of memory above batch 8, and once more
    at 8 after the search: the search stops at 16, the measurement retries one candidate lower."""
    r, _ = _run("step.py", "--config", "tiny", "--batch", "auto", "--batches", "2,4,8,16", "--simulate-oom-above", "8",
                "--simulate-oom-after-search", "4", "--baseline", "js", "--warmup", "0", "--iters", "1",
                "--repeats", "1", "--no-flops", tmp_path=tmp_path, name="search")
    assert [(t["batch"], t["ok"]) for t in r["batch_search"]] == [(2, True), (4, True), (8, True), (16, False)]
    assert r["oom_retries"] == [8] and r["settings"]["batch"] == 4 and r["complete"]
    assert r["generator"]["images_per_s"] == pytest.approx(4 / r["generator"]["time_s_median"])
    assert "overhead" not in r  # one divergence only


def test_sampling_benchmark_tiny(tmp_path):
    r, summary = _run("sampling.py", "--config", "tiny", "--steps", "4", "--repeats", "2",
                      tmp_path=tmp_path, name="sampling")
    assert summary.startswith("[sampling] tiny") and summary == r["summary"]
    assert r["student"]["nfe"] == 1 and r["teacher"]["nfe"] == 7 and r["nfe_ratio"] == 7
    assert r["teacher"]["calls_counted"]["x0"] == 7  # Heun: 2 * steps - 1 teacher evaluations
    for who in ("student", "teacher"):
        assert r[who]["images_per_s"] > 0 and len(r[who]["seconds_per_image_all"]) == 2
        assert r[who]["peak_mem_mb"] > 0
    assert r["speedup"] == pytest.approx(r["student"]["images_per_s"] / r["teacher"]["images_per_s"])
    assert len(r["load_start"]["loadavg"]) == 3


@pytest.mark.slow
@pytest.mark.parametrize("config", ["imagenet64", "sd15", "sd15-cfg-split"])
def test_step_benchmark_fullsize_code_paths_at_toy_width(tmp_path, config):
    """What benchmarks/gpu.sh runs, at toy widths on the CPU (ADM blocks; SD with CFG, R1 and checkpointing)."""
    name, *split = config.split("-", 1)
    r, _ = _run("step.py", "--config", name, "--tiny", "--batch", "2", "--iters", "1", "--warmup", "1",
                "--repeats", "1", *(["--cfg-split"] if split else []),
                *(["objective.r1_gamma=1.0"] if name == "sd15" else []),  # the R1 path (recipe fastgen: gamma 0)
                tmp_path=tmp_path, name=config)
    assert r["complete"] and r["config"] == f"{name}-tiny"
    if name == "sd15":
        g = r["calls_per_iter"]["generator"]
        assert r["settings"]["grad_ckpt"] and r["settings"]["r1_gamma"] == 1.0
        if split:  # conditional pass with features and gradient, unconditional x0 pass apart
            assert g["teacher"]["forward"] == 2 and g["teacher"]["rows"] == 4
            assert g["teacher_inner"]["modes"] == {"x0": 1, "features": 0, "both": 1}
        else:  # CFG: conditional and unconditional halves in one batched teacher pass
            assert g["teacher"]["forward"] == 1 and g["teacher"]["rows"] == 4


def test_mnist_spread_measures_ink_within_each_class():
    """benchmarks/mnist_spread.py's figure (docs/discriminator.md): ink = mean of the image in [0, 1]; its spread is
    taken within each class, so a student that varies only between classes scores 0."""
    spec = importlib.util.spec_from_file_location("mnist_spread", ROOT / "benchmarks" / "mnist_spread.py")
    spread = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spread)
    labels = torch.arange(40) % 10
    per_class = torch.linspace(-1, 1, 10)[labels].view(-1, 1, 1, 1).expand(-1, 1, 4, 4)
    flat = spread.ink_spread(per_class, labels)
    assert flat["ink_std_within_class"] == 0 and flat["ink_std"] > 0.3
    # two inks per class, 0.25 and 0.75 of the page: the sample std of [a, a, b, b] is |b - a| / sqrt(3) = 0.2887
    ink = torch.where(torch.arange(40) < 20, 0.25, 0.75)
    varied = (ink * 2 - 1).view(-1, 1, 1, 1).expand(-1, 1, 4, 4)
    row = spread.ink_spread(varied, labels)
    assert row["ink_mean"] == pytest.approx(0.5) and row["ink_std_within_class"] == pytest.approx(0.2887, abs=1e-4)
    # values outside [-1, 1] are clamped like the saved images
    assert spread.ink_spread(varied * 3, labels)["ink_mean"] == pytest.approx(0.5)
