"""Tests for models/diffusion.py against independent references: float64 loops and closed forms,
torch.distributions, scipy.stats.norm, and Monte-Carlo estimates with tolerances derived from the
sample size."""
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
import pytest
import torch
from scipy.stats import norm

from models.diffusion import (GaussianDiffusion, approx_standard_normal_cdf, discretized_gaussian_log_likelihood,
                              linear_beta_schedule, normal_kl)

torch.set_num_threads(2)
LN2 = math.log(2.0)


def ref_tables(betas):
    """float64 ᾱ_t by an explicit python loop (not np.cumprod)."""
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - float(b)
        abar.append(prod)
    return np.array(abar)


# ---------------------------------------------------------------------------------------------
# 1. schedule
# ---------------------------------------------------------------------------------------------
def test_linear_beta_schedule_and_alphas_cumprod():
    betas = linear_beta_schedule()
    assert betas.dtype == np.float64 and len(betas) == 1000
    assert betas[0] == pytest.approx(1e-4, abs=1e-15) and betas[-1] == pytest.approx(0.02, abs=1e-15)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-9)
    d = GaussianDiffusion(learn_sigma=False)
    abar = ref_tables(d.betas)
    np.testing.assert_allclose(d.alphas_cumprod, abar, rtol=1e-13, atol=0)
    np.testing.assert_allclose(d.alphas_cumprod_prev, np.concatenate([[1.0], abar[:-1]]), rtol=1e-13, atol=0)
    # known value of the DDPM schedule: ᾱ_999 ≈ 4.04e-5
    assert 4.0e-5 < abar[-1] < 4.1e-5
    # ADM rescaling to other T
    b4000 = linear_beta_schedule(4000)
    assert len(b4000) == 4000
    assert b4000[0] == pytest.approx(2.5e-5, abs=1e-15) and b4000[-1] == pytest.approx(0.005, abs=1e-15)


# ---------------------------------------------------------------------------------------------
# 2. q_sample
# ---------------------------------------------------------------------------------------------
def test_q_sample_exact_formula():
    d = GaussianDiffusion(learn_sigma=False)
    abar = ref_tables(d.betas)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 3, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 250, 700, 999])
    xt = d.q_sample(x0, t, eps).double()
    a = torch.tensor(abar[t.numpy()]).view(-1, 1, 1, 1)
    ref = a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()
    assert (xt - ref).abs().max() < 1e-6


@pytest.mark.parametrize("t", [0, 50, 500, 999])
def test_q_sample_moments(t):
    d = GaussianDiffusion(learn_sigma=False)
    abar = ref_tables(d.betas)[t]
    N = 100_000
    g = torch.Generator().manual_seed(t)
    x0 = torch.linspace(-1, 1, 8).view(1, 1, 2, 4)
    eps = torch.randn(N, 1, 2, 4, generator=g)
    xt = d.q_sample(x0.expand(N, -1, -1, -1), torch.full((N,), t), eps).double()
    mean, var = xt.mean(0), xt.var(0)
    sd = math.sqrt(1 - abar)
    # sample mean has sd sd/sqrt(N); sample variance of a Gaussian has sd var*sqrt(2/(N-1)).
    # 8 pixels are tested at 5 sd each (two-sided p ~ 6e-7 per pixel).
    assert ((mean - math.sqrt(abar) * x0.double()[0]).abs() < 5 * sd / math.sqrt(N)).all()
    assert ((var - (1 - abar)).abs() < 5 * (1 - abar) * math.sqrt(2 / (N - 1))).all()


