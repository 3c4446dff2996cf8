"""A run's folder: finding it, resuming it (from its newest intact checkpoint), its log and its
checkpoints (train.py, finetune.py); starting the ranks (--nproc-per-node); checking that an
output folder can be written (every stage)."""
import glob
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from models import faults
from models.common import LAUNCHED, REQUEUE_EXIT, NothingToDo, UsageError, atomic_torch_save, atomic_write_json, rng_states

CKPT_KEYS = {"model", "ema", "opt", "step"}
STATES = ("running", "stopped", "finished", "diverged", "failed")  # status.json's "state"


def write_status(run_dir, state, step, **detail):
    """<run>/status.json, written atomically by rank 0 at each change of the run's state: what a job
    script reads to decide whether to requeue, whatever exit status torchrun or srun reports
    (docs/runs.md#requeue). "stopped" carries the reason, "diverged" and "failed" the error line."""
    assert state in STATES, state
    atomic_write_json(os.path.join(run_dir, "status.json"), {"state": state, "step": step, **detail, "time": time.time(),
                                                             "host": socket.gethostname(), "pid": os.getpid()})


def write_failure(run_dir, step, error):
    """status.json "diverged" or "failed", with the exception's first line."""
    line = (str(error).splitlines() or [""])[0]
    write_status(run_dir, "diverged" if isinstance(error, faults.Diverged) else "failed", step,
                 error=line if isinstance(error, UsageError) else f"{type(error).__name__}: {line}")


def read_status(run_dir):
    """The run's status.json, or None if it has none (yet) or it cannot be read."""
    try:
        with open(os.path.join(run_dir, "status.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def launch_ranks(nproc, check):
    """`python <script> --nproc-per-node N ...`: call check() (every input check, writing nothing;
    returns the run folder) in this process, so that bad input is one error line and exit status 2
    (under torchrun it would be wrapped in torchrun's failure report, exit 1), then run torchrun
    starting N ranks of the same script with the same flags (less --nproc-per-node and its argparse
    abbreviations), and exit with its status. SIGTERM / SIGINT / SIGUSR1 sent to this launcher go to
    the ranks (not to torchrun, which would kill them 30 s later): they write last.pt and status.json
    "stopped" and exit 0, and the launcher exits REQUEUE_EXIT."""
    run_dir = check()
    argv, skip = [], False
    for arg in sys.argv[1:]:
        name = arg.split("=")[0]
        if skip or (len(name) > 3 and "--nproc-per-node".startswith(name)):
            skip = not skip and "=" not in arg
            continue
        argv.append(arg)
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), **os.environ, LAUNCHED: "1"}  # torchrun's default is 1
    sys.stdout.flush()
    started = time.time()
    # its own session: a terminal's Ctrl-C reaches this launcher only, which passes it on once
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                             "--", sys.argv[0], *argv], env=env, start_new_session=True)

    def forward(signum, frame):
        for pid in child_pids(proc.pid) or [proc.pid]:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, forward)
    rc = proc.wait()
    status = read_status(run_dir)  # the ranks exit 0 on a stop: status.json says which it was
    if rc == 0 and status is not None and status["state"] == "stopped" and status["time"] >= started:
        rc = REQUEUE_EXIT
    sys.exit(rc)


def child_pids(parent):
    """The pids whose parent is `parent` (Linux /proc): torchrun's ranks."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                pids.append(int(entry))
    return pids


def check_writable(folder, flag):
    """Raise a one-line UsageError unless files can be created in `folder` (or, if it does not exist
    yet, in its nearest existing parent). Probes with a temporary file: leaves nothing behind."""
    parent = os.path.abspath(folder)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {folder}: {parent} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".probe-"):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {folder} is not writable ({e.strerror or type(e).__name__})")


def read_checkpoint(path):
    """A train.py checkpoint, or None if it is unreadable (truncated, foreign pickle, wrong content)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001
        return None
    return ckpt if isinstance(ckpt, dict) and CKPT_KEYS <= ckpt.keys() else None


def numbered_checkpoints(run_dir):
    """ckpt/<step>.pt of a run, newest first."""
    paths = glob.glob(os.path.join(run_dir, "ckpt", "[0-9]*.pt"))
    return sorted((p for p in paths if os.path.basename(p)[:-3].isdigit()), key=lambda p: int(os.path.basename(p)[:-3]), reverse=True)


