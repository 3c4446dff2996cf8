"""Tables and plots over evaluated sample sets: evaluate.py --compare and study.py's report.

A row is one metrics.json (<out-dir>/<run>/samples/<tag>/metrics.json). Rows of runs that differ only
in their seed form one *setting* (what was trained: η, corruption type, CEP, IP, model, steps), and a
table cell is the mean ± sample standard deviation (ddof 1) over the seeds of the setting."""
import argparse
import glob
import json
import os
import shutil

import numpy as np

from models.build import describe_recipe
from models.common import UsageError, atomic_write_text

# metric -> +1 higher is better, -1 lower is better (the suffixes _fmnist / _clip are ignored);
# the diversity metrics (RMD, top-5 L2, within-class distance) have no better side, only a difference
DIRECTION = {"fid": -1, "sfid": -1, "kid": -1, "memorization": -1, "is": 1, "precision": 1, "recall": 1, "density": 1,
             "coverage": 1, "toppr_precision": 1, "toppr_recall": 1, "toppr_f1": 1, "accuracy": 1, "clip_score": 1}
QUALITY = ("fid", "kid", "is", "precision", "recall", "density", "coverage", "accuracy", "toppr_f1")


def base_name(metric):
    for suffix in ("_fmnist", "_clip"):
        if metric.endswith(suffix):
            return metric[: -len(suffix)]
    return metric


def direction(metric):
    return DIRECTION.get(base_name(metric), 0)


def setting_label(rc):
    """What a run trained with, seed aside: 'clean', 'η 5 %', 'η 5 % asym', 'CEP-U γ 1', 'IP λ 0.1', joined by ' + '."""
    parts = []
    if rc.get("corrupt"):
        kind = rc.get("corrupt_type") or "symmetric"
        parts.append(f"η {100 * rc['corrupt']:g} %" + ("" if kind in ("symmetric", "swap") else f" {kind[:4]}")
                     + (" resampled" if rc.get("corrupt_resample") else ""))
    if rc.get("cep"):
        parts.append(f"CEP-{'G' if rc.get('cep_type') == 'gaussian' else 'U'} γ {rc.get('cep_gamma', 1.0):g}"
                     + (" fixed" if rc.get("cep_fixed") else ""))
    if rc.get("input_perturbation"):
        parts.append(f"IP λ {rc['input_perturbation']:g}")
    return " + ".join(parts) or "clean"


def training_time(run_dir):
    """(minutes of training, median img/s) from a run's log.jsonl: Σ Δsteps · batch / (img/s) over
    the log records, so time spent outside the steps (start-up, checkpoints, resumes) is left out."""
    path, cfg_path = os.path.join(run_dir, "log.jsonl"), os.path.join(run_dir, "config.json")
    if not (os.path.exists(path) and os.path.exists(cfg_path)):
        return float("nan"), float("nan")
    with open(cfg_path) as f:
        batch = json.load(f).get("global_batch_size", float("nan"))
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    seconds, last = 0.0, 0
    for r in records:
        seconds += (r["step"] - last) * batch / r["img_per_s"]
        last = r["step"]
    return seconds / 60, float(np.median([r["img_per_s"] for r in records])) if records else float("nan")


def read_rows(out_dir, runs=None):
    """One dict per evaluated sample set under out_dir (only the runs named in `runs`, if given)."""
    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, "*", "samples", "*", "metrics.json"))):
        run, tag = path.split(os.sep)[-4], path.split(os.sep)[-2]
        if runs is not None and run not in runs:
            continue
        with open(path) as f:
            m = json.load(f)
        sc = m.get("sample_config") or {}
        rc = sc.get("run_config", {})
        rows.append({"run": run, "tag": tag, "setting": setting_label(rc), "seed": rc.get("seed"), "eta": rc.get("corrupt", 0.0),
                     "corrupt_type": rc.get("corrupt_type") or "symmetric", "model": rc.get("model", "?"), "step": sc.get("step"),
                     "sampler": f"{sc.get('sampler', '?')}-{sc.get('steps', '?')}", "cfg": sc.get("cfg_scale") or 1.0,
                     "num_samples": m.get("num_samples"), "sample_seed": sc.get("seed", 0),
                     "sampler_options": " ".join(o for o, on in (("clipped", sc.get("clip_denoised")), ("raw weights", sc.get("ema") is False),
                                                                 (f"ddim-eta {sc.get('ddim_eta')}", sc.get("ddim_eta"))) if on), "metrics": m["metrics"],
                     "floor": m.get("floor", {}), "folder": os.path.dirname(path), "rc": rc,
                     "train_min": training_time(os.path.join(out_dir, run))[0], "train_img_s": training_time(os.path.join(out_dir, run))[1]})
    distinguish_settings(rows)
    return rows


