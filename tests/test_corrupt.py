"""Tests for the label corruption of models/corruption.py: counts, nesting, determinism, distribution of the new
labels, asymmetric groups (the dataset loaders and the corrupt_data.py CLI: tests/test_datasets.py).

Numbers are checked against independent references: round-half-up counts computed with Fraction,
chi-square / binomial statistics from scipy."""
import hashlib
import os
import pathlib
import subprocess
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
import pytest
from scipy import stats

from models.corruption import corrupt_count, corrupt_labels, load_groups
from models.data import FASHION_MNIST_CLASSES, FASHION_MNIST_GROUPS
from models.common import UsageError
from tests.helpers import REPO, round_half_up

K = 10


def imbalanced_labels(n, weights, seed):
    """Labels with exactly round(n·w_k/Σw) examples per class (so the empirical prior is known
    exactly), in shuffled order."""
    w = np.asarray(weights, dtype=np.float64)
    counts = np.floor(n * w / w.sum()).astype(int)
    counts[0] += n - counts.sum()
    labels = np.repeat(np.arange(len(w)), counts)
    return np.random.default_rng(seed).permutation(labels), counts


LABELS_10K, COUNTS_10K = imbalanced_labels(10000, [30, 20, 12, 10, 8, 7, 5, 4, 3, 1], seed=123)


# ---------------------------------------------------------------------------------------------
# corrupt_count and the symmetric corruption


@pytest.mark.parametrize("eta,n,expected", [(0.5, 5, 3), (0.5, 3, 2), (0.5, 1, 1), (0.25, 10, 3),
                                            (0.025, 60000, 1500), (0.0, 60000, 0), (0.999, 10000, 9990),
                                            (0.35, 10, 4), (0.15, 10, 2)])
def test_corrupt_count_rounds_halves_up(eta, n, expected):
    # 0.5*5 = 2.5 -> 3 (Python's round would give 2), 0.25*10 = 2.5 -> 3
    assert corrupt_count(eta, n) == expected


@pytest.mark.parametrize("eta,n,expected", [(0.000525, 60000, 32), (0.145, 100, 15), (0.285, 100, 29),
                                            (0.5005, 1000, 501)])
def test_corrupt_count_decimal_halfway_cases(eta, n, expected):
    """Half-way products that binary floats put just below .5 (0.145 * 100 = 14.499999999999998):
    the decimal ratio the user typed rounds up, as the README promises."""
    assert int(eta * n + 0.5) == expected - 1  # what floor(η·n + 0.5) in binary floats gives
    assert corrupt_count(eta, n) == expected == round_half_up(eta, n)


def test_corrupt_count_matches_exact_rounding_on_a_grid():
    rng = np.random.default_rng(0)
    for eta in [round(float(v), k) for v in rng.random(300) for k in (2, 3, 4, 5)]:
        for n in (7, 100, 1000, 1281167):
            assert corrupt_count(eta, n) == round_half_up(eta, n), (eta, n)


@pytest.mark.parametrize("eta", [0.0, 0.0001, 0.00005, 0.025, 0.05, 0.2, 0.5, 0.73, 0.999])
def test_symmetric_exact_count_no_self_label(eta):
    labels = LABELS_10K.copy()
    new, chosen = corrupt_labels(labels, K, eta, seed=7)
    assert np.array_equal(labels, LABELS_10K), "input labels must not be modified"
    expected = round_half_up(eta, len(labels))
    assert len(chosen) == expected == corrupt_count(eta, len(labels))
    assert len(np.unique(chosen)) == len(chosen) and np.all(np.diff(chosen) > 0)  # sorted, distinct
    assert chosen.min(initial=0) >= 0 and chosen.max(initial=0) < len(labels)
    changed = np.flatnonzero(new != labels)
    assert np.array_equal(changed, chosen), "exactly the chosen examples change (none keeps its class)"
    mask = np.ones(len(labels), bool)
    mask[chosen] = False
    assert np.array_equal(new[mask], labels[mask])
    assert new.dtype == np.int64 and new.min() >= 0 and new.max() < K


