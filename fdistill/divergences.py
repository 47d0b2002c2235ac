"""The f-divergence registry: the one place divergences live (f-distill, arXiv 2502.15681, Table 1).

Convention (diffusion side, f-distill): D_f(p || q) = E_q[f(p/q)], r = p/q = target over model.
Every function takes **log r** (a discriminator logit or a log-probability difference), never r itself,
and is evaluated in float32 with clamped exponents so that it stays finite for |log r| up to 80 in float32
and bfloat16 (the result is cast back to the input's dtype).

    f(log r)        the generator f(r)
    f_prime(log r)  f'(r)
    weight(log r)   h(r) = r^2 f''(r), the per-sample weight of the f-distill gradient (paper, Table 1)

``Divergence.dual()`` returns the same divergence in the LM convention of f-DPO / f-DPG / DPH-RL:
u = pi/pi_ref = model over reference and g(u) = u f(1/u) (the Csiszar dual). Its functions take log u.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
LOG2 = math.log(2.0)
# exp() arguments are clamped here: exp(80) ~ 5.5e34 leaves room below float32 / bfloat16's max (~3.4e38)
# for the small factors the generators multiply it with.
EXP_MAX = 80.0


def _exp(x: Tensor) -> Tensor:
    return torch.exp(x.clamp(max=EXP_MAX))


def _expm1(x: Tensor) -> Tensor:
    return torch.expm1(x.clamp(max=EXP_MAX))


@dataclass(frozen=True)
class _Fns:
    f: Callable[[Tensor], Tensor]
    f_prime: Callable[[Tensor], Tensor]
    weight: Callable[[Tensor], Tensor]


def _float_call(fn: Callable[[Tensor], Tensor], log_ratio: Tensor | float) -> Tensor:
    x = torch.as_tensor(log_ratio)
    out_dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return fn(x.to(compute)).to(out_dtype)


class Divergence:
    """An f-divergence with functions of the log-ratio.

    Attributes:
        name: registry name (``js``, ``alpha:0.5`` ...). Names are semantic and shared by both conventions:
            ``reverse_kl`` is KL(model || target) on the diffusion side and KL(pi || pi_ref) on the LM side.
        convention: ``"diffusion"`` (argument log r, r = target/model) or ``"lm"`` (argument log u,
            u = model/reference).
        mode_seeking: whether the paper classes it as mode seeking (Table 1).
    """

    def __init__(self, name: str, fns: _Fns, dual_fns: _Fns, convention: str = "diffusion",
                 mode_seeking: str = "no"):
        self.name = name
        self._fns = fns
        self._dual_fns = dual_fns
        self.convention = convention
        self.mode_seeking = mode_seeking

    def f(self, log_ratio: Tensor | float) -> Tensor:
        return _float_call(self._fns.f, log_ratio)

    def f_prime(self, log_ratio: Tensor | float) -> Tensor:
        return _float_call(self._fns.f_prime, log_ratio)

    def weight(self, log_ratio: Tensor | float) -> Tensor:
        """h(r) = r^2 f''(r): the f-distill weight on the score difference."""
        return _float_call(self._fns.weight, log_ratio)

    def dual(self) -> "Divergence":
        """The same divergence in the other convention: g(u) = u f(1/u) (an involution)."""
        other = "lm" if self.convention == "diffusion" else "diffusion"
        return Divergence(self.name, self._dual_fns, self._fns, other, self.mode_seeking)

    def __repr__(self) -> str:
        return f"Divergence({self.name!r}, convention={self.convention!r})"


# --- generators in log r, written so that no intermediate overflows ------------------------------------------
# Each tuple is (f, f', h) of one generator. The dual of a divergence is again one of these (see _REGISTRY).

_REVERSE_KL = _Fns(  # f = -log r
    f=lambda l: -l,
    f_prime=lambda l: -_exp(-l),
    weight=lambda l: torch.ones_like(l),
)
_FORWARD_KL = _Fns(  # f = r log r
    f=lambda l: _exp(l) * l,
    f_prime=lambda l: l + 1.0,
    weight=lambda l: _exp(l),
)
_JS = _Fns(  # f = r log r - (r+1) log((r+1)/2) = r (logsigmoid(l) + log 2) - softplus(l) + log 2
    f=lambda l: _exp(l) * (F.logsigmoid(l) + LOG2) - F.softplus(l) + LOG2,
    f_prime=lambda l: F.logsigmoid(l) + LOG2,
    weight=lambda l: torch.sigmoid(l),
)
_HELLINGER = _Fns(  # f = 1 - sqrt(r); same h as (sqrt(r) - 1)^2 up to a factor-free linear term
    f=lambda l: -torch.expm1(0.5 * l.clamp(max=2 * EXP_MAX)),
    f_prime=lambda l: -0.5 * _exp(-0.5 * l),
    weight=lambda l: 0.25 * _exp(0.5 * l),
)
_HELLINGER_DUAL = _Fns(  # g = u - sqrt(u)
    f=lambda l: _exp(l) - _exp(0.5 * l),
    f_prime=lambda l: 1.0 - 0.5 * _exp(-0.5 * l),
    weight=lambda l: 0.25 * _exp(0.5 * l),
)
_JEFFREYS = _Fns(  # f = (r - 1) log r
    f=lambda l: _expm1(l) * l,
    f_prime=lambda l: l + 1.0 - _exp(-l),
    weight=lambda l: _exp(l) + 1.0,
)
_SOFTENED_RKL = _Fns(  # f = (r+1) log(1/2 + 1/(2r)) = (r+1)(softplus(-l) - log 2)
    f=lambda l: (_exp(l) + 1.0) * (F.softplus(-l) - LOG2),
    f_prime=lambda l: F.softplus(-l) - LOG2 - _exp(-l),
    weight=lambda l: torch.sigmoid(-l),
)
_SOFTENED_RKL_DUAL = _Fns(  # g = (1+u) log((1+u)/2)
    f=lambda l: (_exp(l) + 1.0) * (F.softplus(l) - LOG2),
    f_prime=lambda l: F.softplus(l) - LOG2 + 1.0,
    weight=lambda l: _exp(l) * torch.sigmoid(l),
)
_PEARSON = _Fns(  # f = (r - 1)^2; r^2 overflows past log r = 40, so the argument saturates there
    f=lambda l: torch.expm1(l.clamp(max=EXP_MAX / 2)) ** 2,
    f_prime=lambda l: 2.0 * _expm1(l),
    weight=lambda l: 2.0 * _exp(2.0 * l),
)
_NEYMAN = _Fns(  # f = (1 - r)^2 / r = r - 2 + 1/r
    f=lambda l: 2.0 * (torch.cosh(l.clamp(-EXP_MAX, EXP_MAX)) - 1.0),
    f_prime=lambda l: -torch.expm1(-2.0 * l.clamp(min=-EXP_MAX / 2)),
    weight=lambda l: 2.0 * _exp(-l),
)


def _alpha_fns(a: float) -> _Fns:
    """Amari alpha family f_a = (r^a - a r - (1 - a)) / (a (a - 1)), h = r^a.

    a = 0 and a = 1 are the limits: r - 1 - log r (reverse KL plus a linear term that changes nothing)
    and r log r - r + 1 (forward KL likewise).
    """
    # within 1e-6 of a limit the closed form loses all precision to cancellation; the limit is exact to O(a)
    if abs(a) < 1e-6:
        return _Fns(
            f=lambda l: _expm1(l) - l,
            f_prime=lambda l: 1.0 - _exp(-l),
            weight=lambda l: torch.ones_like(l),
        )
    if abs(a - 1.0) < 1e-6:
        return _Fns(
            f=lambda l: _exp(l) * l - _expm1(l),
            f_prime=lambda l: l,
            weight=lambda l: _exp(l),
        )

    def safe(l: Tensor) -> Tensor:
        # keep every exponent a*l, (a-1)*l, l below EXP_MAX
        k = max(abs(a), abs(a - 1.0), 1.0)
        return l.clamp(-EXP_MAX / k, EXP_MAX / k)

    return _Fns(
        f=lambda l: (torch.expm1(a * safe(l)) - a * torch.expm1(safe(l))) / (a * (a - 1.0)),
        f_prime=lambda l: torch.expm1((a - 1.0) * safe(l)) / (a - 1.0),
        weight=lambda l: torch.exp(a * safe(l)),
    )


# name -> (generator, dual generator, mode seeking per the paper)
_REGISTRY: dict[str, tuple[_Fns, _Fns, str]] = {
    "reverse_kl": (_REVERSE_KL, _FORWARD_KL, "yes"),
    "softened_rkl": (_SOFTENED_RKL, _SOFTENED_RKL_DUAL, "yes"),
    "js": (_JS, _JS, "medium"),
    "squared_hellinger": (_HELLINGER, _HELLINGER_DUAL, "medium"),
    "forward_kl": (_FORWARD_KL, _REVERSE_KL, "no"),
    "jeffreys": (_JEFFREYS, _JEFFREYS, "no"),
    "pearson": (_PEARSON, _NEYMAN, "no"),
    "neyman": (_NEYMAN, _PEARSON, "yes"),
}
# Short names, among them NVlabs/FastGen's f-distill keys with FastGen's meanings
# (fastgen/methods/distribution_matching/f_distill.py, all_f_div_weighting_function): there ``kl`` has weight
# h(r) = r, i.e. forward KL, so a ported FastGen config keeps its divergence.
ALIASES = {"rkl": "reverse_kl", "fkl": "forward_kl", "kl": "forward_kl", "jensen_shannon": "js",
           "sf": "softened_rkl", "sh": "squared_hellinger", "hellinger": "squared_hellinger", "jf": "jeffreys"}
# Names that could mean more than one divergence: refused with the choices rather than guessed.
AMBIGUOUS = {"chi2": ("pearson", "neyman"), "chi_squared": ("pearson", "neyman"),
             "kullback_leibler": ("forward_kl", "reverse_kl"), "kld": ("forward_kl", "reverse_kl")}
#: The divergences of the paper's Table 1.
PAPER_DIVERGENCES = ("reverse_kl", "softened_rkl", "js", "squared_hellinger", "forward_kl", "jeffreys")


def available_divergences() -> list[str]:
    return sorted(_REGISTRY) + ["alpha:<a>"]


def get_divergence(name: str) -> Divergence:
    """Look a divergence up by name (diffusion convention; call ``.dual()`` for the LM one).

    ``alpha:<a>`` gives the Amari alpha family for any real a (``alpha:0.5``, ``alpha:-1``).
    """
    if isinstance(name, Divergence):
        return name
    key = str(name).strip().lower()
    if key in AMBIGUOUS:
        raise ValueError(f"divergence {name!r} is ambiguous: pass one of " + ", ".join(AMBIGUOUS[key]))
    key = ALIASES.get(key, key)
    if key.startswith("alpha:") or key.startswith("alpha="):
        raw = key.split(":", 1)[1] if ":" in key else key.split("=", 1)[1]
        try:
            a = float(raw)
        except ValueError:
            raise ValueError(f"alpha divergence needs a real number after 'alpha:', got {name!r} "
                             "(e.g. alpha:0.5)") from None
        if not math.isfinite(a):
            raise ValueError(f"alpha must be finite, got {name!r}")
        mode = "yes" if a <= 0 else ("medium" if a < 1 else "no")
        return Divergence(f"alpha:{a:g}", _alpha_fns(a), _alpha_fns(1.0 - a), "diffusion", mode)
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY) + list(ALIASES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown divergence {name!r}.{hint} Valid names: "
                         + ", ".join(available_divergences()))
    fns, dual_fns, mode = _REGISTRY[key]
    return Divergence(key, fns, dual_fns, "diffusion", mode)
