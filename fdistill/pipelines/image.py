"""Distil your own EDM-preconditioned diffusers ``UNet2DModel`` on any image dataset (pipeline ``image``).

The teacher is a folder holding a ``UNet2DModel`` (``config.json`` + weights) and an ``fdistill_config.json``
with ``"precond": "edm"`` and ``sigma_data``: what ``fdistill convert-edm`` writes for EDM's ADM checkpoints.
The real data for the GAN term is anything ``fdistill.data.open_image_dataset`` reads (an EDM dataset zip, a
folder of class sub-folders, an npz).

    teacher        EDMPrecondUNet(unet), frozen (optionally bf16 weights); its bottleneck feeds the discriminator
    generator      OneStepGenerator(copy of the teacher, sigma_max): x = D(sigma_max z, sigma_max, c)
    fake score     a copy of the teacher; both copies fp32 and trainable (paper s.4: initialised from the teacher)
    discriminator  heads sized from the teacher's feature maps (docs/method.md, "The density ratio")

Resolution, channels and the number of classes default to the teacher's own; ``pipeline: imagenet64`` is this
pipeline with ImageNet-64's values, checked against the teacher. ``task.init_from`` starts the trainable
networks from a previous run's checkpoint (the fine-tune stage of the ImageNet-64 recipe).
"""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn as nn

from ..denoisers import EDMPrecondUNet, freeze
from ..discriminator import Discriminator
from ..generator import OneStepGenerator
from ..convert.edm import PRECOND_FILE, load_converted
from ..data import open_image_dataset
from ..imageio import save_grid
from ..noise import NoiseSchedule
from ..sampler import per_image_latents
from ..utils import DTYPES
from ..weights import load_weights, resolve_checkpoint, unwrap_state_dict
from ..task import Task, check_task_keys

DEFAULTS = {
    # Weights of the frozen teacher: 'float32' or 'bfloat16' (halves its memory; under GPU autocast its matmuls
    # run in bf16 either way). The trainable copies are always fp32 (their updates are too small for bf16).
    "teacher_dtype": "float32",
    "resolution": None,      # None: the teacher's sample_size
    "channels": None,        # None: the teacher's in_channels
    "num_classes": None,     # None: the teacher's num_class_embeds (0 = unconditional)
    "feature_modules": ["mid_block"],  # UNet submodules whose outputs feed the discriminator (one head each)
    "dropout": 0.0,          # dropout of the trainable copies (DMD2 uses 0 for EDM's ADM; EDM trained it with 0.1)
    "xflip": False,          # random horizontal flips of the real images (drawn from the training rng)
    "label_offset": 0,       # added to the dataset's labels (the downsampled-ImageNet npz files count from 1)
    "grid_samples": 100,     # images per sample grid
    "loader_threads": 8,     # threads decoding the real images of a batch (0: decode in the training thread)
    "init_from": None,       # a previous run directory or one of its ckpt-* folders: start from its weights
    "init_generator": "generator",  # which generator of that checkpoint: 'generator' or an EMA, e.g. 'ema_0.9999'
    "init_critic": True,     # also start the fake score and the discriminator from that checkpoint
}

_TEACHER_DTYPES = ("float32", "bfloat16")


def build(cfg, device, defaults: dict | None = None, pipeline: str = "image") -> Task:
    """The ``image`` task; ``imagenet64.build`` calls it with ImageNet-64 defaults."""
    settings = check_task_keys(cfg.task, DEFAULTS if defaults is None else defaults, pipeline)
    if not cfg.teacher:
        raise ValueError(f"pipeline {pipeline} needs a teacher: pass teacher=DIR, a folder written by "
                         "`fdistill convert-edm EDM.pkl DIR` (config.json, diffusion_pytorch_model.safetensors, "
                         f"{PRECOND_FILE})")
    if not cfg.data:
        raise ValueError(f"pipeline {pipeline} needs real images for the GAN term: pass data=PATH, an EDM dataset "
                         "zip (EDM's dataset_tool.py), a folder of class sub-folders, or an .npz of uint8 images")
    if not Path(cfg.teacher).is_dir():
        raise FileNotFoundError(f"teacher={cfg.teacher}: no such folder; convert the EDM checkpoint first with "
                                f"`fdistill convert-edm EDM.pkl {cfg.teacher}`")
    if settings["teacher_dtype"] not in _TEACHER_DTYPES:
        raise ValueError(f"task.teacher_dtype must be one of {sorted(_TEACHER_DTYPES)}, "
                         f"got {settings['teacher_dtype']!r}")
    unet, precond = load_converted(cfg.teacher, dtype=torch.float32)
    res, channels, num_classes = _shape_keys(settings, unet, pipeline)
    dataset = open_image_dataset(cfg.data, res, num_classes=num_classes or None, channels=channels,
                                 label_offset=settings["label_offset"])
    if num_classes and not dataset.has_labels:
        raise ValueError(f"data={cfg.data} has no labels but the teacher is class-conditional ({num_classes} "
                         "classes); give a labelled dataset (dataset.json labels, or class sub-folders)")
    task = assemble(cfg, settings, unet, float(precond.get("sigma_data", 0.5)), dataset, device, res, channels,
                    num_classes)
    task.info["teacher_meta"] = precond
    return task


