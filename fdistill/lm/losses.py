"""Losses of the f-divergence LM alignment methods, as pure functions on tensors.

Convention (docs/lm.md; the LM side of fdistill.divergences): the papers write
D_g(pi || pi_ref) = E_{pi_ref}[g(u)] with u = pi / pi_ref (model over reference). ``get_divergence(name).dual()``
is that g, as functions of log u, so a divergence *name* means the same thing here as on the diffusion side:
``reverse_kl`` is KL(pi || pi_ref) (DPO's constraint), ``forward_kl`` is KL(pi_ref || pi). Every input is a
log-probability; u is never formed from an unbounded exponent.

    f_dpo_loss     Wang et al. 2023, arXiv 2309.16240 (f-DPO)
    tdpo_loss      Zeng et al. 2024, arXiv 2404.11999 (TDPO1 / TDPO2)
    fdpg_loss      Go et al. 2023, arXiv 2302.08215 (f-DPG), with MovingAverageBaseline and LogZEstimator
    dph_penalty    Li et al. 2025, arXiv 2509.07430 (DPH-RL), with ppo_clip_loss / grpo_advantages / grpo_loss
"""

from __future__ import annotations

import math
from collections import deque
from typing import Hashable, Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from fdistill.divergences import EXP_MAX, Divergence, get_divergence

Tensor = torch.Tensor

__all__ = [
    "FDPOOutput", "f_dpo_loss", "TDPOOutput", "tdpo_loss", "token_logps", "sequence_kl", "FDPGOutput",
    "fdpg_loss", "MovingAverageBaseline", "importance_log_z", "LogZEstimator", "dph_penalty",
    "grpo_advantages", "ppo_clip_loss", "grpo_loss",
]


def _lm_divergence(divergence: str | Divergence) -> Divergence:
    d = get_divergence(divergence)
    return d if d.convention == "lm" else d.dual()


