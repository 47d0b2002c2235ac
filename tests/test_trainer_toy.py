"""The trainer end to end on the 2-D toy: outputs, exact resume after a hard kill, config errors, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fdistill.cli import main as cli_main
from fdistill.config import ConfigError, DistillConfig, load_config
from fdistill.pipelines import build_run_task
from fdistill.trainer import distill

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["batch_size=64", "task.hidden=32", "task.fake_hidden=32", "task.eval_samples=2000", "task.kde_samples=256", "log.every=5",
         "log.progress=false", "schedule.critic_per_gen=2"]


def _run(out, *extra, env=None):
    cmd = [sys.executable, str(ROOT / "tests/distill_hooks.py"), str(ROOT / "configs/toy2d.yaml"), f"out={out}", *SMALL,
           *extra]
    e = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=ROOT, timeout=600)


def test_toy_run_writes_outputs(tmp_path):
    out = tmp_path / "run"
    r = _run(out, "steps=12", "log.ckpt_every=6", "ratio=oracle")
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    for key in ("mode_coverage", "mode_mass_tv", "off_mode_fraction", "calib_corr_mid", "calib_slope_mid"):
        assert key in m
    assert 0 <= m["off_mode_fraction"] <= 1 and 0 <= m["mode_coverage"] <= 1
    assert (out / "samples.png").is_file() and (out / "config.yaml").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [5, 10, 12]
    for key in ("loss_gen", "loss_dm", "loss_disc", "loss_denoise", "r_mean", "r_min", "r_max", "h_mean",
                "h_min", "h_max", "h_ess", "grad_norm_gen", "grad_norm_fake", "grad_norm_disc", "kimg",
                "calib_corr", "calib_slope"):
        assert key in rows[-1], key
    assert abs(rows[-1]["h_mean"] - 1) < 1e-4  # stage-2 normalisation
    ckpts = sorted(p.name for p in out.glob("ckpt-*"))
    assert ckpts == ["ckpt-00000012"]  # rotation keeps 1 (config keep_ckpts)


def test_kill_and_resume_is_exact(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ("steps=16", "log.ckpt_every=4")
    r = _run(a, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(b, *args, env={"DISTILL_KILL_AT_STEP": "10"})
    assert r.returncode != 0  # killed after step 10; the newest checkpoint is step 8
    assert not (b / "metrics.json").exists()
    assert (b / "ckpt-00000008").is_dir()
    r = _run(b, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    # the row of step 10 (written before the kill, after the checkpoint of step 8) is not logged twice
    steps = [json.loads(line)["step"] for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 16]
    for name in ("generator", "fake_score", "discriminator", "ema_0.99", "ratio"):
        sa = load_file(str(a / "ckpt-00000016" / f"{name}.safetensors"))
        sb = load_file(str(b / "ckpt-00000016" / f"{name}.safetensors"))
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (name, k)


def test_resume_refuses_a_different_config(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "steps=2", "log.ckpt_every=2").returncode == 0
    r = _run(out, "steps=4", "divergence=forward_kl")
    assert r.returncode == 2 and "different config" in r.stderr


def test_a_toy_run_from_before_the_bounded_spread_resumes_unbounded(tmp_path):
    """A run whose saved config predates task.spread_max (and the new anchor defaults) resumes with the generator
    it was started with: an unbounded spread (fdistill.pipelines.LEGACY_TASK_DEFAULTS)."""
    from fdistill.pipelines import legacy_task_keys

    out = tmp_path / "run"
    assert _run(out, "steps=2", "log.ckpt_every=2").returncode == 0
    saved = json.loads((out / "config.json").read_text())
    for key in ("spread_max", "anchor_init"):
        del saved["task"][key]  # as an older fdistill wrote it
    (out / "config.json").write_text(json.dumps(saved))
    (out / "config.yaml").write_text(json.dumps(saved))  # JSON is YAML
    cfg = load_config(out / "config.yaml", [f"out={out}"])
    assert legacy_task_keys(cfg) == {"spread_max": 0.0, "anchor_init": 3.0}
    r = subprocess.run([sys.executable, "-m", "fdistill.cli", "distill", str(out / "config.yaml"), f"out={out}",
                        "steps=4"], capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "ckpt-00000004").is_dir()


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="divergance"):
        load_config(ROOT / "configs/toy2d.yaml", ["divergance=js"])
    with pytest.raises(ConfigError, match="Did you mean 'optim.lr_gen'"):
        load_config(ROOT / "configs/toy2d.yaml", ["optim.lr_gne=1e-3"])
    with pytest.raises(ConfigError, match="steps must be int"):
        load_config(ROOT / "configs/toy2d.yaml", ["steps=many"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    cfg = load_config(ROOT / "configs/toy2d.yaml", ["optim.lr_gen=1e-5", "ema=[0.9,0.99]"])
    assert cfg.optim.lr_gen == 1e-5 and cfg.ema == [0.9, 0.99]


@pytest.mark.parametrize("key, value", [("schedule.ema_every", "step"), ("gen_cond", "paired"),
                                        ("schedule.scheme", "dmd3"), ("objective.disc_features", "student"),
                                        ("objective.denoise_loss", "v"), ("ratio_norm.bin_spacing", "log")])
def test_recipe_keys_are_checked_by_the_config_before_anything_is_written(tmp_path, key, value):
    """The config layer refuses the values the trainer and the objective read (formerly refused by the trainer,
    or by the objective after the run directory was written); a config built in code is refused by distill()
    before the run directory exists."""
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(ROOT / "configs/toy2d.yaml", [f"{key}={value}", f"out={out}"])
    cfg = load_config(ROOT / "configs/toy2d.yaml", [f"out={out}", *SMALL, "steps=1"])
    task = build_run_task(cfg)
    section, _, name = key.rpartition(".")
    setattr(getattr(cfg, section) if section else cfg, name, value)
    assert isinstance(cfg, DistillConfig)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        distill(cfg, task)
    assert not out.exists()


def test_cli_help_and_dry_run(capsys, tmp_path):
    assert cli_main(["--help"]) == 0
    text = capsys.readouterr().out
    for cmd in ("distill", "demo", "sample", "export", "eval", "convert-edm", "lm"):
        assert cmd in text
    assert cli_main(["distill", str(ROOT / "configs/toy2d.yaml"), "divergence=alpha:0.5", "--dry-run"]) == 0
    assert "divergence: alpha:0.5" in capsys.readouterr().out
    assert cli_main(["distill", str(ROOT / "configs/toy2d.yaml"), "task.num_mode=3", f"out={tmp_path}/r"]) == 2
    assert "task.num_modes" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing written for a config that fails validation


def test_toy_generators():
    from fdistill.generator import MLPGenerator
    from fdistill.pipelines import build_task, toy2d

    torch.manual_seed(0)
    g = toy2d.AnchorGenerator(latent_dim=8, hidden=32, anchors=16)
    x = g(g.sample_latents(64))
    assert x.shape == (64, 2)
    x.pow(2).sum().backward()
    assert g.anchors.grad.abs().sum() > 0 and g.net[0].weight.grad.abs().sum() > 0
    # without the linear spread every output is a convex combination of the anchors
    with torch.no_grad():
        g.spread.weight.zero_()
        y = g(g.sample_latents(256))
    lo, hi = g.anchors.min(0).values, g.anchors.max(0).values
    assert bool(((y >= lo - 1e-5) & (y <= hi + 1e-5)).all())
    # spread_max bounds the spread's total std softly: nearly the identity for a small A, at most the bound for a large
    b = toy2d.AnchorGenerator(latent_dim=8, hidden=32, anchors=16, spread_max=0.5)
    z = b.sample_latents(4096)
    with torch.no_grad():
        b.spread.weight.copy_(0.01 * torch.ones(2, 8))
        mixed = torch.softmax(b.net(z), dim=1) @ b.anchors
        assert torch.allclose(b(z) - mixed, z @ b.spread.weight.T, rtol=5e-3, atol=1e-6)
        b.spread.weight.mul_(1000)  # ||A||_F = 40
        rms = (b(z) - mixed).pow(2).sum(1).mean().sqrt()
    assert 0.45 < rms <= 0.5 * 1.05, rms  # the sample estimate of ||A||_F after the bound

    def build(*over):
        return build_task(load_config(ROOT / "configs/toy2d.yaml", ["task.hidden=16", "task.fake_hidden=16", *over]),
                          "cpu")

    assert isinstance(build().generator, toy2d.AnchorGenerator)
    plain = build("task.generator=mlp").generator
    assert type(plain) is MLPGenerator
    assert isinstance(build("task.generator=mlp", "task.latent_components=4").generator, toy2d.MixtureLatentGenerator)
    with pytest.raises(ValueError, match="task.generator"):
        build("task.generator=gan")
    with pytest.raises(ValueError, match="latent_components"):
        build("task.latent_components=4")


def test_default_toy_converges(tmp_path):
    """The issue's criterion on the default run itself (js, seed 0, ~2 min on one thread): under 10% of the samples
    off every mode, and at least 6 of the 8 modes with a quarter of their mass."""
    out = tmp_path / "run"
    e = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "fdistill.cli", "distill", str(ROOT / "configs/toy2d.yaml"),
                        f"out={out}", "divergence=js", "log.progress=false"],
                       capture_output=True, text=True, env=e, cwd=ROOT, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["off_mode_fraction"] < 0.10, m
    assert m["mode_coverage"] >= 0.75, m


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 8))
def test_default_toy_converges_on_other_seeds(tmp_path, seed):
    """The same criterion as test_default_toy_converges on seven more seeds (~70-300 s each): the default converges
    on every seed measured, not only on the one it was tuned on (docs/robustness.md, the toy across seeds)."""
    out = tmp_path / "run"
    e = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "fdistill.cli", "distill", str(ROOT / "configs/toy2d.yaml"),
                        f"out={out}", "divergence=js", f"seed={seed}", "log.progress=false"],
                       capture_output=True, text=True, env=e, cwd=ROOT, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["off_mode_fraction"] < 0.10, m
    assert m["mode_coverage"] >= 0.75, m


def test_discriminator_at_chance_warns_once_per_stretch(tmp_path):
    """The chance warning (log.chance_warn_rows consecutive logged rows with disc_acc within log.chance_margin of
    0.5) is printed once when the stretch reaches the count; a margin of 0 never fires. A margin of 0.5 counts every
    row whose accuracy is strictly between 0 and 1, so the trigger does not depend on how the head learns."""
    r = _run(tmp_path / "a", "steps=6", "log.every=1", "log.chance_warn_rows=3", "log.chance_margin=0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if "discriminator at chance" in line]
    assert len(lines) == 1 and "up to step 3" in lines[0] and "f-weighting inactive" in lines[0], r.stdout[-2000:]
    assert "best noise-level bin" in lines[0]  # the toy logs per-bin accuracies
    r = _run(tmp_path / "b", "steps=6", "log.every=1", "log.chance_warn_rows=3", "log.chance_margin=0.0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "discriminator at chance" not in r.stdout + r.stderr


def test_toy_refuses_no_evaluation_samples(tmp_path):
    r = _run(tmp_path / "run", "steps=2", "task.eval_samples=0")
    assert r.returncode != 0 and "task.eval_samples must be >= 1" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_lr_factor_schedules():
    from fdistill.config import OptimConfig
    from fdistill.iteration import lr_factor

    const = OptimConfig()
    assert [lr_factor(const, s, 10) for s in (0, 5, 10)] == [1.0, 1.0, 1.0]
    lin = OptimConfig(lr_decay="linear", lr_decay_start=0.5, lr_final=0.2)
    assert [lr_factor(lin, s, 10) for s in (0, 5)] == [1.0, 1.0]  # flat until the start
    assert lr_factor(lin, 10, 10) == pytest.approx(0.2) and lr_factor(lin, 7, 10) == pytest.approx(0.2 + 0.8 * 0.6)
    cos = OptimConfig(lr_decay="cosine")
    assert lr_factor(cos, 5, 10) == pytest.approx(0.5) and lr_factor(cos, 10, 10) == pytest.approx(0.0)
    assert lr_factor(cos, 2, 10) > 1 - 0.2  # a cosine stays above the line early on


def test_lr_decay_is_logged_and_resumes_exactly(tmp_path):
    """optim.lr_decay: every optimizer's rate follows the factor of the generator step (logged as lr_factor), and
    a run killed and resumed from a checkpoint follows the same schedule bit for bit (same computation)."""
    a, b = tmp_path / "a", tmp_path / "b"
    args = ("steps=16", "log.ckpt_every=4", "optim.lr_decay=linear", "optim.lr_final=0.25")
    assert _run(a, *args).returncode == 0
    rows = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    # the row of step s carries the factor of its last update, made at generator step s - 1
    assert [round(r["lr_factor"], 6) for r in rows] == [round(0.25 + 0.75 * (1 - (s - 1) / 16), 6)
                                                         for s in (5, 10, 15, 16)]
    r = _run(b, *args, env={"DISTILL_KILL_AT_STEP": "10"})
    assert r.returncode != 0
    r = _run(b, *args)
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-3000:]
    for name in ("generator", "fake_score", "discriminator"):
        sa = load_file(str(a / "ckpt-00000016" / f"{name}.safetensors"))
        sb = load_file(str(b / "ckpt-00000016" / f"{name}.safetensors"))
        for k in sa:
            assert torch.equal(sa[k], sb[k]), (name, k)
    # a constant-rate run differs: the decay acts on the weights
    c = tmp_path / "c"
    assert _run(c, "steps=16", "log.ckpt_every=16").returncode == 0
    ga = load_file(str(a / "ckpt-00000016" / "generator.safetensors"))
    gc = load_file(str(c / "ckpt-00000016" / "generator.safetensors"))
    assert any(not torch.equal(ga[k], gc[k]) for k in ga)
