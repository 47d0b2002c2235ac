"""Typed configs of the LM trainers: one dataclass per method, loadable from YAML with ``key=value`` overrides.

Each field's comment names where its default comes from. Unknown keys are errors that name the key (a typo
must not silently train with a default); loading goes through ``fdistill.config``, the package's one loader.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config import ConfigError  # re-exported for the LM CLI
from ..config import load_config as _load


@dataclass
class LMBaseConfig:
    out: str = "runs/lm/run"
    """Run directory: resolved config, metrics.jsonl, checkpoints (``save_pretrained`` folders)."""
    model: str = "toy"
    """Policy initialisation: a local folder or hub id for ``AutoModelForCausalLM``; ``toy`` is the embedded
    digit-sum GPT-2 (fdistill.lm.toy), pretrained on first use."""
    ref_model: Optional[str] = None
    """Reference pi_ref; defaults to ``model`` (all four papers regularise toward the initial policy)."""
    ref_dtype: str = "float32"
    """dtype of frozen models (``bfloat16`` halves their memory; trainable weights stay fp32)."""
    seed: int = 0
    steps: int = 150
    """Optimizer updates."""
    lr: float = 3e-4
    """AdamW learning rate, tuned for the toy model. LM-scale runs use ~5e-7 (DPO / f-DPO / TDPO, as in the
    papers) to 1e-6 (RLVR)."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    log_every: int = 10
    save_every: int = 0
    """Save a checkpoint every N steps (0: only the final one)."""
    max_new_tokens: int = 5
    """Sampling length limit (methods that sample; evaluation)."""
    eval_samples: int = 32
    """Samples per prompt for the final evaluation (reward, distinct answers, entropy, pass@k)."""
    eval_k: int = 8
    """k of the pass@k reported by the evaluation."""
    eval_prompts: str = "auto"
    """Prompts of the final evaluation: ``auto`` (the toy prompts when model is ``toy`` or a toy folder, else
    none), a prompt file, or empty for no evaluation."""
    eval_verifier: str = "fdistill.lm.toy:verify"
    """``module:function`` giving the evaluation reward fn(prompt, response)."""
    threads: int = 0
    """torch CPU threads (0: leave torch's default). Tiny models run fastest with 1 on a busy machine."""
    disable_dropout: bool = True
    """Set the policy's dropout to 0 so its log-probs match the reference's and the samples' (as TRL does)."""

    def validate(self) -> None:
        """Refuse settings that cannot train, naming the key (called by ``load_config``, before anything runs)."""
        _positive(self, "steps", "lr")
        _at_least(self, 0, "weight_decay", "max_grad_norm", "warmup_steps", "save_every", "threads")
        _at_least(self, 1, "log_every", "max_new_tokens", "eval_samples", "eval_k")
        if hasattr(self, "beta"):  # the strength of the method's divergence constraint
            _positive(self, "beta")
        if hasattr(self, "eta"):  # DPH-RL's divergence weight (0: plain GRPO)
            _at_least(self, 0, "eta")


@dataclass
class DPOConfig(LMBaseConfig):
    out: str = "runs/lm/dpo"
    data: str = "toy"
    """JSONL of {prompt, chosen, rejected}; ``toy`` writes toy-language pairs (correct vs wrong answer)."""
    toy_pairs: int = 2000
    """Number of pairs generated when ``data: toy``."""
    beta: float = 0.1
    """Strength of the divergence constraint (DPO / f-DPO beta; Rafailov et al. 2023, Wang et al. 2023)."""
    divergence: str = "reverse_kl"
    """f-DPO's divergence (Wang et al. 2023): any registry name; reverse_kl is DPO. Names are semantic:
    forward_kl = KL(pi_ref || pi), js, alpha:a with the paper's a."""
    precompute_ref_logps: bool = False
    """Score the whole dataset with the reference once before training and free the reference model."""
    max_length: int = 512
    """Prompt + response tokens kept per sequence (responses are truncated from the end)."""
    batch_size: int = 32
    """Preference pairs per update."""


@dataclass
class TDPOConfig(LMBaseConfig):
    out: str = "runs/lm/tdpo"
    data: str = "toy"
    """JSONL of {prompt, chosen, rejected}; ``toy`` as for dpo."""
    toy_pairs: int = 2000
    beta: float = 0.1
    """TDPO's beta (Zeng et al. 2024, default 0.1)."""
    alpha: float = 0.5
    """TDPO2's weight on the sequential-KL gap (Zeng et al. 2024, default 0.5)."""
    variant: int = 2
    """1 = TDPO1, 2 = TDPO2 (the paper's recommended variant)."""
    max_length: int = 512
    """Prompt + response tokens kept per sequence."""
    batch_size: int = 32
    """Preference pairs per update."""


@dataclass
class FDPGConfig(LMBaseConfig):
    out: str = "runs/lm/fdpg"
    prompts: str = "toy"
    """Prompt set: a text file (one prompt per line), a JSONL with a ``prompt`` field, or ``toy``. An empty
    string means unconditional generation."""
    target: str = "gdc"
    """Energy-based target P(x) (Go et al. 2023): ``gdc`` = a(x) b(x) with b = the scorer (>= 0, e.g. a 0/1
    constraint); ``rlhf`` = a(x) exp(r(x) / beta) with r = the scorer. a = the reference model."""
    scorer: str = "fdistill.lm.toy:verify"
    """``module:function`` called as fn(prompt, response) -> float."""
    beta: float = 0.1
    """Temperature of the RLHF target a(x) exp(r(x)/beta)."""
    divergence: str = "js"
    """D_f(pi_theta || p) to minimise; js is the authors' default and recommended balance."""
    samples_per_prompt: int = 8
    """Samples per prompt and step (they share the prompt's log Z estimate)."""
    prompts_per_step: int = 8
    """Prompts per update; an update sees prompts_per_step * samples_per_prompt samples."""
    baseline_window: int = 1024
    """Moving-average baseline window in samples (Go et al. 2023)."""
    max_log_ratio: float = 20.0
    """|log pi/p| clamp: where b(x) = 0 the ratio is infinite; this bounds the pseudo-reward of such samples."""


