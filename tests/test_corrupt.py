"""Tests for corrupt_data.py: label corruption (counts, nesting, determinism, distribution of the new
labels, asymmetric groups), the manifest CLI, and the two dataset loaders.

Numbers are checked against independent references: round-half-up counts computed with Fraction,
chi-square / binomial statistics from scipy, hand-written IDX files and a hand-written ADM crop."""
import gzip
import hashlib
import json
import os
import pathlib
import subprocess
import sys
from fractions import Fraction

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

import models.corruption as cd
import models.data as md  # noqa: E402
from models.corruption import corrupt_count, corrupt_labels, load_groups
from models.data import FASHION_MNIST_CLASSES, FASHION_MNIST_GROUPS
from models.common import UsageError, atomic_write_json

REPO = pathlib.Path(__file__).resolve().parents[1]
FMNIST_DIR = pathlib.Path(md.FASHION_MNIST_SYSTEM_DIR)
K = 10


def round_half_up(eta, n):
    """Independent reference for corrupt_count: round(η·n) with halves rounded up, in exact
    rational arithmetic on the decimal value of η as written (not on its binary float)."""
    x = Fraction(str(eta)) * n
    assert x >= 0
    return int(x + Fraction(1, 2))  # int() truncates toward 0, i.e. floor for x >= 0


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


# ---------------------------------------------------------------------------------------------
# synthetic IDX files


def write_idx(path, array, gz=True):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    (gzip.open if gz else open)(path, "wb").write(header + array.tobytes())


def make_fake_fmnist(root, n=37, seed=0, sub="", gz=True, prefix="train"):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    d = pathlib.Path(root) / sub
    d.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    write_idx(str(d / f"{prefix}-images-idx3-ubyte{ext}"), images, gz)
    write_idx(str(d / f"{prefix}-labels-idx1-ubyte{ext}"), labels, gz)
    return images, labels


def test_read_idx_header():
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
        write_idx(os.path.join(tmp, "x.gz"), a)
        write_idx(os.path.join(tmp, "x"), a, gz=False)
        with gzip.open(os.path.join(tmp, "x.gz")) as f:
            assert f.read(4) == b"\x00\x00\x08\x03"
        assert np.array_equal(md.read_idx(os.path.join(tmp, "x.gz")), a)
        assert np.array_equal(md.read_idx(os.path.join(tmp, "x")), a)


@pytest.mark.parametrize("sub,gz", [("", True), ("raw", False), ("FashionMNIST/raw", True)])
def test_fashion_mnist_synthetic(tmp_path, sub, gz):
    images, labels = make_fake_fmnist(tmp_path, sub=sub, gz=gz)
    ds = md.FashionMNIST(data_path=str(tmp_path))
    assert len(ds) == len(labels) and ds.labels.dtype == np.int64
    assert np.array_equal(ds.labels, labels.astype(np.int64))
    assert ds.source == os.path.abspath(str(tmp_path))
    batch = ds.get_batch(torch.arange(len(ds)))
    assert batch.shape == (len(ds), 1, 32, 32) and batch.dtype == torch.float32
    ref = np.full((len(ds), 1, 32, 32), -1.0, dtype=np.float32)
    ref[:, 0, 2:30, 2:30] = images.astype(np.float32) / 127.5 - 1.0
    assert np.allclose(batch.numpy(), ref, atol=1e-6, rtol=0)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert torch.all(batch[:, 0][:, torch.from_numpy(border)] == -1.0)
    assert batch.min() >= -1 and batch.max() <= 1
    # vectorised gather == per-item __getitem__, any order, repeats allowed
    idx = torch.tensor([5, 0, 36, 5, 17])
    b = ds.get_batch(idx)
    for j, i in enumerate(idx.tolist()):
        x, i2 = ds[i]
        assert i2 == i and torch.equal(b[j], x)
    # load_dataset routes to it; fashion-mnist is 32x32 only
    assert len(md.load_dataset("fashion-mnist", str(tmp_path))) == len(labels)
    with pytest.raises(UsageError):
        md.load_dataset("fashion-mnist", str(tmp_path), image_size=64)


