"""Tests for the distance-based metrics of models/metrics.py (P/R, density/coverage, memorisation, TopP&R) by brute force."""
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
import pytest
import torch

from models import metrics
from models.metrics import density_coverage, intra_class_distance, memorization_ratio, precision_recall, topk_l2


# ----------------------------------------------------------------------------------- references
def dist(a, b):
    """Full L2 distance matrix by explicit differences."""
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


def kth_radius(a, k):
    """Distance of each point to its k-th nearest neighbour in its own set, itself excluded."""
    d = dist(a, a)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, k - 1]


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
