"""Shared test helpers: a tiny synthetic Fashion-MNIST in IDX format and script runners."""
import gzip
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def write_idx(path, array, magic_type=0x08):
    header = bytes([0, 0, magic_type, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fake_fmnist(directory, n=256, num_classes=10, seed=0):
    """Class k is a bright horizontal bar at rows 2k..2k+3 plus a little noise: easy to learn."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    images = rng.integers(0, 30, size=(n, 28, 28))
    for i, k in enumerate(labels):
        images[i, 2 * k + 2: 2 * k + 6, 4:24] = 220
    os.makedirs(directory, exist_ok=True)
    for split, count in (("train", n), ("t10k", n // 4)):
        write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte.gz"), images[:count])
        write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte.gz"), labels[:count])
    return labels


def run_script(script, args, nproc=1, check=True, timeout=600, env=None):
    """Run a stage script as a user would: `python script ...`, or torchrun with nproc ranks."""
    if nproc == 1:
        cmd = [sys.executable, script, *map(str, args)]
    else:  # `--` keeps torchrun's own parser away from our flags (it rejects --run as ambiguous)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "--", script, *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def tree_snapshot(root):
    """{relative path: sha1} of every file under root (to prove nothing was written)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha1(fh.read()).hexdigest()
    return out
