"""Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
Generative Models"), on Inception pool features as in ADM's evaluator and the papers' recall column.

Each set is a manifold estimate: the union of balls around its points, each ball's radius the distance to the
point's k-th nearest neighbour in its own set (k = 3). Precision = fraction of generated points inside the real
manifold; recall = fraction of real points inside the generated manifold.

Everything is computed in blocks of ``chunk_size`` x ``chunk_size`` distances, so memory stays bounded for
50,000 x 50,000 sets (the full matrix would be 10 GB in float32).
"""

from __future__ import annotations

import numpy as np
import torch


def _as_tensor(x, device, dtype) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=dtype)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Squared distances through one matrix product (as StyleGAN's / ADM's implementations do); clamp the tiny
    # negatives that cancellation leaves.
    d = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return d.clamp_min_(0)


def knn_radii(feats, k: int = 3, chunk_size: int = 4096, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour in the same set (itself excluded)."""
    x = _as_tensor(feats, device, dtype)
    n = len(x)
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N-1] = [1, {n - 1}], got {k}")
    radii = torch.empty(n, device=device, dtype=dtype)
    for i in range(0, n, chunk_size):
        rows = x[i:i + chunk_size]
        best = None  # running k+1 smallest per row (the point itself is one of them, at distance 0)
        for j in range(0, n, chunk_size):
            d = _sq_dists(rows, x[j:j + chunk_size])
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(cand, min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[i:i + chunk_size] = best[:, k]
    return radii


def coverage(queries, manifold, radii: torch.Tensor, chunk_size: int = 4096, device="cpu",
             dtype=torch.float32) -> torch.Tensor:
    """Boolean per query: inside at least one ball (centre ``manifold[j]``, squared radius ``radii[j]``)."""
    q = _as_tensor(queries, device, dtype)
    m = _as_tensor(manifold, device, dtype)
    inside = torch.zeros(len(q), dtype=torch.bool, device=device)
    for i in range(0, len(q), chunk_size):
        rows = q[i:i + chunk_size]
        hit = torch.zeros(len(rows), dtype=torch.bool, device=device)
        for j in range(0, len(m), chunk_size):
            d = _sq_dists(rows, m[j:j + chunk_size])
            hit |= (d <= radii[None, j:j + chunk_size]).any(dim=1)
        inside[i:i + chunk_size] = hit
    return inside


def precision_recall(real_feats, fake_feats, k: int = 3, chunk_size: int = 4096, device="cpu",
                     dtype=torch.float32) -> dict:
    """Improved precision and recall with k-NN manifolds; returns ``{"precision", "recall", "k", ...}``.

    ``real_feats`` [N, D], ``fake_feats`` [M, D] (numpy or torch). ``chunk_size`` bounds memory at about
    ``chunk_size**2`` distances per block. ``device="cuda"`` for 50k-sample sets.
    """
    real = _as_tensor(real_feats, device, dtype)
    fake = _as_tensor(fake_feats, device, dtype)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape[1]}, fake {fake.shape[1]}")
    for name, x in (("reference", real), ("generated", fake)):
        if not 1 <= k < len(x):
            raise ValueError(f"precision/recall with k={k} needs more than {k} {name} images, got {len(x)}; use "
                             f"more images (the paper's protocol: 50,000) or a smaller --k")
    real_r = knn_radii(real, k, chunk_size, device, dtype)
    fake_r = knn_radii(fake, k, chunk_size, device, dtype)
    # Exact fractions (count / n), not a float32 mean.
    precision = coverage(fake, real, real_r, chunk_size, device, dtype).sum().item() / len(fake)
    recall = coverage(real, fake, fake_r, chunk_size, device, dtype).sum().item() / len(real)
    return {"precision": precision, "recall": recall, "k": k, "num_real": len(real), "num_fake": len(fake)}
