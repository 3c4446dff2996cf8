"""Tests for models/cep.py (CEP noise δ) and for how DiT consumes it (`forward(..., cond_noise=)`).

Distributions are checked with closed forms (bounds ±γ/√d, std γ/√(3d) for the uniform, γ/√d for
the Gaussian) and Kolmogorov-Smirnov tests against scipy's distributions; each KS test is paired
with one against the wrong distribution, which must reject."""
import math
import os
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
import pytest
import torch
from scipy import stats

from models.cep import CEP_TYPES, cep_noise, fixed_cep_noise
from models.dit import DiT

REPO = pathlib.Path(__file__).resolve().parents[1]
N_SAMPLES = 200_000  # values per distribution test


def draw(dim, gamma, kind, seed=0):
    n = max(1, N_SAMPLES // dim)
    g = torch.Generator().manual_seed(seed)
    d = cep_noise(n, dim, gamma, kind, generator=g)
    assert d.shape == (n, dim) and d.dtype == torch.float32
    return d


@pytest.mark.parametrize("dim", [64, 1152])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 5.0])
def test_uniform_statistics(dim, gamma):
    a = gamma / math.sqrt(dim)
    d = draw(dim, gamma, "uniform").double().numpy().ravel()
    n = d.size
    assert np.abs(d).max() <= a * (1 + 1e-6)  # float32 rounding only
    # extremes of ~200k uniforms lie within a·1e-3 of the bounds (miss probability ~e^-100)
    assert d.max() > a * (1 - 1e-3) and d.min() < -a * (1 - 1e-3)
    sd = a / math.sqrt(3)
    assert abs(d.std() / sd - 1) < 0.01           # relative s.e. of the sample sd ~ 0.1%
    assert abs(d.mean()) < 5 * sd / math.sqrt(n)
    assert stats.kstest(d, stats.uniform(loc=-a, scale=2 * a).cdf).pvalue > 1e-4
    # the test has power: a Gaussian of the same sd, or a uniform of half/double width, is rejected
    assert stats.kstest(d, stats.norm(0, sd).cdf).pvalue < 1e-6
    assert stats.kstest(d, stats.uniform(loc=-2 * a, scale=4 * a).cdf).pvalue < 1e-6
    # δ is fresh per example and per coordinate: no correlation between neighbouring rows / columns
    m = d.reshape(-1, dim)
    for x, y in [(m[:-1].ravel(), m[1:].ravel()), (m[:, :-1].ravel(), m[:, 1:].ravel())]:
        assert abs(np.corrcoef(x, y)[0, 1]) < 5 / math.sqrt(x.size)


@pytest.mark.parametrize("dim", [64, 1152])
@pytest.mark.parametrize("gamma", [0.5, 1.0, 5.0])
def test_gaussian_statistics(dim, gamma):
    s = gamma / math.sqrt(dim)
    d = draw(dim, gamma, "gaussian", seed=1).double().numpy().ravel()
    n = d.size
    assert abs(d.std() / s - 1) < 0.01            # relative s.e. ~ 1/sqrt(2n) ~ 0.16%
    assert abs(d.mean()) < 5 * s / math.sqrt(n)
    assert stats.kstest(d, stats.norm(0, s).cdf).pvalue > 1e-4
    assert abs(stats.kurtosis(d)) < 0.05          # excess kurtosis 0 (uniform: -1.2); s.e. ~ 0.011
    # power: the uniform with the same sd and a Gaussian 5% wider are rejected
    b = s * math.sqrt(3)
    assert stats.kstest(d, stats.uniform(loc=-b, scale=2 * b).cdf).pvalue < 1e-6
    assert stats.kstest(d, stats.norm(0, 1.05 * s).cdf).pvalue < 1e-6
    assert np.abs(d).max() > s * (1 + 1e-3) * math.sqrt(3)  # unbounded, unlike the uniform


@pytest.mark.parametrize("kind", CEP_TYPES)
def test_gamma_zero_is_exactly_zero(kind):
    d = cep_noise(17, 64, 0.0, kind, generator=torch.Generator().manual_seed(0))
    assert d.shape == (17, 64)
    assert torch.equal(d, torch.zeros(17, 64))
    f = fixed_cep_noise(torch.tensor([0, 5, 9]), 32, 0.0, kind, seed=1)
    assert torch.equal(f, torch.zeros(3, 32))


