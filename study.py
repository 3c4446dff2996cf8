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
        --model DiT-XL/2 --vae stabilityai/sd-vae-ft-ema --groups cifar100_groups.txt \\
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
import glob
import shutil
import subprocess
import sys
import time

import numpy as np
import scipy.stats
import torch

from models.build import describe_recipe
from models.common import UsageError, atomic_write_json, atomic_write_text, run_main
from models.report import (QUALITY, aggregate, base_name, direction, fmt, group_table, markdown_table, metric_names,
                           plot_bars, plot_eta, plot_fid_is, read_rows, setting_order)

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
# sizes of the embedded study, planned from the tiny recipe's speed on 2 idle cores (~190 img/s of
# training at batch 64; ~90 s per 1,000 guided DPM-Solver++ samples at 20 steps, half that unguided;
# ~20 s per evaluation) for ~6 hours over the 33 runs, ~11 min each: 1,000 training steps (half the
# main job's 2,000; ~5.5 min), no guidance and 3 scales around the main job's best (3) at 1,000 images
# each (~5 min), 4 evaluations (~1.5 min). Other datasets default to train.py's recipe and the paper's
# sampling (50 K images, 50 steps).
# The embedded study samples in batches of 64, the batch its committed results were made with (another
# batch gives the same images up to float rounding in the batched matmuls).
EMBEDDED = dict(max_steps=1000, num_samples=1000, sample_steps=20, cfg_scales="1,2,3,4", fixed_cfg=3.0, sample_batch_size=64)
PAPER = dict(max_steps=None, num_samples=50_000, sample_steps=50, cfg_scales="1,1.5,1.75,2,3,4", fixed_cfg=1.75, sample_batch_size=None)


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
    a("--max-steps", type=int, default=None, help="training steps of every run (default: 1000 on fashion-mnist, else train.py's recipe)")
    a("--train-args", default="", help="more train.py flags for every run, e.g. \"--global-batch-size 128\"")
    a("--nproc-per-node", type=int, default=2, help="ranks of each train.py / sample.py (torchrun)")
    # sampling and evaluation
    a("--num-samples", type=int, default=None, help="images per sample set (embedded: 1000; else 50000)")
    a("--sample-steps", type=int, default=None, help="DPM-Solver++ steps (embedded: 20, checked against 50; else 50)")
    a("--cfg-scales", default=None, help="guidance sweep (embedded: 1,2,3,4; else 1,1.5,1.75,2,3,4)")
    a("--fixed-cfg", type=float, default=None, help="the scale of the fixed-scale table (embedded: 3; else 1.75)")
    a("--sample-batch-size", type=int, default=None, help="sample.py --batch-size (embedded: 64; else sample.py's default)")
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
    base += ["--batch-size", str(args.sample_batch_size)] if args.sample_batch_size else []
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
            call([sys.executable, "evaluate.py", "--samples", folder, *shlex.split(args.eval_args)],
                 f"evaluating {run}/{tag}")
            add_time(run_dir, f"evaluate {tag}", time.time() - t0)


# ---- the report: tables, plots and grids from the runs' small files --------------------------------

def best_scale_groups(groups, fid, sampler):
    """Per setting, the group (over seeds) of the guidance scale with the lowest mean FID."""
    best = {}
    for g in groups:
        if g["sampler"] != sampler or g["sample_seed"] != 0 or fid not in g["mean"]:
            continue
        if g["setting"] not in best or g["mean"][fid] < best[g["setting"]]["mean"][fid]:
            best[g["setting"]] = g
    return sorted(best.values(), key=lambda g: setting_order(g["setting"]))


def verdicts(chosen, names, reference="clean"):
    """Each setting against the reference: Δ of the means, and whether it exceeds the seed-to-seed
    spread s = √((s_a² + s_b²)/2) (pooled std of the two settings). Markdown lines."""
    ref = next((g for g in chosen if g["setting"] == reference), None)
    if ref is None:
        return []
    lines = []
    for g in chosen:
        if g is ref:
            continue
        cells = []
        for name in names:
            if name not in g["mean"] or name not in ref["mean"]:
                cells.append("")
                continue
            delta = g["mean"][name] - ref["mean"][name]
            spread = np.sqrt((np.nan_to_num(g["std"][name]) ** 2 + np.nan_to_num(ref["std"][name]) ** 2) / 2)
            d = direction(name)
            if not abs(delta) > spread:
                mark = "≈"
            elif d == 0:
                mark = "↑" if delta > 0 else "↓"
            else:
                mark = "**better**" if d * delta > 0 else "worse"
            cells.append(f"{delta:+.3g} (s {spread:.2g}) {mark}")
        lines.append([g["setting"], f"{g['cfg']:g}"] + cells)
    return lines