# ---------------------------------------------------------------------------------------------
# 3. posterior q(x_{t-1} | x_t, x_0)
# ---------------------------------------------------------------------------------------------
def bayes_posterior(betas):
    """Product of Gaussians in x_{t-1}: q(x_t | x_{t-1}) = N(sqrt(α_t) x_{t-1}, β_t) and
    q(x_{t-1} | x_0) = N(sqrt(ᾱ_{t-1}) x_0, 1 - ᾱ_{t-1}). Returns (var, coef_x0, coef_xt);
    at t = 0 the prior on x_{-1} = x_0 is a point mass: var 0, mean x_0."""
    abar = ref_tables(betas)
    T = len(betas)
    var, c0, ct = np.zeros(T), np.zeros(T), np.zeros(T)
    for t in range(T):
        alpha = 1.0 - betas[t]
        if t == 0:
            var[t], c0[t], ct[t] = 0.0, 1.0, 0.0
            continue
        prec = alpha / betas[t] + 1.0 / (1.0 - abar[t - 1])
        var[t] = 1.0 / prec
        c0[t] = var[t] * math.sqrt(abar[t - 1]) / (1.0 - abar[t - 1])
        ct[t] = var[t] * math.sqrt(alpha) / betas[t]
    return var, c0, ct


def test_posterior_tables_vs_bayes():
    d = GaussianDiffusion(learn_sigma=True)
    var, c0, ct = bayes_posterior(d.betas)
    np.testing.assert_allclose(d.posterior_variance, var, rtol=1e-9, atol=1e-20)
    np.testing.assert_allclose(d.posterior_mean_coef1, c0, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(d.posterior_mean_coef2, ct, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(d.posterior_log_variance_clipped[1:], np.log(var[1:]), rtol=1e-11)
    assert d.posterior_log_variance_clipped[0] == pytest.approx(math.log(var[1]), rel=1e-11)
    # posterior variance lies between 0 and β_t (it is β_t (1-ᾱ_{t-1})/(1-ᾱ_t) <= β_t)
    assert np.all(var[1:] < d.betas[1:]) and np.all(var[1:] > 0)


def test_q_posterior_mean_variance_tensors():
    d = GaussianDiffusion(learn_sigma=True)
    var, c0, ct = bayes_posterior(d.betas)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 3, 3, generator=g)
    xt = torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0, 1, 400, 999])
    mean, v, lv = d.q_posterior_mean_variance(x0, xt, t)
    tn = t.numpy()
    ref = (torch.tensor(c0[tn]).view(-1, 1, 1, 1) * x0.double() + torch.tensor(ct[tn]).view(-1, 1, 1, 1) * xt.double())
    assert (mean.double() - ref).abs().max() < 1e-5
    np.testing.assert_allclose(v.flatten().numpy(), var[tn], rtol=1e-6)
    np.testing.assert_allclose(lv.flatten().numpy(), np.log(np.maximum(var, var[1])[tn]), rtol=1e-6)


def test_predict_x0_from_eps_inverts_q_sample():
    d = GaussianDiffusion(learn_sigma=False)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(4, 1, 4, 4, generator=g)
    t = torch.tensor([0, 10, 300, 900])
    x0_hat = d.predict_x0_from_eps(d.q_sample(x0, t, eps), t, eps)
    # error ~ float32 eps * sqrt(1/ᾱ_t) amplification (≈ 40 at t = 900)
    assert (x0_hat - x0).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------
# 4. normal_kl
# ---------------------------------------------------------------------------------------------
def test_normal_kl_vs_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(2, 1000, generator=g, dtype=torch.float64)
    lv1, lv2 = torch.randn(2, 1000, generator=g, dtype=torch.float64) * 2
    ours = normal_kl(m1, lv1, m2, lv2)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-15
    # broadcasting against scalars, as used with gathered tables
    torch.testing.assert_close(normal_kl(m1, lv1, torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)),
                               0.5 * (lv1.exp() + m1 ** 2 - 1 - lv1))


# ---------------------------------------------------------------------------------------------
# 5. discretized Gaussian log-likelihood
# ---------------------------------------------------------------------------------------------
def tanh_cdf_max_error():
    z = np.linspace(-10, 10, 200_001)
    approx = approx_standard_normal_cdf(torch.tensor(z, dtype=torch.float64)).numpy()
    return np.abs(approx - norm.cdf(z)).max()