def test_unknown_kind():
    assert set(CEP_TYPES) == {"uniform", "gaussian"}
    with pytest.raises(ValueError):
        cep_noise(2, 8, 1.0, "laplace")
    with pytest.raises(ValueError):
        fixed_cep_noise(torch.tensor([1]), 8, 1.0, "Uniform", seed=0)


@pytest.mark.parametrize("kind", CEP_TYPES)
def test_seeded_determinism(kind):
    a = cep_noise(8, 64, 1.0, kind, generator=torch.Generator().manual_seed(123))
    b = cep_noise(8, 64, 1.0, kind, generator=torch.Generator().manual_seed(123))
    c = cep_noise(8, 64, 1.0, kind, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and (a != c).float().mean() > 0.99
    # γ only scales: the same generator state gives δ(γ) = γ·δ(1)
    d = cep_noise(8, 64, 3.0, kind, generator=torch.Generator().manual_seed(123))
    assert torch.allclose(d, 3.0 * a, rtol=1e-6, atol=0)
    # without a generator it follows the global RNG
    torch.manual_seed(5)
    e = cep_noise(8, 64, 1.0, kind)
    torch.manual_seed(5)
    assert torch.equal(e, cep_noise(8, 64, 1.0, kind))
    # a generator leaves the global RNG alone
    state = torch.get_rng_state()
    cep_noise(8, 64, 1.0, kind, generator=torch.Generator().manual_seed(1))
    assert torch.equal(state, torch.get_rng_state())


# ---------------------------------------------------------------------------------------------
# fixed CEP


@pytest.mark.parametrize("kind", CEP_TYPES)
def test_fixed_same_id_same_delta_any_batch(kind):
    dim, gamma, seed = 48, 1.0, 3
    one = fixed_cep_noise(torch.tensor([7]), dim, gamma, kind, seed)
    assert one.shape == (1, dim)
    state = torch.get_rng_state()
    b1 = fixed_cep_noise(torch.tensor([3, 7, 11]), dim, gamma, kind, seed)
    b2 = fixed_cep_noise(torch.tensor([7, 7, 1000, 2]), dim, gamma, kind, seed)
    assert torch.equal(state, torch.get_rng_state()), "fixed CEP must not consume the global RNG"
    assert torch.equal(b1[1], one[0]) and torch.equal(b2[0], one[0]) and torch.equal(b2[1], one[0])
    assert torch.equal(fixed_cep_noise(torch.tensor([7]), dim, gamma, kind, seed), one)  # repeated call
    # different ids -> different δ
    ids = torch.arange(200)
    f = fixed_cep_noise(ids, dim, gamma, kind, seed)
    assert len({tuple(r) for r in f.tolist()}) == 200
    # γ scales it
    assert torch.allclose(fixed_cep_noise(torch.tensor([7]), dim, 2.5, kind, seed), 2.5 * one, rtol=1e-6, atol=0)


def test_fixed_is_pure_function_in_subprocess():
    """The value depends on (seed, id) only: a fresh interpreter with another global seed agrees."""
    ids = torch.tensor([0, 1, 59999, 12345])
    here = fixed_cep_noise(ids, 16, 1.0, "uniform", seed=2).numpy()
    code = ("import sys, torch; sys.path.insert(0, %r); from models.cep import fixed_cep_noise\n"
            "torch.manual_seed(999); torch.rand(100)\n"
            "print(repr(fixed_cep_noise(torch.tensor([0, 1, 59999, 12345]), 16, 1.0, 'uniform', seed=2).tolist()))\n"
            % str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "RANK": "1"})
    assert out.returncode == 0, out.stderr
    assert np.array_equal(np.array(eval(out.stdout), dtype=np.float32), here)