def paired_deltas(rows, chosen, names, reference="clean"):
    """Each setting against the reference seed by seed: seed k of every setting starts from the same
    weights and data order, so Δ_k = metric(setting, seed k) − metric(reference, seed k), each at its
    best scale (the scale of `chosen`), pairs away the seed-to-seed spread they share. Markdown
    lines: the Δ_k, their mean ± std, on how many seeds the setting is on the better side, and with
    3 seeds or more the paired t-test's two-sided p."""
    ref = next((g for g in chosen if g["setting"] == reference), None)
    if ref is None:
        return []

    def by_seed(setting, cfg):
        return {r["seed"]: r["metrics"] for r in rows if r["setting"] == setting and r["cfg"] == cfg}
    ref_values = by_seed(reference, ref["cfg"])
    lines = []
    for g in chosen:
        if g is ref:
            continue
        values = by_seed(g["setting"], g["cfg"])
        seeds = sorted(set(values) & set(ref_values))
        cells = []
        for name in names:
            deltas = np.array([values[k][name] - ref_values[k][name] for k in seeds if name in values[k] and name in ref_values[k]])
            if len(deltas) == 0:
                cells.append("")
                continue
            d = direction(name)
            notes = [f"{int(np.sum(d * deltas > 0))}/{len(deltas)} better"] if d else []
            if len(deltas) >= 3 and np.ptp(deltas) > 0:  # paired t-test, two-sided; with 2 seeds it says nothing
                notes.append(f"p {scipy.stats.ttest_rel([values[k][name] for k in seeds], [ref_values[k][name] for k in seeds]).pvalue:.2g}")
            std = f" ± {np.round(deltas.std(ddof=1), 12):.2g}" if len(deltas) > 1 else ""
            cells.append(", ".join(f"{v:+.3g}" for v in deltas) + f" → {deltas.mean():+.3g}{std}"
                         + (f" ({', '.join(notes)})" if notes else ""))
        lines.append([g["setting"], f"{g['cfg']:g}", ",".join(str(k) for k in seeds)] + cells)
    return lines


def stage_times(out_dir, runs):
    """Mean wall time per run of training, of one sample set and of one evaluation (seconds)."""
    train, sample, evaluate = [], [], []
    for run in runs:
        path = os.path.join(out_dir, run, "study_times.json")
        if os.path.exists(path):
            with open(path) as f:
                t = json.load(f)
            train += [t["train"]] if "train" in t else []
            sample += [v for k, v in t.items() if k.startswith("sample ")]
            evaluate += [v for k, v in t.items() if k.startswith("evaluate ")]
    return {k: (float(np.mean(v)) if v else float("nan"), float(np.sum(v)) if v else 0.0, len(v))
            for k, v in (("train", train), ("sample set", sample), ("evaluation", evaluate))}


RUN_FILES = ("config.json", "log.jsonl", "study_times.json")
SAMPLE_FILES = ("metrics.json", "sample_config.json")


