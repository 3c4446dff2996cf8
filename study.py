"""
The paper's central experiment in one command: pre-train every setting of a grid (the η sweep,
CEP-U / CEP-G, input perturbation, the γ ablation, asymmetric corruption) over seeds, sample each
run over a guidance sweep, evaluate every sample set, then write the tables, plots and sample grids
(models/study_report.py), every setting read against clean training paired by seed.

    python study.py                                  # the 1,000-step Fashion-MNIST grid: runs in out/study, report in results/fashion-mnist
    python study.py --grid converged                 # the converged grid (10,000 steps): out/converged, results/fashion-mnist/converged
    python study.py --grid converged --only clean_seed1   # one setting and seed (comma-separated shell patterns)
    python study.py --list                           # the grid, and what is done
    python study.py --only 'clean_*,cep-u_*'         # a part of the grid, e.g. for another session or machine
    python study.py --report-only                    # tables and plots from the files on disk
    python study.py --dataset imagefolder --data-path /data/imagenet/train --image-size 256 \\
        --model DiT-XL/2 --vae stabilityai/sd-vae-ft-ema --groups cifar100_groups.txt \\
        --nproc-per-node 8 --eval-args "--ref VIRTUAL_imagenet256_labeled.npz --features inception"   # the paper's grid

It only runs train.py, sample.py and evaluate.py, as a user would, so every run of the study is an
ordinary run. Resumable: a finished run, sample set or metrics file is skipped, and an interrupted
run continues with train.py --resume. Only the one factor of a setting changes between settings:
steps, batch and recipe are the same for all, and seed k of every setting starts from the same
weights and data order. The wall time of every stage is kept in <run>/study_times.json.
"""
import argparse
import fnmatch
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from models.common import UsageError, atomic_write_json, run_main
from models.study_report import write_study_report

# train.py flags of every setting
SETTINGS = {
    "clean": [],
    **{f"eta{100 * eta:g}": ["--corrupt", f"{eta:g}"] for eta in (0.025, 0.05, 0.075, 0.1, 0.15, 0.2)},
    "cep-u": ["--cep", "--cep-type", "uniform"],
    "cep-g": ["--cep", "--cep-type", "gaussian"],
    "ip0.1": ["--input-perturbation", "0.1"],
    "cep-u-gamma0.3": ["--cep", "--cep-type", "uniform", "--cep-gamma", "0.3"],
    "cep-u-gamma3": ["--cep", "--cep-type", "uniform", "--cep-gamma", "3"],
    "asym5": ["--corrupt", "0.05", "--corrupt-type", "asymmetric"],
    "asym10": ["--corrupt", "0.1", "--corrupt-type", "asymmetric"],
}
REFERENCE = "clean"  # every setting is read against it
# the paper's claims tested with a family-wise error rate (Holm) on the primary metric, FID; every
# other comparison is reported with its own CI
PRIMARY = ("η 2.5 %", "η 5 %", "CEP-U γ 1", "CEP-G γ 1")  # the report's labels of eta2.5, eta5, cep-u, cep-g

# The 1,000-step grid (results/fashion-mnist), planned from the tiny recipe's speed on 2 idle cores
# (~190 img/s of training at batch 64; ~90 s per 1,000 guided DPM-Solver++ samples at 20 steps; ~20 s
# per evaluation) for ~6 hours over its 33 runs: 1,000 training steps (half the main job's 2,000),
# no guidance and 3 scales around the main job's best (3) at 1,000 images each. Three seeds where the
# paper's claim is decided, two elsewhere. Its sample sets are in batches of 64, the batch its
# committed results were made with (another batch gives the same images up to float rounding).
SHORT = dict(runs=[(name, 3 if name in ("clean", "eta2.5", "eta5", "cep-u", "cep-g") else 2) for name in SETTINGS],
             max_steps=1000, num_samples=1000, sample_steps=20, cfg_scales="1,2,3,4", fixed_cfg=3.0, sample_batch_size=64,
             curve_scales=None, out_dir="out/study", results="results/{dataset}")
# The converged grid (results/fashion-mnist/converged/protocol.md): the budget at which clean reaches
# fid_fmnist <= 5x its floor at its best scale (10,000 steps: the 8,000-step pilot scored 8.91, over
# the 8.62 target); the guidance sweep around that budget's best scale
# (1.5); a learning curve at 1/4 and 1/2 of the budget over the scales that are best earlier in
# training. The core settings first, seed by seed (so every finished seed is a complete pair), then
# η 10 % and IP if time remains.
CONVERGED_SEEDS = 3
CONVERGED = dict(runs=[(name, CONVERGED_SEEDS) for name in ("clean", "eta2.5", "eta5", "cep-u", "cep-g")], extra=["eta10", "ip0.1"],
                 max_steps=10000, num_samples=1000, sample_steps=20, cfg_scales="1,1.5,2", fixed_cfg=1.5, sample_batch_size=64,
                 curve_scales="1.5,2,3", out_dir="out/converged", results="results/{dataset}/converged", seed_major=True)
