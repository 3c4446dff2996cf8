"""Tests for the dataset loaders of models/data.py (IDX, ImageFolder, ADM crop) and the corrupt_data.py manifest CLI."""
import gzip
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

import models.corruption as cd
import models.data as md  # noqa: E402
from models.corruption import corrupt_labels
from models.data import FASHION_MNIST_CLASSES
from models.common import UsageError, atomic_write_json
from tests.helpers import REPO, round_half_up

FMNIST_DIR = pathlib.Path(md.FASHION_MNIST_SYSTEM_DIR)


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
