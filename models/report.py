"""Rows and tables over evaluated sample sets: evaluate.py --compare, and the rows study.py's report
(models/study_report.py) reads.

A row is one metrics.json (<out-dir>/<run>/samples/<tag>/metrics.json). Rows of runs that differ only
in their seed form one *setting* (what was trained: η, corruption type, CEP, IP, model, steps), and a
table cell is the mean ± sample standard deviation (ddof 1) over the seeds of the setting."""
import glob
import json
import os

import numpy as np

from models.build import with_legacy_defaults
from models.common import UsageError, atomic_write_text

# metric -> +1 higher is better, -1 lower is better (the feature-space suffixes _fmnist / _clip / _ae / _dinov2 are ignored);
# the diversity metrics (RMD, top-5 L2, within-class distance) have no better side, only a difference
DIRECTION = {"fid": -1, "fd": -1, "sfid": -1, "kid": -1, "memorization": -1, "is": 1, "precision": 1, "recall": 1, "density": 1,
             "coverage": 1, "toppr_precision": 1, "toppr_recall": 1, "toppr_f1": 1, "accuracy": 1, "clip_score": 1}
TOPPR_VERSION = 2  # evaluate.py's metrics.json says which TopP&R estimator scored it (2: the authors')
QUALITY = ("fid", "kid", "is", "precision", "recall", "density", "coverage", "accuracy", "toppr_f1")


def base_name(metric):
    for suffix in ("_fmnist", "_clip", "_ae", "_dinov2"):
        if metric.endswith(suffix):
            return metric[: -len(suffix)]
    return metric


def main_metric(names, base):
    """The metric `base` (fid, recall, ...) in the main feature space: the first one not of the
    label-free autoencoder (_ae), which is reported beside it."""
    names = [n for n in names if base_name(n) == base]
    return next((n for n in names if not n.endswith("_ae")), names[0] if names else None)


def direction(metric):
    return DIRECTION.get(base_name(metric), 0)


def setting_label(rc):
    """What a run trained with, seed aside: 'clean', 'η 5 %', 'η 5 % asym', 'CEP-U γ 1', 'IP λ 0.1', joined by ' + ';
    a released model's (sample.py --pretrained) is 'pretrained <id>: ' and what its release says, or 'setting unknown'."""
    if rc.get("pretrained"):
        name = os.path.basename(os.path.normpath(rc["pretrained"]))
        known = rc.get("release_setting") not in (None, "unknown")  # sets sampled before releases were read: unknown
        return f"pretrained {name}: " + (setting_label({k: v for k, v in rc.items() if k != "pretrained"}) if known else "setting unknown")
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


def read_log(path):
    """The records of a train.py log.jsonl."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def training_time(run_dir):
    """(minutes of training, median img/s) from a run's log.jsonl: Σ Δsteps · batch / (img/s) over
    the log records, so time spent outside the steps (start-up, checkpoints, resumes) is left out."""
    path, cfg_path = os.path.join(run_dir, "log.jsonl"), os.path.join(run_dir, "config.json")
    if not (os.path.exists(path) and os.path.exists(cfg_path)):
        return float("nan"), float("nan")
    with open(cfg_path) as f:
        batch = json.load(f).get("global_batch_size", float("nan"))
    records = read_log(path)
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
        # TopP&R of sets scored before it matched its authors' estimator (top-pr) is not a measurement
        stale = m.get("toppr_version", 1) < TOPPR_VERSION and any(k.startswith("toppr_") for k in m["metrics"])
        if stale:
            m["metrics"] = {k: v for k, v in m["metrics"].items() if not k.startswith("toppr_")}
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
                     "classifier_accuracy": m.get("classifier_test_accuracy"), "toppr_stale": stale})
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
    from models import plots  # plots.py builds on this module
    rows = read_rows(out_dir)
    if not rows:
        raise UsageError(f"no evaluated samples (metrics.json) under {out_dir}/*/samples/")
    groups = sorted(aggregate(rows), key=lambda g: (setting_order(g["setting"]), g["model"], g["sampler"], g["cfg"], g["sample_seed"]))
    names = metric_names(rows)
    table = group_table(groups, names, lead=("setting", "model", "step", "train_min", "train_img_s", "sampler", "sampler_options", "cfg",
                                             "num_samples"))
    atomic_write_text(os.path.join(out_dir, "comparison.md"), table)
    print(table, end="")
    plots.plot_eta(groups, names, os.path.join(out_dir, "comparison_eta.png"))
    plots.plot_fid_is(groups, names, os.path.join(out_dir, "comparison_fid_is.png"))
    print(f"-> {os.path.join(out_dir, 'comparison.md')}, comparison_eta.png, comparison_fid_is.png")


def keep_other_space(path, out):
    """A folder scored in another feature space before (e.g. --features inception, then dinov2) keeps
    those scores: metric names differ per space (fid, fd_dinov2, ..._dinov2), the new ones win."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        previous = json.load(f)
    if previous.get("features") not in (None, out["features"]):
        out["metrics"] = {**{k: v for k, v in previous.get("metrics", {}).items() if k not in out["metrics"]}, **out["metrics"]}
        out["other_features"] = sorted({previous["features"], *previous.get("other_features", [])} - {out["features"]})