def _compute_dtype(*xs: Tensor) -> torch.dtype:
    # log-probabilities of long sequences lose their differences in bf16; compute in fp32 (fp64 if given fp64)
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _reduce(values: Tensor, mask: Tensor, reduction: str) -> Tensor:
    if reduction == "token_mean":  # mean over every unmasked token of the batch (GRPO / DAPO style)
        return (values * mask).sum() / mask.sum().clamp(min=1)
    if reduction == "sequence_mean":  # mean over tokens within a sequence, then over sequences
        return ((values * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if reduction == "sequence_sum":  # per-sequence sums, shape [B]
        return (values * mask).sum(-1)
    if reduction == "none":
        return values * mask
    raise ValueError(f"unknown reduction {reduction!r}; use token_mean, sequence_mean, sequence_sum or none")


# ---------------------------------------------------------------------------------------------------------------
# f-DPO
# ---------------------------------------------------------------------------------------------------------------

class FDPOOutput(NamedTuple):
    losses: Tensor            # [B] per-pair losses
    chosen_rewards: Tensor    # [B] implicit rewards beta (g'(u_w) - g'(1)), detached
    rejected_rewards: Tensor  # [B]


def f_dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
               ref_rejected_logps: Tensor, beta: float = 0.1,
               divergence: str | Divergence = "reverse_kl") -> FDPOOutput:
    """f-DPO (Wang et al., "Beyond Reverse KL", arXiv 2309.16240, eq. 8 / Theorem 1).

    L = -log sigmoid( beta g'(u_w) - beta g'(u_l) ),  u = pi_theta(y|x) / pi_ref(y|x) on whole responses,

    where g is the LM-convention generator (D_g(pi || pi_ref) = E_{pi_ref}[g(pi/pi_ref)]), i.e.
    ``get_divergence(divergence).dual()``. With ``reverse_kl`` g'(u) = log u + 1 and this is DPO exactly;
    ``forward_kl`` gives g'(u) = -1/u, ``js`` g'(u) = log(2u/(1+u)), ``alpha:a`` g'(u) = (1 - u^-a)/a (the
    paper's alpha with the same a). Any registry name works.

    Inputs are *summed* response log-probabilities, shape [B]. The log-ratio is formed in fp32 and every
    exponent is clamped (the registry's EXP_MAX), so forward-KL / alpha scores stay finite when a long response
    makes |log u| reach hundreds; beyond the clamp the score saturates and its gradient is zero.

    Returns ``FDPOOutput(losses, chosen_rewards, rejected_rewards)``: per-pair losses and the implicit rewards
    beta (g'(u) - g'(1)), which are 0 at initialisation and equal DPO's beta log u for reverse KL.
    """
    g = _lm_divergence(divergence)
    dtype = _compute_dtype(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    log_u_w = policy_chosen_logps.to(dtype) - ref_chosen_logps.to(dtype)
    log_u_l = policy_rejected_logps.to(dtype) - ref_rejected_logps.to(dtype)
    score_w, score_l = g.f_prime(log_u_w), g.f_prime(log_u_l)
    losses = -F.logsigmoid(beta * (score_w - score_l))
    g1 = g.f_prime(torch.zeros((), dtype=dtype))
    return FDPOOutput(losses, (beta * (score_w - g1)).detach(), (beta * (score_l - g1)).detach())


# ---------------------------------------------------------------------------------------------------------------
# TDPO
# ---------------------------------------------------------------------------------------------------------------

def token_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Per-token log pi(label) from logits aligned with labels ([B, T, V], [B, T]); returns (logps, mask).

    Masked positions (label == ignore_index) get log-prob 0 and mask 0.
    """
    mask = labels != ignore_index
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return logps * mask, mask


def sequence_kl(policy_logits: Tensor, ref_logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """TDPO's sequential KL: sum_t KL(pi_ref(.|x, y_<t) || pi_theta(.|x, y_<t)) over the full vocabulary.

    Note the direction: the *reference* is the first argument (Zeng et al. 2024, eq. 11 / TDPO's D_SeqKL).
    Logits are aligned with labels ([B, T, V], [B, T]); positions whose label is ``ignore_index`` count 0.
    Returns [B].
    """
    mask = labels != ignore_index
    logp_ref = torch.log_softmax(ref_logits.float(), dim=-1)
    logp_pol = torch.log_softmax(policy_logits.float(), dim=-1)
    p_ref = logp_ref.exp()
    # 0 * log 0 = 0: tokens the reference cannot emit contribute nothing (avoids -inf * 0 = nan)
    kl_terms = torch.where(p_ref > 0, p_ref * (logp_ref - logp_pol), torch.zeros_like(p_ref))
    return (kl_terms.sum(-1) * mask).sum(-1)


class TDPOOutput(NamedTuple):
    losses: Tensor            # [B] per-pair losses
    chosen_rewards: Tensor    # [B] beta * sum_t log(pi/pi_ref) on the chosen response, detached
    rejected_rewards: Tensor  # [B]
    chosen_seq_kl: Tensor     # [B] SeqKL(x, y_w), detached
    rejected_seq_kl: Tensor   # [B]


def tdpo_loss(policy_logits_chosen: Tensor, ref_logits_chosen: Tensor, labels_chosen: Tensor,
              policy_logits_rejected: Tensor, ref_logits_rejected: Tensor, labels_rejected: Tensor,
              beta: float = 0.1, alpha: float = 0.5, variant: int = 2, ignore_index: int = -100) -> TDPOOutput:
    """Token-level DPO (Zeng et al., "Token-level Direct Preference Optimization", arXiv 2404.11999, eq. 19-20).

    margin m = sum_t (log pi_theta - log pi_ref)(y_t) and SeqKL = sum_t KL(pi_ref || pi_theta) at every response
    position over the full vocabulary (``sequence_kl``):

        TDPO1: -log sigmoid( beta [ (m_w - m_l) - (SeqKL_l - SeqKL_w) ] )
        TDPO2: -log sigmoid( beta [ (m_w - m_l) - alpha (SeqKL_l - stopgrad(SeqKL_w)) ] )   (recommended)

    Logits are aligned with labels: ``logits[:, t]`` is the distribution that predicted ``labels[:, t]`` (shift
    a causal LM's outputs before calling). Labels equal to ``ignore_index`` (prompt and padding) are masked.
    At initialisation (policy = reference) both SeqKL terms and their gradients vanish, so TDPO1 = TDPO2 = DPO.
    """
    if variant not in (1, 2):
        raise ValueError(f"TDPO variant must be 1 or 2, got {variant!r}")
    lp_pol_w, mask_w = token_logps(policy_logits_chosen, labels_chosen, ignore_index)
    lp_ref_w, _ = token_logps(ref_logits_chosen, labels_chosen, ignore_index)
    lp_pol_l, mask_l = token_logps(policy_logits_rejected, labels_rejected, ignore_index)
    lp_ref_l, _ = token_logps(ref_logits_rejected, labels_rejected, ignore_index)
    margin_w = ((lp_pol_w - lp_ref_w) * mask_w).sum(-1)
    margin_l = ((lp_pol_l - lp_ref_l) * mask_l).sum(-1)
    kl_w = sequence_kl(policy_logits_chosen, ref_logits_chosen, labels_chosen, ignore_index)
    kl_l = sequence_kl(policy_logits_rejected, ref_logits_rejected, labels_rejected, ignore_index)
    if variant == 1:
        logits = (margin_w - margin_l) - (kl_l - kl_w)
    else:
        # TDPO2 stops the chosen SeqKL's gradient and scales the KL gap by alpha
        logits = (margin_w - margin_l) - alpha * (kl_l - kl_w.detach())
    losses = -F.logsigmoid(beta * logits)
    return TDPOOutput(losses, (beta * margin_w).detach(), (beta * margin_l).detach(), kl_w.detach(),
                      kl_l.detach())


# ---------------------------------------------------------------------------------------------------------------
# f-DPG
# ---------------------------------------------------------------------------------------------------------------

class FDPGOutput(NamedTuple):
    loss: Tensor             # scalar whose gradient is the f-DPG estimate of grad D_f(pi_theta || p)
    pseudo_rewards: Tensor   # [N] R = -g'(pi/p), detached
    weights: Tensor          # [N] importance weights pi/q, detached
    log_ratio: Tensor        # [N] log(pi/p) (after clamping), detached


def fdpg_loss(policy_logps: Tensor, proposal_logps: Tensor, target_logps: Tensor, log_z: Tensor | float,
              divergence: str | Divergence = "js", baseline: Tensor | float | None = None,
              max_log_ratio: float = EXP_MAX) -> FDPGOutput:
    """f-DPG (Go et al., "Aligning Language Models with Preferences through f-divergence Minimization",
    arXiv 2302.08215, eq. 3 / Algorithm 1).

    grad_theta D_f(pi_theta || p) = E_{x~pi_theta}[ g'(pi_theta(x)/p(x)) grad log pi_theta(x) ]
                                  = -E_{x~q}[ (pi_theta(x)/q(x)) (R(x) - B) grad log pi_theta(x) ],
    with pseudo-reward R = -g'(pi_theta/p), a proposal q and any constant baseline B (it has zero mean under pi).
    D_f(pi || p) = E_p[g(pi/p)] is the LM convention (g = ``get_divergence(divergence).dual()``), so
    ``reverse_kl`` is KL(pi || p) (RL with a KL penalty), ``forward_kl`` is KL(p || pi) (DPG), ``js`` the
    authors' default.

    Args (all [N], one entry per sampled sequence x ~ q):
        policy_logps: log pi_theta(x), with gradient (summed over the sequence's tokens).
        proposal_logps: log q(x) at sampling time (for on-policy samples, the detached policy log-prob).
        target_logps: log P(x) of the unnormalised target p = P / Z, e.g. log a(x) + log b(x) (GDC) or
            log a(x) + r(x)/beta (RLHF); may be -inf where P(x) = 0.
        log_z: the (estimated) log normaliser, a scalar or [N] (per-context for conditional targets).
        baseline: B; e.g. ``MovingAverageBaseline.value``. None means 0.
        max_log_ratio: |log(pi/p)| is clamped here: where P(x) = 0 the ratio is infinite and divergences
            unbounded in u (reverse KL, ...) would otherwise give an infinite pseudo-reward.

    Returns ``FDPGOutput(loss, pseudo_rewards, weights, log_ratio)``; ``loss`` averages over the N samples.
    """
    g = _lm_divergence(divergence)
    dtype = _compute_dtype(policy_logps, proposal_logps, target_logps)
    pol = policy_logps.to(dtype)
    log_z = torch.as_tensor(log_z, dtype=dtype, device=pol.device)
    target = target_logps.to(dtype)
    # P(x) = 0 means p(x) = 0 whatever Z is (also when Z-hat is still 0: -inf - (-inf) would be nan)
    log_p = torch.where(torch.isneginf(target), target, target - log_z)
    log_u = (pol.detach() - log_p).clamp(-max_log_ratio, max_log_ratio)
    pseudo_rewards = -g.f_prime(log_u)
    weights = torch.exp((pol.detach() - proposal_logps.to(dtype)).clamp(max=EXP_MAX))
    b = 0.0 if baseline is None else torch.as_tensor(baseline, dtype=dtype, device=pol.device)
    advantage = weights * (pseudo_rewards - b)
    loss = -(advantage.detach() * pol).mean()
    return FDPGOutput(loss, pseudo_rewards.detach(), weights.detach(), log_u.detach())


class MovingAverageBaseline:
    """f-DPG's baseline: the mean of the last ``window`` importance-weighted pseudo-rewards (pi/q) R.

    (pi/q) R has mean E_pi[R] under q, so the baseline tracks the expected pseudo-reward; Go et al. use a
    moving average (window 1024 in our recipes). Until the first update it is 0.
    """

    def __init__(self, window: int = 1024):
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = window
        self._values: deque[float] = deque(maxlen=window)

    @property
    def value(self) -> float:
        return sum(self._values) / len(self._values) if self._values else 0.0

    def update(self, pseudo_rewards: Tensor, weights: Tensor | None = None) -> float:
        vals = pseudo_rewards.detach().double()
        if weights is not None:
            vals = vals * weights.detach().double()
        self._values.extend(vals.flatten().tolist())
        return self.value

    def state_dict(self) -> dict:
        return {"window": self.window, "values": list(self._values)}

    def load_state_dict(self, state: dict) -> None:
        self.window = int(state["window"])
        self._values = deque(state["values"], maxlen=self.window)


def importance_log_z(target_logps: Tensor, proposal_logps: Tensor) -> Tensor:
    """log Z ~= log mean_{x~q} P(x)/q(x): the importance-sampling estimate of the target's normaliser.

    Computed with logsumexp (no P/q is ever exponentiated on its own). Z-hat is unbiased; log Z-hat is not
    (Jensen), which is why ``LogZEstimator`` pools samples across steps.
    """
    lw = target_logps.double() - proposal_logps.double()
    return torch.logsumexp(lw.flatten(), 0) - math.log(lw.numel())


class LogZEstimator:
    """Running importance-sampling estimate of log Z, pooled over every sample seen (per key).

    For a conditional target p(y|x) = P(x, y) / Z(x) pass the context as the key (e.g. the prompt string);
    every sample from any past proposal is an unbiased term of Z, so pooling them only lowers the variance.
    """

    def __init__(self):
        self._lse: dict[Hashable, float] = {}
        self._n: dict[Hashable, int] = {}

    def update(self, target_logps: Tensor, proposal_logps: Tensor, keys: Sequence[Hashable] | None = None) -> None:
        lw = (target_logps.detach().double() - proposal_logps.detach().double()).flatten().tolist()
        keys = [None] * len(lw) if keys is None else list(keys)
        if len(keys) != len(lw):
            raise ValueError("one key per sample")
        for k, v in zip(keys, lw):
            old = self._lse.get(k, -math.inf)
            hi = max(old, v)
            self._lse[k] = hi if hi == -math.inf else hi + math.log(math.exp(old - hi) + math.exp(v - hi))
            self._n[k] = self._n.get(k, 0) + 1

    def log_z(self, key: Hashable = None) -> float:
        if key not in self._n:
            raise KeyError(f"no samples seen for {key!r}")
        return self._lse[key] - math.log(self._n[key])

    def log_z_for(self, keys: Iterable[Hashable]) -> Tensor:
        return torch.tensor([self.log_z(k) for k in keys], dtype=torch.float64)

    def state_dict(self) -> dict:
        return {"lse": dict(self._lse), "n": dict(self._n)}

    def load_state_dict(self, state: dict) -> None:
        self._lse, self._n = dict(state["lse"]), dict(state["n"])


# ---------------------------------------------------------------------------------------------------------------
# DPH-RL
# ---------------------------------------------------------------------------------------------------------------

def dph_penalty(policy_token_logps: Tensor, ref_token_logps: Tensor, mask: Tensor,
                divergence: str | Divergence = "forward_kl", reduction: str = "token_mean") -> Tensor:
    """DPH-RL's divergence term (Li et al., "The Choice of Divergence", arXiv 2509.07430, section 4).

    Estimates D_f(pi_theta || pi_ref) = E_{pi_ref}[g(u)] per token, u = pi_theta(y_t|.) / pi_ref(y_t|.), on
    samples y ~ pi_ref stored before training together with their reference log-probs (no reference model
    online). The generator is the LM-convention g of the registry, written in its non-negative form

        g(u) - g'(1) (u - 1)    (E_{pi_ref}[u - 1] = 0 per token, so the expectation is unchanged)

    which for ``forward_kl`` (g = -log u) is the k3 estimator u - log u - 1 of KL(pi_ref || pi_theta); for
    ``js`` it is g_JS(u) = u log u - (1+u) log((1+u)/2) (2 JSD, not halved); for ``alpha:a`` it is
    (u^(1-a) - (1-a) u - a) / (a (a-1)) (DPH-RL's default a = 0.2).

    Args: per-token log-probs [B, T] of the stored tokens under the policy (with gradient) and the reference
    (stored), and a [B, T] mask of response tokens. ``reduction``: ``token_mean`` (default), ``sequence_mean``,
    ``sequence_sum`` ([B]) or ``none`` ([B, T]).
    """
    g = _lm_divergence(divergence)
    dtype = _compute_dtype(policy_token_logps, ref_token_logps)
    log_u = policy_token_logps.to(dtype) - ref_token_logps.to(dtype)
    slope = g.f_prime(torch.zeros((), dtype=dtype))
    values = g.f(log_u) - slope * torch.expm1(log_u.clamp(max=EXP_MAX))
    return _reduce(values, mask.to(dtype), reduction)


def grpo_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO's group-relative advantages (Shao et al. 2024): (r - mean_group) / (std_group + eps).

    ``rewards`` is [N] with N = n_prompts * group_size, the samples of one prompt consecutive. A group whose
    rewards are all equal gets advantage 0 (it carries no signal). ``scale=False`` skips the std (Dr. GRPO).
    """
    r = rewards.double().view(-1, group_size)
    adv = r - r.mean(-1, keepdim=True)
    if scale:
        adv = adv / (r.std(-1, keepdim=True, unbiased=False) + eps)
    return adv.flatten().to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def ppo_clip_loss(policy_token_logps: Tensor, old_token_logps: Tensor, advantages: Tensor, mask: Tensor,
                  clip_eps: float = 0.2, clip_eps_high: float | None = None,
                  reduction: str = "token_mean") -> Tensor:
    """PPO's clipped surrogate per token (Schulman et al. 2017), without a KL term (GRPO as DPH-RL runs it).

    -min(rho A, clip(rho, 1 - eps, 1 + eps_high) A), rho = pi_theta(y_t) / pi_old(y_t), A per sequence [B].
    The log-ratio is clamped to +-20 so that a stale sample cannot produce inf * 0.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    dtype = _compute_dtype(policy_token_logps, old_token_logps)
    ratio = torch.exp((policy_token_logps.to(dtype) - old_token_logps.to(dtype)).clamp(-20.0, 20.0))
    adv = advantages.to(dtype).unsqueeze(-1)
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_eps, 1.0 + eps_high) * adv)
    return _reduce(per_token, mask.to(dtype), reduction)


def grpo_loss(policy_token_logps: Tensor, old_token_logps: Tensor, rewards: Tensor, mask: Tensor,
              group_size: int, clip_eps: float = 0.2, scale_advantages: bool = True) -> Tensor:
    """GRPO without a KL term: ``ppo_clip_loss`` with ``grpo_advantages`` (DPH-RL's exploration-prompt loss)."""
    adv = grpo_advantages(rewards, group_size, scale=scale_advantages)
    return ppo_clip_loss(policy_token_logps, old_token_logps, adv, mask, clip_eps)
