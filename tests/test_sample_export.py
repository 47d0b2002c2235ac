"""`fdistill sample` and `fdistill export`: seeds independent of the batch, resumable outputs, EDM's npz format, and
the export round trip (checkpoint -> export -> OneStepPipeline.from_pretrained -> the same images).

Two tiny runs stand in for real ones, both around a 16x16 class-conditional UNet2DModel teacher (10 classes):
- an `image`-pipeline run made by the real trainer (`fdistill distill configs/image.yaml ... steps=2`), with the
  generator started at noise.generator_sigma=40 so that the export has to carry it over (the checkpoint's stored
  generator spec);
- an `mnist`-pipeline checkpoint written with the checkpoint module from the task's own generator and an EMA of it
  (the trainer's module names and layouts), so that no FID evaluation runs.
"""

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)

from fdistill.cli import main as cli  # noqa: E402
from tiny_models import tiny_edm_teacher  # noqa: E402
from fdistill.imageio import to_uint8  # noqa: E402
from fdistill.sampler import per_image_latents, per_image_random_labels  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHAPE = (1, 16, 16)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample_export")
    tiny_edm_teacher(d / "teacher")
    return d


@pytest.fixture(scope="module")
def image_run(root):
    """The real trainer on the `image` pipeline: 2 generator steps, EMA 0.9, generator at sigma 40."""
    rng = np.random.default_rng(0)
    np.savez(root / "data.npz", x=rng.integers(0, 256, (8, 16, 16, 1), dtype=np.uint8), y=np.arange(8) % 10)
    out = root / "image_run"
    rc = cli(["distill", str(CONFIGS / "image.yaml"), f"teacher={root / 'teacher'}", f"data={root / 'data.npz'}",
              f"out={out}", "steps=2", "batch_size=2", "schedule.critic_per_gen=1", "ema=[0.9]", "optim.lr_gen=1e-3",
              "noise.generator_sigma=40.0", "task.grid_samples=2", "task.loader_threads=0", "log.progress=false"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def mnist_run(root):
    """An mnist checkpoint as the trainer writes it: generator + ema_0.9 (an AveragedModel) + meta.json."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from fdistill import checkpoint as ckpt
    from fdistill.config import load_config, to_dict
    from fdistill.pipelines import build_task

    out = root / "mnist_run"
    cfg = load_config(CONFIGS / "mnist.yaml", [f"teacher={root / 'teacher'}", f"out={out}", "ema=[0.9]"])
    task = build_task(cfg, "cpu")
    gen = task.generator
    torch.manual_seed(1)
    with torch.no_grad():  # move the generator off the teacher, and the EMA off the generator
        for p in gen.parameters():
            p.add_(0.02 * torch.randn_like(p))
        ema = AveragedModel(gen, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
        ema.update_parameters(gen)  # the first update copies
        for p in gen.parameters():
            p.add_(0.02 * torch.randn_like(p))
        ema.update_parameters(gen)
    ckpt.save_checkpoint(out, 2, {"generator": gen, "ema_0.9": ema}, {},
                         {"iteration": 4, "gen_step": 2, "images_seen": 64, "world_size": 1, "config": to_dict(cfg)})
    return dict(out=out, gen=gen.eval(), ema=ema.module.eval(), cfg=cfg)


def read_pngs(folder, seeds):
    return np.stack([np.asarray(Image.open(Path(folder) / f"{s:06d}.png")) for s in seeds])


def sample(*args):
    return cli(["sample", *map(str, args), "--quiet"])


# ------------------------------------------------------------------------------------------------------------
# sample


def test_sample_equals_the_checkpoint_generator_whatever_the_batch(mnist_run, tmp_path):
    run = mnist_run["out"]
    assert sample(run, "--num", 6, "--labels", "3,5", "--batch", 1, "--outdir", tmp_path / "b1") == 0
    assert sample(run, "--num", 6, "--labels", "3,5", "--batch", 4, "--outdir", tmp_path / "b4") == 0
    seeds, labels = list(range(6)), torch.tensor([3, 5, 3, 5, 3, 5])
    b1, b4 = read_pngs(tmp_path / "b1", seeds), read_pngs(tmp_path / "b4", seeds)
    # the latents are the same; the network's float rounding may differ between batch sizes in the last bit
    # (~1e-6 here), which can flip a rare pixel by one level of 255
    assert np.abs(b1.astype(int) - b4.astype(int)).max() <= 1 and (b1 != b4).mean() < 1e-3
    # 'ema' is the run's EMA, not the raw generator; it equals the trainer's module exactly
    with torch.no_grad():
        want = to_uint8(mnist_run["ema"](per_image_latents(seeds, SHAPE), labels)).numpy()[..., 0]
        raw = to_uint8(mnist_run["gen"](per_image_latents(seeds, SHAPE), labels)).numpy()[..., 0]
    assert np.array_equal(b4[:4], want[:4]) and np.abs(b4.astype(int) - want).max() <= 1
    assert not np.array_equal(want, raw)
    index = [json.loads(line) for line in (tmp_path / "b1" / "index.jsonl").read_text().splitlines()]
    assert sorted((r["seed"], r["label"]) for r in index) == list(zip(seeds, labels.tolist()))


def test_labels_random_and_balanced_depend_on_the_seed_only(mnist_run, tmp_path):
    run = mnist_run["out"]
    assert sample(run, "--seeds", "10-13", "--npz", tmp_path / "r.npz") == 0
    assert sample(run, "--seeds", "12-13", "--npz", tmp_path / "r2.npz") == 0
    r, r2 = np.load(tmp_path / "r.npz"), np.load(tmp_path / "r2.npz")
    assert r["labels"].tolist() == per_image_random_labels(range(10, 14), SHAPE, 10).tolist()
    assert r["labels"][2:].tolist() == r2["labels"].tolist()
    assert np.abs(r["arr_0"][2:].astype(int) - r2["arr_0"].astype(int)).max() <= 1
    assert sample(run, "--seeds", "7-12", "--balanced", "--npz", tmp_path / "b.npz") == 0
    assert np.load(tmp_path / "b.npz")["labels"].tolist() == [7, 8, 9, 0, 1, 2]


def test_outdir_resumes_and_refuses_other_settings(mnist_run, tmp_path, capsys):
    run, out = mnist_run["out"], tmp_path / "png"
    assert sample(run, "--num", 5, "--batch", 2, "--outdir", out) == 0
    first = read_pngs(out, range(5))
    (out / "000001.png").unlink()
    (out / "000003.png").unlink()
    marked = first[0].copy()
    marked[0, 0] = 255 - marked[0, 0]
    Image.fromarray(marked).save(out / "000000.png")  # a skipped image keeps its (altered) content
    capsys.readouterr()
    assert sample(run, "--num", 6, "--batch", 4, "--outdir", out, "--grid", tmp_path / "g.png") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["generated_now"] == 3 and summary["num"] == 6  # seeds 1, 3 and the new 5
    again = read_pngs(out, range(6))
    assert np.array_equal(again[0], marked) and np.abs(again[1:5].astype(int) - first[1:].astype(int)).max() <= 1
    assert Image.open(tmp_path / "g.png").size[0] > 6 * 16
    # other labels for the same seeds, or other weights, are refused rather than mixed in
    assert sample(run, "--num", 6, "--labels", "3", "--outdir", out) == 2
    assert "seed 0" in capsys.readouterr().err
    assert sample(run, "--num", 6, "--which", "generator", "--outdir", out) == 2
    assert "weights" in capsys.readouterr().err


def test_npz_format_and_resume_of_an_interrupted_run(mnist_run, tmp_path, monkeypatch):
    import fdistill.commands.sample as sampling
    import fdistill.sources as sources
    from fdistill.metrics.fid import load_image_npz

    run = mnist_run["out"]
    assert sample(run, "--num", 7, "--labels", "0-9", "--batch", 3, "--npz", tmp_path / "full.npz",
                  "--outdir", tmp_path / "png") == 0
    full = np.load(tmp_path / "full.npz")
    assert full["arr_0"].dtype == np.uint8 and full["arr_0"].shape == (7, 16, 16, 1)
    assert full["seeds"].tolist() == list(range(7)) and full["labels"].tolist() == list(range(7))
    assert np.array_equal(full["arr_0"][..., 0], read_pngs(tmp_path / "png", range(7)))
    assert isinstance(load_image_npz(tmp_path / "full.npz"), np.memmap)  # stored uncompressed: FID reads lazily

    # an npz without --outdir stages chunks in NPZ.parts/; kill the run after two chunks, then rerun it
    class SmallChunks(sampling.ChunkStore):
        def __init__(self, root, settings, chunk=1000):
            super().__init__(root, settings, chunk=2)

    monkeypatch.setattr(sampling, "ChunkStore", SmallChunks)
    real_open, calls = sources.open_source, []

    def failing_open(*a, **k):
        src = real_open(*a, **k)
        gen = src.generate

        def generate(seeds, records):
            calls.append(list(seeds))
            if calls == [[0, 1], [2, 3], [4, 5]]:
                raise KeyboardInterrupt
            return gen(seeds, records)
        src.generate = generate
        return src

    monkeypatch.setattr(sources, "open_source", failing_open)
    npz = tmp_path / "part.npz"
    with pytest.raises(KeyboardInterrupt):
        sampling.main([str(run), "--num", "7", "--labels", "0-9", "--batch", "2", "--npz", str(npz), "--quiet"])
    assert not npz.exists() and len(list(Path(str(npz) + ".parts").glob("chunk-*.npz"))) == 2
    calls.clear()
    assert sampling.main([str(run), "--num", "7", "--labels", "0-9", "--batch", "2", "--npz", str(npz),
                          "--grid", str(tmp_path / "g.png"), "--quiet"]) == 0
    assert calls == [[4, 5], [6]] and (tmp_path / "g.png").is_file()
    part = np.load(npz)
    assert part["seeds"].tolist() == list(range(7)) and part["labels"].tolist() == list(range(7))
    assert np.abs(part["arr_0"].astype(int) - full["arr_0"].astype(int)).max() <= 1
    assert not Path(str(npz) + ".parts").exists()


def test_sample_errors(mnist_run, tmp_path, capsys):
    run = mnist_run["out"]
    assert sample(run, "--num", 2) == 2 and "nothing to write" in capsys.readouterr().err
    assert sample(run, "--grid", tmp_path / "g.png") == 2 and "--num" in capsys.readouterr().err
    assert sample(run, "--num", 2, "--labels", "12", "--grid", tmp_path / "g.png") == 2
    assert "outside" in capsys.readouterr().err
    assert sample(run, "--num", 2, "--prompts", tmp_path / "p.txt", "--grid", tmp_path / "g.png") == 2
    assert "text-to-image" in capsys.readouterr().err
    assert sample(tmp_path, "--num", 2, "--grid", tmp_path / "g.png") == 2
    assert "no checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# export


def test_export_round_trip_gives_the_checkpoint_images(image_run, root, tmp_path, capsys):
    from safetensors.torch import load_file

    from fdistill.config import load_config
    from fdistill.export import EDMOneStepScheduler, OneStepPipeline, pipeline_from_checkpoint
    from fdistill.pipelines import build_task

    ckpt = image_run / "ckpt-00000002"
    out = tmp_path / "exported"
    assert cli(["export", str(image_run), str(out)]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "OneStepPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["fdistill.onestep", "EDMOneStepScheduler"]
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["sigma_max"], sched["sigma_data"]) == (40.0, 0.5)  # noise.generator_sigma of the run
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    meta = json.loads((out / "fdistill_export.json").read_text())
    assert meta["weights"] == "ema_0.9" and meta["gen_step"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    pipe = OneStepPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, EDMOneStepScheduler)
    seeds, labels = [0, 1, 2, 3], torch.tensor([3, 5, 7, 1])
    x = pipe(class_labels=labels, seeds=seeds, output_type="raw").images
    # the trainer's own generator with the checkpoint's EMA weights
    cfg = load_config(image_run / "config.yaml")
    gen = build_task(cfg, "cpu").generator.eval()
    sd = load_file(str(ckpt / "ema_0.9.safetensors"))
    gen.load_state_dict({k[len("module."):]: v for k, v in sd.items() if k.startswith("module.")})
    with torch.no_grad():
        want = gen(per_image_latents(seeds, SHAPE), labels)
    assert gen.generator_sigma == 40.0 and torch.equal(x, want)
    assert torch.equal(pipeline_from_checkpoint(image_run)(class_labels=labels, seeds=seeds,
                                                           output_type="raw").images, want)
    # ... and it moved away from the teacher during training
    teacher = load_file(str(root / "teacher" / "diffusion_pytorch_model.safetensors"))
    assert not torch.equal(pipe.unet.state_dict()["conv_out.weight"], teacher["conv_out.weight"])
    pil = pipe(class_labels=3, seeds=[0]).images[0]
    assert pil.size == (16, 16) and np.array_equal(np.asarray(pil), to_uint8(want[:1]).numpy()[0, ..., 0])
    # folders exported before fdistill.onestep existed name fdistill.export as the scheduler's library
    old = tmp_path / "old_export"
    shutil.copytree(out, old)
    (old / "model_index.json").write_text(json.dumps({**index, "scheduler": ["fdistill.export",
                                                                             "EDMOneStepScheduler"]}))
    old_pipe = OneStepPipeline.from_pretrained(old)
    assert isinstance(old_pipe.scheduler, EDMOneStepScheduler)
    assert torch.equal(old_pipe(class_labels=labels, seeds=seeds, output_type="raw").images, want)

    # `fdistill sample` of the export equals `fdistill sample` of the checkpoint
    capsys.readouterr()
    for src, name in ((out, "a.npz"), (image_run, "b.npz")):
        assert sample(src, "--num", 5, "--batch", 5, "--npz", tmp_path / name) == 0
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    # the pipeline's own label draw for seeds (class_labels=None) is the command's default ('random'), and so is
    # diffusers' form with one generator per image
    x = pipe(seeds=range(5), output_type="raw").images
    assert np.array_equal(to_uint8(x).numpy(), a["arr_0"])
    g = [torch.Generator().manual_seed(s) for s in range(5)]
    assert torch.equal(pipe(generator=g, output_type="raw").images, x)


def test_unconditional_pipeline_round_trip(tmp_path):
    from diffusers import UNet2DModel

    from fdistill.export import EDMOneStepScheduler, OneStepPipeline

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    pipe = OneStepPipeline(unet=unet, scheduler=EDMOneStepScheduler(sigma_max=80.0, sigma_data=0.5))
    pipe.save_pretrained(tmp_path / "p")
    back = OneStepPipeline.from_pretrained(tmp_path / "p")
    x = back(seeds=[7, 8], output_type="raw").images
    assert x.shape == (2, 3, 8, 8) and torch.equal(x, pipe(seeds=[7, 8], output_type="raw").images)
    torch.testing.assert_close(pipe(seeds=[8], output_type="raw").images, x[1:], rtol=0, atol=1e-5)
    g = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    assert torch.equal(pipe(generator=g, output_type="raw").images, x)  # diffusers' one-generator-per-image form
    np_img = pipe(seeds=[7], output_type="np").images
    assert np_img.shape == (1, 8, 8, 3) and np_img.min() >= 0 and np_img.max() <= 1
    with pytest.raises(ValueError, match="unconditional"):
        pipe(class_labels=[1], seeds=[0])


def test_checkpoint_keeps_the_generator_spec_so_export_needs_no_teacher(image_run, tmp_path):
    import shutil

    from fdistill.export import pipeline_from_checkpoint

    ckpts = sorted(image_run.glob("ckpt-*"))
    meta = json.loads((ckpts[-1] / "meta.json").read_text())
    spec = meta["generator_spec"]
    assert spec["pipeline"] == "image" and spec["sigma_max"] == 40.0 and spec["sigma_data"] == 0.5
    assert spec["unet_config"]["block_out_channels"] == [32, 64]
    # the run moved to a machine without the teacher folder
    moved = tmp_path / "moved"
    shutil.copytree(ckpts[-1], moved / ckpts[-1].name)
    meta["config"]["teacher"] = str(tmp_path / "gone")
    (moved / ckpts[-1].name / "meta.json").write_text(json.dumps(meta))
    a, b = pipeline_from_checkpoint(image_run), pipeline_from_checkpoint(moved)
    assert a.scheduler.config.sigma_max == b.scheduler.config.sigma_max == 40.0
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.unet.config == b.unet.config
    assert cli(["export", str(moved), str(tmp_path / "out")]) == 0
    # a stored spec that does not fit the weights is named as such, not blamed on a teacher
    meta["generator_spec"]["unet_config"]["block_out_channels"] = [16, 32]
    (moved / ckpts[-1].name / "meta.json").write_text(json.dumps(meta))
    from fdistill.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="config stored in .*meta.json.*does not belong"):
        pipeline_from_checkpoint(moved)


def test_export_mnist_generator_weights_and_force(mnist_run, tmp_path, capsys):
    from fdistill.export import OneStepPipeline

    out = tmp_path / "gen"
    assert cli(["export", str(mnist_run["out"] / "ckpt-00000002"), str(out), "--which", "generator"]) == 0
    pipe = OneStepPipeline.from_pretrained(out)
    seeds, labels = [4, 5], torch.tensor([0, 9])
    with torch.no_grad():
        want = mnist_run["gen"](per_image_latents(seeds, SHAPE), labels)
    assert torch.equal(pipe(class_labels=labels, seeds=seeds, output_type="raw").images, want)
    assert pipe.scheduler.config.sigma_max == mnist_run["cfg"].noise.sigma_max
    # an existing export is replaced only with --force
    capsys.readouterr()
    assert cli(["export", str(mnist_run["out"]), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli(["export", str(mnist_run["out"]), str(out), "--force"]) == 0
    assert json.loads((out / "fdistill_export.json").read_text())["weights"] == "ema_0.9"


def test_export_errors_name_the_problem(mnist_run, root, tmp_path, capsys):
    run = mnist_run["out"]
    empty = tmp_path / "empty_run"
    (empty / "ckpt-00000005.tmp").mkdir(parents=True)
    assert cli(["export", str(empty), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "unfinished" in err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli(["export", str(run), str(other)]) == 2 and "not empty" in capsys.readouterr().err
    assert cli(["export", str(run), str(other), "--force"]) == 2  # --force never deletes a non-export
    assert "not an earlier export" in capsys.readouterr().err and (other / "notes.txt").is_file()
    assert cli(["export", str(run), str(tmp_path / "y"), "--which", "ema_0.5"]) == 2
    assert "ema_0.9" in capsys.readouterr().err
    wrong = tiny_edm_teacher(tmp_path / "wrong_teacher", block_out_channels=(16, 32))
    assert cli(["export", str(run), str(tmp_path / "z"), "--teacher", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "--teacher" in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


# ------------------------------------------------------------------------------------------------------------
# Stable Diffusion: a coco_t2i checkpoint -> stock StableDiffusionPipeline folder; prompts


@pytest.fixture(scope="module")
def sd_run(root, sd_dir):
    """The tiny SD teacher (conftest's ``sd_dir``) and a coco_t2i checkpoint holding a perturbed copy of its UNet
    under the generator's key names."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    teacher = sd_dir
    unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
    torch.manual_seed(3)
    ckpt = root / "sd_run" / "ckpt-00000001"
    ckpt.mkdir(parents=True)
    save_file({f"denoiser.backbone.{k}": (v + 0.05 * torch.randn_like(v)).contiguous()
               for k, v in unet.state_dict().items()}, str(ckpt / "generator.safetensors"))
    cfg = {"pipeline": "coco_t2i", "teacher": str(teacher), "divergence": "js", "ema": [],
           "task": {"generator_timestep": 999, "guidance_scale": 1.75}}
    (ckpt / "meta.json").write_text(json.dumps({"gen_step": 1, "images_seen": 2, "config": cfg}))
    return ckpt.parent


def test_sd_export_is_a_stock_pipeline_and_samples_match_the_checkpoint(sd_run, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "sd_export"
    assert cli(["export", str(sd_run), str(out)]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert isinstance(StableDiffusionPipeline.from_pretrained(out, local_files_only=True), StableDiffusionPipeline)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red bus\na cat on a sofa\n")
    capsys.readouterr()
    assert sample(out, "--prompts", prompts, "--num", 3, "--batch", 1, "--npz", tmp_path / "a.npz") == 0
    assert sample(sd_run, "--prompts", prompts, "--num", 3, "--batch", 3, "--npz", tmp_path / "b.npz") == 0
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["arr_0"].shape == (3, 16, 16, 3) and a["prompts"].tolist() == ["a red bus", "a cat on a sofa",
                                                                            "a red bus"]
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1
    assert sample(out, "--num", 2, "--grid", tmp_path / "g.png") == 2
    assert "--prompts" in capsys.readouterr().err
