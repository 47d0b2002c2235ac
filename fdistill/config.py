"""Typed configs: dataclasses filled from YAML plus ``key=value`` overrides (dotted keys for nested fields).

Unknown keys and values of the wrong type are errors that name the key (and suggest the closest valid one).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .objective import ObjectiveConfig
from .ratio import RatioConfig
from .recipes import apply_recipe


class ConfigError(ValueError):
    pass


@dataclass
class OptimConfig:
    lr_gen: float = 1e-4
    """Generator learning rate (AdamW; paper: 1e-4 CIFAR-10, 2e-6 ImageNet-64, 1e-5 SD1.5)."""
    lr_critic: float | None = None
    """Fake score + discriminator learning rate; None = lr_gen (as in the paper)."""
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    grad_clip: float = 10.0
    """Gradient-norm clipping (DMD2, FastGen: 10). 0 disables."""
    clip_critic: bool = True
    """Clip the fake score's and the discriminator's gradients too (DMD2), not only the generator's (FastGen)."""
    fused: bool = False
    """torch's fused AdamW kernel (GPU)."""
    grad_accum: int = 1
    """Gradient accumulation: every critic and generator update averages the gradients of this many micro-batches
    of ``batch_size`` per process before its optimizer step (processes synchronise only on the last one). The
    total batch is processes x batch_size x grad_accum: the paper's 1024 for SD1.5 is e.g. 8 GPUs x 32 x 4.
    The ratio normaliser works per micro-batch: the stage-1 bin means (and their EMA, which advances once per
    micro-batch) and the stage-2 batch mean of h are those of each micro-batch (over all processes), so with
    either normalisation on, accumulation is not bit-for-bit a larger batch."""


@dataclass
class ScheduleConfig:
    critic_per_gen: int = 5
    """Critic updates per generator update (paper: 5 CIFAR-10 / ImageNet-64, 10 SD1.5)."""
    scheme: str = "dmd2"
    """'dmd2': update the critic every iteration and the generator every k-th as well;
    'fastgen': k-1 critic-only iterations, then one generator-only iteration."""
    ema_every: str = "generator"
    """When the generator EMAs advance: 'generator' (after each generator update) or 'iteration' (after every
    iteration, critic-only ones too, as FastGen's EMA callback: 0.9999 per iteration is ~0.9995 per generator
    update at 4 critic iterations per generator one)."""
    critic_warmup: int = 0
    """Critic-only iterations before the first generator update (a fake score trained from scratch, as in the
    2-D toy, otherwise feeds the generator noise at first; image teachers start the fake score at the teacher)."""


@dataclass
class NoiseConfig:
    grid: str = "edm"
    """'edm' (Karras grid of `num_levels`), 'continuous' (log-uniform), or 'vp' (the teacher's DDPM grid)."""
    num_levels: int = 1000
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    dm_index_min: int = 20
    """Distribution-matching noise-level index range, both ends included (DMD2: [20, 980]; FastGen: [2, 998] on
    EDM's grid, [1, 998] on SD's, the integer part of 1000 t for t ~ U[0.001, 0.999])."""
    dm_index_max: int = 980
    generator_sigma: float | None = None
    """Where the generator starts; None = the grid's largest sigma."""


@dataclass
class LogConfig:
    every: int = 10
    """Write metrics to metrics.jsonl every this many generator steps (values are fetched from the device
    only then, so the loop has no host-device sync in between)."""
    sample_every: int = 0
    """Write a sample grid every this many generator steps (0: only at the end)."""
    ckpt_every: int = 100
    """Checkpoint every this many generator steps (and at the end)."""
    keep_ckpts: int = 2
    """Checkpoints kept on disk (oldest removed first)."""
    progress: bool = True