def exact_bin_probs(x, mu, sigma):
    lo = np.where(x < -0.999, -np.inf, (x - 1 / 255 - mu) / sigma)
    hi = np.where(x > 0.999, np.inf, (x + 1 / 255 - mu) / sigma)
    return norm.cdf(hi) - norm.cdf(lo)


def test_discretized_gaussian_log_likelihood_vs_scipy():
    # ADM replaces Φ by the tanh (GELU) approximation. A bin probability is a difference of two
    # CDF values, so its error is at most 2 * max|Φ_tanh - Φ| (≈ 2 * 3e-4 here); we allow that plus
    # float32 rounding. This is tighter than 1e-2 yet cannot flag the documented approximation.
    err = tanh_cdf_max_error()
    assert 1e-5 < err < 1e-3
    tol = 2 * err + 1e-5
    g = np.random.default_rng(0)
    k = np.concatenate([np.arange(256), g.integers(0, 256, 2000)])
    x = k / 127.5 - 1.0
    sigma = np.exp(g.uniform(np.log(3e-3), np.log(0.6), len(x)))
    # half of the means anywhere in [-1.2, 1.2], half within a few sigma of x (probable bins)
    mu = np.where(np.arange(len(x)) % 2 == 0, g.uniform(-1.2, 1.2, len(x)), x + g.normal(0, 1, len(x)) * sigma)
    ll = discretized_gaussian_log_likelihood(torch.tensor(x, dtype=torch.float32), torch.tensor(mu, dtype=torch.float32),
                                             torch.tensor(np.log(sigma), dtype=torch.float32)).double().numpy()
    p_ref = exact_bin_probs(x, mu, sigma)
    assert np.abs(np.exp(ll) - p_ref).max() < tol
    # where the probability is not tiny the log-likelihood itself agrees to a few %
    big = p_ref > 0.05
    assert big.sum() > 500
    assert np.abs(ll[big] - np.log(p_ref[big])).max() < 0.03


@pytest.mark.parametrize("mu,sigma", [(-1.5, 0.2), (1.3, 0.3), (0.0, 0.5), (-0.97, 0.05), (0.2, 0.004)])
def test_discretized_edges_and_normalisation(mu, sigma):
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    ll = discretized_gaussian_log_likelihood(x, torch.full_like(x, mu), torch.full_like(x, math.log(sigma)))
    p = ll.exp().numpy()
    p_ref = exact_bin_probs(x.numpy(), mu, sigma)
    tol = 2 * tanh_cdf_max_error() + 1e-6
    # edge bins integrate to ±infinity: e.g. for mu=-1.5, sigma=0.2 the x=-1 bin has mass Φ(2.52) ≈ 0.994,
    # whereas a width-2/255 bin would hold only ~0.03
    assert abs(p[0] - p_ref[0]) < tol and abs(p[-1] - p_ref[-1]) < tol
    assert abs(p[0] - norm.cdf((-1 + 1 / 255 - mu) / sigma)) < tol
    assert abs(p[-1] - norm.sf((1 - 1 / 255 - mu) / sigma)) < tol
    assert np.abs(p - p_ref).max() < tol
    # the bins telescope, so the total is exactly 1 (up to rounding) for any CDF used consistently
    if p.min() > 1e-12:
        assert abs(p.sum() - 1.0) < 1e-9


