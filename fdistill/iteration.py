"""One training iteration of f-distill: the critic update and the generator update, as methods of one object that
the trainer's loop (``fdistill.trainer``) and the step benchmark (``benchmarks/step.py``) both call.

    critic update     z ~ N(0, I); c, (x_real, c_real) ~ task      (gen_cond=real: c = c_real, FastGen)
                      loss = fake-score denoising loss on x = G(z, c) + discriminator loss (x_real vs x)
                      clip, AdamW step of the fake score and of the discriminator head
    generator update  z ~ N(0, I); c ~ task; loss = h-weighted distribution matching + GAN term
                      clip, AdamW step of the generator, then the EMAs (schedule.ema_every=generator)

each over ``optim.grad_accum`` micro-batches. The losses are the objective's (``fdistill.objective``, arXiv
2502.15681 Sec. 3-4); what differs between one process, DDP and FSDP is ``fdistill.parallel``; when each update
runs (warm-up, alternation, per-iteration EMAs), logging and checkpoints are the trainer's loop.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

from .config import DistillConfig, OptimConfig
from .errors import TrainingDiverged
from .generator import unwrap
from .objective import FDivergenceObjective
from .parallel import Parallel
from .task import Task


class Optimizers(NamedTuple):
    """One AdamW per network; the fake score's and the discriminator's together are the critic's."""
    generator: torch.optim.Optimizer
    fake_score: torch.optim.Optimizer
    discriminator: torch.optim.Optimizer


def make_optimizers(o: OptimConfig, generator: torch.nn.Module, fake_score: torch.nn.Module,
                    discriminator: torch.nn.Module, **adamw) -> Optimizers:
    """The optimizers of ``optim`` on the plain networks. One per network: accelerate's FSDP2 prepares one model
    with its optimizer at a time. AdamW acts per parameter, so two critic optimizers make the same update as one
    over both, and checkpoints store them as one 'critic' optimizer. ``adamw``: extra AdamW options (fused,
    foreach)."""
    kw = dict(betas=tuple(o.betas), weight_decay=o.weight_decay, **adamw)
    return Optimizers(*(torch.optim.AdamW(net.parameters(), lr=lr, **kw)
                        for net, lr in zip((generator, fake_score, discriminator), base_lrs(o))))


def base_lrs(o: OptimConfig) -> tuple[float, float, float]:
    """The generator's, the fake score's and the discriminator head's base rates (None falls back down the line)."""
    lr_c = o.lr_critic if o.lr_critic is not None else o.lr_gen
    return o.lr_gen, lr_c, o.lr_disc if o.lr_disc is not None else lr_c


def lr_factor(o: OptimConfig, gen_step: int, steps: int) -> float:
    """The multiplier of every base learning rate at generator step ``gen_step`` of ``steps`` (``optim.lr_decay``).
    A function of the step alone, so a resumed run continues the same schedule without extra state."""
    start = o.lr_decay_start * steps
    if o.lr_decay == "constant" or gen_step <= start or steps <= start:
        return 1.0
    t = min(1.0, (gen_step - start) / (steps - start))
    shape = 1.0 - t if o.lr_decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
    return o.lr_final + (1.0 - o.lr_final) * shape


def set_lr(opts: Optimizers, o: OptimConfig, factor: float) -> None:
    """Every optimizer at ``factor`` x its base rate (``lr_gen``, ``lr_critic``, ``lr_disc``)."""
    for opt, base in zip(opts, base_lrs(o)):
        for group in opt.param_groups:
            group["lr"] = base * factor


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


