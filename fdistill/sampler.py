"""The samplers: the one-step generator, and the teacher's multi-step EDM sampler (the baseline); latents and
labels drawn per seed.

The EDM sampler is Heun's 2nd-order method on the probability-flow ODE over the Karras sigma steps
(Karras et al. 2022, Algorithm 1, deterministic: S_churn = 0), costing 2 * num_steps - 1 network evaluations.
Image i has seed s_i; its latent comes from torch.Generator().manual_seed(s_i) alone, so a seed gives the same
image whatever the batch size and whichever images were generated before (resumption).
"""

from __future__ import annotations

import torch

from .noise import edm_sampler_sigmas


@torch.no_grad()
def edm_sample(denoiser, latents: torch.Tensor, cond=None, num_steps: int = 18, sigma_min: float = 0.002,
               sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """x ~ teacher, starting from x = sigma_max * latents. Returns x0 in the data space."""
    t_steps = edm_sampler_sigmas(num_steps, sigma_min, sigma_max, rho).to(latents.device)
    x = latents.float() * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        d_cur = (x - denoiser(x, t_cur.expand(x.shape[0]), cond).float()) / t_cur
        x_next = x + (t_next - t_cur) * d_cur
        if i < num_steps - 1:  # Heun correction, except at the last step (to sigma = 0)
            d_next = (x_next - denoiser(x_next, t_next.expand(x.shape[0]), cond).float()) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x


def edm_nfe(num_steps: int) -> int:
    return 2 * num_steps - 1


@torch.no_grad()
def one_step_sample(generator, latents: torch.Tensor, cond=None) -> torch.Tensor:
    return generator(latents, cond).float()


def per_image_latents(seeds, shape, device="cpu") -> torch.Tensor:
    """One latent per seed, each from its own generator: the same seed gives the same image whatever the batch."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


def per_image_random_labels(seeds, shape, num_classes: int) -> torch.Tensor:
    """EDM's random class labels (generate.py): each seed's own generator draws the latent, then the label, so a
    label depends on its seed only."""
    out = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        torch.randn(shape, generator=g)  # the latent comes first from the same stream
        out.append(int(torch.randint(0, num_classes, (), generator=g)))
    return torch.tensor(out, dtype=torch.long)


class SampleSource:
    """What `fdistill sample` draws from: ``generate(seeds, records) -> uint8 NHWC`` where a record is
    {'label': int}, {'prompt': str} or {}. ``info`` identifies the weights (checked when resuming)."""

    def __init__(self, kind: str, generate, num_classes: int, info: dict, latent_shape=None):
        self.kind, self.generate, self.num_classes, self.info = kind, generate, num_classes, info
        self.latent_shape = latent_shape
