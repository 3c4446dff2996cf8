"""Tests for models/metrics.py.

Every metric is checked against an independent reference: closed forms (Gaussian Fréchet distance
through eigh square roots, diagonal FID, IS of K confident equiprobable classes), or brute-force
float64 numpy computations written straight from the definitions (explicit differences, full
distance matrices, Python loops), never sharing code with the module. Boundary cases use
integer-valued features so that every squared distance is exact and ties are real ties."""
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
import pytest
import torch
from scipy import linalg

from models import metrics
from models.metrics import (condition_accuracy, density_coverage, feature_stats, fid_from_features,
                            frechet_distance, inception_score, intra_class_distance,
                            kernel_inception_distance, memorization_ratio, precision_recall, rmd,
                            top_fraction_mean, topk_l2)


# ----------------------------------------------------------------------------------- references
def dist(a, b):
    """Full L2 distance matrix by explicit differences."""
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def kth_radius(a, k):
    """Distance of each point to its k-th nearest neighbour in its own set, itself excluded."""
    d = dist(a, a)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, k - 1]


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


# --------------------------------------------------------------------------- precision / recall
def pr_reference(real, fake, k):
    rr, rf, d = kth_radius(real, k), kth_radius(fake, k), dist(fake, real)
    return (d <= rr[None]).any(1).mean(), (d <= rf[:, None]).any(0).mean()


def dc_reference(real, fake, k):
    r, d = kth_radius(real, k), dist(fake, real)
    density = sum(1 for j in range(len(fake)) for i in range(len(real)) if d[j, i] < r[i]) / (k * len(fake))
    coverage = np.mean([d[:, i].min() < r[i] for i in range(len(real))])
    return density, coverage


def test_pr_identical_and_disjoint():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((200, 10))
    assert precision_recall(x, x) == (1.0, 1.0)
    assert precision_recall(x, x + 100) == (0.0, 0.0)


def test_pr_matches_brute_force_and_chunking():
    rng = np.random.default_rng(9)
    real = rng.standard_normal((300, 5))
    fake = rng.standard_normal((211, 5)) * 0.9 + 1.2  # narrower and shifted
    ref = pr_reference(real, fake, 3)
    assert 0.2 < ref[0] < 0.9 and 0.2 < ref[1] < 0.9 and ref[0] != ref[1]
    assert precision_recall(real, fake, k=3, batch=10 ** 6) == pytest.approx(ref, abs=1e-12)
    assert precision_recall(real, fake, k=3, batch=7) == precision_recall(real, fake, k=3, batch=10 ** 6)
    assert precision_recall(torch.from_numpy(real).float(), fake, k=5, batch=16) == pytest.approx(
        pr_reference(real.astype(np.float32).astype(np.float64), fake, 5), abs=1e-12)


def test_pr_boundary_is_inclusive():
    """Real points 0..9 on a line, k = 1: every radius is 1. A fake point at 10 is at distance
    exactly 1 of the real point 9: inside for precision (<=), outside for density (<)."""
    real = np.arange(10.0)[:, None]
    fake = np.array([[10.0], [11.5], [4.0]])
    p, r = precision_recall(real, fake, k=1)
    assert p == pytest.approx(2 / 3) and (p, r) == pytest.approx(pr_reference(real, fake, 1))
    density, coverage = density_coverage(real, fake, k=1)
    assert density == pytest.approx(1 / 3)  # only the fake point at 4 (distance 0 < 1)
    assert (density, coverage) == pytest.approx(dc_reference(real, fake, 1))


def test_pr_duplicates_on_integer_grid():
    """Many duplicated points and exact ties (all squared distances are integers)."""
    rng = np.random.default_rng(10)
    real = rng.integers(0, 4, (150, 2)).astype(float)
    fake = rng.integers(0, 5, (120, 2)).astype(float)
    for k in (1, 3, 8):
        ref = pr_reference(real, fake, k)
        assert precision_recall(real, fake, k=k, batch=9) == pytest.approx(ref, abs=1e-12)
        assert density_coverage(real, fake, k=k, batch=9) == pytest.approx(dc_reference(real, fake, k), abs=1e-12)


def test_pr_many_blocks():
    """1 300 × 1 100 points in blocks of 64 × 512: rows and columns both cut in several blocks."""
    rng = np.random.default_rng(19)
    real, fake = rng.standard_normal((1300, 3)), rng.standard_normal((1100, 3)) * 0.8 + 0.5
    assert precision_recall(real, fake, k=3, batch=64) == pytest.approx(pr_reference(real, fake, 3), abs=1e-12)


