"""Small helpers shared by the stage scripts: atomic writes and the one-line error convention."""
import json
import os
import sys
import tempfile

import numpy as np
import torch


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
