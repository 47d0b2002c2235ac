"""The benchmarks' tasks: each named configuration built by the package's own task builders, on random or tiny
teachers where no real one is at hand (benchmarks/step.py, sampling.py and saved_activations.py share them).

    tiny        a tiny class-conditional UNet2DModel (tests/tiny_models.py) through ``pipelines.image.assemble``
    mnist       ``pipelines.mnist.build``: the shipped teacher, else a random one of its config
    imagenet64  EDM's ImageNet-64 ADM (random weights; ``--tiny``: toy widths) through ``pipelines.image.assemble``
    sd15        ``pipelines.coco_t2i.build`` on a random SD1.5 folder (SD1.5's UNet, random; ``--tiny``: toy widths;
                a tiny text encoder and VAE: the benchmarks time the UNets)
    sdxl, sd35, flux   ``pipelines.diffusers_t2i`` on the tiny teachers of tests/tiny_teachers.py (``--tiny`` only)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tests"):  # run from a checkout without installing; the tests' tiny teachers
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from fdistill.config import load_config  # noqa: E402
from fdistill.convert.edm import ADM_IMAGENET64 as EDM_ADM_IMAGENET64  # noqa: E402
from fdistill.pipelines import build_task as build_pipeline_task  # noqa: E402
from fdistill.pipelines import check_task_keys  # noqa: E402

CONFIGS = ("tiny", "mnist", "imagenet64", "sd15", "sdxl", "sd35", "flux")

# EDM's ImageNet-64 ADM as diffusers UNet2DModel (what `fdistill convert-edm` writes): 296M params; dropout off,
# as the benchmark has always timed it.
ADM_IMAGENET64 = {**EDM_ADM_IMAGENET64, "dropout": 0.0}
# --tiny: the same block types at toy widths, to exercise the full-size code paths on a CPU.
ADM_TINY = {**ADM_IMAGENET64, "sample_size": 16, "block_out_channels": [32, 64, 64, 64], "layers_per_block": 1,
            "attention_head_dim": 32}

# SD1.5's UNet2DConditionModel (unet/config.json of stable-diffusion-v1-5): 860M params, 64x64x4 latents.
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
    freq_shift=0, center_input_sample=False, downsample_padding=1, mid_block_scale_factor=1, norm_eps=1e-5,
)
SD15_TINY = {**SD15_UNET, "sample_size": 16, "block_out_channels": [32, 64], "layers_per_block": 1,
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32, "norm_num_groups": 8}


def _cfg(yaml_name: str, overrides=()):
    return load_config(ROOT / "configs" / yaml_name, list(overrides))


class BankDataset(torch.utils.data.Dataset):
    """Random 'real' images: a small fixed bank, so that reading them costs what a decoded batch costs."""

    def __init__(self, channels, res, num_classes, n=64):
        g = torch.Generator().manual_seed(1)
        self.x = torch.rand(n, channels, res, res, generator=g) * 2 - 1
        self.num_classes, self.has_labels = num_classes, bool(num_classes)

    def __len__(self):
        return 1 << 20

    def __getitem__(self, i):
        return self.x[i % len(self.x)], i % max(self.num_classes, 1)


def build_edm_unet(name: str, unet, cfg):
    """tiny / imagenet64: a random UNet2DModel through ``pipelines.image.assemble`` (what imagenet64.build calls)."""
    from fdistill.pipelines.image import assemble
    from fdistill.pipelines.imagenet64 import DEFAULTS

    settings = check_task_keys(cfg.task if name == "imagenet64" else {}, DEFAULTS, name)
    res, ch, ncls = unet.config.sample_size, unet.config.in_channels, unet.config.num_class_embeds or 0
    settings.update(resolution=res, channels=ch, num_classes=ncls, loader_threads=0, grid_samples=4)
    return assemble(cfg, settings, unet, cfg.objective.sigma_data, BankDataset(ch, res, ncls), "cpu", res, ch, ncls)


def build_mnist(cfg, tmp: Path):
    """The MNIST default through ``pipelines.mnist.build``: the shipped teacher, else a random one of its config."""
    from diffusers import UNet2DModel

    from fdistill.pipelines import mnist

    teacher = mnist.TEACHER_DIR
    random_teacher = not (teacher / "config.json").is_file()
    if random_teacher:
        teacher = tmp / "mnist_teacher"
        UNet2DModel(**mnist.unet_config()).save_pretrained(teacher)
        (teacher / "fdistill_config.json").write_text(json.dumps({"precond": "edm", "sigma_data": 0.5,
                                                                   "resolution": mnist.RESOLUTION}))
    cfg.teacher = str(teacher)
    task = mnist.build(cfg, "cpu")
    task.teacher.reset_calls()
    task.info["random_teacher"] = random_teacher
    return task


def _images_and_prompts(tmp: Path, res: int = 32) -> tuple[Path, Path]:
    (tmp / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(tmp / "images" / f"{i}.png")
    (tmp / "prompts.txt").write_text("\n".join(f"prompt number {i}" for i in range(16)) + "\n")
    return tmp / "images", tmp / "prompts.txt"


def build_sd15(tiny: bool, device, tmp: Path, overrides=()):
    """SD1.5 through ``pipelines.coco_t2i.build`` on a random teacher folder (tests/tiny_models.py's, with SD1.5's
    UNet config); its text encoder and VAE stay tiny (the benchmarks time the UNets)."""
    from tiny_models import make_tiny_sd

    unet = SD15_TINY if tiny else SD15_UNET
    teacher = make_tiny_sd(tmp / "teacher", unet_config=unet)
    images, prompts = _images_and_prompts(tmp, res=unet["sample_size"] * 2)  # the tiny VAE downsamples by 2
    cfg = _cfg("coco_sd15_js.yaml", [f"teacher={teacher}", f"prompts={prompts}", f"data={images}",
                                     f"out={tmp / 'run'}", "task.eval_prompts=2", "ema=[]", *overrides])
    task = build_pipeline_task(cfg, device)
    task.info["random_teacher"] = True
    return task, cfg


def build_family(config: str, tiny: bool, device, tmp: Path, overrides=()):
    """sdxl / sd35 / flux through their task (pipelines.diffusers_t2i) on a tiny random teacher folder of the real
    diffusers classes (tests/tiny_teachers.py); full size needs the teacher's folder (the distill command)."""
    import tiny_teachers

    if not tiny:
        raise SystemExit(f"--config {config} runs with --tiny only (full size: fdistill distill with the teacher)")
    family = {"sdxl": "sdxl", "sd35": "sd3", "flux": "flux"}[config]
    teacher = getattr(tiny_teachers, f"tiny_{family}")(tmp / "teacher")
    images, prompts = _images_and_prompts(tmp)
    yaml = {"sdxl": "sdxl_js.yaml", "sd35": "sd35_medium_js.yaml", "flux": "flux_dev_js.yaml"}[config]
    cfg = _cfg(yaml, [f"teacher={teacher}", f"prompts={prompts}", f"data={images}",
                      f"out={tmp / 'run'}", "task.teacher_dtype=float32", "task.resolution=32",
                      "task.max_sequence_length=16", "task.lora_rank=0", "ema=[]", *overrides])
    return build_pipeline_task(cfg, device), cfg


