"""Trainers for causal LMs (HF ``AutoModelForCausalLM``, accelerate): f-DPO / TDPO, f-DPG, DPH-RL.

Each ``train_*`` takes its config dataclass (fdistill.lm.config) and returns a dict with the run directory,
the final checkpoint (a ``save_pretrained`` folder with its tokenizer), the last logged metrics and, when a
verifier is known, the final evaluation (reward, distinct correct answers, entropy, pass@k).

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoint-<step>/`` folders,
``final/`` and ``eval.json``.
"""

from __future__ import annotations

import gc
import json
import random
import time
from pathlib import Path
from typing import Callable

import torch
import yaml
from safetensors.torch import save_file

from fdistill.divergences import get_divergence
from fdistill.lm import toy
from fdistill.lm.config import ConfigError, DPHConfig, DPOConfig, FDPGConfig, LMBaseConfig, TDPOConfig, dump_yaml
from fdistill.lm.data import (encode_prompt, load_callable, load_pairs, load_prompts, pair_batch, tokenize_pairs,
                              write_jsonl)
from fdistill.lm.evaluate import evaluate_policy
from fdistill.lm.losses import (LogZEstimator, MovingAverageBaseline, dph_penalty, f_dpo_loss, fdpg_loss,
                                grpo_advantages, ppo_clip_loss, tdpo_loss, token_logps)
from fdistill.lm.modeling import SeqBatch, forward_logits, load_causal_lm, response_texts, sample, token_logps_of
from fdistill.lm.tokenizer import load_tokenizer


# keys that do not change what a run computes
_NEUTRAL_KEYS = {"out", "threads", "log_every"}


