"""What lets a long run survive a cluster (train.py, finetune.py; docs/runs.md#faults):

- RunLock: one writer per run folder, a kernel lock on <run>/lock that dies with its process;
- StopRequests: SIGTERM / SIGINT / SIGUSR1 and --time-limit, agreed by every rank on one step;
- DivergenceCheck: a non-finite loss or gradient norm, tracked on the device without a host sync;
- unreadable image files, marked by the data loader and either refused or skipped (--skip-bad-files).

A preempted run writes ckpt/last.pt and <run>/status.json "stopped" (models/runs.py), which job
scripts requeue on (docs/runs.md#requeue), and exits with models.common.REQUEUE_EXIT (75) when it
is not under torchrun."""
import fcntl
import json
import os
import signal
import socket
import time

import torch
import torch.distributed as dist

from models.common import UsageError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Diverged(UsageError):
    """A non-finite loss or gradient norm: one line naming the step and the newest finite checkpoint."""


def flags_tensor(values):
    """Small integers to all-reduce on the default process group: on the host under gloo, on this
    rank's GPU under NCCL. (Not a separate gloo group: after a torchrun restart, a new group's
    rendezvous can find the dead attempt's addresses.)"""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return torch.tensor(values, dtype=torch.int64, device=device)


def agree(flag, world):
    """True on every rank if `flag` is true on any rank."""
    if world == 1 or not dist.is_initialized():  # one rank, or train.check_only's single process
        return bool(flag)
    t = flags_tensor([int(bool(flag))])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def summed(count, world):
    """An integer summed over the ranks."""
    if world == 1 or not dist.is_initialized():
        return count
    t = flags_tensor([count])
    dist.all_reduce(t)
    return int(t.item())


class RunLock:
    """An exclusive flock on <run>/lock, which holds the pid, host and start time of its owner for the
    message a second writer gets. The kernel drops the lock when the process dies (kill -9 included),
    so the lock of a dead process is simply taken over; only a live holder refuses."""

    def __init__(self, run_dir):
        self.path, self.fd = os.path.join(run_dir, "lock"), None

    def acquire(self, write=True):
        """Take the lock (write=False: only check that it is free; creates nothing if the run folder is absent)."""
        if not write and not os.path.exists(self.path):
            return self
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"{os.path.dirname(self.path)} is being written by {self.holder()}; wait for it to end, "
                             "or stop it (SIGTERM writes its last.pt) before starting another process on this run") from None
        if not write:
            os.close(fd)
            return self
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd
        return self

    def holder(self):
        try:
            with open(self.path) as f:
                info = json.load(f)
            return f"pid {info['pid']} on {info['host']} (since {info['since']})"
        except (OSError, ValueError, KeyError):
            return "another process"

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (another process may hold it next)
            self.fd = None


def lock_run(run_dir, rank, world, write):
    """One writer per run: rank 0 takes <run>/lock (write=False: checks that it is free), and every
    rank learns the outcome, so that all of them stop, with the one error line, if another process holds it."""
    lock, error = RunLock(run_dir), None
    if rank == 0:
        try:
            lock.acquire(write)
        except UsageError as e:
            error = e
    if agree(error is not None, world):
        raise error or UsageError(f"{run_dir} is being written by another process")
    return lock


class StopRequests:
    """Stop requests (a signal, --time-limit, an unreadable file) agreed by every rank on the same step.
    Each step, poll() starts an asynchronous all-reduce (max) of this rank's requests and reads the one
    it started the step before (under NCCL that read waits for the previous step only, which keeps the
    GPU's queue full): every rank reads the same reduced value at the same step, so every rank stops
    after the same step however late its signal."""

    BAD_FILE, SIGNAL, TIME = 4, 2, 1  # the flags poll() returns

    def __init__(self, world, time_limit_hours=None, refuse_bad_files=True):
        self.world, self.signal, self.bad_files, self.refuse_bad_files = world, None, [], refuse_bad_files
        self.deadline = time.monotonic() + 3600 * time_limit_hours if time_limit_hours else None
        self.pending, self.agreed_signal = None, 0
        self.previous = {}
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signal = signum  # only a flag: the step ends, then every rank agrees

    def local_requests(self):
        """(unreadable file, signal number, time limit passed) of this rank."""
        return [int(bool(self.bad_files and self.refuse_bad_files)), self.signal or 0,
                int(self.deadline is not None and time.monotonic() > self.deadline)]

    def poll(self, final=False):
        """The flags every rank agreed on after this step (0: go on). Call once per step on every rank;
        final (the last step): also wait for this step's own round, so that nothing goes unseen."""
        if self.world == 1:
            agreed = self.local_requests()
        else:
            agreed = self._wait()
            buf = flags_tensor(self.local_requests())
            self.pending = (dist.all_reduce(buf, op=dist.ReduceOp.MAX, async_op=True), buf)
            if final:
                agreed = [max(a, b) for a, b in zip(agreed, self._wait())]
        self.agreed_signal = agreed[1] or self.agreed_signal  # the signal a rank received (the largest number if several)
        return (self.BAD_FILE if agreed[0] else 0) | (self.SIGNAL if agreed[1] else 0) | (self.TIME if agreed[2] else 0)

    def _wait(self):
        if self.pending is None:
            return [0, 0, 0]
        work, buf = self.pending
        work.wait()
        self.pending = None
        return buf.tolist()

    def reason(self, flags):
        if flags & self.SIGNAL:
            return f"{signal.Signals(self.agreed_signal).name} received"
        return "--time-limit reached"

    def close(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class DivergenceCheck:
    """The first step whose loss (or, except under fp16, gradient norm) is not finite, kept on the
    device: a few element-wise ops a step, read at log steps and before every checkpoint. Under
    fp16 a non-finite gradient is GradScaler's overflow: that step is skipped (and counted), not a
    divergence."""

    NONE = -1

    def __init__(self, device, fp16):
        self.fp16 = fp16
        self.first_bad = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, step, loss, grad_norm):
        finite_grad = torch.isfinite(grad_norm)
        bad = ~torch.isfinite(loss) if self.fp16 else ~(torch.isfinite(loss) & finite_grad)
        self.first_bad = torch.where(bad & (self.first_bad == self.NONE), step, self.first_bad)
        if self.fp16:
            self.skipped += (~finite_grad).long()

    def stats(self):
        """(first bad step or NONE, fp16 steps skipped) as a float64 pair to all-reduce with the loss:
        (2^40 - step) so that a max over ranks finds the earliest bad step."""
        marker = torch.where(self.first_bad == self.NONE, 0, 2 ** 40 - self.first_bad)
        return torch.stack((marker, self.skipped)).double()

    @staticmethod
    def first_bad_step(reduced_marker):
        return None if reduced_marker == 0 else int(2 ** 40 - reduced_marker)


