"""study.py's report: every setting of the grid against the reference (clean training), paired by seed.

The rows and tables are models/report.py's, the checks models/study_checks.py's; this file reads them
the way the study's protocol says: each setting at its best guidance scale (the 1,000-step grid) or
at the fixed scale (the converged grid), the per-seed differences with their 95 % CI, the primary FID
comparisons Holm-corrected, the secondary ones Benjamini-Hochberg-corrected as one family, a positive
control as its own test, the power under the correction applied, one verdict per claim of the paper,
the learning curve, the sensitivity to the seeds used, and, for a grid with an amendment, nothing of
the amendment's runs until all of them are done (a fixed n)."""
import argparse
import json
import os

import numpy as np

from models.build import describe_recipe
from models.common import UsageError, atomic_write_text
from models.report import (QUALITY, aggregate, base_name, direction, fmt, group_table, main_metric, markdown_table, metric_names,
                           read_rows, setting_order, training_time)
from models.stats import (benjamini_hochberg, best_scale_groups, detectable_effect, paired_comparisons, paired_power, pooled_sd,
                          sd_interval)
from models.study_checks import (RERUNS, machines, offset_lines, provenance_check, rerun_check, sampling_checks, sampling_offset,
                                 training_order_check)

ALPHA = 0.05
# the paper's directional claims, read on the study's comparisons: (claim, setting, metric, the side
# the paper reports: -1 lower, +1 higher). A claim whose setting is not in the grid is left out.
CLAIMS = [("slight corruption lowers FID", "η 2.5 %", "fid", -1), ("slight corruption lowers FID", "η 5 %", "fid", -1),
          ("slight corruption lowers FID", "η 7.5 %", "fid", -1), ("CEP-U lowers FID", "CEP-U γ 1", "fid", -1),
          ("CEP-G lowers FID", "CEP-G γ 1", "fid", -1), ("heavy corruption raises FID", "η 15 %", "fid", 1),
          ("heavy corruption raises FID", "η 20 %", "fid", 1), ("slight corruption raises IS", "η 2.5 %", "is", 1),
          ("slight corruption raises recall (diversity)", "η 2.5 %", "recall", 1),
          ("slight corruption raises recall (diversity)", "η 5 %", "recall", 1)]
PAIRED = ("fid", "precision", "recall", "toppr_f1", "accuracy", "memorization")  # the comparison tables' metrics (every feature space)


def correction(st):
    """(family name, corrected p, family size) of a comparison in a family ('Holm': the primary
    comparisons; 'BH': the secondary family; 'own test': a positive control), None outside every family."""
    family = st.get("family")
    if family is None:
        return None
    return family[0], st["q"] if family[0] == "BH" else st["holm"], family[1]


def excludes_zero(st):
    return st["n"] >= 2 and (st["lo"] > 0 or st["hi"] < 0)


def significant(st, alpha=ALPHA):
    """The 95 % CI excludes 0 and the family's corrected p is below alpha (outside a family: never)."""
    corr = correction(st)
    return excludes_zero(st) and corr is not None and corr[1] < alpha


def verdict(st, metric):
    """**better** / worse (↑ / ↓ for a metric without a better side) where significant; a *lead* where
    the CI excludes 0 but not after the correction (or outside any family); ≈ otherwise."""
    if st["n"] < 2:
        return "one seed"
    if not excludes_zero(st):
        return "≈"
    d = direction(metric)
    side = ("↑" if st["mean"] > 0 else "↓") if d == 0 else "better" if d * st["mean"] > 0 else "worse"
    if significant(st):
        return "**better**" if side == "better" else side
    corr = correction(st)
    return f"lead: {side} ({f'not after {corr[0]}' if corr else 'uncorrected'})"


def power_of(a, metric, st, step=None):
    """Power for a change of 10 % of the reference's mean (at `step`, if given: a learning-curve
    point) at the pooled spread of Δ, under the comparison's correction (Holm over m: α / m; BH over
    m: α / m, its lower bound; else α)."""
    sd, ref = (a["curve_pooled"][step][0], a["curve_ref"][step]) if step is not None else (a["pooled"].get(metric, (np.nan, 0))[0],
                                                                                            a["ref_mean"].get(metric, np.nan))
    corr = correction(st)
    return paired_power(0.1 * ref, sd, st["n"], family=corr[2] if corr else 1) if st["n"] >= 2 else np.nan


