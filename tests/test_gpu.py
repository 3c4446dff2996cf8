"""The CUDA paths CI cannot run: NCCL DDP, bf16 autocast, torch.compile and fused AdamW, fp16's
GradScaler, a kill-and-resume and sampling on a GPU, and the DiT-XL/2 benchmark. About 5 minutes on
one GPU:

    python -m pytest -m gpu -q -s        # -s shows the benchmark's img/s and MFU

Collected and skipped without CUDA."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from tests.helpers import REPO, make_fake_fmnist, run_script, wait_for  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def read_log(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]


@pytest.fixture(scope="module")
def latent_images(tmp_path_factory):
    """An image folder of 256 files (2 classes) whose latents, 4 x 32 x 32 random ones, are in the
    layout corrupt_data.py --vae writes: train.py --vae reads them and never decodes an image."""
    root = tmp_path_factory.mktemp("latent")
    from PIL import Image
    for i in range(256):
        os.makedirs(root / "imgs" / f"c{i % 2}", exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / "imgs" / f"c{i % 2}" / f"{i:03d}.png")
    out = root / "out" / "data" / "imagefolder-imgs" / "latents-random-256"
    os.makedirs(out)
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((256, 1, 1, 4, 32, 32)).astype(np.float16) * 4  # class-free structure: x_0 = mean + ...
    np.save(out / "shard_00000.npy", np.concatenate([np.concatenate([mean, mean], 1),
                                                     np.full((256, 2, 1, 4, 32, 32), -8, np.float16)], 2))  # logvar -8
    (out / "index.json").write_text(json.dumps({"num_examples": 256, "shard_size": 256, "shards": ["shard_00000.npy"], "stats": 2,
                                                "shape": [4, 32, 32], "kind": "AutoencoderKL", "vae": "random", "scaling_factor": 0.18215,
                                                "image_size": 256, "source": str(root / "imgs")}))
    return root


def test_nccl_ddp_bf16_compile_fused_adamw(latent_images):
    run = latent_images / "out" / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "--", "train.py",
           "--dataset", "imagefolder", "--data-path", str(latent_images / "imgs"), "--image-size", "256", "--vae", "random",
           "--model", "DiT-S/2", "--global-batch-size", "64", "--max-steps", "60", "--lr", "3e-4", "--warmup-steps", "0",
           "--log-every", "10", "--precision", "bf16", "--compile", "--out-dir", str(latent_images / "out"), "--run-name", "ddp",
           "--device", "cuda"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 rank(s) on cuda, bf16" in proc.stdout
    log = read_log(run)
    losses = [r["loss"] for r in log]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert all(0 < r["mfu"] < 1 for r in log), [r.get("mfu") for r in log]
    ckpt = torch.load(run / "ckpt" / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 60 and all(torch.isfinite(v).all() for v in ckpt["ema"].values())


def test_fp16_gradscaler(tmp_path):
    make_fake_fmnist(tmp_path / "fm", n=256)
    run_script("train.py", ["--data-path", tmp_path / "fm", "--model", "DiT-T/4", "--global-batch-size", "64", "--max-steps", "40",
                            "--log-every", "10", "--precision", "fp16", "--out-dir", tmp_path, "--run", "r", "--device", "cuda"])
    log = read_log(tmp_path / "r")
    assert all(np.isfinite(r["loss"]) for r in log) and "fp16_skipped_steps" in log[-1]
    assert log[-1]["fp16_skipped_steps"] < 10  # a few overflow steps while the scale settles, not a stalled run


def test_kill_and_resume_on_cuda(tmp_path):
    make_fake_fmnist(tmp_path / "fm", n=256)
    common = ["--data-path", str(tmp_path / "fm"), "--model", "DiT-T/4", "--global-batch-size", "32", "--max-steps", "300",
              "--ckpt-every", "50", "--log-every", "10", "--precision", "fp32", "--out-dir", str(tmp_path), "--device", "cuda"]
    run_script("train.py", [*common, "--run", "straight"])
    proc = subprocess.Popen([sys.executable, "train.py", *common, "--run", "killed"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(tmp_path / "killed" / "ckpt" / "0000100.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    out = run_script("train.py", [*common, "--run", "killed", "--resume"])
    assert "resuming at step" in out.stdout
    a, b = read_log(tmp_path / "straight"), read_log(tmp_path / "killed")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    # cuBLAS / cuDNN kernels need not be bit-reproducible: the same run to float noise
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 0.05 * ra["loss"], (ra, rb)


def test_sampling_on_cuda_is_the_same_for_any_batch_size(tmp_path):
    make_fake_fmnist(tmp_path / "fm", n=256)
    run_script("train.py", ["--data-path", tmp_path / "fm", "--model", "DiT-T/4", "--global-batch-size", "64", "--max-steps", "100",
                            "--out-dir", tmp_path, "--run", "r", "--device", "cuda"])
    for bs in (8, 50):
        run_script("sample.py", ["--run", tmp_path / "r", "--num-samples", "100", "--steps", "20", "--cfg-scale", "2",
                                 "--batch-size", bs, "--tag", f"b{bs}", "--device", "cuda", "--precision", "bf16"])
    a = np.load(tmp_path / "r" / "samples" / "b8" / "samples.npz")["arr_0"].astype(int)
    b = np.load(tmp_path / "r" / "samples" / "b50" / "samples.npz")["arr_0"].astype(int)
    diff = np.abs(a - b)
    assert diff.mean() < 2 and np.mean(diff > 16) < 0.01, (diff.mean(), np.mean(diff > 16))  # bf16 rounding, not other images


def test_benchmark_dit_xl(capfd):
    proc = run_script("benchmark.py", ["--model", "DiT-XL/2", "--in-channels", "4", "--batch-size", "64", "--precision", "bf16",
                                       "--compile", "--iters", "10", "--mode", "both", "--device", "cuda"])
    print(f"{torch.cuda.get_device_name()}\n{proc.stdout}")
    assert "img/s" in proc.stdout and "MFU" in proc.stdout
