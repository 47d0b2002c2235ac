"""``fdistill lm demo``: pretrain the toy GPT-2 on the digit-sum language, align it with f-DPO, TDPO, f-DPG and
DPH-RL under several divergences, and tabulate reward against diversity.

Everything runs on CPU in a few minutes; the pretrained base model is cached in ``<out>/base``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch

from fdistill.lm import toy
from fdistill.lm.config import DemoConfig, DPHConfig, DPOConfig, FDPGConfig, TDPOConfig, dump_yaml
from fdistill.lm.data import write_jsonl
from fdistill.lm.evaluate import evaluate_policy
from fdistill.lm.modeling import load_causal_lm
from fdistill.lm.trainers import train_dph, train_dpo, train_fdpg


def _slug(name: str) -> str:
    return name.replace(":", "").replace("=", "")


def _row(method: str, divergence: str, ev: dict, seconds: float, k: int) -> dict:
    a, c, n = ev["all"], ev.get("clean", {}), ev.get("noisy", {})
    row = {"method": method, "divergence": divergence, "reward": a["reward"], "distinct": a["distinct"],
           "entropy": a["entropy"], f"pass@{k}": a[f"pass@{k}"],
           "clean_reward": c.get("reward"), "clean_distinct": c.get("distinct"),
           "noisy_reward": n.get("reward"), "noisy_distinct": n.get("distinct"), "seconds": round(seconds, 1)}
    if "near_perfect" in ev and ev["near_perfect"]:
        row["near_perfect_distinct"] = ev["near_perfect"]["distinct"]
    return row


def _ideal_row(n: int, k: int) -> dict:
    """The corpus's own answer distribution restricted to correct answers (uniform over a target's m answers),
    which is also f-DPG's target p ~ a(y|x) 1[correct]: expected distinct answers among n samples is
    m (1 - (1 - 1/m)^n), entropy log m. What full reward with full diversity looks like."""
    def mean(fn):
        return sum(fn(len(toy.solutions(t)), toy.is_clean(t)) for t in toy.TARGETS) / len(toy.TARGETS)

    def group(clean):
        ts = [t for t in toy.TARGETS if toy.is_clean(t) == clean]
        return sum(len(toy.solutions(t)) * (1 - (1 - 1 / len(toy.solutions(t))) ** n) for t in ts) / len(ts)

    distinct = mean(lambda m, _: m * (1 - (1 - 1 / m) ** n))
    return {"method": "uniform over correct answers (reference point)", "divergence": "-", "reward": 1.0,
            "distinct": distinct, "entropy": mean(lambda m, _: math.log(m)), f"pass@{k}": 1.0, "clean_reward": 1.0,
            "clean_distinct": group(True), "noisy_reward": 1.0, "noisy_distinct": group(False), "seconds": 0.0}


def format_table(rows: list[dict], k: int, n: int) -> str:
    head = (f"| method | divergence | reward | distinct correct (of {n}) | entropy (nats) | pass@{k} "
            f"| even targets: reward / distinct | odd targets: reward / distinct | time (s) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['method']} | {r['divergence']} | {r['reward']:.3f} | {r['distinct']:.1f} | "
                     f"{r['entropy']:.2f} | {r[f'pass@{k}']:.3f} | {r['clean_reward']:.2f} / {r['clean_distinct']:.1f} "
                     f"| {r['noisy_reward']:.2f} / {r['noisy_distinct']:.1f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def run_demo(cfg: DemoConfig, log: Callable | None = print) -> dict:
    t_start = time.time()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    say = log or (lambda *_: None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.yaml").write_text(dump_yaml(cfg))
    if not 0 < cfg.pass_k <= cfg.eval_samples:
        raise ValueError(f"pass_k ({cfg.pass_k}) must be between 1 and eval_samples ({cfg.eval_samples})")
    unknown = set(cfg.methods) - {"fdpo", "tdpo", "fdpg", "dph"}
    if unknown:
        raise ValueError(f"unknown demo method(s) {sorted(unknown)}; choose from fdpo, tdpo, fdpg, dph")

    t0 = time.time()
    base = toy.ensure_base_model(out / "base", steps=cfg.pretrain_steps, seed=cfg.seed, log=say)
    base_seconds = time.time() - t0
    prompts = toy.prompts()
    groups = {"clean": [p for p in prompts if toy.is_clean(toy.target_of(p))],
              "noisy": [p for p in prompts if not toy.is_clean(toy.target_of(p))]}
    ev = evaluate_policy(load_causal_lm(str(base)), toy.tokenizer(), prompts, toy.verify, n=cfg.eval_samples,
                         k=cfg.pass_k, max_new_tokens=toy.MAX_NEW_TOKENS, groups=groups, seed=cfg.seed)
    rows = [_ideal_row(cfg.eval_samples, cfg.pass_k), _row("base model (pretrained)", "-", ev, base_seconds, cfg.pass_k)]
    say(f"[demo] base model: reward {ev['all']['reward']:.3f}, distinct {ev['all']['distinct']:.1f}")

    common = dict(model=str(base), seed=cfg.seed, eval_samples=cfg.eval_samples, eval_k=cfg.pass_k,
                  eval_prompts="toy", threads=cfg.threads, log_every=max(1, cfg.dpo_steps // 3),
                  max_new_tokens=toy.MAX_NEW_TOKENS)
    pairs = out / "pairs.jsonl"
    write_jsonl(pairs, toy.preference_pairs(cfg.dpo_pairs, seed=cfg.seed))


    runs: list[tuple[str, str, Callable, object]] = []
    if "fdpo" in cfg.methods:
        for d in cfg.fdpo_divergences:
            runs.append(("f-DPO", d, train_dpo, DPOConfig(
                out=str(out / f"fdpo-{_slug(d)}"), data=str(pairs), divergence=d, steps=cfg.dpo_steps,
                lr=cfg.dpo_lr, beta=cfg.dpo_beta, **common)))
    if "tdpo" in cfg.methods:
        for v in cfg.tdpo_variants:
            runs.append((f"TDPO{v}", "seq. KL(ref‖π)", train_dpo, TDPOConfig(
                out=str(out / f"tdpo{v}"), data=str(pairs), variant=int(v), steps=cfg.dpo_steps, lr=cfg.dpo_lr,
                beta=cfg.dpo_beta, **common)))
    if "fdpg" in cfg.methods:
        for d in cfg.fdpg_divergences:
            runs.append(("f-DPG (GDC: a·1[correct])", d, train_fdpg, FDPGConfig(
                out=str(out / f"fdpg-{_slug(d)}"), prompts="toy", target="gdc", scorer="fdistill.lm.toy:verify",
                divergence=d, steps=cfg.fdpg_steps, lr=cfg.fdpg_lr, **common)))
    if "dph" in cfg.methods:
        for d in cfg.dph_divergences:
            label = "GRPO (no KL)" if d == "none" else "DPH-RL"
            runs.append((label, "-" if d == "none" else d, train_dph, DPHConfig(
                out=str(out / f"dph-{_slug(d)}"), prompts="toy", verifier="fdistill.lm.toy:verify", divergence=d,
                steps=cfg.dph_steps, lr=cfg.dph_lr, eta=cfg.dph_eta, **common)))

    for method, div, train, run_cfg in runs:
        say(f"[demo] {method} {div} ...")
        res = train(run_cfg, log=None)
        rows.append(_row(method, div, res["eval"], res["seconds"], cfg.pass_k))
        r = rows[-1]
        say(f"[demo]   reward {r['reward']:.3f}  distinct {r['distinct']:.1f}  entropy {r['entropy']:.2f}  "
            f"({r['seconds']:.0f}s)")

    table = format_table(rows, cfg.pass_k, cfg.eval_samples)
    total = time.time() - t_start
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"rows": rows, "seconds": round(total, 1)}, indent=1))
    say("\n" + table)
    say(f"\n[demo] {len(runs)} runs in {total:.0f}s; table in {out / 'table.md'}")
    return {"rows": rows, "table": table, "seconds": total}
