"""Closed-form checks of the LM losses (the f-DPO, TDPO, f-DPG and DPH-RL papers; docs/lm.md)."""

import math

import pytest
import torch
import torch.nn.functional as F

from fdistill.divergences import get_divergence
from fdistill.lm import (LogZEstimator, MovingAverageBaseline, dph_penalty, f_dpo_loss, fdpg_loss,
                         grpo_advantages, importance_log_z, ppo_clip_loss, sequence_kl, tdpo_loss, token_logps)

ALL = ["reverse_kl", "forward_kl", "js", "squared_hellinger", "jeffreys", "softened_rkl", "pearson", "neyman",
       "alpha:0.5", "alpha:0.2", "alpha:-1", "alpha:2", "alpha:0", "alpha:1"]


def _logps(n=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(-20 * torch.rand(n, generator=g, dtype=dtype)) for _ in range(4)]


# --- f-DPO ------------------------------------------------------------------------------------------------------

def test_reverse_kl_fdpo_is_dpo():
    pw, pl, rw, rl = _logps()
    beta = 0.3
    out = f_dpo_loss(pw, pl, rw, rl, beta=beta, divergence="reverse_kl")
    dpo = -F.logsigmoid(beta * ((pw - rw) - (pl - rl)))
    torch.testing.assert_close(out.losses, dpo)
    torch.testing.assert_close(out.chosen_rewards, beta * (pw - rw))
    torch.testing.assert_close(out.rejected_rewards, beta * (pl - rl))


@pytest.mark.parametrize("name", ["forward_kl", "js", "alpha:0.5", "alpha:0.3"])
def test_fdpo_closed_forms(name):
    pw, pl, rw, rl = _logps(seed=1)
    uw, ul = torch.exp(pw - rw), torch.exp(pl - rl)
    gp = {"forward_kl": lambda u: -1 / u, "js": lambda u: torch.log(2 * u / (1 + u)),
          "alpha:0.5": lambda u: (1 - u ** -0.5) / 0.5, "alpha:0.3": lambda u: (1 - u ** -0.3) / 0.3}[name]
    out = f_dpo_loss(pw, pl, rw, rl, beta=0.1, divergence=name)
    torch.testing.assert_close(out.losses, -F.logsigmoid(0.1 * (gp(uw) - gp(ul))))


@pytest.mark.parametrize("name", ALL)
def test_fdpo_log2_at_reference(name):
    pw, pl, _, _ = _logps(seed=2)
    out = f_dpo_loss(pw, pl, pw.clone(), pl.clone(), beta=0.1, divergence=name)
    torch.testing.assert_close(out.losses, torch.full_like(pw, math.log(2)))
    assert out.chosen_rewards.abs().max() < 1e-12 and out.rejected_rewards.abs().max() < 1e-12


@pytest.mark.parametrize("name,expected", [("reverse_kl", -0.5), ("forward_kl", -0.5), ("alpha:0.5", -0.5),
                                           ("alpha:0.2", -0.5), ("alpha:-1", -0.5), ("js", -0.25)])
def test_fdpo_initial_gradient(name, expected):
    beta = 0.2
    pw, pl, rw, rl = _logps(seed=3)
    pw = rw.clone().requires_grad_(True)
    pl = rl.clone().requires_grad_(True)
    out = f_dpo_loss(pw, pl, rw, rl, beta=beta, divergence=name)
    gw, gl = torch.autograd.grad(out.losses.sum(), (pw, pl))
    torch.testing.assert_close(gw, torch.full_like(gw, expected * beta))
    torch.testing.assert_close(gl, torch.full_like(gl, -expected * beta))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fdpo_finite_at_extreme_logps(name, dtype):
    # |log u| = 1020: a long response; exp(1020) overflows every float type
    pw = torch.tensor([410.0, -610.0, -610.0, 410.0], dtype=dtype, requires_grad=True)
    rw = torch.tensor([-610.0, 410.0, 0.0, 0.0], dtype=dtype)
    pl = torch.tensor([-610.0, 410.0, 410.0, -5.0], dtype=dtype, requires_grad=True)
    rl = torch.tensor([410.0, -610.0, 0.0, -5.0], dtype=dtype)
    out = f_dpo_loss(pw, pl, rw, rl, beta=0.1, divergence=name)
    assert torch.isfinite(out.losses).all(), out.losses
    assert (out.losses >= 0).all()
    gw, gl = torch.autograd.grad(out.losses.sum(), (pw, pl))
    assert torch.isfinite(gw).all() and torch.isfinite(gl).all()


