"""The training loop: one readable function on accelerate, the same for every task.

    fdistill distill CONFIG [key=value ...]                       one process
    accelerate launch train/distill.py CONFIG [key=value ...]     several processes / machines (DDP, or FSDP
                                                                  with accelerate's FSDP plugin, version 1 or 2)

Each iteration updates the critic (fake score + discriminator head) and, every ``critic_per_gen``-th, the
generator (DMD2's scheme), or alternates k-1 critic iterations with one generator iteration (FastGen's);
each update may accumulate ``optim.grad_accum`` micro-batches.
The run directory holds config.yaml, metrics.jsonl, sample grids, checkpoints and, at the end, metrics.json;
rerunning the same command resumes from the newest checkpoint exactly. Under FSDP gradient norms are global,
EMAs are full copies, and checkpoints hold full tensors gathered on the main process: the same files a single
process writes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from . import checkpoint as ckpt
from . import tracking
from .config import ConfigError, DistillConfig, dump_yaml, to_dict
from .divergences import get_divergence
from .errors import RunInterrupted, TrainingDiverged
from .generator import unwrap
from .objective import PER_BIN_DEN, PER_BIN_NUM, FDistill
from .ratio import RatioNormalizer

# Tests set this to SIGKILL the process after a given generator step, to check exact resumption.
_KILL_AT_STEP = int(os.environ.get("FDISTILL_TEST_KILL_AT_STEP", "-1"))
# Keys of the config that may change between a run and its resumption.
_RESUMABLE_CHANGES = {"steps", "log", "out"}


def _mixed_precision(cfg: DistillConfig) -> str:
    mp = cfg.mixed_precision
    if mp == "fp16":
        raise ValueError("mixed_precision=fp16 diverges for this objective (paper); use bf16 or no")
    if mp == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    if mp not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be auto, no or bf16, got {mp!r}")
    return mp


def _check_recipe_keys(cfg: DistillConfig) -> None:
    """The recipe rows' values the trainer reads itself (the others are checked where they are used)."""
    if cfg.schedule.ema_every not in ("generator", "iteration"):
        raise ValueError(f"schedule.ema_every must be 'generator' or 'iteration', got {cfg.schedule.ema_every!r}")
    if cfg.gen_cond not in ("random", "real"):
        raise ValueError(f"gen_cond must be 'random' or 'real', got {cfg.gen_cond!r}")


def _with_defaults(saved: dict, defaults: dict) -> dict:
    """A saved config with the fields added since it was written at their defaults (which leave the run as it
    was), so that a new field does not make every older run directory unresumable."""
    out = dict(saved)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and v and isinstance(out[k], dict):
            out[k] = _with_defaults(out[k], v)
    return out


def _check_resume_config(run_dir: Path, cfg: DistillConfig):
    """Refuse to resume a run with a different config, or with ``steps`` below the step it has reached. A run
    directory without a checkpoint holds no run to protect (e.g. a start that failed): its config is replaced."""
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise ConfigError(f"out={run_dir} is a file, not a run directory; choose another out=DIR")
    saved = run_dir / "config.json"
    if not saved.is_file() or ckpt.latest_checkpoint(run_dir) is None:
        return
    old = _with_defaults(json.loads(saved.read_text()), json.loads(json.dumps(to_dict(DistillConfig()))))
    new = json.loads(json.dumps(to_dict(cfg)))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in _RESUMABLE_CHANGES)
    if diff:
        raise ConfigError(f"{run_dir} holds a run with a different config (keys {diff}); resume it with the same "
                          "settings, or choose another out=DIR")
    try:
        reached = json.loads((ckpt.latest_checkpoint(run_dir) / "meta.json").read_text())["gen_step"]
    except (OSError, ValueError, KeyError):
        return  # a damaged checkpoint: resuming reports it
    if cfg.steps < reached:
        raise ConfigError(f"steps={cfg.steps} is below the step {run_dir} has reached ({reached}); a run cannot "
                          f"go back: set steps >= {reached}, or choose another out=DIR")