def sync_run_files(args, runs, dest):
    """Copy the small files of each finished run (config, log, stage times, every sample set's
    metrics and settings, the grid of the fixed-scale set) from args.out_dir to dest/<run>/: the
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
        for folder in sorted(glob.glob(os.path.join(src, "samples", "*"))):
            if not os.path.exists(os.path.join(folder, "metrics.json")):
                continue
            to = os.path.join(dest, run, "samples", os.path.basename(folder))
            os.makedirs(to, exist_ok=True)
            for name in SAMPLE_FILES:
                shutil.copyfile(os.path.join(folder, name), os.path.join(to, name))
            with open(os.path.join(folder, "sample_config.json")) as f:
                sc = json.load(f)
            if sc.get("cfg_scale") == fixed_cfg and sc.get("seed", 0) == 0 and os.path.exists(os.path.join(folder, "grid.png")):
                shutil.copyfile(os.path.join(folder, "grid.png"), os.path.join(to, "grid.png"))


def write_study_report(args, grid_runs):
    """results/<dataset>/: runs/ (each run's small files, synced from args.out_dir), README.md
    (tables, checks, verdicts, grids, conclusion) and plots, all made from runs/."""
    res = args.results
    runs_dir = os.path.join(res, "runs")
    if os.path.isdir(args.out_dir):
        sync_run_files(args, grid_runs, runs_dir)
    rows = read_rows(runs_dir, set(grid_runs))
    if not rows:
        raise UsageError(f"nothing evaluated yet under {args.out_dir} (nor in {runs_dir}): run the grid first")
    names = metric_names(rows)
    fid = next((n for n in names if base_name(n) == "fid"), names[0])
    sampler = f"dpm-solver++-{args.sample_steps}"
    main_rows = [r for r in rows if r["sampler"] == sampler and r["sample_seed"] == 0]
    groups = sorted(aggregate(main_rows), key=lambda g: (setting_order(g["setting"]), g["cfg"]))
    quality = [n for n in names if base_name(n) in QUALITY]
    diversity = [n for n in names if n not in quality and not base_name(n).startswith("toppr")]
    best = best_scale_groups(groups, fid, sampler)
    fixed = [g for g in groups if g["cfg"] == args.fixed_cfg]
    settings = [g["setting"] for g in best]
    paired = [n for n in names if base_name(n) in ("fid", "kid", "accuracy", "memorization")]

    plot_eta([g for g in groups if g["cfg"] in (args.fixed_cfg,)], quality + diversity, os.path.join(res, "eta.png"),
             title=f"metric vs η at guidance {args.fixed_cfg:g} (mean ± std over seeds)")
    plot_eta(best, quality + diversity, os.path.join(res, "eta_best.png"), title="metric vs η at each setting's best guidance scale")
    plot_fid_is(groups, names, os.path.join(res, "fid_is.png"),
                settings={"clean", "CEP-U γ 1", "CEP-G γ 1", "IP λ 0.1", "η 2.5 %", "η 5 %", "η 20 %"})
    cep_settings = [s for s in ("clean", "CEP-U γ 1", "CEP-G γ 1", "IP λ 0.1", "CEP-U γ 0.3", "CEP-U γ 3") if s in settings]
    plot_bars(fixed, quality + diversity, os.path.join(res, "cep.png"), cep_settings)

    grid_lines = []
    for s in settings:  # one grid per setting: its first seed at the fixed scale
        r = min((r for r in main_rows if r["setting"] == s and r["cfg"] == args.fixed_cfg), key=lambda r: r["seed"], default=None)
        if r is not None and os.path.exists(os.path.join(r["folder"], "grid.png")):
            rel = os.path.relpath(os.path.join(r["folder"], "grid.png"), res)
            grid_lines.append(f"| {s} (seed {r['seed']}, cfg {args.fixed_cfg:g}) | ![{s}]({rel}) |")

    # checks on the reference run: sampling steps, and sampling noise against the seed-to-seed spread
    ref_rows = [r for r in rows if r["setting"] == "clean" and r["seed"] == 0 and r["cfg"] == args.fixed_cfg]
    steps_rows = sorted({r["sampler"] for r in ref_rows if r["sample_seed"] == 0})
    checks = []
    if len(steps_rows) > 1:
        checks.append(f"**Sampler steps** (clean, seed 0, guidance {args.fixed_cfg:g}, one sample set each):\n")
        checks.append(markdown_table(["sampler"] + quality, [[s] + [fmt(next(r for r in ref_rows if r["sampler"] == s and r["sample_seed"] == 0)["metrics"].get(m, np.nan)) for m in quality] for s in steps_rows]))
    noise_rows = [r for r in ref_rows if r["sampler"] == sampler]
    seed_group = next((g for g in fixed if g["setting"] == "clean"), None)
    if len(noise_rows) > 1 and seed_group is not None:
        lines = []
        for m in quality + diversity:
            vals = np.array([r["metrics"][m] for r in noise_rows if m in r["metrics"]])
            lines.append([m, fmt(vals.std(ddof=1)), len(vals), fmt(seed_group["std"].get(m, np.nan)), seed_group["n"]])
        checks.append(f"\n**Sampling noise against the seed-to-seed spread** (clean, guidance {args.fixed_cfg:g}, "
                      f"{noise_rows[0]['num_samples']} images per set): the std over sampling seeds of one model, and "
                      "the std over training seeds (one sample set each):\n")
        checks.append(markdown_table(["metric", "std over sampling seeds", "sets", "std over training seeds", "runs"], lines))

    floor = next((r["floor"] for r in rows if r["floor"]), {})
    times = stage_times(runs_dir, grid_runs)
    rc = rows[0]["rc"]
    recipe = describe_recipe(argparse.Namespace(**rc)) if "lr" in rc else ""
    seeds_done = {s: sorted({r["seed"] for r in rows if r["setting"] == s}) for s in settings}
    doc = [f"# {rc.get('dataset', '?')}: the η sweep and CEP at the scale of this machine\n",
           "Generated by `python study.py` from the small files of each run (config, log, evaluate.py's metrics.json, "
           "sample grid, stage times), copied from each run's folder under `--out-dir` to `runs/`; do not edit by hand: the conclusion is "
           "`conclusion.md`, which this page includes.\n",
           "## Setup\n",
           f"- Model {rc.get('model')} on {rc.get('dataset')}, every run the same: {recipe}.",
           "- Settings and seeds done: " + "; ".join(f"{s} ({len(v)})" for s, v in seeds_done.items()) + ".",
           f"- Sampling: DPM-Solver++ {args.sample_steps} steps, {main_rows[0]['num_samples']} images per set (class-balanced), "
           f"guidance scales {', '.join(f'{s:g}' for s in args.scales)}; the fixed-scale table uses {args.fixed_cfg:g}.",
           ("- Metrics: evaluate.py on the offline Fashion-MNIST classifier's features (suffix _fmnist; not comparable with "
            "Inception numbers), against the test split (FID, KID, IS, precision / recall, density / coverage, TopP&R, accuracy) "
            "and the training set (RMD, top-5 L2, memorisation, within-class distance)." if fid.endswith("_fmnist") else
            f"- Metrics: evaluate.py ({', '.join(names)}), evaluate-args `{args.eval_args}`."),
           "- Wall time on this machine (mean per run / total): " + "; ".join(
               f"{k} {v[0] / 60:.1f} min / {v[1] / 3600:.2f} h ({v[2]})" for k, v in times.items()) + ".",
           ]
    classifiers = {}  # the feature classifier each run was scored with, by its test accuracy
    for r in rows:
        if r["classifier_accuracy"] is not None:
            classifiers.setdefault(r["classifier_accuracy"], set()).add(r["run"])
    if len(classifiers) > 1:
        doc.append("- **Runs scored with different feature classifiers** (by test accuracy; a retrained classifier differs "
                   "between machines): " + "; ".join(f"{acc:.4f}: {len(runs)} runs ({', '.join(sorted(runs))})"
                                                     for acc, runs in sorted(classifiers.items())) + ".")
    if floor:
        doc.append("- Floor (real training images against the test split, as many as the samples): "
                   + ", ".join(f"{k} {fmt(v)}" for k, v in floor.items()) + ".")
    doc += ["\n## At each setting's best guidance scale (lowest mean FID)\n",
            group_table(best, quality, lead=("setting", "cfg")), "\n", group_table(best, diversity, lead=("setting", "cfg")),
            f"\n## At the fixed guidance scale {args.fixed_cfg:g}\n",
            group_table(fixed, quality, lead=("setting", "cfg")), "\n", group_table(fixed, diversity, lead=("setting", "cfg")),
            "\n## Against clean training\n",
            "Δ = setting mean − clean mean at each one's best scale; s = √((s_a² + s_b²)/2), the pooled seed-to-seed std. "
            "**better** / worse: |Δ| > s on the metric's better / worse side; ≈: within the spread; ↑ / ↓: a difference on a "
            "metric with no better side.\n",
            markdown_table(["setting", "cfg"] + quality, verdicts(best, quality)), "\n",
            markdown_table(["setting", "cfg"] + diversity, verdicts(best, diversity)),
            "\nPaired by seed (seed k of every setting starts from the same weights and sees the same data order): "
            "Δ_k = setting − clean on seed k, each at its best scale; then the mean ± std of the Δ_k, and on how many seeds "
            "the setting is on the better side; with 3 seeds or more, p of the paired t-test (two-sided; 2 degrees of freedom "
            "with 3 seeds, so only a large, consistent Δ gets a small p).\n",
            markdown_table(["setting", "cfg", "seeds"] + paired, paired_deltas(main_rows, best, paired)),
            "\n## Checks\n", *checks,
            "\n## Plots\n",
            f"![metric vs η](eta.png)\n\n![metric vs η, best scale](eta_best.png)\n\n![FID vs IS](fid_is.png)\n\n"
            f"![clean, CEP, IP at guidance {args.fixed_cfg:g}](cep.png)\n",
            "\n## Sample grids (one class per column)\n", "| setting | samples |", "|---|---|", *grid_lines]
    conclusion = os.path.join(res, "conclusion.md")
    if os.path.exists(conclusion):
        with open(conclusion, encoding="utf-8") as f:
            doc += ["\n## Conclusion\n", f.read()]
    doc += ["\n## Regenerate\n", "```bash", "python study.py" + (f" --only '{args.only}'" if args.only else "")
            + "      # trains, samples and evaluates what is missing, then writes this page",
            "python study.py --report-only   # this page from the files on disk", "```"]
    atomic_write_text(os.path.join(res, "README.md"), "\n".join(doc) + "\n")
    print(f"-> {os.path.join(res, 'README.md')} ({len(rows)} sample sets of {len({r['run'] for r in rows})} runs)")


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
        write_study_report(args, [r[0] for r in grid_runs(argparse.Namespace(**{**vars(args), "only": None}))])


if __name__ == "__main__":
    run_main(main)
