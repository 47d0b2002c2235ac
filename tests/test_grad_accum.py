"""Gradient accumulation (optim.grad_accum): two micro-batches of B give the update of one batch of 2B.

The training iteration's accumulate_gradients runs on the real objective and networks of the toy. The objective's random
draws (noise levels, noise) are recorded on the 2B batch and served to the micro-batches as their halves, so
both see the same samples; what is compared is the accumulation itself (loss scaling, gradient sums). That is
exact (up to float rounding) when nothing depends on the batch's composition: the ratio normaliser off. With it
on, each micro-batch is normalised by itself (documented on optim.grad_accum).

This is one process: accumulate_gradients enters accelerator.no_sync, but there it does nothing (no gradient is
communicated), so no_sync is not tested here. tests/test_fsdp.py runs two micro-batches on two processes, where
it holds the synchronisation back: both processes end with the same networks, and DDP, FSDP1 and FSDP2 agree.
"""

from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from fdistill.config import load_config
from fdistill.denoisers import as_sigma
from fdistill.divergences import get_divergence
from fdistill.objective import FDistill
from fdistill.pipelines import build_task
from fdistill.ratio import RatioNormalizer
from fdistill.parallel import Parallel
from fdistill.iteration import accumulate_gradients

ROOT = Path(__file__).resolve().parents[1]
B = 32


class Replay:
    """Records the objective's random draws on the full batch, then serves each micro-batch its slice."""

    def __init__(self, objective):
        self.mode, self.calls, self.k, self.lo, self.hi = "record", [], 0, 0, 0
        sched = objective.schedule
        for name in ("sample_dm", "sample_denoise"):
            fn = getattr(sched, name)
            setattr(sched, name, lambda n, rng=None, device="cpu", fn=fn: self._draw(lambda: fn(n, rng, device)))
        noise = objective._noise

        def _noise(x, sigma, rng):
            eps = self._draw(lambda: noise(x, sigma, rng)[1])
            return x + as_sigma(sigma, x) * eps, eps

        objective._noise = _noise

    def _draw(self, fn):
        if self.mode == "record":
            self.calls.append(fn())
            return self.calls[-1]
        self.k += 1
        return self.calls[self.k - 1][self.lo:self.hi]

    def micro(self, lo, hi):
        self.mode, self.k, self.lo, self.hi = "replay", 0, lo, hi


def _setup(normalize: bool):
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/toy2d.yaml", ["task.hidden=32", "task.fake_hidden=32",
                                                    f"ratio_norm.normalize_ratio={str(normalize).lower()}",
                                                    f"ratio_norm.normalize_weight={str(normalize).lower()}"])
    task = build_task(cfg, "cpu")
    ratio = RatioNormalizer(cfg.ratio_norm, task.schedule.dm_sigma_range)
    objective = FDistill(task.generator, task.teacher, task.fake_score, task.discriminator,
                         get_divergence(cfg.divergence), ratio, task.schedule, cfg.objective)
    nets = [task.generator, task.fake_score, task.discriminator]
    rng = torch.Generator().manual_seed(1)
    z = task.generator.sample_latents(2 * B, rng)
    x_real, _ = task.sample_real(2 * B, rng, "cpu")
    return task, objective, nets, z, x_real, rng


def _grads(nets):
    out = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for net in nets for p in net.parameters()]
    for net in nets:
        net.zero_grad(set_to_none=True)
    return out


def _accumulated(acc, objective, nets, kind, z, x_real, rng, n_micro):
    """Gradients of the critic or generator loss through the trainer's accumulation, and each micro-batch's logs."""
    replay, logs, i = objective._replay, [], iter(range(n_micro))

    def micro_loss():
        k = next(i)
        lo, hi = k * len(z) // n_micro, (k + 1) * len(z) // n_micro
        if n_micro > 1:
            replay.micro(lo, hi)
        if kind == "critic":
            loss, lg = objective.critic_loss(z[lo:hi], None, x_real[lo:hi], None, rng)
        else:
            loss, lg = objective.generator_loss(z[lo:hi], None, rng)
        logs.append(lg)
        return loss

    accumulate_gradients(acc, nets, n_micro, micro_loss)
    return logs


@pytest.mark.parametrize("kind", ["critic", "generator"])
def test_two_micro_batches_give_the_gradient_of_the_whole_batch(kind):
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    task, objective, nets, z, x_real, rng = _setup(normalize=False)
    objective._replay = Replay(objective)
    _accumulated(acc, objective, nets, kind, z, x_real, rng, 1)  # records the draws
    norm_full = [Parallel(acc).grad_norm(net, 0.0) for net in nets]
    full = _grads(nets)
    _accumulated(acc, objective, nets, kind, z, x_real, rng, 2)
    norm_acc = [Parallel(acc).grad_norm(net, 0.0) for net in nets]
    acc2 = _grads(nets)
    assert sum(g.abs().sum() for g in full) > 0
    for a, b in zip(full, acc2):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    for a, b in zip(norm_full, norm_acc):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)

    # and the AdamW step that follows is the same update; its first step is about lr * g / |g|, which turns the
    # float rounding of gradients near zero into differences of up to a few 1e-3 of lr
    params = [p for net in nets for p in net.parameters()]
    before = [p.detach().clone() for p in params]
    after = []
    for grads in (full, acc2):
        with torch.no_grad():
            for p, b0, g in zip(params, before, grads):
                p.copy_(b0)
                p.grad = g.clone()
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
        opt.step()
        after.append([p.detach().clone() for p in params])
    for a, b in zip(*after):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-2 * 1e-3)


def test_with_the_ratio_normaliser_each_micro_batch_is_normalised_by_itself():
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    task, objective, nets, z, x_real, rng = _setup(normalize=True)
    objective._replay = Replay(objective)
    _accumulated(acc, objective, nets, "generator", z, x_real, rng, 1)
    full = _grads(nets)
    logs = _accumulated(acc, objective, nets, "generator", z, x_real, rng, 2)
    acc2 = _grads(nets)
    for lg in logs:  # stage 2: mean h = 1 within each micro-batch
        assert abs(float(lg["h_mean"]) - 1) < 1e-5
    assert any(not torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(full, acc2))
