"""study.py's report: every setting of the grid against the reference (clean training), paired by seed.

The rows and tables are models/report.py's; this file reads them the way the study's protocol says:
each setting's best guidance scale, the per-seed differences with their 95 % CI (Holm over the primary
FID comparisons), the power reached, one verdict per claim of the paper, the learning curve and the
checks (sampling noise, the fresh-clone reproduction)."""
import argparse
import json
import os

import numpy as np

from models.build import describe_recipe
from models.common import UsageError, atomic_write_text
from models.report import (QUALITY, aggregate, base_name, direction, fmt, group_table, main_metric, markdown_table, metric_names,
                           read_log, read_rows, setting_order, training_time)
from models.stats import best_scale_groups, detectable_effect, paired_comparisons, paired_power, pooled_sd

# the paper's directional claims, read on the study's comparisons: (claim, setting, metric, the side
# the paper reports: -1 lower, +1 higher). A claim whose setting is not in the grid is left out.
CLAIMS = [("slight corruption lowers FID", "η 2.5 %", "fid", -1), ("slight corruption lowers FID", "η 5 %", "fid", -1),
          ("slight corruption lowers FID", "η 7.5 %", "fid", -1), ("CEP-U lowers FID", "CEP-U γ 1", "fid", -1),
          ("CEP-G lowers FID", "CEP-G γ 1", "fid", -1), ("heavy corruption raises FID", "η 15 %", "fid", 1),
          ("heavy corruption raises FID", "η 20 %", "fid", 1), ("slight corruption raises IS", "η 2.5 %", "is", 1),
          ("slight corruption raises recall (diversity)", "η 2.5 %", "recall", 1),
          ("slight corruption raises recall (diversity)", "η 5 %", "recall", 1)]
PAIRED = ("fid", "precision", "recall", "toppr_f1", "accuracy", "memorization")  # the comparison tables' metrics (every feature space)


def significant(st, alpha=0.05):
    """The 95 % CI excludes 0 (and, in the Holm family, the adjusted p is below alpha)."""
    excludes = st["n"] >= 2 and (st["lo"] > 0 or st["hi"] < 0)
    return excludes and (st["holm"] is None or st["holm"] < alpha)


def verdict(st, metric):
    if st["n"] < 2:
        return "one seed"
    if not significant(st):
        return "≈ (not after Holm)" if st["lo"] > 0 or st["hi"] < 0 else "≈"
    d = direction(metric)
    return ("↑" if st["mean"] > 0 else "↓") if d == 0 else "**better**" if d * st["mean"] > 0 else "worse"


def delta_ci(st):
    """'+1.2 [−0.3, 2.7]': the mean per-seed difference and its 95 % CI."""
    return f"{st['mean']:+.3g}" + (f" [{fmt(st['lo'])}, {fmt(st['hi'])}]" if st["n"] >= 2 else "") if st["n"] else ""


def delta_cell(st, metric):
    return f"{delta_ci(st)} {verdict(st, metric)}" if st["n"] else ""


def claims_table(comparisons, names, power_of):
    """One verdict per claim of the paper: supported (the CI excludes 0 on the paper's side),
    contradicted (on the other side) or inconclusive, with the CI and the power it had."""
    lines = []
    for claim, setting, base, side in CLAIMS:
        c = next((c for c in comparisons if c["setting"] == setting), None)
        metric = main_metric(names, base)
        if c is None or metric is None or metric not in c["stats"]:
            continue
        st = c["stats"][metric]
        word = ("supported" if side * st["mean"] > 0 else "contradicted") if significant(st) else "inconclusive at this power"
        if not significant(st) and st["n"] >= 2 and (st["lo"] > 0 or st["hi"] < 0):
            on = "the paper's" if side * st["mean"] > 0 else "the other"
            word += f" (the CI excludes 0 on {on} side, but not after Holm)"
        lines.append([claim, setting, metric, len(c["seeds"]), delta_ci(st),
                      fmt(st["p"]) + (f" (Holm {fmt(st['holm'])})" if st["holm"] is not None else ""), power_of(metric, st), word])
    return markdown_table(["claim", "setting", "metric", "seeds", "Δ [95 % CI]", "p", "power for a 10 % change", "verdict"], lines)


