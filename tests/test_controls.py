"""Tests for models/controls.py.

canny is checked pixel for pixel against cv2.Canny itself (the reference it ports) on images chosen to exercise
every branch: uint8 noise (large gradients, every direction bin), blurred noise (smooth gradients, many diagonal
bins and near-ties), piecewise-constant shapes (exact magnitude ties between neighbours, so the strict / >=
side of the non-maximum suppression matters), real Fashion-MNIST images, and colour images whose channels tie
in magnitude. edge_f1 is checked against a brute-force reference built from scipy's chessboard distance
transform, and on hand-checkable cases."""
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
import pytest
import torch
from scipy import ndimage

from models.controls import canny, edge_f1
from models.data import FASHION_MNIST_SYSTEM_DIR, read_idx

THRESHOLDS = [(100, 200), (50, 150), (0, 0), (200, 100), (10.7, 30.9), (1, 5)]


# ----------------------------------------------------------------------------------- image sets
def noise(rng, n, h, w, c=None):
    return rng.integers(0, 256, (n, h, w) if c is None else (n, h, w, c), dtype=np.uint8)


def smooth(rng, n, h, w, c=None, sigma=1.5):
    """Blurred noise stretched to the full uint8 range."""
    x = noise(rng, n, h, w, c).astype(float)
    x = ndimage.gaussian_filter(x, (0, sigma, sigma) + ((0,) if c else ()))
    return ((x - x.min()) / np.ptp(x) * 255).astype(np.uint8)


def shapes(rng, n, h=32, w=32):
    """Piecewise-constant images: a few rectangles and discs of random grey levels on a random background."""
    yy, xx = np.mgrid[:h, :w]
    out = np.empty((n, h, w), np.uint8)
    for k in range(n):
        img = np.full((h, w), rng.integers(0, 256), np.uint8)
        for _ in range(rng.integers(1, 5)):
            v = rng.integers(0, 256)
            if rng.random() < 0.5:
                y0, x0, dy, dx = rng.integers(-4, h), rng.integers(-4, w), *rng.integers(2, 20, 2)
                img[max(y0, 0):y0 + dy, max(x0, 0):x0 + dx] = v
            else:
                cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, 12)
                img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = v
        out[k] = img
    return out