def delta_ci(st):
    """'+1.2 [−0.3, 2.7]': the mean per-seed difference and its 95 % CI."""
    return f"{st['mean']:+.3g}" + (f" [{fmt(st['lo'])}, {fmt(st['hi'])}]" if st["n"] >= 2 else "") if st["n"] else ""


def delta_cell(st, metric):
    return f"{delta_ci(st)} {verdict(st, metric)}" if st["n"] else ""


def assign_families(final, curve, fid, primary, control):
    """The families beside the primary one (whose Holm paired_comparisons sets): the secondary family,
    every other paired metric of the primary settings at the full budget and their `fid` at the
    learning curve's earlier steps, Benjamini-Hochberg adjusted as one (st['q']); and a positive
    control's `fid`, its own test (a family of one: Holm p = p). Returns the secondary tests as
    [(setting, step or None, metric, stats)]."""
    family = [c for c in final if c["setting"] in primary and fid in c["stats"]]
    for c in family:
        c["stats"][fid]["family"] = ("Holm", len(family))
    tests = [(c["setting"], None, n, c["stats"][n]) for c in final if c["setting"] in primary for n in c["stats"] if n != fid]
    tests += [(c["setting"], step, fid, c["stats"][fid]) for step, comps in curve.items() for c in comps if c["setting"] in primary]
    for t, q in zip(tests, benjamini_hochberg([t[3]["p"] for t in tests])):
        t[3].update(q=None if np.isnan(q) else float(q), family=("BH", len(tests)))
    for c in final:
        if c["setting"] in control and fid in c["stats"]:
            c["stats"][fid].update(holm=c["stats"][fid]["p"], family=("own test", 1))
    return tests


def analyse(rows, fixed_scale, fixed_cfg, max_steps, sampler, fid, paired, reference, primary, control, seeds=None):
    """The paired analysis of one set of seeds (all, if None): the groups over seeds at the scale read
    (each setting's best, or the fixed one), every setting against the reference at the full budget
    and at the learning curve's earlier steps, the families, and the spread of Δ pooled over the primary
    comparisons."""
    rows = [r for r in rows if seeds is None or r["seed"] in seeds]
    main_rows = [r for r in rows if r["sampler"] == sampler and r["sample_seed"] == 0]
    all_groups = sorted(aggregate(main_rows), key=lambda g: (setting_order(g["setting"]), g["step"], g["cfg"]))
    chosen = [g for g in all_groups if g["cfg"] == fixed_cfg] if fixed_scale else best_scale_groups(all_groups, fid)
    best = [g for g in chosen if g["step"] == max_steps]
    final_rows = [r for r in main_rows if r["step"] == max_steps]
    if not final_rows:
        raise UsageError(f"no evaluated sample set of this grid is at step {max_steps:,} (--max-steps): nothing to report")
    comparisons = paired_comparisons(final_rows, best, paired, reference, primary, fid)
    steps = sorted({g["step"] for g in chosen})
    curve = {step: paired_comparisons(main_rows, [g for g in chosen if g["step"] == step], [fid], reference, (), fid) for step in steps[:-1]}
    secondary = assign_families(comparisons, curve, fid, primary, control)
    family = [c for c in comparisons if c["setting"] in primary] or [c for c in comparisons if c["setting"] not in control]
    pooled = {n: pooled_sd([c["stats"][n] for c in family]) for n in paired}
    curve_pooled = {step: pooled_sd([c["stats"][fid] for c in comps if c["setting"] in primary]) for step, comps in curve.items()}
    ref_mean = next((g["mean"] for g in best if g["setting"] == reference), {})
    curve_ref = {step: next((g["mean"][fid] for g in chosen if g["setting"] == reference and g["step"] == step), np.nan) for step in curve}
    return dict(curve_ref=curve_ref, main_rows=main_rows, final_rows=final_rows, all_groups=all_groups, chosen=chosen, best=best, comparisons=comparisons,
                curve=curve, steps=steps, secondary=secondary, family=family, pooled=pooled, curve_pooled=curve_pooled, ref_mean=ref_mean,
                m=len([c for c in comparisons if c["setting"] in primary]) or 1)


