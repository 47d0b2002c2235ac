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
from .errors import RunInterrupted, TrainingDiverged
from .generator import unwrap
from .objective import PER_BIN_DEN, PER_BIN_NUM, FDistill
from .parallel import OptimPart, Parallel
from .ratio import RatioNormalizer
from .task import Task

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


def update_emas(par: Parallel, emas: dict, generator) -> None:
    """One step of every EMA from the prepared ``generator``. The EMAs are full copies on every process (also
    under FSDP: ``Parallel.ema_source``)."""
    if not emas:
        return
    src = par.ema_source(generator, next(iter(emas.values())).module)
    for ema in emas.values():
        ema.update_parameters(src)


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
    generator, opt_g = par.prepare(generator, opt_g)
    fake_score, opt_f = par.prepare(fake_score, opt_f)
    disc, opt_d = par.prepare(disc, opt_d)
    nets = {"generator": generator, "fake_score": fake_score, "discriminator": disc}
    optim_parts = {"gen": [OptimPart(generator, opt_g, names["gen"])],  # checkpoint name -> its optimizers
                   "critic": [OptimPart(fake_score, opt_f, names["fake"]), OptimPart(disc, opt_d, names["disc"])]}

    objective = FDistill(generator, teacher, fake_score, disc, divergence, ratio, task.schedule, cfg.objective,
                         oracle_log_ratio=task.oracle_log_ratio, use_oracle_weights=cfg.ratio == "oracle",
                         student=few_step)
    rng = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank + 1)
    if last is not None:
        par.load_optimizer_states(optim_parts, last)
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
        norms = {"grad_norm_fake": par.grad_norm(fake_score, clip_c),
                 "grad_norm_disc": par.grad_norm(disc, clip_c)}
        record(norms)
        if guard.ok("a critic update", *norms.values()):
            opt_f.step()
            opt_d.step()

    def generator_update():
        opt_g.zero_grad(set_to_none=True)
        # the discriminator (and with disc_features=fake the fake score) gets gradients here too; they are
        # dropped by the critic's zero_grad, but their synchronisation is held back as well
        accumulate_gradients(accelerator, nets.values(), A, generator_micro)
        norm = par.grad_norm(generator, o.grad_clip)
        record({"grad_norm_gen": norm})
        if guard.ok("a generator update", norm):
            opt_g.step()
            if cfg.schedule.ema_every == "generator":
                update_emas(par, emas, generator)

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
        it = state["iteration"] - cfg.schedule.critic_warmup
        if it < 0:
            critic_update()
            state["iteration"] += 1
            if per_iteration_ema:
                update_emas(par, emas, generator)
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
            update_emas(par, emas, generator)
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