def build_task(config: str, tiny: bool, device, tmp: Path, overrides=()):
    """(task, cfg) for a named configuration; networks on ``device``."""
    from diffusers import UNet2DModel
    from tiny_models import tiny_edm_unet

    if config == "tiny":
        cfg = _cfg("mnist.yaml", ["batch_size=8", *overrides])
        task = build_edm_unet("tiny", tiny_edm_unet(), cfg)
    elif config == "mnist":
        cfg = _cfg("mnist.yaml", overrides)
        task = build_mnist(cfg, tmp)
    elif config == "imagenet64":
        cfg = _cfg("imagenet64_js.yaml", overrides)
        task = build_edm_unet("imagenet64", UNet2DModel(**(ADM_TINY if tiny else ADM_IMAGENET64)), cfg)
    elif config == "sd15":
        task, cfg = build_sd15(tiny, device, tmp, overrides)
    elif config in ("sdxl", "sd35", "flux"):
        task, cfg = build_family(config, tiny, device, tmp, overrides)
    else:
        raise SystemExit(f"--config must be one of {CONFIGS}")
    for name in ("teacher", "generator", "fake_score", "discriminator"):
        getattr(task, name).to(device)
    return task, cfg


def backbone(den):
    """The nn.Module doing the work inside a Denoiser (through a CFG wrapper)."""
    while getattr(den, "backbone", None) is None and hasattr(den, "inner"):
        den = den.inner
    return den.backbone


def denoisers(task) -> dict:
    d = {"teacher": task.teacher, "generator": task.generator.denoiser, "fake_score": task.fake_score}
    if hasattr(task.teacher, "inner"):
        d["teacher_inner"] = task.teacher.inner
    return d


def networks(task) -> dict:
    return {"generator": backbone(task.generator.denoiser), "teacher": backbone(task.teacher),
            "fake_score": backbone(task.fake_score), "discriminator": task.discriminator}


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def set_grad_ckpt(task, on: bool):
    """Gradient checkpointing of the trainable UNets, as the trainer enables it (diffusers' block-level switch)."""
    for net in (task.generator, task.fake_score):
        for m in net.modules():
            if hasattr(m, "enable_gradient_checkpointing") and hasattr(m, "config"):
                m.enable_gradient_checkpointing() if on else m.disable_gradient_checkpointing()