def test_fdpo_forward_kl_saturates_the_right_way():
    # chosen far below the reference -> forward KL's score -1/u is hugely negative -> large loss, not nan
    out = f_dpo_loss(torch.tensor([-1000.0]), torch.tensor([-10.0]), torch.tensor([-10.0]),
                     torch.tensor([-10.0]), divergence="forward_kl")
    assert out.losses.item() > 1e6
    out = f_dpo_loss(torch.tensor([-10.0]), torch.tensor([-1000.0]), torch.tensor([-10.0]),
                     torch.tensor([-10.0]), divergence="forward_kl")
    assert out.losses.item() < 1e-6


# --- TDPO -------------------------------------------------------------------------------------------------------

def _tdpo_inputs(B=3, T=7, V=11, seed=0, same=True):
    g = torch.Generator().manual_seed(seed)
    ref_w, ref_l = torch.randn(B, T, V, generator=g), torch.randn(B, T, V, generator=g)
    if same:
        pol_w, pol_l = ref_w.clone(), ref_l.clone()
    else:
        pol_w, pol_l = ref_w + torch.randn(B, T, V, generator=g), ref_l + torch.randn(B, T, V, generator=g)
    lab_w, lab_l = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    lab_w[:, :2] = -100  # prompt
    lab_l[:, :3] = -100
    lab_l[0, -2:] = -100  # padding
    return pol_w.requires_grad_(True), ref_w, lab_w, pol_l.requires_grad_(True), ref_l, lab_l


def _dpo_from_logits(pol_w, ref_w, lab_w, pol_l, ref_l, lab_l, beta):
    lp = lambda lg, lab: token_logps(lg, lab)[0].sum(-1)  # noqa: E731
    return -F.logsigmoid(beta * ((lp(pol_w, lab_w) - lp(ref_w, lab_w)) - (lp(pol_l, lab_l) - lp(ref_l, lab_l))))


def test_tdpo_equals_dpo_at_initialisation():
    inputs = _tdpo_inputs()
    dpo = _dpo_from_logits(*inputs, beta=0.1)
    g_dpo = torch.autograd.grad(dpo.sum(), (inputs[0], inputs[3]))
    for variant in (1, 2):
        out = tdpo_loss(*inputs, beta=0.1, alpha=0.5, variant=variant)
        torch.testing.assert_close(out.losses, dpo)
        torch.testing.assert_close(out.losses, torch.full_like(dpo, math.log(2)))
        g = torch.autograd.grad(out.losses.sum(), (inputs[0], inputs[3]))
        torch.testing.assert_close(g[0], g_dpo[0])
        torch.testing.assert_close(g[1], g_dpo[1])
        assert g[0].abs().max() > 1e-4  # the DPO gradient itself is not zero


def test_tdpo_variants_differ_away_from_reference():
    pol_w, ref_w, lab_w, pol_l, ref_l, lab_l = _tdpo_inputs(same=False, seed=4)
    beta, alpha = 0.1, 0.5
    lp = lambda lg, lab: token_logps(lg, lab)[0].sum(-1)  # noqa: E731
    m = (lp(pol_w, lab_w) - lp(ref_w, lab_w)) - (lp(pol_l, lab_l) - lp(ref_l, lab_l))
    kw, kl = sequence_kl(pol_w, ref_w, lab_w), sequence_kl(pol_l, ref_l, lab_l)
    t1 = tdpo_loss(pol_w, ref_w, lab_w, pol_l, ref_l, lab_l, beta=beta, variant=1).losses
    t2 = tdpo_loss(pol_w, ref_w, lab_w, pol_l, ref_l, lab_l, beta=beta, alpha=alpha, variant=2).losses
    torch.testing.assert_close(t1, -F.logsigmoid(beta * (m - (kl - kw))))
    torch.testing.assert_close(t2, -F.logsigmoid(beta * (m - alpha * (kl - kw))))
    # TDPO2 stops the gradient of SeqKL_w: its gradient equals that of the formula with kw detached
    g2 = torch.autograd.grad(t2.sum(), pol_w, retain_graph=True)[0]
    ref_g = torch.autograd.grad((-F.logsigmoid(beta * (m - alpha * (kl - kw.detach())))).sum(), pol_w)[0]
    torch.testing.assert_close(g2, ref_g)


