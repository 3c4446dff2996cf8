"""Tests for models/metrics.py: FID, IS, KID, RMD, codebook usage (the distance-based metrics: tests/test_metrics_knn.py).

Every metric is checked against an independent reference: closed forms (Gaussian Fréchet distance
through eigh square roots, diagonal FID, IS of K confident equiprobable classes), or brute-force
float64 numpy computations written straight from the definitions (explicit differences, Python
loops), never sharing code with the module."""
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
import pytest
import torch
from scipy import linalg

from models import metrics
from models.metrics import (condition_accuracy, feature_stats, fid_from_features, frechet_distance,
                            inception_score, kernel_inception_distance, rmd, top_fraction_mean)


# ----------------------------------------------------------------------------------- references
def psd_sqrt(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def gaussian_w2(mu1, s1, mu2, s2):
    """‖Δμ‖² + Tr Σ1 + Tr Σ2 − 2 Tr (Σ1^½ Σ2 Σ1^½)^½, through eigh only."""
    r = psd_sqrt(s1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)).sum()
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross


def random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ------------------------------------------------------------------------------------------ FID
@pytest.mark.parametrize("d", [2, 16, 64])
def test_frechet_matches_closed_form(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    ref = gaussian_w2(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)


def test_fid_diagonal_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 4, 10), rng.uniform(0.1, 4, 10)
    mu1, mu2 = rng.standard_normal(10), rng.standard_normal(10)
    ref = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum() + ((mu1 - mu2) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(ref, rel=1e-10)


def test_feature_stats_and_fid_with_itself():
    rng = np.random.default_rng(2)
    f = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16)) + 3
    mu, sigma = feature_stats(torch.from_numpy(f).float())
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (16, 16)
    f32 = f.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, f32.sum(0) / 500, rtol=1e-12)
    centred = f32 - f32.sum(0) / 500
    np.testing.assert_allclose(sigma, centred.T @ centred / 499, rtol=1e-10)
    assert abs(fid_from_features(f, f)) < 1e-6


def test_fid_from_samples_converges():
    """d = 4, n = 200 000 per set. The estimator's error is dominated by the 2 Δμ·(noise) term and
    the covariance noise, each O(√(d/n)) ≈ 0.005 × the scale of the Gaussians (std of the FID over
    seeds ≈ 0.01 here); 0.05 absolute on a value ≈ 6 leaves > 4 standard deviations."""
    rng = np.random.default_rng(3)
    d, n = 4, 200_000
    mu1, mu2 = np.zeros(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    x = rng.multivariate_normal(mu1, s1, n)
    y = rng.multivariate_normal(mu2, s2, n)
    ref = gaussian_w2(mu1, s1, mu2, s2)
    assert ref > 1
    assert fid_from_features(x, y) == pytest.approx(ref, abs=0.05)


def test_fid_small_imaginary_part_is_dropped():
    """A product with a round-off negative eigenvalue (−1e-8): sqrtm is complex with an imaginary
    diagonal of 1e-4, below 1e-3, so the real part is used."""
    s1, s2 = np.eye(3), np.diag([1.0, 4.0, -1e-8])
    assert np.iscomplexobj(linalg.sqrtm(s1 @ s2))
    fid = frechet_distance(np.zeros(3), s1, np.zeros(3), s2)
    assert isinstance(fid, float) and fid == pytest.approx(3 + 5 - 1e-8 - 2 * (1 + 2), abs=1e-12)
    with pytest.raises(ValueError, match="imaginary"):  # imaginary diagonal 0.1
        frechet_distance(np.zeros(3), s1, np.zeros(3), np.diag([1.0, 4.0, -1e-2]))


def test_fid_rank_deficient_is_finite():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((20, 64)), rng.standard_normal((20, 64)) + 0.5
    fid = fid_from_features(x, y)
    assert np.isfinite(fid) and fid > 0


def test_fid_retries_with_eps_when_not_finite(monkeypatch):
    calls = []
    real_sqrtm = linalg.sqrtm

    def flaky(a):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(metrics.linalg, "sqrtm", flaky)
    s = np.diag([1.0, 2.0])
    fid = frechet_distance(np.zeros(2), s, np.ones(2), s, eps=1e-3)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s + 1e-3 * np.eye(2)) @ (s + 1e-3 * np.eye(2)))
    assert fid == pytest.approx(2 - 4e-3, abs=1e-9)  # ‖Δμ‖² + 2·Tr Σ − 2 Tr(Σ + εI), Tr εI = 2ε