def stage_times(runs_dir, runs):
    """Mean wall time per run of training, of one sample set and of one evaluation (seconds): (mean, total, count).
    Training's from the run's log (a run stopped and resumed by study.py only records its last piece
    in study_times.json), sampling and evaluation from study_times.json."""
    times = {"train": [], "sample set": [], "evaluation": []}
    for run in runs:
        minutes = training_time(os.path.join(runs_dir, run))[0]
        times["train"] += [] if np.isnan(minutes) else [60 * minutes]
        path = os.path.join(runs_dir, run, "study_times.json")
        if os.path.exists(path):
            with open(path) as f:
                t = json.load(f)
            times["sample set"] += [v for k, v in t.items() if k.startswith("sample ")]
            times["evaluation"] += [v for k, v in t.items() if k.startswith("evaluate ")]
    return {k: (float(np.mean(v)) if v else float("nan"), float(np.sum(v)), len(v)) for k, v in times.items()}


def reference_sets(rows, fixed_cfg, max_steps, reference):
    """The sample sets of the reference's seed 0 at the fixed scale and the full budget: every sampler
    and sampling seed, the sets that measure the noise of one model."""
    return [r for r in rows if r["setting"] == reference and r["seed"] == 0 and r["cfg"] == fixed_cfg and r["step"] == max_steps]


def sampling_checks(rows, groups, quality, fixed_cfg, max_steps, sampler, reference):
    """On the reference's seed 0 at the fixed scale: the metrics at 50 sampler steps, and the std over
    sampling seeds of one model against the std over training seeds. Markdown lines."""
    ref_rows = reference_sets(rows, fixed_cfg, max_steps, reference)
    samplers = sorted({r["sampler"] for r in ref_rows if r["sample_seed"] == 0})
    checks = []
    if len(samplers) > 1:
        checks += [f"**Sampler steps** ({reference}, seed 0, guidance {fixed_cfg:g}, one sample set each):\n",
                   markdown_table(["sampler"] + quality, [[s] + [fmt(next(r for r in ref_rows if r["sampler"] == s and r["sample_seed"] == 0)
                                                                      ["metrics"].get(m, np.nan)) for m in quality] for s in samplers])]
    noise = [r for r in ref_rows if r["sampler"] == sampler]
    seeds = next((g for g in groups if g["setting"] == reference and g["cfg"] == fixed_cfg), None)
    if len(noise) > 1 and seeds is not None:
        lines = [[m, fmt(np.std([r["metrics"][m] for r in noise if m in r["metrics"]], ddof=1)), len(noise), fmt(seeds["std"].get(m, np.nan)),
                  seeds["n"]] for m in quality]
        checks += [f"\n**Sampling noise against the seed-to-seed spread** ({reference}, guidance {fixed_cfg:g}, {noise[0]['num_samples']} "
                   "images per set): the std over sampling seeds of one model, and the std over training seeds (one sample set each):\n",
                   markdown_table(["metric", "std over sampling seeds", "sets", "std over training seeds", "runs"], lines)]
    return checks


def training_order_check(rows, metrics, fixed_cfg, steps):
    """Does each feature space rank a run's own checkpoints in training order? For the runs with a set
    at every evaluated step at the fixed scale: the mean of each metric per step, and how many runs'
    value falls at every step (lower is better for these FIDs). Markdown lines."""
    if len(steps) < 2:
        return []
    by_run = {}
    for r in rows:
        if r["cfg"] == fixed_cfg and r["step"] in steps:
            by_run.setdefault(r["run"], {})[r["step"]] = r["metrics"]
    full = [by_run[run] for run in sorted(by_run) if len(by_run[run]) == len(steps)]
    lines = []
    for m in metrics:
        values = [[sets[step][m] for step in steps] for sets in full if all(m in sets[step] for step in steps)]
        if values:
            in_order = sum(all(a > b for a, b in zip(v, v[1:])) for v in values)
            lines.append([m] + [fmt(np.mean([v[i] for v in values])) for i in range(len(steps))] + [f"{in_order} / {len(values)}"])
    if not lines:
        return []
    return [f"\n**Training order** (guidance {fixed_cfg:g}): a feature space that measures sample quality scores a run's later "
            "checkpoints better. The mean over runs at every evaluated step, and how many runs' value falls at every step:\n",
            markdown_table(["metric"] + [f"step {s:,}" for s in steps] + ["runs in training order"], lines)]