def test_tdpo_masking():
    pol_w, ref_w, lab_w, pol_l, ref_l, lab_l = _tdpo_inputs(same=False, seed=5)
    base = tdpo_loss(pol_w, ref_w, lab_w, pol_l, ref_l, lab_l).losses
    # change logits only where the label is masked: nothing may move
    noise_w = torch.randn_like(ref_w) * 5 * (lab_w == -100).unsqueeze(-1)
    noise_l = torch.randn_like(ref_l) * 5 * (lab_l == -100).unsqueeze(-1)
    moved = tdpo_loss(pol_w + noise_w, ref_w - noise_w, lab_w, pol_l + noise_l, ref_l + noise_l, lab_l).losses
    torch.testing.assert_close(moved, base)
    g = torch.autograd.grad(base.sum(), pol_w)[0]
    assert g[lab_w == -100].abs().max() == 0 and g[lab_w != -100].abs().max() > 0
    lp, mask = token_logps(ref_l, lab_l)
    assert (lp[~mask] == 0).all() and mask.sum() == (lab_l != -100).sum()


def test_sequence_kl_direction_is_ref_to_policy():
    g = torch.Generator().manual_seed(6)
    pol, ref = torch.randn(2, 5, 7, generator=g) * 2, torch.randn(2, 5, 7, generator=g) * 2
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[1, 3:] = -100
    p, q = ref.softmax(-1), pol.softmax(-1)
    kl_ref_pol = (p * (p.log() - q.log())).sum(-1)
    kl_pol_ref = (q * (q.log() - p.log())).sum(-1)
    mask = (labels != -100).float()
    got = sequence_kl(pol, ref, labels)
    torch.testing.assert_close(got, (kl_ref_pol * mask).sum(-1))
    assert (got - (kl_pol_ref * mask).sum(-1)).abs().max() > 1e-2  # the other direction is different


def test_sequence_kl_handles_impossible_tokens():
    ref = torch.tensor([[[0.0, -math.inf, 1.0]]])
    pol = torch.tensor([[[0.5, 2.0, 1.0]]])
    kl = sequence_kl(pol, ref, torch.tensor([[0]]))
    assert torch.isfinite(kl).all() and kl.item() > 0


def test_tdpo_rejects_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        tdpo_loss(*_tdpo_inputs(), variant=3)


# --- f-DPG ------------------------------------------------------------------------------------------------------