def test_fashion_mnist_test_split_and_errors(tmp_path):
    _, lt = make_fake_fmnist(tmp_path, n=11, seed=3, prefix="t10k")
    assert np.array_equal(md.FashionMNIST(str(tmp_path), split="test").labels, lt)
    with pytest.raises(UsageError, match="no Fashion-MNIST IDX"):
        md.FashionMNIST(str(tmp_path), split="train")
    with pytest.raises(UsageError, match="does not exist"):
        md.FashionMNIST(str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------
# ImageFolder


def ref_center_crop(img, size):
    """ADM preprocessing written out independently: BOX-halve while the short side >= 2·size, BICUBIC
    resize so the short side is `size`, crop the central size x size square."""
    w, h = img.size
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
        img = img.resize((w, h), Image.BOX)
    if w <= h:
        nw, nh = size, int(Fraction(h * size, w) + Fraction(1, 2))
    else:
        nw, nh = int(Fraction(w * size, h) + Fraction(1, 2)), size
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.array(img.crop((left, top, left + size, top + size)))


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    # created in reverse order: class ids must follow sorted names, not creation order
    spec = {"zebra": [(300, 200), (70, 90)], "apple": [(64, 64), (33, 100)]}
    arrays = {}
    for cls in ["zebra", "apple"]:
        (root / cls).mkdir(parents=True)
        for j, (w, h) in enumerate(spec[cls]):
            a = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / cls / f"img{j}.png")
            arrays[(cls, j)] = a
    (root / "zebra" / "notes.txt").write_text("not an image")
    return root, arrays


def test_center_crop_against_reference(image_folder):
    root, arrays = image_folder
    for a in arrays.values():
        got = md.center_crop_arr(Image.fromarray(a), 32)
        assert got.shape == (32, 32, 3)
        assert np.array_equal(got, ref_center_crop(Image.fromarray(a), 32))


@pytest.mark.parametrize("w,h", [(300, 200), (70, 90), (32, 32), (45, 200)])
def test_center_crop_constant_colour(w, h):
    a = np.empty((h, w, 3), np.uint8)
    a[:] = (200, 17, 90)
    got = md.center_crop_arr(Image.fromarray(a), 32)
    assert got.shape == (32, 32, 3)
    assert np.abs(got.astype(int) - np.array([200, 17, 90])).max() <= 1


def test_center_crop_geometry_is_central():
    """Wide 300x200 image: the central 200x200 (x in [50, 250)) survives; left half of it red, right
    half blue, the outer 50 columns green. A left- or right-aligned crop would show green."""
    a = np.zeros((200, 300, 3), np.uint8)
    a[:, :50] = (0, 255, 0)
    a[:, 50:150] = (255, 0, 0)
    a[:, 150:250] = (0, 0, 255)
    a[:, 250:] = (0, 255, 0)
    got = md.center_crop_arr(Image.fromarray(a), 32).astype(int)
    assert np.all(got[:, 2:13] == [255, 0, 0])
    assert np.all(got[:, 19:30] == [0, 0, 255])
    assert got[:, 2:30, 1].max() <= 10  # no green except possibly bicubic bleed at the outermost columns
    # tall 90x150 image: rows [30, 120) survive; top half of them red, bottom half blue
    b = np.zeros((150, 90, 3), np.uint8)
    b[:30] = (0, 255, 0)
    b[30:75] = (255, 0, 0)
    b[75:120] = (0, 0, 255)
    b[120:] = (0, 255, 0)
    got = md.center_crop_arr(Image.fromarray(b), 32).astype(int)
    assert np.all(got[2:13] == [255, 0, 0]) and np.all(got[19:30] == [0, 0, 255])
    assert got[2:30, :, 1].max() <= 10


def test_image_folder_dataset(image_folder):
    root, arrays = image_folder
    ds = md.ImageFolderData(str(root), image_size=32)
    assert ds.classes == ["apple", "zebra"]
    assert ds.labels.tolist() == [0, 0, 1, 1] and len(ds) == 4  # notes.txt ignored
    assert ds.channels == 3 and ds.image_size == 32
    order = [("apple", 0), ("apple", 1), ("zebra", 0), ("zebra", 1)]
    for i, key in enumerate(order):
        x, i2 = ds[i]
        assert i2 == i and x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        ref = ref_center_crop(Image.fromarray(arrays[key]), 32).transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
        assert np.allclose(x.numpy(), ref, atol=1e-6, rtol=0)
        xf, _ = ds[(i, True)]
        assert torch.equal(xf, torch.flip(x, dims=[2]))
        assert not torch.equal(xf, x)
        assert torch.equal(ds[(i, False)][0], x)
    assert md.dataset_key("imagefolder", ds) == "imagefolder-imgs"