# another dataset: train.py's recipe for the model and the paper's sampling (50 K images, 50 steps)
PAPER = dict(max_steps=None, num_samples=50_000, sample_steps=50, cfg_scales="1,1.5,1.75,2,3,4", fixed_cfg=1.75, sample_batch_size=None)
GRIDS = {"short": SHORT, "converged": CONVERGED}


def get_parser():
    p = argparse.ArgumentParser(description="Run the η / CEP grid: train, sample, evaluate, report.")
    a = p.add_argument
    a("--grid", default="short", choices=tuple(GRIDS), help="short: the 1,000-step grid of every setting; converged: the core "
      "settings at the budget where clean has learned the data, with learning curves")
    a("--seeds", type=int, default=None, help="training seeds of every setting (default: the grid's)")
    a("--out-dir", default=None, help="where the runs live, one folder per setting and seed (default: the grid's)")
    a("--results", default=None, help="where the report goes (default: the grid's, under results/<dataset>)")
    a("--only", default=None, help="comma-separated shell patterns of run names to do, e.g. 'eta5_seed0' or 'clean_*'")
    a("--list", action="store_true", help="print the grid and the state of each run, then exit")
    a("--report-only", action="store_true", help="write the report from the files on disk; train nothing")
    a("--plan", action="store_true", help="from the reference's finished runs (the pilot): the seeds a setting needs for power 0.8 "
      "against a 10 %% change of the primary metric, and how many fit --hours")
    a("--hours", type=float, default=15.0, help="--plan: the time the core settings of the grid may take on this machine")
    a("--no-report", action="store_true", help="run the grid but do not write the report (e.g. on a helper machine)")
    # what every run shares
    a("--dataset", default="fashion-mnist")
    a("--data-path", default=None)
    a("--image-size", type=int, default=None)
    a("--model", default="DiT-T/4")
    a("--vae", default=None, help="latent runs: the autoencoder whose latents corrupt_data.py pre-extracted")
    a("--groups", default=None, help="asymmetric settings on an ImageFolder: the class-group file")
    a("--max-steps", type=int, default=None, help="training steps of every run (default: the grid's on fashion-mnist, else train.py's recipe)")
    a("--train-args", default="", help="more train.py flags for every run, e.g. \"--global-batch-size 128\"")
    a("--nproc-per-node", type=int, default=2, help="ranks of each train.py / sample.py (torchrun)")
    # sampling and evaluation
    a("--num-samples", type=int, default=None, help="images per sample set (embedded: 1000; else 50000)")
    a("--sample-steps", type=int, default=None, help="DPM-Solver++ steps (embedded: 20, checked against 50; else 50)")
    a("--cfg-scales", default=None, help="guidance sweep at the full budget (short: 1,2,3,4; converged: 1,1.5,2; else 1,1.5,1.75,2,3,4)")
    a("--curve-scales", default=None, help="guidance sweep of the learning-curve points at 1/4 and 1/2 of the budget "
      "(converged: 1.5,2,3; 'none': no learning curve)")
    a("--fixed-cfg", type=float, default=None, help="the scale of the fixed-scale table and the sampling checks (short: 3; converged: 1.5)")
    a("--sample-batch-size", type=int, default=None, help="sample.py --batch-size (embedded: 64; else sample.py's default)")
    a("--sample-args", default="", help="more sample.py flags")
    a("--eval-args", default="", help="more evaluate.py flags, e.g. \"--ref ref.npz --features inception\"")
    return p


def scale_list(text, flag):
    try:
        return [float(s) for s in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} takes numbers separated by commas, got {text}")


