"""Data for the LM trainers: preference pairs (JSONL), prompt sets, user scorers / verifiers."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fdistill.lm import toy
from fdistill.lm.modeling import SeqBatch, build_batch


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def load_pairs(path: str | Path) -> list[dict]:
    rows = read_jsonl(path)
    for i, r in enumerate(rows, 1):
        missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(r.get(k), str)]
        if missing:
            raise ValueError(f"{path}: record {i} lacks string field(s) {missing}; each line needs "
                             '{"prompt": ..., "chosen": ..., "rejected": ...}')
    if not rows:
        raise ValueError(f"{path}: no preference pairs")
    return rows


def load_prompts(spec: str) -> list[str]:
    """``toy`` (the toy language's prompts), a JSONL with a ``prompt`` field, or a text file of one prompt
    per line. An empty spec is one empty prompt (unconditional generation)."""
    if spec == "toy":
        return toy.prompts()
    if spec == "":
        return [""]
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {spec!r} not found (use 'toy', a .jsonl or a .txt file)")
    if path.suffix == ".jsonl":
        prompts = [r["prompt"] for r in read_jsonl(path)]
    else:
        prompts = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {spec!r} holds no prompts; write one per line (or a JSONL with a 'prompt' "
                         "field), or pass prompts='' for unconditional generation")
    return prompts


def load_callable(spec: str) -> Callable:
    """``package.module:function`` -> the function (a user's scorer or verifier)."""
    mod, sep, name = spec.partition(":")
    if not sep or not mod or not name:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    fn = getattr(importlib.import_module(mod), name, None)
    if not callable(fn):
        raise ValueError(f"{spec!r} is not a callable")
    return fn


def encode_prompt(tok, text: str) -> list[int]:
    """Prompt ids with the tokenizer's special tokens. A response needs at least one token of context to be
    scored, so an empty encoding (e.g. GPT-2's tokenizer on an empty prompt) becomes [bos] or, failing that,
    [eos] (GPT-2's <|endoftext|> doubles as its bos)."""
    ids = list(tok.encode(text, add_special_tokens=True))
    if not ids:
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        ids = [start]
    return ids


@dataclass
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def _fit(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    # keep at least one response token; cut the prompt from the left and the response from the right
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    keep_prompt = min(len(prompt), max(1, max_length - max(1, min(len(response), max_length // 2))))
    prompt = prompt[len(prompt) - keep_prompt:]
    return prompt, response[:max_length - len(prompt)]


def tokenize_pairs(tok, rows: list[dict], max_length: int = 512) -> list[TokenizedPair]:
    out = []
    for r in rows:
        p = encode_prompt(tok, r["prompt"])
        c = list(tok.encode(r["chosen"], add_special_tokens=False)) + [tok.eos_token_id]
        j = list(tok.encode(r["rejected"], add_special_tokens=False)) + [tok.eos_token_id]
        pc, c = _fit(p, c, max_length)
        pj, j = _fit(p, j, max_length)
        p = pc if len(pc) <= len(pj) else pj  # one prompt for both (the shorter cut)
        out.append(TokenizedPair(p, c[:max_length - len(p)], j[:max_length - len(p)]))
    return out


def pair_batch(pairs: list[TokenizedPair], pad_id: int) -> SeqBatch:
    """2B rows: the chosen responses, then the rejected ones (one forward pass scores both)."""
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    return build_batch(prompts, responses, pad_id)
