"""ImageNet-64 and generic image pipelines: configs, a tiny end-to-end run, fine-tune initialisation, and the
full-size ADM smoke test (``-m fullsize``).

The tiny teacher is a real EDM-format ADM pickle (8x8, 128 channels, 10 classes; the smallest ADM the converter
maps) written with tests/edm_reference.py's builder and converted by ``fdistill convert-edm``; the data is a
tiny EDM dataset zip. Together they stand in for edm-imagenet-64x64-cond-adm.pkl and imagenet-64x64.zip.
"""

import io
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from edm_reference import edm_precond, write_edm_pickle

from fdistill.cli import main as cli
from fdistill.config import load_config
from fdistill.convert.edm import ADM_IMAGENET64

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
JS = CONFIGS / "imagenet64_js.yaml"
# The tiny ADM has two levels (8x8, 4x4): its last encoder block is down_blocks.1 (ImageNet-64's: down_blocks.3).
TINY = ["task.resolution=8", "task.num_classes=10", "task.grid_samples=8", "task.loader_threads=2",
        "task.feature_modules=[down_blocks.1]"]


def write_edm_zip(path, n=16, res=8, num_classes=10, channels=3, seed=0, labels=True):
    """EDM dataset_tool.py's layout: 00000/img00000000.png ... plus dataset.json with [name, class] pairs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, size=(n, res, res, channels), dtype=np.uint8)
    names, labs = [], []
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n):
            name = f"{i // 1000:05d}/img{i:08d}.png"
            buf = io.BytesIO()
            Image.fromarray(imgs[i] if channels == 3 else imgs[i, :, :, 0]).save(buf, format="PNG")
            zf.writestr(name, buf.getvalue())
            names.append(name)
            labs.append(i % num_classes)
        zf.writestr("dataset.json", json.dumps({"labels": [list(p) for p in zip(names, labs)] if labels else None}))
    return imgs, np.array(labs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("imagenet64")
    pkl = d / "edm-tiny-cond-adm.pkl"
    write_edm_pickle(pkl, edm_precond())
    teacher = d / "teacher"
    assert cli(["convert-edm", str(pkl), str(teacher)]) == 0
    data = d / "tiny-8x8.zip"
    imgs, labels = write_edm_zip(data)
    return dict(dir=d, teacher=teacher, data=data, imgs=imgs, labels=labels)


@pytest.fixture(scope="module")
def stage1(tiny):
    """`fdistill distill configs/imagenet64_js.yaml teacher=TINY data=TINY_ZIP steps=2 batch_size=2`."""
    out = tiny["dir"] / "run_js"
    t0 = time.time()
    rc = cli(["distill", str(JS), f"teacher={tiny['teacher']}", f"data={tiny['data']}", "steps=2", "batch_size=2",
              f"out={out}", *TINY])
    assert rc == 0
    return dict(out=out, seconds=time.time() - t0)


def _cfg(path, *overrides):
    return load_config(path, list(overrides))


# ------------------------------------------------------------------------------------------------------------
# configs


def _strip(d, *keys):
    d = json.loads(json.dumps(d))
    for k in keys:
        node = d
        *parents, last = k.split(".")
        for p in parents:
            node = node[p]
        node.pop(last)
    return d


def test_recipe_values_match_the_paper():
    c = _cfg(JS)
    assert (c.pipeline, c.divergence) == ("imagenet64", "js")
    assert c.batch_size * 8 == 512  # per process, on 8 GPUs
    assert c.optim.lr_gen == 2e-6 and c.optim.lr_critic in (None, 2e-6)
    assert c.optim.betas == [0.9, 0.999] and c.optim.weight_decay == 0.01 and c.optim.grad_clip == 10
    assert c.schedule.critic_per_gen == 5
    assert c.objective.gan_weight == 3e-3 and c.objective.r1_gamma == 0 and c.objective.disc_features == "teacher"
    r = c.ratio_norm
    assert (r.logit_clamp, r.r_min, r.r_max, r.num_bins, r.bin_ema) == (10, 0.1, 20, 10, 0.5)
    n = c.noise
    assert (n.grid, n.num_levels, n.sigma_min, n.sigma_max, n.rho) == ("edm", 1000, 0.002, 80, 7)
    assert c.task["resolution"] == 64 and c.task["num_classes"] == 1000
    # the authors' recipe (NVlabs/FastGen config_f_distill_in64.py and the code around it)
    assert c.recipe == "fastgen" and r.bin_spacing == "linear" and (n.dm_index_min, n.dm_index_max) == (2, 998)
    assert (c.objective.denoise_loss, c.objective.disc_fake_noise) == ("x0", "denoise")
    assert (c.schedule.scheme, c.schedule.ema_every, c.optim.clip_critic) == ("fastgen", "iteration", False)
    assert c.ema == [0.9999, 0.99995, 0.9996] and c.gen_cond == "real" and c.steps == 600000 // 5
    assert (c.mixed_precision, c.allow_tf32) == ("no", True)
    assert c.task["feature_modules"] == ["down_blocks.3"]  # EDM's enc.8x8_block2 after conversion
    # recipe=dmd2 gives DMD2's rows back; an explicit key beats the recipe
    d = _cfg(JS, "recipe=dmd2", "noise.dm_index_max=900")
    assert (d.noise.dm_index_min, d.noise.dm_index_max, d.ratio_norm.bin_spacing) == (20, 900, "log_sigma")
    assert (d.objective.denoise_loss, d.schedule.scheme, d.schedule.ema_every) == ("edm", "dmd2", "generator")
    assert (d.mixed_precision, d.task["feature_modules"], d.steps) == ("auto", ["mid_block"], 76000)


def test_divergence_configs_differ_only_in_divergence_and_out():
    base = yaml.safe_load(JS.read_text())
    for name, div in (("rkl", "reverse_kl"), ("fkl", "forward_kl")):
        other = yaml.safe_load((CONFIGS / f"imagenet64_{name}.yaml").read_text())
        assert other["divergence"] == div and other["out"] == f"runs/imagenet64_{name}"
        assert _strip(other, "divergence", "out") == _strip(base, "divergence", "out")
        load_config(CONFIGS / f"imagenet64_{name}.yaml")  # strict: every key is a DistillConfig key


def test_finetune_config_is_stage1_at_5e_7_from_its_checkpoint():
    base = yaml.safe_load(JS.read_text())
    ft = yaml.safe_load((CONFIGS / "imagenet64_js_finetune.yaml").read_text())
    assert ft["optim"]["lr_gen"] == 5e-7 and ft["task"]["init_from"] == base["out"]
    keep = ("out", "optim.lr_gen", "log.sample_every", "task.init_from")
    assert ft["steps"] == 20000 and "steps" not in base  # stage 1 runs the recipe's length
    assert _strip(ft, *keep, "steps") == _strip(base, *keep)
    load_config(CONFIGS / "imagenet64_js_finetune.yaml")


def test_dry_run_of_every_config(capsys):
    for p in sorted(CONFIGS.glob("image*.yaml")):
        assert cli(["distill", str(p), "--dry-run"]) == 0, p
        assert "pipeline: image" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------------
# end to end


def test_distill_end_to_end(tiny, stage1):
    out = stage1["out"]
    ckpt = out / "ckpt-00000002"
    assert (ckpt / "meta.json").is_file()
    meta = json.loads((ckpt / "meta.json").read_text())
    # fastgen scheme, 4 critic-only iterations then a generator one: iterations 0..9 for 2 generator steps
    assert meta["gen_step"] == 2 and meta["iteration"] == 10 and meta["images_seen"] == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["step"] == 2
    for key in ("loss_dm", "loss_gan_gen", "loss_denoise", "loss_disc", "h_mean"):
        assert np.isfinite(rows[-1][key]), key
    assert abs(rows[-1]["h_mean"] - 1) < 1e-4  # stage-2 weight normalisation
    assert (out / "samples_student.png").is_file() and (out / "metrics.json").is_file()
    from PIL import Image

    assert Image.open(out / "samples_student.png").size[0] > 8 * 8  # 8 images of 8x8 plus padding, upscaled
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["pipeline"] == "imagenet64" and saved["task"]["resolution"] == 8

    # the generator started as the teacher and moved; the teacher's weights did not
    teacher = load_file(str(tiny["teacher"] / "diffusion_pytorch_model.safetensors"))
    gen = load_file(str(ckpt / "generator.safetensors"))
    fake = load_file(str(ckpt / "fake_score.safetensors"))
    assert set(gen) == {f"denoiser.backbone.{k}" for k in teacher}
    moved = [k for k in teacher if not torch.equal(gen[f"denoiser.backbone.{k}"], teacher[k])]
    assert len(moved) > 0.5 * len(teacher)
    assert not torch.equal(gen["denoiser.backbone.conv_out.weight"], teacher["conv_out.weight"])
    assert not torch.equal(fake["backbone.conv_out.weight"], teacher["conv_out.weight"])
    d = (gen["denoiser.backbone.conv_out.weight"] - teacher["conv_out.weight"]).abs().max().item()
    assert d < 2 * 2e-6 * 1.5  # two AdamW steps at lr 2e-6 move a weight by at most ~lr per step
    disc = load_file(str(ckpt / "discriminator.safetensors"))
    assert disc["heads.0.net.0.weight"].shape[1] == 256  # the tiny ADM's 4x4 bottleneck has 256 channels


def test_missing_teacher_or_data_names_the_key(tiny, tmp_path, capsys):
    assert cli(["distill", str(JS), f"data={tiny['data']}", f"out={tmp_path / 'a'}", *TINY]) == 2
    err = capsys.readouterr().err
    assert "teacher=" in err and "convert-edm" in err
    assert cli(["distill", str(JS), f"teacher={tiny['teacher']}", f"out={tmp_path / 'b'}", *TINY]) == 2
    err = capsys.readouterr().err
    assert "data=" in err and "zip" in err
    assert cli(["distill", str(JS), f"teacher={tmp_path / 'nope'}", f"data={tiny['data']}",
                f"out={tmp_path / 'c'}", *TINY]) == 2
    assert "convert-edm" in capsys.readouterr().err


def test_teacher_mismatch_and_unknown_task_key_are_errors(tiny):
    from fdistill.pipelines import build_task

    base = [f"teacher={tiny['teacher']}", f"data={tiny['data']}"]
    with pytest.raises(ValueError, match=r"task.resolution=64 .* resolution 8"):
        build_task(_cfg(JS, *base, "task.num_classes=10"), "cpu")  # the 64x64 default vs an 8x8 teacher
    with pytest.raises(ValueError, match=r"task.num_classes=1000 .* num_classes 10"):
        build_task(_cfg(JS, *base, "task.resolution=8"), "cpu")
    with pytest.raises(ValueError, match="task.grid_sample"):
        build_task(_cfg(JS, *base, *TINY, "task.grid_sample=4"), "cpu")
    with pytest.raises(ValueError, match="objective.sigma_data=0.5"):
        build_task(_cfg(JS, *base, *TINY, "objective.sigma_data=1.0"), "cpu")


def test_task_networks_and_real_data(tiny):
    from fdistill.pipelines import build_task

    task = build_task(_cfg(JS, f"teacher={tiny['teacher']}", f"data={tiny['data']}", *TINY), "cpu")
    assert not any(p.requires_grad for p in task.teacher.parameters())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in task.generator.parameters())
    assert all(p.requires_grad for p in task.fake_score.parameters())
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in task.generator.modules())
    assert task.generator.generator_sigma == 80.0 and task.generator.latent_shape == (3, 8, 8)
    assert not any(task.teacher.calls.values())  # the build's shape probe is not counted
    # the fake score's own feature hooks work (a deep copy of a wrapped denoiser would report into the teacher)
    x, s, y = torch.randn(2, 3, 8, 8), torch.ones(2), torch.tensor([1, 2])
    f_fake = task.fake_score(x, s, y, mode="features")
    f_teacher = task.teacher(x, s, y, mode="features")
    assert f_fake[0].shape == f_teacher[0].shape == (2, 256, 4, 4)
    torch.testing.assert_close(f_fake[0], f_teacher[0])  # same weights at initialisation
    # real data: drawn with the training rng (reproducible), images and labels as in the zip
    xa, ya = task.sample_real(6, torch.Generator().manual_seed(3), "cpu")
    xb, yb = task.sample_real(6, torch.Generator().manual_seed(3), "cpu")
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and ya.dtype == torch.long
    idx = torch.randint(0, 16, (6,), generator=torch.Generator().manual_seed(3))
    want = torch.from_numpy(tiny["imgs"][idx.numpy()]).permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(xa, want)
    assert ya.tolist() == tiny["labels"][idx.numpy()].tolist()
    c = task.sample_cond(1000, torch.Generator().manual_seed(0), "cpu")
    assert c.dtype == torch.long and c.min() >= 0 and c.max() == 9


def test_finetune_initialises_from_stage1(tiny, stage1):
    from fdistill.pipelines import build_task

    ft = CONFIGS / "imagenet64_js_finetune.yaml"
    base = [f"teacher={tiny['teacher']}", f"data={tiny['data']}", *TINY]
    ckpt = stage1["out"] / "ckpt-00000002"
    task = build_task(_cfg(ft, *base, f"task.init_from={stage1['out']}"), "cpu")
    for name, net in (("generator", task.generator), ("fake_score", task.fake_score),
                      ("discriminator", task.discriminator)):
        saved = load_file(str(ckpt / f"{name}.safetensors"))
        for k, v in net.state_dict().items():
            assert torch.equal(v, saved[k]), (name, k)
    ema = load_file(str(ckpt / "ema_0.9999.safetensors"))
    task = build_task(_cfg(ft, *base, f"task.init_from={ckpt}", "task.init_generator=ema_0.9999",
                           "task.init_critic=false"), "cpu")
    for k, v in task.generator.state_dict().items():
        assert torch.equal(v, ema[f"module.{k}"]), k
    teacher = load_file(str(tiny["teacher"] / "diffusion_pytorch_model.safetensors"))
    assert torch.equal(task.fake_score.state_dict()["backbone.conv_out.weight"], teacher["conv_out.weight"])
    with pytest.raises(FileNotFoundError, match="task.init_from"):
        build_task(_cfg(ft, *base, f"task.init_from={tiny['dir'] / 'nowhere'}"), "cpu")
    with pytest.raises(FileNotFoundError, match="ema_0.5"):
        build_task(_cfg(ft, *base, f"task.init_from={ckpt}", "task.init_generator=ema_0.5"), "cpu")


def test_image_pipeline_unconditional_grayscale_folder(tmp_path):
    """`pipeline: image` with your own UNet2DModel: unconditional, 1 channel, 16x16, a flat folder of PNGs."""
    from diffusers import UNet2DModel
    from PIL import Image

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=32,
                       resnet_time_scale_shift="scale_shift")
    teacher = tmp_path / "teacher"
    unet.save_pretrained(teacher)
    (teacher / "fdistill_config.json").write_text(json.dumps({"precond": "edm", "sigma_data": 0.5}))
    data = tmp_path / "images"
    data.mkdir()
    for i in range(6):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16), dtype=np.uint8)).save(data / f"{i}.png")
    out = tmp_path / "run"
    assert cli(["distill", str(CONFIGS / "image.yaml"), f"teacher={teacher}", f"data={data}", "steps=1",
                "batch_size=2", f"out={out}", "task.grid_samples=4", "task.xflip=true"]) == 0
    assert (out / "ckpt-00000001" / "generator.safetensors").is_file() and (out / "samples_student.png").is_file()
    from fdistill.pipelines import build_task

    task = build_task(_cfg(CONFIGS / "image.yaml", f"teacher={teacher}", f"data={data}"), "cpu")
    assert task.info["num_classes"] == 0 and task.info["channels"] == 1 and task.info["resolution"] == 16
    assert task.sample_cond(3, torch.Generator(), "cpu") is None
    x, y = task.sample_real(4, torch.Generator().manual_seed(0), "cpu")
    assert x.shape == (4, 1, 16, 16) and y is None


# ------------------------------------------------------------------------------------------------------------
# full size: EDM's ImageNet-64 ADM (296M parameters), random weights, batch 1, on CPU

# fdistill.convert.edm.ADM_IMAGENET64: what `fdistill convert-edm` writes for edm-imagenet-64x64-cond-adm.pkl


class _RandomImages(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) * 2 - 1, i * 100


@pytest.mark.fullsize
def test_fullsize_adm_one_critic_and_one_generator_iteration():
    from diffusers import UNet2DModel

    from fdistill.divergences import get_divergence
    from fdistill.objective import FDistill
    from fdistill.pipelines.image import assemble
    from fdistill.pipelines.imagenet64 import DEFAULTS
    from fdistill.ratio import RatioNormalizer

    t_start = time.time()
    torch.manual_seed(0)
    cfg = _cfg(JS)
    unet = UNet2DModel(**ADM_IMAGENET64)
    assert 295e6 < sum(p.numel() for p in unet.parameters()) < 297e6
    task = assemble(cfg, {**DEFAULTS, "loader_threads": 0, "grid_samples": 4,
                          "feature_modules": cfg.task["feature_modules"]}, unet, 0.5, _RandomImages(), "cpu",
                    64, 3, 1000)
    # the paper's discriminator input, 8x8 with 768 channels: FastGen's encoder block enc.8x8_block2
    assert cfg.task["feature_modules"] == ["down_blocks.3"] and task.info["feature_shapes"] == [(768, 8, 8)]
    t_built = time.time()
    ratio = RatioNormalizer(cfg.ratio_norm, task.schedule.t_range)  # FastGen's bins: the whole [0.002, 80]
    obj = FDistill(task.generator, task.teacher, task.fake_score, task.discriminator, get_divergence("js"), ratio,
                   task.schedule, cfg.objective)
    kw = dict(lr=cfg.optim.lr_gen, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    critic_params = list(task.fake_score.parameters()) + list(task.discriminator.parameters())
    opt_c = torch.optim.AdamW(critic_params, **kw)
    opt_g = torch.optim.AdamW(task.generator.parameters(), **kw)
    rng = torch.Generator().manual_seed(0)
    w_fake = task.fake_score.backbone.conv_out.weight.detach().clone()
    w_gen = task.generator.denoiser.backbone.conv_out.weight.detach().clone()
    w_disc = task.discriminator.heads[0].net[0].weight.detach().clone()

    t0 = time.time()
    x_real, y_real = task.sample_real(1, rng, "cpu")
    loss_c, logs_c = obj.critic_loss(task.generator.sample_latents(1, rng), task.sample_cond(1, rng, "cpu"),
                                     x_real, y_real, rng)
    loss_c.backward()
    torch.nn.utils.clip_grad_norm_(critic_params, cfg.optim.grad_clip)
    opt_c.step()
    opt_c.zero_grad(set_to_none=True)
    t1 = time.time()
    loss_g, logs_g = obj.generator_loss(task.generator.sample_latents(1, rng), task.sample_cond(1, rng, "cpu"), rng)
    loss_g.backward()
    torch.nn.utils.clip_grad_norm_(task.generator.parameters(), cfg.optim.grad_clip)
    opt_g.step()
    t2 = time.time()
    print(f"\nfull-size ADM ({torch.get_num_threads()} threads): build {t_built - t_start:.1f} s, critic iteration "
          f"{t1 - t0:.1f} s, generator iteration {t2 - t1:.1f} s, total {time.time() - t_start:.1f} s")

    assert torch.isfinite(loss_c) and torch.isfinite(loss_g)
    assert all(torch.isfinite(v).all() for v in {**logs_c, **logs_g}.values())
    assert not torch.equal(task.fake_score.backbone.conv_out.weight, w_fake)
    assert not torch.equal(task.discriminator.heads[0].net[0].weight, w_disc)
    assert not torch.equal(task.generator.denoiser.backbone.conv_out.weight, w_gen)
    assert task.teacher.calls["features"] == 1 and task.teacher.calls["both"] == 1  # one teacher pass each
