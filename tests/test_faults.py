"""The faults of a long run on a cluster, each shown with 2 gloo ranks on a tiny model (issue 29):
a worker killed under torchrun --max-restarts, preemption (SIGTERM to one rank), a NaN loss on one
rank, a truncated image, a full disk while a checkpoint is written, and a second process on a live run."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from tests.helpers import REPO, STEPS, TINY, assert_same_run, load_last as load, run_script, wait_for, worker_pids  # noqa: E402
from models.common import REQUEUE_EXIT, UsageError  # noqa: E402
from models import runs  # noqa: E402

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # CI time, ~25 s: CI resumes through the one_node.sh job test (tests/test_operator.py)
def test_worker_killed_under_max_restarts_ends_identical(fake_fmnist, straight, tmp_path):
    cmd = [*TORCHRUN, "--max-restarts=1", "--", "train.py", *TINY, *STEPS, "--data-path", str(fake_fmnist),
           "--out-dir", str(tmp_path), "--run-name", "r", "--resume"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(tmp_path / "r" / "ckpt" / "0000006.pt", proc)
    os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)  # rank 1 dies; torchrun restarts the group with the same command
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "resuming at step" in out, "the kill came too late to test a restart"
    assert_same_run(straight, tmp_path / "r")


@pytest.mark.slow  # CI time: the one_node.sh job test (CI) signals the same launcher and checks the same identity
def test_launcher_sigterm_then_the_same_command_ends_identical(fake_fmnist, straight, tmp_path):
    """The documented requeue: `python train.py --nproc-per-node 2 --resume ...` is stopped by a
    signal (here heard by rank 1 only: every rank stops at one step), exits 75 with status.json
    "stopped", and the same command again continues to the uninterrupted run's end."""
    command = [sys.executable, "train.py", "--nproc-per-node", "2", "--resume", *TINY, *STEPS, "--data-path", str(fake_fmnist),
               "--out-dir", str(tmp_path), "--run-name", "r"]
    proc = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(tmp_path / "r" / "ckpt" / "0000006.pt", proc)
    launcher_children = runs.child_pids(proc.pid)
    os.kill(worker_pids(launcher_children[0])[1], signal.SIGTERM)  # only rank 1 hears it
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == REQUEUE_EXIT, out[-3000:]
    ckpt = load(tmp_path / "r")
    assert ckpt["stopped"] == "SIGTERM received" and 6 <= ckpt["step"] < 30, ckpt["step"]
    assert f"stopped after step {ckpt['step']}" in out
    status = runs.read_status(tmp_path / "r")
    assert (status["state"], status["step"], status["reason"]) == ("stopped", ckpt["step"], "SIGTERM received")
    log = [json.loads(line) for line in open(tmp_path / "r" / "log.jsonl")]
    assert log[-1]["step"] <= ckpt["step"] < log[-1]["step"] + 3  # the log interval goes on after the resume
    rerun = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming at step {ckpt['step']}" in rerun.stdout
    assert runs.read_status(tmp_path / "r")["state"] == "finished"
    assert_same_run(straight, tmp_path / "r")


def test_time_limit_stops_with_requeue_code(fake_fmnist, tmp_path):
    proc = run_script("train.py", [*TINY, "--max-steps", "100000", "--data-path", fake_fmnist, "--out-dir", tmp_path,
                                   "--run", "r", "--time-limit", "0.0003"], check=False)
    assert proc.returncode == REQUEUE_EXIT, proc.stderr[-2000:]
    ckpt = load(tmp_path / "r")
    assert ckpt["stopped"] == "--time-limit reached" and 0 < ckpt["step"] < 100000
    status = runs.read_status(tmp_path / "r")
    assert (status["state"], status["step"], status["reason"]) == ("stopped", ckpt["step"], "--time-limit reached")


def failing_two_ranks(fault, at, on_rank, args):
    """train.py on 2 ranks with a fault injected (tests/fault_injection.py): it must fail; its error lines."""
    cmd = [*TORCHRUN, "--", "tests/fault_injection.py", fault, str(at), str(on_rank), "train.py", *TINY, *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")], proc.stderr[-3000:]


def test_nan_on_one_rank_stops_every_rank_without_writing_it(fake_fmnist, tmp_path):
    errors, stderr = failing_two_ranks("nan", 8, 1, ["--max-steps", "30", "--ckpt-every", "4", "--log-every", "5",
                                                     "--data-path", fake_fmnist, "--out-dir", tmp_path, "--run-name", "r"])
    assert len(errors) == 1 and "non-finite loss or gradient norm at step 8" in errors[0], stderr
    assert "ckpt/last.pt (step 4)" in errors[0], errors[0]  # caught at the step-8 checkpoint, before writing it
    names = sorted(os.listdir(tmp_path / "r" / "ckpt"))
    assert names == ["0000004.pt", "last.pt"], names
    status = runs.read_status(tmp_path / "r")
    assert (status["state"], status["step"], "error: " + status["error"]) == ("diverged", 8, errors[0])
    for name in names:
        ck = load(tmp_path / "r", name)
        assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in ck[part].values())


