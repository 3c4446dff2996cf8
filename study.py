"""
The paper's central experiment in one command: pre-train every setting of the grid (the η sweep,
CEP-U / CEP-G, input perturbation, the γ ablation, asymmetric corruption) over seeds, sample each
run over a guidance sweep, evaluate every sample set, then write the tables, plots and sample grids.

    python study.py                                  # the Fashion-MNIST grid: runs in out/study, report in results/fashion-mnist
    python study.py --list                           # the grid, and what is done
    python study.py --only 'eta5_seed0'              # one setting and seed (comma-separated shell patterns)
    python study.py --only 'clean_*,cep-u_*'         # a part of the grid, e.g. for another session or machine
    python study.py --report-only                    # tables and plots from the files on disk
    python study.py --dataset imagefolder --data-path /data/imagenet/train --image-size 256 \\
        --model DiT-XL/2 --vae stabilityai/sd-vae-ft-ema --groups cifar100_shared.txt \\
        --nproc-per-node 8 --eval-args "--ref VIRTUAL_imagenet256_labeled.npz --features inception"   # the paper's grid

It only runs train.py, sample.py and evaluate.py, as a user would, so every run of the study is an
ordinary run. Resumable: a finished run, sample set or metrics file is skipped, and an interrupted
run continues with train.py --resume. Only the one factor of a setting changes between settings:
steps, batch and recipe are the same for all. The wall time of every stage is kept in
<run>/study_times.json for the report.
"""
import argparse
import fnmatch
import json
import os
import shlex
import subprocess
import sys
import time

import torch

from models.common import UsageError, atomic_write_json, run_main

# the grid: (name, train.py flags, seeds). Three seeds where the paper's claim is decided (clean, slight
# corruption, CEP), two elsewhere.
GRID = [
    ("clean", [], 3),
    *[(f"eta{100 * eta:g}", ["--corrupt", f"{eta:g}"], 3 if eta <= 0.05 else 2) for eta in (0.025, 0.05, 0.075, 0.1, 0.15, 0.2)],
    ("cep-u", ["--cep", "--cep-type", "uniform"], 3),
    ("cep-g", ["--cep", "--cep-type", "gaussian"], 3),
    ("ip0.1", ["--input-perturbation", "0.1"], 2),
    ("cep-u-gamma0.3", ["--cep", "--cep-type", "uniform", "--cep-gamma", "0.3"], 2),
    ("cep-u-gamma3", ["--cep", "--cep-type", "uniform", "--cep-gamma", "3"], 2),
    ("asym5", ["--corrupt", "0.05", "--corrupt-type", "asymmetric"], 2),
    ("asym10", ["--corrupt", "0.1", "--corrupt-type", "asymmetric"], 2),
]
REFERENCE = "clean"  # every setting is read against it
# sizes of the embedded study, chosen for ~6 hours of a 2-core CPU (results/fashion-mnist/README.md);
# other datasets default to train.py's recipe and the paper's sampling (50 K images, 50 steps)
EMBEDDED = dict(num_samples=2000, sample_steps=20, cfg_scales="1,1.5,2,3", fixed_cfg=2.0)
PAPER = dict(num_samples=50_000, sample_steps=50, cfg_scales="1,1.5,1.75,2,3,4", fixed_cfg=1.75)


def get_parser():
    p = argparse.ArgumentParser(description="Run the η / CEP grid: train, sample, evaluate, report.")
    a = p.add_argument
    a("--out-dir", default="out/study", help="where the runs live (one folder per setting and seed)")
    a("--results", default=None, help="where the report goes (default: results/<dataset>)")
    a("--only", default=None, help="comma-separated shell patterns of run names to do, e.g. 'eta5_seed0' or 'clean_*'")
    a("--list", action="store_true", help="print the grid and the state of each run, then exit")
    a("--report-only", action="store_true", help="write the report from the files on disk; train nothing")
    a("--no-report", action="store_true", help="run the grid but do not write the report (e.g. on a helper machine)")
    # what every run shares
    a("--dataset", default="fashion-mnist")
    a("--data-path", default=None)
    a("--image-size", type=int, default=None)
    a("--model", default="DiT-T/4")
    a("--vae", default=None, help="latent runs: the autoencoder whose latents corrupt_data.py pre-extracted")
    a("--groups", default=None, help="asymmetric settings on an ImageFolder: the class-group file")
    a("--max-steps", type=int, default=None, help="training steps of every run (default: train.py's recipe)")
    a("--train-args", default="", help="more train.py flags for every run, e.g. \"--global-batch-size 128\"")
    a("--nproc-per-node", type=int, default=2, help="ranks of each train.py / sample.py (torchrun)")
    # sampling and evaluation
    a("--num-samples", type=int, default=None, help="images per sample set (embedded: 2000; else 50000)")
    a("--sample-steps", type=int, default=None, help="DPM-Solver++ steps (embedded: 20, checked against 50; else 50)")
    a("--cfg-scales", default=None, help="guidance sweep (embedded: 1,1.5,2,3; else 1,1.5,1.75,2,3,4)")
    a("--fixed-cfg", type=float, default=None, help="the scale of the fixed-scale table (embedded: 2; else 1.75)")
    a("--sample-args", default="", help="more sample.py flags")
    a("--eval-args", default="", help="more evaluate.py flags, e.g. \"--ref ref.npz --features inception\"")
    return p