def _shape_keys(settings: dict, unet, pipeline: str) -> tuple[int, int, int]:
    """(resolution, channels, num_classes) from the task keys, checked against the teacher's UNet config."""
    c = unet.config
    have = {"resolution": int(c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]),
            "channels": int(c.in_channels), "num_classes": int(c.num_class_embeds or 0)}
    out = []
    for key in ("resolution", "channels", "num_classes"):
        v = settings[key]
        if v is None:
            v = have[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"config key task.{key} must be an integer, got {v!r}")
        if v != have[key]:
            raise ValueError(f"task.{key}={v} but the teacher's UNet has {key} {have[key]}; pass task.{key}="
                             f"{have[key]} (or a teacher made for {key} {v})")
        out.append(v)
    return tuple(out)


def _trainable_copy(unet: nn.Module, dropout: float) -> nn.Module:
    net = copy.deepcopy(unet).float().requires_grad_(True).train()
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = dropout
    if hasattr(net, "register_to_config") and "dropout" in getattr(net, "config", {}):
        net.register_to_config(dropout=dropout)  # so an exported generator records what it was trained with
    return net


def _json_config(unet: nn.Module) -> dict:
    """A diffusers model's config as plain JSON types (tuples become lists; from_config accepts either), without
    the private keys (``_name_or_path`` is where it was loaded from, not what it is)."""
    return json.loads(json.dumps({k: v for k, v in unet.config.items() if not k.startswith("_")}))


