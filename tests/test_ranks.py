"""Per-rank randomness: after the model is built, each rank's global RNG (dropout, e.g. BERT's on
CC3M) is seeded from (seed, rank); checkpoints keep every rank's RNG state and a resume restores
each rank's own, so a killed 2-rank run resumes bit-identically."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.common import restore_rng, seed_rank  # noqa: E402
from tests.helpers import REPO, make_fake_fmnist, make_tiny_bert, run_script  # noqa: E402


def test_rank_seeds_give_different_dropout_masks():
    """What each rank's dropout sees after train.py's seeding: the same weights on every rank
    (torch.manual_seed(seed) before the build), then a different mask on every rank, and the same
    mask again for the same (seed, rank)."""
    def masks(seed, rank):
        torch.manual_seed(seed)
        weights = torch.nn.Linear(8, 8).weight.detach().clone()  # the build
        seed_rank(seed, rank)
        return weights, torch.nn.functional.dropout(torch.ones(4096), 0.1, training=True) == 0
    (w0, m0), (w1, m1), (w0b, m0b) = masks(3, 0), masks(3, 1), masks(3, 0)
    assert torch.equal(w0, w1) and torch.equal(w0, w0b) and torch.equal(m0, m0b)
    assert 250 < m0.sum() < 570 and 250 < m1.sum() < 570  # ≈ 410 ± 19 dropped: dropout works
    assert (m0 != m1).sum() > 500, "ranks share their dropout masks"  # independent: ≈ 740 disagree


@pytest.fixture(scope="module")
def bert_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bert")
    make_fake_fmnist(root / "data", n=64)
    make_tiny_bert(root / "bert")
    return root


def kill_all(proc, marker):
    """SIGKILL torchrun and its workers (which torchrun starts in sessions of their own): every
    process whose command line names this run, then wait until none is left."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    for _ in range(200):
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read().replace(b"\0", b" ") and int(pid) != os.getpid():
                        os.kill(int(pid), signal.SIGKILL)
                        alive.append(pid)
            except (OSError, ProcessLookupError):
                pass
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError("workers survived SIGKILL")


def load_ckpt(run_dir):
    return torch.load(Path(run_dir) / "ckpt" / "last.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow  # the default suite's time (README); run with -m slow
def test_two_ranks_bert_dropout_kill_and_resume_is_bit_identical(bert_data, tmp_path):
    common = ["--dataset", "fashion-mnist-captions", "--data-path", bert_data / "data", "--text-encoder",
              f"bert:{bert_data / 'bert'}", "--model", "DiT-T/8", "--caption-length", "12", "--global-batch-size", "8",
              "--lr", "1e-3", "--max-steps", "12", "--ckpt-every", "4", "--log-every", "1", "--out-dir", tmp_path]
    run_script("train.py", [*common, "--run-name", "straight"], nproc=2)
    straight = load_ckpt(tmp_path / "straight")
    states = straight["rng"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"]), "ranks share their RNG"

    # the same run on 2 ranks, SIGKILLed (torchrun and its workers) after a checkpoint, then resumed
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--", "train.py",
           *map(str, common), "--run-name", "killed"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "ckpt" / "0000008.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_all(proc, str(tmp_path))
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert load_ckpt(tmp_path / "killed")["step"] < 12
    run_script("train.py", ["--out-dir", tmp_path, "--run-name", "killed", "--resume"], nproc=2)
    resumed = load_ckpt(tmp_path / "killed")
    assert resumed["step"] == 12
    for part in ("model", "ema"):
        for k in straight[part]:
            assert torch.equal(straight[part][k], resumed[part][k]), (part, k)
    for a, b in zip(straight["rng"], resumed["rng"]):
        assert torch.equal(a["torch"], b["torch"])
    logs = [[json.loads(line) for line in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in ("straight", "killed")]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in logs[0]] == [(r["step"], r["loss"], r["grad_norm"]) for r in logs[1]]
    # BERT's dropout is live in this run: the text encoder's weights moved
    assert any(k.startswith("text_encoder.") for k in straight["model"])


def test_restore_rng_own_state_or_reseed():
    """A checkpoint of 2 ranks restores each rank's own state; the older single-state format
    restores on 1 rank; another world size reseeds from (seed, rank, step)."""
    cpu = torch.device("cpu")
    states = []
    for rank in range(2):
        seed_rank(0, rank)
        states.append({"torch": torch.get_rng_state()})
    for rank in range(2):
        assert restore_rng(states, rank, 2, 0, 5, cpu) and torch.equal(torch.get_rng_state(), states[rank]["torch"])
    assert restore_rng(states[1], 0, 1, 0, 5, cpu) and torch.equal(torch.get_rng_state(), states[1]["torch"])
    assert not restore_rng(states, 3, 4, 0, 5, cpu)
    reseeded = torch.get_rng_state()
    seed_rank(0, 3, 5)
    assert torch.equal(reseeded, torch.get_rng_state())
