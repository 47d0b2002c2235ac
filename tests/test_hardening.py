"""Hostile but fair inputs against the trainer: nothing written before every check has passed, no non-finite
weight survives (skipped updates, a diverging run aborts, damaged checkpoints are passed over), one process per
run directory, and resume bookkeeping (metrics rows, timings)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fdistill import checkpoint as ckpt
from fdistill.cli import main as cli_main
from fdistill.config import ConfigError, DistillConfig, load_config, to_dict
from fdistill.errors import RunLocked, TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs/toy2d.yaml")
SMALL = ["batch_size=64", "task.hidden=32", "task.fake_hidden=32", "task.eval_samples=2000", "task.kde_samples=256",
         "log.every=2", "log.progress=false", "schedule.critic_per_gen=2"]


def _run(out, *extra, env=None):
    cmd = [sys.executable, "-m", "fdistill.cli", "distill", TOY, f"out={out}", *SMALL, *extra]
    e = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, env=e, cwd=ROOT, timeout=600)


def _finite_folder(folder: Path) -> bool:
    return all(bool(torch.isfinite(v).all()) for f in folder.glob("*.safetensors")
               for v in load_file(str(f)).values() if v.is_floating_point())


BAD = [  # (override, the key the message must name)
    ("batch_size=0", "batch_size"),
    ("steps=0", "steps"),
    ("steps=-5", "steps"),
    ("optim.lr_gen=-1", "optim.lr_gen"),
    ("optim.lr_critic=-1e-3", "optim.lr_critic"),
    ("optim.lr_gen=.nan", "optim.lr_gen"),
    ("ema=[1.5]", "ema"),
    ("optim.betas=[0.9,1.5]", "optim.betas"),
    ("optim.lr_decay=cosin", "optim.lr_decay"),
    ("optim.lr_final=1.5", "optim.lr_final"),
    ("optim.weight_decay=-1", "optim.weight_decay"),
    ("divergence=alpha:x", "alpha"),
    ("divergence=alpha:", "alpha"),
    ("divergence=klx", "divergence"),
    ("log.ckpt_every=0", "log.ckpt_every"),
    ("log.every=0", "log.every"),
    ("log.keep_ckpts=0", "log.keep_ckpts"),
    ("ratio=learnd", "ratio"),
    ("mixed_precision=fp16", "fp16"),
    ("schedule.scheme=dmd3", "schedule.scheme"),
    ("schedule.critic_per_gen=0", "schedule.critic_per_gen"),
]


@pytest.mark.parametrize("override,key", BAD)
def test_a_bad_value_is_refused_naming_the_key_before_anything_is_written(tmp_path, capsys, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TOY, [override])
    out = tmp_path / "run"
    assert cli_main(["distill", TOY, f"out={out}", override]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_an_empty_config_file_is_refused(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="empty"):
        load_config(tmp_path / "empty.yaml")


def test_a_typo_does_not_poison_the_run_directory(tmp_path, capsys):
    """Issue: `ratio=learnd out=D` wrote D/config.json, then failed; the corrected command was refused."""
    out = tmp_path / "D"
    assert cli_main(["distill", TOY, "ratio=learnd", f"out={out}"]) == 2
    assert "ratio" in capsys.readouterr().err
    assert not out.exists()
    # a directory left by such a start (a config, no checkpoint) holds no run to protect: the next start proceeds
    out.mkdir()
    other = to_dict(DistillConfig())
    (out / "config.json").write_text(json.dumps(other))
    r = _run(out, "steps=2", "log.ckpt_every=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["pipeline"] == "toy2d"


def test_steps_below_the_reached_step_are_refused(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "steps=4", "log.ckpt_every=2").returncode == 0
    before = (out / "config.yaml").read_text()
    r = _run(out, "steps=2", "log.ckpt_every=2")
    assert r.returncode == 2 and "steps=2 is below" in r.stderr and "Traceback" not in r.stderr
    assert (out / "config.yaml").read_text() == before


def test_a_diverging_run_skips_counts_and_aborts_with_finite_checkpoints(tmp_path):
    out = tmp_path / "run"
    r = _run(out, "steps=30", "log.ckpt_every=2", "optim.lr_gen=1e10", "optim.lr_critic=1e10")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "training diverged at generator step" in r.stderr and "optim.lr_gen" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (out / "metrics.json").exists()  # not a completed run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["skipped_updates"] > 0
    ckpts = ckpt.list_checkpoints(out)
    assert ckpts and all(_finite_folder(c) for c in ckpts)


def test_a_non_finite_checkpoint_is_never_written(tmp_path):
    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight[0, 0] = float("nan")
    with pytest.raises(ckpt.CheckpointError, match="non-finite"):
        ckpt.save_checkpoint(tmp_path, 1, {"generator": net}, {}, {"gen_step": 1, "world_size": 1})
    assert ckpt.list_checkpoints(tmp_path) == []


def _damage(path: Path):
    """NaN bytes over the tensor data of a safetensors file, its header left intact."""
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    raw[header:] = b"\xff" * (len(raw) - header)
    path.write_bytes(bytes(raw))


def test_a_damaged_checkpoint_is_passed_over_and_rows_are_not_repeated(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "steps=8", "log.ckpt_every=4", "log.keep_ckpts=2").returncode == 0
    assert [c.name for c in ckpt.list_checkpoints(out)] == ["ckpt-00000004", "ckpt-00000008"]
    _damage(out / "ckpt-00000008" / "generator.safetensors")
    rng = out / "ckpt-00000004" / "rng_rank0.json"
    saved = rng.read_bytes()
    rng.unlink()  # a missing file is named too
    with pytest.raises(ckpt.CheckpointError, match="rng_rank0.json"):
        ckpt.verify_checkpoint(out / "ckpt-00000004", 1)
    rng.write_bytes(saved)
    r = _run(out, "steps=12", "log.ckpt_every=4", "log.keep_ckpts=2")
    assert r.returncode == 0, r.stderr[-3000:]
    out_text = r.stdout + r.stderr
    assert "ckpt-00000008" in out_text and "previous checkpoint ckpt-00000004" in out_text
    assert "resumed from" in out_text and "ckpt-00000004" in out_text
    for c in ckpt.list_checkpoints(out):
        assert _finite_folder(c), c
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) == [2, 4, 6, 8, 10, 12]


def test_no_usable_checkpoint_is_an_error_naming_the_file(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "steps=2", "log.ckpt_every=2").returncode == 0
    _damage(out / "ckpt-00000002" / "fake_score.safetensors")
    r = _run(out, "steps=4", "log.ckpt_every=2")
    assert r.returncode == 2 and "fake_score.safetensors" in r.stderr and "Traceback" not in r.stderr


def test_resumed_at_its_end_reports_no_speed(tmp_path):
    out = tmp_path / "run"
    assert _run(out, "steps=2", "log.ckpt_every=2").returncode == 0
    assert json.loads((out / "metrics.json").read_text())["sec_per_gen_step"] > 1e-4
    r = _run(out, "steps=2", "log.ckpt_every=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["sec_per_gen_step"] is None


def test_the_run_lock(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # a live holder (this test's own parent process stands in for another run) is refused, naming it
    holder = {"pid": os.getppid(), "host": __import__("socket").gethostname()}
    (out / ckpt.LOCK_NAME).write_text(json.dumps(holder))
    with pytest.raises(RunLocked, match=str(os.getppid())):
        ckpt.acquire_run_lock(out)
    r = _run(out, "steps=2")
    assert r.returncode == 2 and f"process {os.getppid()}" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "config.json").exists()
    # a holder that is gone: taken over; the lock is released at the end
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ckpt.LOCK_NAME).write_text(json.dumps({**holder, "pid": dead.pid}))
    r = _run(out, "steps=2", "log.ckpt_every=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / ckpt.LOCK_NAME).exists()


# --- fdistill lm ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,override,key", [("DPOConfig", "beta=0", "beta"), ("TDPOConfig", "beta=-0.1", "beta"),
                                              ("FDPGConfig", "beta=0", "beta"), ("DPHConfig", "eta=-1", "eta"),
                                              ("DPOConfig", "steps=0", "steps"), ("DPOConfig", "lr=-1", "lr")])
def test_lm_meaningless_settings_are_refused(cls, override, key):
    from fdistill.lm import config as lm_config

    with pytest.raises(ConfigError, match=f"config key {key} "):
        lm_config.load_config(getattr(lm_config, cls), None, [override])


def test_lm_out_reused_with_another_config_is_refused(tmp_path):
    from fdistill.lm.config import DPOConfig, FDPGConfig, dump_yaml
    from fdistill.lm.trainers import check_out

    out = tmp_path / "run"
    out.mkdir()
    cfg = DPOConfig(out=str(out))
    (out / "config.yaml").write_text("# fdistill lm dpo\n" + dump_yaml(cfg))
    check_out(out, "dpo", DPOConfig(out=str(out), threads=1))  # same run: starts over
    with pytest.raises(ConfigError, match=r"different config \(keys \['beta'\]\)"):
        check_out(out, "dpo", DPOConfig(out=str(out), beta=0.5))
    with pytest.raises(ConfigError, match="'fdistill lm dpo' run"):
        check_out(out, "fdpg", FDPGConfig(out=str(out)))


@pytest.mark.parametrize("error", [ValueError("data.jsonl: record 1 lacks string field(s) ['chosen']"),
                                   KeyError("no samples seen for 'x'"),
                                   TrainingDiverged("non-finite loss at step 3")])
def test_lm_known_training_failure_exits_2_with_one_line(monkeypatch, capsys, tmp_path, error):
    # like every other command: a known failure while training is one line and exit code 2, not 1
    from fdistill.commands import lm as lm_command

    def fail(cfg):
        raise error
    monkeypatch.setattr(lm_command, "TRAINERS", {**lm_command.TRAINERS, "dpo": fail})
    assert lm_command.main(["dpo", f"out={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fdistill lm dpo: error: ") and len(err.strip().splitlines()) == 1


def test_lm_an_empty_prompts_file_is_named(tmp_path):
    from fdistill.lm.data import load_prompts

    (tmp_path / "p.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        load_prompts(str(tmp_path / "p.txt"))


# --- image data: one channel policy for every reader -------------------------------------------------------------

def test_one_channel_policy_for_folders_and_npz(tmp_path):
    import numpy as np
    import PIL.Image

    from fdistill.data.images import open_image_dataset

    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    gray = np.repeat(rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8), 3, axis=3)  # gray stored as RGB
    for name, arr in (("colour", colour), ("gray", gray)):
        (tmp_path / name).mkdir()
        for i, a in enumerate(arr):
            PIL.Image.fromarray(a).save(tmp_path / name / f"{i}.png")
        np.savez(tmp_path / f"{name}.npz", x=arr)
    for src in ("colour", "colour.npz"):  # colour for a one-channel teacher: refused by both readers
        with pytest.raises(ValueError, match="colour image but the teacher takes 1 channel"):
            open_image_dataset(tmp_path / src, channels=1)[0]
    for src in ("gray", "gray.npz"):  # lossless conversions: accepted by both, with the same pixels
        x, _ = open_image_dataset(tmp_path / src, channels=1)[0]
        assert x.shape == (1, 8, 8)
        torch.testing.assert_close(x[0], torch.from_numpy(gray[0, :, :, 0]).float() / 127.5 - 1)
    np.savez(tmp_path / "one.npz", x=gray[:, :, :, :1])
    x, _ = open_image_dataset(tmp_path / "one.npz", channels=3)[0]
    assert x.shape == (3, 8, 8) and torch.equal(x[0], x[2])


def test_a_file_that_is_not_an_image_is_named(tmp_path):
    import numpy as np
    import PIL.Image

    from fdistill.data.images import open_image_dataset

    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_text("not an image")
    ds = open_image_dataset(tmp_path, channels=3)
    with pytest.raises(ValueError, match=r"b\.png is not a readable image"):
        [ds[i] for i in range(len(ds))]


# --- experiment trackers ------------------------------------------------------------------------------------------

def test_tensorboard_tracker_gets_the_metrics_rows_and_grids_and_resumes_into_the_same_run(tmp_path):
    pytest.importorskip("tensorboard")  # the `test` extra installs it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = ("log.ckpt_every=2", "log.sample_every=4", "log.trackers=tensorboard")
    assert _run(out, "steps=4", *args).returncode == 0
    r = _run(out, "steps=6", *args)  # resumed at step 4
    assert r.returncode == 0, r.stderr[-3000:]
    ea = EventAccumulator(str(out / "trackers" / "fdistill"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss_dm", "grad_norm_gen", "h_ess", "skipped_updates"):
        events = ea.Scalars(key)
        assert [e.step for e in events] == [row["step"] for row in rows] == [2, 4, 6], key
        for e, row in zip(events, rows):
            assert e.value == pytest.approx(row[key], rel=1e-6, abs=1e-7), key
    final = json.loads((out / "metrics.json").read_text())
    assert ea.Scalars("eval/mode_coverage")[-1].value == pytest.approx(final["mode_coverage"], rel=1e-6)
    assert {e.step for e in ea.Images("samples")} >= {4, 6}


def test_an_unknown_or_missing_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'"):
        load_config(TOY, ["log.trackers=tensorbord"])
    assert load_config(TOY).log.trackers == []  # none by default


# --- FID statistics -----------------------------------------------------------------------------------------------

def test_fid_refuses_bad_statistics_with_a_clear_message(tmp_path):
    import numpy as np

    from fdistill.metrics.fid import fid_from_stats, load_stats, save_stats

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(64, 8))
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    save_stats(tmp_path / "ok.npz", mu, sigma)
    assert fid_from_stats(*load_stats(tmp_path / "ok.npz"), mu, sigma) == pytest.approx(0, abs=1e-6)
    bad = mu.copy()
    bad[3] = np.nan
    save_stats(tmp_path / "nan.npz", bad, sigma)
    with pytest.raises(ValueError, match="non-finite"):
        load_stats(tmp_path / "nan.npz")
    with pytest.raises(ValueError, match="non-finite"):
        fid_from_stats(bad, sigma, mu, sigma)
    with pytest.raises(ValueError, match="8 and 4 features"):
        fid_from_stats(mu, sigma, mu[:4], sigma[:4, :4])
    np.savez(tmp_path / "shape.npz", mu=mu, sigma=sigma[:4])
    with pytest.raises(ValueError, match="not a mean and its covariance"):
        load_stats(tmp_path / "shape.npz")
    raw = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    np.savez(tmp_path / "obj.npz", mu=np.array([{"a": 1}], dtype=object), sigma=sigma)
    (tmp_path / "text.npz").write_text("hello")
    for name in ("cut.npz", "obj.npz", "text.npz"):
        with pytest.raises(ValueError, match="not a readable .npz") as e:
            load_stats(tmp_path / name)
        assert "allow_pickle" not in str(e.value)


# --- convert-edm --------------------------------------------------------------------------------------------------

def test_convert_edm_names_files_that_are_not_pickles(tmp_path, capsys):
    import pickle

    from fdistill.commands.convert_edm import main as convert_main

    good = pickle.dumps({"ema": {"a": 1}}, protocol=4)
    (tmp_path / "empty.pkl").write_bytes(b"")
    (tmp_path / "cut.pkl").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.pkl").write_text("this is a README, not a pickle\n")
    for name in ("empty.pkl", "cut.pkl", "text.pkl"):
        assert convert_main([str(tmp_path / name), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert name in err and ("empty" in err or "not a readable network pickle" in err), err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "out").exists()


# --- teachers -----------------------------------------------------------------------------------------------------

def test_a_truncated_or_foreign_teacher_is_named_without_diffusers_advice(tmp_path):
    import shutil

    from fdistill.convert.edm import load_converted
    from tiny_models import tiny_edm_teacher

    teacher = tiny_edm_teacher(tmp_path / "teacher")
    other = tiny_edm_teacher(tmp_path / "other", block_out_channels=(16, 32))
    (other / "config.json").write_text((teacher / "config.json").read_text())  # one model's config, another's weights
    cut = Path(shutil.copytree(teacher, tmp_path / "cut"))
    f = cut / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:5000])
    for folder in (other, cut):
        with pytest.raises(ckpt.CheckpointError, match=f"teacher {folder} cannot be loaded") as e:
            load_converted(folder)
        assert "ignore_mismatched_sizes" not in str(e.value)


def test_precision_recall_on_too_few_images_says_so():
    from fdistill.metrics.precision_recall import precision_recall

    with pytest.raises(ValueError, match="needs more than 3 generated images, got 1"):
        precision_recall(torch.randn(10, 4), torch.randn(1, 4))


def test_fid_folders_with_mixed_sizes_or_a_broken_file_are_named(tmp_path):
    import PIL.Image

    from fdistill.metrics.fid import folder_features

    def fake_inception(x):  # [N, 3, H, W] -> features; the folder errors come before any model matters
        return x.float().mean(dim=(2, 3))

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    PIL.Image.new("RGB", (16, 16)).save(mixed / "a.png")
    PIL.Image.new("RGB", (20, 20)).save(mixed / "b.png")
    with pytest.raises(ValueError, match="images of different sizes"):
        folder_features(mixed, mode="legacy_tensorflow", weights=fake_inception, progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    PIL.Image.new("RGB", (16, 16)).save(broken / "a.png")
    (broken / "b.png").write_text("not an image")
    with pytest.raises(ValueError, match="an image file cannot be read"):
        folder_features(broken, weights=fake_inception, progress=False)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind root")
def test_a_read_only_run_directory_is_named(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    os.chmod(out, 0o555)
    try:
        with pytest.raises(OSError, match="cannot write to the run directory"):
            ckpt.acquire_run_lock(out)
    finally:
        os.chmod(out, 0o755)


# --- sample and export: model card, non-finite weights --------------------------------------------------------------

@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A 2-step run of the `image` pipeline around the tiny 16x16 teacher (the real trainer)."""
    import numpy as np

    from tiny_models import tiny_edm_teacher

    root = tmp_path_factory.mktemp("image_run")
    teacher = tiny_edm_teacher(root / "teacher")
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", x=rng.integers(0, 256, (8, 16, 16, 1), dtype=np.uint8), y=np.arange(8) % 10)
    out = root / "run"
    rc = cli_main(["distill", str(ROOT / "configs/image.yaml"), f"teacher={teacher}", f"data={root / 'data.npz'}",
                   f"out={out}", "steps=2", "batch_size=2", "schedule.critic_per_gen=1", "ema=[0.9]",
                   "task.grid_samples=2", "task.loader_threads=0", "log.progress=false"])
    assert rc == 0
    return out