@dataclass
class DistillConfig:
    recipe: str = "dmd2"
    """'fastgen' (the authors' code, NVlabs/FastGen) or 'dmd2' (DMD2's): fills every recipe row the config leaves
    out (fdistill/recipes.py; docs/recipes.md). Explicit keys win."""
    pipeline: str = "toy2d"
    """Which task assembles teacher, data and conditioning: toy2d, mnist, imagenet64, coco_t2i, image."""
    out: str = "runs/default"
    """Run directory (resumed when it holds a checkpoint)."""
    divergence: str = "js"
    """f-divergence by registry name: reverse_kl, forward_kl, js, jeffreys, squared_hellinger, softened_rkl,
    pearson, neyman, alpha:<a>; also NVlabs/FastGen's keys with FastGen's meanings: rkl, kl (= forward KL), js, sf,
    neyman, sh, jf."""
    seed: int = 0
    steps: int = 1000
    """Generator updates."""
    batch_size: int = 64
    """Per-process batch of the generator and the critic (total = batch_size x processes)."""
    teacher: str | None = None
    """Teacher: a local path or a hub id (task dependent)."""
    data: str | None = None
    """Real data for the GAN term (task dependent)."""
    prompts: str | None = None
    """Text-to-image prompts (a COCO captions JSON or a text file with one prompt per line)."""
    ratio: str = "learned"
    """Where the weights' r comes from: 'learned' (discriminator) or 'oracle' (toy2d only: exact)."""
    mixed_precision: str = "auto"
    """'auto' (bf16 on GPU, none on CPU), 'no', 'bf16'. fp16 diverges (paper) and is refused."""
    allow_tf32: bool = False
    """TF32 matmuls and convolutions on GPU (FastGen's ImageNet-64 runs fp32 with TF32)."""
    gen_cond: str = "random"
    """Conditioning of the generated batches: 'random' (labels / prompts drawn on their own, DMD2) or 'real' (the
    labels / captions of a real batch drawn for the same iteration, FastGen)."""
    gradient_checkpointing: bool = False
    compile: bool = False
    """torch.compile the trainable networks."""
    ema: list = field(default_factory=lambda: [0.999])
    """Generator EMA decays (several allowed; [] for none)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    ratio_norm: RatioConfig = field(default_factory=RatioConfig)
    log: LogConfig = field(default_factory=LogConfig)
    task: dict = field(default_factory=dict)
    """Task-specific settings; each pipeline checks its own keys."""


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, coerced value) for a value against a type annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is Any:
        return True, value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):  # yaml reads 1e-4 as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is int:
        return (isinstance(value, int) and not isinstance(value, bool)), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    if tp in (list, tuple) or origin in (list, tuple):
        if isinstance(value, str):  # key=a,b on the command line
            value = [yaml.safe_load(v.strip()) for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return True, list(value)
        return False, value
    if tp is dict or origin is dict:
        return isinstance(value, dict), value
    return True, value


def unknown_key(key: str, valid, prefix: str = "", owner: str = "") -> ConfigError:
    """The error for a key that is not a field: names it, suggests the closest valid one, lists them all."""
    close = difflib.get_close_matches(str(key), list(valid), n=1)
    hint = f". Did you mean '{prefix}{close[0]}'?" if close else ""
    where = f" for {owner}" if owner else ""
    return ConfigError(f"unknown config key '{prefix}{key}'{where}{hint} Valid keys here: {', '.join(sorted(valid))}")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a dict, strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '<root>'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise unknown_key(key, fields, prefix, cls.__name__)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value or {}, f"{prefix}{key}.")
            continue
        ok, v = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"config key {prefix}{key} must be {getattr(tp, '__name__', tp)}, got {value!r}")
        kwargs[key] = v
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (dotted keys for nested fields)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        d = data
        for k in keys[:-1]:
            if not isinstance(d.get(k, {}), dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            d = d.setdefault(k, {})
        d[keys[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found; configs that ship with fdistill are in configs/ "
                          "(e.g. configs/toy2d.yaml, configs/mnist.yaml)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None, overrides: list[str] = (), cls=DistillConfig):
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    if cls is DistillConfig:
        try:
            data = apply_recipe(data)
        except ValueError as e:  # recipes.py sits below this module and raises plain ValueErrors
            raise ConfigError(str(e)) from None
    return from_dict(cls, data)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