def check_args(args):
    grid = GRIDS[args.grid]
    sizes = grid if args.dataset == "fashion-mnist" else {**PAPER, "curve_scales": grid["curve_scales"]}
    for key in ("max_steps", "num_samples", "sample_steps", "cfg_scales", "curve_scales", "fixed_cfg", "sample_batch_size"):
        if getattr(args, key) is None:
            setattr(args, key, sizes[key])
    args.scales = scale_list(args.cfg_scales, "--cfg-scales")
    args.curve = [] if args.curve_scales in (None, "none") else scale_list(args.curve_scales, "--curve-scales")
    if args.fixed_cfg not in args.scales:
        raise UsageError(f"--fixed-cfg {args.fixed_cfg:g} is not one of --cfg-scales {args.cfg_scales}")
    if args.num_samples <= 0 or args.sample_steps <= 0 or args.nproc_per_node <= 0 or (args.seeds is not None and args.seeds <= 0):
        raise UsageError("--num-samples, --sample-steps, --nproc-per-node and --seeds must be positive")
    if {"--max-steps", "--run-name", "--run", "--out-dir", "--seed", "--resume"} & {f.split("=")[0] for f in shlex.split(args.train_args)}:
        raise UsageError("--train-args must not set --max-steps, --run-name, --out-dir, --seed or --resume: study.py sets them "
                         "(use its --max-steps)")
    if args.groups and not os.path.isfile(args.groups):
        raise UsageError(f"--groups {args.groups} does not exist")
    if args.max_steps is None:  # train.py's recipe for the model
        from models.build import training_recipe
        args.max_steps = training_recipe(args.model)["max_steps"]
    if args.curve and args.max_steps % 4:
        raise UsageError(f"the learning curve samples steps max_steps/4 and /2: --max-steps {args.max_steps} is not a multiple of 4")
    args.out_dir = args.out_dir or grid["out_dir"]
    args.results = args.results or grid["results"].format(dataset=args.dataset)


def grid_runs(args, only=True):
    """[(run name, setting name, train.py flags, seed)] of the grid, filtered by --only (if `only`).
    Setting-major (every seed of clean, then of the next setting), or seed-major (seed 0 of every
    setting, then seed 1, ...) so that each finished seed completes a set of pairs."""
    grid = GRIDS[args.grid]

    def runs_of(settings):
        per_setting = [[(f"{name}_seed{seed}", name, SETTINGS[name], seed) for seed in range(args.seeds or seeds)] for name, seeds in settings]
        if grid.get("seed_major"):
            return [r for k in range(max(map(len, per_setting))) for runs in per_setting for r in runs[k:k + 1]]
        return [r for runs in per_setting for r in runs]
    # the extra settings (if time remains) come after the core, with as many seeds
    runs = runs_of(grid["runs"]) + runs_of([(name, grid["runs"][0][1]) for name in grid.get("extra", [])])
    if only and args.only:
        patterns = [s.strip() for s in args.only.split(",") if s.strip()]
        runs = [r for r in runs if any(fnmatch.fnmatchcase(r[0], pat) for pat in patterns)]
        if not runs:
            raise UsageError(f"--only {args.only} matches no run of the grid (python study.py --list shows them)")
    if args.dataset not in ("fashion-mnist",) and not args.groups and any("asymmetric" in r[2] for r in runs):
        raise UsageError("the asymmetric settings need --groups FILE on this dataset (or leave them out with --only)")
    return runs