@dataclass
class DPHConfig(LMBaseConfig):
    out: str = "runs/lm/dph"
    prompts: str = "toy"
    """Prompt set: a text file (one prompt per line), a JSONL with a ``prompt`` field, or ``toy``."""
    verifier: str = "fdistill.lm.toy:verify"
    """``module:function`` called as fn(prompt, response) -> reward in [0, 1]."""
    divergence: str = "forward_kl"
    """DPH-RL's divergence on near-perfect prompts (Li et al. 2025): forward_kl (k3), js, alpha:a
    (a = 0.2 in the paper), any registry name; ``none`` is plain GRPO on every prompt."""
    eta: float = 0.1
    """Weight of the divergence term (the paper uses 0.01-0.2)."""
    presample: int = 8
    """Samples per prompt from the initial policy to split the prompts (all correct -> near-perfect)."""
    near_perfect_threshold: float = 1.0
    """Fraction of the pre-samples that must be correct for a prompt to count as near-perfect."""
    group_size: int = 8
    """GRPO group size (samples per exploration prompt)."""
    prompts_per_step: int = 8
    """Exploration prompts per update."""
    ref_batch_size: int = 64
    """Stored reference samples per step for the divergence term."""
    clip_eps: float = 0.2
    """PPO clip range (Schulman et al. 2017)."""
    ppo_epochs: int = 1
    """Gradient steps per sampled batch (1: on-policy, the ratio is 1 and clipping is inactive)."""


@dataclass
class DemoConfig:
    out: str = "runs/lm/demo"
    """Run directory; the pretrained base model is cached in ``<out>/base``."""
    seed: int = 0
    pretrain_steps: int = 1500
    """Pretraining updates of the toy GPT-2 (batch 128, about a minute on one core)."""
    methods: list = field(default_factory=lambda: ["fdpo", "tdpo", "fdpg", "dph"])
    """Which methods to run (fdpo, tdpo, fdpg, dph)."""
    fdpo_divergences: list = field(default_factory=lambda: ["reverse_kl", "js", "alpha:0.5", "forward_kl"])
    """f-DPO rows (reverse_kl = DPO); the f-DPO paper's four."""
    tdpo_variants: list = field(default_factory=lambda: [1, 2])
    """TDPO rows."""
    fdpg_divergences: list = field(default_factory=lambda: ["reverse_kl", "js", "forward_kl"])
    """f-DPG rows toward p ~ a(y|x) 1[correct] (reverse_kl = KL-regularised RL's optimum, forward_kl = DPG)."""
    dph_divergences: list = field(default_factory=lambda: ["none", "reverse_kl", "js", "forward_kl", "alpha:0.2"])
    """DPH-RL rows; none = the GRPO baseline without any KL term."""
    dpo_pairs: int = 2000
    """Toy preference pairs (a correct answer against a random wrong one) for f-DPO and TDPO."""
    dpo_steps: int = 150
    """Updates of each f-DPO / TDPO run (32 pairs each)."""
    dpo_lr: float = 3e-4
    dpo_beta: float = 0.1
    """beta of f-DPO and TDPO (both papers' default)."""
    fdpg_steps: int = 150
    """Updates of each f-DPG run (8 prompts x 8 samples each)."""
    fdpg_lr: float = 3e-4
    dph_steps: int = 150
    """Updates of each DPH-RL / GRPO run (8 prompts x 8 samples, plus 64 stored samples)."""
    dph_lr: float = 3e-4
    dph_eta: float = 0.1
    """Weight of DPH-RL's divergence term."""
    eval_samples: int = 32
    """Samples per prompt for the table."""
    pass_k: int = 8
    threads: int = 1
    """torch CPU threads; the toy model is too small to gain from more, and they thrash on a shared machine."""


def _positive(cfg, *keys: str) -> None:
    for key in keys:
        v = getattr(cfg, key)
        if not (isinstance(v, (int, float)) and v > 0 and v != float("inf")):
            why = " (beta <= 0 turns the divergence constraint off or around: the policy learns nothing or " \
                  "learns backwards)" if key == "beta" else ""
            raise ConfigError(f"config key {key} must be > 0, got {v!r}{why}")


def _at_least(cfg, low: int, *keys: str) -> None:
    for key in keys:
        v = getattr(cfg, key)
        if not v >= low:
            raise ConfigError(f"config key {key} must be >= {low}, got {v!r}")


CONFIGS: dict[str, type] = {"dpo": DPOConfig, "tdpo": TDPOConfig, "fdpg": FDPGConfig, "dph": DPHConfig,
                            "demo": DemoConfig}


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] = ()) -> Any:
    """``cls`` from a YAML file (optional) updated with ``key=value`` overrides (values parsed as YAML), by the
    package's one config loader (fdistill.config): unknown keys and wrong types are errors naming the key."""
    return _load(path, list(overrides), cls=cls)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field (``x: int = 1`` then ``\"\"\"doc\"\"\"``), subclasses overriding bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:] + [None]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe(cls: type) -> str:
    """One line per key: name, default and its documentation (for ``--help``)."""
    docs = field_docs(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"  {f.name} = {default!r}" + (f"\n      {docs[f.name]}" if f.name in docs else ""))
    return "\n".join(lines)