def test_fid_shape_mismatch():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# ------------------------------------------------------------------------------------------- IS
def is_reference(logits, splits):
    scores = []
    n = len(logits)
    for s in range(splits):
        part = logits[s * n // splits:(s + 1) * n // splits]
        e = np.exp(part - part.max(1, keepdims=True))
        p = e / e.sum(1, keepdims=True)
        py = p.mean(0)
        kl = [sum(pi[c] * math.log(pi[c] / py[c]) for c in range(len(py)) if pi[c] > 0) for pi in p]
        scores.append(math.exp(np.mean(kl)))
    return np.mean(scores), np.std(scores)


@pytest.mark.parametrize("k", [1, 10, 100])
def test_is_confident_equiprobable_classes(k):
    logits = np.zeros((1000, 1008))
    logits[np.arange(1000), np.arange(1000) % k] = 60.0
    mean, std = inception_score(logits)
    assert mean == pytest.approx(k, rel=1e-9) and std < 1e-9


def test_is_uniform_predictions():
    assert inception_score(np.full((100, 1008), 3.0)) == pytest.approx((1.0, 0.0), abs=1e-12)


def test_is_matches_brute_force():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((103, 20)) * 3  # uneven splits: 10 or 11 samples
    got = inception_score(torch.from_numpy(logits).float(), splits=10)
    ref = is_reference(logits.astype(np.float32).astype(np.float64), 10)
    np.testing.assert_allclose(got, ref, rtol=1e-10)
    assert got[0] > 1.5
    with pytest.raises(ValueError):
        inception_score(logits[:5], splits=10)


# ------------------------------------------------------------------------------------------ KID
def kid_reference(x, y):
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3
    m = len(x)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    return kxx + kyy - 2 * kxy


def test_kid_whole_set_matches_brute_force():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((30, 8)), rng.standard_normal((30, 8)) * 1.3 + 0.2
    mean, std = kernel_inception_distance(x, y, num_subsets=1, max_subset_size=1000)
    assert mean == pytest.approx(kid_reference(x, y), rel=1e-10) and std == 0


def test_kid_same_distribution_vs_shifted():
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((2000, 16)), rng.standard_normal((2000, 16))
    same, same_std = kernel_inception_distance(x, y, num_subsets=20, max_subset_size=500)
    shifted, _ = kernel_inception_distance(x, y + 0.5, num_subsets=20, max_subset_size=500)
    selfk, _ = kernel_inception_distance(x, x, num_subsets=20, max_subset_size=500)
    assert abs(same) < 0.01 and abs(selfk) < 0.01 and same_std > 0
    assert shifted > 0.5 and shifted > 50 * abs(same)
    assert kernel_inception_distance(x, y, 5, 100, seed=1) == kernel_inception_distance(x, y, 5, 100, seed=1)
    assert kernel_inception_distance(x, y, 5, 100, seed=1) != kernel_inception_distance(x, y, 5, 100, seed=2)


# ------------------------------------------------------------------------------------------ RMD
def rmd_reference(train, y, x, labels):
    classes = sorted(set(y.tolist()))
    mu = {c: train[y == c].mean(0) for c in classes}
    n, d = train.shape
    sigma = np.zeros((d, d))
    for xi, yi in zip(train, y):
        sigma += np.outer(xi - mu[yi], xi - mu[yi])
    sigma /= n
    mu0 = train.mean(0)
    sigma0 = sum(np.outer(xi - mu0, xi - mu0) for xi in train) / n
    inv, inv0 = np.linalg.inv(sigma), np.linalg.inv(sigma0)
    return np.array([(xi - mu[c]) @ inv @ (xi - mu[c]) - (xi - mu0) @ inv0 @ (xi - mu0)
                     for xi, c in zip(x, labels)])


def gaussian_classes(rng, n_per, d=4, sep=10.0):
    y = np.repeat(np.arange(3), n_per)
    means = sep * np.eye(3, d)
    return means[y] + rng.standard_normal((len(y), d)), y


def test_rmd_matches_direct_formula():
    rng = np.random.default_rng(12)
    train, y = gaussian_classes(rng, 40, sep=2.0)
    train = train @ rng.standard_normal((4, 4))  # correlated, full rank
    x = rng.standard_normal((25, 4)) * 2
    labels = rng.integers(0, 3, 25)
    np.testing.assert_allclose(rmd(train, y, x, labels, chunk=17), rmd_reference(train, y, x, labels),
                               rtol=1e-8, atol=1e-8)


def test_rmd_separates_right_and_wrong_labels():
    rng = np.random.default_rng(13)
    train, y = gaussian_classes(rng, 300)
    x, lab = gaussian_classes(rng, 50)
    right = rmd(train, y, x, lab)
    wrong = rmd(train, y, x, (lab + 1) % 3)
    # E[MD_k] = E[MD_0] = d for in-class samples, so RMD ≈ 0; a wrong label adds ≈ sep² = 100
    assert abs(right.mean()) < 1 and wrong.min() > right.max() and wrong.min() > 50
    assert top_fraction_mean(wrong, 0.1) > top_fraction_mean(right, 0.1)
    with pytest.raises(ValueError):
        rmd(train, y, x, np.full(len(x), 7))


def test_rmd_rank_deficient_uses_span():
    """Features living in a 4-d subspace of R^12: the pseudo-inverse gives the RMD of the 4-d data."""
    rng = np.random.default_rng(14)
    train, y = gaussian_classes(rng, 60, sep=3.0)
    x, lab = gaussian_classes(rng, 10, sep=3.0)
    q = np.linalg.qr(rng.standard_normal((12, 12)))[0][:4]  # 4 orthonormal rows
    got = rmd(train @ q, y, x @ q, lab)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, rmd_reference(train, y, x, lab), rtol=1e-6, atol=1e-6)


