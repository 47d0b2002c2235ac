"""Peak host memory of one f-distill generator iteration on the full-size SD3.5-Medium transformer, with and without
LoRA students (random weights, bf16, CPU, batch 1; text embeddings random of the real shapes).

    python benchmarks/lora_memory.py --mode lora      # generator and fake score: rank-64 adapters on one base
    python benchmarks/lora_memory.py --mode full      # generator: a trainable copy; teacher: the frozen base

Run each mode in its own process (peak RSS is per process). ``full`` holds the generator copy and the teacher;
the fake score (a third copy, used without gradient in this iteration) shares the teacher's weights here to keep
the measurement within a shared 24 GB host: its weights (parameter count x 2 bytes) are added to the reported
total and marked as added. AdamW moments are not part of an iteration's peak: they are listed separately
(2 x fp32 per trainable parameter).

Architecture: stabilityai/stable-diffusion-3.5-medium's transformer config (24 MMDiT-X blocks, 24 heads of 64,
dual attention in blocks 0-12, RMS q/k norm, joint attention width 4096, pooled 2048, 16 latent channels).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time

import torch


def sd35_medium_transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                                 num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                                 pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                                 dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")


def rss_gb() -> float:
    """Peak resident set size of this process so far (GB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 30


def main(argv=None):
    from fdistill.denoisers import freeze
    from fdistill.denoisers_flow import FlowMatchDenoiser
    from fdistill.generator import OneStepGenerator
    from fdistill.lora import LoraSpec, lora_networks
    from fdistill.pipelines.diffusers_t2i import default_lora_targets

    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["lora", "full"], required=True)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--text-tokens", type=int, default=333, help="77 CLIP + 256 T5 tokens (SD3's default)")
    p.add_argument("--checkpointing", action="store_true")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.time()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: an fp32 build would set the peak (9 GB) by itself
    net = sd35_medium_transformer()
    torch.set_default_dtype(torch.float32)
    n_base = sum(q.numel() for q in net.parameters())
    mk = lambda n: FlowMatchDenoiser(n)  # noqa: E731
    added = 0.0
    if a.mode == "lora":
        gen_den, fake, teacher = lora_networks(net, LoraSpec(a.rank, a.rank, default_lora_targets("sd3")), mk,
                                               gradient_checkpointing=a.checkpointing)
        trainable = sum(q.numel() for q in gen_den.parameters())
    else:
        import copy

        gnet = copy.deepcopy(net).requires_grad_(True)
        if a.checkpointing:
            gnet.enable_gradient_checkpointing()
        gen_den = mk(gnet).train()
        teacher = freeze(mk(net))
        fake = teacher  # its own copy would add the same weights again: added below, not allocated
        added = n_base * 2 / 2 ** 30
        trainable = n_base
    lat = a.resolution // 8
    gen = OneStepGenerator(gen_den, math.inf, (16, lat, lat))
    cond = {"encoder_hidden_states": torch.randn(1, a.text_tokens, 4096, dtype=torch.bfloat16),
            "pooled_projections": torch.randn(1, 2048, dtype=torch.bfloat16)}
    after_build = current_rss_gb()
    # one generator iteration: x = G(z); the teacher's x0 and features and the fake score's x0 at one sigma (no
    # grad into the critics); backward into the generator (the f-distill loss's gradient reaches x only)
    z = torch.randn(1, 16, lat, lat)
    x = gen(z, cond)
    sigma = 1.5
    x_t = x + sigma * torch.randn_like(x)
    x0_real, feats = teacher(x_t, sigma, cond, mode="both", x0_grad=False)
    with torch.no_grad():
        x0_fake = fake(x_t, sigma, cond)
    g = (x0_fake - x0_real).detach()
    loss = 0.5 * ((x - (x - g).detach()) ** 2).mean() + 1e-3 * feats[0].float().mean()
    loss.backward()
    peak = rss_gb()
    print(json.dumps({"mode": a.mode, "resolution": a.resolution, "rank": a.rank if a.mode == "lora" else 0,
                      "checkpointing": a.checkpointing, "base_params": n_base, "trainable_params": trainable,
                      "peak_rss_gb_measured": round(peak, 2), "rss_after_build_gb": round(after_build, 2),
                      "fake_copy_gb_added": round(added, 2), "peak_gb_total": round(peak + added, 2),
                      "adamw_moments_gb": round(trainable * 8 / 2 ** 30, 2), "seconds": round(time.time() - t0, 1),
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
