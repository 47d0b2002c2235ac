"""Which toy generator can follow the distribution-matching gradient? (why the 2-D toy's default is 'anchors')

Drives each generator with the reverse-KL / DMD gradient of the toy, but with the *exact* fake score of the
current student (a kernel density estimate of 2,048 fresh samples, denoised in closed form) instead of a learned
one: no critic, so what is left is how fast the network itself can take the shape of the mixture.

    python benchmarks/toy2d_generators.py [--steps 800] [--seeds 0 1 2]

Prints off_mode_fraction / mode_mass_tv every 200 steps for the plain MLP and the anchor generator.
"""
import argparse
import math
import time

import torch

from fdistill.generator import MLPGenerator
from fdistill.pipelines.toy2d import AnchorGenerator, mode_metrics, ring_gmm


def kde_denoise(x_t, sigma, xs, bandwidth):
    """E[x0 | x_t] when x0 ~ (1/N) sum_i N(xs_i, bandwidth^2 I), x_t = x0 + sigma eps."""
    var = sigma.reshape(-1, 1) ** 2 + bandwidth ** 2
    w = torch.softmax(-0.5 * torch.cdist(x_t, xs) ** 2 / var, dim=1)
    post = (sigma.reshape(-1, 1, 1) ** 2 * xs[None] + bandwidth ** 2 * x_t[:, None, :]) / var[:, :, None]
    return (w[..., None] * post).sum(1)


def run(kind, seed, steps, batch=256, lr=3e-3, sigma_min=0.05, sigma_max=8.0, bandwidth=0.05):
    torch.manual_seed(seed)
    gmm = ring_gmm()
    gen = AnchorGenerator(8, 2, 256, 64, 3.0) if kind == "anchors" else MLPGenerator(8, 2, 256, depth=4)
    opt = torch.optim.Adam(gen.parameters(), lr=lr)
    rows, t0 = [], time.time()
    for step in range(steps + 1):
        x = gen(gen.sample_latents(batch))
        sigma = torch.exp(math.log(sigma_min) + torch.rand(batch) * math.log(sigma_max / sigma_min))
        x_t = x.detach() + sigma[:, None] * torch.randn(batch, 2)
        with torch.no_grad():
            x0_fake = kde_denoise(x_t, sigma, gen(gen.sample_latents(2048)), bandwidth)
            x0_real = gmm.denoise(x_t, sigma)
            g = (x0_fake - x0_real) / (x.detach() - x0_real).abs().mean(1, keepdim=True)  # DMD's normaliser
        loss = 0.5 * ((x - (x.detach() - g)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 and step:
            with torch.no_grad():
                m = mode_metrics(gen(gen.sample_latents(8000)), gmm)
            rows.append((step, m["off_mode_fraction"], m["mode_mass_tv"]))
            print(f"{kind:8s} seed {seed} step {step:5d}  off_mode {m['off_mode_fraction']:.3f}  "
                  f"tv {m['mode_mass_tv']:.3f}  ({time.time() - t0:.0f} s)", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for kind in ("mlp", "anchors"):
        for s in a.seeds:
            run(kind, s, a.steps)


if __name__ == "__main__":
    main()
