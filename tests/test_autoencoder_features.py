"""The label-free feature space of evaluate.py (models/autoencoder.py, the *_ae metrics): the
shipped encoder belongs to the real training set, real images score near 0 and wrong ones far
higher, a ladder of degradations ranks in order, and training is quick, cached and deterministic."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import FMNIST_DIR, make_fake_fmnist  # noqa: E402


def real_fmnist():
    if not os.path.isdir(FMNIST_DIR):
        if os.environ.get("CI"):
            pytest.fail(f"{FMNIST_DIR} missing in CI: .ci/run must apt-get install dataset-fashion-mnist")
        pytest.skip(f"{FMNIST_DIR} absent (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def shipped():
    """-> (AutoencoderNet of the shipped encoder, the first half of the real test split (uint8
    NHWC), features of 2000 images of its second half: the reference)."""
    real_fmnist()
    from evaluate import dataset_split
    from models.autoencoder import SHIPPED_AUTOENCODERS, load_or_train_autoencoder
    from models.features import AutoencoderNet, source_identity
    key = source_identity(dataset_split("fashion-mnist", None, "train")[0])[:16]
    path = os.path.join(SHIPPED_AUTOENCODERS, f"autoencoder-fashion-mnist-{key}.pt")
    assert os.path.exists(path), f"no shipped autoencoder for the real training set ({key})"
    assert os.path.getsize(path) < 1_000_000

    def no_training(split):
        raise AssertionError("the shipped autoencoder was not used")
    encoder, mse = load_or_train_autoencoder("/nonexistent/cache.pt", no_training, shipped=path)
    assert 0 < mse < 0.05  # recorded test reconstruction error, pixels in [-1, 1]
    net, test = AutoencoderNet(encoder), dataset_split("fashion-mnist", None, "test")[0]
    return net, test[:5000], features(net, test[5000:7000])


def features(net, images):
    from models.features import extract
    return extract(net, images, batch_size=500)[0]["feat"].astype(np.float64)


def fid(a, b):
    from models import metrics as M
    return M.fid_from_features(a, b)


def blur(images, sigma):
    """Gaussian blur (std `sigma` pixels, 7x7 kernel) of uint8 NHWC images, rounded back to uint8."""
    t = torch.arange(7, dtype=torch.float64) - 3
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = (k[:, None] * k[None, :] / k.sum() ** 2)[None, None].float()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    y = F.conv2d(F.pad(x, (3, 3, 3, 3), mode="replicate"), k)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def noisy(images, std, seed=0):
    z = np.random.default_rng(seed).normal(0, std, images.shape)
    return np.clip(np.round(images + z), 0, 255).astype(np.uint8)


def test_shipped_autoencoder_real_vs_wrong(shipped):
    """Two disjoint parts of the real test split are close (FID near 0, precision / recall /
    density / coverage near 1) and far from shuffled pixels or noise; features are deterministic."""
    from models import metrics as M
    net, test, ref = shipped
    real = features(net, test[:2000])
    assert np.array_equal(real[:100], features(net, test[:100].copy()))  # the same features in any batch
    perm = np.random.default_rng(0).permutation(32 * 32)
    shuffled = features(net, test[:500].reshape(500, -1)[:, perm].reshape(test[:500].shape))
    noise = features(net, np.random.default_rng(0).integers(0, 256, test[:500].shape, dtype=np.uint8))
    assert 0 <= fid(real, ref) < 0.01 * fid(shuffled, ref) and fid(shuffled, ref) < fid(noise, ref)
    precision, recall = M.precision_recall(ref[:500], real[:500], k=3)
    density, coverage = M.density_coverage(ref[:500], real[:500], k=5)
    assert 0.6 < precision <= 1 and 0.6 < recall <= 1 and 0.6 < density < 1.5 and 0.6 < coverage <= 1
    wrong = M.precision_recall(ref[:500], noise, k=3) + M.density_coverage(ref[:500], noise, k=5)
    assert all(0 <= v < 0.05 for v in wrong), wrong


def test_degradation_ladder_ranks_in_order(shipped):
    """Real images blurred, or with additive Gaussian noise, of increasing strength: FID in the
    label-free space against the reference (other test images) increases at every step."""
    net, test, ref = shipped
    real = test[:1000]
    clean = fid(features(net, real), ref)
    for degrade, levels in ((blur, (0.5, 0.8, 1.2, 2.0)), (noisy, (4, 8, 16, 32))):
        fids = [clean] + [fid(features(net, degrade(real, s)), ref) for s in levels]
        assert all(x < y for x, y in zip(fids, fids[1:])), (degrade.__name__, fids)


def test_autoencoder_trains_quickly_cached_and_deterministic(tmp_path):
    """On a tiny fake Fashion-MNIST the encoder trains in a few seconds (min_steps), is cached and
    reloaded without training, and retraining with the same seed gives the same weights."""
    from models.autoencoder import load_or_train_autoencoder, train_autoencoder
    from models.data import FashionMNIST
    make_fake_fmnist(tmp_path / "data", n=64)
    splits = {s: FashionMNIST(str(tmp_path / "data"), s) for s in ("train", "test")}
    load = lambda s: (splits[s].images.permute(0, 2, 3, 1).numpy(), splits[s].labels)  # noqa: E731
    encoder, mse = load_or_train_autoencoder(str(tmp_path / "ae.pt"), load, log=lambda *a: None)
    assert (tmp_path / "ae.pt").exists() and 0 < mse < 0.2  # it learns: 0.57 at the start, 0.24 for all-black images

    def no_training(split):
        raise AssertionError("the cached autoencoder was not used")
    again, mse_again = load_or_train_autoencoder(str(tmp_path / "ae.pt"), no_training)
    assert mse_again == mse and all(torch.equal(p, q) for p, q in zip(encoder.state_dict().values(), again.state_dict().values()))
    x = load("train")[0]
    first, _ = train_autoencoder(x, x, min_steps=5, log=lambda *a: None)
    second, _ = train_autoencoder(x, x, min_steps=5, log=lambda *a: None)
    assert all(torch.equal(p, q) for p, q in zip(first.state_dict().values(), second.state_dict().values()))