def test_symmetric_choice_is_uniform_over_examples():
    """Every example is equally likely to be chosen: per-class chosen counts are hypergeometric with
    mean η·N_y (the chi-square against binomial variance is conservative for a hypergeometric)."""
    labels, counts = imbalanced_labels(200000, [30, 20, 12, 10, 8, 7, 5, 4, 3, 1], seed=5)
    eta = 0.3
    _, chosen = corrupt_labels(labels, K, eta, seed=11)
    obs = np.bincount(labels[chosen], minlength=K)
    exp = counts * len(chosen) / len(labels)
    assert stats.chisquare(obs, exp).pvalue > 1e-4
    # ... and the positions are uniform too (no bias to the start of the array)
    obs_pos = np.bincount(chosen * 20 // len(labels), minlength=20)
    assert stats.chisquare(obs_pos).pvalue > 1e-4


def test_nesting_same_seed():
    n1, c1 = corrupt_labels(LABELS_10K, K, 0.025, seed=3)
    n2, c2 = corrupt_labels(LABELS_10K, K, 0.05, seed=3)
    n3, c3 = corrupt_labels(LABELS_10K, K, 0.1, seed=3)
    assert (len(c1), len(c2), len(c3)) == (250, 500, 1000)
    assert set(c1) < set(c2) < set(c3)
    assert np.array_equal(n1[c1], n2[c1]) and np.array_equal(n1[c1], n3[c1])
    assert np.array_equal(n2[c2], n3[c2])
    # the nesting holds all the way up
    n4, c4 = corrupt_labels(LABELS_10K, K, 0.9, seed=3)
    assert set(c3) < set(c4) and np.array_equal(n3[c3], n4[c3])


def test_determinism_and_seed_dependence():
    a = corrupt_labels(LABELS_10K, K, 0.2, seed=42)
    b = corrupt_labels(LABELS_10K.copy(), K, 0.2, seed=42)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    c = corrupt_labels(LABELS_10K, K, 0.2, seed=43)
    assert len(c[1]) == len(a[1])
    overlap = len(np.intersect1d(a[1], c[1]))
    # independent draws of 2000 of 10000 overlap in ~400 (hypergeometric sd ~ 18)
    assert 250 < overlap < 550
    # labels given as a plain list give the same result
    d = corrupt_labels(LABELS_10K.tolist(), K, 0.2, seed=42)
    assert np.array_equal(a[0], d[0]) and np.array_equal(a[1], d[1])


def test_pure_function_same_bytes_in_subprocess():
    """A fresh interpreter (as another rank would be) produces the same bytes."""
    new, chosen = corrupt_labels(LABELS_10K, K, 0.1, seed=9)
    here = hashlib.sha256(new.tobytes() + chosen.astype(np.int64).tobytes()).hexdigest()
    code = ("import sys, hashlib, numpy as np; sys.path.insert(0, %r); import models.corruption as cd\n"
            "labels = np.load(sys.argv[1])\n"
            "new, chosen = cd.corrupt_labels(labels, 10, 0.1, seed=9)\n"
            "print(hashlib.sha256(new.tobytes() + chosen.astype(np.int64).tobytes()).hexdigest())\n" % str(REPO))
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "labels.npy")
        np.save(path, LABELS_10K)
        out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "RANK": "3", "WORLD_SIZE": "4"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == here


def _new_label_counts(labels, new, chosen, y):
    rows = chosen[labels[chosen] == y]
    return np.bincount(new[rows], minlength=K), len(rows)


@pytest.mark.parametrize("y", [0, 3, 9])
def test_new_label_distribution_is_prior_restricted(y):
    """For flipped examples of class y, P(new = k) = p_k / (1 - p_y) for k != y."""
    labels, counts = imbalanced_labels(200000, [40, 20, 10, 8, 6, 5, 4, 3, 2, 2], seed=1)
    p = counts / counts.sum()
    new, chosen = corrupt_labels(labels, K, 0.5, seed=2024)
    obs, m = _new_label_counts(labels, new, chosen, y)
    assert obs[y] == 0
    others = np.array([k for k in range(K) if k != y])
    expected = m * p[others] / p[others].sum()
    assert stats.chisquare(obs[others], expected).pvalue > 1e-4
    # power: the same data reject the uniform distribution over the other classes
    assert stats.chisquare(obs[others], np.full(K - 1, m / (K - 1))).pvalue < 1e-6


def test_zero_prior_class_never_target():
    labels, _ = imbalanced_labels(5000, [5, 0, 3, 0, 2], seed=0)
    new, chosen = corrupt_labels(labels, 5, 0.6, seed=1)
    assert not np.isin(new, [1, 3]).any()
    assert len(chosen) == 3000 and np.all(new[chosen] != labels[chosen])


