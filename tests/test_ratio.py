import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fdistill.divergences import get_divergence
from fdistill.ratio import RatioConfig, RatioNormalizer

RANGE = (0.01, 80.0)


def _batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, generator=g) * 3
    sigma = torch.exp(torch.empty(n).uniform_(math.log(RANGE[0]), math.log(RANGE[1]), generator=g))
    return logits, sigma


def test_clamps():
    rn = RatioNormalizer(RatioConfig(logit_clamp=2.0, r_min=0.5, r_max=3.0), RANGE)
    r = rn.ratio(torch.tensor([-100.0, -1.0, 0.0, 1.0, 100.0]))
    torch.testing.assert_close(r, torch.tensor([0.5, 0.5, 1.0, math.e, 3.0]))
    rn = RatioNormalizer(RatioConfig(logit_clamp=1.0, r_min=0.0, r_max=100.0), RANGE)
    assert float(rn.ratio(torch.tensor([50.0]))) == pytest.approx(math.e)


def test_stage1_makes_every_bin_mean_one_and_stage2_makes_mean_h_one():
    logits, sigma = _batch(512)
    cfg = RatioConfig(normalize_weight=False)
    rn = RatioNormalizer(cfg, RANGE)
    # forward_kl: h = r, so h shows the stage-1 normalised r directly
    h, _ = rn(logits, sigma, get_divergence("forward_kl"))
    idx = rn.bin_index(sigma)
    for b in idx.unique():
        assert float(h[idx == b].mean()) == pytest.approx(1.0, rel=1e-5)
    assert rn.bin_seen[idx.unique()].all()
    rn2 = RatioNormalizer(RatioConfig(), RANGE)
    h2, stats = rn2(logits, sigma, get_divergence("js"))
    assert float(h2.mean()) == pytest.approx(1.0, rel=1e-6)
    assert 0 < float(stats["h_ess"]) <= 1


def test_switches_off_give_raw_weights():
    logits, sigma = _batch()
    rn = RatioNormalizer(RatioConfig(normalize_ratio=False, normalize_weight=False), RANGE)
    h, _ = rn(logits, sigma, get_divergence("js"))
    r = torch.exp(logits.clamp(-10, 10)).clamp(0.1, 20)
    torch.testing.assert_close(h, r / (r + 1))


def test_bin_ema_and_state_dict_roundtrip():
    logits, sigma = _batch(256, 1)
    cfg = RatioConfig(bin_ema=0.5, normalize_weight=False)
    rn = RatioNormalizer(cfg, RANGE)
    rn(logits, sigma, get_divergence("forward_kl"))
    first = rn.bin_mean.clone()
    logits2 = logits + 1.0  # every r larger by e (within the clamps mostly)
    rn(logits2, sigma, get_divergence("forward_kl"))
    idx = rn.bin_index(sigma)
    b = int(idx[0])
    r2 = rn.ratio(logits2)
    expected = 0.5 * first[b] + 0.5 * r2[idx == b].mean()
    assert float(rn.bin_mean[b]) == pytest.approx(float(expected), rel=1e-5)
    # the bins are state: a fresh normaliser loaded from the state dict gives the same weights
    rn3 = RatioNormalizer(cfg, RANGE)
    rn3.load_state_dict(rn.state_dict())
    h_a, _ = rn(logits, sigma, get_divergence("js"), update=False)
    h_b, _ = rn3(logits, sigma, get_divergence("js"), update=False)
    torch.testing.assert_close(h_a, h_b)


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _worker(rank, world, port, logits, sigma, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        n = len(logits[0]) // world
        rn = RatioNormalizer(RatioConfig(bin_ema=0.5), RANGE)
        for step in range(2):  # the second step exercises the EMA'd, all-reduced bin means
            sl = slice(rank * n, (rank + 1) * n)
            h, _ = rn(logits[step][sl], sigma[step][sl], get_divergence("jeffreys"))
        out[rank] = torch.cat([h, rn.bin_mean])
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_on_concatenated_batch():
    b1, b2 = _batch(64, 3), _batch(64, 4)
    logits, sigma = [b1[0], b2[0]], [b1[1], b2[1]]
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    out = manager.dict()
    mp.start_processes(_worker, args=(2, _free_port(), logits, sigma, out), nprocs=2, start_method="spawn")
    rn = RatioNormalizer(RatioConfig(bin_ema=0.5), RANGE)
    for step in range(2):
        h, _ = rn(logits[step], sigma[step], get_divergence("jeffreys"))
    torch.testing.assert_close(torch.cat([out[0][:32], out[1][:32]]), h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0][32:], rn.bin_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1][32:], rn.bin_mean, rtol=1e-5, atol=1e-6)