def primary_table(a, fid, primary):
    """Markdown: each primary comparison on fid with its test, the Holm p, the verdict, and the power and
    the detectable change under Holm over the family, the unadjusted figures beside, labelled."""
    sd, m = a["pooled"][fid][0], a["m"]
    lines = []
    for c in a["comparisons"]:
        if c["setting"] not in primary:
            continue
        st, n = c["stats"][fid], len(c["seeds"])
        effect = 0.1 * a["ref_mean"].get(fid, np.nan)
        lines.append([c["setting"], n, delta_ci(st), fmt(st["p"]), fmt(st["holm"]) if st["holm"] is not None else "", verdict(st, fid),
                      fmt(power_of(a, fid, st)), fmt(detectable_effect(sd, n, family=m)),
                      f"{fmt(paired_power(effect, sd, n))} / {fmt(detectable_effect(sd, n))}"])
    return markdown_table(["setting", "seeds", f"Δ {fid} [95 % CI]", "p", "Holm p", "verdict", f"power for 10 % (Holm over {m})",
                           f"detectable at power 0.8 (Holm over {m})", "unadjusted: power / detectable"], lines)


def pooled_line(a, fid, seeds):
    """The pooled σ_Δ with its CI, and the power under Holm at the ends of that CI."""
    sd, df = a["pooled"][fid]
    if not df:
        return ""
    lo, hi = sd_interval(sd, df)
    effect, m = 0.1 * a["ref_mean"].get(fid, np.nan), a["m"]
    at = "; ".join(f"{fmt(paired_power(effect, s, seeds, family=m))} at σ_Δ {fmt(s)}" for s in (lo, hi))
    return (f"σ_Δ, the std of the per-seed Δ pooled over the {len(a['family'])} primary comparisons: **{fmt(sd)}** ({df} degrees of "
            f"freedom, 95 % CI [{fmt(lo)}, {fmt(hi)}]). A 10 % change of the reference's {fid} is {fmt(effect)}; at {seeds} seeds the "
            f"power for it under Holm over {m} is {at} (the ends of that CI).\n")


def control_lines(a, fid, control, accuracy):
    """The positive control: its Δ on fid with the CI and its own test; does the design see it? Beside
    it (not instead), the same comparison on accuracy."""
    out = []
    for c in a["comparisons"]:
        if c["setting"] not in control:
            continue
        st = c["stats"][fid]
        found = st["n"] >= 2 and st["lo"] > 0
        word = ("**the design detects it**: the CI excludes 0 on the side the paper reports" if found else
                "**the design fails its own check**: the CI does not exclude 0 on the side the paper reports")
        acc = c["stats"].get(accuracy)
        beside = f" Beside it, on {accuracy}: {delta_ci(acc)} (p {fmt(acc['p'])})." if acc and acc["n"] else ""
        out.append(f"- {c['setting']} against the reference, {len(c['seeds'])} seeds: Δ {fid} {delta_ci(st)}, paired t p {fmt(st['p'])} "
                   f"(its own test, α {ALPHA:g}; not in the primary family); {word}.{beside}")
    return out


def secondary_table(a, fid):
    m = len(a["secondary"])
    lines = []
    for setting, step, metric, st in sorted(a["secondary"], key=lambda t: (setting_order(t[0]), t[1] or 1e12, t[2])):
        lines.append([setting, metric, f"{step:,}" if step is not None else "final", delta_ci(st), fmt(st["p"]),
                      fmt(st["q"]) if st.get("q") is not None else "", verdict(st, metric), fmt(power_of(a, metric, st, step))])
    return markdown_table(["setting", "metric", "step", "Δ [95 % CI]", "p", "BH q", "verdict",
                           f"power for 10 %, lower bound (α / {m})"], lines)