# run flags that do not change what is trained (or are shown in their own column)
NOT_A_SETTING = {"seed", "out_dir", "run", "resume", "dry_run", "max_steps", "ckpt_every", "log_every", "compile", "device",
                 "num_workers", "data_path", "model"}


def distinguish_settings(rows):
    """Rows of runs trained differently (another lr, say) but with the same label get the flags
    that differ appended, e.g. 'clean [lr=0.002]', so seeds are averaged only within one setting."""
    configs = {}
    for r in rows:
        r["config_key"] = json.dumps({k: v for k, v in r["rc"].items() if k not in NOT_A_SETTING}, sort_keys=True)
        configs.setdefault(r["setting"], {})[r["config_key"]] = json.loads(r["config_key"])
    for label, variants in configs.items():
        if len(variants) < 2:
            continue
        keys = sorted(set().union(*variants.values()))
        differing = [k for k in keys if len({json.dumps(c.get(k)) for c in variants.values()}) > 1]
        for r in rows:
            if r["setting"] == label:
                r["setting"] = label + " [" + ", ".join(f"{k}={r['rc'].get(k)}" for k in differing) + "]"


def metric_names(rows):
    return list(dict.fromkeys(k for r in rows for k in r["metrics"] if not k.startswith("is_std")))


def aggregate(rows, keys=("setting", "model", "step", "sampler", "sampler_options", "cfg", "num_samples", "sample_seed")):
    """Groups of rows equal on `keys` (by default: the same setting and sample set, over training
    seeds): [{key: value, 'n', 'seeds', 'rows', 'mean': {metric}, 'std': {metric}}]."""
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, members in groups.items():
        g = dict(zip(keys, key), n=len(members), seeds=sorted(m["seed"] for m in members if m["seed"] is not None), rows=members,
                 mean={}, std={}, train_min=float(np.mean([m["train_min"] for m in members])),
                 train_img_s=float(np.mean([m["train_img_s"] for m in members])))
        for name in metric_names(members):
            vals = np.array([m["metrics"][name] for m in members if name in m["metrics"]], dtype=np.float64)
            g["mean"][name] = float(vals.mean())
            g["std"][name] = float(vals.std(ddof=1)) if len(vals) > 1 else float("nan")
        out.append(g)
    return out


def fmt(mean, std=float("nan")):
    def num(v):
        return "nan" if not np.isfinite(v) else f"{v:.3g}" if abs(v) >= 1 else f"{v:.3f}"
    return num(mean) + (f" ± {num(std)}" if np.isfinite(std) else "")


def markdown_table(header, lines):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]) + "\n"


LEAD_NAMES = {"train_min": "train min", "train_img_s": "train img/s"}  # numbers, formatted as such


def group_table(groups, names, lead=("setting", "model", "step", "sampler", "cfg")):
    """Markdown: one line per group, the lead columns, n and seeds, then mean ± std per metric."""
    header = [LEAD_NAMES.get(k, k) for k in lead] + ["n", "seeds"] + names
    lines = [[fmt(g[k]) if k in LEAD_NAMES else f"{g[k]:g}" if isinstance(g[k], float) else str(g[k]) for k in lead]
             + [g["n"], ",".join(map(str, g["seeds"]))]
             + [fmt(g["mean"].get(m, float("nan")), g["std"].get(m, float("nan"))) for m in names] for g in groups]
    return markdown_table(header, lines)


def setting_order(label):
    """clean first, then the symmetric η sweep by η, then the rest alphabetically."""
    base = label.split(" [")[0]
    if base == "clean":
        return (0, 0.0, label)
    if base.startswith("η ") and base.endswith("%"):
        return (1, float(base.split()[1]), label)
    return (2, 0.0, label)


# ---- evaluate.py --compare ----------------------------------------------------------------------