def test_every_export_has_a_model_card(image_run, tmp_path):
    import yaml

    out = tmp_path / "export"
    assert cli_main(["export", str(image_run), str(out)]) == 0
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["library_name"] == "diffusers" and header["pipeline_tag"] == "unconditional-image-generation"
    assert "fdistill" in header["tags"]
    cfg = json.loads((image_run / "config.json").read_text())
    assert f"| divergence | {cfg['divergence']} |" in text and "| generator steps | 2 |" in text
    assert "| weights | ema_0.9 |" in text and "OneStepPipeline.from_pretrained" in text
    measured = json.loads((image_run / "metrics.json").read_text()) if (image_run / "metrics.json").is_file() else {}
    for key, v in measured.items():
        if isinstance(v, float):
            assert f"| {key} | {v:.6g} |" in text


def test_sample_and_export_refuse_non_finite_weights(image_run, tmp_path, capsys):
    import shutil

    from safetensors.torch import save_file

    run = Path(shutil.copytree(image_run, tmp_path / "nan_run"))
    for f in run.glob("ckpt-*/ema_0.9.safetensors"):
        sd = load_file(str(f))
        sd = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in sd.items()}
        save_file(sd, str(f))
    assert cli_main(["sample", str(run), "--num", "2", "--outdir", str(tmp_path / "png"), "--quiet"]) == 2
    assert "non-finite" in capsys.readouterr().err
    assert not list((tmp_path / "png").glob("*.png")) if (tmp_path / "png").exists() else True
    assert cli_main(["export", str(run), str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "ema_0.9.safetensors" in err
    assert not (tmp_path / "exp").exists()
    # the raw generator is finite: exporting it is allowed
    assert cli_main(["export", str(run), str(tmp_path / "exp"), "--which", "generator"]) == 0


def test_image_npz_errors_name_the_problem(tmp_path):
    import numpy as np

    from fdistill.metrics.fid import load_image_npz

    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError) as e:
        load_image_npz(tmp_path / "obj.npz")
    assert "allow_pickle" not in str(e.value) and "obj.npz" in str(e.value)
    np.savez(tmp_path / "m.npz", m=np.zeros(3))
    with pytest.raises(ValueError, match=r"neither FID statistics \('mu', 'sigma'\), nor features .*, nor images"):
        load_image_npz(tmp_path / "m.npz")


def test_a_truncated_sample_chunk_is_named(image_run, tmp_path, capsys):
    npz = tmp_path / "s.npz"
    assert cli_main(["sample", str(image_run), "--num", "4", "--npz", str(npz), "--quiet", "--batch", "2"]) == 0
    parts = tmp_path / "s.npz.parts"
    parts.mkdir(exist_ok=True)
    chunk = parts / "chunk-000000.npz"
    chunk.write_bytes(npz.read_bytes()[:300])  # a chunk cut short
    capsys.readouterr()
    assert cli_main(["sample", str(image_run), "--num", "8", "--npz", str(npz), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "chunk-000000.npz is unreadable" in err and "delete it" in err


# --- the command line: Ctrl-C, closed pipes, --debug ---------------------------------------------------------------

def _sigint_as_in_a_terminal():
    """In the child before exec: SIGINT handled by default and not blocked. A child inherits both the disposition
    and the signal mask, and inside the full suite an earlier test's library left SIGINT ignored or blocked in the
    pytest process: the run then trained on through Ctrl-C (the stack printed by the SIGABRT below was a later
    checkpoint save, 120 s on). A user's terminal delivers SIGINT to a process in this state."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_names_the_step_and_a_closed_pipe_is_quiet(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    # PYTHONFAULTHANDLER: if the run does not end after Ctrl-C, SIGABRT makes it print every thread's stack
    e = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen([sys.executable, "-m", "fdistill.cli", "distill", TOY, f"out={out}", *SMALL,
                             "steps=100000", "log.ckpt_every=2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=e, cwd=ROOT, preexec_fn=_sigint_as_in_a_terminal)
    deadline = time.time() + 300
    while time.time() < deadline and not ckpt.list_checkpoints(out):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=60)
        pytest.fail("the run did not end within 120 s of Ctrl-C; its stacks:\n" + err[-6000:])
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted at generator step" in err and "rerun the same command to resume" in err
    assert "Traceback" not in err and not (out / ckpt.LOCK_NAME).exists()
    r = subprocess.run(f"{sys.executable} -m fdistill.cli distill {TOY} --dry-run | head -1", shell=True,
                       capture_output=True, text=True, env=e, cwd=ROOT, timeout=120)
    assert r.stdout.count("\n") == 1 and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr


def test_debug_shows_the_traceback_of_a_known_failure(capsys, monkeypatch):
    monkeypatch.setenv("FDISTILL_DEBUG", "0")  # restored at teardown: --debug below sets it
    assert cli_main(["distill", TOY, "batch_size=0"]) == 2
    with pytest.raises(ConfigError, match="batch_size"):
        cli_main(["--debug", "distill", TOY, "batch_size=0"])