def test_image_folder_errors(tmp_path):
    with pytest.raises(UsageError):
        md.ImageFolderData(str(tmp_path / "missing"))
    (tmp_path / "only").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "only" / "a.png")
    with pytest.raises(UsageError, match="two class"):
        md.ImageFolderData(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# the CLI


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "corrupt_data.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def assert_one_error_line(proc):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr


@pytest.fixture(scope="module")
def fmnist_available():
    if not (FMNIST_DIR / "train-labels-idx1-ubyte.gz").exists() and not (FMNIST_DIR / "train-labels-idx1-ubyte").exists():
        if os.environ.get("CI"):
            pytest.fail(f"{FMNIST_DIR} missing in CI: install the Debian package dataset-fashion-mnist")
        pytest.skip(f"{FMNIST_DIR} absent (apt-get install dataset-fashion-mnist); CLI acceptance test skipped")
    return FMNIST_DIR


@pytest.fixture(scope="module")
def acceptance_run(fmnist_available, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out"
    proc = run_cli("--dataset", "fashion-mnist", "--corrupt", "0.025", "--seed", "0", "--out-dir", out)
    return proc, out


def real_fmnist_labels():
    stem = FMNIST_DIR / "train-labels-idx1-ubyte"
    path = str(stem) + ".gz" if os.path.exists(str(stem) + ".gz") else str(stem)
    return md.read_idx(path).astype(np.int64)


def test_cli_acceptance(acceptance_run):
    proc, out = acceptance_run
    assert proc.returncode == 0, proc.stderr
    path = out / "data" / "fashion-mnist" / "corrupt_symmetric_eta0.025_seed0.json"
    assert path.is_file()
    assert str(path) in proc.stdout and "1500 of 60000" in proc.stdout
    m = json.loads(path.read_text())
    assert m["num_corrupted"] == 1500 and len(m["indices"]) == 1500 and m["num_examples"] == 60000
    assert m["num_eligible"] == 60000 and m["realised_ratio"] == 0.025
    assert m["seed"] == 0 and m["corrupt"] == 0.025 and m["corrupt_type"] == "symmetric"
    assert m["classes"] == FASHION_MNIST_CLASSES and m["num_classes"] == 10
    idx = np.array(m["indices"])
    orig, new = np.array(m["original_labels"]), np.array(m["new_labels"])
    assert len(orig) == len(new) == 1500
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < 60000
    assert not np.any(orig == new) and new.min() >= 0 and new.max() < 10
    labels = real_fmnist_labels()
    assert len(labels) == 60000
    assert np.array_equal(labels[idx], orig)
    ref_new, ref_chosen = corrupt_labels(labels, 10, 0.025, 0)
    assert np.array_equal(ref_chosen, idx) and np.array_equal(ref_new[idx], new)
    # no stray temp files from the atomic write
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_cli_idempotent(acceptance_run):
    proc, out = acceptance_run
    assert proc.returncode == 0
    path = out / "data" / "fashion-mnist" / "corrupt_symmetric_eta0.025_seed0.json"
    before = path.read_bytes()
    again = run_cli("--dataset", "fashion-mnist", "--corrupt", "0.025", "--seed", "0", "--out-dir", out)
    assert again.returncode == 0, again.stderr
    assert path.read_bytes() == before


@pytest.mark.parametrize("args", [["--corrupt", "-0.1"], ["--corrupt", "1.0"], ["--corrupt", "nan"],
                                  ["--corrupt", "0.1", "--data-path", "/nonexistent"]])
def test_cli_bad_input(tmp_path, args):
    out = tmp_path / "out"
    proc = run_cli("--dataset", "fashion-mnist", *args, "--out-dir", out)
    assert_one_error_line(proc)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_tampered_manifest(tmp_path):
    """A manifest that disagrees with what would be written makes the CLI refuse, untouched. Uses a
    small synthetic dataset so that it runs without the real one."""
    data = tmp_path / "data"
    make_fake_fmnist(data, n=400, seed=1)
    out = tmp_path / "out"
    good = run_cli("--corrupt", "0.1", "--seed", "2", "--data-path", data, "--out-dir", out)
    assert good.returncode == 0, good.stderr
    path = out / "data" / "fashion-mnist" / "corrupt_symmetric_eta0.1_seed2.json"
    m = json.loads(path.read_text())
    assert m["num_corrupted"] == 40 and m["source"] == str(data)
    labels = md.read_idx(str(data / "train-labels-idx1-ubyte.gz")).astype(np.int64)
    assert np.array_equal(labels[m["indices"]], m["original_labels"])

    m["indices"][0] = min(set(range(400)) - set(m["indices"]))  # one index swapped for an unchosen one
    tampered = json.dumps(m)
    path.write_text(tampered)
    proc = run_cli("--corrupt", "0.1", "--seed", "2", "--data-path", data, "--out-dir", out)
    assert_one_error_line(proc)
    assert path.read_text() == tampered


def test_prepare_corruption_existing_manifest_checks(tmp_path):
    """In-process checks of the existing-manifest guard: unreadable file, another dataset copy."""
    data, other = tmp_path / "data", tmp_path / "other"
    make_fake_fmnist(data, n=300, seed=1)
    make_fake_fmnist(other, n=300, seed=1)  # identical content, different source path
    out = str(tmp_path / "out")
    ds = md.FashionMNIST(str(data))
    new, m, path = cd.prepare_corruption(ds, "fashion-mnist", out, 0.1, 2)
    assert not os.path.exists(out), "prepare_corruption writes nothing"
    assert path == os.path.join(out, "data", "fashion-mnist", "corrupt_symmetric_eta0.1_seed2.json")
    assert m["num_corrupted"] == 30 and np.array_equal(np.flatnonzero(new != ds.labels), m["indices"])
    atomic_write_json(path, m)
    cd.prepare_corruption(ds, "fashion-mnist", out, 0.1, 2)  # same corruption: accepted
    with pytest.raises(UsageError, match="different corruption"):
        cd.prepare_corruption(md.FashionMNIST(str(other)), "fashion-mnist", out, 0.1, 2)
    pathlib.Path(path).write_text("{not json")
    with pytest.raises(UsageError, match="not a readable manifest"):
        cd.prepare_corruption(ds, "fashion-mnist", out, 0.1, 2)
    assert pathlib.Path(path).read_text() == "{not json"
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(UsageError, match="--corrupt must be in"):
            cd.prepare_corruption(ds, "fashion-mnist", out, bad, 2)


def test_manifest_not_an_object(tmp_path):
    data = tmp_path / "data"
    make_fake_fmnist(data, n=50, seed=1)
    out = str(tmp_path / "out")
    ds = md.FashionMNIST(str(data))
    path = pathlib.Path(cd.manifest_path(out, "fashion-mnist", "symmetric", 0.1, 2))
    path.parent.mkdir(parents=True)
    path.write_text("[]\n")
    try:
        with pytest.raises(UsageError):
            cd.prepare_corruption(ds, "fashion-mnist", out, 0.1, 2)
    finally:
        assert path.read_text() == "[]\n"


def test_cli_asymmetric_synthetic(tmp_path):
    data = tmp_path / "data"
    _, labels = make_fake_fmnist(data, n=1000, seed=6)
    out = tmp_path / "out"
    proc = run_cli("--corrupt", "0.3", "--corrupt-type", "asymmetric", "--seed", "1", "--data-path", data,
                   "--out-dir", out)
    assert proc.returncode == 0, proc.stderr
    m = json.loads((out / "data" / "fashion-mnist" / "corrupt_asymmetric_eta0.3_seed1.json").read_text())
    members = [0, 2, 4, 6, 5, 7, 9]
    n_elig = int(np.isin(labels, members).sum())
    assert m["num_eligible"] == n_elig and m["num_corrupted"] == round_half_up(0.3, n_elig)
    assert m["groups"] == [[0, 2, 4, 6], [5, 7, 9]]
    group = {k: g for g, ks in enumerate(m["groups"]) for k in ks}
    assert all(group[a] == group[b] and a != b for a, b in zip(m["original_labels"], m["new_labels"]))