def colour_shapes(rng, n, h=32, w=32):
    """(n, h, w, 3) shapes whose channels are related, so that channel magnitudes tie with different dx, dy."""
    x = np.stack([shapes(rng, 3, h, w).transpose(1, 2, 0) for _ in range(n)])
    x[: n // 2, ..., 1] = x[: n // 2, ..., 0] // 2 * 2
    x[: n // 4, ..., 2] = 255 - x[: n // 4, ..., 0]
    x[n // 2: 3 * n // 4, ..., 2] = x[n // 2: 3 * n // 4, ..., 1]
    return x


def fashion_mnist(n):
    for name in ("t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz"):
        path = os.path.join(FASHION_MNIST_SYSTEM_DIR, name)
        if os.path.isfile(path):
            return read_idx(path)[:n].copy()
    pytest.skip("Fashion-MNIST test images not installed")


# ----------------------------------------------------------------------------------- canny
def assert_matches_cv2(images, low, high):
    """images: uint8 (N, H, W) grey or (N, H, W, 3) colour numpy arrays; cv2.Canny gets each one as is."""
    cv2 = pytest.importorskip("cv2")
    t = torch.from_numpy(images)
    t = t[:, None] if t.dim() == 3 else t.permute(0, 3, 1, 2)
    ours = canny(t, low, high)
    assert ours.dtype == torch.uint8 and ours.shape == (len(images), 1) + images.shape[1:3]
    ref = np.stack([cv2.Canny(np.ascontiguousarray(im), low, high) for im in images])
    bad = ours[:, 0].numpy() != ref
    assert not bad.any(), (f"{bad.sum()} of {bad.size} pixels differ from cv2.Canny in {bad.any((1, 2)).sum()} "
                           f"of {len(images)} images (thresholds {low}, {high}; cv2 edge fraction {(ref > 0).mean():.3f})")
    return ref


@pytest.mark.parametrize("low,high", THRESHOLDS)
@pytest.mark.parametrize("size", [(32, 32), (17, 23), (40, 9), (3, 5)])
def test_canny_noise(low, high, size):
    assert_matches_cv2(noise(np.random.default_rng(0), 40, *size), low, high)


@pytest.mark.parametrize("low,high", THRESHOLDS)
def test_canny_smooth(low, high):
    rng = np.random.default_rng(1)
    ref = assert_matches_cv2(smooth(rng, 100, 32, 32), low, high)
    assert_matches_cv2(smooth(rng, 20, 23, 41, sigma=3), low, high)
    assert ref.any()


@pytest.mark.parametrize("low,high", THRESHOLDS)
def test_canny_shapes(low, high):
    ref = assert_matches_cv2(shapes(np.random.default_rng(2), 150, 29, 34), low, high)
    assert ref.any()


@pytest.mark.parametrize("low,high", THRESHOLDS)
def test_canny_fashion_mnist(low, high):
    ref = assert_matches_cv2(fashion_mnist(1000), low, high)
    assert ref.any()


@pytest.mark.parametrize("low,high", THRESHOLDS)
def test_canny_colour(low, high):
    rng = np.random.default_rng(3)
    assert_matches_cv2(noise(rng, 40, 20, 30, 3), low, high)
    assert_matches_cv2(smooth(rng, 60, 32, 32, 3), low, high)
    assert_matches_cv2(colour_shapes(rng, 100), low, high)
    assert_matches_cv2(smooth(rng, 1, 150, 220, 3, sigma=2), low, high)  # a larger image


def test_canny_float_thresholds_are_floored():
    img = np.zeros((1, 8, 8), np.uint8)
    img[:, :, 4:] = 3  # a vertical step: |dx| = 12 on the two columns beside it
    for high in (11.0, 11.6, 11.99, 12.0, 12.5):
        ref = assert_matches_cv2(img, 5, high)
        assert ref.any() == (high < 12)
    ref = assert_matches_cv2(img, 5, 11)
    assert ref[0, :, 3].all() and (ref > 0).sum() == 8  # of the two tied columns, the left one is kept


def test_canny_constant_and_batch_independence():
    const = np.full((3, 16, 16), 77, np.uint8)
    for low, high in THRESHOLDS:
        assert not assert_matches_cv2(const, low, high).any()
    x = torch.from_numpy(noise(np.random.default_rng(4), 6, 16, 16))[:, None]
    assert torch.equal(canny(x), torch.cat([canny(x[i:i + 1]) for i in range(6)]))
    with pytest.raises(ValueError):
        canny(x.float())


# ----------------------------------------------------------------------------------- edge_f1
def reference_f1(pred, target, tolerance):
    """Brute force: chessboard distance transforms of the complement, one image at a time."""
    out = []
    for p, t in zip(pred, target):
        p, t = p[0] != 0, t[0] != 0
        if not p.any() and not t.any():
            out.append(1.0)
            continue
        if not p.any() or not t.any():
            out.append(0.0)
            continue
        dist_to_t = ndimage.distance_transform_cdt(~t, metric="chessboard")
        dist_to_p = ndimage.distance_transform_cdt(~p, metric="chessboard")
        precision = (dist_to_t[p] <= tolerance).mean()
        recall = (dist_to_p[t] <= tolerance).mean()
        out.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return np.array(out)


@pytest.mark.parametrize("tolerance", [0, 1, 2, 3])
def test_edge_f1_matches_brute_force(tolerance):
    rng = np.random.default_rng(5)
    n, h, w = 200, 19, 27
    density = rng.uniform(0.005, 0.15, (n, 1, 1, 1))
    pred = rng.random((n, 1, h, w)) < density
    target = rng.random((n, 1, h, w)) < density
    pred[:5] = False  # empty prediction
    target[3:8] = False  # empty target (and both empty for 3 and 4)
    ours = edge_f1(torch.from_numpy(pred), torch.from_numpy(target.astype(np.uint8) * 255), tolerance)
    assert ours.shape == (n,) and ours.dtype.is_floating_point
    ref = reference_f1(pred, target, tolerance)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-6, atol=1e-7)
    assert ((ref > 0) & (ref < 1)).sum() > n // 4  # non-trivial values were compared


def test_edge_f1_hand_cases():
    a = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
    a[0, 0, 3:9, 5] = True  # a vertical line
    shifted = a.roll(1, dims=3)
    far = torch.zeros_like(a)
    far[0, 0, 0, 11] = True
    empty = torch.zeros_like(a)
    assert edge_f1(a, a).item() == 1.0
    assert edge_f1(a, a, tolerance=0).item() == 1.0
    assert edge_f1(a, far).item() == 0.0
    assert edge_f1(a, shifted, tolerance=1).item() == 1.0
    assert edge_f1(a, shifted, tolerance=0).item() == 0.0
    assert edge_f1(empty, empty).item() == 1.0
    assert edge_f1(a, empty).item() == 0.0 and edge_f1(empty, a).item() == 0.0
    half = a.clone()
    half[0, 0, 6:9] = False  # predicting half of the line: precision 1, recall 1/2 -> F1 2/3
    assert edge_f1(half, a, tolerance=0).item() == pytest.approx(2 / 3)
    batch = edge_f1(torch.cat([a, a, empty]), torch.cat([a, far, empty]))
    assert batch.tolist() == [1.0, 0.0, 1.0]
