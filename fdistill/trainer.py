"""The training loop: one readable function on accelerate, the same for every task.

    fdistill distill CONFIG [key=value ...]                       one process
    accelerate launch train/distill.py CONFIG [key=value ...]     several processes / machines (DDP, or FSDP
                                                                  with accelerate's FSDP plugin, version 1 or 2)

Each iteration updates the critic (fake score + discriminator head) and, every ``critic_per_gen``-th, the
generator (DMD2's scheme), or alternates k-1 critic iterations with one generator iteration (FastGen's);
each update may accumulate ``optim.grad_accum`` micro-batches. The updates themselves are
``fdistill.iteration.TrainingIteration``'s; this loop decides when each runs, logs, evaluates and checkpoints.
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
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import student, tracking
from .config import ConfigError, DistillConfig, dump_yaml, to_dict
from .divergences import get_divergence
from .errors import RunInterrupted
from .generator import unwrap
from .iteration import NonFiniteGuard, Optimizers, TrainingIteration, lr_factor, make_optimizers, set_lr
from .objective import PER_BIN_DEN, PER_BIN_NUM, FDivergenceObjective
from .parallel import OptimPart, Parallel
from .ratio import RatioNormalizer
from .task import Task

# Keys of the config that may change between a run and its resumption.
_RESUMABLE_CHANGES = {"steps", "log", "out"}


def _mixed_precision(cfg: DistillConfig) -> str:
    """accelerate's setting for ``cfg.mixed_precision`` (validated by the config: auto, no or bf16)."""
    if cfg.mixed_precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return cfg.mixed_precision


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


def _check_resume_config(run_dir: Path, cfg: DistillConfig, legacy_task_keys: dict | None = None):
    """Refuse to resume a run with a different config, or with ``steps`` below the step it has reached. A run
    directory without a checkpoint holds no run to protect (e.g. a start that failed): its config is replaced.
    ``legacy_task_keys``: task keys the saved config lacks because it predates them, at the values its run used
    (``fdistill.pipelines.LEGACY_TASK_DEFAULTS``)."""
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise ConfigError(f"out={run_dir} is a file, not a run directory; choose another out=DIR")
    saved = run_dir / "config.json"
    if not saved.is_file() or ckpt.latest_checkpoint(run_dir) is None:
        return
    old = _with_defaults(json.loads(saved.read_text()), json.loads(json.dumps(to_dict(DistillConfig()))))
    if legacy_task_keys:
        old["task"] = {**(old.get("task") or {}), **json.loads(json.dumps(legacy_task_keys))}
    new = json.loads(json.dumps(to_dict(cfg)))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in _RESUMABLE_CHANGES)
    if diff:
        raise ConfigError(f"{run_dir} holds a run with a different config (keys {diff}); resume it with its own "
                          f"settings (fdistill distill {run_dir / 'config.yaml'} out={run_dir}), or choose another "
                          "out=DIR")
    try:
        reached = json.loads((ckpt.latest_checkpoint(run_dir) / "meta.json").read_text())["gen_step"]
    except (OSError, ValueError, KeyError):
        return  # a damaged checkpoint: resuming reports it
    if cfg.steps < reached:
        raise ConfigError(f"steps={cfg.steps} is below the step {run_dir} has reached ({reached}); a run cannot "
                          f"go back: set steps >= {reached}, or choose another out=DIR")


class Evaluator:
    """The task's evaluation, run by the main process while the others wait; every process calls it.

    Under FSDP a sharded generator cannot run on one process alone, so the current generator is evaluated as a
    plain copy, kept in the main process's CPU memory and loaded with the gathered weights each time. Only a task
    whose evaluation calls its own references to the networks (``Task.evaluate_uses_networks``: the 2-D toy) has
    them hold their full parameters on every process meanwhile; for SD1.5 that would be ~7 GB per GPU."""

    def __init__(self, par: Parallel, task, generator: torch.nn.Module, run_dir: Path):
        """``generator``: the plain one, before accelerate wraps it."""
        self.par, self.accelerator, self.task, self.run_dir = par, par.accelerator, task, run_dir
        keep = par.is_fsdp and par.accelerator.is_main_process and task.evaluate is not None
        self.plain = copy.deepcopy(generator).cpu() if keep else None

    def __call__(self, nets: dict, gen=None, *, final: bool, step: int) -> dict | None:
        """Metrics of ``gen`` (None: the current generator, ``nets['generator']``) on the main process."""
        acc, is_main = self.accelerator, self.accelerator.is_main_process
        if gen is None and self.par.is_fsdp:
            weights = self.par.weights_for_evaluation(nets["generator"])  # collective; full on the main process
            if is_main:
                self.plain.load_state_dict(weights)
                gen = self.plain.to(acc.device)
        elif gen is None:
            gen = unwrap(nets["generator"])
        metrics = None
        with self.par.full_params(nets.values()) if self.task.evaluate_uses_networks else contextlib.nullcontext():
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


