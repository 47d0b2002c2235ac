"""The estimator is the gradient: on Gaussians with analytic scores and ratio, FDistill's generator gradient
equals the gradient of D_f(p_sigma || q_sigma) computed independently by quadrature (within Monte-Carlo error)."""

import math

import pytest
import torch
import torch.nn as nn

from fdistill.denoisers import Denoiser
from fdistill.divergences import PAPER_DIVERGENCES, get_divergence
from fdistill.noise import NoiseSchedule
from fdistill.objective import FDistill, ObjectiveConfig
from fdistill.ratio import RatioConfig, RatioNormalizer



@pytest.fixture(autouse=True)
def _float64():
    """The exact comparison runs in float64; restore the default afterwards so other tests are unaffected."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


M_P, V_P = 0.0, 1.0  # teacher N(0, 1)
SIGMA = 0.5


class GaussDenoiser(Denoiser):
    """Exact denoiser of N(mean, var) noised by sigma; features = x_t itself."""

    def __init__(self, mean_fn, var_fn):
        super().__init__(None, ())
        self.mean_fn, self.var_fn = mean_fn, var_fn

    def denoise(self, x_t, sigma, cond=None):
        m, v = self.mean_fn(), self.var_fn()
        return m + v / (v + sigma ** 2) * (x_t - m)

    def forward(self, x_t, sigma, cond=None, mode="x0", x0_grad=True):
        self.calls[mode] += 1
        s = torch.as_tensor(sigma).reshape(-1, 1)
        x0 = self.denoise(x_t, s)
        return x0 if mode == "x0" else ([x_t] if mode == "features" else (x0, [x_t]))


class GaussGenerator(nn.Module):
    def __init__(self, mu, s):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(mu))
        self.log_s = nn.Parameter(torch.tensor(math.log(s)))

    def forward(self, z, cond=None):
        return self.mu + self.log_s.exp() * z


def log_normal(x, m, v):
    return -0.5 * (x - m) ** 2 / v - 0.5 * torch.log(2 * math.pi * v)


def reference_gradient(name, mu, s):
    """d/d(mu, log s) of D_f(p_sigma || q_sigma) = int q f(p/q) dx by quadrature, differentiated by autograd."""
    d = get_divergence(name)
    mu_t = torch.tensor(mu, requires_grad=True)
    ls_t = torch.tensor(math.log(s), requires_grad=True)
    x = torch.linspace(-14, 14, 40001)
    vq = ls_t.exp() ** 2 + SIGMA ** 2
    log_q = log_normal(x, mu_t, vq)
    log_p = log_normal(x, torch.tensor(M_P), torch.tensor(V_P + SIGMA ** 2))
    D = torch.trapezoid(log_q.exp() * d.f(log_p - log_q), x)
    g_mu, g_ls = torch.autograd.grad(D, [mu_t, ls_t])
    return torch.stack([g_mu, g_ls])


def estimator_gradient(name, mu, s, n, seed):
    gen = GaussGenerator(mu, s)
    teacher = GaussDenoiser(lambda: torch.tensor(M_P), lambda: torch.tensor(V_P))
    fake = GaussDenoiser(lambda: gen.mu.detach(), lambda: gen.log_s.detach().exp() ** 2)

    class ExactRatio(nn.Module):
        def forward(self, feats):
            x = feats[0].reshape(-1)
            vq = gen.log_s.detach().exp() ** 2 + SIGMA ** 2
            return log_normal(x, torch.tensor(M_P), torch.tensor(V_P + SIGMA ** 2)) - log_normal(x, gen.mu.detach(), vq)

    off = RatioConfig(logit_clamp=1e4, r_min=0.0, r_max=float("inf"), normalize_ratio=False, normalize_weight=False)
    sched = NoiseSchedule.continuous(SIGMA, SIGMA)
    obj = FDistill(gen, teacher, fake, ExactRatio(), get_divergence(name), RatioNormalizer(off, (SIGMA, SIGMA)),
                   sched, ObjectiveConfig(gan_weight=0.0, dmd_normalize=False))
    rng = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 1, generator=rng)
    loss, logs = obj.generator_loss(z, None, rng)
    grads = torch.autograd.grad(loss, [gen.mu, gen.log_s])
    # grad of 0.5 mean (x - sg(x - g))^2 is mean(g dx/dtheta), and g = h sigma^2 (score_q - score_p)
    return torch.stack(list(grads)) / SIGMA ** 2


CASES = [(name, 0.5, 1.3) for name in PAPER_DIVERGENCES] + [
    (name, 0.7, 0.8) for name in ("reverse_kl", "js", "softened_rkl", "squared_hellinger")]


@pytest.mark.parametrize("name,mu,s", CASES)
def test_generator_gradient_matches_divergence_gradient(name, mu, s):
    ref = reference_gradient(name, mu, s)
    # four independent estimates give the Monte-Carlo error
    ests = torch.stack([estimator_gradient(name, mu, s, 100_000, seed) for seed in range(4)])
    est = ests.mean(0)
    se = ests.std(0) / 2 + 1e-4
    assert ((est - ref).abs() <= 5 * se + 0.02 * ref.abs()).all(), (name, est, ref, se)
    assert (ref.abs() > 1e-3).all()  # the case is informative: the gradient is not ~0


def test_reverse_kl_estimator_is_dmd():
    """With h = 1 the weighting is the identity: every divergence's loss at r = 1 equals reverse KL's."""
    a = estimator_gradient("reverse_kl", 0.3, 1.1, 20_000, 0)
    b = estimator_gradient("alpha:0", 0.3, 1.1, 20_000, 0)
    torch.testing.assert_close(a, b)