def reproduction_check(res, rows, fid, fixed_cfg, max_steps, sampler, reference, command):
    """Runs rerun from a fresh clone (their small files in <res>/reproduction/<run>/) against the
    committed run, sample set by sample set: the FID of each, its Δ, and whether |Δ| is within twice
    the std over sampling seeds of one model (the noise of one sample set). Markdown lines."""
    redo = read_rows(os.path.join(res, "reproduction"))
    if not redo:
        return []
    noise = [r["metrics"][fid] for r in reference_sets(rows, fixed_cfg, max_steps, reference) if r["sampler"] == sampler and fid in r["metrics"]]
    sd = float(np.std(noise, ddof=1)) if len(noise) > 1 else float("nan")
    committed = {(r["run"], r["tag"]): r for r in rows}
    lines = []
    for r in sorted(redo, key=lambda r: (r["run"], -(r["step"] or 0), r["tag"])):
        c = committed.get((r["run"], r["tag"]))
        if c is None or fid not in r["metrics"] or fid not in c["metrics"]:
            continue
        d = r["metrics"][fid] - c["metrics"][fid]
        same = sum(r["metrics"][m] == v for m, v in c["metrics"].items() if m in r["metrics"])
        lines.append([r["run"], r["tag"], fmt(c["metrics"][fid]), fmt(r["metrics"][fid]), f"{d:+.3g}",
                      "yes" if abs(d) <= 2 * sd else ("no" if np.isfinite(sd) else "?"), f"{same} / {len(c['metrics'])}"])
    logs = []
    for run in sorted({r["run"] for r in redo}):  # the training logs, record by record: the same loss and gradient norm?
        pair = [os.path.join(d, run, "log.jsonl") for d in (os.path.join(res, "runs"), os.path.join(res, "reproduction"))]
        if all(os.path.exists(p) for p in pair):
            a, b = (read_log(p) for p in pair)
            same = sum(x["step"] == y["step"] and x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"] for x, y in zip(a, b))
            logs.append(f"{run}: {same} of {len(a)} committed training-log records have the same step, loss and gradient norm "
                        f"({len(b)} in the rerun's log).")
    return [f"\n**Reproduction from a fresh clone** (the small files of the rerun in `reproduction/<run>/`, from `{command}` in a "
            f"new clone of main, copied from its `runs/<run>/`): each sample set's {fid} against the committed run's, and whether |Δ| "
            f"is within 2 × {fmt(sd)}, the std over sampling seeds of one model ({reference} seed 0, guidance {fixed_cfg:g}); the "
            "last column counts the metrics of the set that came out identical. " + " ".join(logs) + "\n",
            markdown_table(["run", "sample set", f"{fid} committed", "reproduced", "Δ", "within 2 × noise", "metrics identical"], lines)]


def write_study_report(args, run_names, reference, primary):
    """<results>/README.md and plots from <results>/runs/ (each run's small files, copied there by
    study.py): the tables over seeds, every setting against the reference paired by seed with 95 %
    CIs (the primary FID comparisons Holm-corrected), the power reached, a verdict per claim of the
    paper, the learning curve, the sampling checks and a sample grid per setting."""
    from models import plots
    res, runs_dir = args.results, os.path.join(args.results, "runs")
    rows = read_rows(runs_dir, set(run_names))
    if not rows:
        raise UsageError(f"nothing evaluated yet under {args.out_dir} (nor in {runs_dir}): run the grid first")
    names = metric_names(rows)
    fid = main_metric(names, "fid") or names[0]
    sampler = f"dpm-solver++-{args.sample_steps}"
    main_rows = [r for r in rows if r["sampler"] == sampler and r["sample_seed"] == 0]
    final_rows = [r for r in main_rows if r["step"] == args.max_steps]
    all_groups = sorted(aggregate(main_rows), key=lambda g: (setting_order(g["setting"]), g["step"], g["cfg"]))
    groups = [g for g in all_groups if g["step"] == args.max_steps]
    quality = [n for n in names if base_name(n) in QUALITY]
    diversity = [n for n in names if n not in quality]
    best_all = best_scale_groups(all_groups, fid)
    best = [g for g in best_all if g["step"] == args.max_steps]
    fixed = [g for g in groups if g["cfg"] == args.fixed_cfg]
    settings = [g["setting"] for g in best]
    paired = [n for n in names if base_name(n) in PAIRED]
    comparisons = paired_comparisons(final_rows, best, paired, reference, primary, fid)
    ref_mean = next((g["mean"] for g in best if g["setting"] == reference), {})

    # the spread of the per-seed Δ, pooled over the primary comparisons (all, if none): one comparison's
    # std from 2-3 seeds is too rough to read power from
    family = [c for c in comparisons if c["setting"] in primary] or comparisons
    pooled = {n: pooled_sd([c["stats"][n] for c in family]) for n in paired}

    def power_of(metric, st):  # power to detect a change of 10 % of the reference's mean at the pooled spread of Δ
        return fmt(paired_power(0.1 * ref_mean.get(metric, np.nan), pooled[metric][0], st["n"])) if st["n"] >= 2 and metric in pooled else ""

    plots.plot_eta(fixed, quality + diversity, os.path.join(res, "eta.png"), title=f"metric vs η at guidance {args.fixed_cfg:g} (mean ± std over seeds)")
    plots.plot_eta(best, quality + diversity, os.path.join(res, "eta_best.png"), title="metric vs η at each setting's best guidance scale")
    plots.plot_fid_is(groups, names, os.path.join(res, "fid_is.png"),
                      settings={"clean", "CEP-U γ 1", "CEP-G γ 1", "IP λ 0.1", "η 2.5 %", "η 5 %", "η 20 %"})
    plots.plot_bars(fixed, quality + diversity, os.path.join(res, "cep.png"),
                    [s for s in ("clean", "CEP-U γ 1", "CEP-G γ 1", "IP λ 0.1", "CEP-U γ 0.3", "CEP-U γ 3") if s in settings])
    steps = sorted({g["step"] for g in best_all})
    curve = {step: paired_comparisons(main_rows, [g for g in best_all if g["step"] == step], [fid], reference, (), fid) for step in steps}
    if len(steps) > 1:
        plots.plot_curve(best_all, curve, fid, reference, os.path.join(res, "curve.png"))

    grid_lines = []
    for s in settings:  # one grid per setting: its first seed at the fixed scale
        r = min((r for r in final_rows if r["setting"] == s and r["cfg"] == args.fixed_cfg), key=lambda r: r["seed"], default=None)
        if r is not None and os.path.exists(os.path.join(r["folder"], "grid.png")):
            grid_lines.append(f"| {s} (seed {r['seed']}, cfg {args.fixed_cfg:g}) | ![{s}]({os.path.relpath(os.path.join(r['folder'], 'grid.png'), res)}) |")
    floor = next((r["floor"] for r in rows if r["floor"]), {})
    times = stage_times(runs_dir, run_names)
    rc = rows[0]["rc"]
    recipe = describe_recipe(argparse.Namespace(**rc)) if "lr" in rc else ""
    seeds_done = {s: sorted({r["seed"] for r in final_rows if r["setting"] == s}) for s in settings}
    stale = sorted({r["run"] for r in rows if r["toppr_stale"]})
    grid = f" --grid {args.grid}" if args.grid != "short" else ""
    doc = [f"# {rc.get('dataset', '?')}: the η / CEP grid at {args.max_steps:,} training steps\n",
           "Generated by `python study.py` from the small files of each run (config, log, evaluate.py's metrics.json, sample grid, "
           "stage times), copied from each run's folder under `--out-dir` to `runs/`; do not edit by hand: the conclusion is "
           "`conclusion.md`, which this page includes" + (", and the protocol, fixed before the grid ran, is [protocol.md](protocol.md)"
                                                          if os.path.exists(os.path.join(res, "protocol.md")) else "") + ".\n",
           "## Setup\n",
           f"- Model {rc.get('model')} on {rc.get('dataset')}, every run the same: {recipe}.",
           "- Settings and seeds done: " + "; ".join(f"{s} ({len(v)}: {','.join(map(str, v))})" for s, v in seeds_done.items()) + ".",
           f"- Sampling: DPM-Solver++ {args.sample_steps} steps, {final_rows[0]['num_samples']} images per set (class-balanced), "
           f"guidance scales {', '.join(f'{s:g}' for s in args.scales)}" + (f"; learning curve at steps {', '.join(map(str, steps[:-1]))} "
                                                                            f"over scales {', '.join(f'{s:g}' for s in args.curve)}" if args.curve else "")
           + f"; the fixed-scale table uses {args.fixed_cfg:g}.",
           "- Metrics: evaluate.py" + (" on the offline Fashion-MNIST classifier's features (suffix _fmnist; not comparable with Inception "
                                       "numbers) and, where scored, on the label-free autoencoder's (suffix _ae; models/autoencoder.py), against the test split, and against the training set "
                                       "(RMD, top-5 L2, memorisation, within-class distance)." if fid.endswith("_fmnist") else f" ({', '.join(names)})."),
           "- Wall time on this machine (mean per run / total): " + "; ".join(f"{k} {v[0] / 60:.1f} min / {v[1] / 3600:.2f} h ({v[2]})"
                                                                             for k, v in times.items()) + "."]
    classifiers = {}
    for r in rows:
        if r["classifier_accuracy"] is not None:
            classifiers.setdefault(r["classifier_accuracy"], set()).add(r["run"])
    if len(classifiers) > 1:
        doc.append("- **Runs scored with different feature classifiers** (by test accuracy): " + "; ".join(
            f"{acc:.4f}: {len(runs)} runs ({', '.join(sorted(runs))})" for acc, runs in sorted(classifiers.items())) + ".")
    if stale:
        doc.append(f"- **TopP&R left out** for {len(stale)} runs, evaluated before TopP&R matched its authors' estimator (their sets "
                   "scored toppr_f1 ≈ 0 with a wrong bandwidth): " + ", ".join(stale) + ".")
    if floor:
        doc.append("- Floor (real training images against the test split, as many as the samples): " + ", ".join(f"{k} {fmt(v)}" for k, v in floor.items()) + ".")
    doc += ["\n## At each setting's best guidance scale (lowest mean FID; mean ± std over seeds)\n",
            group_table(best, quality, lead=("setting", "cfg")), "\n", group_table(best, diversity, lead=("setting", "cfg")),
            f"\n## At the fixed guidance scale {args.fixed_cfg:g}\n",
            group_table(fixed, quality, lead=("setting", "cfg")), "\n", group_table(fixed, diversity, lead=("setting", "cfg")),
            f"\n## Against {reference}, paired by seed\n",
            f"Seed k of every setting starts from the same weights and sees the same data order, so each setting is compared with {reference} "
            f"only on the seeds both have: Δ_k = setting − {reference} on seed k, each at its own best scale. A cell is the mean Δ and its "
            "95 % CI (Student t, n − 1 degrees of freedom); **better** / worse only where the CI excludes 0, ≈ where it does not. "
            f"The primary comparisons ({', '.join(primary)} against {reference} on {fid}) are one family, "
            "Holm-corrected: there a CI that excludes 0 counts only if the Holm-adjusted p is below 0.05.\n",
            markdown_table(["setting", "cfg", "seeds"] + paired, [[c["setting"], f"{c['cfg']:g}", ",".join(map(str, c["seeds"]))]
                                                                  + [delta_cell(c["stats"][n], n) for n in paired] for c in comparisons]),
            f"\n**Power.** For each comparison on {fid}: the std of its per-seed Δ, the paired t-test's p (Holm-adjusted for the primary "
            f"family), the power it had to detect a change of 10 % of {reference}'s {fid} ({fmt(0.1 * ref_mean.get(fid, np.nan))}; α 0.05, "
            f"two-sided) and the smallest change it could detect with power 0.8, both at the std of Δ pooled over the "
            f"{'primary ' if family is not comparisons else ''}comparisons: {fmt(pooled[fid][0])} ({pooled[fid][1]} degrees of freedom).\n",
            markdown_table(["setting", "seeds", "std of Δ", "p", "Holm p", "power for 10 %", "detectable at power 0.8"],
                           [[c["setting"], len(c["seeds"]), fmt(c["stats"][fid]["sd"]), fmt(c["stats"][fid]["p"]),
                             fmt(c["stats"][fid]["holm"]) if c["stats"][fid]["holm"] is not None else "", power_of(fid, c["stats"][fid]),
                             fmt(detectable_effect(pooled[fid][0], len(c["seeds"])))] for c in comparisons]),
            "\n## The paper's claims\n",
            "Supported: the CI excludes 0 on the paper's side (and survives Holm in the primary family); contradicted: it excludes 0 on the "
            "other side; inconclusive: it does not exclude 0, at the power shown.\n",
            claims_table(comparisons, names, power_of)]
    if len(steps) > 1:
        doc += ["\n## Learning curve\n",
                f"{fid} at each setting's best scale at every evaluated step (mean ± std over seeds), and Δ against {reference} paired by "
                "seed with its 95 % CI: does the sign of the effect change with training?\n",
                markdown_table(["setting"] + [f"step {s:,}" for s in steps],
                               [[s] + [next((fmt(g["mean"][fid], g["std"][fid]) + f" (cfg {g['cfg']:g})" for g in best_all
                                             if g["setting"] == s and g["step"] == step), "") for step in steps] for s in settings]),
                "\n", markdown_table(["Δ vs " + reference] + [f"step {s:,}" for s in steps],
                                     [[s] + [next((delta_cell(c["stats"][fid], fid) for c in curve[step] if c["setting"] == s), "")
                                             for step in steps] for s in settings if s != reference]),
                "\n![learning curve](curve.png)\n"]
    doc += ["\n## Checks\n", *sampling_checks(rows, groups, quality, args.fixed_cfg, args.max_steps, sampler, reference),
            *training_order_check(main_rows, [m for m in (fid, "fid_ae") if m in names], args.fixed_cfg, steps),
            *reproduction_check(res, rows, fid, args.fixed_cfg, args.max_steps, sampler, reference,
                                f"python study.py{grid} --only <run>"),
            "\n## Plots\n", f"![metric vs η](eta.png)\n\n![metric vs η, best scale](eta_best.png)\n\n![FID vs IS](fid_is.png)\n\n"
            f"![clean, CEP, IP at guidance {args.fixed_cfg:g}](cep.png)\n",
            "\n## Sample grids (one class per column)\n", "| setting | samples |", "|---|---|", *grid_lines]
    conclusion = os.path.join(res, "conclusion.md")
    if os.path.exists(conclusion):
        with open(conclusion, encoding="utf-8") as f:
            doc += ["\n## Conclusion\n", f.read()]
    doc += ["\n## Regenerate\n", "```bash", f"python study.py{grid}" + (f" --only '{args.only}'" if args.only else "")
            + "      # trains, samples and evaluates what is missing, then writes this page",
            f"python study.py{grid} --report-only   # this page from the files on disk", "```"]
    atomic_write_text(os.path.join(res, "README.md"), "\n".join(doc) + "\n")
    print(f"-> {os.path.join(res, 'README.md')} ({len(rows)} sample sets of {len({r['run'] for r in rows})} runs)")
