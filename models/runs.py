"""A run's folder: finding it, resuming it (from ckpt/last.pt or a numbered checkpoint) and writing
its checkpoints (train.py, finetune.py); starting the ranks (--nproc-per-node); checking that an
output folder can be written (every stage)."""
import glob
import json
import os
import shlex
import sys
import tempfile

import torch

from models.common import NothingToDo, UsageError, atomic_torch_save

CKPT_KEYS = {"model", "ema", "opt", "step"}


def launch_ranks(nproc, check):
    """`python <script> --nproc-per-node N ...`: call check() (every input check, writing nothing)
    in this process, so that bad input is one error line and exit status 2 (under torchrun it would
    be wrapped in torchrun's failure report, exit 1), then become torchrun starting N ranks of the
    same script with the same flags (less --nproc-per-node and its argparse abbreviations)."""
    check()
    argv, skip = [], False
    for arg in sys.argv[1:]:
        name = arg.split("=")[0]
        if skip or (len(name) > 3 and "--nproc-per-node".startswith(name)):
            skip = not skip and "=" not in arg
            continue
        argv.append(arg)
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), **os.environ}  # torchrun's default is 1, with a warning
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                               "--", sys.argv[0], *argv], env)


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


def newest_intact_checkpoint(run_dir):
    for path in numbered_checkpoints(run_dir):
        if read_checkpoint(path) is not None:
            return path
    return None


def resume_hint(run_dir):
    intact = newest_intact_checkpoint(run_dir)
    return f"; the newest intact checkpoint is {intact}: continue from it with --resume-from {intact}" if intact else \
        "; no intact numbered checkpoint either"


def save_checkpoint(run_dir, state, numbered):
    """ckpt/last.pt (and ckpt/<step>.pt every --ckpt-every steps), each written atomically."""
    if numbered:
        atomic_torch_save(os.path.join(run_dir, "ckpt", f"{state['step']:07d}.pt"), state)
    atomic_torch_save(os.path.join(run_dir, "ckpt", "last.pt"), state)


def resolve_run(args, parser, non_run_flags, legacy_defaults, default_name):
    """The run directory and the checkpoint to continue from (or None). --resume continues
    <out-dir>/<run> from ckpt/last.pt, --resume-from CKPT from a numbered checkpoint of a run; either
    way flags not given on the command line come from the run's config.json and flags given must
    agree with it (except non_run_flags). Checks only: writes nothing."""
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
        if os.path.isdir(run_dir) and os.listdir(run_dir):
            raise UsageError(f"{run_dir} exists and is not a run of train.py; choose another --run-name / --out-dir")
        return run_dir, None
    if not os.path.exists(config_path):
        raise UsageError(f"--resume: {run_dir} holds no run (no config.json)")
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
    vars(args).update(fresh, run=args.run, out_dir=args.out_dir, resume=True, resume_from=args.resume_from)
    ckpt_path = os.path.abspath(args.resume_from) if args.resume_from else os.path.join(run_dir, "ckpt", "last.pt")
    if not os.path.exists(ckpt_path):
        if numbered_checkpoints(run_dir):
            raise UsageError(f"--resume: {ckpt_path} is missing" + resume_hint(run_dir))
        if os.environ.get("RANK", "0") == "0":  # stopped before its first checkpoint: nothing to lose, start again
            print(f"--resume: {run_dir} has no checkpoint yet; training it from step 0", flush=True)
        return run_dir, None
    ckpt = read_checkpoint(ckpt_path)
    if ckpt is None:
        flag = "--resume-from" if args.resume_from else "--resume"
        raise UsageError(f"{flag}: {ckpt_path} is not a readable checkpoint" + ("" if args.resume_from else resume_hint(run_dir)))
    return run_dir, ckpt


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