def compare(out_dir):
    """<out_dir>/comparison.md (settings over seeds: n, seeds, mean ± std) and the two plots."""
    rows = read_rows(out_dir)
    if not rows:
        raise UsageError(f"no evaluated samples (metrics.json) under {out_dir}/*/samples/")
    groups = sorted(aggregate(rows), key=lambda g: (setting_order(g["setting"]), g["model"], g["sampler"], g["cfg"], g["sample_seed"]))
    names = metric_names(rows)
    table = group_table(groups, names, lead=("setting", "model", "step", "train_min", "train_img_s", "sampler", "sampler_options", "cfg",
                                             "num_samples"))
    atomic_write_text(os.path.join(out_dir, "comparison.md"), table)
    print(table, end="")
    plot_eta(groups, names, os.path.join(out_dir, "comparison_eta.png"))
    plot_fid_is(groups, names, os.path.join(out_dir, "comparison_fid_is.png"))
    print(f"-> {os.path.join(out_dir, 'comparison.md')}, comparison_eta.png, comparison_fid_is.png")


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_eta(groups, names, path, title=None):
    """Each metric against the symmetric corruption ratio η (error bars: std over seeds), one
    line per (model, sampler, guidance scale); settings with CEP or IP are left out."""
    plt = _plt()
    sweep = [g for g in groups if g["setting"] == "clean" or (g["setting"].startswith("η ") and g["setting"].endswith("%"))]
    cols = min(4, len(names))
    nrows = -(-len(names) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    lines = sorted({(g["model"], g["sampler"], g["cfg"], g["sample_seed"]) for g in sweep})
    for ax, name in zip(axes.flat, names):
        for line in lines:
            pts = sorted((float(g["setting"].split()[1]) if g["setting"] != "clean" else 0.0, g["mean"][name], g["std"][name])
                         for g in sweep if (g["model"], g["sampler"], g["cfg"], g["sample_seed"]) == line and name in g["mean"])
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[0 if not np.isfinite(p[2]) else p[2] for p in pts],
                            marker="o", capsize=3, label=f"{line[0]} {line[1]} cfg {line[2]:g}")
        ax.set_xlabel("corruption η (%)")
        ax.set_title(name)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if lines:
        axes.flat[0].legend(fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_fid_is(groups, names, path, settings=None):
    """FID against IS over the guidance sweep, one curve per setting (mean over seeds; the
    paper's figures), annotated with the scales."""
    fid = next((n for n in names if base_name(n) == "fid"), None)
    is_ = next((n for n in names if base_name(n) == "is"), None)
    if not (fid and is_):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    curves = sorted({(g["setting"], g["model"], g["sampler"], g["sample_seed"]) for g in groups if settings is None or g["setting"] in settings},
                    key=lambda c: (setting_order(c[0]), c[1:]))
    for curve in curves:
        pts = sorted((g["cfg"], g["mean"][is_], g["mean"][fid], g["std"][is_], g["std"][fid]) for g in groups
                     if (g["setting"], g["model"], g["sampler"], g["sample_seed"]) == curve and fid in g["mean"] and is_ in g["mean"])
        if len({p[0] for p in pts}) < 2 and settings is not None:
            continue
        ax.errorbar([p[1] for p in pts], [p[2] for p in pts], xerr=[np.nan_to_num(p[3]) for p in pts],
                    yerr=[np.nan_to_num(p[4]) for p in pts], marker="o", capsize=2, label=" ".join(map(str, curve[:3])))
        for cfg, x, y, *_ in pts:
            ax.annotate(f"{cfg:g}", (x, y), fontsize=7)
    ax.set_xlabel(is_ + " (higher is better)")
    ax.set_ylabel(fid + " (lower is better)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_bars(groups, names, path, settings):
    """One panel per metric: a bar per setting (mean, error bar: std over seeds)."""
    plt = _plt()
    cols = min(4, len(names))
    nrows = -(-len(names) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    chosen = [next(g for g in groups if g["setting"] == s) for s in settings if any(g["setting"] == s for g in groups)]
    for ax, name in zip(axes.flat, names):
        means = [g["mean"].get(name, np.nan) for g in chosen]
        stds = [np.nan_to_num(g["std"].get(name, np.nan)) for g in chosen]
        ax.bar(range(len(chosen)), means, yerr=stds, capsize=3, color=[f"C{i}" for i in range(len(chosen))])
        ax.set_xticks(range(len(chosen)), [g["setting"] for g in chosen], rotation=40, ha="right", fontsize=7)
        ax.set_title(name)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- study.py's report ----------------------------------------------------------------------------

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


def sync_run_files(out_dir, runs, dest, fixed_cfg):
    """Copy the small files of each run (config, log, stage times, every sample set's metrics and
    settings, the grid of the fixed-scale set) from out_dir to dest/<run>/: the report is made
    from these, so it can be regenerated from the committed results without the checkpoints."""
    for run in runs:
        src = os.path.join(out_dir, run)
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
        sync_run_files(args.out_dir, grid_runs, runs_dir, args.fixed_cfg)
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
           f"Generated by `python study.py` from the small files of each run (config, log, evaluate.py's metrics.json, "
           f"sample grid, stage times), copied from `{args.out_dir}` to `runs/`; do not edit by hand: the conclusion is "
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