def _categorical(K=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(K, generator=g, dtype=torch.float64).requires_grad_(True)
    log_P = torch.randn(K, generator=g, dtype=torch.float64) * 1.5 + 3.0  # unnormalised target, Z != 1
    return theta, log_P


def _exact_df_grad(theta, log_P, name):
    log_pi = torch.log_softmax(theta, 0)
    log_p = log_P - torch.logsumexp(log_P, 0)
    g = get_divergence(name).dual()
    D = (log_p.exp() * g.f(log_pi - log_p)).sum()  # D_f(pi || p) = E_p[g(pi / p)]
    return torch.autograd.grad(D, theta)[0]


@pytest.mark.parametrize("name", ["js", "reverse_kl", "forward_kl", "alpha:0.5", "squared_hellinger", "jeffreys"])
@pytest.mark.parametrize("baseline", [None, 0.7])
def test_fdpg_gradient_is_exact_gradient_of_df(name, baseline):
    theta, log_P = _categorical()
    K = theta.numel()
    expected = _exact_df_grad(theta, log_P, name)
    # every category once under a uniform proposal q: mean_x (pi/q)(...) = sum_x pi(x)(...), an exact expectation
    log_pi = torch.log_softmax(theta, 0)
    out = fdpg_loss(log_pi, torch.full((K,), -math.log(K), dtype=torch.float64), log_P,
                    torch.logsumexp(log_P, 0), divergence=name, baseline=baseline)
    got = torch.autograd.grad(out.loss, theta)[0]
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(out.weights, K * log_pi.exp().detach())


def test_fdpg_monte_carlo_with_nonuniform_proposal():
    torch.manual_seed(0)
    theta, log_P = _categorical(seed=1)
    expected = _exact_df_grad(theta, log_P, "js")
    log_q = torch.log_softmax(torch.randn(theta.numel(), dtype=torch.float64), 0)
    x = torch.multinomial(log_q.exp(), 200_000, replacement=True)
    log_pi = torch.log_softmax(theta, 0)
    out = fdpg_loss(log_pi[x], log_q[x], log_P[x], torch.logsumexp(log_P, 0), divergence="js", baseline=0.3)
    got = torch.autograd.grad(out.loss, theta)[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0.01)


def test_fdpg_pseudo_reward_and_zero_target_mass():
    # P(x) = 0 (a GDC constraint violated): the ratio is infinite; losses and rewards stay finite
    pol = torch.tensor([-1.0, -2.0], requires_grad=True)
    tgt = torch.tensor([-1.5, -math.inf])
    for name in ("js", "reverse_kl", "forward_kl", "alpha:0.5"):
        out = fdpg_loss(pol, pol.detach(), tgt, 0.0, divergence=name)
        assert torch.isfinite(out.loss) and torch.isfinite(out.pseudo_rewards).all()
        assert out.pseudo_rewards[1] < out.pseudo_rewards[0]  # the invalid sample is punished
    out = fdpg_loss(pol, pol.detach(), tgt, 0.0, divergence="js")
    lu = torch.tensor(0.5)
    torch.testing.assert_close(out.pseudo_rewards[0], -(math.log(2) + F.logsigmoid(lu)))


def test_moving_average_baseline_window():
    b = MovingAverageBaseline(window=4)
    assert b.value == 0.0
    b.update(torch.tensor([1.0, 2.0, 3.0]))
    assert b.value == pytest.approx(2.0)
    b.update(torch.tensor([10.0, 10.0]), weights=torch.tensor([0.5, 1.0]))  # keeps the last 4: 2, 3, 5, 10
    assert b.value == pytest.approx(5.0)
    c = MovingAverageBaseline()
    c.load_state_dict(b.state_dict())
    assert c.value == b.value and c.window == 4


def test_log_z_estimators():
    torch.manual_seed(1)
    _, log_P = _categorical(seed=2)
    true = torch.logsumexp(log_P, 0).item()
    log_q = torch.log_softmax(torch.randn(log_P.numel(), dtype=torch.float64), 0)
    x = torch.multinomial(log_q.exp(), 100_000, replacement=True)
    assert importance_log_z(log_P[x], log_q[x]).item() == pytest.approx(true, abs=0.02)
    est = LogZEstimator()
    for chunk in x.split(1000):
        est.update(log_P[chunk], log_q[chunk], keys=["a"] * len(chunk))
    assert est.log_z("a") == pytest.approx(importance_log_z(log_P[x], log_q[x]).item(), abs=1e-9)
    with pytest.raises(KeyError):
        est.log_z("b")


# --- DPH-RL -----------------------------------------------------------------------------------------------------

def _two_categoricals(K=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64), 0),
            torch.log_softmax(torch.randn(K, generator=g, dtype=torch.float64) * 1.5, 0))


def _closed_form(name, pi, ref):
    if name == "forward_kl":
        return (ref * (ref.log() - pi.log())).sum()
    if name == "reverse_kl":
        return (pi * (pi.log() - ref.log())).sum()
    if name == "js":  # un-halved: 2 JSD
        m = (pi + ref) / 2
        return (pi * (pi / m).log()).sum() + (ref * (ref / m).log()).sum()
    a = float(name.split(":")[1])
    return (1 - (pi ** (1 - a) * ref ** a).sum()) / (a * (1 - a))


@pytest.mark.parametrize("name", ["forward_kl", "js", "alpha:0.2", "alpha:0.5", "reverse_kl"])
def test_dph_generator_expectation_is_divergence(name):
    log_pi, log_ref = _two_categoricals()
    # each category as a one-token "sample"; weight by pi_ref to take the exact expectation
    vals = dph_penalty(log_pi.view(-1, 1), log_ref.view(-1, 1), torch.ones(log_pi.numel(), 1), name,
                       reduction="none").squeeze(-1)
    assert (vals >= -1e-12).all()  # the non-negative form
    expectation = (log_ref.exp() * vals).sum()
    torch.testing.assert_close(expectation, _closed_form(name, log_pi.exp(), log_ref.exp()))