def check_args(args):
    sizes = EMBEDDED if args.dataset == "fashion-mnist" else PAPER
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.scales = [float(s) for s in args.cfg_scales.split(",")]
    except ValueError:
        raise UsageError(f"--cfg-scales takes numbers separated by commas, got {args.cfg_scales}")
    if args.fixed_cfg not in args.scales:
        raise UsageError(f"--fixed-cfg {args.fixed_cfg:g} is not one of --cfg-scales {args.cfg_scales}")
    if args.num_samples <= 0 or args.sample_steps <= 0 or args.nproc_per_node <= 0:
        raise UsageError("--num-samples, --sample-steps and --nproc-per-node must be positive")
    if {"--max-steps", "--run-name", "--run", "--out-dir", "--seed", "--resume"} & {f.split("=")[0] for f in shlex.split(args.train_args)}:
        raise UsageError("--train-args must not set --max-steps, --run-name, --out-dir, --seed or --resume: study.py sets them "
                         "(use its --max-steps)")
    if args.groups and not os.path.isfile(args.groups):
        raise UsageError(f"--groups {args.groups} does not exist")
    if args.max_steps is None:  # train.py's recipe for the model
        from models.build import training_recipe
        args.max_steps = training_recipe(args.model)["max_steps"]
    if args.results is None:
        args.results = os.path.join("results", args.dataset)


def grid_runs(args):
    """[(run name, setting name, train.py flags, seed)] of the grid, filtered by --only."""
    runs = [(f"{name}_seed{seed}", name, flags, seed) for name, flags, seeds in GRID for seed in range(seeds)]
    if args.only:
        patterns = [s.strip() for s in args.only.split(",") if s.strip()]
        runs = [r for r in runs if any(fnmatch.fnmatchcase(r[0], pat) for pat in patterns)]
        if not runs:
            raise UsageError(f"--only {args.only} matches no run of the grid (python study.py --list shows them)")
    if args.dataset not in ("fashion-mnist",) and not args.groups and any("asymmetric" in r[2] for r in runs):
        raise UsageError("the asymmetric settings need --groups FILE on this dataset (or leave them out with --only)")
    return runs


def sample_sets(args, run):
    """(tag, sample.py flags) of every sample set of a run: the guidance sweep, and on the reference
    run's first seed two checks: the same scale at 50 steps, and two more sampling seeds (the
    sampling noise that the seed-to-seed spread is read against)."""
    base = ["--sampler", "dpm-solver++", "--num-samples", str(args.num_samples)]
    sets = [(f"dpm{args.sample_steps}_cfg{s:g}", base + ["--steps", str(args.sample_steps), "--cfg-scale", f"{s:g}"])
            for s in args.scales]
    if run == f"{REFERENCE}_seed0":
        fixed = ["--cfg-scale", f"{args.fixed_cfg:g}"]
        if args.sample_steps != 50:
            sets.append((f"dpm50_cfg{args.fixed_cfg:g}", base + ["--steps", "50"] + fixed))
        sets += [(f"dpm{args.sample_steps}_cfg{args.fixed_cfg:g}_seed{s}", base + ["--steps", str(args.sample_steps), "--seed", str(s)] + fixed)
                 for s in (1, 2)]
    return sets


def launch(script, flags, nproc):
    if nproc == 1:
        return [sys.executable, script, *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *flags]


