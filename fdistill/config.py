"""Typed configs: dataclasses filled from YAML plus ``key=value`` overrides (dotted keys for nested fields).

Unknown keys and values of the wrong type are errors that name the key (and suggest the closest valid one).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .divergences import get_divergence
from .errors import FdistillError
from .objective import ObjectiveConfig
from .ratio import RatioConfig
from .recipes import apply_recipe
from .student import StudentConfig
from .tracking import check_trackers


class ConfigError(FdistillError, ValueError):
    """A config that cannot run: the message names the key and what it accepts."""


@dataclass
class OptimConfig:
    lr_gen: float = 1e-4
    """Generator learning rate (AdamW; paper: 1e-4 CIFAR-10, 2e-6 ImageNet-64, 1e-5 SD1.5)."""
    lr_critic: float | None = None
    """Fake score + discriminator learning rate; None = lr_gen (as in the paper)."""
    lr_disc: float | None = None
    """Discriminator head learning rate; None = lr_critic. A head trained from scratch for a few hundred steps
    (the CPU demo) needs a larger one than the fake score, which starts at the teacher."""
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    grad_clip: float = 10.0
    """Gradient-norm clipping (DMD2, FastGen: 10). 0 disables."""
    lr_decay: str = "constant"
    """Learning-rate schedule over the generator steps, for every optimizer alike: 'constant' (the paper, DMD2,
    FastGen), 'linear' or 'cosine' from ``lr_decay_start`` x steps to ``lr_final`` x the base rate at ``steps``.
    A short run (the CPU demo) ends on a noisy iterate at a constant rate; a decay lets it settle."""
    lr_decay_start: float = 0.0
    """Fraction of ``steps`` at which the decay begins."""
    lr_final: float = 0.0
    """The last rate as a fraction of each optimizer's base rate."""
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
    nonfinite_streak: int = 10
    """An update whose loss or gradient is not finite is skipped (and counted in metrics.jsonl as
    ``skipped_updates``); this many in a row abort the run, naming the step: the weights would only diverge."""


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
    disc_index_max: int | None = None
    """Upper index of the discriminator's noise levels (real and generated) and of the samples the generator's GAN
    term acts on; null = dm_index_max (the paper: the DM term's levels). Above it the density ratio is taken as 1
    (h = h(1), DMD2's weight), where the discriminator has not been trained. For small images, whose top DM levels
    are near pure noise (docs/discriminator.md)."""
    disc_levels: str = "dm"
    """How the discriminator's levels spread over its range: 'dm' as the DM term's (uniform in grid index, the
    paper), 'log_sigma' uniform in log sigma (snapped to the grid), which moves draws from the near-pure-noise top of
    EDM's grid to the low levels where real and generated samples differ. Real and generated share it, so the head
    still estimates log p_t / q_t at every level (docs/discriminator.md)."""
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
    trackers: list = field(default_factory=list)
    """Experiment trackers through accelerate (``[tensorboard]``, ``[wandb]``, ``[trackio]`` ...): the scalars of
    metrics.jsonl, the sample grids and the final metrics; a resumed run continues the same tracker run. None by
    default (nothing to install)."""
    chance_warn_rows: int = 5
    """Warn (log line and progress bar) when the discriminator's accuracy has stayed within ``chance_margin`` of
    0.5 for this many consecutive logged rows: its ratio is then ~1, the f-weights ~1 and the GAN term carries
    nothing, i.e. the run is DMD2 with noise-level weights. 0 disables."""
    chance_margin: float = 0.05


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
    student: StudentConfig = field(default_factory=StudentConfig)
    """Few-step students (``student.steps: 2`` or ``4``; fdistill/student.py, docs/few_step.md)."""
    log: LogConfig = field(default_factory=LogConfig)
    task: dict = field(default_factory=dict)
    """Task-specific settings; each pipeline checks its own keys."""

    def validate(self) -> None:
        """Refuse settings that cannot run or mean nothing, naming the key: called by ``load_config``, so that
        every check has passed before a run directory is touched."""
        _validate_distill(self)


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
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        value = raw  # 'alpha:' or 'alpha: x' reads as a mapping in YAML; on a command line it is the text typed
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
        data = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if data is None:  # training the built-in defaults is never what an empty file meant
        raise ConfigError(f"config file {str(p)!r} is empty; start from one in configs/ (e.g. configs/toy2d.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None, overrides: list[str] = (), cls=DistillConfig):
    """``cls`` from a YAML file updated with ``key=value`` overrides, then ``cfg.validate()`` if it has one."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    if cls is DistillConfig:
        try:
            data = apply_recipe(data)
        except ValueError as e:  # recipes.py sits below this module and raises plain ValueErrors
            raise ConfigError(str(e)) from None
    cfg = from_dict(cls, data)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def _need(ok: bool, key: str, value: Any, what: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key} must be {what}, got {value!r}")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _validate_distill(cfg: DistillConfig) -> None:
    """The checks of ``DistillConfig.validate``: ranges and names of the generic keys (a task checks its own
    ``task.*`` keys when it is built, also before anything is written)."""
    _need(cfg.steps >= 1, "steps", cfg.steps, "a number of generator updates >= 1")
    _need(cfg.batch_size >= 1, "batch_size", cfg.batch_size, ">= 1")
    try:
        get_divergence(cfg.divergence)
    except ValueError as e:
        raise ConfigError(f"config key divergence: {e}") from None
    _need(cfg.ratio in ("learned", "oracle"), "ratio", cfg.ratio, "'learned' or 'oracle'")
    if cfg.mixed_precision == "fp16":
        raise ConfigError("config key mixed_precision=fp16 diverges for this objective (paper); use bf16 or no")
    _need(cfg.mixed_precision in ("auto", "no", "bf16"), "mixed_precision", cfg.mixed_precision,
          "auto, no or bf16")
    _need(all(_finite(d) and 0 <= d < 1 for d in cfg.ema), "ema", cfg.ema,
          "a list of EMA decays in [0, 1), e.g. [0.999] ([] for none)")
    _need(len(set(cfg.ema)) == len(cfg.ema), "ema", cfg.ema, "a list of distinct decays")
    o = cfg.optim
    _need(_finite(o.lr_gen) and o.lr_gen > 0, "optim.lr_gen", o.lr_gen, "a learning rate > 0")
    _need(o.lr_critic is None or (_finite(o.lr_critic) and o.lr_critic > 0), "optim.lr_critic", o.lr_critic,
          "a learning rate > 0 (or null: optim.lr_gen)")
    _need(o.lr_disc is None or (_finite(o.lr_disc) and o.lr_disc > 0), "optim.lr_disc", o.lr_disc,
          "a learning rate > 0 (or null: the critic's)")
    _need(len(o.betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in o.betas), "optim.betas", o.betas,
          "two AdamW decays in [0, 1), e.g. [0.9, 0.999]")
    _need(_finite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, ">= 0")
    _need(_finite(o.grad_clip) and o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, ">= 0 (0: no clipping)")
    _need(o.lr_decay in ("constant", "linear", "cosine"), "optim.lr_decay", o.lr_decay,
          "'constant', 'linear' or 'cosine'")
    _need(_finite(o.lr_decay_start) and 0 <= o.lr_decay_start < 1, "optim.lr_decay_start", o.lr_decay_start,
          "in [0, 1)")
    _need(_finite(o.lr_final) and 0 <= o.lr_final <= 1, "optim.lr_final", o.lr_final, "in [0, 1]")
    _need(o.grad_accum >= 1, "optim.grad_accum", o.grad_accum, ">= 1")
    _need(o.nonfinite_streak >= 1, "optim.nonfinite_streak", o.nonfinite_streak, ">= 1")
    s = cfg.schedule
    _need(s.critic_per_gen >= 1, "schedule.critic_per_gen", s.critic_per_gen, ">= 1")
    _need(s.scheme in ("dmd2", "fastgen"), "schedule.scheme", s.scheme, "dmd2 or fastgen")
    _need(s.critic_warmup >= 0, "schedule.critic_warmup", s.critic_warmup, ">= 0")
    _need(s.ema_every in ("generator", "iteration"), "schedule.ema_every", s.ema_every, "generator or iteration")
    _need(cfg.gen_cond in ("random", "real"), "gen_cond", cfg.gen_cond, "random or real")
    ob = cfg.objective  # also refused by the objective itself, but only once the run directory is written
    _need(ob.disc_features in ("teacher", "fake"), "objective.disc_features", ob.disc_features, "teacher or fake")
    _need(ob.denoise_loss in ("edm", "eps", "x0"), "objective.denoise_loss", ob.denoise_loss, "edm, eps or x0")
    _need(ob.denoise_levels in ("grid", "dm"), "objective.denoise_levels", ob.denoise_levels, "grid or dm")
    _need(ob.disc_fake_noise in ("independent", "denoise"), "objective.disc_fake_noise", ob.disc_fake_noise,
          "independent or denoise")
    _need(cfg.ratio_norm.bin_spacing in ("log_sigma", "linear"), "ratio_norm.bin_spacing",
          cfg.ratio_norm.bin_spacing, "log_sigma or linear")
    n = cfg.noise
    _need(n.grid in ("edm", "continuous", "vp", "flow"), "noise.grid", n.grid, "edm, continuous, vp or flow (flow-matching teachers)")
    _need(n.num_levels >= 2, "noise.num_levels", n.num_levels, ">= 2")
    _need(_finite(n.sigma_min) and n.sigma_min > 0, "noise.sigma_min", n.sigma_min, "> 0")
    _need(_finite(n.sigma_max) and n.sigma_max > n.sigma_min, "noise.sigma_max", n.sigma_max,
          f"> noise.sigma_min ({n.sigma_min})")
    _need(0 <= n.dm_index_min <= n.dm_index_max < n.num_levels, "noise.dm_index_min/dm_index_max",
          [n.dm_index_min, n.dm_index_max], f"0 <= min <= max < noise.num_levels ({n.num_levels})")
    _need(n.disc_index_max is None or n.dm_index_min <= n.disc_index_max <= n.dm_index_max, "noise.disc_index_max",
          n.disc_index_max, f"null or within [noise.dm_index_min, noise.dm_index_max] = [{n.dm_index_min}, "
          f"{n.dm_index_max}]")
    _need(n.disc_index_max is None or n.grid != "continuous", "noise.disc_index_max", n.disc_index_max,
          "null with noise.grid=continuous (it is an index of a grid)")
    _need(n.disc_levels in ("dm", "log_sigma"), "noise.disc_levels", n.disc_levels, "dm or log_sigma")
    _need(n.disc_levels == "dm" or n.grid != "continuous", "noise.disc_levels", n.disc_levels,
          "dm with noise.grid=continuous (its levels are already log-uniform)")
    _need(n.disc_levels == "dm" or cfg.objective.disc_fake_noise == "independent", "noise.disc_levels",
          n.disc_levels, "dm with objective.disc_fake_noise=denoise (recipe fastgen's: the discriminator then shares "
          "the fake-score batch's levels): set noise.disc_levels=dm, or objective.disc_fake_noise=independent")
    _need(n.disc_index_max is None or cfg.objective.disc_fake_noise == "independent", "noise.disc_index_max",
          n.disc_index_max, "null with objective.disc_fake_noise=denoise (the discriminator then shares the fake-score "
          "batch's levels); or set objective.disc_fake_noise=independent")
    st = cfg.student
    _need(st.steps >= 1, "student.steps", st.steps, "a number of network evaluations >= 1 (1, 2, 4)")
    _need(cfg.batch_size >= st.steps, "batch_size", cfg.batch_size,
          f">= student.steps ({st.steps}): backward simulation places every stage in each batch")
    _need(st.sigmas is None or st.timesteps is None, "student.sigmas / student.timesteps",
          [st.sigmas, st.timesteps], "one of the two (the other null)")
    for key, levels in (("student.sigmas", st.sigmas), ("student.timesteps", st.timesteps)):
        _need(levels is None or len(levels) == st.steps, key, levels,
              f"a list of student.steps = {st.steps} levels, descending (or null: the teacher family's default)")
    lg = cfg.log
    _need(lg.every >= 1, "log.every", lg.every, ">= 1")
    _need(lg.ckpt_every >= 1, "log.ckpt_every", lg.ckpt_every, ">= 1 (checkpoints are also written at the end)")
    _need(lg.sample_every >= 0, "log.sample_every", lg.sample_every, ">= 0 (0: only at the end)")
    _need(lg.keep_ckpts >= 1, "log.keep_ckpts", lg.keep_ckpts, ">= 1")
    _need(bool(str(cfg.out).strip()), "out", cfg.out, "a run directory")
    problem = check_trackers(lg.trackers)
    if problem:
        raise ConfigError(f"config key log.trackers: {problem}")


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
