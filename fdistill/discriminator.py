"""The discriminator: small heads on a denoiser's encoder features; logit = estimated log(p/q).

The head of DMD2 and FastGen alike (tianweiy/DMD2, NVlabs/FastGen networks/discriminators.py), on an 8x8 bottleneck:
    conv4x4 stride 2 -> GroupNorm -> SiLU -> conv4x4 stride 4 -> GroupNorm -> SiLU -> conv1x1 -> 1 logit.
Several feature maps (CIFAR-10 used 32, 16 and 8) get one head each and their logits are averaged.
Trained with the non-saturating logistic loss, whose optimum is logit = log(p_t / q_t).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn


# Fewest channels one GroupNorm group may hold. The head's second norm acts on a 1x1 map, where a group's
# statistics are taken over its channels alone: with 2 channels per group (64 channels in 32 groups, the 16x16
# MNIST teacher) every group is normalised to (-1, +1) whatever its input, the head passes on only signs, and its
# logits stay near 0 (docs/discriminator.md). 768 (ImageNet-64) and 1280 (SD1.5) channels keep 32 groups.
MIN_GROUP_CHANNELS = 16


def _groups(c: int, prefer: int = 32, min_channels: int = MIN_GROUP_CHANNELS) -> int:
    """GroupNorm groups for ``c`` channels: gcd(c, prefer) (32 as in DMD2/FastGen for wide maps), fewer where a
    group would hold under ``min_channels`` channels."""
    g = math.gcd(c, prefer) or 1
    while g > 1 and c // g < min_channels:
        g = math.gcd(c, g // 2) or 1
    return g


class ConvHead(nn.Module):
    def __init__(self, in_channels: int, resolution: int, hidden_channels: int | None = None):
        super().__init__()
        hid = hidden_channels or in_channels
        r1 = max(resolution // 2, 1)
        k2 = min(4, r1)  # stride-4 4x4 conv on an 8x8 map after the first conv; smaller maps get a smaller kernel
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hid, 4, stride=2, padding=1) if resolution >= 2 else nn.Conv2d(in_channels, hid, 1),
            nn.GroupNorm(_groups(hid), hid), nn.SiLU(),
            nn.Conv2d(hid, hid, k2, stride=k2), nn.GroupNorm(_groups(hid), hid), nn.SiLU(),
            nn.Conv2d(hid, 1, 1),
        )

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f).mean(dim=(1, 2, 3))  # maps larger than the design's 8x8 leave >1x1: average


class MLPHead(nn.Module):
    """For vector features (the 2-D toy)."""

    def __init__(self, in_features: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f.flatten(1)).squeeze(1)


class Discriminator(nn.Module):
    """One head per feature map; the logit is the mean of the heads' logits."""

    def __init__(self, heads: Sequence[nn.Module]):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    @classmethod
    def for_feature_shapes(cls, shapes: Sequence[Sequence[int]], hidden: int | None = None) -> "Discriminator":
        """Build heads from feature shapes without batch dim: (C, H, W) -> ConvHead, (D,) -> MLPHead."""
        heads = []
        for s in shapes:
            if len(s) == 3:
                heads.append(ConvHead(s[0], s[1], hidden))
            else:
                heads.append(MLPHead(int(torch.tensor(s).prod()), hidden or 128))
        return cls(heads)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(feats) != len(self.heads):
            raise ValueError(f"discriminator has {len(self.heads)} heads but got {len(feats)} feature maps")
        return torch.stack([h(f) for h, f in zip(self.heads, feats)]).mean(0)
