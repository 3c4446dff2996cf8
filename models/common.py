"""Small helpers shared by the stage scripts: atomic writes, the one-line error convention, the
torchrun process group and the GPU's measured matmul rate."""
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr and exit status 2, nothing written."""


def run_main(main):
    """Call main(); turn a UsageError into one 'error: ...' line (printed once, by rank 0) and exit 2."""
    try:
        main()
    except UsageError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _atomic_write(path, write_fn):
    """Write to a temp file in the same directory, fsync, then rename over `path`: a reader (or a
    crash) sees either the old file or the complete new one, never a partial write."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path, text):
    _atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def atomic_torch_save(path, obj):
    _atomic_write(path, lambda f: torch.save(obj, f))


def derived_seed(*keys):
    """A well-mixed 64-bit seed from integers (e.g. seed, step). Torch's CPU generator keeps only
    the low 32 bits of a seed, so `(seed << 32) + step` would silently ignore the seed there."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])


def setup_distributed(device_flag):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; plain `python train.py` is one rank."""
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    if device_flag not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {device_flag}")
    if use_cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda but no GPU is visible")
    rank, world, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return rank, world, device


def measure_matmul_tflops(device, dtype=torch.bfloat16, n=8192, iters=20):
    """Dense matmul rate of this GPU (the denominator of MFU), measured rather than looked up."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12