def assemble(cfg, settings: dict, unet: nn.Module, sigma_data: float, dataset, device, resolution: int, channels: int,
             num_classes: int) -> Task:
    """Teacher, trainable copies, discriminator, schedule, real data and conditioning around a UNet2DModel.

    ``unet`` must hold fp32 weights without hooks; ``dataset`` yields (CHW float in [-1, 1], label)."""
    fm = list(settings["feature_modules"])
    if abs(sigma_data - cfg.objective.sigma_data) > 1e-9:
        raise ValueError(f"the teacher's sigma_data is {sigma_data} but objective.sigma_data (the fake score's "
                         f"loss weighting) is {cfg.objective.sigma_data}; pass objective.sigma_data={sigma_data}")
    # Copy the UNet before wrapping the teacher: a Denoiser's feature hooks are bound to the Denoiser that
    # registered them, so deep-copying a wrapped model would leave the copy reporting into the teacher.
    gen_unet, fake_unet = _trainable_copy(unet, settings["dropout"]), _trainable_copy(unet, settings["dropout"])
    teacher = freeze(EDMPrecondUNet(unet, sigma_data, fm))
    if settings["teacher_dtype"] != "float32":
        unet.to(DTYPES[settings["teacher_dtype"]])
    fake = EDMPrecondUNet(fake_unet, sigma_data, fm)  # features too: objective.disc_features=fake reads them
    generator_sigma = cfg.noise.generator_sigma or cfg.noise.sigma_max
    generator = OneStepGenerator(EDMPrecondUNet(gen_unet, sigma_data, ()), generator_sigma,
                                 (channels, resolution, resolution))
    with torch.no_grad():
        probe = teacher(torch.zeros(1, channels, resolution, resolution), torch.ones(1),
                        torch.zeros(1, dtype=torch.long) if num_classes else None, mode="features")
    disc = Discriminator.for_feature_shapes([f.shape[1:] for f in probe])
    teacher.reset_calls()  # the probe is not part of training; the counters are read by tests/benchmarks
    schedule = _schedule(cfg.noise)

    if settings["init_from"]:
        _init_from(settings["init_from"], settings["init_generator"], settings["init_critic"], generator, fake, disc)

    threads = int(settings["loader_threads"])
    pool = ThreadPoolExecutor(threads, thread_name_prefix="fdistill-data") if threads > 0 else None
    xflip = bool(settings["xflip"])

    def sample_cond(k, rng, dev):
        if not num_classes:
            return None
        return torch.randint(0, num_classes, (k,), generator=rng, device=dev)

    def sample_real(k, rng, dev):
        # Indices (and flips) come from the training rng, whose state the checkpoints keep: a resumed run
        # reads the same images as an uninterrupted one. Fetching them to the host is one sync per call.
        idx = torch.randint(0, len(dataset), (k,), generator=rng, device=dev)
        flip = torch.rand(k, generator=rng, device=dev) < 0.5 if xflip else None
        items = list(pool.map(dataset.__getitem__, idx.tolist())) if pool else [dataset[i] for i in idx.tolist()]
        x = torch.stack([im for im, _ in items]).to(dev, non_blocking=True)
        if flip is not None:
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = torch.tensor([lab for _, lab in items], dtype=torch.long).to(dev) if num_classes else None
        return x, y

    n_grid = int(settings["grid_samples"])

    def evaluate(gen, run_dir, final=False, step=0):
        """A sample grid of fixed latents and labels spread over the classes; FID is a separate command."""
        dev = next(gen.parameters()).device
        z = per_image_latents(range(n_grid), (channels, resolution, resolution), dev)
        labels = None
        if num_classes:
            labels = (torch.arange(n_grid, device=dev) * max(1, num_classes // n_grid)) % num_classes
        was_training = gen.training
        gen.eval()
        xs = []
        with torch.no_grad():
            for i in range(0, n_grid, 50):
                xs.append(gen(z[i:i + 50], None if labels is None else labels[i:i + 50]).float().cpu())
        gen.train(was_training)
        name = "samples_student.png" if final else f"samples_{step:06d}.png"
        save_grid(torch.cat(xs), Path(run_dir) / name)
        return {}

    return Task(teacher=teacher, generator=generator, fake_score=fake, discriminator=disc, schedule=schedule,
                sample_cond=sample_cond, sample_real=sample_real, evaluate=evaluate, sigma_data=sigma_data,
                info={"resolution": resolution, "channels": channels, "num_classes": num_classes,
                      "dataset_size": len(dataset), "feature_shapes": [tuple(f.shape[1:]) for f in probe],
                      "init_from": settings["init_from"],
                      # what export needs to rebuild the generator without the teacher folder (checkpoints keep it)
                      "generator_spec": {"pipeline": cfg.pipeline, "unet_config": _json_config(gen_unet),
                                         "sigma_data": float(sigma_data), "sigma_max": float(generator_sigma)}})


def _schedule(n) -> NoiseSchedule:
    if n.grid == "edm":
        return NoiseSchedule.edm(n.num_levels, n.sigma_min, n.sigma_max, n.rho, (n.dm_index_min, n.dm_index_max),
                                 n.disc_index_max, n.disc_levels)
    if n.grid == "continuous":
        return NoiseSchedule.continuous(n.sigma_min, n.sigma_max, n.generator_sigma)
    raise ValueError(f"noise.grid={n.grid!r}: an EDM-preconditioned teacher uses noise.grid=edm (or continuous); "
                     "'vp' is for variance-preserving teachers")


def _init_from(path, gen_name: str, with_critic: bool, generator, fake, disc):
    """Load a previous run's weights (fine-tuning): generator (raw or an EMA, whichever wrapper saved it), and
    optionally fake score + discriminator. Reads checkpoints through ``fdistill.weights``, as export does."""
    ckpt = resolve_checkpoint(path, "task.init_from=")
    generator.load_state_dict(unwrap_state_dict(load_weights(ckpt, gen_name)), strict=True)
    if with_critic:
        fake.load_state_dict(load_weights(ckpt, "fake_score"), strict=True)
        disc.load_state_dict(load_weights(ckpt, "discriminator"), strict=True)
