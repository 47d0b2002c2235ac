"""Per-iteration cost of f-distill training: generator and critic iterations, js against reverse_kl.

    python benchmarks/step.py --config tiny                      # tiny CPU UNet (seconds)
    python benchmarks/step.py --config mnist                     # the embedded MNIST default
    python benchmarks/step.py --config imagenet64 --batch auto   # EDM's ADM at full size (GPU), random weights
    python benchmarks/step.py --config sd15 --batch auto         # SD1.5's UNet at 64x64 latents (GPU), random weights
    python benchmarks/step.py --config sdxl|sd35|flux --tiny     # the SDXL / SD3.5 / FLUX.1 tasks on tiny teachers

The networks are assembled as the trainer assembles them: a frozen teacher, generator = OneStepGenerator(copy of
the teacher), fake score = copy, discriminator sized from the teacher's feature shapes, ``FDistill`` with a
``RatioNormalizer``; ImageNet-64 goes through ``pipelines.image.assemble`` and MNIST through ``pipelines.mnist.build``
(the shipped teacher if present, else a random one of the same config). An iteration is the trainer's
``critic_update`` / ``generator_update``: sample latents, conditions and real data, loss under autocast, backward,
clipping, AdamW step (and the generator EMA).

Measured per iteration type: wall time (median over repeats of blocks of ``--iters`` iterations, warm-up excluded,
one device sync per block, none inside), images/s (generator batch / time), peak memory (CUDA max allocated; on
CPU the peak RSS sampled during the block), forward/backward calls and rows per network (hooks, in one separate
untimed iteration, plus ``Denoiser.calls`` from the timed ones), model FLOPs (torch's FlopCounterMode) and MFU
where a peak rate is known. The same is measured for ``--baseline`` (reverse_kl) in the same process, interleaved
with ``--divergence`` (js) block by block so that load drifts hit both alike: their ratio is the weighting overhead.

Output: JSON (``--out`` file, else stdout) and a one-line summary as the last line of stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_T0 = time.perf_counter()  # --deadline-s counts from here
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

CONFIGS = ("tiny", "mnist", "imagenet64", "sd15", "sdxl", "sd35", "flux")

# EDM's ImageNet-64 ADM as diffusers UNet2DModel (what `fdistill convert-edm` writes): 296M params.
ADM_IMAGENET64 = dict(
    sample_size=64, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    freq_shift=0, flip_sin_to_cos=True,
    down_block_types=["ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    mid_block_type="UNetMidBlock2D",
    up_block_types=["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"],
    block_out_channels=[192, 384, 576, 768], layers_per_block=3, mid_block_scale_factor=1, downsample_padding=1,
    downsample_type="resnet", upsample_type="resnet", dropout=0.0, act_fn="silu", attention_head_dim=64,
    norm_num_groups=32, attn_norm_num_groups=32, norm_eps=1e-5, resnet_time_scale_shift="scale_shift",
    add_attention=True, class_embed_type=None, num_class_embeds=1000,
)
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
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# The tiny UNet of tests/test_denoisers.py (16x16, 1 channel, 10 classes).
TINY_UNET = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=8, num_class_embeds=10, attention_head_dim=16, flip_sin_to_cos=True, freq_shift=0,
                 resnet_time_scale_shift="scale_shift")

# Dense bf16 peak rates (vendor datasheets) for MFU; KINDS.md measured ~790 TFLOP/s for an 8k matmul on the H200.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


# ------------------------------------------------------------------------------------------------------------
# environment


def load_note() -> dict:
    la = os.getloadavg()
    n = os.cpu_count() or 1
    return {"loadavg": [round(x, 2) for x in la], "cpu_count": n, "under_load": la[0] > 0.5 * n}


def env_info(device: torch.device) -> dict:
    import diffusers

    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "host": socket.gethostname(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "device": str(device), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device_name=p.name, device_memory_gb=round(p.total_memory / 2 ** 30, 1),
                    cuda=torch.version.cuda)
    else:
        info["device_name"] = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
            info["device_name"] = names[0] if names else info["device_name"]
        except OSError:
            pass
    return info


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
        return True
    except ImportError:
        return False


class PeakMemory:
    """Peak memory of a block: CUDA max allocated, or on CPU the largest RSS a 10 ms sampler saw (ru_maxrss only
    ever grows, so it cannot tell one block from another)."""

    def __init__(self, device):
        self.device = device
        self.peak_bytes = 0
        self.kind = "cuda_max_allocated" if device.type == "cuda" else ("cpu_rss" if _has_psutil() else
                                                                          "cpu_ru_maxrss")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        if not _has_psutil():  # no sampler: fall back to the process high-water mark
            self._thread = None
            return self
        import psutil
        proc, self._stop = psutil.Process(), threading.Event()
        self.peak_bytes = proc.memory_info().rss

        def sample():
            while not self._stop.wait(0.01):  # ~1% of one core at most
                self.peak_bytes = max(self.peak_bytes, proc.memory_info().rss)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif getattr(self, "_thread", None) is not None:
            self._stop.set()
            self._thread.join()
            import psutil
            self.peak_bytes = max(self.peak_bytes, psutil.Process().memory_info().rss)
        else:
            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return False


def rss_mb() -> float:
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2 ** 20
    except ImportError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------------------
# building the networks (as the trainer does: built on the host, then moved to the device)


def _cfg(yaml_name: str, overrides=()):
    from fdistill.config import load_config
    return load_config(ROOT / "configs" / yaml_name, list(overrides))


class _BankDataset(torch.utils.data.Dataset):
    """Random 'real' images: a small fixed bank, so that reading them costs what a decoded batch costs."""

    def __init__(self, channels, res, num_classes, n=64):
        g = torch.Generator().manual_seed(1)
        self.x = torch.rand(n, channels, res, res, generator=g) * 2 - 1
        self.num_classes, self.has_labels = num_classes, bool(num_classes)

    def __len__(self):
        return 1 << 20

    def __getitem__(self, i):
        return self.x[i % len(self.x)], i % max(self.num_classes, 1)


def build_edm_unet(name: str, unet_cfg: dict, cfg):
    """tiny / imagenet64: a random UNet2DModel through ``pipelines.image.assemble`` (what imagenet64.build calls)."""
    from diffusers import UNet2DModel

    from fdistill.pipelines import check_task_keys
    from fdistill.pipelines.imagenet64 import DEFAULTS

    t = check_task_keys(cfg.task if name == "imagenet64" else {}, DEFAULTS, name)
    res, ch, ncls = unet_cfg["sample_size"], unet_cfg["in_channels"], unet_cfg.get("num_class_embeds") or 0
    t.update(resolution=res, channels=ch, num_classes=ncls, loader_threads=0, grid_samples=4)
    from fdistill.pipelines.image import assemble

    unet = UNet2DModel(**unet_cfg)
    return assemble(cfg, t, unet, cfg.objective.sigma_data, _BankDataset(ch, res, ncls), "cpu", res, ch, ncls)


def build_mnist(cfg, tmp: Path):
    """The MNIST default through ``pipelines.mnist.build``: the shipped teacher, else a random one of its config."""
    from fdistill.pipelines import mnist

    teacher = mnist.TEACHER_DIR
    random_teacher = not (teacher / "config.json").is_file()
    if random_teacher:
        from diffusers import UNet2DModel

        teacher = tmp / "mnist_teacher"
        UNet2DModel(**mnist.unet_config()).save_pretrained(teacher)
        (teacher / "fdistill_config.json").write_text(json.dumps({"precond": "edm", "sigma_data": 0.5,
                                                                   "resolution": mnist.RESOLUTION}))
    cfg.teacher = str(teacher)
    task = mnist.build(cfg, "cpu")
    task.teacher.reset_calls()
    task.info["random_teacher"] = random_teacher
    return task


def build_sd(unet_cfg: dict, cfg, device, num_prompts: int = 256, num_real: int = 256):
    """SD1.5 as ``pipelines.coco_t2i.build`` assembles it, with a random UNet, random text embeddings [B, 77, D]
    and random real latents in host memory (its prompt bank and latent memmap live there too)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from fdistill.denoisers import freeze
    from fdistill.denoisers_vp import CFGDenoiser, VPUNetDenoiser
    from fdistill.discriminator import Discriminator
    from fdistill.generator import OneStepGenerator
    from fdistill.noise import NoiseSchedule, vp_sigmas
    from fdistill.pipelines import Task, check_task_keys
    from fdistill.pipelines.coco_t2i import DEFAULTS

    t = check_task_keys(cfg.task, DEFAULTS, "coco_t2i")
    unet = UNet2DConditionModel(**unet_cfg)
    ac = DDPMScheduler(**SD15_SCHEDULER).alphas_cumprod.clone()
    T = len(ac)
    sigmas = vp_sigmas(ac)
    schedule = NoiseSchedule(sigmas, (cfg.noise.dm_index_min, cfg.noise.dm_index_max),
                             generator_sigma=float(sigmas[t["generator_timestep"]]))
    fm = list(t["feature_modules"])
    pred = "epsilon"
    gen_den = VPUNetDenoiser(copy.deepcopy(unet), ac, pred, fm).requires_grad_(True).train()
    fake = VPUNetDenoiser(copy.deepcopy(unet), ac, pred, fm).requires_grad_(True).train()
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    teacher_vp = freeze(VPUNetDenoiser(unet.to(dtypes[t["teacher_dtype"]]), ac, pred, fm))
    lat, C, D, L = unet_cfg["sample_size"], unet_cfg["in_channels"], unet_cfg["cross_attention_dim"], 77
    generator = OneStepGenerator(gen_den, schedule.generator_sigma, (C, lat, lat))
    g = torch.Generator().manual_seed(2)
    uncond = torch.randn(1, L, D, generator=g)
    teacher = freeze(CFGDenoiser(teacher_vp, t["guidance_scale"], uncond))
    with torch.no_grad():
        probe = teacher_vp(torch.zeros(1, C, lat, lat), sigmas[T // 2:T // 2 + 1], uncond, mode="features")
    teacher_vp.reset_calls()
    disc = Discriminator.for_feature_shapes([f.shape[1:] for f in probe])
    # host-side tables, read as coco_t2i reads its PromptBank (memory mode, fp16) and latent memmap
    bank = torch.randn(num_prompts, L, D, generator=g).half()
    latents = torch.randn(num_real, C, lat, lat, generator=g).half()

    def sample_cond(n, rng, dev):
        ids = torch.randint(0, num_prompts, (n,), generator=rng, device=rng.device).cpu()
        return {"encoder_hidden_states": bank[ids].to(dev, non_blocking=True).float()}

    def sample_real(n, rng, dev):
        idx = torch.randint(0, num_real, (n,), generator=rng, device=rng.device).cpu()
        cond = sample_cond(n, rng, dev)
        return latents[idx].float().to(dev), cond

    return Task(teacher=teacher, generator=generator, fake_score=fake, discriminator=disc, schedule=schedule,
                sample_cond=sample_cond, sample_real=sample_real, sigma_data=0.5,
                info={"feature_shapes": [tuple(f.shape[1:]) for f in probe], "guidance_scale": t["guidance_scale"],
                      "teacher_dtype": t["teacher_dtype"]})


def build_task(config: str, tiny: bool, device, tmp: Path, overrides=()):
    """(task, cfg) for a named configuration; networks on ``device``."""
    if config == "tiny":
        cfg = _cfg("mnist.yaml", ["batch_size=8", *overrides])
        task = build_edm_unet("tiny", TINY_UNET, cfg)
    elif config == "mnist":
        cfg = _cfg("mnist.yaml", overrides)
        task = build_mnist(cfg, tmp)
    elif config == "imagenet64":
        cfg = _cfg("imagenet64_js.yaml", overrides)
        task = build_edm_unet("imagenet64", ADM_TINY if tiny else ADM_IMAGENET64, cfg)
    elif config == "sd15":
        cfg = _cfg("coco_sd15_js.yaml", overrides)
        task = build_sd(SD15_TINY if tiny else SD15_UNET, cfg, device)
    elif config in ("sdxl", "sd35", "flux"):
        task, cfg = build_family(config, tiny, device, tmp, overrides)
    else:
        raise SystemExit(f"--config must be one of {CONFIGS}")
    for name in ("teacher", "generator", "fake_score", "discriminator"):
        getattr(task, name).to(device)
    return task, cfg


def build_family(config: str, tiny: bool, device, tmp: Path, overrides=()):
    """sdxl / sd35 / flux through their task (pipelines.diffusers_t2i) on a tiny random teacher folder of the real
    diffusers classes (tests/tiny_teachers.py); full size needs the teacher's folder (the distill command)."""
    if not tiny:
        raise SystemExit(f"--config {config} runs with --tiny only (full size: fdistill distill with the teacher)")
    sys.path.insert(0, str(ROOT / "tests"))
    import numpy as np
    import tiny_teachers
    from PIL import Image

    from fdistill.pipelines import build_task as build_pipeline_task

    family = {"sdxl": "sdxl", "sd35": "sd3", "flux": "flux"}[config]
    teacher = getattr(tiny_teachers, f"tiny_{family}")(tmp / "teacher")
    (tmp / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp / "images" / f"{i}.png")
    (tmp / "prompts.txt").write_text("\n".join(f"prompt number {i}" for i in range(16)) + "\n")
    yaml = {"sdxl": "sdxl_js.yaml", "sd35": "sd35_medium_js.yaml", "flux": "flux_dev_js.yaml"}[config]
    cfg = _cfg(yaml, [f"teacher={teacher}", f"prompts={tmp / 'prompts.txt'}", f"data={tmp / 'images'}",
                      f"out={tmp / 'run'}", "task.teacher_dtype=float32", "task.resolution=32",
                      "task.max_sequence_length=16", "task.lora_rank=0", "ema=[]", *overrides])
    return build_pipeline_task(cfg, device), cfg


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


# ------------------------------------------------------------------------------------------------------------
# the two iterations (trainer.critic_update / generator_update)


class Runner:
    def __init__(self, task, cfg, divergences, device, a):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        from fdistill.divergences import get_divergence
        from fdistill.objective import FDistill
        from fdistill.ratio import RatioNormalizer

        def _grad_norm(params, clip):
            # what the trainer's clipping (accelerator.clip_grad_norm_) does in one process
            return torch.nn.utils.clip_grad_norm_(list(params), clip if clip and clip > 0 else float("inf"))

        self._grad_norm = _grad_norm
        self.task, self.cfg, self.device, self.a = task, cfg, device, a
        self.B = a.batch
        o = cfg.optim
        lr_c = o.lr_critic if o.lr_critic is not None else o.lr_gen
        kw = dict(betas=tuple(o.betas), weight_decay=o.weight_decay)
        if a.fused_adamw:  # resolved in main: the config's optim.fused on CUDA (as the trainer), or the flag
            kw["fused"] = True
        elif a.foreach is not None:
            kw["foreach"] = a.foreach
        self.generator, self.fake, self.disc, self.teacher = task.generator, task.fake_score, task.discriminator, \
            task.teacher
        self.opt_g = torch.optim.AdamW(self.generator.parameters(), lr=o.lr_gen, **kw)
        self.critic_params = list(self.fake.parameters()) + list(self.disc.parameters())
        self.opt_c = torch.optim.AdamW(self.critic_params, lr=lr_c, **kw)
        ema = cfg.ema if a.ema else []
        self.emas = [AveragedModel(self.generator, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=True)
                     for d in ema]
        bins = task.schedule.ratio_bin_range(cfg.ratio_norm.bin_spacing)
        self.ratios = {name: RatioNormalizer(cfg.ratio_norm, bins).to(device)
                       for name in divergences}
        self._fdistill, self._get_divergence = FDistill, get_divergence
        self._make_objectives(self.generator, self.fake)
        self.rng = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + 1)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if a.amp == "bf16"
                         else contextlib.nullcontext())
        self.log_buf: list[torch.Tensor] = []
        self.channels_last = a.channels_last

    def _make_objectives(self, gen, fake):
        self.objectives = {name: self._fdistill(gen, self.teacher, fake, self.disc, self._get_divergence(name), r,
                                                self.task.schedule, self.cfg.objective)
                           for name, r in self.ratios.items()}

    def enable_compile(self):
        """torch.compile generator and fake score, as the trainer does (after the eager counting passes: hooks
        and FlopCounterMode see the eager modules)."""
        self._make_objectives(torch.compile(self.generator), torch.compile(self.fake))

    def _latents(self):
        z = self.generator.sample_latents(self.B, self.rng, self.device)
        return z.contiguous(memory_format=torch.channels_last) if self.channels_last and z.ndim == 4 else z

    def _record(self, logs):
        # the trainer's record(): detached scalars kept on the device until a logging interval
        self.log_buf.extend(v.detach().float().reshape(()) for v in logs.values())

    def _maybe_oom(self):
        # --simulate-oom-above: lets the batch search and its fallbacks be tested where nothing runs out of memory
        lim = self.a.simulate_oom_above
        if lim and self.B > lim:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated above batch {lim})")

    def critic(self, div):
        self._maybe_oom()
        t, B = self.task, self.B
        z = self._latents()
        cond = t.sample_cond(B, self.rng, self.device)
        x_real, cond_real = t.sample_real(B, self.rng, self.device)
        with self.autocast:
            loss, logs = self.objectives[div].critic_loss(z, cond, x_real, cond_real, self.rng)
        self.opt_c.zero_grad(set_to_none=True)
        loss.backward()
        logs["grad_norm_fake"] = self._grad_norm(self.fake.parameters(), self.cfg.optim.grad_clip)
        logs["grad_norm_disc"] = self._grad_norm(self.disc.parameters(), self.cfg.optim.grad_clip)
        if not self.a.count_only:
            self.opt_c.step()
        self._record(logs)
        if self.a.item_per_step:
            loss.item()

    def generator_iter(self, div):
        self._maybe_oom()
        t, B = self.task, self.B
        z = self._latents()
        cond = t.sample_cond(B, self.rng, self.device)
        with self.autocast:
            loss, logs = self.objectives[div].generator_loss(z, cond, self.rng)
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        logs["grad_norm_gen"] = self._grad_norm(self.generator.parameters(), self.cfg.optim.grad_clip)
        if not self.a.count_only:  # optimizer states would double the memory of a count on a small host
            self.opt_g.step()
            for ema in self.emas:
                ema.update_parameters(self.generator)
        self._record(logs)
        if self.a.item_per_step:
            loss.item()

    def phase(self, name):
        return self.generator_iter if name == "generator" else self.critic

    def clear(self):
        self.opt_g.zero_grad(set_to_none=True)
        self.opt_c.zero_grad(set_to_none=True)
        self.log_buf.clear()