class NonFiniteGuard:
    """Decides whether an update may step: its gradient norm (global over processes, hence the same decision
    everywhere) must be finite, which a non-finite loss also breaks. A skipped update is counted in
    ``state['skipped_updates']``; ``streak`` skips in a row raise TrainingDiverged naming the step. One
    host-device sync per update (as a gradient scaler's)."""

    def __init__(self, cfg: DistillConfig, state: dict):
        self.cfg, self.state, self.runs = cfg, state, {}

    def ok(self, what: str, *norms: torch.Tensor) -> bool:
        """``what``: which update ('a critic update', 'a generator update'); streaks are counted per kind, as
        a diverged critic can sit beside a generator whose gradients vanish."""
        if bool(torch.isfinite(torch.stack([n.detach().float().reshape(()) for n in norms])).all()):
            self.runs[what] = 0
            return True
        self.state["skipped_updates"] = self.state.get("skipped_updates", 0) + 1
        self.runs[what] = self.run = self.runs.get(what, 0) + 1
        if self.run >= self.cfg.optim.nonfinite_streak:
            o = self.cfg.optim
            raise TrainingDiverged(
                f"training diverged at generator step {self.state['gen_step']} (iteration {self.state['iteration']}):"
                f" {self.run} updates in a row ({what} the last) had a non-finite loss or gradient and were skipped."
                f" Likely cause: learning rates too high (optim.lr_gen={o.lr_gen:g}, optim.lr_critic="
                f"{o.lr_critic if o.lr_critic is not None else o.lr_gen:g}) or no gradient clipping (optim.grad_clip="
                f"{o.grad_clip:g}). The checkpoints on disk are finite; lower them and start a new run (out=...)")
        return False


def _is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2) as the ordinary tensor it stands for."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _grad_norm(accelerator, net, clip: float) -> torch.Tensor:
    """Clip the prepared ``net``'s gradients to norm ``clip`` (0: no clipping); returns the norm of the whole
    gradient before clipping, also under FSDP, where each process holds shards."""
    max_norm = clip if clip and clip > 0 else float("inf")
    if not _is_fsdp(accelerator):
        norm = accelerator.clip_grad_norm_(net.parameters(), max_norm)
    # Under FSDP, what accelerator.clip_grad_norm_ calls, without its search for the model: it compares
    # parameter lists with ==, which raises for two models of one architecture (generator and fake score).
    elif accelerator.is_fsdp2:
        norm = torch.nn.utils.clip_grad_norm_(list(net.parameters()), max_norm)  # DTensor grads: global norm
    else:
        norm = net.clip_grad_norm_(max_norm)  # FSDP1's own: reduced over the shards
    return _plain(norm)