def test_nan_seen_at_a_log_step(fake_fmnist, tmp_path):
    cmd = [sys.executable, "tests/fault_injection.py", "nan", "3", "0", "train.py", *TINY, "--max-steps", "30",
           "--ckpt-every", "20", "--log-every", "5", "--data-path", str(fake_fmnist), "--out-dir", str(tmp_path), "--run", "r"]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: non-finite loss or gradient norm at step 3; no checkpoint was written yet (every checkpoint on disk is "
        "finite); lower --lr, or train in fp32"], proc.stderr
    assert not os.path.exists(tmp_path / "r" / "ckpt")
    assert runs.read_status(tmp_path / "r")["state"] == "diverged"


@pytest.fixture
def images_with_a_truncated_png(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for k, name in enumerate(["cats", "dogs"]):
        os.makedirs(tmp_path / "imgs" / name)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8)).save(tmp_path / "imgs" / name / f"{i}.png")
    bad = tmp_path / "imgs" / "dogs" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])  # the header survives, the pixel data do not
    return tmp_path / "imgs", bad


@pytest.mark.parametrize("skip", [pytest.param(False, marks=pytest.mark.slow), True])  # CI time: one case in CI
def test_truncated_png(images_with_a_truncated_png, tmp_path, skip):
    folder, bad = images_with_a_truncated_png
    args = ["--dataset", "imagefolder", "--data-path", folder, "--image-size", "16", "--model", "DiT-T/8",
            "--global-batch-size", "8", "--max-steps", "4", "--num-workers", "1", "--log-every", "1",
            "--out-dir", tmp_path / "out", "--run", "r"] + (["--skip-bad-files"] if skip else [])
    proc = run_script("train.py", args, nproc=2, check=False)
    if not skip:
        assert proc.returncode != 0
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"{bad}: unreadable image" in errors[0] and "--skip-bad-files" in errors[0], proc.stderr[-3000:]
        assert not os.path.exists(tmp_path / "out" / "r" / "ckpt")
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in open(tmp_path / "out" / "r" / "log.jsonl")]
    assert log[-1]["step"] == 4 and log[-1]["skipped_files"] == 2  # 4 steps of 8 = 2 epochs of 16 images: met twice
    listed = (tmp_path / "out" / "r" / "skipped_files.txt").read_text().splitlines()
    assert len(listed) == 2 and all(line.startswith(f"{bad}: unreadable image") for line in listed)
    assert "2 unreadable file(s) skipped" in proc.stdout


def test_full_disk_keeps_the_previous_checkpoint(fake_fmnist, tmp_path):
    # checkpoints at steps 2 and 4 (numbered + last.pt each): the 3rd write is the step-4 numbered one
    errors, stderr = failing_two_ranks("enospc", 3, 0, ["--max-steps", "6", "--ckpt-every", "2", "--log-every", "1",
                                                        "--data-path", fake_fmnist, "--out-dir", tmp_path, "--run-name", "r"])
    last = tmp_path / "r" / "ckpt" / "last.pt"
    assert len(errors) == 1 and "No space left on device" in errors[0] and f"the previous {last} (step 2) is intact" in errors[0], stderr
    assert load(tmp_path / "r")["step"] == 2
    status = runs.read_status(tmp_path / "r")
    assert (status["state"], status["step"], "error: " + status["error"]) == ("failed", 4, errors[0])
    assert sorted(os.listdir(tmp_path / "r" / "ckpt")) == ["0000002.pt", "last.pt"]  # no temporary file left behind


def test_full_disk_message_without_a_previous_checkpoint(tmp_path, monkeypatch):
    def disk_full(path, obj):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(runs, "atomic_torch_save", disk_full)
    with pytest.raises(UsageError, match="no earlier last.pt was written"):
        runs.save_checkpoint(str(tmp_path), {"step": 2}, numbered=False)


def test_second_process_on_a_live_run_is_refused(fake_fmnist, tmp_path):
    args = [*TINY, "--max-steps", "100000", "--ckpt-every", "5", "--data-path", str(fake_fmnist), "--out-dir", str(tmp_path), "--run", "r"]
    first = subprocess.Popen([sys.executable, "train.py", "--nproc-per-node", "2", *args], cwd=REPO, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(tmp_path / "r" / "ckpt" / "0000005.pt", first)
        second = run_script("train.py", [*args, "--resume"], check=False)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        holder = json.loads((tmp_path / "r" / "lock").read_text())
        assert len(lines) == 1 and f"is being written by pid {holder['pid']} on {holder['host']}" in lines[0], lines
    finally:  # kill -9 the launcher, torchrun and the ranks (each in its own session): the lock's holder is dead
        for torchrun in runs.child_pids(first.pid):
            for pid in [*worker_pids(torchrun).values(), torchrun]:
                os.kill(pid, signal.SIGKILL)
        first.kill()
        first.communicate()
    # the lock of a dead process is taken over
    step = load(tmp_path / "r")["step"]
    taken = run_script("train.py", [*args, "--resume", "--max-steps", str(step + 1)])
    assert f"resuming at step {step}" in taken.stdout and load(tmp_path / "r")["step"] == step + 1
    assert json.loads((tmp_path / "r" / "lock").read_text())["pid"] != holder["pid"]
