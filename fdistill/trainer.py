"""The training loop: one readable function on accelerate, the same for every task.

    fdistill distill CONFIG [key=value ...]                       one process
    accelerate launch train/distill.py CONFIG [key=value ...]     several processes / machines (DDP)

Each iteration updates the critic (fake score + discriminator head) and, every ``critic_per_gen``-th, the
generator (DMD2's scheme), or alternates k-1 critic iterations with one generator iteration (FastGen's).
The run directory holds config.yaml, metrics.jsonl, sample grids, checkpoints and, at the end, metrics.json;
rerunning the same command resumes from the newest checkpoint exactly.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from . import checkpoint as ckpt
from .config import DistillConfig, dump_yaml, to_dict
from .divergences import get_divergence
from .generator import unwrap
from .objective import FDistill
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


def _check_resume_config(run_dir: Path, cfg: DistillConfig):
    saved = run_dir / "config.json"
    if not saved.is_file():
        return
    old = json.loads(saved.read_text())
    new = json.loads(json.dumps(to_dict(cfg)))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in _RESUMABLE_CHANGES)
    if diff:
        raise ValueError(f"{run_dir} holds a run with a different config (keys {diff}); resume it with the same "
                         "settings, or choose another out=DIR")


def _grad_norm(params, clip: float) -> torch.Tensor:
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    if clip and clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.nn.utils.clip_grad_norm_(params, float("inf"))


def distill(cfg: DistillConfig) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from .pipelines import build_task

    run_dir = Path(cfg.out)
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=cfg.objective.disc_features == "fake")
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg), cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[ddp_kwargs])
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    _check_resume_config(run_dir, cfg)  # read-only: a mismatched run directory is refused before anything runs

    # Same initial weights on every process (DDP also broadcasts them); then per-process noise streams.
    torch.manual_seed(cfg.seed)
    task = build_task(cfg, device)  # validates the task keys, teacher and data before anything is written
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))
    accelerator.wait_for_everyone()
    divergence = get_divergence(cfg.divergence)
    ratio = RatioNormalizer(cfg.ratio_norm, task.schedule.dm_sigma_range).to(device)
    if cfg.ratio not in ("learned", "oracle"):
        raise ValueError(f"ratio must be 'learned' or 'oracle', got {cfg.ratio!r}")
    if cfg.ratio == "oracle" and task.oracle_log_ratio is None:
        raise ValueError(f"ratio=oracle needs a task with an exact density ratio (toy2d); {cfg.pipeline} has none")

    generator, fake_score, disc = task.generator.to(device), task.fake_score.to(device), task.discriminator.to(device)
    teacher = task.teacher.to(device)
    if cfg.gradient_checkpointing:
        for net in (generator, fake_score):
            for m in net.modules():
                if hasattr(m, "enable_gradient_checkpointing") and hasattr(m, "config"):
                    m.enable_gradient_checkpointing()
    o = cfg.optim
    lr_c = o.lr_critic if o.lr_critic is not None else o.lr_gen
    kw = dict(betas=tuple(o.betas), weight_decay=o.weight_decay)
    if o.fused and torch.cuda.is_available():
        kw["fused"] = True
    opt_g = torch.optim.AdamW(generator.parameters(), lr=o.lr_gen, **kw)
    critic_params = list(fake_score.parameters()) + list(disc.parameters())
    opt_c = torch.optim.AdamW(critic_params, lr=lr_c, **kw)
    emas = {f"ema_{d:g}": AveragedModel(generator, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=True)
            for d in cfg.ema}
    if cfg.compile:
        generator, fake_score = torch.compile(generator), torch.compile(fake_score)
    generator, fake_score, disc, opt_g, opt_c = accelerator.prepare(generator, fake_score, disc, opt_g, opt_c)

    objective = FDistill(generator, teacher, fake_score, disc, divergence, ratio, task.schedule, cfg.objective,
                         oracle_log_ratio=task.oracle_log_ratio, use_oracle_weights=cfg.ratio == "oracle")
    rng = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank + 1)

    def modules():
        m = {"generator": unwrap(generator), "fake_score": unwrap(fake_score), "discriminator": unwrap(disc),
             "ratio": ratio}
        m.update(emas)
        return m

    optimizers = {"gen": opt_g, "critic": opt_c}
    state = {"iteration": 0, "gen_step": 0, "images_seen": 0, "world_size": world}
    last = ckpt.latest_checkpoint(run_dir)
    if last is not None:
        meta = ckpt.load_checkpoint(last, modules(), optimizers, rank, world, rng)
        state.update({k: meta[k] for k in ("iteration", "gen_step", "images_seen")})
        accelerator.print(f"resumed from {last} at generator step {state['gen_step']}")

    B, k = cfg.batch_size, max(1, cfg.schedule.critic_per_gen)
    if cfg.schedule.scheme not in ("dmd2", "fastgen"):
        raise ValueError(f"schedule.scheme must be dmd2 or fastgen, got {cfg.schedule.scheme!r}")
    log_buf: dict[str, list[torch.Tensor]] = {}
    metrics_path = run_dir / "metrics.jsonl"

    def record(logs):
        for key, v in logs.items():
            log_buf.setdefault(key, []).append(v.detach().float().reshape(()))

    def critic_update():
        z = unwrap(generator).sample_latents(B, rng, device)
        cond = task.sample_cond(B, rng, device)
        x_real, cond_real = task.sample_real(B, rng, device)
        with accelerator.autocast():
            loss, logs = objective.critic_loss(z, cond, x_real, cond_real, rng)
        opt_c.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        logs["grad_norm_fake"] = _grad_norm(fake_score.parameters(), o.grad_clip)
        logs["grad_norm_disc"] = _grad_norm(disc.parameters(), o.grad_clip)
        opt_c.step()
        record(logs)

    def generator_update():
        z = unwrap(generator).sample_latents(B, rng, device)
        cond = task.sample_cond(B, rng, device)
        with accelerator.autocast():
            loss, logs = objective.generator_loss(z, cond, rng)
        opt_g.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        logs["grad_norm_gen"] = _grad_norm(generator.parameters(), o.grad_clip)
        opt_g.step()
        for ema in emas.values():
            ema.update_parameters(unwrap(generator))
        record(logs)

    def save():
        tmp = run_dir / f"ckpt-{state['gen_step']:08d}.tmp"
        if is_main:
            ckpt.begin_checkpoint(run_dir, state["gen_step"])
        accelerator.wait_for_everyone()
        ckpt.write_rng(tmp, rank, rng)
        accelerator.wait_for_everyone()
        if is_main:
            ckpt.finish_checkpoint(tmp, modules(), optimizers, {**state, "config": to_dict(cfg)},
                                   cfg.log.keep_ckpts)
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
            state["images_seen"] += B * world
        state["iteration"] += 1
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
                   **{key: float(v) for key, v in zip(keys, vals)}}
            if is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                if pbar is not None:
                    pbar.set_postfix({key: f"{row[key]:.3g}" for key in ("loss_dm", "loss_disc", "h_ess")
                                      if key in row and math.isfinite(row[key])})
        if pbar is not None:
            pbar.update(1)
        if cfg.log.sample_every and step % cfg.log.sample_every == 0 and is_main and task.evaluate is not None:
            task.evaluate(unwrap(generator), run_dir, final=False, step=step)
        if step % cfg.log.ckpt_every == 0 or step == cfg.steps:
            save()
        if step == _KILL_AT_STEP:  # tests: a hard kill (no cleanup) right after this step
            os.kill(os.getpid(), signal.SIGKILL)
    if pbar is not None:
        pbar.close()
    elapsed = time.time() - t0

    if os.environ.get("FDISTILL_TEST_DUMP_RANKS"):  # tests: every process's final generator, to compare ranks
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in unwrap(generator).state_dict().items()},
                  str(run_dir / f"rank{rank}_generator.safetensors"))
    result = {"gen_steps": state["gen_step"], "kimg": state["images_seen"] / 1000,
              "sec_per_gen_step": elapsed / max(1, state["gen_step"] - steps_at_t0)}
    if is_main and task.evaluate is not None:
        final_gen = next(iter(emas.values())).module if emas else unwrap(generator)
        metrics = task.evaluate(final_gen, run_dir, final=True, step=state["gen_step"])
        result.update(metrics)
        result["evaluated"] = next(iter(emas)) if emas else "generator"
        result["divergence"] = divergence.name
        result["ratio"] = cfg.ratio
        (run_dir / "metrics.json").write_text(json.dumps(result, indent=1))
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