def reduced_divergence(check, world):
    """(earliest non-finite step over all ranks or None, fp16 skips summed over ranks)."""
    s = check.stats()
    if world > 1:
        marker, skipped = s.clone(), s[1:].clone()
        dist.all_reduce(marker, op=dist.ReduceOp.MAX)
        dist.all_reduce(skipped)
        s = torch.stack((marker[0], skipped[0]))
    return DivergenceCheck.first_bad_step(s[0].item()), int(s[1].item())


def weights_finite(*modules):
    """True if every parameter and buffer of the modules is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for m in modules for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


# ---- unreadable image files ---------------------------------------------------------------------

class BadImage(UsageError):
    """An image file that cannot be decoded (models.data.load_image): one line naming it."""


class MarkBad(torch.utils.data.Dataset):
    """A training dataset whose unreadable files come out as BadItem instead of an exception, so
    that a data-loader worker reports them to the training loop (collate_marking_bad)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        try:
            return self.dataset[key]
        except BadImage as e:
            return BadItem(key[0] if isinstance(key, (tuple, list)) else key, str(e))


class BadItem:
    """What a dataset's __getitem__ returns for an image it cannot decode (collated by collate_marking_bad)."""

    def __init__(self, index, message):
        self.index, self.message = index, message


def collate_marking_bad(items):
    """DataLoader collate: the batch with zeros in the rows of unreadable files, their indices, and
    [(row, message)] of those rows (masked out of the loss, or refused, by the training loop)."""
    from torch.utils.data import default_collate
    good = [it for it in items if not isinstance(it, BadItem)]
    bad = [(row, it.message) for row, it in enumerate(items) if isinstance(it, BadItem)]
    if not good:
        raise UsageError(f"every image of a batch is unreadable, e.g. {bad[0][1]}")
    if not bad:
        x, idx = default_collate(items)
        return x, idx, []
    filler = good[0][0]
    zeros = tuple(torch.zeros_like(v) for v in filler) if isinstance(filler, tuple) else torch.zeros_like(filler)
    rows = [(zeros, it.index) if isinstance(it, BadItem) else it for it in items]
    x, idx = default_collate(rows)
    return x, idx, bad


def kept_rows(bad, n, device):
    """The loss weights of a batch with unreadable rows: 0 there, 1 elsewhere (None: all rows kept)."""
    if not bad:
        return None
    keep = torch.ones(n, device=device)
    keep[[row for row, _ in bad]] = 0
    return keep


def skipped_list(run_dir):
    return os.path.join(run_dir, "skipped_files.txt")


def record_skipped(run_dir, bad):
    """--skip-bad-files: say which files were left out (every rank appends its own lines). Returns the count."""
    with open(skipped_list(run_dir), "a") as f:
        f.write("".join(message + "\n" for _, message in bad))
    for _, message in bad:
        print(f"--skip-bad-files: {message}; left out", flush=True)
    return len(bad)


def refuse_bad_files(messages, world):
    """Every rank stops at the agreed step with one error line (printed by rank 0) naming an
    unreadable file, whichever rank met it."""
    gathered = [messages]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, messages)
    found = [m for ms in gathered for m in ms]
    raise UsageError(found[0] + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")
                     + "; replace or remove it, or pass --skip-bad-files to leave unreadable files out")