def test_density_coverage_matches_brute_force():
    rng = np.random.default_rng(11)
    real = rng.standard_normal((250, 6))
    fake = rng.standard_normal((180, 6)) * 0.5  # concentrated: density > 1
    ref = dc_reference(real, fake, 5)
    assert ref[0] > 1
    got = density_coverage(real, fake, k=5, batch=13)
    assert got == pytest.approx(ref, abs=1e-12) and got == density_coverage(real, fake, batch=10 ** 6)
    assert density_coverage(real, real + 100) == (0.0, 0.0)


def test_knn_needs_enough_points():
    with pytest.raises(ValueError):
        precision_recall(np.zeros((3, 2)), np.ones((5, 2)), k=3)


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


# ------------------------------------------------------------------ memorisation and diversity
def test_topk_l2_and_memorization_match_brute_force():
    rng = np.random.default_rng(16)
    train = rng.standard_normal((500, 8))
    x = rng.standard_normal((70, 8))
    d = dist(x, train)
    ref = np.sort(d, 1)[:, :5].mean()
    assert topk_l2(train, x, k=5, batch=6) == pytest.approx(ref, rel=1e-10)
    assert topk_l2(train, x, k=1) == pytest.approx(d.min(1).mean(), rel=1e-10)
    thr = np.median(d.min(1))
    assert memorization_ratio(train, x, thr, batch=6) == pytest.approx((d.min(1) < thr).mean())
    assert memorization_ratio(train, x, thr) == pytest.approx(0.5, abs=1 / 70)


def test_memorization_copies_and_far():
    rng = np.random.default_rng(17)
    train = rng.standard_normal((300, 16))
    train /= np.linalg.norm(train, axis=1, keepdims=True)  # CLIP-like unit features
    copies = train[rng.choice(300, 40)]
    assert memorization_ratio(train, copies, 0.12) == 1.0
    assert topk_l2(train, copies, k=1) < 1e-6
    assert memorization_ratio(train, copies + 10, 0.12) == 0.0
    # strict `<`: a sample exactly at the threshold is not memorised
    assert memorization_ratio(np.zeros((1, 2)), np.array([[1.0, 0.0], [0.5, 0.0]]), 1.0) == 0.5


def test_intra_class_distance_matches_brute_force():
    rng = np.random.default_rng(18)
    x = rng.standard_normal((90, 7))
    labels = rng.integers(0, 4, 90)
    labels[0] = 9  # a singleton class is skipped
    per_class = []
    for c in range(4):
        xc = x[labels == c]
        m = len(xc)
        per_class.append(sum(np.linalg.norm(xc[i] - xc[j]) for i in range(m) for j in range(m) if i != j)
                         / (m * (m - 1)))
    assert intra_class_distance(x, labels, batch=5) == pytest.approx(np.mean(per_class), rel=1e-10)
    assert intra_class_distance(np.ones((6, 3)), np.array([0, 0, 0, 1, 1, 1])) == 0


def test_condition_accuracy():
    logits = np.array([[5.0, 1, 0], [0, 2, 1], [0, 0, 3], [4, 0, 0]])
    assert condition_accuracy(logits, [0, 1, 2, 0]) == 1.0
    assert condition_accuracy(logits, np.array([0, 1, 2, 1])) == 0.75
    assert condition_accuracy(torch.from_numpy(logits), [1, 2, 0, 1]) == 0.0