def test_dph_forward_kl_is_k3():
    lp, lr = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    u = torch.exp(lp - lr)
    vals = dph_penalty(lp, lr, torch.ones(3, 5), "forward_kl", reduction="none")
    torch.testing.assert_close(vals, u - torch.log(u) - 1)


def test_dph_monte_carlo_over_sequences():
    # two-token sequences sampled from the reference; token-wise sum of the generator = sequence KL(ref || pi)
    torch.manual_seed(2)
    K = 4
    ref1, pi1 = torch.log_softmax(torch.randn(K, dtype=torch.float64), 0), torch.log_softmax(torch.randn(K, dtype=torch.float64), 0)
    ref2, pi2 = torch.log_softmax(torch.randn(K, K, dtype=torch.float64), -1), torch.log_softmax(torch.randn(K, K, dtype=torch.float64), -1)
    n = 100_000
    y1 = torch.multinomial(ref1.exp(), n, replacement=True)
    y2 = torch.multinomial(ref2.exp()[y1], 1).squeeze(-1)
    lp = torch.stack([pi1[y1], pi2[y1, y2]], -1)
    lr = torch.stack([ref1[y1], ref2[y1, y2]], -1)
    est = dph_penalty(lp, lr, torch.ones(n, 2), "forward_kl", reduction="sequence_sum").mean()
    p_ref = ref1.exp()[:, None] * ref2.exp()
    p_pi = pi1.exp()[:, None] * pi2.exp()
    exact = (p_ref * (p_ref.log() - p_pi.log())).sum()
    assert est.item() == pytest.approx(exact.item(), abs=0.02)


@pytest.mark.parametrize("name", ["forward_kl", "js", "alpha:0.2"])
def test_dph_penalty_gradient_vanishes_at_reference(name):
    lr = torch.randn(4, 6, dtype=torch.float64)
    lp = lr.clone().requires_grad_(True)
    mask = torch.ones(4, 6)
    mask[0, 3:] = 0
    v = dph_penalty(lp, lr, mask, name)
    assert v.item() == pytest.approx(0.0, abs=1e-12)
    (g,) = torch.autograd.grad(v, lp)
    assert g.abs().max() < 1e-12
    # away from it, masked tokens get no gradient and the rest do
    lp2 = (lr + torch.randn_like(lr)).requires_grad_(True)
    (g2,) = torch.autograd.grad(dph_penalty(lp2, lr, mask, name), lp2)
    assert g2[0, 3:].abs().max() == 0 and g2[1].abs().min() > 0


def test_grpo_advantages_and_ppo_clip():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = grpo_advantages(r, group_size=4)
    torch.testing.assert_close(adv[:4], torch.tensor([1.0, -1.0, 1.0, -1.0]), atol=1e-5, rtol=0)
    assert (adv[4:] == 0).all()  # a solved group carries no signal
    old = torch.randn(2, 3)
    mask = torch.ones(2, 3)
    # at the sampling policy (ratio 1): gradient is -A / n_tokens on each token's log-prob
    lp = old.clone().requires_grad_(True)
    a = torch.tensor([2.0, -1.0])
    (g,) = torch.autograd.grad(ppo_clip_loss(lp, old, a, mask), lp)
    torch.testing.assert_close(g, -a[:, None].expand(2, 3) / 6)
    # ratio beyond 1 + eps with a positive advantage: clipped, no gradient
    lp = (old + 1.0).requires_grad_(True)
    (g,) = torch.autograd.grad(ppo_clip_loss(lp, old, torch.tensor([1.0, 1.0]), mask, clip_eps=0.2), lp)
    assert g.abs().max() == 0
    # ... but with a negative advantage the unclipped (pessimistic) term keeps its gradient
    (g,) = torch.autograd.grad(ppo_clip_loss(lp, old, torch.tensor([-1.0, -1.0]), mask, clip_eps=0.2), lp)
    assert g.abs().min() > 0