def newest_checkpoint(run_dir):
    """'the newest checkpoint is <path> (step N)', for messages."""
    for path in [os.path.join(run_dir, "ckpt", "last.pt")] + numbered_checkpoints(run_dir):
        ckpt = read_checkpoint(path)
        if ckpt is not None:
            return f"the newest checkpoint is {path} (step {ckpt['step']})"
    return "no checkpoint was written yet"


def save_checkpoint(run_dir, state, numbered):
    """ckpt/last.pt (and ckpt/<step>.pt every --ckpt-every steps), each written atomically: a failed
    write (a full disk) leaves the previous file whole, and the UsageError says so."""
    paths = ([os.path.join(run_dir, "ckpt", f"{state['step']:07d}.pt")] if numbered else []) + [os.path.join(run_dir, "ckpt", "last.pt")]
    for path in paths:
        try:
            atomic_torch_save(path, state)
        except OSError as e:
            last = os.path.join(run_dir, "ckpt", "last.pt")
            previous = read_checkpoint(last)
            kept = f"the previous {last} (step {previous['step']}) is intact" if previous is not None else "no earlier last.pt was written"
            raise UsageError(f"writing the step-{state['step']} checkpoint {path} failed ({e.strerror or e}); {kept}") from None


def log(log_path, record, eta_s):
    """One log.jsonl line, and its summary on the console (with the ETA)."""
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    tqdm.write(f"step {record['step']:7d} | loss {record['loss']:.4f} | grad {record['grad_norm']:.3f} | {record['img_per_s']:8.1f} img/s"
               + (f" | MFU {record['mfu']:.1%}" if "mfu" in record else "")
               + (f" (matmul {record['mfu_matmul']:.1%})" if "mfu_matmul" in record else "") + f" | ETA {eta_s // 60:.0f}m{eta_s % 60:02.0f}s")
    sys.stdout.flush()


def log_step(args, run_dir, record, loss_acc, diverged, skipped_files, clock, world):
    """At a log step: the mean loss since the last one (over ranks), the divergence check (a non-
    finite loss or gradient norm on any rank stops every rank) and one log.jsonl line (rank 0)."""
    total = loss_acc.clone()
    if world > 1:
        dist.all_reduce(total)  # sum over ranks of (sum of local mean losses, count)
    first_bad, fp16_skips = faults.reduced_divergence(diverged, world)
    clock["skipped_files"] = faults.summed(skipped_files, world)
    if first_bad is not None:
        raise faults.Diverged(f"non-finite loss or gradient norm at step {first_bad}; " + newest_checkpoint(run_dir)
                              + " (every checkpoint on disk is finite); lower --lr, or train in fp32")
    now = time.perf_counter()
    record.update(loss=(total[0] / total[1]).item(), img_per_s=round(args.global_batch_size * clock["steps"] / (now - clock["last"]), 2),
                  time=round(time.time(), 1))
    for key, peak in (("mfu", clock["peak_tflops"]), ("mfu_matmul", clock["matmul_tflops"])):  # datasheet; measured matmul
        if peak:
            record[key] = round(clock["flops_per_image"] * record["img_per_s"] / world / (peak * 1e12), 4)
    if args.precision == "fp16":
        record["fp16_skipped_steps"] = fp16_skips  # GradScaler's overflow steps: normal, counted
    if clock["skipped_files"]:
        record["skipped_files"] = clock["skipped_files"]  # over every rank, since the start of this process
    if not dist.is_initialized() or dist.get_rank() == 0:
        eta = (now - clock["start"]) / (record["step"] - clock["start_step"]) * (args.max_steps - record["step"])
        log(os.path.join(run_dir, "log.jsonl"), record, eta)
    loss_acc.zero_()
    clock.update(last=time.perf_counter(), steps=0)


