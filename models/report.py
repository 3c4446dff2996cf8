"""Tables and plots over evaluated sample sets: evaluate.py --compare and study.py's report.

A row is one metrics.json (<out-dir>/<run>/samples/<tag>/metrics.json). Rows of runs that differ only
in their seed form one *setting* (what was trained: η, corruption type, CEP, IP, model, steps), and a
table cell is the mean ± sample standard deviation (ddof 1) over the seeds of the setting."""
import glob
import json
import os

import numpy as np

from models.build import with_legacy_defaults
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
    if rc.get("method") == "lcm":  # finetune.py --method lcm: its sampler column holds the step count (lcm-4)
        return "LCM " + (" + ".join(parts) or "clean")
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
        rc = with_legacy_defaults(rc) if rc else rc
        rows.append({"run": run, "tag": tag, "setting": setting_label(rc), "seed": rc.get("seed"), "eta": rc.get("corrupt", 0.0),
                     "corrupt_type": rc.get("corrupt_type") or "symmetric", "model": rc.get("model", "?"), "step": sc.get("step"),
                     "sampler": f"{sc.get('sampler', '?')}-{sc.get('steps', '?')}", "cfg": sc.get("cfg_scale") or 1.0,
                     "num_samples": m.get("num_samples"), "sample_seed": sc.get("seed", 0),
                     "sampler_options": " ".join(o for o, on in (("clipped", sc.get("clip_denoised")), ("raw weights", sc.get("ema") is False),
                                                                 (f"ddim-eta {sc.get('ddim_eta')}", sc.get("ddim_eta"))) if on), "metrics": m["metrics"],
                     "floor": m.get("floor", {}), "folder": os.path.dirname(path), "rc": rc,
                     "classifier_accuracy": m.get("classifier_test_accuracy")})
        rows[-1]["train_min"], rows[-1]["train_img_s"] = training_time(os.path.join(out_dir, run))
    distinguish_settings(rows)
    return rows


# run flags that do not change what is trained (or are shown in their own column)
NOT_A_SETTING = {"seed", "out_dir", "run", "resume", "dry_run", "max_steps", "ckpt_every", "log_every", "compile", "device",
                 "num_workers", "data_path", "model", "grad_checkpoint"}


def distinguish_settings(rows):
    """Rows of runs trained differently (another lr, say) but with the same label get the flags
    that differ appended, e.g. 'clean [lr=0.002]', so seeds are averaged only within one setting.
    A flag absent from a run's config (the run predates it) or null there (chosen at run time and
    not recorded) differs from nothing."""
    configs = {}
    for r in rows:
        key = json.dumps({k: v for k, v in r["rc"].items() if k not in NOT_A_SETTING}, sort_keys=True)
        configs.setdefault(r["setting"], {})[key] = json.loads(key)
    for label, variants in configs.items():
        if len(variants) < 2:
            continue
        keys = sorted(set().union(*variants.values()))
        differing = [k for k in keys if len({json.dumps(c[k]) for c in variants.values() if c.get(k) is not None}) > 1]
        if not differing:
            continue
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
    """clean first, then the symmetric η sweep by η, then the rest (CEP, IP) alphabetically, then
    the asymmetric settings by η ('η 5 % asym' before 'η 10 % asym')."""
    base = label.split(" [")[0]
    if base == "clean":
        return (0, 0.0, label)
    if base.startswith("η ") and base.endswith("%"):
        return (1, float(base.split()[1]), label)
    if base.startswith("η ") and base.endswith("% asym"):
        return (3, float(base.split()[1]), label)
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