def check_out(out: Path, method: str, cfg: LMBaseConfig) -> None:
    """Refuse an ``out`` holding another LM run (another method, or a config that differs in a key that changes
    the result): starting there would overwrite its checkpoints. The same config starts over (LM runs are short
    and do not resume)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={out} is a file, not a run directory; choose another out=DIR")
    saved = out / "config.yaml"
    if not saved.is_file():
        return
    text = saved.read_text(encoding="utf-8")
    try:
        old = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        old = {}
    new = yaml.safe_load(dump_yaml(cfg))
    was = text.splitlines()[0].removeprefix("# fdistill lm ").strip() if text else "?"
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in _NEUTRAL_KEYS)
    if was != method or diff:
        what = f"an 'fdistill lm {was}' run" if was != method else f"a run with a different config (keys {diff})"
        raise ConfigError(f"{out} holds {what}; rerun it with the same settings, or choose another out=DIR")


class _Run:
    """What every trainer shares: seeding, accelerate, models, optimizer step, logging, checkpoints, eval."""

    def __init__(self, cfg: LMBaseConfig, method: str, log: Callable | None = print):
        from accelerate import Accelerator

        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.cfg, self.method = cfg, method
        self.acc = Accelerator()
        self._log = log if self.acc.is_main_process else None
        seed = cfg.seed + self.acc.process_index
        random.seed(seed)
        torch.manual_seed(seed)
        self.rng = random.Random(seed)
        self.out = Path(cfg.out)
        self.model_path = toy.resolve_model(cfg.model, log=self._log)
        self.ref_path = toy.resolve_model(cfg.ref_model, log=self._log) if cfg.ref_model else self.model_path
        self.tok = load_tokenizer(self.model_path)
        self.device = self.acc.device
        self.t0 = time.time()
        self.last_metrics: dict = {}
        if self.acc.is_main_process:
            check_out(self.out, method, cfg)
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(f"# fdistill lm {method}\n" + dump_yaml(cfg))
            self._metrics = open(self.out / "metrics.jsonl", "w", encoding="utf-8")  # a run starts over

    def log(self, msg: str) -> None:
        if self._log:
            self._log(msg)

    def load_policy(self):
        model = load_causal_lm(self.model_path).train()
        if self.cfg.disable_dropout:
            # with dropout the policy's log-probs at initialisation differ from the reference's (f-DPO's loss would
            # not start at log 2) and from those of the samples (PPO ratio != 1); TRL disables it for the same reason
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
        return model

    def load_ref(self):
        return load_causal_lm(self.ref_path, dtype=self.cfg.ref_dtype, trainable=False).to(self.device)

    def prepare(self, policy):
        cfg = self.cfg
        opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
        self.policy, self.opt, self.sched = self.acc.prepare(policy, opt, sched)
        return self.policy

    @property
    def unwrapped(self):
        return self.acc.unwrap_model(self.policy)

    def step(self, loss: torch.Tensor) -> float:
        self.acc.backward(loss)
        norm = self.acc.clip_grad_norm_(self.policy.parameters(), self.cfg.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return float(norm)

    def record(self, step: int, metrics: dict) -> None:
        metrics = {k: (float(v) if isinstance(v, (torch.Tensor, float, int)) else v) for k, v in metrics.items()}
        self.last_metrics = {"step": step, **metrics}
        if self.acc.is_main_process:
            self._metrics.write(json.dumps({"step": step, "time": round(time.time() - self.t0, 2), **metrics}) + "\n")
            self._metrics.flush()
        if step % max(1, self.cfg.log_every) == 0 or step == self.cfg.steps:
            shown = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
            self.log(f"[{self.method}] step {step}/{self.cfg.steps}  {shown}")
        if self.cfg.save_every and step % self.cfg.save_every == 0 and step != self.cfg.steps:
            self.save(f"checkpoint-{step}")

    def save(self, name: str) -> Path:
        path = self.out / name
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            self.unwrapped.save_pretrained(path)
            self.tok.save_pretrained(path)
        return path

    def eval_prompts(self) -> list[str]:
        spec = self.cfg.eval_prompts
        if spec == "auto":
            is_toy = self.cfg.model == "toy" or (Path(self.model_path) / "toy_pretrain.json").is_file()
            return toy.prompts() if is_toy else []
        return load_prompts(spec) if spec else []

    def finish(self, groups: dict[str, list[str]] | None = None) -> dict:
        final = self.save("final")
        result = {"out": str(self.out), "final": str(final), "last_metrics": self.last_metrics}
        prompts = self.eval_prompts()
        if prompts and self.acc.is_main_process:
            groups = dict(groups or {})
            if all(p in toy.prompts() for p in prompts):
                groups["clean"] = [p for p in prompts if toy.is_clean(toy.target_of(p))]
                groups["noisy"] = [p for p in prompts if not toy.is_clean(toy.target_of(p))]
            ev = evaluate_policy(self.unwrapped, self.tok, prompts, load_callable(self.cfg.eval_verifier),
                                 n=self.cfg.eval_samples, k=self.cfg.eval_k,
                                 max_new_tokens=self.cfg.max_new_tokens, groups=groups, seed=self.cfg.seed)
            (self.out / "eval.json").write_text(json.dumps(ev, indent=1))
            result["eval"] = ev
            a, k = ev["all"], ev["k"]
            self.log(f"[{self.method}] eval: reward {a['reward']:.3f}  distinct {a['distinct']:.1f}  "
                     f"entropy {a['entropy']:.3f}  pass@{k} {a[f'pass@{k}']:.3f}")
        result["seconds"] = round(time.time() - self.t0, 1)
        if self.acc.is_main_process:
            self._metrics.close()
        return result


# --------------------------------------------------------------------------------------------------------------
# f-DPO and TDPO on preference pairs
# --------------------------------------------------------------------------------------------------------------

@torch.no_grad()

def _next_prompts(queue: list, prompts, n: int, rng) -> tuple[list, list]:
    """The next n prompts, cycling through the prompt set in a fresh shuffled order each pass."""
    if len(queue) < n:
        perm = list(prompts)
        rng.shuffle(perm)
        queue = queue + perm
    return queue[:n], queue[n:]

def precompute_ref_logps(ref, pairs, pad_id: int, device, batch_size: int = 64) -> torch.Tensor:
    """Summed reference log-probs [N, 2] (chosen, rejected) of every pair, computed once."""
    out = []
    for s in range(0, len(pairs), batch_size):
        part = pairs[s:s + batch_size]
        batch = pair_batch(part, pad_id).to(device)
        lp = token_logps(forward_logits(ref, batch), batch.labels())[0].sum(-1).float()
        out.append(torch.stack([lp[:len(part)], lp[len(part):]], -1).cpu())
    return torch.cat(out)


def train_dpo(cfg: DPOConfig | TDPOConfig, log: Callable | None = print) -> dict:
    """f-DPO (DPOConfig; reverse_kl = DPO) or TDPO (TDPOConfig) on a JSONL of {prompt, chosen, rejected}."""
    is_tdpo = isinstance(cfg, TDPOConfig)
    if is_tdpo and cfg.variant not in (1, 2):
        raise ValueError(f"variant must be 1 or 2, got {cfg.variant}")
    if not is_tdpo:
        get_divergence(cfg.divergence)  # fail before loading anything
    if is_tdpo and getattr(cfg, "precompute_ref_logps", False):
        raise ValueError("TDPO needs the reference's full logits at every step; precompute is for dpo only")
    run = _Run(cfg, "tdpo" if is_tdpo else "dpo", log)
    data = cfg.data
    if data == "toy":
        data = str(run.out / "pairs.jsonl")
        if run.acc.is_main_process:
            write_jsonl(data, toy.preference_pairs(cfg.toy_pairs, seed=cfg.seed))
        run.acc.wait_for_everyone()
    pairs = tokenize_pairs(run.tok, load_pairs(data), cfg.max_length)
    pad = run.tok.pad_token_id
    policy = run.load_policy()
    ref = run.load_ref()
    ref_table = None
    if not is_tdpo and cfg.precompute_ref_logps:
        run.log(f"[dpo] scoring {len(pairs)} pairs with the reference once")
        ref_table = precompute_ref_logps(ref, pairs, pad, run.device)
        del ref
        ref = None
        gc.collect()
    policy = run.prepare(policy)
    order: list[int] = []
    B = min(cfg.batch_size, len(pairs))
    for step in range(1, cfg.steps + 1):
        if len(order) < B:  # epochs of shuffled pairs
            perm = list(range(len(pairs)))
            run.rng.shuffle(perm)
            order += perm
        idx, order = order[:B], order[B:]
        batch = pair_batch([pairs[i] for i in idx], pad).to(run.device)
        labels = batch.labels()
        logits = forward_logits(policy, batch)
        if is_tdpo:
            with torch.no_grad():
                ref_logits = forward_logits(ref, batch)
            out = tdpo_loss(logits[:B], ref_logits[:B], labels[:B], logits[B:], ref_logits[B:], labels[B:],
                            beta=cfg.beta, alpha=cfg.alpha, variant=cfg.variant)
            extra = {"seq_kl_chosen": out.chosen_seq_kl.mean(), "seq_kl_rejected": out.rejected_seq_kl.mean()}
        else:
            lp = token_logps(logits, labels)[0].sum(-1)
            if ref_table is not None:
                rlp = ref_table[idx].to(run.device)
                ref_w, ref_l = rlp[:, 0], rlp[:, 1]
            else:
                with torch.no_grad():
                    rlp = token_logps(forward_logits(ref, batch), labels)[0].sum(-1)
                ref_w, ref_l = rlp[:B], rlp[B:]
            out = f_dpo_loss(lp[:B], lp[B:], ref_w, ref_l, beta=cfg.beta, divergence=cfg.divergence)
            extra = {"logp_chosen": lp[:B].mean().detach(), "logp_rejected": lp[B:].mean().detach()}
        loss = out.losses.mean()
        grad_norm = run.step(loss)
        run.record(step, {"loss": loss.detach(), "reward_acc": (out.chosen_rewards > out.rejected_rewards).float().mean(),
                          "margin": (out.chosen_rewards - out.rejected_rewards).mean(), "grad_norm": grad_norm,
                          **extra})
    return run.finish()


# --------------------------------------------------------------------------------------------------------------
# f-DPG toward an energy-based target
# --------------------------------------------------------------------------------------------------------------

def train_fdpg(cfg: FDPGConfig, log: Callable | None = print) -> dict:
    """f-DPG (Go et al. 2023): minimise D_f(pi_theta || p), p = P / Z with P = a(x) b(x) (``target: gdc``) or
    a(x) exp(r(x) / beta) (``target: rlhf``), a = the reference model and b or r the user's scorer.

    On-policy: samples come from the current policy (q = pi_theta, importance weights 1); Z(prompt) is
    estimated by importance sampling, pooled over every sample of that prompt seen so far.
    """
    if cfg.target not in ("gdc", "rlhf"):
        raise ValueError(f"target must be 'gdc' or 'rlhf', got {cfg.target!r}")
    get_divergence(cfg.divergence)
    run = _Run(cfg, "fdpg", log)
    prompts = load_prompts(cfg.prompts)
    scorer = load_callable(cfg.scorer)
    tok = run.tok
    prompt_ids = {p: encode_prompt(tok, p) for p in prompts}
    policy = run.prepare(run.load_policy())
    ref = run.load_ref()
    baseline = MovingAverageBaseline(cfg.baseline_window)
    log_z = LogZEstimator()
    queue: list[str] = []
    for step in range(1, cfg.steps + 1):
        ps, queue = _next_prompts(queue, prompts, cfg.prompts_per_step, run.rng)
        flat = [p for p in ps for _ in range(cfg.samples_per_prompt)]
        batch = sample(run.unwrapped, [prompt_ids[p] for p in flat], cfg.max_new_tokens, tok.eos_token_id,
                       tok.pad_token_id).to(run.device)
        texts = response_texts(tok, batch)
        scores = torch.tensor([float(scorer(p, y)) for p, y in zip(flat, texts)], dtype=torch.float64,
                              device=run.device)
        pol = token_logps_of(policy, batch)[0].sum(-1)
        with torch.no_grad():
            ref_lp = token_logps_of(ref, batch)[0].sum(-1).double()
        if cfg.target == "gdc":
            if (scores < 0).any():
                raise ValueError("a GDC scorer b(x) must be >= 0")
            target = ref_lp + torch.log(scores)  # log 0 = -inf: outside the target's support
        else:
            target = ref_lp + scores / cfg.beta
        proposal = pol.detach().double()  # on-policy: q is the policy that sampled
        log_z.update(target, proposal, keys=flat)
        out = fdpg_loss(pol, proposal, target, log_z.log_z_for(flat).to(run.device), divergence=cfg.divergence,
                        baseline=baseline.value, max_log_ratio=cfg.max_log_ratio)
        baseline.update(out.pseudo_rewards, out.weights)
        grad_norm = run.step(out.loss)
        run.record(step, {"loss": out.loss.detach(), "score": scores.mean(), "pseudo_reward": out.pseudo_rewards.mean(),
                          "baseline": baseline.value, "log_z": log_z.log_z_for(ps).mean(),
                          "logp_minus_ref": (pol.detach().double() - ref_lp).mean(), "grad_norm": grad_norm})
    run.acc.wait_for_everyone()
    if run.acc.is_main_process:
        (run.out / "fdpg_state.json").write_text(json.dumps({"log_z": {str(k): log_z.log_z(k) for k in
                                                                      log_z.state_dict()["n"]},
                                                             "baseline": baseline.value}, indent=1))
    return run.finish()


# --------------------------------------------------------------------------------------------------------------
# DPH-RL: GRPO on exploration prompts + a divergence on stored reference samples of near-perfect prompts
# --------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def presample_reference(ref, tok, prompts: list[str], k: int, verifier, max_new_tokens: int, device,
                        chunk: int = 512) -> dict:
    """k samples per prompt from the reference, their verifier rewards and per-token reference log-probs."""
    flat = [p for p in prompts for _ in range(k)]
    rows, texts, lps = [], [], []
    for s in range(0, len(flat), chunk):
        part = flat[s:s + chunk]
        b = sample(ref, [encode_prompt(tok, p) for p in part], max_new_tokens, tok.eos_token_id,
                   tok.pad_token_id).to(device)
        texts += response_texts(tok, b)
        lps.append(token_logps_of(ref, b)[0].cpu())
        rows.append(b.to("cpu"))
    L = max(r.input_ids.shape[1] for r in rows)

    def pad_to(x, value):
        return torch.nn.functional.pad(x, (0, L - x.shape[1]), value=value)

    batch = SeqBatch(torch.cat([pad_to(r.input_ids, tok.pad_token_id) for r in rows]),
                     torch.cat([pad_to(r.attention_mask, 0) for r in rows]),
                     torch.cat([pad_to(r.response_mask, 0) for r in rows]))
    ref_lp = torch.cat([torch.nn.functional.pad(x, (0, L - 1 - x.shape[1])) for x in lps])
    rewards = torch.tensor([float(verifier(p, y)) for p, y in zip(flat, texts)])
    return {"prompts": flat, "texts": texts, "batch": batch, "ref_token_logps": ref_lp, "rewards": rewards}


def train_dph(cfg: DPHConfig, log: Callable | None = print) -> dict:
    """DPH-RL (Li et al. 2025). Before training, k samples per prompt from the initial policy split the
    prompts: all correct -> near-perfect (their samples and reference log-probs are stored), the rest ->
    exploration. Each step: GRPO (PPO-clip, no KL) on exploration prompts + eta * D_f(pi_theta || pi_ref)
    estimated with the generator on stored samples. No reference model is kept in memory while training.
    ``divergence: none`` is the GRPO baseline: every prompt is an exploration prompt and there is no penalty.
    """
    use_penalty = cfg.divergence.strip().lower() != "none"
    if use_penalty:
        get_divergence(cfg.divergence)
    run = _Run(cfg, "dph", log)
    prompts = load_prompts(cfg.prompts)
    verifier = load_callable(cfg.verifier)
    tok = run.tok
    prompt_ids = {p: encode_prompt(tok, p) for p in prompts}

    ref = run.load_ref()
    pre = presample_reference(ref, tok, prompts, cfg.presample, verifier, cfg.max_new_tokens, run.device)
    del ref
    gc.collect()
    mean_r = {p: 0.0 for p in prompts}
    for p, r in zip(pre["prompts"], pre["rewards"].tolist()):
        mean_r[p] += r / cfg.presample
    near_perfect = [p for p in prompts if mean_r[p] >= cfg.near_perfect_threshold]
    exploration = [p for p in prompts if p not in set(near_perfect)]
    keep = torch.tensor([p in set(near_perfect) for p in pre["prompts"]])
    stored = SeqBatch(*(t[keep] for t in (pre["batch"].input_ids, pre["batch"].attention_mask,
                                          pre["batch"].response_mask)))
    stored_lp = pre["ref_token_logps"][keep]
    if run.acc.is_main_process:
        (run.out / "dph_split.json").write_text(json.dumps(
            {"near_perfect": near_perfect, "exploration": exploration, "presample": cfg.presample,
             "initial_pass_rate": mean_r}, indent=1))

        save_file({"input_ids": stored.input_ids.contiguous(), "attention_mask": stored.attention_mask.contiguous(),
                   "response_mask": stored.response_mask.contiguous(), "ref_token_logps": stored_lp.contiguous()},
                  str(run.out / "reference_samples.safetensors"))
    run.log(f"[dph] {len(near_perfect)} near-perfect prompts ({int(keep.sum())} stored reference samples), "
            f"{len(exploration)} exploration prompts")
    rl_prompts = exploration if use_penalty else prompts
    if use_penalty and not near_perfect:
        run.log("[dph] no near-perfect prompt: the divergence term is inactive")
    if not rl_prompts:
        run.log("[dph] no exploration prompt: only the divergence term trains")

    policy = run.prepare(run.load_policy())
    queue: list[str] = []
    n_stored = stored.input_ids.shape[0]
    for step in range(1, cfg.steps + 1):
        metrics = {}
        pg_batch = None
        if rl_prompts:
            ps, queue = _next_prompts(queue, rl_prompts, cfg.prompts_per_step, run.rng)
            flat = [p for p in ps for _ in range(cfg.group_size)]
            pg_batch = sample(run.unwrapped, [prompt_ids[p] for p in flat], cfg.max_new_tokens, tok.eos_token_id,
                              tok.pad_token_id).to(run.device)
            rewards = torch.tensor([float(verifier(p, y)) for p, y in zip(flat, response_texts(tok, pg_batch))])
            adv = grpo_advantages(rewards, cfg.group_size).to(run.device)
            with torch.no_grad():
                old_lp, _ = token_logps_of(policy, pg_batch)
            metrics.update(reward=rewards.mean(), solved_groups=(rewards.view(-1, cfg.group_size).min(-1).values >= 1).float().mean())
        for _ in range(max(1, cfg.ppo_epochs)):
            loss = torch.zeros((), device=run.device)
            if pg_batch is not None:
                lp, mask = token_logps_of(policy, pg_batch)
                pg = ppo_clip_loss(lp, old_lp, adv, mask, clip_eps=cfg.clip_eps)
                loss = loss + pg
                metrics["pg_loss"] = pg.detach()
            if use_penalty and n_stored:
                idx = torch.randperm(n_stored)[:cfg.ref_batch_size]
                rb = SeqBatch(stored.input_ids[idx], stored.attention_mask[idx], stored.response_mask[idx]).to(run.device)
                plp, pmask = token_logps_of(policy, rb)
                pen = dph_penalty(plp, stored_lp[idx].to(run.device), pmask, cfg.divergence)
                loss = loss + cfg.eta * pen
                metrics["penalty"] = pen.detach()
            metrics["grad_norm"] = run.step(loss) if loss.requires_grad else 0.0
        run.record(step, metrics)
    groups = None
    if cfg.eval_prompts == "auto" or cfg.eval_prompts == cfg.prompts:
        groups = {"near_perfect": near_perfect, "exploration": exploration}
    return run.finish(groups)


TRAINERS = {"dpo": train_dpo, "tdpo": train_dpo, "fdpg": train_fdpg, "dph": train_dph}