def claims_table(a, names):
    """One verdict per claim of the paper: supported (significant on the paper's side after its family's
    correction), contradicted (on the other side) or inconclusive at the power shown; a CI that excludes
    0 without surviving the correction is a lead."""
    lines = []
    for claim, setting, base, side in CLAIMS:
        c = next((c for c in a["comparisons"] if c["setting"] == setting), None)
        metric = main_metric(names, base)
        if c is None or metric is None or metric not in c["stats"]:
            continue
        st = c["stats"][metric]
        on = "the paper's" if side * st["mean"] > 0 else "the other"
        if significant(st):
            word = "supported" if side * st["mean"] > 0 else "contradicted"
        elif excludes_zero(st):
            corr = correction(st)
            word = f"inconclusive: a lead on {on} side (the CI excludes 0, {'not after ' + corr[0] if corr else 'uncorrected'})"
        else:
            word = "inconclusive at this power"
        corr = correction(st)
        power = fmt(power_of(a, metric, st)) + (f" ({corr[0]}{'' if corr[2] == 1 else f' over {corr[2]}'})" if corr and st["n"] >= 2 else "")
        lines.append([claim, setting, metric, len(c["seeds"]), delta_ci(st),
                      fmt(st["p"]) + (f" ({corr[0]} {fmt(corr[1])})" if corr and corr[0] != "own test" else ""), power, word])
    return markdown_table(["claim", "setting", "metric", "seeds", "Δ [95 % CI]", "p", "power for a 10 % change", "verdict"], lines)


def verdict_changes(full, part, fid, primary, what):
    """Primary comparisons whose verdict differs between two analyses (e.g. 8 seeds and 3)."""
    words = {c["setting"]: verdict(c["stats"][fid], fid) for c in part["comparisons"] if c["setting"] in primary}
    diff = [f"{c['setting']}: {verdict(c['stats'][fid], fid)} with every seed, {words[c['setting']]} with {what}"
            for c in full["comparisons"] if c["setting"] in words and verdict(c["stats"][fid], fid) != words[c["setting"]]]
    return "Verdicts that differ: " + ("; ".join(diff) if diff else "none") + ".\n"


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