# ---------------------------------------------------------------------------------------------
# 6. training loss vs the exact optimal denoiser for Gaussian data
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t,s", [(0, 0.5), (100, 0.5), (400, 1.0), (999, 0.7)])
def test_training_loss_optimal_denoiser_gaussian_data(t, s):
    d = GaussianDiffusion(learn_sigma=False)
    abar = ref_tables(d.betas)
    a = abar[t]
    N, shape = 20_000, (1, 4, 4)
    g = torch.Generator().manual_seed(1000 + t)
    x0 = torch.randn(N, *shape, generator=g) * s
    eps = torch.randn(N, *shape, generator=g)
    tt = torch.full((N,), t)
    denom = a * s * s + 1 - a

    def optimal(xt, t_):  # E[ε | x_t] for x_0 ~ N(0, s² I), using the test's own float64 ᾱ
        ab = abar[t_.numpy()]
        coef = torch.tensor(np.sqrt(1 - ab) / (ab * s * s + 1 - ab))
        return (coef.view(-1, 1, 1, 1) * xt.double()).float()

    out = d.training_losses(optimal, x0, tt, eps)
    assert set(out) == {"loss", "mse"} and torch.equal(out["loss"], out["mse"]) and out["mse"].shape == (N,)
    mse = out["mse"].double().mean().item()
    m = 1 - (1 - a) / denom
    # residual ε - E[ε|x_t] ~ N(0, m) per element, independent across the n = N*16 elements:
    # the mean of n squared residuals has sd m*sqrt(2/n). Allow 5 sd.
    n = N * 16
    assert abs(mse - m) < 5 * m * math.sqrt(2 / n)

    # a suboptimal linear denoiser a_hat * x_t has E[(ε - a_hat x_t)²] = 1 - 2 a_hat sqrt(1-ᾱ) + a_hat² var(x_t)
    a_hat = 0.8 * math.sqrt(1 - a) / denom
    mse_sub = d.training_losses(lambda xt, t_: a_hat * xt, x0, tt, eps)["mse"].double().mean().item()
    m_sub = 1 - 2 * a_hat * math.sqrt(1 - a) + a_hat ** 2 * denom
    assert m_sub > m
    assert abs(mse_sub - m_sub) < 5 * m_sub * math.sqrt(2 / n)  # residual again Gaussian with variance m_sub

    # predicting 0: MSE = E[ε²] = 1 (sd sqrt(2/n)); clearly distinct from the optimum at large t
    mse0 = d.training_losses(lambda xt, t_: torch.zeros_like(xt), x0, tt, eps)["mse"].double().mean().item()
    assert abs(mse0 - 1.0) < 5 * math.sqrt(2 / n)
    if t >= 100:
        assert 1.0 - m > 50 * math.sqrt(2 / n)


# ---------------------------------------------------------------------------------------------
# 7. input perturbation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lam,t", [(0.2, 500), (0.5, 50), (1.0, 999)])
def test_input_perturbation(lam, t):
    d = GaussianDiffusion(learn_sigma=False)
    a = ref_tables(d.betas)[t]
    N = 50_000
    g = torch.Generator().manual_seed(7)
    x0 = torch.zeros(N, 1, 2, 2)
    eps = torch.randn(N, 1, 2, 2, generator=g)
    xi = torch.randn(N, 1, 2, 2, generator=g)
    seen = {}

    def true_eps(xt, t_):
        seen["xt"] = xt.clone()
        return eps.clone()

    out = d.training_losses(true_eps, x0, torch.full((N,), t), eps, input_perturbation=lam, perturbation_noise=xi)
    assert torch.equal(out["mse"], torch.zeros(N))  # the target is ε, not ε + λξ
    xt = seen["xt"].double()
    # x_t is built from ε + λξ exactly ...
    assert (xt - math.sqrt(1 - a) * (eps.double() + lam * xi.double())).abs().max() < 1e-5
    # ... so its variance is (1-ᾱ)(1+λ²): sample variance over n = 4N values has rel. sd sqrt(2/n)
    n = 4 * N
    v_ref = (1 - a) * (1 + lam ** 2)
    assert abs(xt.var().item() - v_ref) < 5 * v_ref * math.sqrt(2 / n)
    assert abs(v_ref - (1 - a)) > 10 * v_ref * math.sqrt(2 / n)  # distinguishable from no perturbation

    # predicting the *input* noise ε + λξ costs λ² E[ξ²] ≈ λ²
    mse_in = d.training_losses(lambda xt_, t_: eps + lam * xi, x0, torch.full((N,), t), eps,
                               input_perturbation=lam, perturbation_noise=xi)["mse"].double().mean().item()
    assert abs(mse_in - lam ** 2) < 5 * lam ** 2 * math.sqrt(2 / n)

    # λ = 0 is the plain loss
    out0 = d.training_losses(true_eps, x0, torch.full((N,), t), eps, input_perturbation=0.0)
    assert torch.equal(seen["xt"], d.q_sample(x0, torch.full((N,), t), eps))
    assert torch.equal(out0["mse"], torch.zeros(N))


