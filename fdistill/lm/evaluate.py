"""Reward and diversity of a policy on a prompt set with a verifier.

Per prompt, n samples from the policy; reported as means over prompts:
    reward      mean verifier reward (pass@1)
    distinct    distinct correct responses among the n samples (the toy has 21-75 correct answers per prompt)
    entropy     Monte-Carlo sequence entropy -E[log pi(y|x)] in nats (the samples' own log-probs)
    pass@k      the unbiased estimator 1 - C(n-c, k) / C(n, k) of Chen et al. 2021 (c correct of n)
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from fdistill.lm.data import encode_prompt
from fdistill.lm.modeling import response_texts, sample, token_logps_of


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k draws without replacement from n samples, c of them correct, is correct)."""
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


@torch.no_grad()
def evaluate_policy(model, tok, prompts: list[str], verifier: Callable[[str, str], float], n: int = 32,
                    k: int = 8, max_new_tokens: int = 5, groups: dict[str, list[str]] | None = None,
                    seed: int = 1234, chunk: int = 512) -> dict:
    """Metrics over all prompts, and per named group of prompts (e.g. near-perfect / exploration).
    k is capped at n (reported as ``out["k"]``)."""
    k = min(k, n)
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    was_training = model.training
    model.eval()
    per_prompt = {}
    flat = [(p, encode_prompt(tok, p)) for p in prompts for _ in range(n)]
    texts, logps = [], []
    for start in range(0, len(flat), chunk):
        part = flat[start:start + chunk]
        batch = sample(model, [ids for _, ids in part], max_new_tokens, tok.eos_token_id, tok.pad_token_id,
                       generator=g)
        lp, _ = token_logps_of(model, batch)
        texts += response_texts(tok, batch)
        logps += lp.sum(-1).tolist()
    for i, p in enumerate(prompts):
        ys = texts[i * n:(i + 1) * n]
        rewards = [float(verifier(p, y)) for y in ys]
        c = sum(r >= 1.0 for r in rewards)
        per_prompt[p] = {
            "reward": sum(rewards) / n,
            "distinct": len({y for y, r in zip(ys, rewards) if r >= 1.0}),
            "distinct_all": len(set(ys)),
            "entropy": -sum(logps[i * n:(i + 1) * n]) / n,
            f"pass@{k}": pass_at_k(n, c, k),
        }
    model.train(was_training)

    def mean_over(ps):
        keys = next(iter(per_prompt.values())).keys()
        return {key: sum(per_prompt[p][key] for p in ps) / len(ps) for key in keys} if ps else {}

    out = {"all": mean_over(prompts), "n": n, "k": k}
    for name, ps in (groups or {}).items():
        out[name] = mean_over([p for p in ps if p in per_prompt])
    out["per_prompt"] = per_prompt
    return out
