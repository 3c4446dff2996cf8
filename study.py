"""
The paper's central experiment in one command: pre-train every setting of a grid (the η sweep,
CEP-U / CEP-G, input perturbation, the γ ablation, asymmetric corruption) over seeds, sample each
run over a guidance sweep, evaluate every sample set, then write the tables, plots and sample grids
(models/study_report.py), every setting read against clean training paired by seed.

    python study.py                                  # the 1,000-step Fashion-MNIST grid: runs in out/study, report in results/fashion-mnist
    python study.py --grid converged                 # the converged grid (10,000 steps): out/converged, results/fashion-mnist/converged
    python study.py --grid converged --only clean_seed1   # one setting and seed (comma-separated shell patterns)
    python study.py --grid converged --only eta15_seed5 --rerun reproduction   # a run again, beside the committed one
    python study.py --list                           # the grid, and what is done
    python study.py --report-only                    # tables and plots from the files on disk
    python study.py --dataset imagefolder --data-path /data/imagenet/train --image-size 256 \\
        --model DiT-XL/2 --vae stabilityai/sd-vae-ft-ema --groups cifar100_groups.txt \\
        --nproc-per-node 8 --eval-args "--ref VIRTUAL_imagenet256_labeled.npz --features inception"   # the paper's grid

It only runs train.py, sample.py and evaluate.py, as a user would, so every run of the study is an
ordinary run; the converged grid runs those of the commit its protocol pinned, from a git worktree
(.pinned/<commit>), so no later change of the repo enters its pairs. Resumable: a finished run,
sample set or metrics file is skipped, and an interrupted run continues with train.py --resume.
Only the one factor of a setting changes between settings: steps, batch and recipe are the same for all, and seed k of every setting starts from the same
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

import torch

from models.common import UsageError, atomic_write_json, run_main
from models.pinned import pinned_worktree, record_provenance
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
CONTROL = {"eta15": "η 15 %"}  # a grid's positive controls and their labels: each its own test, outside the primary family

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
# training. Seed by seed, so every finished seed is a complete set of pairs. Its seeds 0-2 ran first
# (the protocol); its amendment (amendment.md, fixed before any of its runs) adds seeds 3-7 of the
# core settings and η 15 % on seeds 0-7 as a positive control, sampled only where the analysis reads
# them (`extension`). Every run executes the code that made seeds 0-2, the commit `pinned`.
CONVERGED_SEEDS = 8
CONVERGED = dict(runs=[(name, CONVERGED_SEEDS) for name in ("clean", "eta2.5", "eta5", "cep-u", "cep-g")], control=["eta15"],
                 max_steps=10000, num_samples=1000, sample_steps=20, cfg_scales="1,1.5,2", fixed_cfg=1.5, sample_batch_size=64,
                 curve_scales="1.5,2,3", out_dir="out/converged", results="results/{dataset}/converged", seed_major=True,
                 pinned="5f44ce3cc1a9eef0047e1e94152e32022fe48b9c", scale="fixed",
                 extension=dict(first_seed=3))
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
    a("--no-report", action="store_true", help="run the grid and copy the runs' small files to <results>; write no report")
    a("--code", default="pinned", choices=("pinned", "checkout"), help="pinned: the scripts of the commit a grid's protocol pinned "
      "(converged: 5f44ce3, from a git worktree); checkout: this checkout's (its runs do not pair with the committed ones)")
    a("--rerun", default=None, metavar="NAME", help="do the --only runs again in <out-dir>_NAME, their small files to <results>/NAME/ "
      "beside the committed runs (e.g. 'reproduction' from a fresh clone, 'machine' on another CPU)")
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
    args.scale = grid.get("scale", "best")  # the report reads each setting's best guidance scale, or the fixed one
    if args.rerun is not None:
        if not args.rerun.isidentifier() or args.rerun == "runs":
            raise UsageError(f"--rerun takes a plain folder name other than 'runs' (letters, digits, _), got {args.rerun!r}")
        if not args.only:
            raise UsageError("--rerun needs --only: the runs to do again")
        args.out_dir = f"{args.out_dir.rstrip(os.sep)}_{args.rerun}"


def grid_runs(args, only=True):
    """[(run name, setting name, train.py flags, seed)] of the grid, filtered by --only (if `only`).
    Setting-major (every seed of clean, then of the next setting), or seed-major (seed 0 of every
    setting, then seed 1, ...) so that each finished seed completes a set of pairs."""
    grid = GRIDS[args.grid]

    def runs_of(settings):
        per_setting = [[(f"{name}_seed{seed}", name, SETTINGS[name], seed) for seed in range(args.seeds or seeds)] for name, seeds in settings]
        if grid.get("seed_major"):
            return [r for k in range(max(map(len, per_setting), default=0)) for runs in per_setting for r in runs[k:k + 1]]
        return [r for runs in per_setting for r in runs]
    # a positive control is one more setting of each seed
    runs = runs_of(grid["runs"] + [(name, grid["runs"][0][1]) for name in grid.get("control", [])])
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


def run_seed(run):
    """('eta5', 3) of 'eta5_seed3'."""
    name, seed = run.rsplit("_seed", 1)
    return name, int(seed)


def extension_run(args, run, rerun=True):
    """Is this run one of the converged grid's amendment (a seed from its first_seed on, a positive
    control, or any run done again with --rerun)? Those sample only the sets its analysis reads."""
    grid = GRIDS[args.grid]
    name, seed = run_seed(run)
    return "extension" in grid and (seed >= grid["extension"]["first_seed"] or name in grid.get("control", [])
                                    or (rerun and args.rerun is not None))


def sample_sets(args, run):
    """(tag, sample.py flags, training step) of every sample set of a run: the guidance sweep of the
    final weights, the learning curve's sweeps of the numbered checkpoints at 1/4 and 1/2 of the
    budget, and on the reference run's first seed two checks: the fixed scale at 50 steps, and two
    more sampling seeds (the sampling noise that the seed-to-seed spread is read against). A run of
    the converged grid's amendment has the fixed scale only (final weights and learning curve), and
    on the reference the two more sampling seeds (the offset of sampling seed 0)."""
    base = ["--sampler", "dpm-solver++", "--num-samples", str(args.num_samples)]
    base += ["--batch-size", str(args.sample_batch_size)] if args.sample_batch_size else []
    steps = ["--steps", str(args.sample_steps)]
    base = ["--run-dir", os.path.join(args.out_dir, run)] + base
    extension = extension_run(args, run)
    scales, curve = ([args.fixed_cfg], [args.fixed_cfg] if args.curve else []) if extension else (args.scales, args.curve)
    sets = [(f"dpm{args.sample_steps}_cfg{s:g}", base + steps + ["--cfg-scale", f"{s:g}"], args.max_steps) for s in scales]
    for step in curve_steps(args):  # a numbered checkpoint instead of the run's last
        ckpt = ["--ckpt", os.path.join(args.out_dir, run, "ckpt", f"{step:07d}.pt")] + base[2:]
        sets += [(f"step{step}_dpm{args.sample_steps}_cfg{s:g}", ckpt + steps + ["--cfg-scale", f"{s:g}"], step) for s in curve]
    fixed = ["--cfg-scale", f"{args.fixed_cfg:g}"]
    if run == f"{REFERENCE}_seed0" and not extension and args.sample_steps != 50:
        sets.append((f"dpm50_cfg{args.fixed_cfg:g}", base + ["--steps", "50"] + fixed, args.max_steps))
    if run_seed(run)[0] == REFERENCE and (extension or run_seed(run)[1] == 0):
        sets += [(f"dpm{args.sample_steps}_cfg{args.fixed_cfg:g}_seed{s}", base + steps + ["--seed", str(s)] + fixed, args.max_steps)
                 for s in (1, 2)]
    return sets


def launch(script, flags, nproc):
    if nproc == 1:
        return [sys.executable, script, *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *flags]


def call(cmd, what, cwd=None, env=None):
    """Run one stage (in the folder `cwd`, if given); a failure stops the study with one line naming the command."""
    print("$ " + (f"(cd {shlex.quote(cwd)} && {shlex.join(cmd)})" if cwd else shlex.join(cmd)), flush=True)
    if subprocess.call(cmd, cwd=cwd, env=env) != 0:
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


def state(args, run, committed=True):
    """'done', 'partial' or 'todo' of a run in args.out_dir, and the number of sample sets evaluated;
    'committed' where the run is not complete there but its small files in the report's runs/ hold
    every set (a run of the grid made on another machine: study.py does not do it again, --rerun does)."""
    sets = sample_sets(args, run)

    def scored(run_dir):
        return sum(os.path.exists(os.path.join(run_dir, "samples", tag, "metrics.json")) for tag, _, _ in sets)
    run_dir = os.path.join(args.out_dir, run)
    here = scored(run_dir)
    if here == len(sets):
        return "done", here, len(sets)
    if committed and args.rerun is None and scored(os.path.join(args.results, "runs", run)) == len(sets):
        return "committed", len(sets), len(sets)
    return ("partial" if os.path.exists(os.path.join(run_dir, "config.json")) else "todo"), here, len(sets)


def train_flags(args, run, flags, seed):
    common = ["--dataset", args.dataset, "--model", args.model, "--out-dir", args.out_dir, "--run-name", run, "--seed", str(seed)]
    common += ["--max-steps", str(args.max_steps)] + (["--ckpt-every", str(args.max_steps // 4)] if args.curve else [])
    for flag, value in (("--data-path", args.data_path), ("--image-size", args.image_size), ("--vae", args.vae)):
        if value is not None:
            common += [flag, str(value)]
    if args.groups and "asymmetric" in flags:
        common += ["--groups", args.groups]
    return common + flags + shlex.split(args.train_args)


def pinned_command(args, run, name, seed):
    """The pinned commit's study.py command that does one run (train.py, then its sample sets) with
    the sizes and sample sets this study.py gives it."""
    grid = GRIDS[args.grid]
    extension = extension_run(args, run)
    scales = [args.fixed_cfg] if extension else args.scales
    curve = ([args.fixed_cfg] if args.curve else []) if extension else args.curve
    # the pinned converged grid holds the core settings only; its short grid holds every setting, and
    # with the same sizes passed here it trains and samples a run the same way
    cmd = [sys.executable, "study.py", "--grid", "converged" if name in dict(grid["runs"]) else "short", "--seeds", str(seed + 1),
           "--only", run, "--out-dir", args.out_dir, "--no-report", "--dataset", args.dataset, "--model", args.model,
           "--max-steps", str(args.max_steps), "--nproc-per-node", str(args.nproc_per_node), "--num-samples", str(args.num_samples),
           "--sample-steps", str(args.sample_steps), "--cfg-scales", ",".join(f"{s:g}" for s in scales), "--fixed-cfg", f"{args.fixed_cfg:g}",
           "--curve-scales", ",".join(f"{s:g}" for s in curve) or "none"]
    cmd += ["--sample-batch-size", str(args.sample_batch_size)] if args.sample_batch_size else []
    for flag, value in (("--data-path", args.data_path), ("--train-args", args.train_args), ("--sample-args", args.sample_args),
                        ("--eval-args", args.eval_args)):
        cmd += [flag, value] if value else []
    return cmd


def do_pinned_run(args, run, name, seed):
    """One run of a grid whose code is pinned: the pinned commit's study.py does the run in its git
    worktree (pinned_command); then the sets it does not know (the amendment's extra sampling seeds)
    from the same worktree's sample.py and evaluate.py. Paths are absolute, the feature cache is the
    worktree's own."""
    commit = GRIDS[args.grid]["pinned"]
    path = pinned_worktree(commit, os.path.dirname(os.path.abspath(__file__)))
    args = argparse.Namespace(**{**vars(args), "out_dir": os.path.abspath(args.out_dir)})
    env = {**os.environ, "SLIGHT_CORRUPTION_CACHE": os.path.join(path, ".cache")}
    run_dir = os.path.join(args.out_dir, run)

    def provenance(what):
        record_provenance(args.out_dir, run, commit, what, trained_steps(run_dir))
    provenance("study.py --only " + run)
    call(pinned_command(args, run, name, seed), f"{run} (pinned code {commit[:7]})", cwd=path, env=env)
    for tag, flags_s, step in sample_sets(args, run):
        sample_and_evaluate(args, run, tag, flags_s, step, cwd=path, env=env, before_sampling=lambda: provenance(f"sample.py --tag {tag}"))


def sample_and_evaluate(args, run, tag, flags, step, cwd=None, env=None, before_sampling=None):
    """One sample set of a run: sample.py unless its samples.npz is there, then evaluate.py unless its
    metrics.json is; each stage's wall time into study_times.json. A folder of another step is refused."""
    run_dir = os.path.join(args.out_dir, run)
    folder = os.path.join(run_dir, "samples", tag)
    if os.path.exists(os.path.join(folder, "sample_config.json")):
        with open(os.path.join(folder, "sample_config.json")) as f:
            sampled_at = json.load(f).get("step")
        if sampled_at != step:
            raise UsageError(f"{folder} holds samples of step {sampled_at}, not of step {step} (the run is now trained to "
                             f"{args.max_steps}): move that folder away (or pass the --max-steps it was made with)")
    if not os.path.exists(os.path.join(folder, "samples.npz")):
        if before_sampling:
            before_sampling()
        t0 = time.time()
        call(launch("sample.py", ["--tag", tag, *flags, *shlex.split(args.sample_args)], args.nproc_per_node),
             f"sampling {run}/{tag}", cwd=cwd, env=env)
        add_time(run_dir, f"sample {tag}", time.time() - t0)
    if not os.path.exists(os.path.join(folder, "metrics.json")):
        t0 = time.time()
        call([sys.executable, "evaluate.py", "--samples", folder, *shlex.split(args.eval_args)], f"evaluating {run}/{tag}", cwd=cwd, env=env)
        add_time(run_dir, f"evaluate {tag}", time.time() - t0)


def do_run(args, run, flags, seed):
    if GRIDS[args.grid].get("pinned") and args.code == "pinned":
        return do_pinned_run(args, run, run_seed(run)[0], seed)
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
        sample_and_evaluate(args, run, tag, flags_s, step)


RUN_FILES = ("config.json", "log.jsonl", "study_times.json", "provenance.json")
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
        if state(args, run, committed=False)[0] != "done":  # only a run complete in out_dir replaces its copy
            continue
        if os.path.isdir(os.path.join(dest, run, "samples")):
            shutil.rmtree(os.path.join(dest, run, "samples"))
        for name in RUN_FILES:
            path = os.path.join(src, name) if name != "provenance.json" else os.path.join(out_dir, f"{run}.provenance.json")
            if os.path.exists(path):
                os.makedirs(os.path.join(dest, run), exist_ok=True)
                shutil.copyfile(path, os.path.join(dest, run, name))
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


def plan(args):
    """--plan (models/study_plan.py) on the grid's runs under --out-dir."""
    from models.study_plan import plan as print_plan
    print_plan(args.out_dir, [r[0] for r in grid_runs(args, only=False)], REFERENCE, PRIMARY, f"dpm-solver++-{args.sample_steps}",
               args.max_steps, args.fixed_cfg, os.path.join(SHORT["results"].format(dataset=args.dataset), "runs"),
               f"dpm-solver++-{SHORT['sample_steps']}", len(GRIDS[args.grid]["runs"]), args.hours, args.seeds or GRIDS[args.grid]["runs"][0][1])


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
            if state(args, run)[0] not in ("done", "committed"):
                print(f"== [{k + 1}/{len(runs)}] {run}", flush=True)
                do_run(args, run, flags, seed)
    every_run = [r[0] for r in grid_runs(args, only=False)]
    if os.path.isdir(args.out_dir):  # the report reads the runs' small files, copied next to it
        sync_run_files(args, every_run, os.path.join(args.results, args.rerun or "runs"))
    if not args.no_report:
        grid = GRIDS[args.grid]  # an amendment's runs: the grid's own, whatever --rerun is doing
        amendment = ({"runs": {r for r in every_run if extension_run(args, r, rerun=False)}, "first_seed": grid["extension"]["first_seed"]}
                     if "extension" in grid else None)
        write_study_report(args, every_run, REFERENCE, PRIMARY, [CONTROL[n] for n in grid.get("control", [])], amendment)


if __name__ == "__main__":
    run_main(main)