# ---------------------------------------------------------------------------------------------
# 8. learned variance: hybrid loss
# ---------------------------------------------------------------------------------------------
def hybrid_setup(seed=0, n=6, C=3):
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.randint(0, 256, (n, C, 4, 4), generator=g).float() / 127.5 - 1.0)
    eps = torch.randn(n, C, 4, 4, generator=g)
    return x0, eps


def model_with(eps_hat, v):
    def fn(xt, t):
        vv = v if torch.is_tensor(v) else torch.full_like(eps_hat, float(v))
        return torch.cat([eps_hat, vv], dim=1)
    return fn


def test_vb_zero_when_model_is_the_true_posterior():
    d = GaussianDiffusion(learn_sigma=True)
    x0, eps = hybrid_setup()
    t = torch.tensor([1, 2, 10, 300, 700, 999])
    out = d.training_losses(model_with(eps, -1.0), x0, t, eps)
    assert set(out) == {"loss", "mse", "vb"}
    assert torch.equal(out["mse"], torch.zeros(6))
    # KL of identical Gaussians; residual from float32 x0-reconstruction is ~(1e-6)² / β̃_t
    assert out["vb"].abs().max() < 1e-4
    assert torch.equal(out["loss"], out["mse"] + out["vb"])


@pytest.mark.parametrize("v", [1.0, 0.0, 0.4])
def test_vb_variance_mismatch_closed_form(v):
    d = GaussianDiffusion(learn_sigma=True)
    x0, eps = hybrid_setup(seed=1)
    t = torch.tensor([1, 5, 50, 300, 700, 999])
    out = d.training_losses(model_with(eps, v), x0, t, eps)
    betas = d.betas
    abar = ref_tables(betas)
    tn = t.numpy()
    tilde = betas[tn] * (1 - abar[tn - 1]) / (1 - abar[tn])
    frac = (v + 1) / 2
    log_p = frac * np.log(betas[tn]) + (1 - frac) * np.log(tilde)
    # KL(N(μ, β̃) || N(μ, σ²)) in nats, then bits
    kl = 0.5 * (log_p - np.log(tilde) + tilde / np.exp(log_p) - 1) / LN2
    np.testing.assert_allclose(out["vb"].double().numpy(), kl, rtol=2e-3, atol=2e-6)
    # clearly positive at small t (β̃_t -> β_t as t grows, so the KL vanishes there): a broken vb
    # term (e.g. zero, or nats instead of bits) would fail the comparison above
    assert (kl[:3] > 1e-4).all()
    torch.testing.assert_close(out["loss"], out["mse"] + out["vb"])


def test_vb_mean_mismatch_closed_form():
    """Wrong ε̂ = ε + δ: the KL's mean term (Δμ)²/(2β̃) with Δμ = -β_t δ / (sqrt(α_t) sqrt(1-ᾱ_t)),
    the DDPM parametrisation μ = (x_t - β_t ε̂ / sqrt(1-ᾱ_t)) / sqrt(α_t)."""
    d = GaussianDiffusion(learn_sigma=True)
    x0, eps = hybrid_setup(seed=2)
    delta = 0.1
    t = torch.tensor([1, 20, 200, 500, 800, 999])
    out = d.training_losses(model_with(eps + delta, -1.0), x0, t, eps)
    betas, abar = d.betas, ref_tables(d.betas)
    tn = t.numpy()
    tilde = betas[tn] * (1 - abar[tn - 1]) / (1 - abar[tn])
    dmu = betas[tn] * delta / (np.sqrt(1 - betas[tn]) * np.sqrt(1 - abar[tn]))
    kl = dmu ** 2 / (2 * tilde) / LN2
    np.testing.assert_allclose(out["vb"].double().numpy(), kl, rtol=2e-3)
    np.testing.assert_allclose(out["mse"].double().numpy(), delta ** 2, rtol=1e-4)