def checkpoint_step(args, run_dir, done, stopped, model, ema, opt, scaler, loss_acc, diverged, run_state, rank, world, device):
    """ckpt/last.pt (and ckpt/<step>.pt every --ckpt-every steps), after checking that nothing in it is
    non-finite; a failed write (a full disk) stops every rank, the previous last.pt intact. run_state():
    what rebuilds the run (config, model_config, diffusion, a finetune stage's extras)."""
    acc = loss_acc.clone()
    if world > 1:
        dist.all_reduce(acc)  # so a resume mid-interval logs the same mean
    first_bad, _ = faults.reduced_divergence(diverged, world)
    if first_bad is not None or not faults.weights_finite(model, ema):
        what = f"loss or gradient norm at step {first_bad}" if first_bad is not None else f"weights at step {done}"
        raise faults.Diverged(f"non-finite {what}; not writing them: {newest_checkpoint(run_dir)} (every checkpoint on disk is finite)")
    rng = rng_states(device, world)  # every rank's, so a resume restores each rank's own
    error = None
    if rank == 0:
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "scaler": scaler.state_dict(),
                 "step": done, "rng": rng, "loss_acc": acc.cpu(), **run_state(), **({"stopped": stopped} if stopped else {})}
        try:
            save_checkpoint(run_dir, state, numbered=done % args.ckpt_every == 0)
        except UsageError as e:
            error = e
    if faults.agree(error is not None, world):
        raise error or UsageError("rank 0 could not write the checkpoint")


def resolve_run(args, parser, non_run_flags, legacy_defaults, default_name):
    """The run directory and the checkpoint to continue from (or None). --resume continues
    <out-dir>/<run> from its newest intact checkpoint (ckpt/last.pt, else the newest readable
    ckpt/<step>.pt), or starts the run if there is none yet, so the same command can be repeated
    (torchrun --max-restarts, requeued jobs); --resume-from CKPT continues from that checkpoint.
    Either way flags not given on the command line come from the run's config.json and flags given
    must agree with it (except non_run_flags). Checks only: writes nothing."""
    if args.resume_from:
        path = os.path.abspath(args.resume_from)
        if not os.path.isfile(path):
            raise UsageError(f"--resume-from {args.resume_from} does not exist")
        if os.path.basename(os.path.dirname(path)) != "ckpt":
            raise UsageError(f"--resume-from {args.resume_from} is not in a run's ckpt/ folder")
        run_dir = os.path.dirname(os.path.dirname(path))
        if args.run is not None and os.path.abspath(os.path.join(args.out_dir, args.run)) != run_dir:
            raise UsageError(f"--resume-from {args.resume_from} belongs to {run_dir}, not to --run {args.run}")
        args.out_dir, args.run, args.resume = os.path.dirname(run_dir), os.path.basename(run_dir), True
    if args.run is None:
        args.run = default_name(args)
    run_dir = os.path.join(args.out_dir, args.run)
    config_path = os.path.join(run_dir, "config.json")
    if not args.resume:
        if os.path.exists(config_path):
            finished_same_run(run_dir, args, non_run_flags, legacy_defaults)
            raise UsageError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another --run-name / --out-dir")
        if holds_other_files(run_dir):
            raise UsageError(f"{run_dir} exists and is not a run of train.py; choose another --run-name / --out-dir")
        return run_dir, None
    if not os.path.exists(config_path):  # --resume is safe to repeat: the first time, it starts the run
        if args.resume_from:
            raise UsageError(f"--resume-from: {run_dir} holds no run (no config.json)")
        if holds_other_files(run_dir):
            raise UsageError(f"--resume: {run_dir} exists and is not a run of train.py (no config.json)")
        say(f"--resume: {run_dir} holds no run yet; starting it")
        return run_dir, None
    try:
        saved = saved_config(run_dir, legacy_defaults)
    except (OSError, ValueError) as e:
        raise UsageError(f"--resume: cannot read {config_path}: {e}")
    parser.set_defaults(**saved)
    fresh = vars(parser.parse_args())  # the saved config, overridden by the flags given now
    conflicts = [k for k, v in saved.items() if k not in non_run_flags and fresh.get(k) != v]
    if conflicts:
        raise UsageError(f"--resume: {run_dir} was trained with other settings: "
                         + ", ".join(f"--{k.replace('_', '-')}={saved[k]} (now {fresh[k]})" for k in conflicts))
    # only the run's own flags come back: a flag the config does not hold (--dry-run, --nproc-per-node,
    # a caller's value) keeps the value it has, whatever the parser's default
    vars(args).update({k: fresh[k] for k in saved}, resume=True)
    if args.resume_from:
        ckpt = read_checkpoint(os.path.abspath(args.resume_from))
        if ckpt is None:
            raise UsageError(f"--resume-from: {args.resume_from} is not a readable checkpoint")
        return run_dir, ckpt
    last, numbered = os.path.join(run_dir, "ckpt", "last.pt"), numbered_checkpoints(run_dir)
    for path in [last] * os.path.exists(last) + numbered:  # the newest intact one
        ckpt = read_checkpoint(path)
        if ckpt is not None:
            if path != last:
                say(f"--resume: {last} is " + ("unreadable" if os.path.exists(last) else "missing") + f"; continuing from {path}")
            return run_dir, ckpt
    if os.path.exists(last) or numbered:
        raise UsageError(f"--resume: no checkpoint of {run_dir} is readable ({len(numbered) + os.path.exists(last)} damaged file(s) in ckpt/); "
                         "move them aside to train it again from step 0")
    say(f"--resume: {run_dir} has no checkpoint yet; training it from step 0")  # stopped before its first: nothing to lose
    return run_dir, None