def write_study_report(args, run_names, reference, primary, control=(), amendment=None):
    """<results>/README.md and plots from <results>/runs/ (each run's small files, copied there by
    study.py): the tables over seeds; every setting against the reference paired by seed with 95 %
    CIs, each in its family (Holm over the primary FID comparisons, Benjamini-Hochberg over the
    secondary ones, a positive control's own test); the power under that correction; a verdict per
    claim of the paper; the learning curve; the analysis on parts of the seeds; the checks. With an
    `amendment` ({'runs': its run names, 'first_seed': its first new seed}), its runs enter only once
    every one of them is done."""
    from models import plots
    res, runs_dir = args.results, os.path.join(args.results, "runs")
    rows = read_rows(runs_dir, set(run_names))
    if not rows:
        raise UsageError(f"nothing evaluated yet under {args.out_dir} (nor in {runs_dir}): run the grid first")
    progress = None
    if amendment:
        done = sorted({r["run"] for r in rows if r["run"] in amendment["runs"]}, key=list(run_names).index)
        progress = (done, [r for r in run_names if r in amendment["runs"]])
        if len(done) < len(progress[1]):  # a fixed n: nothing of the amendment's runs before all are done
            rows = [r for r in rows if r["run"] not in amendment["runs"]]
    names = metric_names(rows)
    fid = main_metric(names, "fid") or names[0]
    sampler = f"dpm-solver++-{args.sample_steps}"
    paired = [n for n in names if base_name(n) in PAIRED]
    fixed_scale = getattr(args, "scale", "best") == "fixed"

    def run_analysis(seeds=None):
        return analyse(rows, fixed_scale, args.fixed_cfg, args.max_steps, sampler, fid, paired, reference, primary, control, seeds)
    a = run_analysis()
    main_rows, final_rows, comparisons, best, steps = a["main_rows"], a["final_rows"], a["comparisons"], a["best"], a["steps"]
    groups = [g for g in a["all_groups"] if g["step"] == args.max_steps]
    quality = [n for n in names if base_name(n) in QUALITY]
    diversity = [n for n in names if n not in quality]
    fixed = [g for g in groups if g["cfg"] == args.fixed_cfg]
    settings = [g["setting"] for g in best]
    seeds_all = sorted({r["seed"] for r in final_rows})
    scale_words = f"the fixed guidance scale {args.fixed_cfg:g}" if fixed_scale else "each setting's best scale"

    plots.plot_eta(fixed, quality + diversity, os.path.join(res, "eta.png"), title=f"metric vs η at guidance {args.fixed_cfg:g} (mean ± std over seeds)")
    plots.plot_eta(best, quality + diversity, os.path.join(res, "eta_best.png"),
                   title=f"metric vs η at {'guidance ' + format(args.fixed_cfg, 'g') if fixed_scale else 'each setting' + chr(39) + 's best guidance scale'}")
    plots.plot_fid_is(groups, names, os.path.join(res, "fid_is.png"),
                      settings={"clean", "CEP-U γ 1", "CEP-G γ 1", "IP λ 0.1", "η 2.5 %", "η 5 %", "η 20 %"})
    plots.plot_bars(fixed, quality + diversity, os.path.join(res, "cep.png"),
                    [s for s in ("clean", "CEP-U γ 1", "CEP-G γ 1", "IP λ 0.1", "CEP-U γ 0.3", "CEP-U γ 3") if s in settings])
    curve = {**a["curve"], args.max_steps: comparisons}
    if len(steps) > 1:
        plots.plot_curve(a["chosen"], curve, fid, reference, os.path.join(res, "curve.png"))

    grid_lines = []
    for s in settings:  # one grid per setting: its first seed at the fixed scale
        r = min((r for r in final_rows if r["setting"] == s and r["cfg"] == args.fixed_cfg), key=lambda r: r["seed"], default=None)
        if r is not None and os.path.exists(os.path.join(r["folder"], "grid.png")):
            grid_lines.append(f"| {s} (seed {r['seed']}, cfg {args.fixed_cfg:g}) | ![{s}]({os.path.relpath(os.path.join(r['folder'], 'grid.png'), res)}) |")
    floor = next((r["floor"] for r in rows if r["floor"]), {})
    times = stage_times(runs_dir, sorted({r["run"] for r in rows}))
    rc = rows[0]["rc"]
    recipe = describe_recipe(argparse.Namespace(**rc)) if "lr" in rc else ""
    seeds_done = {s: sorted({r["seed"] for r in final_rows if r["setting"] == s}) for s in settings}
    stale = sorted({r["run"] for r in rows if r["toppr_stale"]})
    grid = f" --grid {args.grid}" if args.grid != "short" else ""
    scales = sorted({g["cfg"] for g in groups})
    doc = [f"# {rc.get('dataset', '?')}: the η / CEP grid at {args.max_steps:,} training steps\n",
           "Generated by `python study.py` from the small files of each run (config, log, evaluate.py's metrics.json, sample grid, "
           "stage times, provenance), copied from each run's folder under `--out-dir` to `runs/`; do not edit by hand: the conclusion is "
           "`conclusion.md`, which this page includes" + (", and the protocol, fixed before the grid ran, is [protocol.md](protocol.md)"
                                                          if os.path.exists(os.path.join(res, "protocol.md")) else "")
           + (", with its amendment [amendment.md](amendment.md)" if os.path.exists(os.path.join(res, "amendment.md")) else "") + ".\n"]
    if progress:
        done, todo = progress
        state = ("**complete**: the analysis below reads all of them" if len(done) == len(todo) else
                 f"**{len(done)} of {len(todo)} done**; a fixed n: nothing below reads them until all are done")
        doc += [f"**The amendment's runs** (seeds from {amendment['first_seed']} on, and the positive control): {state}. Done: "
                + (", ".join(done) or "none") + ".\n"]
    doc += ["## Setup\n",
            f"- Model {rc.get('model')} on {rc.get('dataset')}, every run the same: {recipe}.",
            "- Settings and seeds in this analysis: " + "; ".join(f"{s} ({len(v)}: {','.join(map(str, v))})" for s, v in seeds_done.items()) + ".",
            f"- Sampling: DPM-Solver++ {args.sample_steps} steps, {final_rows[0]['num_samples']} images per set (class-balanced), sampling "
            f"seed 0, guidance scales {', '.join(f'{s:g}' for s in scales)}" + (f"; learning curve at steps {', '.join(map(str, steps[:-1]))}"
                                                                              if len(steps) > 1 else "")
            + f"; the comparisons read {scale_words}.",
            "- Metrics: evaluate.py" + (" on the offline Fashion-MNIST classifier's features (suffix _fmnist; not comparable with Inception "
                                        "numbers) and, where scored, on the label-free autoencoder's (suffix _ae; models/autoencoder.py), against the test split, and against the training set "
                                        "(RMD, top-5 L2, memorisation, within-class distance)." if fid.endswith("_fmnist") else f" ({', '.join(names)})."),
            "- Wall time on the machines that ran them (mean per run / total): " + "; ".join(f"{k} {v[0] / 60:.1f} min / {v[1] / 3600:.2f} h ({v[2]})"
                                                                                       for k, v in times.items()) + "."]
    classifiers = {}
    for r in rows:
        if r["classifier_accuracy"] is not None:
            classifiers.setdefault(r["classifier_accuracy"], set()).add(r["run"])
    if len(classifiers) > 1:
        doc.append("- Feature classifier's test accuracy as each run's evaluation measured it (the same shipped weights; the accuracy is "
                   "recomputed on the CPU that evaluates): " + "; ".join(f"{acc:.4f}: {len(runs)} runs" for acc, runs in sorted(classifiers.items())) + ".")
    if stale:
        doc.append(f"- **TopP&R left out** for {len(stale)} runs, evaluated before TopP&R matched its authors' estimator (their sets "
                   "scored toppr_f1 ≈ 0 with a wrong bandwidth): " + ", ".join(stale) + ".")
    if floor:
        doc.append("- Floor (real training images against the test split, as many as the samples): " + ", ".join(f"{k} {fmt(v)}" for k, v in floor.items()) + ".")
    if not fixed_scale:
        doc += ["\n## At each setting's best guidance scale (lowest mean FID; mean ± std over seeds)\n",
                group_table(best, quality, lead=("setting", "cfg")), "\n", group_table(best, diversity, lead=("setting", "cfg"))]
    doc += [f"\n## At the fixed guidance scale {args.fixed_cfg:g} (mean ± std over seeds)\n",
            group_table(fixed, quality, lead=("setting", "cfg")), "\n", group_table(fixed, diversity, lead=("setting", "cfg")),
            f"\n## Against {reference}, paired by seed\n",
            f"Seed k of every setting starts from the same weights and sees the same data order, so each setting is compared with {reference} "
            f"only on the seeds both have: Δ_k = setting − {reference} on seed k, at {scale_words}. A cell is the mean Δ and its "
            "95 % CI (Student t, n − 1 degrees of freedom). Every comparison belongs to one family with one correction: the primary "
            f"comparisons ({', '.join(primary)} against {reference} on {fid}) Holm over {a['m']}; every other metric of those settings, and "
            f"their {fid} at the learning curve's earlier steps, one secondary family, Benjamini-Hochberg over {len(a['secondary'])} "
            f"(false discovery rate {ALPHA:g})" + (f"; the positive control ({', '.join(control)}) its own test on {fid}" if control else "")
            + ". **better** / worse only where the CI excludes 0 and the corrected p is below 0.05; a CI that excludes 0 otherwise is "
            "a *lead*, not a finding; ≈ where the CI spans 0.\n",
            markdown_table(["setting", "cfg", "seeds"] + paired, [[c["setting"], f"{c['cfg']:g}", ",".join(map(str, c["seeds"]))]
                                                                  + [delta_cell(c["stats"][n], n) for n in paired] for c in comparisons]),
            f"\n## Primary: {fid}, Holm over the {a['m']} comparisons\n",
            "The power for a change of 10 % of the reference's value and the smallest change detectable with power 0.8 are computed "
            f"under the correction applied (Holm over {a['m']}: the test at α / {a['m']}, Holm's first step), at the pooled σ_Δ; the "
            "unadjusted figures are beside them for comparison only.\n", pooled_line(a, fid, len(seeds_all)), primary_table(a, fid, primary)]
    if control:
        lines = control_lines(a, fid, control, main_metric(names, "accuracy") or fid)
        doc += ["\n## Positive control\n", "A setting the paper reports to hurt: a design that cannot see it cannot see anything.\n",
                *(lines or [f"- {', '.join(control)}: no finished runs in this analysis."]), ""]
    doc += [f"\n## Secondary family: Benjamini-Hochberg over {len(a['secondary'])}\n",
            "The power column is the test's at α / m, a lower bound of its power under Benjamini-Hochberg.\n", secondary_table(a, fid),
            "\n## The paper's claims\n",
            "Supported: the CI excludes 0 on the paper's side and the comparison survives its family's correction; contradicted: the "
            "same on the other side; inconclusive otherwise, at the power shown (under that correction).\n",
            claims_table(a, names)]
    if amendment and progress and len(progress[0]) == len(progress[1]):
        first = amendment["first_seed"]
        doc += ["\n## Sensitivity: parts of the seeds\n"]
        for label, seeds in ((f"seeds {first} to {max(seeds_all)} alone (not seen when the amendment was decided)", range(first, max(seeds_all) + 1)),
                             (f"seeds 0 to {first - 1} alone (the protocol's grid)", range(first))):
            part = run_analysis(set(seeds))
            doc += [f"**{label[0].upper() + label[1:]}**:\n", pooled_line(part, fid, len(seeds)), primary_table(part, fid, primary),
                    verdict_changes(a, part, fid, primary, label.split(" (")[0])]
            if control:
                doc += [*control_lines(part, fid, control, main_metric(names, "accuracy") or fid), ""]
    if len(steps) > 1:
        doc += ["\n## Learning curve\n",
                f"{fid} at {scale_words} at every evaluated step (mean ± std over seeds), and Δ against {reference} paired by seed "
                "with its 95 % CI (the earlier steps are in the secondary family): does the sign of the effect change with training?\n",
                markdown_table(["setting"] + [f"step {s:,}" for s in steps],
                               [[s] + [next((fmt(g["mean"][fid], g["std"][fid]) + ("" if fixed_scale else f" (cfg {g['cfg']:g})")
                                             for g in a["chosen"] if g["setting"] == s and g["step"] == step), "") for step in steps] for s in settings]),
                "\n", markdown_table(["Δ vs " + reference] + [f"step {s:,}" for s in steps],
                                     [[s] + [next((delta_cell(c["stats"][fid], fid) for c in curve[step] if c["setting"] == s), "")
                                             for step in steps] for s in settings if s != reference]),
                "\n![learning curve](curve.png)\n"]
    spread = next((g["std"].get(fid, np.nan) for g in fixed if g["setting"] == reference), np.nan)
    machine = machines(res)

    def primary_set(r):
        return r["step"] == args.max_steps and r["cfg"] == args.fixed_cfg and r["sample_seed"] == 0 and r["sampler"] == sampler
    offset = sampling_offset(rows, fid, args.fixed_cfg, args.max_steps, sampler, reference)
    doc += ["\n## Checks\n", *sampling_checks(rows, groups, quality, args.fixed_cfg, args.max_steps, sampler, reference),
            *offset_lines(*offset, fid, args.fixed_cfg, reference),
            *training_order_check(main_rows, [m for m in (fid, "fid_ae") if m in names], args.fixed_cfg, steps)]
    for folder in RERUNS:
        if folder == "machine" and progress and len(progress[0]) < len(progress[1]):
            continue  # part of the amendment: read with it
        doc += rerun_check(res, folder, rows, fid, primary_set, spread, reference, f"python study.py{grid} --only <run> --rerun {folder}", machine)
    if machine:
        doc += provenance_check(comparisons, final_rows, machine, reference, "CPU not recorded (made before provenance.json existed)")
    doc += ["\n## Plots\n", f"![metric vs η](eta.png)\n\n![metric vs η, best scale](eta_best.png)\n\n![FID vs IS](fid_is.png)\n\n"
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