@dataclass
class RunState:
    """What a callback sees of a run: its directory, this process's rank, the counters (iteration, gen_step,
    images_seen, skipped_updates; read-only) and the generator's full weights."""

    run_dir: Path
    rank: int
    counters: dict
    generator_state_dict: Callable[[], dict]
    """The generator's full state dict (unsharded); a collective under FSDP: call it on every process."""


class Callback:
    """Hooks a caller passes to ``distill(cfg, task, callbacks=[...])``, called at named points on every process.
    The defaults do nothing."""

    def on_step_end(self, step: int, run: RunState) -> None:
        """After generator step ``step``, its logging, evaluation and checkpoint included."""

    def on_train_end(self, run: RunState) -> None:
        """After the last generator step, before the final evaluation."""


def distill(cfg: DistillConfig, task: Task, callbacks: Sequence[Callback] = ()) -> dict:
    """Train (or resume) the run ``cfg.out`` on ``task`` (built from ``cfg``: ``fdistill.pipelines.build_run_task``
    seeds and places it as every process must). Holds the directory's lock while it runs; Ctrl-C becomes
    RunInterrupted naming the step reached."""
    state: dict = {}
    try:
        return _distill(cfg, task, state, list(callbacks))
    except KeyboardInterrupt:
        last = ckpt.latest_checkpoint(Path(cfg.out))
        raise RunInterrupted(f"interrupted at generator step {state.get('gen_step', 0)}; rerun the same command to "
                             "resume" + (f" (from {last.name})" if last is not None else "")) from None
    finally:
        ckpt.release_run_lock(Path(cfg.out))


