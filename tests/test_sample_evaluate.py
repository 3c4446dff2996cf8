"""sample.py and evaluate.py end to end: rank invariance, resume, layouts, metrics, comparison."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import FMNIST_DIR, make_fake_fmnist, make_tiny_clip, run_script, softmax_head, tree_snapshot  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run trained long enough (lr 1e-2) that its output is far from the zero init."""
    root = tmp_path_factory.mktemp("se")
    make_fake_fmnist(root / "data", n=256)
    out = root / "out"
    for run, eta in (("demo", 0.0), ("corrupt", 0.1)):
        run_script("train.py", ["--data-path", root / "data", "--out-dir", out, "--run", run, "--model", "DiT-T/8",
                                "--global-batch-size", "32", "--lr", "1e-2", "--max-steps", "12", "--corrupt", eta,
                                "--log-every", "4"])
    return root, out


SAMPLE = ["--num-samples", "24", "--batch-size", "8", "--sampler", "ddpm", "--steps", "10", "--cfg-scale", "2"]


@pytest.mark.slow  # CI time, ~7 s: the release's 2-rank sampling is in CI (tests/test_pretrained.py)
def test_two_ranks_give_byte_identical_images(trained):
    _, out = trained
    run_script("sample.py", ["--run", out / "demo", *SAMPLE, "--tag", "one"])
    run_script("sample.py", ["--run-dir", out / "demo", *SAMPLE, "--tag", "two"], nproc=2)
    one, two = out / "demo" / "samples" / "one", out / "demo" / "samples" / "two"
    names = sorted(os.listdir(one / "images"))
    assert len(names) == 24 and names == sorted(os.listdir(two / "images"))
    for n in names:
        assert (one / "images" / n).read_bytes() == (two / "images" / n).read_bytes(), n
    a, b = np.load(one / "samples.npz"), np.load(two / "samples.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and a["arr_0"].shape == (24, 32, 32, 1) and a["arr_0"].dtype == np.uint8
    assert np.array_equal(a["arr_1"], np.arange(24) % 10)  # class-balanced
    assert len({a["arr_0"][i].tobytes() for i in range(24)}) == 24  # every image has its own noise
    config = json.loads((one / "sample_config.json").read_text())
    assert config["sampler"] == "ddpm" and config["cfg_scale"] == 2.0 and config["ema"] is True
    assert (one / "grid.png").exists()


def test_interrupted_sampling_resumes(trained):
    _, out = trained
    args = ["--run", out / "demo", *SAMPLE, "--tag", "resume", "--sampler", "ddim"]
    run_script("sample.py", args)
    images = out / "demo" / "samples" / "resume" / "images"
    full = {n: (images / n).read_bytes() for n in os.listdir(images)}
    keep = {n: os.stat(images / n).st_mtime_ns for n in sorted(full)[:8]}
    for n in sorted(full)[8:13]:  # as if the run died before these were written
        os.remove(images / n)
    run_script("sample.py", args)
    assert {n: (images / n).read_bytes() for n in os.listdir(images)} == full
    assert all(os.stat(images / n).st_mtime_ns == t for n, t in keep.items())  # finished batches skipped


def test_sampler_options_and_sweep(trained):
    _, out = trained
    run_script("sample.py", ["--run", out / "demo", "--num-samples", "10", "--batch-size", "10", "--steps", "5",
                             "--cfg-scale", "1,3", "--class", "4", "--no-ema", "--clip-denoised", "--cfg-channels", "1"])
    tags = sorted(os.listdir(out / "demo" / "samples"))
    for scale in ("1", "3"):
        tag = f"dpm-solver++5_cfg{scale}_n10_seed0_class4_noema"
        assert tag in tags
        data = np.load(out / "demo" / "samples" / tag / "samples.npz")
        assert (data["arr_1"] == 4).all()
    a = np.load(out / "demo" / "samples" / "dpm-solver++5_cfg1_n10_seed0_class4_noema" / "samples.npz")["arr_0"]
    b = np.load(out / "demo" / "samples" / "dpm-solver++5_cfg3_n10_seed0_class4_noema" / "samples.npz")["arr_0"]
    assert not np.array_equal(a, b)  # guidance changes the images


@pytest.mark.parametrize("args", [["--cfg-scale", "0.5"], ["--steps", "0"], ["--class", "10"], ["--cfg-scale", "a,b"], ["--seed", "-1"]])
def test_sample_bad_input(trained, args):
    _, out = trained
    before = tree_snapshot(out)
    proc = run_script("sample.py", ["--run", out / "demo", "--num-samples", "4", *args], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:"), proc.stderr
    assert tree_snapshot(out) == before


def test_sample_rejects_foreign_checkpoint(trained, tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    for path in (tmp_path / "other.pt", tmp_path / "missing.pt"):
        proc = run_script("sample.py", ["--ckpt", path, "--num-samples", "4"], check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error:") and proc.stderr.strip().count("\n") == 0


@pytest.mark.slow  # CI time (issue 31): its stage runs end to end in faster tests
def test_evaluate_and_compare(trained):
    root, out = trained
    for run in ("demo", "corrupt"):
        for scale in ("1.5", "3"):
            run_script("sample.py", ["--run", out / run, "--num-samples", "40", "--batch-size", "20", "--sampler", "ddim",
                                     "--steps", "5", "--cfg-scale", scale, "--tag", f"s{scale}"])
            run_script("evaluate.py", ["--samples", out / run / "samples" / f"s{scale}"])
            m = json.loads((out / run / "samples" / f"s{scale}" / "metrics.json").read_text())
            for key in ("fid_fmnist", "is_fmnist", "precision_fmnist", "recall_fmnist", "accuracy", "kid_fmnist",
                        "rmd_top1_fmnist", "top5_l2_fmnist", "memorization_fmnist", "intra_class_l2_fmnist"):
                assert np.isfinite(m["metrics"][key]), key
            assert 0 <= m["metrics"]["accuracy"] <= 1 and m["metrics"]["fid_fmnist"] > 0
    cache = Path(os.environ["SLIGHT_CORRUPTION_CACHE"])  # tests/conftest.py: the session's evaluate.py cache
    assert list(cache.glob("classifier/fashion-mnist-*.pt")) and not (out / "classifier").exists()  # per dataset, not per out-dir
    run_script("evaluate.py", ["--compare", out])
    table = (out / "comparison.md").read_text()
    assert table.count("\n") == 2 + 4 and "| η 10 % | DiT-T/8 | 12 |" in table and "| clean | DiT-T/8 | 12 |" in table
    assert (out / "comparison_eta.png").exists() and (out / "comparison_fid_is.png").exists()


@pytest.mark.slow  # CI time (issue 31): its stage runs end to end in faster tests
def test_evaluate_real_images_score_better_than_noise(tmp_path):
    """The metrics rank real data above noise: real test images vs the test reference give a low
    FID (in the classifier's and the autoencoder's features) and high classifier accuracy; uniform
    noise gives a high FID and near-chance accuracy."""
    make_fake_fmnist(tmp_path / "data", n=400)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from models.data import FashionMNIST
    train = FashionMNIST(str(tmp_path / "data"))
    real = train.images[:100].permute(0, 2, 3, 1).numpy()
    noise = np.random.default_rng(0).integers(0, 256, size=real.shape, dtype=np.uint8)
    scores = {}
    for name, images in (("real", real), ("noise", noise)):
        np.savez(tmp_path / f"{name}.npz", arr_0=images, arr_1=train.labels[:100])
        run_script("evaluate.py", ["--samples", tmp_path / f"{name}.npz", "--data-path", tmp_path / "data",
                                   "--out-dir", tmp_path / "out", "--ref", "fashion-mnist"])
        scores[name] = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert scores["real"]["accuracy"] > 0.9 and scores["noise"]["accuracy"] < 0.5
    assert scores["real"]["fid_fmnist"] < 0.2 * scores["noise"]["fid_fmnist"]
    assert scores["real"]["fid_ae"] < 0.2 * scores["noise"]["fid_ae"]  # the label-free space too
    assert scores["real"]["memorization_fmnist"] == 1.0  # copies of training images
    floor = json.loads((tmp_path / "metrics.json").read_text())["floor"]
    assert {"fid_ae", "precision_ae", "recall_ae", "density_ae", "coverage_ae"} <= set(floor) and "kid_ae" not in floor


def test_evaluate_bad_input(tmp_path):
    for args in (["--samples", tmp_path / "nothing"], ["--compare", tmp_path], []):
        proc = run_script("evaluate.py", args, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error:") and proc.stderr.strip().count("\n") == 0


def test_inception_path_with_a_stand_in_network(tmp_path):
    """The Inception plumbing (TorchScript signature of clean-fid's inception-2015-12-05.pt) with a
    scripted stand-in network, since the real weights cannot be downloaded offline."""
    class StandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 16)
            self.output = torch.nn.Linear(16, 8)

        def forward(self, img, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False):
            f = self.proj(img.mean(dim=(2, 3)) / 255.0)
            if return_features:
                return f
            return softmax_head(f, self.output.weight, self.output.bias, no_output_bias)
    torch.manual_seed(0)
    torch.jit.script(StandIn()).save(str(tmp_path / "inception.pt"))
    rng = np.random.default_rng(0)
    gen = rng.integers(0, 256, size=(100, 16, 16, 3), dtype=np.uint8)  # TopP&R needs > 5 x 16 dims points a set
    np.savez(tmp_path / "gen.npz", arr_0=gen)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, size=(100, 16, 16, 3), dtype=np.uint8))
    run_script("evaluate.py", ["--samples", tmp_path / "gen.npz", "--ref", tmp_path / "ref.npz", "--features", "inception",
                               "--inception", tmp_path / "inception.pt", "--out-dir", tmp_path / "out"])
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["features"] == "inception" and {"fid", "is", "precision", "recall", "kid", "toppr_f1"} <= set(m["metrics"])
    assert "sfid" not in m["metrics"] and any("mixed_6" in n for n in m["notes"])  # the stand-in has no mixed_6 block
    assert m["metrics"]["is"] >= 1.0


@pytest.mark.slow  # CI time (issue 31): its stage runs end to end in faster tests
def test_clip_diversity_metrics_with_a_tiny_random_clip(trained, tmp_path):
    """The CLIP path (the paper's feature space for RMD / top-5 L2 / memorisation) with a randomly
    initialised tiny CLIP vision tower saved offline, checked against the same metrics computed
    directly on its embeddings."""
    pytest.importorskip("transformers")
    from models import metrics as M
    from models.features import ClipNet, extract
    make_tiny_clip(tmp_path / "clip")
    root, out = trained
    run_script("sample.py", ["--run", out / "demo", "--num-samples", "20", "--batch-size", "20", "--steps", "4", "--tag", "clip"])
    run_script("evaluate.py", ["--samples", out / "demo" / "samples" / "clip", "--clip", tmp_path / "clip"])
    m = json.loads((out / "demo" / "samples" / "clip" / "metrics.json").read_text())["metrics"]
    data = np.load(out / "demo" / "samples" / "clip" / "samples.npz")
    from models.data import FashionMNIST
    train = FashionMNIST(str(root / "data"))
    clip = ClipNet(str(tmp_path / "clip"), torch.device("cpu"))
    gen = extract(clip, data["arr_0"])[0]["feat"].astype(np.float64)
    ref = extract(clip, train.images.permute(0, 2, 3, 1).numpy())[0]["feat"].astype(np.float64)
    assert np.allclose(np.linalg.norm(gen, axis=1), 1, atol=1e-6)
    # the training features are cached in float16 for the k-NN metrics; RMD uses float64 moments
    ref16 = ref.astype(np.float16).astype(np.float64)
    assert m["top5_l2_clip"] == pytest.approx(M.topk_l2(ref16, gen, k=5, unit=True), rel=1e-6)
    assert m["memorization_clip"] == pytest.approx(M.memorization_ratio(ref16, gen, 0.12, unit=True))
    assert m["rmd_top1_clip"] == pytest.approx(M.top_fraction_mean(M.rmd(ref, train.labels, gen, data["arr_1"]), 0.01), rel=1e-5)
    proc = run_script("evaluate.py", ["--samples", out / "demo" / "samples" / "clip", "--clip", tmp_path / "nope"], check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot load a CLIP model")


def test_shipped_classifier_is_the_real_training_sets():
    """On the real Fashion-MNIST, evaluate.py scores with the classifier in models/weights/ (the same
    features on every machine; retraining gives another network per CPU): the file is named by the
    identity of the real training split, and on the real test split it scores the test accuracy it
    records (recomputed here)."""
    if not os.path.isdir(FMNIST_DIR):
        if os.environ.get("CI"):
            pytest.fail(f"{FMNIST_DIR} missing in CI: .ci/run must apt-get install dataset-fashion-mnist")
        pytest.skip(f"{FMNIST_DIR} absent (apt-get install dataset-fashion-mnist)")
    from evaluate import dataset_split
    from models.classifier import SHIPPED_CLASSIFIERS, load_or_train_classifier
    from models.features import FmnistNet, source_identity
    key = source_identity(dataset_split("fashion-mnist", None, "train")[0])[:16]
    path = os.path.join(SHIPPED_CLASSIFIERS, f"fashion-mnist-{key}.pt")
    assert os.path.exists(path), f"no shipped classifier for the real training set ({key})"

    def no_training(split):
        raise AssertionError("the shipped classifier was not used")
    model, recorded = load_or_train_classifier("/nonexistent/cache.pt", no_training, shipped=path)
    test_x, test_y = dataset_split("fashion-mnist", None, "test")
    logits = torch.cat([FmnistNet(model)(torch.from_numpy(test_x[i:i + 1000]))["logits"] for i in range(0, len(test_y), 1000)])
    assert recorded == pytest.approx(float((logits.argmax(1).numpy() == np.asarray(test_y)).mean()), abs=1e-4) and recorded > 0.88