# --------------------------------------------------------------------------------------- TopP&R
def kde_support_reference(x, alpha, k, num_boot, rng):
    """Straight from the authors' package's definitions: full distance matrix; bandwidth = the
    ⌊(n − k)/2⌋-th smallest, over the first n − k points, of the k-th smallest distance to a LATER
    point; cosine-kernel KDE at the points, each in its own density; `num_boot` explicit resamples
    with replacement (rng.randint(n, size=n) each, as np.random.choice); band = (1 − α) quantile of
    the sup deviations, support = density above the band."""
    n = len(x)
    d = dist(x, x)
    radii = np.sort([np.sort(d[i, i + 1:])[k - 1] for i in range(n - k)])
    h = radii[max((n - k) // 2 - 1, 0)]
    kern = np.where(d <= h, np.cos(np.pi / 2 * d / h), 0.0)
    dens = kern.mean(1)
    sups = [np.abs(kern[:, rng.randint(n, size=n)].mean(1) - dens).max() for _ in range(num_boot)]
    c_alpha = np.quantile(sups, 1 - alpha)
    return dens > c_alpha, h, c_alpha


def kde_at_reference(points, x, h):
    u = dist(points, x) / h
    return np.where(u <= 1, np.cos(np.pi / 2 * u), 0.0).mean(1)


def test_top_pr_matches_reference():
    rng = np.random.default_rng(20)
    x, y = rng.standard_normal((300, 5)), rng.standard_normal((250, 5)) + 0.7
    boot = np.random.RandomState(3)  # real resamples first, then fake (one stream)
    sx, hx, cx = kde_support_reference(x, 0.1, 25, 20, boot)
    sy, hy, cy = kde_support_reference(y, 0.1, 25, 20, boot)
    y_in_p, x_in_q = kde_at_reference(y, x, hx) > cx, kde_at_reference(x, y, hy) > cy
    p, r = (sy & y_in_p).sum() / sy.sum(), (sx & x_in_q).sum() / sx.sum()
    got = metrics.top_pr(x, y, num_boot=20, seed=3, batch=64)  # k = 5·dim = 25
    assert 0 < p < 1 and 0 < r < 1  # a non-trivial case
    assert got == pytest.approx((p, r, 2 * p * r / (p + r)), abs=1e-12)
    assert metrics.top_pr(x, y, num_boot=20, seed=3, batch=64) == got  # deterministic
    assert metrics.top_pr(x[:25], y) == pytest.approx((math.nan,) * 3, nan_ok=True)  # needs more than k points


def test_top_pr_identical_disjoint_and_shift():
    rng = np.random.default_rng(21)
    x, y = rng.standard_normal((600, 8)), rng.standard_normal((600, 8))
    # identical sets: the same KDE, two bands (own resamples), so one support holds the other
    p, r, _ = metrics.top_pr(x, x)
    assert max(p, r) == 1.0 and min(p, r) > 0.9
    assert metrics.top_pr(x, y + 100) == (0.0, 0.0, 0.0)  # far apart: no point in the other support
    same, shifted = metrics.top_pr(x, y)[2], metrics.top_pr(x, y + np.r_[2.0, np.zeros(7)])[2]
    assert same > 0.7 and shifted < 0.5 * same


def test_top_pr_ignores_outliers_unlike_knn_precision():
    """Real: a Gaussian cloud plus 5 far isolated outliers. Fake: the same distribution, plus a
    tight cluster of 60 points around one of the real outliers. The outliers are outside the real
    support (a lone point's density is within the bootstrap band of zero), so TopP counts the fake
    cluster as outside; Kynkäänniemi's precision counts it inside (the outlier's 3-NN ball reaches
    back to the cloud)."""
    rng = np.random.default_rng(22)
    d = 4
    outliers = 40 * np.eye(d)[[0, 1, 2, 3, 0]] * np.r_[1, 1, 1, 1, -1][:, None]
    real = np.concatenate([rng.standard_normal((800, d)), outliers])
    fake = np.concatenate([rng.standard_normal((740, d)), outliers[0] + 0.05 * rng.standard_normal((60, d))])

    def support(a, boot):
        x = torch.from_numpy(a)
        dens, c = metrics._kde_support(x, metrics._balloon_bandwidth(x, 5 * d, 1024), 0.1, 10, boot, 1024)
        return dens > c
    boot = np.random.RandomState(0)  # top_pr's draws at seed 0: the real resamples, then the fake ones
    real_support, fake_support = support(real, boot), support(fake, boot)
    assert not real_support[-5:].any() and real_support[:800].double().mean() > 0.1
    p_top, _, _ = metrics.top_pr(real, fake)
    assert precision_recall(real, fake[-60:])[0] == 1.0  # k-NN precision counts the whole cluster as realistic
    # TopP: the fake cluster lies in the fake support (dense) but never in the real one
    assert fake_support[-60:].all()
    n_in = fake_support.sum().item()
    assert p_top <= (n_in - 60) / n_in + 1e-12


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


def test_knn_metrics_on_float16_memmap(tmp_path):
    """top-5 L2, memorisation and precision/recall read a float16 memmap in chunks of a few rows
    and give what the brute-force reference gives on the same (float16-rounded) features."""
    rng = np.random.default_rng(25)
    train = np.lib.format.open_memmap(tmp_path / "f.npy", mode="w+", dtype=np.float16, shape=(500, 6))
    train[:] = rng.standard_normal((500, 6))
    train.flush()
    train = np.load(tmp_path / "f.npy", mmap_mode="r")
    gen = rng.standard_normal((40, 6))
    t64 = train.astype(np.float64)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    d = dist(unit(gen), unit(t64))
    assert topk_l2(train, gen, k=5, unit=True, rows=37) == pytest.approx(np.sort(d, 1)[:, :5].mean(), rel=1e-12)
    assert memorization_ratio(train, gen, 0.3, unit=True, rows=37) == pytest.approx((d.min(1) < 0.3).mean())
    p, r = precision_recall(train, gen, k=3, rows=37)
    r_real, r_fake, dd = kth_radius(t64, 3), kth_radius(gen, 3), dist(gen, t64)
    assert (p, r) == pytest.approx(((dd <= r_real[None]).any(1).mean(), (dd <= r_fake[:, None]).any(0).mean()))