class TrainingIteration:
    """The two updates on prepared networks (``nets``: generator, fake_score, discriminator, as ``par.prepare``
    returned them) with their prepared optimizers. Every random draw comes from ``rng``, in a fixed order, so
    that a run resumed from its checkpointed ``rng`` continues exactly.

    ``logs``: the detached scalars of every update since the loop last cleared it, kept on the device (the loop
    syncs once per logging interval). ``guard``: decides whether an update may step (``NonFiniteGuard.ok``)."""

    def __init__(self, cfg: DistillConfig, task: Task, objective: FDivergenceObjective, par: Parallel, nets: dict,
                 optimizers: Optimizers, emas: dict, rng: torch.Generator, guard: NonFiniteGuard):
        self.cfg, self.task, self.objective, self.par = cfg, task, objective, par
        self.nets, self.opt, self.emas, self.rng, self.guard = nets, optimizers, emas, rng, guard
        self.batch_size = cfg.batch_size  # per process and micro-batch
        self.logs: dict[str, list[torch.Tensor]] = {}

    def record(self, logs: dict) -> None:
        for key, v in logs.items():
            self.logs.setdefault(key, []).append(v.detach().float().reshape(()))

    def _critic_loss(self) -> torch.Tensor:
        task, B, rng, device = self.task, self.batch_size, self.rng, self.par.accelerator.device
        z = unwrap(self.nets["generator"]).sample_latents(B, rng, device)
        if self.cfg.gen_cond == "real":  # FastGen: the generated batch takes the real batch's labels / captions
            x_real, cond_real = task.sample_real(B, rng, device)
            cond = cond_real
        else:
            cond = task.sample_cond(B, rng, device)
            x_real, cond_real = task.sample_real(B, rng, device)
        with self.par.accelerator.autocast():
            loss, logs = self.objective.critic_loss(z, cond, x_real, cond_real, rng)
        self.record(logs)
        return loss

    def _generator_loss(self) -> torch.Tensor:
        task, B, rng, device = self.task, self.batch_size, self.rng, self.par.accelerator.device
        z = unwrap(self.nets["generator"]).sample_latents(B, rng, device)
        cond = task.sample_real(B, rng, device)[1] if self.cfg.gen_cond == "real" else task.sample_cond(B, rng, device)
        with self.par.accelerator.autocast():
            loss, logs = self.objective.generator_loss(z, cond, rng)
        self.record(logs)
        return loss

    def critic_update(self) -> None:
        """The fake score and the discriminator: one AdamW step each on the mean of ``grad_accum`` micro-batches
        (skipped when the guard refuses the gradient)."""
        o, par, nets = self.cfg.optim, self.par, self.nets
        self.opt.fake_score.zero_grad(set_to_none=True)
        self.opt.discriminator.zero_grad(set_to_none=True)
        accumulate_gradients(par.accelerator, nets.values(), o.grad_accum, self._critic_loss)
        clip = o.grad_clip if o.clip_critic else 0.0  # FastGen clips the generator only
        norms = {"grad_norm_fake": par.grad_norm(nets["fake_score"], clip),
                 "grad_norm_disc": par.grad_norm(nets["discriminator"], clip)}
        self.record(norms)
        if self.guard.ok("a critic update", *norms.values()):
            self.opt.fake_score.step()
            self.opt.discriminator.step()

    def generator_update(self) -> None:
        """The generator: one AdamW step on the mean of ``grad_accum`` micro-batches, then every EMA when they
        follow generator steps (``schedule.ema_every=generator``)."""
        o, par, nets = self.cfg.optim, self.par, self.nets
        self.opt.generator.zero_grad(set_to_none=True)
        # the discriminator (and with disc_features=fake the fake score) gets gradients here too; they are
        # dropped by the critic's zero_grad, but their synchronisation is held back as well
        accumulate_gradients(par.accelerator, nets.values(), o.grad_accum, self._generator_loss)
        norm = par.grad_norm(nets["generator"], o.grad_clip)
        self.record({"grad_norm_gen": norm})
        if self.guard.ok("a generator update", norm):
            self.opt.generator.step()
            if self.cfg.schedule.ema_every == "generator":
                self.update_emas()

    def update_emas(self) -> None:
        """One step of every EMA from the current generator."""
        update_emas(self.par, self.emas, self.nets["generator"])