def test_top_fraction_mean():
    v = np.arange(1.0, 101.0)
    rng = np.random.default_rng(15)
    rng.shuffle(v)
    assert top_fraction_mean(v) == 100
    assert top_fraction_mean(v, 0.05) == 98
    assert top_fraction_mean(v, 0.07) == np.mean(np.arange(94, 101))  # 0.07·100 rounds to 7, not 8
    assert top_fraction_mean(np.arange(150.0), 0.01) == 148.5  # ceil(1.5) = 2
    assert top_fraction_mean(v, 1.0) == 50.5


def test_condition_accuracy():
    logits = np.array([[5.0, 1, 0], [0, 2, 1], [0, 0, 3], [4, 0, 0]])
    assert condition_accuracy(logits, [0, 1, 2, 0]) == 1.0
    assert condition_accuracy(logits, np.array([0, 1, 2, 1])) == 0.75
    assert condition_accuracy(torch.from_numpy(logits), [1, 2, 0, 1]) == 0.0


# ------------------------------------------------------------------------------ codebook usage
def test_codebook_usage_closed_forms_and_scipy():
    from scipy.stats import entropy
    one = np.zeros(64)
    one[7] = 1000
    assert metrics.codebook_usage(one) == (0.0, 1.0, 1 / 64)
    for k in (1, 2, 5, 64):
        counts = np.zeros(64)
        counts[:k] = 13
        h, ppl, used = metrics.codebook_usage(counts)
        assert h == pytest.approx(math.log2(k), abs=1e-12) and ppl == pytest.approx(k) and used == k / 64
    counts = np.random.default_rng(23).integers(0, 50, 8192)
    h, ppl, used = metrics.codebook_usage(counts)
    assert h == pytest.approx(entropy(counts, base=2), rel=1e-12) and ppl == pytest.approx(2 ** h)
    assert used == pytest.approx((counts > 0).mean())
    with pytest.raises(ValueError):
        metrics.codebook_usage(np.zeros(4))


def test_gaussian_stats_streaming_matches_numpy():
    """Batch-by-batch moments (with a large offset, where naive Σxxᵀ − Nμμᵀ loses digits) equal
    np.mean / np.cov and the per-class RMD moments computed directly."""
    rng = np.random.default_rng(24)
    x = 1e4 + rng.standard_normal((1000, 6)) @ rng.standard_normal((6, 6))
    y = rng.integers(0, 4, 1000)
    g = metrics.GaussianStats(6, 5)
    for s in range(0, 1000, 77):
        g.update(x[s:s + 77], y[s:s + 77])
    g = metrics.GaussianStats.from_state(dict(g.state()))
    mu, sigma = g.mean_cov()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    ids, means, within, mu0, total = g.class_gaussians()
    assert list(ids) == [0, 1, 2, 3]  # class 4 has no samples
    np.testing.assert_allclose(means, [x[y == c].mean(0) for c in range(4)], rtol=1e-12)
    direct = sum((x[y == c] - x[y == c].mean(0)).T @ (x[y == c] - x[y == c].mean(0)) for c in range(4)) / 1000
    np.testing.assert_allclose(within, direct, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(total, np.cov(x, rowvar=False, bias=True), rtol=1e-9, atol=1e-9)
