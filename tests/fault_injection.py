"""Run a stage script with one fault injected, for tests/test_faults.py (never used by the stages):

    python tests/fault_injection.py nan N RANK train.py ...     # rank RANK's N-th loss is NaN
    python tests/fault_injection.py enospc N 0 train.py ...     # the N-th checkpoint file write fills the disk
    python tests/fault_injection.py stall N 0 train.py ...      # the N-th checkpoint file write hangs half written
                                                                # (after creating $STALL_MARKER), to be killed

Works under torchrun too: each rank runs this wrapper, which patches the stage's modules, then runs
the script as __main__."""
import errno
import os
import runpy
import sys

kind, at, on_rank, script = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
sys.argv = [script, *sys.argv[5:]]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
calls = [0]

if kind == "nan":
    from models.diffusion import GaussianDiffusion
    losses = GaussianDiffusion.training_losses

    def nan_once(self, *args, **kwargs):
        out = losses(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == at and os.environ.get("RANK", "0") == on_rank:
            out["loss"] = out["loss"] * float("nan")
        return out
    GaussianDiffusion.training_losses = nan_once
elif kind == "enospc":
    import models.runs
    from models.common import _atomic_write
    save = models.runs.atomic_torch_save

    def disk_full(f):
        f.write(b"\0" * 4096)  # part of the file reaches the disk, then it is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def save_until_full(path, obj):
        calls[0] += 1
        return _atomic_write(path, disk_full) if calls[0] == at else save(path, obj)
    models.runs.atomic_torch_save = save_until_full
elif kind == "stall":
    import time
    import models.runs
    from models.common import _atomic_write
    save = models.runs.atomic_torch_save

    def half_then_hang(f):
        f.write(b"\0" * 4096)  # part of the temporary file is written ...
        f.flush()
        open(os.environ["STALL_MARKER"], "w").close()
        time.sleep(3600)  # ... and the process hangs there until it is killed

    def save_then_stall(path, obj):
        calls[0] += 1
        return _atomic_write(path, half_then_hang) if calls[0] == at else save(path, obj)
    models.runs.atomic_torch_save = save_then_stall
else:
    raise SystemExit(f"unknown fault {kind}")
runpy.run_path(script, run_name="__main__")