def _distill(cfg: DistillConfig, task: Task, state: dict, callbacks: list[Callback]) -> dict:
    """The body of ``distill``; ``state`` (empty) receives the counters as the run goes."""
    from accelerate import Accelerator  # heavy (accelerate's whole stack): only once a run starts
    from accelerate.utils import DistributedDataParallelKwargs

    cfg.validate()  # load_config has run it; a config built in code has not. Before anything is written
    run_dir = Path(cfg.out)
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=cfg.objective.disc_features == "fake")
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg), cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[ddp_kwargs], **tracking.accelerator_kwargs(cfg.log.trackers, run_dir))
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    _check_resume_config(run_dir, cfg, task.info.get("legacy_task_keys"))  # read-only: a mismatched run directory is refused before anything runs
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    par = Parallel(accelerator)  # every DDP / FSDP difference
    par.check(cfg, task)
    try:  # a few-step student's stage levels; before the EMAs and the evaluator copy the generator
        few_step = student.attach(cfg.student, task)
    except ValueError as e:
        raise ConfigError(str(e)) from None
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
    fused = {"fused": True} if cfg.optim.fused and torch.cuda.is_available() else {}
    opts = make_optimizers(cfg.optim, generator, fake_score, disc, **fused)
    # EMAs are full copies on every process (also under FSDP): one generator's worth of memory per decay.
    emas = {f"ema_{d:g}": AveragedModel(generator, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=True)
            for d in cfg.ema}
    evaluator = Evaluator(par, task, generator, run_dir)  # under FSDP it keeps a plain copy: before wrapping

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
    generator, opt_g = par.prepare(generator, opts.generator)
    fake_score, opt_f = par.prepare(fake_score, opts.fake_score)
    disc, opt_d = par.prepare(disc, opts.discriminator)
    nets = {"generator": generator, "fake_score": fake_score, "discriminator": disc}
    optim_parts = {"gen": [OptimPart(generator, opt_g, names["gen"])],  # checkpoint name -> its optimizers
                   "critic": [OptimPart(fake_score, opt_f, names["fake"]), OptimPart(disc, opt_d, names["disc"])]}

    objective = FDivergenceObjective(generator, teacher, fake_score, disc, divergence, ratio, task.schedule,
                                     cfg.objective, oracle_log_ratio=task.oracle_log_ratio,
                                     use_oracle_weights=cfg.ratio == "oracle", student=few_step)
    rng = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank + 1)
    if last is not None:
        par.load_optimizer_states(optim_parts, last)
        ckpt.load_rng(last, rank, rng)
        accelerator.print(f"resumed from {last} at generator step {state['gen_step']}")
        if is_main:
            ckpt.truncate_metrics(run_dir / "metrics.jsonl", state["gen_step"])

    B, A, k = cfg.batch_size, cfg.optim.grad_accum, max(1, cfg.schedule.critic_per_gen)
    per_iteration_ema = cfg.schedule.ema_every == "iteration"
    metrics_path = run_dir / "metrics.jsonl"
    trackers = cfg.log.trackers
    tracking.start(accelerator, trackers, run_dir, to_dict(cfg), state["gen_step"])
    iteration = TrainingIteration(cfg, task, objective, par, nets, Optimizers(opt_g, opt_f, opt_d), emas, rng,
                                  NonFiniteGuard(cfg, state))
    log_buf = iteration.logs  # detached scalars on the device until a logging interval
    chance_rows = 0  # consecutive logged rows with the discriminator at chance

    # what export rebuilds the generator from (image pipelines), so that it does not need the teacher folder
    spec = {"generator_spec": task.info["generator_spec"]} if "generator_spec" in task.info else {}
    if few_step is not None:  # what sampling and export run: the k stage levels
        spec["student_sigmas"] = few_step.sigmas

    def save():
        tmp = run_dir / f"ckpt-{state['gen_step']:08d}.tmp"
        if is_main:
            ckpt.begin_checkpoint(run_dir, state["gen_step"])
        accelerator.wait_for_everyone()
        ckpt.write_rng(tmp, rank, rng)
        weights, optims = par.gather_weights(nets), par.gather_optimizer_states(optim_parts)
        accelerator.wait_for_everyone()
        if is_main:
            ckpt.finish_checkpoint(tmp, {**weights, "ratio": ratio, **emas}, optims,
                                   {**state, "config": to_dict(cfg), **spec}, cfg.log.keep_ckpts)
        accelerator.wait_for_everyone()

    run_state = RunState(run_dir, rank, state, lambda: par.full_state_dict(generator))
    pbar = None
    if is_main and cfg.log.progress:
        pbar = tqdm(total=cfg.steps, initial=state["gen_step"], desc=f"distill {cfg.pipeline} {divergence.name}",
                    unit="step", dynamic_ncols=True)
    t0, steps_at_t0 = time.time(), state["gen_step"]
    while state["gen_step"] < cfg.steps:
        if cfg.optim.lr_decay != "constant":  # a function of the generator step: resumes need no extra state
            lr_now = lr_factor(cfg.optim, state["gen_step"], cfg.steps)
            set_lr(iteration.opt, cfg.optim, lr_now)
        it = state["iteration"] - cfg.schedule.critic_warmup
        if it < 0:
            iteration.critic_update()
            state["iteration"] += 1
            if per_iteration_ema:
                iteration.update_emas()
            continue
        if cfg.schedule.scheme == "dmd2":
            do_critic, do_gen = True, it % k == 0
        else:
            do_gen = it % k == k - 1 or k == 1
            do_critic = not do_gen or k == 1
        if do_critic:
            iteration.critic_update()
        if do_gen:
            iteration.generator_update()
            state["gen_step"] += 1
            state["images_seen"] += B * world * A
        state["iteration"] += 1
        if per_iteration_ema:  # FastGen's EMA callback: every iteration, critic-only ones too
            iteration.update_emas()
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
            if cfg.optim.lr_decay != "constant":  # the multiplier of the last generator update's rates
                row["lr_factor"] = lr_now
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
                    bins = {k[len("disc_acc_bin"):]: v for k, v in row.items() if k.startswith("disc_acc_bin")}
                    if bins:  # the pooled accuracy includes pure-noise levels; say where the head does best
                        best = max(bins, key=bins.get)
                        msg += f" (best noise-level bin {best}: {bins[best]:.2f})"
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
        for cb in callbacks:
            cb.on_step_end(step, run_state)
    if pbar is not None:
        pbar.close()
    elapsed = time.time() - t0

    for cb in callbacks:
        cb.on_train_end(run_state)
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