@pytest.mark.parametrize("kind", CEP_TYPES)
def test_fixed_statistics_over_ids(kind):
    dim, gamma, n_ids = 64, 1.0, 3000
    a = gamma / math.sqrt(dim)
    f = fixed_cep_noise(torch.arange(n_ids), dim, gamma, kind, seed=0).double().numpy()
    d = f.ravel()
    if kind == "uniform":
        assert np.abs(d).max() <= a * (1 + 1e-6)
        assert abs(d.std() / (a / math.sqrt(3)) - 1) < 0.01
        assert stats.kstest(d, stats.uniform(loc=-a, scale=2 * a).cdf).pvalue > 1e-4
        assert stats.kstest(d, stats.norm(0, a / math.sqrt(3)).cdf).pvalue < 1e-6
    else:
        assert abs(d.std() / a - 1) < 0.01
        assert stats.kstest(d, stats.norm(0, a).cdf).pvalue > 1e-4
        assert stats.kstest(d, stats.uniform(loc=-a * math.sqrt(3), scale=2 * a * math.sqrt(3)).cdf).pvalue < 1e-6
    # consecutive ids (seeds 7919 apart) give uncorrelated rows, and the first coordinate over ids is
    # itself distributed like δ (no structure from the sequential seeding)
    x, y = f[:-1].ravel(), f[1:].ravel()
    assert abs(np.corrcoef(x, y)[0, 1]) < 5 / math.sqrt(x.size)
    first = f[:, 0]
    ref = stats.uniform(loc=-a, scale=2 * a).cdf if kind == "uniform" else stats.norm(0, a).cdf
    assert stats.kstest(first, ref).pvalue > 1e-4


def test_fixed_depends_on_seed():
    ids = torch.arange(10)
    a = fixed_cep_noise(ids, 32, 1.0, "uniform", seed=0)
    b = fixed_cep_noise(ids, 32, 1.0, "uniform", seed=1)
    assert not torch.equal(a, b)


def test_fixed_large_seed():
    f = fixed_cep_noise(torch.tensor([0, 1]), 8, 1.0, "uniform", seed=20240101)
    assert f.shape == (2, 8) and f.abs().max() <= 1 / math.sqrt(8)


# ---------------------------------------------------------------------------------------------
# DiT: CEP only when cond_noise is passed


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    # adaLN-Zero makes a fresh model output exactly 0 whatever the condition: re-initialise everything
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return model.eval()


def inputs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.tensor([0, 1, 4, 5][:n])  # 5 = the null class
    return x, t, y


def test_dit_without_cep_is_deterministic_and_equals_zero_noise(dit):
    x, t, y = inputs()
    assert dit.cond_dim == 32
    with torch.no_grad():
        a = dit(x, t, y)
        b = dit(x, t, y)
        z = dit(x, t, y, cond_noise=torch.zeros(4, dit.cond_dim))
    assert a.shape == (4, 2, 8, 8)  # learn_sigma: 2·in_channels
    assert a.abs().mean() > 1e-2, "re-initialised model must produce a non-trivial output"
    assert torch.equal(a, b) and torch.equal(a, z)


def test_dit_cep_changes_output_rowwise(dit):
    x, t, y = inputs()
    delta = cep_noise(4, dit.cond_dim, 1.0, "uniform", generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = dit(x, t, y)
        b = dit(x, t, y, cond_noise=delta)
        only0 = delta.clone()
        only0[1:] = 0
        c = dit(x, t, y, cond_noise=only0)
    assert ((b - a).abs().flatten(1).amax(1) > 1e-4).all(), "every perturbed row changes"
    # per-example: perturbing row 0 only changes row 0
    assert (c[0] - a[0]).abs().max() > 1e-4
    assert torch.equal(c[1:], a[1:])


def test_dit_cep_is_added_to_class_embedding(dit):
    """forward(y, cond_noise=δ) == forward(y) of a model whose class-embedding row y is shifted by δ
    (c = t_emb + c_θ(y) + δ, Chen et al. 2024 Eq. 3); and the noise is per-class-embedding, so it
    does not act like a change of the image input."""
    import copy
    x, t, _ = inputs()
    y = torch.full((4,), 2)
    delta_row = cep_noise(1, dit.cond_dim, 5.0, "gaussian", generator=torch.Generator().manual_seed(4))[0]
    shifted = copy.deepcopy(dit)
    with torch.no_grad():
        shifted.y_embedder.embedding_table.weight[2] += delta_row
        ref = shifted(x, t, y)
        got = dit(x, t, y, cond_noise=delta_row.expand(4, -1))
        other = dit(x, t, torch.full((4,), 3))
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)
    assert (got - other).abs().max() > 1e-3  # and it is not another class's output
