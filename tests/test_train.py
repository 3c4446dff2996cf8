"""End-to-end tests of train.py: learning, rank invariance, exact resume, bad input, precisions."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from tests.helpers import FMNIST_DIR, REPO, make_fake_fmnist, run_script, tree_snapshot, wait_for  # noqa: E402
from models.common import ema_decay_at, update_ema  # noqa: E402


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fmnist")
    make_fake_fmnist(d, n=256)
    return d


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def load_ckpt(run_dir, name="last.pt"):
    return torch.load(os.path.join(run_dir, "ckpt", name), map_location="cpu", weights_only=True)


TINY = ["--model", "DiT-T/8", "--global-batch-size", "16", "--lr", "1e-3", "--warmup-steps", "0", "--lr-decay", "none", "--log-every", "1"]


def test_loss_decreases_when_overfitting(fake_data, tmp_path):
    # a zero-initialised output layer predicts ε̂ = 0, so the first loss is E[ε²] = 1 exactly in
    # expectation; a working loop must drive it well below that on 32 easy images
    run_script("train.py", ["--data-path", fake_data, "--out-dir", tmp_path, "--run", "fit", "--model", "DiT-T/4",
                            "--global-batch-size", "32", "--lr", "4e-3", "--warmup-steps", "0", "--max-steps", "50", "--log-every", "1",
                            "--no-learn-sigma", "--class-dropout", "0"])
    losses = [r["loss"] for r in read_log(tmp_path / "fit")]
    assert 0.95 < losses[0] < 1.05, losses[0]  # 32x1024 squared normals: std of the mean ~0.008
    assert sum(losses[-10:]) / 10 < 0.4, losses


@pytest.mark.slow  # CI time, ~14 s: CI trains on 2 ranks in test_acceptance_two_ranks_real_fashion_mnist
def test_one_rank_equals_two_ranks(fake_data, tmp_path):
    """Same global batch, same seed: 1 process and 2 gloo processes must train the same weights.
    The only difference is the reduction order of the gradient (one mean over 16 vs the average of
    two means over 8), a float32 rounding effect of ~1e-7 relative; Adam turns that into weight
    differences far below one update (lr = 1e-3). We require < 2e-5 absolute on every weight while
    the weights moved by > 1e-3: a bug in data sharding or in the per-rank randomness (a different
    batch, noise or CEP draw on one rank) moves weights by O(lr) and fails."""
    common = [*TINY, "--data-path", fake_data, "--out-dir", tmp_path, "--max-steps", "6", "--corrupt", "0.1",
              "--cep", "--input-perturbation", "0.1", "--ckpt-every", "6"]
    run_script("train.py", [*common, "--run", "one"])
    run_script("train.py", [*common, "--run", "two"], nproc=2)
    one, two = load_ckpt(tmp_path / "one"), load_ckpt(tmp_path / "two")
    moved = max((one["model"][k] - two["model"][k]).abs().max().item() for k in one["model"])
    assert moved < 2e-5, moved
    ema_diff = max((one["ema"][k] - two["ema"][k]).abs().max().item() for k in one["ema"])
    assert ema_diff < 2e-5, ema_diff
    run_script("train.py", [*common, "--run", "zero", "--max-steps", "1"])
    start = load_ckpt(tmp_path / "zero")["model"]
    travel = max((one["model"][k] - start[k]).abs().max().item() for k in one["model"])
    assert travel > 1e-3, travel
    for a, b in zip(read_log(tmp_path / "one"), read_log(tmp_path / "two")):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-5 * abs(a["loss"])


@pytest.mark.slow  # CI time (issue 31): its stage runs end to end in faster tests
def test_resume_after_kill_is_exact(fake_data, tmp_path):
    common = ["--data-path", fake_data, "--out-dir", tmp_path, "--model", "DiT-T/8", "--global-batch-size", "32",
              "--max-steps", "20", "--ckpt-every", "5", "--log-every", "3", "--cep", "--corrupt", "0.1"]
    run_script("train.py", [*common, "--run", "straight"])
    # the same run, killed (SIGKILL, no clean-up) once it has written a checkpoint, then resumed
    cmd = [sys.executable, "train.py", *map(str, common), "--run", "killed"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(tmp_path / "killed" / "ckpt" / "0000010.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert load_ckpt(tmp_path / "killed")["step"] < 20
    run_script("train.py", ["--out-dir", tmp_path, "--run", "killed", "--resume", "--data-path", fake_data])
    strip = lambda log: [(r["step"], r["loss"], r["grad_norm"], r["epoch"]) for r in log]  # noqa: E731
    assert strip(read_log(tmp_path / "killed")) == strip(read_log(tmp_path / "straight"))
    a, b = load_ckpt(tmp_path / "straight"), load_ckpt(tmp_path / "killed")
    assert a["step"] == b["step"] == 20
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    # killed before its first checkpoint (config.json and a log, no ckpt/): --resume trains it from step 0
    shutil.rmtree(tmp_path / "killed" / "ckpt")
    proc = run_script("train.py", ["--out-dir", tmp_path, "--run", "killed", "--resume", "--data-path", fake_data])
    assert "no checkpoint yet; training it from step 0" in proc.stdout
    assert strip(read_log(tmp_path / "killed")) == strip(read_log(tmp_path / "straight"))
    assert all(torch.equal(a["ema"][k], load_ckpt(tmp_path / "killed")["ema"][k]) for k in a["ema"])


def test_checkpoint_contents(fake_data, tmp_path):
    run_script("train.py", [*TINY, "--data-path", fake_data, "--out-dir", tmp_path, "--run", "c", "--max-steps", "4",
                            "--ckpt-every", "2", "--precision", "fp16"])
    names = sorted(os.listdir(tmp_path / "c" / "ckpt"))
    assert names == ["0000002.pt", "0000004.pt", "last.pt"]
    ck = load_ckpt(tmp_path / "c")  # weights_only=True must succeed
    assert ck["step"] == 4 and ck["config"]["precision"] == "fp16"
    assert ck["scaler"]["scale"] > 0  # fp16 uses a real GradScaler
    assert ck["model_config"]["num_classes"] == 10 and ck["model_config"]["in_channels"] == 1
    assert not any(k.startswith(("_orig_mod", "module")) for k in ck["model"])
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["model"] == "DiT-T/8" and "resume" not in config
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_log(tmp_path / "c"))


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_precision_runs(fake_data, tmp_path, precision):
    run_script("train.py", [*TINY, "--data-path", fake_data, "--out-dir", tmp_path, "--run", "p", "--max-steps", "3",
                            "--precision", precision])
    losses = [r["loss"] for r in read_log(tmp_path / "p")]
    assert len(losses) == 3 and all(0.3 < v < 3 for v in losses)


@pytest.mark.slow  # the default suite's time (README); run with -m slow
def test_ablation_flags_change_training(fake_data, tmp_path):
    """--cep-fixed, --corrupt-resample, --cep-type gaussian and --input-perturbation each change the
    trajectory of an otherwise identical run (they are wired in, not ignored)."""
    base = [*TINY, "--data-path", fake_data, "--out-dir", tmp_path, "--max-steps", "4", "--corrupt", "0.2"]
    variants = {"cep": ["--cep"], "fixed": ["--cep", "--cep-fixed"], "gauss": ["--cep", "--cep-type", "gaussian"],
                "resample": ["--corrupt-resample"], "ip": ["--input-perturbation", "0.1"], "plain": [],
                "big_gamma": ["--cep", "--cep-gamma", "5"]}
    finals = {}
    for name, extra in variants.items():
        run_script("train.py", [*base, *extra, "--run", name])
        finals[name] = load_ckpt(tmp_path / name)["model"]["y_embedder.embedding_table.weight"]
    names = list(finals)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.equal(finals[a], finals[b]), (a, b)


def test_ema_update_and_warmup():
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    update_ema(ema, model, 0.9)
    for e, b, p in zip(ema.parameters(), before, model.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * p, atol=1e-7)
    assert ema_decay_at(0, 0.9999, True) == pytest.approx(0.1)
    assert ema_decay_at(10 ** 7, 0.9999, True) == 0.9999 and ema_decay_at(0, 0.9999, False) == 0.9999


@pytest.fixture(scope="module")
def existing_run(fake_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    run_script("train.py", [*TINY, "--data-path", fake_data, "--out-dir", out, "--run", "demo", "--max-steps", "2"])
    bad = out / "broken"  # a run whose last.pt is damaged
    shutil.copytree(out / "demo", bad)
    data = (bad / "ckpt" / "last.pt").read_bytes()
    (bad / "ckpt" / "last.pt").write_bytes(data[: len(data) // 2])
    return out


@pytest.mark.parametrize("args", [
    ["--corrupt", "-0.1"], ["--corrupt", "1.0"], ["--cep-gamma", "-1", "--cep"], ["--model", "DiT-Q/3"],
    ["--data-path", "/nonexistent/fmnist"], ["--run", "demo", "--corrupt", "0.05"], ["--run", "demo"],
    ["--run", "broken", "--resume"], ["--run", "demo", "--resume", "--model", "DiT-S/8"],
    ["--run", "data", "--resume"], ["--cep-type", "gaussian"], ["--global-batch-size", "100000"],
])
def test_bad_input_one_line_nothing_written(existing_run, fake_data, args):
    full = ["--out-dir", existing_run, "--model", "DiT-T/8", "--global-batch-size", "16", "--max-steps", "4",
            "--log-every", "1"]
    if "--data-path" not in args:
        full += ["--data-path", fake_data]
    before = tree_snapshot(existing_run)
    proc = run_script("train.py", full + args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert tree_snapshot(existing_run) == before


def test_imagefolder_end_to_end(tmp_path):
    from PIL import Image
    import numpy as np
    rng = np.random.default_rng(0)
    for k, name in enumerate(["cats", "dogs"]):
        os.makedirs(tmp_path / "imgs" / name)
        for i in range(8):
            arr = rng.integers(0, 255, size=(40 + 10 * k, 48, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / name / f"{i}.png")
    run_script("train.py", ["--dataset", "imagefolder", "--data-path", tmp_path / "imgs", "--image-size", "16",
                            "--model", "DiT-T/8", "--global-batch-size", "8", "--max-steps", "3", "--num-workers", "1",
                            "--corrupt", "0.25", "--out-dir", tmp_path / "out", "--run", "if", "--log-every", "1"])
    manifest = json.loads((tmp_path / "out" / "data" / "imagefolder-imgs" / "corrupt_symmetric_eta0.25_seed0.json").read_text())
    assert manifest["num_corrupted"] == 4 and manifest["classes"] == ["cats", "dogs"]
    ck = load_ckpt(tmp_path / "out" / "if")
    assert ck["model_config"]["in_channels"] == 3 and ck["model_config"]["input_size"] == 16


def test_acceptance_two_ranks_real_fashion_mnist(tmp_path):
    if not os.path.isdir(FMNIST_DIR):
        if os.environ.get("CI"):
            pytest.fail(f"{FMNIST_DIR} missing in CI: .ci/run must apt-get install dataset-fashion-mnist")
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    run_script("train.py", ["--dataset", "fashion-mnist", "--corrupt", "0.025", "--cep", "--max-steps", "20",
                            "--out-dir", tmp_path, "--run", "demo"], nproc=2)
    assert (tmp_path / "demo" / "ckpt" / "last.pt").exists()
    log = read_log(tmp_path / "demo")
    assert log[-1]["step"] == 20
    manifest = json.loads((tmp_path / "data" / "fashion-mnist" / "corrupt_symmetric_eta0.025_seed0.json").read_text())
    assert manifest["num_corrupted"] == 1500


@pytest.mark.slow
def test_compile_matches_eager(fake_data, tmp_path):
    args = [*TINY, "--data-path", fake_data, "--out-dir", tmp_path, "--max-steps", "3", "--no-learn-sigma"]
    run_script("train.py", [*args, "--run", "eager"])
    run_script("train.py", [*args, "--run", "compiled", "--compile"])
    for a, b in zip(read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * a["loss"]


@pytest.mark.slow  # CI time (issue 31): the U-Net trains (pre-training for its adapters) and samples in tests/test_finetune.py too
@pytest.mark.parametrize("class_cond", ["crossattn", "add"])
def test_unet_trains_resumes_and_samples(fake_data, tmp_path, class_cond):
    """The latent-diffusion U-Net goes through the same loop: it learns (the zero-initialised output
    gives loss 1 at the start), resumes exactly, and sample.py rebuilds it from the checkpoint."""
    args = ["--data-path", fake_data, "--out-dir", tmp_path, "--model", "UNet-T", "--class-cond", class_cond,
            "--global-batch-size", "8", "--lr", "1e-3", "--log-every", "1", "--no-learn-sigma", "--cep"]
    run_script("train.py", [*args, "--run", "full", "--max-steps", "5"])
    run_script("train.py", [*args, "--run", "half", "--max-steps", "2"])
    run_script("train.py", ["--out-dir", tmp_path, "--run", "half", "--resume", "--max-steps", "5"])
    full, half = read_log(tmp_path / "full"), read_log(tmp_path / "half")
    assert [r["loss"] for r in full] == [r["loss"] for r in half]
    assert 0.9 < full[0]["loss"] < 1.1 and full[-1]["loss"] < full[0]["loss"]
    ck = load_ckpt(tmp_path / "full")
    assert ck["model_config"]["class_cond"] == class_cond and "y_embedder.embedding_table.weight" in ck["model"]
    run_script("sample.py", ["--run", tmp_path / "full", "--num-samples", "2", "--batch-size", "2", "--steps", "2", "--tag", "s"])
    assert np_load(tmp_path / "full" / "samples" / "s" / "samples.npz")["arr_0"].shape == (2, 32, 32, 1)


def np_load(path):
    import numpy as np
    return np.load(path)