def _full_state_dict(net) -> dict:
    """A prepared network's full state dict, gathered on every process, on its device (FSDP1 and FSDP2 alike).
    Collective under FSDP: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True))


class _FullParams:
    """What ``AveragedModel.update_parameters`` reads from a model (parameters(), buffers(), in ``like``'s order),
    taken from a full state dict: the EMA of a sharded generator is updated from its gathered parameters."""

    def __init__(self, like: torch.nn.Module, state: dict):
        self.like, self.state = like, state

    def parameters(self):
        return (self.state[n] for n, _ in self.like.named_parameters())

    def buffers(self):  # non-persistent buffers are not in a state dict: constants, left as they are
        return (self.state.get(n, b) for n, b in self.like.named_buffers())


def _reshard_setting(unit):
    """An FSDP2 unit's reshard-after-forward setting, as torch holds it. It differs between units: accelerate
    wraps the root with None, which torch resolves to no resharding at the first forward (the parameters would
    be gathered again at once for the backward), the inner units with the plugin's value. The public
    ``set_reshard_after_forward`` takes a bool and cannot say None, hence torch's private fields."""
    state = unit._get_fsdp_state()
    return state._auto_reshard_after_forward, [g.post_forward_mesh_info for g in state._fsdp_param_groups]


def _set_reshard_setting(unit, setting):
    state = unit._get_fsdp_state()
    state._auto_reshard_after_forward, meshes = setting
    for group, mesh in zip(state._fsdp_param_groups, meshes, strict=True):
        group.post_forward_mesh_info = mesh


@contextlib.contextmanager
def _full_params(accelerator, nets):
    """Inside, every prepared network holds its whole parameters on every process, so that the main process can
    run one alone (evaluation) while the others wait; outside FSDP it does nothing. Every process enters it.
    Costs one full copy of each network per process while it lasts. On leaving, FSDP2's units reshard after
    forward exactly as they did before."""
    if not _is_fsdp(accelerator):
        yield
        return
    if accelerator.is_fsdp2:
        from torch.distributed.fsdp import FSDPModule

        units = [m for net in nets for m in net.modules() if isinstance(m, FSDPModule)]
        saved = [_reshard_setting(u) for u in units]
        for u in units:  # gather now and keep: forwards on one process must not all-gather again
            u.unshard()
            u.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for u, setting in zip(units, saved):
                u.reshard()
                _set_reshard_setting(u, setting)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # the unwrapped modules then hold the full parameters; the FSDP wrappers must not be called inside
        with contextlib.ExitStack() as stack:
            for net in nets:
                stack.enter_context(FSDP.summon_full_params(net, writeback=False))
            yield


def _prepare(accelerator, net, opt):
    """accelerator.prepare(net, opt). FSDP2 looks the transformer-wrap classes up in each model and refuses a
    model that lacks one; the networks differ (the discriminator head has no UNet blocks), so each is wrapped
    at those of the classes it has (none: one unit)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None) if _is_fsdp(accelerator) else None
    classes = getattr(plugin, "transformer_cls_names_to_wrap", None) if accelerator.is_fsdp2 else None
    if not classes:
        return accelerator.prepare(net, opt)
    present = {type(m).__name__ for m in net.modules()}
    plugin.transformer_cls_names_to_wrap = [c for c in classes if c in present]
    try:
        return accelerator.prepare(net, opt)
    finally:
        plugin.transformer_cls_names_to_wrap = classes


def accumulate_gradients(accelerator, nets, n_micro: int, micro_loss) -> None:
    """Backpropagate ``micro_loss()`` (draws a micro-batch, returns its loss) ``n_micro`` times, each loss
    scaled by 1/n_micro, so the gradients are those of the mean over all micro-batches. The networks
    that get gradients (``nets``, prepared) synchronise across processes only in the last backward: DDP's
    and FSDP1's no_sync, FSDP2's set_requires_gradient_sync, through ``accelerator.no_sync``. (Not
    ``accelerator.accumulate``: it counts one global step, and here the critic's and the generator's
    optimizers step on their own cadences.)"""
    for i in range(n_micro):
        with contextlib.ExitStack() as stack:
            if i < n_micro - 1:
                for net in nets:
                    stack.enter_context(accelerator.no_sync(net))
            loss = micro_loss()
            accelerator.backward(loss / n_micro if n_micro > 1 else loss)


def _check_fsdp(accelerator, cfg: DistillConfig, task) -> None:
    """Refuse up front what would fail or hang later under FSDP (README, FSDP section: limits)."""
    if not _is_fsdp(accelerator):
        return
    if cfg.compile:
        raise ValueError("compile=true is not supported under FSDP (it would wrap the compiled module); let "
                         "accelerate compile instead (accelerate launch --dynamo_backend inductor)")
    if accelerator.is_fsdp2:
        return
    # FSDP1 replaces a network's parameters by flat shards: only its wrapper's forward can run it.
    if cfg.ratio == "oracle":
        raise ValueError("ratio=oracle calls the generator outside its FSDP1 wrapper (the oracle's density "
                         "estimate of its samples), where FSDP1 leaves only flat shards of its parameters; run it "
                         "under FSDP2 (accelerate launch --fsdp_version 2) or DDP")
    if task.evaluate_uses_networks and accelerator.state.fsdp_plugin.auto_wrap_policy is not None:
        raise ValueError(f"pipeline {cfg.pipeline} evaluates through its own references to the networks, and "
                         "FSDP1 with an auto-wrap policy makes nested units, which cannot run on one process: the "
                         "evaluation would hang. Use FSDP2 (accelerate launch --fsdp_version 2), or FSDP1 without "
                         "an auto-wrap policy (--fsdp_auto_wrap_policy NO_WRAP)")


class OptimPart(NamedTuple):
    """One trainable network with its optimizer. A checkpoint's optimizer state is one or several of these."""
    net: torch.nn.Module  # prepared (wrapped, under FSDP sharded)
    opt: torch.optim.Optimizer  # accelerate's wrapper of it
    names: list[str]  # parameter names in the optimizer's order, taken before any wrapper renamed them


def gather_optimizer_states(accelerator, parts: dict[str, list[OptimPart]]) -> dict | None:
    """Checkpoint name -> full optimizer state dict, keyed by parameter index as a plain optimizer's, on the main
    process (None elsewhere). Under FSDP each process holds shards of the states: they are gathered by parameter
    name (collective: every process calls this) and re-keyed by index, so the files are those a single process
    writes."""
    if not _is_fsdp(accelerator):
        return {key: ckpt.merge_optim_states([p.opt.state_dict() for p in ps]) for key, ps in parts.items()} \
            if accelerator.is_main_process else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # On GPUs gathered to the main process's CPU memory alone. On a CPU device FSDP1 relies on .cpu() to copy
    # each state out of one reused gather buffer (a no-op there, so exp_avg came back equal to exp_avg_sq):
    # there every process gathers, which clones.
    options = StateDictOptions(full_state_dict=True, cpu_offload=accelerator.device.type != "cpu")
    out = {}
    for key, ps in parts.items():
        sds = [get_optimizer_state_dict(p.net, p.opt.optimizer, options=options) for p in ps]
        if accelerator.is_main_process:
            out[key] = ckpt.merge_optim_states([ckpt.optim_state_by_index(sd, p.names) for sd, p in zip(sds, ps)])
    return out if accelerator.is_main_process else None


def load_optimizer_states(accelerator, parts: dict[str, list[OptimPart]], folder: Path) -> None:
    """Resume the optimizers from the checkpoint ``folder``. Under FSDP the main process alone reads the full
    states and broadcasts them, and every process keeps its shard: one full copy in host memory rather than one
    per process (an SD1.5 UNet's AdamW state is ~7 GB). Collective under FSDP."""
    if not _is_fsdp(accelerator):
        for key, ps in parts.items():
            sds = ckpt.split_optim_state(ckpt.read_optimizer(folder, key), [len(p.names) for p in ps])
            for p, sd in zip(ps, sds):
                p.opt.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    for key, ps in parts.items():
        sds = ckpt.split_optim_state(ckpt.read_optimizer(folder, key), [len(p.names) for p in ps]) \
            if accelerator.is_main_process else [None] * len(ps)
        for p, sd in zip(ps, sds):  # the other processes pass an empty state and receive theirs
            full = ckpt.optim_state_by_name(sd, p.names) if sd is not None else {}
            set_optimizer_state_dict(p.net, p.opt.optimizer, full, options=options)


def gather_weights(accelerator, nets: dict) -> dict:
    """Name -> what a checkpoint saves of each prepared network: under FSDP its full state dict, gathered on the
    main process (collective); otherwise the live module."""
    if not _is_fsdp(accelerator):
        return {name: unwrap(net) for name, net in nets.items()}
    return {name: accelerator.get_state_dict(net) for name, net in nets.items()}


def update_emas(accelerator, emas: dict, generator) -> None:
    """One step of every EMA from the prepared ``generator``. The EMAs are full copies on every process; under
    FSDP they are updated from the gathered generator (one all-gather, a transient full copy per process)."""
    if not emas:
        return
    src = unwrap(generator)
    if _is_fsdp(accelerator):
        src = _FullParams(next(iter(emas.values())).module, _full_state_dict(generator))
    for ema in emas.values():
        ema.update_parameters(src)


class Evaluator:
    """The task's evaluation, run by the main process while the others wait; every process calls it.

    Under FSDP a sharded generator cannot run on one process alone, so the current generator is evaluated as a
    plain copy, kept in the main process's CPU memory and loaded with the gathered weights each time. Only a task
    whose evaluation calls its own references to the networks (``Task.evaluate_uses_networks``: the 2-D toy) has
    them hold their full parameters on every process meanwhile; for SD1.5 that would be ~7 GB per GPU."""

    def __init__(self, accelerator, task, generator: torch.nn.Module, run_dir: Path):
        """``generator``: the plain one, before accelerate wraps it."""
        self.accelerator, self.task, self.run_dir = accelerator, task, run_dir
        self.fsdp = _is_fsdp(accelerator)
        keep = self.fsdp and accelerator.is_main_process and task.evaluate is not None
        self.plain = copy.deepcopy(generator).cpu() if keep else None

    def __call__(self, nets: dict, gen=None, *, final: bool, step: int) -> dict | None:
        """Metrics of ``gen`` (None: the current generator, ``nets['generator']``) on the main process."""
        acc, is_main = self.accelerator, self.accelerator.is_main_process
        if gen is None and self.fsdp:
            weights = acc.get_state_dict(nets["generator"])  # collective; full on the main process
            if is_main:
                self.plain.load_state_dict(weights)
                gen = self.plain.to(acc.device)
        elif gen is None:
            gen = unwrap(nets["generator"])
        metrics = None
        with _full_params(acc, nets.values()) if self.task.evaluate_uses_networks else contextlib.nullcontext():
            if is_main:
                metrics = self.task.evaluate(gen, self.run_dir, final=final, step=step)
            acc.wait_for_everyone()
        if self.plain is not None:
            self.plain.cpu()
        return metrics


def per_bin_means(means: dict) -> dict:
    """A logged row from interval means: each (``PER_BIN_NUM`` + key, ``PER_BIN_DEN`` + key) pair of sums and
    counts (``objective.binned_stats``) becomes ``key`` = their quotient, left out where the count is 0."""
    row = {}
    for key, v in means.items():
        if key.startswith(PER_BIN_DEN):
            continue
        if key.startswith(PER_BIN_NUM):
            name = key[len(PER_BIN_NUM):]
            den = means.get(PER_BIN_DEN + name, 0.0)
            if den > 0:
                row[name] = float(v) / float(den)
            continue
        row[key] = float(v)
    return row


def distill(cfg: DistillConfig) -> dict:
    """Train (or resume) the run ``cfg.out``. Holds the directory's lock while it runs; Ctrl-C becomes
    RunInterrupted naming the step reached."""
    state: dict = {}
    try:
        return _distill(cfg, state)
    except KeyboardInterrupt:
        last = ckpt.latest_checkpoint(Path(cfg.out))
        raise RunInterrupted(f"interrupted at generator step {state.get('gen_step', 0)}; rerun the same command to "
                             "resume" + (f" (from {last.name})" if last is not None else "")) from None
    finally:
        ckpt.release_run_lock(Path(cfg.out))


def _distill(cfg: DistillConfig, state: dict) -> dict:
    """The body of ``distill``; ``state`` (empty) receives the counters as the run goes."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from .pipelines import build_task

    run_dir = Path(cfg.out)
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=cfg.objective.disc_features == "fake")
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg), cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[ddp_kwargs], **tracking.accelerator_kwargs(cfg.log.trackers, run_dir))
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    _check_resume_config(run_dir, cfg)  # read-only: a mismatched run directory is refused before anything runs
    _check_recipe_keys(cfg)
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # Same initial weights on every process (DDP also broadcasts them); then per-process noise streams.
    torch.manual_seed(cfg.seed)
    task = build_task(cfg, device)  # validates the task keys, teacher and data before anything is written
    _check_fsdp(accelerator, cfg, task)
    if cfg.ratio == "oracle" and task.oracle_log_ratio is None:
        raise ConfigError(f"ratio=oracle needs a task with an exact density ratio (toy2d); {cfg.pipeline} has none")
    divergence = get_divergence(cfg.divergence)
    ratio = RatioNormalizer(cfg.ratio_norm, task.schedule.ratio_bin_range(cfg.ratio_norm.bin_spacing)).to(device)
    if is_main:  # every check has passed: the first write
        ckpt.acquire_run_lock(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    accelerator.wait_for_everyone()

    generator, fake_score, disc = task.generator.to(device), task.fake_score.to(device), task.discriminator.to(device)
    teacher = task.teacher.to(device)
    if cfg.gradient_checkpointing:
        for net in (generator, fake_score):
            for m in net.modules():
                if hasattr(m, "enable_gradient_checkpointing") and hasattr(m, "config"):
                    m.enable_gradient_checkpointing()
    o = cfg.optim
    if o.grad_accum < 1:
        raise ValueError(f"optim.grad_accum must be >= 1, got {o.grad_accum}")
    A = o.grad_accum
    lr_c = o.lr_critic if o.lr_critic is not None else o.lr_gen
    kw = dict(betas=tuple(o.betas), weight_decay=o.weight_decay)
    if o.fused and torch.cuda.is_available():
        kw["fused"] = True
    # One AdamW per network (the fake score's and the discriminator's together are the critic's): accelerate's
    # FSDP2 prepares one model with its optimizer at a time. AdamW acts per parameter, so this is the same
    # update as one optimizer over both, and checkpoints store the two as one 'critic' optimizer.
    opt_g = torch.optim.AdamW(generator.parameters(), lr=o.lr_gen, **kw)
    opt_f = torch.optim.AdamW(fake_score.parameters(), lr=lr_c, **kw)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=o.lr_disc if o.lr_disc is not None else lr_c, **kw)
    # EMAs are full copies on every process (also under FSDP): one generator's worth of memory per decay.
    emas = {f"ema_{d:g}": AveragedModel(generator, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=True)
            for d in cfg.ema}
    evaluator = Evaluator(accelerator, task, generator, run_dir)  # under FSDP it keeps a plain copy: before wrapping

    state.update({"iteration": 0, "gen_step": 0, "images_seen": 0, "world_size": world, "skipped_updates": 0})
    last = ckpt.latest_verified_checkpoint(run_dir, world, warn=None if is_main else lambda m: None)  # stderr
    if last is not None:
        # Weights go into the plain modules before accelerate wraps (and under FSDP shards) them; the optimizer
        # states and random streams after, once the optimizers hold the prepared parameters.
        meta = ckpt.read_meta(last, world)
        for name, m in {"generator": generator, "fake_score": fake_score, "discriminator": disc, "ratio": ratio,
                        **emas}.items():
            ckpt.load_module(m, last / f"{name}.safetensors")
        state.update({k: meta[k] for k in ("iteration", "gen_step", "images_seen")})
        state["skipped_updates"] = meta.get("skipped_updates", 0)

    # parameter names in the optimizers' order, before any wrapper renames them (FSDP gathers states by name)
    names = {key: [n for n, _ in net.named_parameters()]
             for key, net in (("gen", generator), ("fake", fake_score), ("disc", disc))}
    if cfg.compile:
        generator, fake_score = torch.compile(generator), torch.compile(fake_score)
    generator, opt_g = _prepare(accelerator, generator, opt_g)
    fake_score, opt_f = _prepare(accelerator, fake_score, opt_f)
    disc, opt_d = _prepare(accelerator, disc, opt_d)
    nets = {"generator": generator, "fake_score": fake_score, "discriminator": disc}
    optim_parts = {"gen": [OptimPart(generator, opt_g, names["gen"])],  # checkpoint name -> its optimizers
                   "critic": [OptimPart(fake_score, opt_f, names["fake"]), OptimPart(disc, opt_d, names["disc"])]}

    objective = FDistill(generator, teacher, fake_score, disc, divergence, ratio, task.schedule, cfg.objective,
                         oracle_log_ratio=task.oracle_log_ratio, use_oracle_weights=cfg.ratio == "oracle")
    rng = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank + 1)
    if last is not None:
        load_optimizer_states(accelerator, optim_parts, last)
        ckpt.load_rng(last, rank, rng)
        accelerator.print(f"resumed from {last} at generator step {state['gen_step']}")
        if is_main:
            ckpt.truncate_metrics(run_dir / "metrics.jsonl", state["gen_step"])

    B, k = cfg.batch_size, max(1, cfg.schedule.critic_per_gen)
    if cfg.schedule.scheme not in ("dmd2", "fastgen"):
        raise ValueError(f"schedule.scheme must be dmd2 or fastgen, got {cfg.schedule.scheme!r}")
    per_iteration_ema = cfg.schedule.ema_every == "iteration"
    log_buf: dict[str, list[torch.Tensor]] = {}
    metrics_path = run_dir / "metrics.jsonl"
    trackers = cfg.log.trackers
    tracking.start(accelerator, trackers, run_dir, to_dict(cfg), state["gen_step"])
    guard = NonFiniteGuard(cfg, state)
    chance_rows = 0  # consecutive logged rows with the discriminator at chance

    def record(logs):
        for key, v in logs.items():
            log_buf.setdefault(key, []).append(v.detach().float().reshape(()))

    def critic_micro():
        z = unwrap(generator).sample_latents(B, rng, device)
        if cfg.gen_cond == "real":  # FastGen: the generated batch takes the real batch's labels / captions
            x_real, cond_real = task.sample_real(B, rng, device)
            cond = cond_real
        else:
            cond = task.sample_cond(B, rng, device)
            x_real, cond_real = task.sample_real(B, rng, device)
        with accelerator.autocast():
            loss, logs = objective.critic_loss(z, cond, x_real, cond_real, rng)
        record(logs)
        return loss

    def generator_micro():
        z = unwrap(generator).sample_latents(B, rng, device)
        cond = task.sample_real(B, rng, device)[1] if cfg.gen_cond == "real" else task.sample_cond(B, rng, device)
        with accelerator.autocast():
            loss, logs = objective.generator_loss(z, cond, rng)
        record(logs)
        return loss

    def critic_update():
        opt_f.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        accumulate_gradients(accelerator, nets.values(), A, critic_micro)
        clip_c = o.grad_clip if o.clip_critic else 0.0  # FastGen clips the generator only
        norms = {"grad_norm_fake": _grad_norm(accelerator, fake_score, clip_c),
                 "grad_norm_disc": _grad_norm(accelerator, disc, clip_c)}
        record(norms)
        if guard.ok("a critic update", *norms.values()):
            opt_f.step()
            opt_d.step()

    def generator_update():
        opt_g.zero_grad(set_to_none=True)
        # the discriminator (and with disc_features=fake the fake score) gets gradients here too; they are
        # dropped by the critic's zero_grad, but their synchronisation is held back as well
        accumulate_gradients(accelerator, nets.values(), A, generator_micro)
        norm = _grad_norm(accelerator, generator, o.grad_clip)
        record({"grad_norm_gen": norm})
        if guard.ok("a generator update", norm):
            opt_g.step()
            if cfg.schedule.ema_every == "generator":
                update_emas(accelerator, emas, generator)

    # what export rebuilds the generator from (image pipelines), so that it does not need the teacher folder
    spec = {"generator_spec": task.info["generator_spec"]} if "generator_spec" in task.info else {}

    def save():
        tmp = run_dir / f"ckpt-{state['gen_step']:08d}.tmp"
        if is_main:
            ckpt.begin_checkpoint(run_dir, state["gen_step"])
        accelerator.wait_for_everyone()
        ckpt.write_rng(tmp, rank, rng)
        weights, optims = gather_weights(accelerator, nets), gather_optimizer_states(accelerator, optim_parts)
        accelerator.wait_for_everyone()
        if is_main:
            ckpt.finish_checkpoint(tmp, {**weights, "ratio": ratio, **emas}, optims,
                                   {**state, "config": to_dict(cfg), **spec}, cfg.log.keep_ckpts)
        accelerator.wait_for_everyone()

    pbar = None
    if is_main and cfg.log.progress:
        from tqdm.auto import tqdm
        pbar = tqdm(total=cfg.steps, initial=state["gen_step"], desc=f"distill {cfg.pipeline} {divergence.name}",
                    unit="step", dynamic_ncols=True)
    t0, steps_at_t0 = time.time(), state["gen_step"]
    while state["gen_step"] < cfg.steps:
        it = state["iteration"] - cfg.schedule.critic_warmup
        if it < 0:
            critic_update()
            state["iteration"] += 1
            if per_iteration_ema:
                update_emas(accelerator, emas, generator)
            continue
        if cfg.schedule.scheme == "dmd2":
            do_critic, do_gen = True, it % k == 0
        else:
            do_gen = it % k == k - 1 or k == 1
            do_critic = not do_gen or k == 1
        if do_critic:
            critic_update()
        if do_gen:
            generator_update()
            state["gen_step"] += 1
            state["images_seen"] += B * world * A
        state["iteration"] += 1
        if per_iteration_ema:  # FastGen's EMA callback: every iteration, critic-only ones too
            update_emas(accelerator, emas, generator)
        if not do_gen:
            continue
        step = state["gen_step"]
        if step % cfg.log.every == 0 or step == cfg.steps:
            # the only host-device sync of the loop: averaged over the interval, reduced over processes
            means = {key: torch.stack(v).mean() for key, v in log_buf.items()}
            keys = sorted(means)
            vals = accelerator.reduce(torch.stack([means[key] for key in keys]).to(device), "mean").tolist()
            log_buf.clear()
            row = {"step": step, "kimg": state["images_seen"] / 1000, "time": round(time.time() - t0, 3),
                   "skipped_updates": state["skipped_updates"],
                   **per_bin_means(dict(zip(keys, vals)))}
            acc = row.get("disc_acc")
            at_chance = acc is not None and abs(acc - 0.5) < cfg.log.chance_margin
            chance_rows = chance_rows + 1 if at_chance else 0
            warn = bool(cfg.log.chance_warn_rows) and chance_rows >= cfg.log.chance_warn_rows
            if is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                tracking.log_scalars(accelerator, trackers, row, step)
                if warn and chance_rows == cfg.log.chance_warn_rows:  # once per stretch at chance
                    msg = (f"warning: discriminator at chance (disc_acc {acc:.3f}) for {chance_rows} logged rows "
                           f"up to step {step}: f-weighting inactive (h ~ 1) and the GAN term uninformative")
                    (pbar.write if pbar is not None else accelerator.print)(msg)
                if pbar is not None:
                    post = {key: f"{row[key]:.3g}" for key in ("loss_dm", "loss_disc", "disc_acc", "h_ess")
                            if key in row and math.isfinite(row[key])}
                    if warn:
                        post["warn"] = "f-weighting inactive"
                    pbar.set_postfix(post)
        if pbar is not None:
            pbar.update(1)
        if cfg.log.sample_every and step % cfg.log.sample_every == 0 and task.evaluate is not None:
            t_eval = time.time()
            evaluator(nets, final=False, step=step)
            tracking.log_newest_grid(accelerator, trackers, run_dir, step, t_eval)
        if step % cfg.log.ckpt_every == 0 or step == cfg.steps:
            save()
        if step == _KILL_AT_STEP:  # tests: a hard kill (no cleanup) right after this step
            os.kill(os.getpid(), signal.SIGKILL)
    if pbar is not None:
        pbar.close()
    elapsed = time.time() - t0

    if os.environ.get("FDISTILL_TEST_DUMP_RANKS"):  # tests: every process's final generator, to compare ranks
        from safetensors.torch import save_file

        sd = _full_state_dict(generator) if _is_fsdp(accelerator) else unwrap(generator).state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()},
                  str(run_dir / f"rank{rank}_generator.safetensors"))
    ran = state["gen_step"] - steps_at_t0  # 0 when resumed at the end: no speed to report
    result = {"gen_steps": state["gen_step"], "kimg": state["images_seen"] / 1000,
              "sec_per_gen_step": elapsed / ran if ran > 0 else None, "skipped_updates": state["skipped_updates"]}
    metrics, t_eval = None, time.time()
    if task.evaluate is not None:  # the (first) EMA if the run keeps one
        metrics = evaluator(nets, next(iter(emas.values())).module if emas else None, final=True,
                            step=state["gen_step"])
    if is_main and metrics is not None:
        result.update(metrics)
        result["evaluated"] = next(iter(emas)) if emas else "generator"
        result["divergence"] = divergence.name
        result["ratio"] = cfg.ratio
        (run_dir / "metrics.json").write_text(json.dumps(result, indent=1))
        tracking.log_scalars(accelerator, trackers, metrics, state["gen_step"], prefix="eval/")
        tracking.log_newest_grid(accelerator, trackers, run_dir, state["gen_step"], t_eval)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def main_from_args(config_path: str, overrides: list[str], dry_run: bool = False) -> int:
    from .config import load_config

    cfg = load_config(config_path, overrides)
    if dry_run:
        print(dump_yaml(cfg))
        return 0
    res = distill(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in res.items() if not isinstance(v, (dict, list))}, indent=1))
    return 0