# ------------------------------------------------------------------------------------------------------------
# counting: network calls, FLOPs, host-device syncs (each in one untimed iteration)


class CallCounter:
    """Forward calls and rows per network (forward pre-hooks); backward passes through each network (a hook on
    its input when that requires grad, and post-accumulate hooks on its parameters), per iteration."""

    def __init__(self, nets: dict):
        self.nets = nets
        self.handles = []
        self.fwd = Counter()
        self.rows = Counter()
        self.flag_input = set()
        self.flag_params = set()
        for name, m in nets.items():
            self.handles.append(m.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            for p in m.parameters():
                if p.requires_grad:
                    self.handles.append(p.register_post_accumulate_grad_hook(
                        lambda _p, name=name: self.flag_params.add(name)))

    def _pre(self, name):
        def hook(_mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)
            xs = x if isinstance(x, (list, tuple)) else [x]
            self.fwd[name] += 1
            self.rows[name] += int(xs[0].shape[0]) if torch.is_tensor(xs[0]) else 0
            for t in xs:
                if torch.is_tensor(t) and t.requires_grad:
                    t.register_hook(lambda g, name=name: self.flag_input.add(name))
        return hook

    def result(self) -> dict:
        out = {}
        for name in self.nets:
            back = name in self.flag_input or name in self.flag_params
            out[name] = {"forward": self.fwd[name], "backward": int(back), "rows": self.rows[name],
                         "param_grads": name in self.flag_params}
        return out

    def close(self):
        for h in self.handles:
            h.remove()


def count_calls(runner, task, phase, div) -> dict:
    dens = denoisers(task)
    for d in dens.values():
        d.reset_calls()
    cc = CallCounter(networks(task))
    try:
        runner.phase(phase)(div)
        sync(runner.device)
    finally:
        cc.close()
    res = cc.result()
    for name, d in dens.items():
        res.setdefault(name, {})["modes"] = dict(d.calls)
        d.reset_calls()
    return res


def count_flops(runner, phase, div, small: int = 4) -> int | None:
    """Model FLOPs of one iteration at the running batch (torch's FlopCounterMode: matmuls, convolutions,
    attention's two matmuls; forward and backward). Counted at a small batch without checkpointing and scaled:
    every counted op is per sample, so the count is exactly linear in the batch, and checkpointing's
    recomputation (hardware FLOPs, not model FLOPs) stays out."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B = runner.B
    runner.B = b = min(B, small)
    set_grad_ckpt(runner.task, False)
    try:
        fc = FlopCounterMode(display=False)
        # attention as explicit matmuls: counted alike on every device (the CPU's fused kernel has no formula)
        with warnings.catch_warnings(), sdpa_kernel([SDPBackend.MATH]):
            warnings.simplefilter("ignore")
            with fc:
                runner.phase(phase)(div)
        sync(runner.device)
    finally:
        runner.B = B
        set_grad_ckpt(runner.task, runner.grad_ckpt)
    return int(fc.get_total_flops()) * B // b


def find_syncs(runner, phase, div) -> dict | None:
    """Host-device synchronisations of one iteration, by source line (CUDA's sync debug mode)."""
    if runner.device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            runner.phase(phase)(div)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sync(runner.device)
    where = Counter(f"{os.path.relpath(w.filename, ROOT)}:{w.lineno}" for w in caught
                    if "synchroniz" in str(w.message).lower())
    return {"count": sum(where.values()), "where": dict(where.most_common())}


# ------------------------------------------------------------------------------------------------------------
# timing


def time_block(runner, phase, div, iters) -> tuple[float, int, dict]:
    fn = runner.phase(phase)
    dens = denoisers(runner.task)
    for d in dens.values():
        d.reset_calls()
    with PeakMemory(runner.device) as pm:
        sync(runner.device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn(div)
        sync(runner.device)
        dt = (time.perf_counter() - t0) / iters
    runner.log_buf.clear()
    calls = {n: {k: v / iters for k, v in d.calls.items()} for n, d in dens.items()}
    return dt, pm.peak_bytes, calls


def time_weighting(runner, divs, reps=200) -> dict:
    """The weighting alone (RatioNormalizer + h_f) on a batch of logits: what js adds over reverse_kl."""
    out = {}
    B, dev = runner.B, runner.device
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(B, generator=g, device=dev) * 2
    sigma = runner.task.schedule.sample_dm(B, g, dev)
    for _ in range(2):
        for name in divs:
            obj = runner.objectives[name]
            for _ in range(5):
                obj.ratio(logits, sigma, obj.divergence, update=False)
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(reps):
                obj.ratio(logits, sigma, obj.divergence, update=False)
            sync(dev)
            us = (time.perf_counter() - t0) / reps * 1e6
            out[name] = min(out.get(name, float("inf")), us)
    return {k: round(v, 2) for k, v in out.items()}


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def free(runner):
    runner.clear()
    gc.collect()
    if runner.device.type == "cuda":
        torch.cuda.empty_cache()


def search_batch(runner, div, candidates, budget_s) -> tuple[int, list]:
    """The largest batch in ``candidates`` (ascending) for which one critic and one generator iteration run;
    stops at the first out-of-memory error, or when the next try would exceed the time budget."""
    trials, best, t_start = [], None, time.perf_counter()
    for b in candidates:
        runner.B = b
        t0 = time.perf_counter()
        try:
            runner.critic(div)
            runner.generator_iter(div)
            sync(runner.device)
            ok, err = True, None
        except (RuntimeError, torch.OutOfMemoryError) as e:
            if not is_oom(e):
                raise
            ok, err = False, "out of memory"
        dt = time.perf_counter() - t0
        mem = torch.cuda.max_memory_allocated(runner.device) if runner.device.type == "cuda" else None
        trials.append({"batch": b, "ok": ok, "seconds": round(dt, 3), "error": err,
                       "peak_mem_gb": round(mem / 2 ** 30, 2) if mem else None})
        print(f"[step] batch search: {b} {'ok' if ok else err} ({dt:.1f} s)", flush=True)
        free(runner)
        if not ok:
            break
        best = b
        if runner.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(runner.device)
        # iterations grow ~linearly with the batch: stop before a try that would overrun the budget
        if time.perf_counter() - t_start + 2.5 * dt > budget_s:
            break
    if best is None:
        raise SystemExit(f"no batch in {candidates} fits")
    runner.B = best
    return best, trials


# ------------------------------------------------------------------------------------------------------------


def split_cfg(teacher):
    """--cfg-split: the CFG teacher's conditional and unconditional passes as two forwards (the package batches
    them into one), to measure what the batching buys."""
    orig = teacher.forward

    def forward(x_t, sigma, cond=None, mode="x0", x0_grad=True):
        w = teacher.guidance_scale
        if mode == "features" or w == 1.0:
            return orig(x_t, sigma, cond, mode, x0_grad)
        teacher.calls[mode] += 1
        c = cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}
        out = teacher.inner(x_t, sigma, c, mode=mode, x0_grad=x0_grad)
        with torch.set_grad_enabled(x0_grad and torch.is_grad_enabled()):
            x0_u = teacher.inner(x_t, sigma, teacher.uncond(x_t.shape[0]), mode="x0")
        x0_c, feats = (out, None) if mode == "x0" else out
        guided = x0_c + (w - 1.0) * (x0_c - x0_u)
        return guided if mode == "x0" else (guided, feats)
    teacher.forward = forward


def apply_speed_options(task, a):
    if a.cfg_split:
        if not hasattr(task.teacher, "guidance_scale"):
            raise SystemExit("--cfg-split needs a CFG teacher (--config sd15)")
        split_cfg(task.teacher)
    if a.channels_last:
        for m in (task.teacher, task.generator, task.fake_score, task.discriminator):
            m.to(memory_format=torch.channels_last)


def summarize(times, peaks, B, mem_kind) -> dict:
    med = statistics.median(times)
    return {"time_s_median": med, "time_s_min": min(times), "time_s_max": max(times), "time_s_all": times,
            "images_per_s": B / med, "peak_mem_mb": round(max(peaks) / 2 ** 20, 1), "peak_mem_kind": mem_kind}


def set_grad_ckpt(task, on: bool):
    """Gradient checkpointing of the trainable UNets, as the trainer enables it (diffusers' block-level switch)."""
    for net in (task.generator, task.fake_score):
        for m in net.modules():
            if hasattr(m, "enable_gradient_checkpointing") and hasattr(m, "config"):
                m.enable_gradient_checkpointing() if on else m.disable_gradient_checkpointing()


def measure(runner, task, a, divs, result, write, t_start):
    """Counting passes, warm-up and the interleaved timed blocks at batch runner.B; fills result."""
    device, B, k = runner.device, runner.B, result["settings"]["critic_per_gen"]
    # counting passes (eager): FLOPs, network calls, host-device syncs; untimed
    if a.flops:
        result["flops_per_iter"] = {ph: count_flops(runner, ph, divs[0]) for ph in ("generator", "critic")}
    result["calls_per_iter"] = {ph: count_calls(runner, task, ph, divs[0]) for ph in ("generator", "critic")}
    result["host_syncs_per_iter"] = {ph: find_syncs(runner, ph, divs[0]) for ph in ("generator", "critic")}
    free(runner)
    write()
    if a.count_only:
        return
    if a.compile:
        runner.enable_compile()

    # warm-up (compilation, allocator, autotuning), then interleaved timed blocks
    t_w = time.perf_counter()
    for div in divs:
        for _ in range(a.warmup):
            runner.critic(div)
            runner.generator_iter(div)
    sync(device)
    result["warmup_s"] = round(time.perf_counter() - t_w, 2)
    rss_base = rss_mb()
    times = {d: {"generator": [], "critic": []} for d in divs}
    peaks = {d: {"generator": [], "critic": []} for d in divs}
    dcalls = {d: {} for d in divs}
    mem_kind = PeakMemory(device).kind
    t_rep = time.perf_counter()
    for r in range(a.repeats):
        if r and a.deadline_s and (time.perf_counter() - t_start) + (time.perf_counter() - t_rep) / r > a.deadline_s:
            print(f"[step] deadline: stopping after {r} of {a.repeats} repeats", flush=True)
            break
        order = divs if r % 2 == 0 else divs[::-1]  # alternate who goes first
        for div in order:
            for ph in ("generator", "critic"):
                dt, pk, calls = time_block(runner, ph, div, a.iters)
                times[div][ph].append(dt)
                peaks[div][ph].append(pk)
                dcalls[div][ph] = calls
    result["settings"]["repeats_done"] = len(times[divs[0]]["generator"])
    phases = {}
    for div in divs:
        phases[div] = {}
        for ph in ("generator", "critic"):
            s = summarize(times[div][ph], peaks[div][ph], B, mem_kind)
            if device.type == "cpu":
                s["peak_mem_above_base_mb"] = round(s["peak_mem_mb"] - rss_base, 1)
            s["denoiser_calls_per_iter"] = dcalls[div][ph]
            s["calls"] = result["calls_per_iter"][ph]
            phases[div][ph] = s
        g, c = phases[div]["generator"]["time_s_median"], phases[div]["critic"]["time_s_median"]
        # one generator update of the dmd2 scheme = k critic iterations + 1 generator iteration
        phases[div]["generator_step"] = {"time_s": g + k * c, "images_per_s": B / (g + k * c),
                                         "critic_per_gen": k}
    result["phases"] = phases
    result["generator"], result["critic"] = phases[divs[0]]["generator"], phases[divs[0]]["critic"]
    if device.type == "cpu":
        result["rss_base_mb"] = round(rss_base, 1)
    result["ru_maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    result["_times"] = times


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=CONFIGS, default="tiny")
    p.add_argument("--tiny", action="store_true", help="imagenet64/sd15 at toy widths (code paths on a CPU)")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--batch", default=None, help="per-iteration batch; 'auto' = largest that fits (GPU)")
    p.add_argument("--batches", default="32,64,128,256,512,768,1024",
                   help="candidates of --batch auto, ascending")
    p.add_argument("--search-seconds", type=float, default=90.0, help="time budget of --batch auto")
    p.add_argument("--divergence", default="js")
    p.add_argument("--baseline", default="reverse_kl", help="second divergence measured in the same process")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations of each type first")
    p.add_argument("--iters", type=int, default=5, help="iterations per timed block (one sync per block)")
    p.add_argument("--repeats", type=int, default=5, help="timed blocks per type and divergence (median)")
    p.add_argument("--amp", choices=["auto", "no", "bf16"], default="auto", help="auto: bf16 on GPU, no on CPU")
    p.add_argument("--teacher-dtype", choices=["float32", "bfloat16"], default=None,
                   help="frozen teacher weights (default: the config's)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls/convolutions for fp32 work on a GPU")
    p.add_argument("--fused-adamw", dest="fused_adamw", action="store_true", default=None,
                   help="fused AdamW (default: the config's optim.fused, on CUDA only, as the trainer)")
    p.add_argument("--no-fused-adamw", dest="fused_adamw", action="store_false")
    p.add_argument("--foreach", type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile generator and fake score (as trainer)")
    p.add_argument("--grad-ckpt", choices=["config", "on", "off"], default="config",
                   help="gradient checkpointing of generator and fake score (default: the config's)")
    p.add_argument("--cfg-split", action="store_true",
                   help="sd15: CFG teacher's conditional and unconditional halves as two passes instead of one")
    p.add_argument("--item-per-step", action="store_true", help="a loss.item() (host sync) every iteration")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="skip the generator EMA update")
    p.add_argument("--no-flops", dest="flops", action="store_false")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: bf16 datasheet of the GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="skip the timed repeats that would end later than this many seconds after the start "
                        "(at least one runs; the JSON says how many did)")
    p.add_argument("--count-only", action="store_true",
                   help="FLOPs and network calls only (no optimizer steps, no timing): full sizes on a small host")
    p.add_argument("--simulate-oom-above", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--simulate-oom-after-search", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file (default: stdout)")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. objective.r1_gamma=0)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.amp == "auto":
        a.amp = "bf16" if device.type == "cuda" else "no"
    if a.tf32:  # off by default, as in the trainer (under bf16 autocast it barely matters)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(a.seed)
    result: dict = {"benchmark": "step", "config": a.config + ("-tiny" if a.tiny and a.config in (
        "imagenet64", "sd15") else ""), "complete": False, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        if argv is None else " ".join(argv), "load_start": load_note(), **env_info(device)}

    def write():
        result["load_end"] = load_note()
        text = json.dumps(result, indent=1)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out + ".tmp").write_text(text)
            os.replace(a.out + ".tmp", a.out)
        return text

    overrides = list(a.overrides)
    if a.teacher_dtype:
        overrides.append(f"task.teacher_dtype={a.teacher_dtype}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        task, cfg = build_task(a.config, a.tiny, device, Path(tmp), overrides)
    result["build_s"] = round(time.perf_counter() - t0, 2)
    grad_ckpt = cfg.gradient_checkpointing if a.grad_ckpt == "config" else a.grad_ckpt == "on"
    apply_speed_options(task, a)
    # on a CPU nothing runs out of memory (it swaps): the config's batch, unless an OOM is simulated
    auto = a.batch == "auto" and (device.type == "cuda" or a.simulate_oom_above is not None)
    a.batch = int(a.batch) if a.batch not in (None, "auto") else cfg.batch_size
    if a.fused_adamw is None:
        a.fused_adamw = bool(cfg.optim.fused) and device.type == "cuda"
    divs = [a.divergence] + ([a.baseline] if a.baseline and a.baseline != a.divergence else [])
    k = max(1, cfg.schedule.critic_per_gen)
    result["settings"] = {
        "batch": a.batch, "divergences": divs, "amp": a.amp, "teacher_dtype": str(next(backbone(
            task.teacher).parameters()).dtype).replace("torch.", ""), "channels_last": a.channels_last,
        "tf32": a.tf32, "fused_adamw": a.fused_adamw, "foreach": a.foreach, "compile": a.compile,
        "grad_ckpt": grad_ckpt,
        "item_per_step": a.item_per_step, "cfg_split": a.cfg_split, "ema": list(cfg.ema) if a.ema else [],
        "critic_per_gen": k,
        "disc_features": cfg.objective.disc_features, "r1_gamma": cfg.objective.r1_gamma,
        "denoise_loss": cfg.objective.denoise_loss, "guidance_scale": task.info.get("guidance_scale"),
        "feature_shapes": [list(s) for s in task.info.get("feature_shapes", [])],
        "random_teacher": task.info.get("random_teacher", True), "overrides": overrides,
        "warmup": a.warmup, "iters": a.iters, "repeats": a.repeats}
    result["params"] = {n: n_params(m) for n, m in networks(task).items()}
    runner = Runner(task, cfg, divs, device, a)
    runner.grad_ckpt = grad_ckpt
    set_grad_ckpt(task, grad_ckpt)  # before the batch search: it decides what fits
    print(f"[step] {result['config']} on {result['device_name']}: built in {result['build_s']} s, params "
          f"{ {n: round(v / 1e6, 2) for n, v in result['params'].items()} } M", flush=True)

    if auto:
        cands = sorted(int(x) for x in a.batches.split(","))
        a.batch, trials = search_batch(runner, divs[0], cands, a.search_seconds)
        result["batch_search"] = trials
        result["settings"]["batch"] = a.batch
        write()
        if a.simulate_oom_after_search:  # test: the measurement then fails at the searched batch
            a.simulate_oom_above = a.simulate_oom_after_search
    cands = sorted(int(x) for x in a.batches.split(","))
    while True:
        try:
            measure(runner, task, a, divs, result, write, _T0)
            break
        except (RuntimeError, torch.OutOfMemoryError) as e:
            # the search's largest batch can still fail later (fragmentation): retry one candidate lower
            smaller = [c for c in cands if c < runner.B]
            if not (is_oom(e) and smaller):
                raise
        # outside the except block, so that the traceback's frames (and their tensors) are gone
        print(f"[step] out of memory at batch {runner.B} while measuring; retrying at {smaller[-1]}", flush=True)
        result.setdefault("oom_retries", []).append(runner.B)
        free(runner)
        runner.B = a.batch = result["settings"]["batch"] = smaller[-1]
    B = runner.B
    if a.count_only:
        result["complete"] = True
        fl = result.get("flops_per_iter") or {}
        result["summary"] = (f"[step] {result['config']} B={B}: counted only; model FLOPs per iteration "
                             + ", ".join(f"{ph} {v / 1e9:.1f} G ({v / B / 1e9:.1f} G/image)" for ph, v in fl.items()))
        text = write()
        if not a.out:
            print(text)
        print(result["summary"], flush=True)
        return result
    phases = result["phases"]
    times = result.pop("_times")
    if len(divs) == 2:
        d0, d1 = divs
        w = time_weighting(runner, divs)
        g0, g1 = phases[d0]["generator"]["time_s_median"], phases[d1]["generator"]["time_s_median"]
        c0, c1 = phases[d0]["critic"]["time_s_median"], phases[d1]["critic"]["time_s_median"]
        result["overhead"] = {
            "divergence": d0, "baseline": d1,
            "generator_time_ratio": g0 / g1,
            "critic_time_ratio": c0 / c1,  # the critic does not use the divergence: this is the noise floor
            "generator_step_time_ratio": phases[d0]["generator_step"]["time_s"] / phases[d1]["generator_step"][
                "time_s"],
            # paired per repeat: both divergences ran back to back, so the load of the moment cancels
            "generator_time_ratio_paired_median": statistics.median(
                x / y for x, y in zip(times[d0]["generator"], times[d1]["generator"])),
            # the least disturbed block of each: under CPU load the minimum is the steadiest estimate
            "generator_time_ratio_min": min(times[d0]["generator"]) / min(times[d1]["generator"]),
            "weighting_us": w,
            "weighting_fraction_of_generator_iter": (w[d0] - w[d1]) * 1e-6 / g1,
        }

    if a.flops and result.get("flops_per_iter"):
        fl = result["flops_per_iter"]
        peak = a.peak_tflops
        if peak is None and device.type == "cuda":
            peak = next((v for k_, v in PEAK_BF16_TFLOPS.items() if k_ in result["device_name"]), None)
        ach = {ph: fl[ph] / phases[divs[0]][ph]["time_s_median"] / 1e12 for ph in ("generator", "critic")
               if fl.get(ph)}
        result["achieved_tflops"] = ach
        result["peak_tflops"] = peak
        result["mfu"] = {ph: v / peak for ph, v in ach.items()} if peak and a.amp == "bf16" else None
    result["complete"] = True
    ov = result.get("overhead", {})
    mfu = result.get("mfu") or {}
    g, c = result["generator"], result["critic"]
    summary = (f"[step] {result['config']} B={B} {device.type} ({result['device_name']}): "
               f"generator {g['time_s_median'] * 1e3:.1f} ms ({g['images_per_s']:.1f} img/s, "
               f"{g['peak_mem_mb']:.0f} MB), "
               f"critic {c['time_s_median'] * 1e3:.1f} ms ({c['images_per_s']:.1f} img/s, {c['peak_mem_mb']:.0f} MB)"
               + (f"; {ov['divergence']}/{ov['baseline']} generator time x{ov['generator_time_ratio']:.3f} "
                  f"(paired x{ov['generator_time_ratio_paired_median']:.3f}, min x{ov['generator_time_ratio_min']:.3f},"
                  f" critic x{ov['critic_time_ratio']:.3f})"
                  if ov else "")
               + (f"; MFU gen {mfu['generator']:.1%} critic {mfu['critic']:.1%}" if mfu else "")
               + f"; load {result['load_start']['loadavg'][0]}/{result['load_start']['cpu_count']} cores")
    result["summary"] = summary
    text = write()
    if not a.out:
        print(text)
    print(summary, flush=True)
    return result


if __name__ == "__main__":
    main()