def test_resample_semantics_seed_epoch():
    """--corrupt-resample uses seed [seed, epoch]: same size, different sets per epoch, reproducible."""
    e0 = corrupt_labels(LABELS_10K, K, 0.2, seed=[5, 0])
    e1 = corrupt_labels(LABELS_10K, K, 0.2, seed=[5, 1])
    e1b = corrupt_labels(LABELS_10K, K, 0.2, seed=[5, 1])
    assert len(e0[1]) == len(e1[1]) == 2000
    assert not np.array_equal(e0[1], e1[1])
    assert 250 < len(np.intersect1d(e0[1], e1[1])) < 550  # ~independent draws
    assert np.array_equal(e1[0], e1b[0]) and np.array_equal(e1[1], e1b[1])
    # and the epoch draws are nested over η like the plain ones
    small = corrupt_labels(LABELS_10K, K, 0.05, seed=[5, 1])
    assert set(small[1]) < set(e1[1]) and np.array_equal(small[0][small[1]], e1[0][small[1]])


# ---------------------------------------------------------------------------------------------
# asymmetric corruption and group files


def test_fashion_groups_default():
    groups = load_groups(None, FASHION_MNIST_CLASSES)
    assert groups == [[0, 2, 4, 6], [5, 7, 9]]  # tops: T-shirt, Pullover, Coat, Shirt; footwear
    assert [[FASHION_MNIST_CLASSES[k] for k in g] for g in groups] == [sorted(g, key=FASHION_MNIST_CLASSES.index)
                                                                      for g in FASHION_MNIST_GROUPS]
    with pytest.raises(UsageError):
        load_groups(None, ["cat", "dog"])


@pytest.mark.parametrize("eta", [0.0, 0.1, 0.5, 0.95])
def test_asymmetric_within_group(eta):
    labels, counts = imbalanced_labels(100000, [30, 20, 12, 10, 8, 7, 5, 4, 3, 1], seed=8)
    groups = load_groups(None, FASHION_MNIST_CLASSES)
    new, chosen = corrupt_labels(labels, K, eta, seed=4, kind="asymmetric", groups=groups)
    member = {k: gi for gi, g in enumerate(groups) for k in g}
    n_eligible = int(sum(counts[k] for k in member))
    assert len(chosen) == round_half_up(eta, n_eligible)
    assert np.array_equal(np.flatnonzero(new != labels), chosen)
    assert set(np.unique(labels[chosen])) <= set(member)
    src, dst = labels[chosen], new[chosen]
    assert all(member[int(a)] == member.get(int(b), -1) for a, b in zip(src, dst))
    assert np.all(src != dst)


def test_asymmetric_new_label_distribution():
    labels, counts = imbalanced_labels(200000, [30, 20, 12, 10, 8, 7, 5, 4, 3, 1], seed=8)
    p = counts / counts.sum()
    groups = load_groups(None, FASHION_MNIST_CLASSES)
    new, chosen = corrupt_labels(labels, K, 0.5, seed=4, kind="asymmetric", groups=groups)
    for y, g in [(0, [2, 4, 6]), (9, [5, 7])]:
        obs, m = _new_label_counts(labels, new, chosen, y)
        assert obs[[k for k in range(K) if k not in g]].sum() == 0
        assert stats.chisquare(obs[g], m * p[g] / p[g].sum()).pvalue > 1e-4
        assert stats.chisquare(obs[g], np.full(len(g), m / len(g))).pvalue < 1e-6


def test_load_groups_file(tmp_path):
    classes = ["bird", "car", "cat", "dog", "ship", "truck"]
    f = tmp_path / "groups.txt"
    f.write_text("# animals and vehicles\n"
                 "cat, dog  bird   # pets and friends\n"
                 "\n"
                 "   # only a comment\n"
                 "truck,car\n")
    assert load_groups(str(f), classes) == [[0, 2, 3], [1, 5]]
    labels = np.repeat(np.arange(6), 1000)
    new, chosen = corrupt_labels(labels, 6, 0.5, seed=0, kind="asymmetric", groups=load_groups(str(f), classes))
    assert len(chosen) == 2500 and not np.isin(labels[chosen], [4]).any()


@pytest.mark.parametrize("text,match", [
    ("cat dog\nhorse car\n", "not in the dataset"),
    ("cat dog\ndog car\n", "more than one group"),
    ("cat dog\ncar\n", "at least two"),
    ("cat cat\n", "at least two"),
])
def test_load_groups_errors(tmp_path, text, match):
    classes = ["car", "cat", "dog", "ship"]
    f = tmp_path / "groups.txt"
    f.write_text(text)
    with pytest.raises(UsageError, match=match):
        load_groups(str(f), classes)


def test_load_groups_missing_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        load_groups(str(tmp_path / "nope.txt"), ["a", "b"])


def test_unknown_kind():
    with pytest.raises(UsageError):
        corrupt_labels(LABELS_10K, K, 0.1, seed=0, kind="pairflip")
