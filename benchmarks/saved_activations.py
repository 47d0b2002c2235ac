"""Activation memory of the generator iteration: what autograd keeps for backward.

    python benchmarks/saved_activations.py --config mnist [--batch 32]
    python benchmarks/saved_activations.py --config imagenet64 --tiny     # ADM at toy width (CPU)
    python benchmarks/saved_activations.py --config sd15 --tiny           # SD1.5 UNet + CFG at toy width (CPU)
    python benchmarks/saved_activations.py --config imagenet64 --batch 1 [--bf16]   # full-size ADM (~10 GB RAM)

Counts the bytes of the distinct storages autograd saves (torch.autograd.graph.saved_tensors_hooks), parameters
and their autocast copies excluded, during one generator loss, and during the teacher's pass alone with and without ``x0_grad``: the generator iteration needs the teacher's
x0 only as a constant, so its decoder need not keep a graph (``mode="both", x0_grad=False``, what the objective
uses). Bytes, not peak memory: exact and the same on any device.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tasks import build_task  # noqa: E402  (the benchmarks' shared task builder)

from fdistill.divergences import get_divergence  # noqa: E402
from fdistill.objective import FDivergenceObjective  # noqa: E402
from fdistill.ratio import RatioNormalizer  # noqa: E402


def saved_bytes(fn, params: list) -> int:
    """Bytes of the distinct storages autograd saves while fn runs (a tensor saved by several ops counts once),
    without the networks' parameters and autocast's bf16 copies of them (same shapes), which are not activations."""
    exclude = {p.untyped_storage().data_ptr() for p in params}
    shapes = {tuple(p.shape) for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude and tuple(t.shape) not in shapes:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="mnist", choices=["tiny", "mnist", "imagenet64", "sd15"])
    p.add_argument("--tiny", action="store_true", help="toy-width networks (imagenet64 / sd15)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="under bf16 autocast, as the trainer on a GPU")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    over = [f"batch_size={a.batch}"] if a.batch else []
    with tempfile.TemporaryDirectory() as tmp:
        task, cfg = build_task(a.config, a.tiny, torch.device("cpu"), Path(tmp), over)
    ratio = RatioNormalizer(cfg.ratio_norm, task.schedule.ratio_bin_range(cfg.ratio_norm.bin_spacing))
    obj = FDivergenceObjective(task.generator, task.teacher, task.fake_score, task.discriminator,
                               get_divergence("js"), ratio, task.schedule, cfg.objective)
    B = cfg.batch_size
    rng = torch.Generator().manual_seed(0)
    z = task.generator.sample_latents(B, rng)
    cond = task.sample_cond(B, rng, "cpu")
    params = [p for net in (task.generator, task.teacher, task.fake_score, task.discriminator)
              for p in net.parameters()]
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16)
    with amp:
        total = saved_bytes(lambda: obj.generator_loss(z, cond, rng), params)

    with torch.no_grad():
        x = task.generator(z, cond)
    x = x.requires_grad_(True)
    sigma = task.schedule.sample_dm(B, rng)
    x_t = x + sigma.reshape(-1, *[1] * (x.ndim - 1)) * torch.randn_like(x)
    with amp:
        teacher = {g: saved_bytes(lambda: task.teacher(x_t, sigma, cond, mode="both", x0_grad=g), params)
                   for g in (True, False)}
    mb = 2 ** 20
    out = {"config": a.config, "tiny": a.tiny, "batch": B, "bf16": a.bf16,
           "generator_loss_saved_MB": round(total / mb, 2),
           "teacher_both_saved_MB": round(teacher[True] / mb, 2),
           "teacher_both_no_x0_grad_saved_MB": round(teacher[False] / mb, 2),
           "generator_loss_saved_MB_before": round((total + teacher[True] - teacher[False]) / mb, 2)}
    out["reduction"] = round(1 - out["generator_loss_saved_MB"] / out["generator_loss_saved_MB_before"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
