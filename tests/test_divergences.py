import math

import pytest
import torch

from fdistill.divergences import (PAPER_DIVERGENCES, available_divergences, get_divergence)

NAMES = ["reverse_kl", "forward_kl", "js", "squared_hellinger", "jeffreys", "softened_rkl", "pearson",
         "neyman", "alpha:0", "alpha:1", "alpha:0.5", "alpha:-1", "alpha:2", "alpha:0.2", "alpha:1e-9"]


def _grid():
    return torch.linspace(-4.0, 4.0, 81, dtype=torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_weight_equals_r2_f_second_derivative(name):
    d = get_divergence(name)
    l = _grid()
    r = torch.exp(l).requires_grad_(True)
    f = d.f(torch.log(r))
    (df,) = torch.autograd.grad(f.sum(), r, create_graph=True)
    (d2f,) = torch.autograd.grad(df.sum(), r)
    h_ref = (r * r * d2f).detach()
    torch.testing.assert_close(d.weight(l), h_ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(d.f_prime(l), df.detach(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_f_of_one_is_zero_and_convex(name):
    d = get_divergence(name)
    assert abs(float(d.f(torch.tensor(0.0, dtype=torch.float64)))) < 1e-12
    assert abs(float(d.dual().f(torch.tensor(0.0, dtype=torch.float64)))) < 1e-12
    # convexity in r: h >= 0 <=> f'' >= 0, and a chord check on the r grid
    l = _grid()
    assert (d.weight(l) >= 0).all()
    r = torch.exp(l)
    f = d.f(l)
    mid = d.f(torch.log((r[:-2] + r[2:]) / 2))
    assert (mid <= (f[:-2] + f[2:]) / 2 + 1e-9).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_at_extreme_log_ratios(name, dtype):
    d = get_divergence(name)
    l = torch.tensor([-80.0, -50.0, -10.0, 0.0, 10.0, 50.0, 80.0], dtype=dtype)
    for div in (d, d.dual()):
        for fn in (div.f, div.f_prime, div.weight):
            out = fn(l)
            assert out.dtype == dtype
            assert torch.isfinite(out).all(), (name, fn, out)


@pytest.mark.parametrize("name", NAMES)
def test_dual_is_csiszar_dual(name):
    """g(u) = u f(1/u): in logs, g(log u) = exp(log u) f(-log u); g' and u^2 g'' likewise."""
    d = get_divergence(name)
    g = d.dual()
    assert g.convention == "lm" and g.dual().convention == "diffusion"
    lu = _grid()
    u = torch.exp(lu)
    torch.testing.assert_close(g.f(lu), u * d.f(-lu), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g.f_prime(lu), d.f(-lu) - d.f_prime(-lu) / u, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g.weight(lu), u * d.weight(-lu), rtol=1e-6, atol=1e-9)


def test_dual_closed_forms_from_reference():
    lu = _grid()
    u = torch.exp(lu)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)  # noqa: E731
    close(get_divergence("reverse_kl").dual().f_prime(lu), lu + 1)  # DPO
    close(get_divergence("forward_kl").dual().f_prime(lu), -1 / u)
    close(get_divergence("js").dual().f_prime(lu), torch.log(2 * u / (1 + u)))
    for a in (0.3, 0.5, 0.7, -0.5):
        close(get_divergence(f"alpha:{a}").dual().f_prime(lu), (1 - u ** (-a)) / a)
    # alpha a <-> g = f_{1-a}; pearson <-> neyman
    close(get_divergence("alpha:0.3").dual().f(lu), get_divergence("alpha:0.7").f(lu))
    close(get_divergence("pearson").dual().f(lu), get_divergence("neyman").f(lu))


def test_paper_table_weights():
    l = _grid()
    r = torch.exp(l)
    expected = {"reverse_kl": torch.ones_like(r), "softened_rkl": 1 / (r + 1), "js": r / (r + 1),
                "squared_hellinger": r.sqrt() / 4, "forward_kl": r, "jeffreys": r + 1}
    for name in PAPER_DIVERGENCES:
        torch.testing.assert_close(get_divergence(name).weight(l), expected[name], rtol=1e-6, atol=1e-9)


def test_alpha_limits_are_continuous():
    l = _grid()
    for a0 in (0.0, 1.0):
        for eps in (1e-4, -1e-4):
            torch.testing.assert_close(get_divergence(f"alpha:{a0 + eps}").f(l),
                                       get_divergence(f"alpha:{a0}").f(l), rtol=2e-3, atol=2e-3)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as e:
        get_divergence("jenson_shannon")
    msg = str(e.value)
    for name in ("reverse_kl", "js", "forward_kl", "alpha:<a>"):
        assert name in msg
    with pytest.raises(ValueError, match="alpha"):
        get_divergence("alpha:abc")
    assert "js" in available_divergences()
    assert get_divergence("fkl").name == "forward_kl"


def test_js_weight_is_discriminator_probability():
    logits = torch.randn(100)
    torch.testing.assert_close(get_divergence("js").weight(logits), torch.sigmoid(logits))
    assert math.isclose(float(get_divergence("js").f(torch.tensor(-80.0))), math.log(2), rel_tol=1e-5)
