"""evaluate.py at scale: training-set features streamed into an on-disk float16 cache (bounded
memory, reused by the next call), and the cache's safety (half-written caches, other networks)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import REPO, make_tiny_clip, run_script

sys.path.insert(0, str(REPO))

RSS_WRAPPER = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)")


def write_image_folder(root, n, classes=10, size=32, seed=0):
    """n small RGB PNGs in `classes` class sub-folders (class k: a bright band at row 3k, plus noise)."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        os.makedirs(root / f"class{k:02d}", exist_ok=True)
    for i in range(n):
        k = i % classes
        a = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
        a[3 * k: 3 * k + 3] = 220
        Image.fromarray(a).save(root / f"class{k:02d}" / f"{i:06d}.png", compress_level=0)


@pytest.fixture(scope="module")
def scale(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    write_image_folder(root / "train20k", 20000)
    write_image_folder(root / "train2k", 2000)
    write_image_folder(root / "train200", 200)
    make_tiny_clip(root / "clip")
    rng = np.random.default_rng(1)
    np.savez(root / "ref.npz", arr_0=rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8))
    os.makedirs(root / "gen")
    np.savez(root / "gen" / "samples.npz", arr_0=rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8), arr_1=np.arange(100) % 10)  # > 5 x 16 dims for TopP&R
    return root


def evaluate_rss(root, train, out):
    """Run evaluate.py in a fresh child; -> (peak RSS in KiB of it and its workers, metrics.json)."""
    cmd = [sys.executable, "-c", RSS_WRAPPER, sys.executable, "evaluate.py", "--samples", str(root / "gen"),
           "--ref", str(root / "ref.npz"), "--features", "clip", "--clip", str(root / "clip"),
           "--train-data", str(root / train), "--out-dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.strip().splitlines()[-1]), json.loads((root / "gen" / "metrics.json").read_text())


@pytest.mark.slow  # memory of 20 K training images; ~60 s
def test_training_features_stream_into_a_reusable_cache(scale):
    rss_small, _ = evaluate_rss(scale, "train2k", scale / "out-small")
    rss_first, first = evaluate_rss(scale, "train20k", scale / "out-big")
    rss_second, second = evaluate_rss(scale, "train20k", scale / "out-big")
    # bounded memory: 10x the training images cost (almost) no extra memory
    assert rss_first <= 1.2 * rss_small, (rss_small, rss_first)
    t1, t2 = first["timings"]["train_clip"], second["timings"]["train_clip"]
    print(f"peak RSS 2K {rss_small} KiB, 20K {rss_first} KiB, 20K cached {rss_second} KiB; "
          f"training features {t1['seconds']:.2f} s (extracted) vs {t2['seconds']:.3f} s (cache)")
    assert (t1["cache"], t2["cache"], second["timings"]["reference"]["cache"]) == ("miss", "hit", "hit")
    assert t1["seconds"] >= 5 * t2["seconds"], (t1, t2)
    assert first["metrics"] == second["metrics"]  # the cache gives exactly what extraction gave
    for key in ("fid_clip", "top5_l2_clip", "memorization_clip", "rmd_top1_clip", "toppr_f1_clip"):
        assert np.isfinite(second["metrics"][key]), key
    # the cache holds each training image's features, in dataset order (spot check against a direct pass)
    from models.data import ImageFolderData
    from models.features import ClipNet, dataset_images, extract
    cached = np.load(Path(t2["folder"]) / "feat.npy", mmap_mode="r")
    ds = ImageFolderData(str(scale / "train20k"), 32)
    assert cached.shape[0] == len(ds) == 20000 and cached.dtype == np.float16
    rows = np.random.default_rng(0).choice(len(ds), 40, replace=False)
    source = dataset_images(ds)
    source.paths = [source.paths[i] for i in rows]
    direct = extract(ClipNet(str(scale / "clip"), torch.device("cpu")), source)[0]["feat"]
    np.testing.assert_allclose(cached[rows].astype(np.float32), direct, atol=2e-3)


@pytest.mark.slow  # ~21 s; the default suite's time (README); run with -m slow
def test_half_written_cache_is_rebuilt_and_networks_do_not_share(scale, tmp_path):
    args = ["--samples", scale / "gen", "--ref", scale / "ref.npz", "--features", "clip", "--clip", scale / "clip",
            "--train-data", scale / "train200", "--out-dir", tmp_path]
    run_script("evaluate.py", args)
    good = json.loads((scale / "gen" / "metrics.json").read_text())
    folder = Path(good["timings"]["train_clip"]["folder"])
    os.remove(folder / "meta.json")  # as if killed between writing the features and the index
    np.save(folder / "feat.npy", np.zeros((3, 16), np.float16))  # and a wrong feature file left behind
    run_script("evaluate.py", args)
    again = json.loads((scale / "gen" / "metrics.json").read_text())
    assert again["timings"]["train_clip"]["cache"] == "miss" and again["metrics"] == good["metrics"]
    make_tiny_clip(tmp_path / "clip2", seed=1)  # same architecture, other weights
    run_script("evaluate.py", [*args[:6], "--clip", tmp_path / "clip2", *args[8:]])
    other = json.loads((scale / "gen" / "metrics.json").read_text())
    assert other["timings"]["train_clip"]["cache"] == "miss"
    assert Path(other["timings"]["train_clip"]["folder"]).parent == folder.parent  # same dataset, other network
    assert other["metrics"]["top5_l2_clip"] != good["metrics"]["top5_l2_clip"]