def call(cmd, what):
    """Run one stage; a failure stops the study with one line naming the command."""
    print("$ " + shlex.join(cmd), flush=True)
    if subprocess.call(cmd) != 0:
        raise UsageError(f"{what} failed; rerun the command above to see why, then rerun study.py (it resumes)")


def add_time(run_dir, stage, seconds):
    path = os.path.join(run_dir, "study_times.json")
    times = {}
    if os.path.exists(path):
        with open(path) as f:
            times = json.load(f)
    times[stage] = round(times.get(stage, 0.0) + seconds, 1)
    atomic_write_json(path, times)


def trained_steps(run_dir):
    """Steps of the run's last checkpoint (0 when there is none)."""
    path = os.path.join(run_dir, "ckpt", "last.pt")
    if not os.path.exists(path):
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])


def state(args, run):
    """'done', 'partial' or 'todo' of a run, and the number of sample sets evaluated."""
    run_dir = os.path.join(args.out_dir, run)
    sets = sample_sets(args, run)
    scored = sum(os.path.exists(os.path.join(run_dir, "samples", tag, "metrics.json")) for tag, _ in sets)
    if scored == len(sets):
        return "done", scored, len(sets)
    return ("partial" if os.path.exists(os.path.join(run_dir, "config.json")) else "todo"), scored, len(sets)


def train_flags(args, run, flags, seed):
    common = ["--dataset", args.dataset, "--model", args.model, "--out-dir", args.out_dir, "--run-name", run, "--seed", str(seed)]
    common += ["--max-steps", str(args.max_steps)]
    for flag, value in (("--data-path", args.data_path), ("--image-size", args.image_size), ("--vae", args.vae)):
        if value is not None:
            common += [flag, str(value)]
    if args.groups and "asymmetric" in flags:
        common += ["--groups", args.groups]
    return common + flags + shlex.split(args.train_args)


def do_run(args, run, flags, seed):
    run_dir = os.path.join(args.out_dir, run)
    train_cmd = train_flags(args, run, flags, seed)
    config_path, saved = os.path.join(run_dir, "config.json"), None
    if os.path.exists(config_path):
        with open(config_path) as f:
            saved = json.load(f)
    if saved is None or trained_steps(run_dir) < args.max_steps:
        t0 = time.time()
        call(launch("train.py", train_cmd + (["--resume"] if saved else []), args.nproc_per_node), f"training {run}")
        add_time(run_dir, "train", time.time() - t0)
    for tag, flags_s in sample_sets(args, run):
        folder = os.path.join(run_dir, "samples", tag)
        if os.path.exists(os.path.join(folder, "sample_config.json")):
            with open(os.path.join(folder, "sample_config.json")) as f:
                sampled_at = json.load(f).get("step")
            if sampled_at != args.max_steps:
                raise UsageError(f"{folder} holds samples of step {sampled_at}, but the run is now trained to {args.max_steps}: "
                                 "move that folder away (or pass the --max-steps it was made with)")
        if not os.path.exists(os.path.join(folder, "samples.npz")):
            t0 = time.time()
            call(launch("sample.py", ["--run-dir", run_dir, "--tag", tag, *flags_s, *shlex.split(args.sample_args)], args.nproc_per_node),
                 f"sampling {run}/{tag}")
            add_time(run_dir, f"sample {tag}", time.time() - t0)
        if not os.path.exists(os.path.join(folder, "metrics.json")):
            t0 = time.time()
            call([sys.executable, "evaluate.py", "--samples", folder, "--out-dir", args.out_dir, *shlex.split(args.eval_args)],
                 f"evaluating {run}/{tag}")
            add_time(run_dir, f"evaluate {tag}", time.time() - t0)


def main():
    args = get_parser().parse_args()
    check_args(args)
    runs = grid_runs(args)
    if args.list:
        for run, name, flags, seed in runs:
            st, scored, total = state(args, run)
            print(f"{run:24s} {st:8s} {scored}/{total} sample sets evaluated   train.py {shlex.join(flags) or '(clean)'}")
        return
    if not args.report_only:
        for k, (run, name, flags, seed) in enumerate(runs):
            if state(args, run)[0] != "done":
                print(f"== [{k + 1}/{len(runs)}] {run}", flush=True)
                do_run(args, run, flags, seed)
    if not args.no_report:
        from models.report import write_study_report
        write_study_report(args, [r[0] for r in grid_runs(argparse.Namespace(**{**vars(args), "only": None}))])


if __name__ == "__main__":
    run_main(main)
