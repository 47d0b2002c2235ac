"""Sampling: the one-step generator, and the teacher's multi-step EDM sampler (the baseline).

The EDM sampler is Heun's 2nd-order method on the probability-flow ODE over the Karras sigma steps
(Karras et al. 2022, Algorithm 1, deterministic: S_churn = 0), costing 2 * num_steps - 1 network evaluations.
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


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float NCHW -> uint8 NHWC (EDM's convention)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_grid(images: torch.Tensor, path, nrow: int = 10, pad: int = 2, titles: list[str] | None = None):
    """Save [-1, 1] NCHW images as one PNG grid; several grids side by side if ``images`` is a list."""
    from PIL import Image, ImageDraw

    groups = images if isinstance(images, (list, tuple)) else [images]
    tiles = []
    for g in groups:
        u8 = to_uint8(g).numpy()
        n, h, w, c = u8.shape
        rows = (n + nrow - 1) // nrow
        canvas = Image.new("RGB", (nrow * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
        for i in range(n):
            im = Image.fromarray(u8[i, :, :, 0] if c == 1 else u8[i], "L" if c == 1 else "RGB").convert("RGB")
            canvas.paste(im, (pad + (i % nrow) * (w + pad), pad + (i // nrow) * (h + pad)))
        tiles.append(canvas)
    scale = max(1, 256 // max(t.width for t in tiles))
    tiles = [t.resize((t.width * scale, t.height * scale), Image.NEAREST) for t in tiles]
    top = 16 if titles else 0
    W = sum(t.width for t in tiles) + 8 * (len(tiles) - 1)
    H = max(t.height for t in tiles) + top
    out = Image.new("RGB", (W, H), (255, 255, 255))
    xoff = 0
    draw = ImageDraw.Draw(out)
    for i, t in enumerate(tiles):
        out.paste(t, (xoff, top))
        if titles:
            draw.text((xoff + 2, 2), titles[i], fill=(0, 0, 0))
        xoff += t.width + 8
    out.save(path)
    return out