def test_vb_at_t0_is_decoder_nll():
    d = GaussianDiffusion(learn_sigma=True)
    x0, eps = hybrid_setup(seed=3, n=4)
    t = torch.zeros(4, dtype=torch.long)
    v = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = d.training_losses(model_with(eps, v), x0, t, eps)
    # with the exact ε̂, the decoder mean is x_0 (posterior at t = 0 is a point mass at x_0)
    b0 = d.betas[0]
    log_var = (v.double() + 1) / 2 * math.log(b0) + (1 - v.double()) / 2 * math.log(d.posterior_variance[1])
    sigma = (0.5 * log_var).exp().numpy()
    xn = x0.double().numpy()
    p = exact_bin_probs(xn, xn, sigma)
    nll_ref = -np.log(p).reshape(4, -1).mean(1) / LN2
    # sigma ≤ sqrt(β_0) = 0.01 ≪ bin half-width 1/255: p ≈ 1, nll ≈ 0, error from the tanh CDF
    np.testing.assert_allclose(out["vb"].double().numpy(), nll_ref, atol=1e-3)
    # a decoder mean off by one full bin (2/255) gives a large nll: sensitivity check
    x0_shift = torch.where(x0 < 0.9, x0 + 2 / 255, x0 - 2 / 255)
    out2 = d.training_losses(model_with(eps, v), x0_shift, t, eps)
    assert (out2["vb"] > 1.0).all()


def test_vb_stop_gradient_into_eps_channels():
    d = GaussianDiffusion(learn_sigma=True)
    x0, eps = hybrid_setup(seed=4)
    t = torch.tensor([0, 1, 30, 300, 600, 999])
    g = torch.Generator().manual_seed(5)
    raw = torch.cat([eps + 0.3 * torch.randn(eps.shape, generator=g), torch.rand(eps.shape, generator=g) * 2 - 1], 1)

    def grads(key):
        o = raw.clone().requires_grad_(True)
        res = d.training_losses(lambda xt, t_: o, x0, t, eps)
        res[key].sum().backward()
        return o.grad

    g_vb = grads("vb")
    assert torch.equal(g_vb[:, :3], torch.zeros_like(g_vb[:, :3]))  # Nichol & Dhariwal stop-gradient
    assert (g_vb[:, 3:].abs().amax(dim=(1, 2, 3)) > 0).all()
    g_mse = grads("mse")
    assert torch.equal(g_mse[:, 3:], torch.zeros_like(g_mse[:, 3:]))
    # d/dε̂ of mean((ε̂-ε)²) over 48 elements = 2(ε̂-ε)/48
    torch.testing.assert_close(g_mse[:, :3], 2 * (raw[:, :3] - eps) / 48)
    g_loss = grads("loss")
    torch.testing.assert_close(g_loss, g_mse + g_vb)


def test_p_mean_variance_not_learned_uses_posterior_variance():
    d = GaussianDiffusion(learn_sigma=False)
    x0, eps = hybrid_setup(seed=6, n=3)
    t = torch.tensor([0, 10, 999])
    xt = d.q_sample(x0, t, eps)
    out = d.p_mean_variance(eps, xt, t)
    var, c0, ct = bayes_posterior(d.betas)
    tn = t.numpy()
    np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0].double().numpy(), np.log(np.maximum(var, var[1])[tn]), rtol=1e-6)
    ref_mean = torch.tensor(c0[tn]).view(-1, 1, 1, 1) * x0.double() + torch.tensor(ct[tn]).view(-1, 1, 1, 1) * xt.double()
    assert (out["mean"].double() - ref_mean).abs().max() < 2e-4
    assert (out["pred_x0"] - x0).abs().max() < 2e-4