def say(message):
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


def holds_other_files(run_dir):
    """A folder that holds files, other than the lock a run's first process leaves."""
    return os.path.isdir(run_dir) and any(name != "lock" for name in os.listdir(run_dir))


def saved_config(run_dir, legacy_defaults):
    """A run's config.json, with the defaults of flags it predates (legacy_defaults(config) adds them)."""
    with open(os.path.join(run_dir, "config.json")) as f:
        return legacy_defaults(json.load(f))


def finished_same_run(run_dir, args, non_run_flags, legacy_defaults):
    """Rerunning the command of a finished run (the same settings, last.pt at or past --max-steps) is
    not an error: say so, with the next commands, and exit 0, so that `torchrun train.py ...` run
    twice ends quietly. Returns if the run differs or is unfinished. A flag left at None (chosen at
    run time, e.g. --precision) matches the value the run recorded."""
    try:
        saved = saved_config(run_dir, legacy_defaults)
    except (OSError, ValueError):
        return
    asked = vars(args)
    if any(asked[k] is not None and asked[k] != v for k, v in saved.items() if k in asked and k not in non_run_flags):
        return
    ckpt = read_checkpoint(os.path.join(run_dir, "ckpt", "last.pt"))
    if ckpt is not None and ckpt["step"] >= args.max_steps:
        raise NothingToDo(f"done already: {run_dir} holds this run, trained to step {ckpt['step']}; nothing to do (another "
                          f"run of these settings needs another --run-name or --out-dir)\nnext:\n{next_commands(args, run_dir)}")


def next_commands(args, run_dir):
    """The sample and evaluate commands for this run, printed when training ends."""
    run, tag = shlex.quote(run_dir), "quick"
    if getattr(args, "method", None) == "lcm":  # finetune.py --method lcm: a few steps at the embedded guidance
        scales = f"{1 + min(max(2.0, args.w_min), args.w_max):g}"
        flags = f"--sampler lcm --steps 4 --cfg-scale {scales}"
    else:
        scales = "1,3" if args.class_dropout > 0 else "1"
        flags = f"--steps 20 --cfg-scale {scales}"
    ref = ""
    if getattr(args, "method", None) in ("controlnet", "t2i-adapter"):  # held-out controls and their images
        flags += f" --control {shlex.quote(os.path.join(run_dir, 'controls'))}"
        ref = f" --ref {shlex.quote(os.path.join(run_dir, 'controls', 'reference.npz'))}"
    elif not args.dataset.startswith("fashion-mnist"):
        ref = " --ref REAL_IMAGES   # a folder or an ADM .npz of real images"
    folder = os.path.join(run_dir, "samples", tag + (f"_cfg{scales.split(',')[-1]}" if "," in scales else ""))
    return (f"python sample.py --run {run} --num-samples 1000 {flags} --tag {tag}\n"
            f"python evaluate.py --samples {shlex.quote(folder)}{ref}")
