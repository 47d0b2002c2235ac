"""Causal-LM plumbing shared by the trainers: loading, batching prompt + response, log-probs, sampling.

Sequences are laid out as [left-padded prompt | response | right padding]: prompts of different lengths end
at the same column (sampling needs that) and positions are computed from the attention mask, so any HF
causal LM (learned or rotary positions) sees the same positions as without padding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from fdistill.lm.losses import token_logps
from fdistill.utils import dtype_from_name

Tensor = torch.Tensor


def load_causal_lm(name_or_path: str, dtype: str = "float32", trainable: bool = True):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype_from_name(dtype))
    if not trainable:
        model.eval().requires_grad_(False)
    return model


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class SeqBatch:
    """Token ids [N, L] with attention mask, and a response mask marking the tokens that are scored
    (response tokens up to and including the first eos)."""

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor

    def to(self, device) -> "SeqBatch":
        return SeqBatch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))

    def labels(self, ignore_index: int = -100) -> Tensor:
        """Labels aligned with ``logits[:, :-1]``: the next token where it is a response token, else -100."""
        nxt = self.input_ids[:, 1:]
        return torch.where(self.response_mask[:, 1:].bool(), nxt, torch.full_like(nxt, ignore_index))


def build_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> SeqBatch:
    """Left-pad prompts to a common length, append responses (already ending in eos), right-pad."""
    P = max(len(p) for p in prompts)
    R = max(len(r) for r in responses)
    N = len(prompts)
    ids = torch.full((N, P + R), pad_id, dtype=torch.long)
    att = torch.zeros((N, P + R), dtype=torch.long)
    resp = torch.zeros((N, P + R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        att[i, P - len(p):P + len(r)] = 1
        resp[i, P:P + len(r)] = 1
    return SeqBatch(ids, att, resp)


def forward_logits(model, batch: SeqBatch) -> Tensor:
    """Logits aligned with ``batch.labels()``: [N, L-1, V]."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=position_ids_from_mask(batch.attention_mask), use_cache=False)
    return out.logits[:, :-1]


def token_logps_of(model, batch: SeqBatch) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of the response tokens [N, L-1] (0 elsewhere) and their mask."""
    return token_logps(forward_logits(model, batch), batch.labels())


def _cache_kwarg(model) -> str:
    # transformers >= 5 renamed past_key_values to cache (the old name still works, with a warning)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    for name in ("cache", "past_key_values"):
        c = getattr(out, name, None)
        if c is not None:
            return c
    return None


@torch.no_grad()
def sample(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
           temperature: float = 1.0, generator: torch.Generator | None = None) -> SeqBatch:
    """Ancestral sampling (no top-k / top-p: the samples must come from pi itself, their log-probs are used
    as pi's). One row per prompt; repeat prompts for several samples. Responses end at eos or after
    ``max_new_tokens`` (then without eos)."""
    device = next(model.parameters()).device
    N = len(prompts)
    P = max(len(p) for p in prompts)
    ids = torch.full((N, P), pad_id, dtype=torch.long)
    att = torch.zeros((N, P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        att[i, P - len(p):] = 1
    ids, att = ids.to(device), att.to(device)
    cache_kw = _cache_kwarg(model)
    was_training = model.training
    model.eval()
    out_tokens = []
    done = torch.zeros(N, dtype=torch.bool, device=device)
    alive_mask = []
    past = None
    cur_ids, cur_att = ids, att
    pos = position_ids_from_mask(att)
    for _ in range(max_new_tokens):
        out = model(input_ids=cur_ids, attention_mask=cur_att, position_ids=pos, use_cache=True,
                    **({cache_kw: past} if past is not None else {}))
        past = _cache_of(out)
        logits = out.logits[:, -1].float()
        if temperature != 1.0:
            logits = logits / temperature
        probs = torch.softmax(logits, -1)
        nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        alive_mask.append((~done).long())
        out_tokens.append(nxt)
        done = done | (nxt == eos_id)
        cur_ids = nxt.unsqueeze(-1)
        cur_att = torch.cat([cur_att, torch.ones((N, 1), dtype=torch.long, device=device)], -1)
        pos = pos[:, -1:] + 1
        if bool(done.all()):
            break
    model.train(was_training)
    resp = torch.stack(out_tokens, -1)
    resp_mask = torch.stack(alive_mask, -1)
    input_ids = torch.cat([ids, resp], -1)
    attention_mask = torch.cat([att, resp_mask], -1)
    response_mask = torch.cat([torch.zeros_like(att), resp_mask], -1)
    return SeqBatch(input_ids, attention_mask, response_mask)


def response_texts(tok, batch: SeqBatch) -> list[str]:
    """Decoded responses (without the eos). A response cut at max_new_tokens decodes as it is."""
    out = []
    for ids, m in zip(batch.input_ids, batch.response_mask):
        toks = [int(t) for t, k in zip(ids, m) if k]
        if toks and toks[-1] == tok.eos_token_id:
            toks = toks[:-1]
        out.append(tok.decode(toks, skip_special_tokens=True))
    return out


def response_finished(tok, batch: SeqBatch) -> Tensor:
    """Whether each response ended with eos (True) or was cut at max_new_tokens (False)."""
    L = batch.response_mask.sum(-1)
    last = batch.input_ids.gather(1, (batch.response_mask.cumsum(-1).argmax(-1)).unsqueeze(-1)).squeeze(-1)
    return (L > 0) & (last == tok.eos_token_id)
