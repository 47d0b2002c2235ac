"""The embedded toy language: digit sums, a verifiable reward with many correct answers.

A prompt is a two-digit target and a colon, ``"13:"``; a response is a string of digits. The verifier
returns 1 when the response has exactly three digits summing to the target, ``"13:" -> "418"``. Every target
in 5..22 has 21 to 75 correct answers, so a policy can be right *and* diverse, and collapse is measurable:
distinct correct answers, entropy, pass@k.

The pretraining corpus is a mixture, like web text: for *even* targets it is clean (every document is a
uniformly drawn correct answer), for *odd* targets only a quarter of the documents are correct and the rest are
random three-digit strings. The pretrained model is therefore near-perfect on half of the prompts and poor on
the other half, which is the situation DPH-RL's split into near-perfect and exploration prompts is made for,
and whose correct answers are spread uniformly, so the base model is as diverse as it can be.

The model is a GPT-2 built from a config (2 layers, width 64, ~0.1M parameters) and trained from scratch on
CPU for about a minute; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from fdistill.lm.losses import token_logps
from fdistill.lm.modeling import build_batch, forward_logits
from fdistill.lm.tokenizer import CharTokenizer

ALPHABET = "0123456789:"
TARGETS = tuple(range(5, 23))
RESPONSE_DIGITS = 3
NOISY_CORRECT_FRACTION = 0.25  # share of correct documents for odd targets in the pretraining corpus
MAX_NEW_TOKENS = RESPONSE_DIGITS + 2  # room for one digit too many, then eos


def tokenizer() -> CharTokenizer:
    return CharTokenizer(ALPHABET)


def prompt_for(target: int) -> str:
    return f"{target:02d}:"


def prompts() -> list[str]:
    return [prompt_for(s) for s in TARGETS]


def is_clean(target: int) -> bool:
    return target % 2 == 0


def target_of(prompt: str) -> int:
    return int(prompt.strip().rstrip(":"))


def verify(prompt: str, response: str) -> float:
    """The verifiable reward: 1.0 iff the response is exactly three digits that sum to the prompt's target."""
    if len(response) != RESPONSE_DIGITS or not response.isdigit():
        return 0.0
    return float(sum(int(c) for c in response) == target_of(prompt))


def solutions(target: int) -> list[str]:
    return [f"{i:03d}" for i in range(10 ** RESPONSE_DIGITS) if sum(map(int, f"{i:03d}")) == target]


def sample_document(rng: random.Random, target: int | None = None) -> tuple[str, str]:
    """One pretraining document (prompt, response) from the mixture described in the module docstring."""
    t = rng.choice(TARGETS) if target is None else target
    if is_clean(t) or rng.random() < NOISY_CORRECT_FRACTION:
        return prompt_for(t), rng.choice(_SOLUTIONS[t])
    return prompt_for(t), "".join(rng.choice("0123456789") for _ in range(RESPONSE_DIGITS))


_SOLUTIONS = {t: solutions(t) for t in TARGETS}


def preference_pairs(n: int, seed: int = 0) -> list[dict]:
    """``{prompt, chosen, rejected}`` pairs: a correct answer against a wrong one, drawn from the corpus mixture
    (wrong answers are random strings, as in the noisy documents)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        t = rng.choice(TARGETS)
        wrong = "".join(rng.choice("0123456789") for _ in range(RESPONSE_DIGITS))
        if sum(map(int, wrong)) == t:
            continue
        out.append({"prompt": prompt_for(t), "chosen": rng.choice(_SOLUTIONS[t]), "rejected": wrong})
    return out


def build_model(tok: CharTokenizer | None = None, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tok or tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     n_inner=4 * n_embd, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def _corpus_batch(tok: CharTokenizer, rng: random.Random, batch_size: int):
    docs = [sample_document(rng) for _ in range(batch_size)]
    return build_batch([tok.encode(p) for p, _ in docs],
                       [tok.encode(r, add_special_tokens=False) + [tok.eos_token_id] for _, r in docs],
                       tok.pad_token_id)


def pretrain(out_dir: str | Path, steps: int = 1500, batch_size: int = 128, lr: float = 3e-3, seed: int = 0,
             n_layer: int = 2, n_embd: int = 64, log=print) -> Path:
    """Train the toy GPT-2 from scratch on the corpus mixture (response tokens only) and save it with
    ``save_pretrained`` beside its tokenizer. Returns the directory."""
    out_dir = Path(out_dir)
    tok = tokenizer()
    model = build_model(tok, n_layer=n_layer, n_embd=n_embd, seed=seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        batch = _corpus_batch(tok, rng, batch_size)
        lp, mask = token_logps(forward_logits(model, batch), batch.labels())
        loss = -(lp.sum() / mask.sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and (step % max(1, steps // 10) == 0 or step == 1):
            log(f"pretrain step {step}/{steps}  nll/token {loss.item():.4f}  ({time.time() - t0:.0f}s)")
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    meta = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "n_layer": n_layer,
            "n_embd": n_embd, "targets": list(TARGETS), "noisy_correct_fraction": NOISY_CORRECT_FRACTION}
    (out_dir / "toy_pretrain.json").write_text(json.dumps(meta, indent=1))
    return out_dir


DEFAULT_BASE_DIR = Path("runs/lm/toy_base")


def ensure_base_model(out_dir: str | Path = DEFAULT_BASE_DIR, log=print, **kwargs) -> Path:
    """The pretrained toy model at ``out_dir``, trained there first if it is missing or was trained with other
    settings (``kwargs`` as in ``pretrain``)."""
    out_dir = Path(out_dir)
    meta_file = out_dir / "toy_pretrain.json"
    if meta_file.is_file() and (out_dir / "config.json").is_file():
        meta = json.loads(meta_file.read_text())
        if all(meta.get(k) == v for k, v in kwargs.items()):
            return out_dir
    if log:
        log(f"pretraining the toy model into {out_dir} ...")
    return pretrain(out_dir, log=log, **kwargs)


def resolve_model(name: str, log=print) -> str:
    """``toy`` means the embedded toy model (pretrained on first use); anything else is passed through."""
    return str(ensure_base_model(log=log)) if name == "toy" else name