def curve_steps(args):
    """The learning curve's earlier training steps (1/4 and 1/2 of the budget), if any."""
    return [args.max_steps // 4, args.max_steps // 2] if args.curve else []


def sample_sets(args, run):
    """(tag, sample.py flags, training step) of every sample set of a run: the guidance sweep of the
    final weights, the learning curve's sweeps of the numbered checkpoints at 1/4 and 1/2 of the
    budget, and on the reference run's first seed two checks: the fixed scale at 50 steps, and two
    more sampling seeds (the sampling noise that the seed-to-seed spread is read against)."""
    base = ["--sampler", "dpm-solver++", "--num-samples", str(args.num_samples)]
    base += ["--batch-size", str(args.sample_batch_size)] if args.sample_batch_size else []
    steps = ["--steps", str(args.sample_steps)]
    base = ["--run-dir", os.path.join(args.out_dir, run)] + base
    sets = [(f"dpm{args.sample_steps}_cfg{s:g}", base + steps + ["--cfg-scale", f"{s:g}"], args.max_steps) for s in args.scales]
    for step in curve_steps(args):  # a numbered checkpoint instead of the run's last
        ckpt = ["--ckpt", os.path.join(args.out_dir, run, "ckpt", f"{step:07d}.pt")] + base[2:]
        sets += [(f"step{step}_dpm{args.sample_steps}_cfg{s:g}", ckpt + steps + ["--cfg-scale", f"{s:g}"], step) for s in args.curve]
    if run == f"{REFERENCE}_seed0":
        fixed = ["--cfg-scale", f"{args.fixed_cfg:g}"]
        if args.sample_steps != 50:
            sets.append((f"dpm50_cfg{args.fixed_cfg:g}", base + ["--steps", "50"] + fixed, args.max_steps))
        sets += [(f"dpm{args.sample_steps}_cfg{args.fixed_cfg:g}_seed{s}", base + steps + ["--seed", str(s)] + fixed, args.max_steps)
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
    scored = sum(os.path.exists(os.path.join(run_dir, "samples", tag, "metrics.json")) for tag, _, _ in sets)
    if scored == len(sets):
        return "done", scored, len(sets)
    return ("partial" if os.path.exists(os.path.join(run_dir, "config.json")) else "todo"), scored, len(sets)


def train_flags(args, run, flags, seed):
    common = ["--dataset", args.dataset, "--model", args.model, "--out-dir", args.out_dir, "--run-name", run, "--seed", str(seed)]
    common += ["--max-steps", str(args.max_steps)] + (["--ckpt-every", str(args.max_steps // 4)] if args.curve else [])
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
    for tag, flags_s, step in sample_sets(args, run):
        folder = os.path.join(run_dir, "samples", tag)
        if os.path.exists(os.path.join(folder, "sample_config.json")):
            with open(os.path.join(folder, "sample_config.json")) as f:
                sampled_at = json.load(f).get("step")
            if sampled_at != step:
                raise UsageError(f"{folder} holds samples of step {sampled_at}, not of step {step} (the run is now trained to "
                                 f"{args.max_steps}): move that folder away (or pass the --max-steps it was made with)")
        if not os.path.exists(os.path.join(folder, "samples.npz")):
            t0 = time.time()
            call(launch("sample.py", ["--tag", tag, *flags_s, *shlex.split(args.sample_args)], args.nproc_per_node),
                 f"sampling {run}/{tag}")
            add_time(run_dir, f"sample {tag}", time.time() - t0)
        if not os.path.exists(os.path.join(folder, "metrics.json")):
            t0 = time.time()
            call([sys.executable, "evaluate.py", "--samples", folder, *shlex.split(args.eval_args)],
                 f"evaluating {run}/{tag}")
            add_time(run_dir, f"evaluate {tag}", time.time() - t0)


RUN_FILES = ("config.json", "log.jsonl", "study_times.json")
SAMPLE_FILES = ("metrics.json", "sample_config.json")


def sync_run_files(args, runs, dest):
    """Copy the small files of each finished run (config, log, stage times, every sample set's
    metrics and settings, the grid of the final weights' fixed-scale set; only the grid's sample sets) from args.out_dir to dest/<run>/: the
    report is made from these, so it can be regenerated from the committed results without the
    checkpoints. A run still in progress keeps the files it has in dest (a rerun never mixes its
    new sample sets with the old ones), and a finished run's copy replaces its old one whole."""
    out_dir, fixed_cfg = args.out_dir, args.fixed_cfg
    for run in runs:
        src = os.path.join(out_dir, run)
        if state(args, run)[0] != "done":
            continue
        if os.path.isdir(os.path.join(dest, run, "samples")):
            shutil.rmtree(os.path.join(dest, run, "samples"))
        for name in RUN_FILES:
            if os.path.exists(os.path.join(src, name)):
                os.makedirs(os.path.join(dest, run), exist_ok=True)
                shutil.copyfile(os.path.join(src, name), os.path.join(dest, run, name))
        grid_tags = {tag for tag, _, _ in sample_sets(args, run)}  # other sample sets of the run (explorations) stay out
        for folder in sorted(glob.glob(os.path.join(src, "samples", "*"))):
            if os.path.basename(folder) not in grid_tags or not os.path.exists(os.path.join(folder, "metrics.json")):
                continue
            to = os.path.join(dest, run, "samples", os.path.basename(folder))
            os.makedirs(to, exist_ok=True)
            for name in SAMPLE_FILES:
                shutil.copyfile(os.path.join(folder, name), os.path.join(to, name))
            with open(os.path.join(folder, "sample_config.json")) as f:
                sc = json.load(f)
            final = sc.get("cfg_scale") == fixed_cfg and sc.get("seed", 0) == 0 and sc.get("step") == args.max_steps
            if final and os.path.exists(os.path.join(folder, "grid.png")):
                shutil.copyfile(os.path.join(folder, "grid.png"), os.path.join(to, "grid.png"))


def run_seconds(run_dir):
    """Wall seconds of a run on an idle machine: training at the 90th percentile of its logged speed
    (the pilot shared the cores with other work at times, which the median would charge to every
    run), each sample set and evaluation at the median of its stages in study_times.json."""
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        speed = np.percentile([json.loads(line)["img_per_s"] for line in f if line.strip()], 90)
    times = {}
    if os.path.exists(os.path.join(run_dir, "study_times.json")):
        with open(os.path.join(run_dir, "study_times.json")) as f:
            times = json.load(f)
    stages = [[v for k, v in times.items() if k.startswith(kind)] for kind in ("sample ", "evaluate ")]
    return cfg["max_steps"] * cfg["global_batch_size"] / speed + sum(len(v) * np.median(v) for v in stages if v)


def plan(args):
    """The seed count of a grid from its pilot (the reference's finished runs): their std of FID at the
    best scale, or the std over the sampling seeds of its seed 0 if that is larger, σ_ref; the std of
    per-seed differences it implies, σ_Δ = σ_ref · (σ_Δ / σ_ref of the 1,000-step grid's primary
    comparisons, the only measured ratio), and √2 · σ_ref (unpaired seeds: the upper bound); the
    seeds each needs for power 0.8 against a 10 % change; the wall time of a run; and how many seeds
    of every core setting fit --hours."""
    from models.report import aggregate, main_metric, read_rows
    from models.stats import best_scale_groups, paired_comparisons, pooled_sd, seeds_for_power
    pilot = [r for r in read_rows(args.out_dir, {r[0] for r in grid_runs(args, only=False) if r[1] == REFERENCE})
             if r["step"] == args.max_steps and r["sample_seed"] == 0 and r["sampler"] == f"dpm-solver++-{args.sample_steps}"]
    if len({r["seed"] for r in pilot}) < 2:
        raise UsageError(f"--plan needs at least 2 finished {REFERENCE} runs in {args.out_dir}")
    fid = main_metric(pilot[0]["metrics"], "fid")
    (ref,) = best_scale_groups(aggregate(pilot), fid)
    short = read_rows(os.path.join(SHORT["results"].format(dataset=args.dataset), "runs"))
    short = [r for r in short if r["sample_seed"] == 0 and r["sampler"] == f"dpm-solver++-{SHORT['sample_steps']}"]
    short_best = best_scale_groups(aggregate(short), fid)
    short_ref = next(g for g in short_best if g["setting"] == REFERENCE)
    ratio = pooled_sd([c["stats"][fid] for c in paired_comparisons(short, short_best, [fid], REFERENCE, PRIMARY, fid)
                       if c["setting"] in PRIMARY])[0] / short_ref["std"][fid]
    # the std over training seeds (one sample set each) includes the sampling noise, so it cannot be
    # below the std over sampling seeds of one model; from 2-3 sets each, take the larger
    noise = [r["metrics"][fid] for r in read_rows(args.out_dir, {f"{REFERENCE}_seed0"}) if r["step"] == args.max_steps
             and r["cfg"] == args.fixed_cfg and r["sampler"] == f"dpm-solver++-{args.sample_steps}"]
    sigma = max(ref["std"][fid], np.std(noise, ddof=1) if len(noise) > 1 else 0.0)
    run_hours = np.mean([run_seconds(os.path.join(args.out_dir, r)) for r in {r["run"] for r in pilot}]) / 3600
    effect, core = 0.1 * ref["mean"][fid], len(GRIDS[args.grid]["runs"])
    fit = int(args.hours // (core * run_hours))
    print(f"pilot: {REFERENCE} seeds {ref['seeds']}, {fid} at the best scale {ref['cfg']:g}: {ref['mean'][fid]:.3f} ± {ref['std'][fid]:.3f}; "
          f"a 10 % change is {effect:.3f}")
    if len(noise) > 1:
        print(f"std over {len(noise)} sampling seeds of {REFERENCE}_seed0 at guidance {args.fixed_cfg:g}: {np.std(noise, ddof=1):.3f}; "
              f"σ_ref = {sigma:.3f}, the larger of the two")
    for what, sd in ((f"paired (σ_Δ / σ_ref = {ratio:.2f}, the 1,000-step grid's)", ratio * sigma),
                     ("unpaired bound (√2 σ_ref)", np.sqrt(2) * sigma)):
        print(f"σ_Δ {sd:.3f} {what}: {seeds_for_power(effect, sd)} seeds for power 0.8")
    print(f"one run (train, sample, evaluate) at idle speed: {run_hours:.2f} h; {core} core settings: {fit} seeds fit {args.hours:g} h")


def main():
    args = get_parser().parse_args()
    check_args(args)
    runs = grid_runs(args)
    if args.plan:
        return plan(args)
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
        every_run = [r[0] for r in grid_runs(args, only=False)]
        if os.path.isdir(args.out_dir):  # the report reads the runs' small files, copied next to it
            sync_run_files(args, every_run, os.path.join(args.results, "runs"))
        write_study_report(args, every_run, REFERENCE, PRIMARY)


if __name__ == "__main__":
    run_main(main)
