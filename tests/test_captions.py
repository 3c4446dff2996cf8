"""Caption datasets and caption corruption (swap, rewrite)."""
import json
from collections import Counter
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.corruption import caption_swap_pairs, corrupt_captions, corrupt_count, rewrite_captions  # noqa: E402
from models.common import UsageError  # noqa: E402
from models.data import CAPTION_TEMPLATES, CaptionImages, FashionMNISTCaptions  # noqa: E402
from tests.helpers import make_fake_fmnist, run_script, tree_snapshot  # noqa: E402


def captions_with_repeats(n=3000, distinct=40, seed=0):
    rng = np.random.default_rng(seed)
    return [f"caption {k}" for k in rng.integers(0, distinct, size=n)]


@pytest.mark.parametrize("eta", [0.0, 0.001, 0.025, 0.05, 0.1, 0.333, 0.9])
def test_swap_changes_exactly_round_eta_n_to_another_string(eta):
    caps = captions_with_repeats()
    new, chosen, donors = corrupt_captions(caps, eta, seed=3)
    m = corrupt_count(eta, len(caps))
    assert len(chosen) == m and len(set(chosen.tolist())) == m
    changed = [i for i in range(len(caps)) if new[i] != caps[i]]
    assert changed == chosen.tolist()  # exactly the chosen ones differ, each to a different string
    for i, d in zip(chosen.tolist(), donors.tolist()):
        assert d != i and new[i] == caps[d]  # it carries another example's caption
    # swaps: the caption multiset is preserved except for at most one half-swap
    extra = Counter(new) - Counter(caps)
    assert sum(extra.values()) == corrupt_count(eta, len(caps)) % 2


def test_swap_is_nested_and_deterministic():
    caps = captions_with_repeats(seed=1)
    sets = [set(corrupt_captions(caps, eta, seed=7)[1].tolist()) for eta in (0.025, 0.05, 0.1)]
    assert sets[0] <= sets[1] <= sets[2]
    a, b = corrupt_captions(caps, 0.05, seed=7), corrupt_captions(caps, 0.05, seed=7)
    assert a[0] == b[0] and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], corrupt_captions(caps, 0.05, seed=8)[1])
    # the examples shared by η = 0.025 and 0.05 get the same new captions (even counts: whole pairs)
    small, big = corrupt_captions(caps, 0.024, seed=7)[0], corrupt_captions(caps, 0.05, seed=7)[0]
    assert all(small[i] == big[i] for i in sets[0] if corrupt_count(0.024, len(caps)) % 2 == 0 and small[i] != caps[i])


def test_swap_pairs_never_pair_identical_strings_and_fail_when_impossible():
    caps = ["same"] * 50 + ["other"] * 3
    pairs = caption_swap_pairs(caps, seed=0)
    assert len(pairs) == 3 and all(caps[a] != caps[b] for a, b in pairs)
    corrupt_captions(caps, 6 / 53, seed=0)
    with pytest.raises(UsageError, match="only 6 captions"):
        corrupt_captions(caps, 0.2, seed=0)


def test_rewrite_file(tmp_path):
    caps = [f"c{i}" for i in range(100)]
    f = tmp_path / "rw.tsv"
    f.write_text("".join(f"{i}\tnew {i}\n" for i in range(0, 100, 2)) + "3\tc3\n")  # 3 is not a change
    new, chosen, donors = rewrite_captions(caps, 0.1, 0, str(f))
    assert len(chosen) == 10 and all(i % 2 == 0 and new[i] == f"new {i}" for i in chosen.tolist()) and (donors == -1).all()
    with pytest.raises(UsageError, match="rewrites only 50"):
        rewrite_captions(caps, 0.6, 0, str(f))
    (tmp_path / "bad.tsv").write_text("x\ty\n")
    with pytest.raises(UsageError, match="bad.tsv:1"):
        rewrite_captions(caps, 0.1, 0, str(tmp_path / "bad.tsv"))
    with pytest.raises(UsageError, match="needs --rewrites"):
        rewrite_captions(caps, 0.1, 0, None)


def test_fashion_mnist_captions(tmp_path):
    labels = make_fake_fmnist(tmp_path, n=50)
    ds = FashionMNISTCaptions(str(tmp_path))
    assert len(ds.captions) == 50 and np.array_equal(ds.labels, labels)
    names = ["a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot"]
    assert ds.captions[3] == CAPTION_TEMPLATES[3].format(names[labels[3]])


def make_images(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, size=(20 + i, 24, 3), dtype=np.uint8)).save(folder / f"{i:03d}.jpg")


def test_caption_file_layouts(tmp_path):
    make_images(tmp_path / "img", 4)
    (tmp_path / "cc.tsv").write_text("".join(f"img/{i:03d}.jpg\tcaption number {i}\n" for i in range(4)))
    tsv = CaptionImages(str(tmp_path / "cc.tsv"), image_size=16)
    assert tsv.captions == [f"caption number {i}" for i in range(4)] and tsv[2][0].shape == (3, 16, 16)
    (tmp_path / "cc.csv").write_text("filepath,caption\n" + "".join(f"img/{i:03d}.jpg,\"a, b {i}\"\n" for i in range(4)))
    assert CaptionImages(str(tmp_path / "cc.csv"), 16).captions[1] == "a, b 1"
    for i in range(4):  # img2dataset "files" output: side-car .txt captions
        (tmp_path / "img" / f"{i:03d}.txt").write_text(f"side car {i}\n")
    assert CaptionImages(str(tmp_path / "img"), 16).captions == [f"side car {i}" for i in range(4)]
    (tmp_path / "missing.tsv").write_text("img/000.jpg\tok\nimg/999.jpg\tgone\n")
    with pytest.raises(UsageError, match="1 image.*999.jpg"):
        CaptionImages(str(tmp_path / "missing.tsv"))
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(UsageError, match="no \\(image, caption\\) pairs"):
        CaptionImages(str(tmp_path / "empty.tsv"))


def test_cli_caption_corruption_and_bad_input(tmp_path):
    make_fake_fmnist(tmp_path / "data", n=200)
    out = tmp_path / "out"
    run_script("corrupt_data.py", ["--dataset", "fashion-mnist-captions", "--data-path", tmp_path / "data",
                                   "--corrupt", "0.05", "--out-dir", out])
    m = json.loads((out / "data" / "fashion-mnist-captions" / "corrupt_swap_eta0.05_seed0.json").read_text())
    assert m["num_corrupted"] == 10 and all(a != b for a, b in zip(m["original_captions"], m["new_captions"]))
    before = tree_snapshot(out)
    (tmp_path / "empty.tsv").write_text("")
    for args in (["--dataset", "fashion-mnist-captions", "--corrupt-type", "symmetric", "--data-path", tmp_path / "data"],
                 ["--dataset", "captions", "--data-path", tmp_path / "empty.tsv"],
                 ["--dataset", "fashion-mnist", "--corrupt-type", "swap", "--data-path", tmp_path / "data"]):
        proc = run_script("corrupt_data.py", [*args, "--corrupt", "0.05", "--out-dir", out], check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error:") and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert tree_snapshot(out) == before
