"""The checks of study.py's report (models/study_report.py): what the study's own runs say about its
measurements, beside the comparisons themselves.

- sampling_checks: on the reference's seed 0, the sampler's step count, and the noise of one model
  over sampling seeds against the spread over training seeds;
- sampling_offset: on every reference run sampled at three sampling seeds, how far sampling seed 0
  (the seed of every set the comparisons read) sits from the other two;
- training_order_check: does a feature space rank a run's own checkpoints in training order?
- rerun_check: runs of the grid done again (a fresh clone, another CPU) against their committed
  runs, set by set and log record by log record, on the scale of the seed-to-seed training spread;
- provenance_check: the CPU each run executed on, and the pairs whose two runs ran on different CPUs.
"""
import glob
import json
import os

import numpy as np

from models.report import fmt, markdown_table, read_log, read_rows
from models.stats import paired_stats

# the folders beside runs/ that hold runs of the grid done again (study.py --rerun NAME), and what each is
RERUNS = {"reproduction": "Reproduction from a fresh clone", "machine": "The machine check: runs done again on another CPU"}


def reference_sets(rows, fixed_cfg, max_steps, reference, seed=0):
    """The sample sets of the reference's seed `seed` at the fixed scale and the full budget: every
    sampler and sampling seed, the sets that measure the noise of one model."""
    return [r for r in rows if r["setting"] == reference and r["seed"] == seed and r["cfg"] == fixed_cfg and r["step"] == max_steps]


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


def sampling_offset(rows, fid, fixed_cfg, max_steps, sampler, reference):
    """(paired_stats of the offsets, [(run, seed-0 value, mean of the others)]): for every reference run
    with sets at sampling seeds 0, 1 and 2 (fixed scale, full budget), its fid at sampling seed 0
    minus the mean at seeds 1 and 2."""
    offsets = []
    for seed in sorted({r["seed"] for r in rows if r["setting"] == reference}):
        sets = {r["sample_seed"]: r["metrics"].get(fid) for r in reference_sets(rows, fixed_cfg, max_steps, reference, seed)
                if r["sampler"] == sampler}
        if all(sets.get(s) is not None for s in (0, 1, 2)):
            offsets.append((f"seed {seed}", sets[0], (sets[1] + sets[2]) / 2))
    return paired_stats([a - b for _, a, b in offsets]), offsets


def offset_lines(stats, offsets, fid, fixed_cfg, reference):
    if not offsets:
        return []
    runs = "; ".join(f"{name}: {fmt(a)} against {fmt(b)}" for name, a, b in offsets)
    ci = f" [{fmt(stats['lo'])}, {fmt(stats['hi'])}]" if stats["n"] >= 2 else ""
    return [f"\n**The offset of sampling seed 0** ({reference}, guidance {fixed_cfg:g}): every set that the comparisons read uses "
            f"sampling seed 0, so its absolute {fid} carries that seed's offset from the other sampling seeds; the pairs share it, "
            f"so it cancels in every Δ. {fid} at sampling seed 0 minus the mean of seeds 1 and 2, over {len(offsets)} "
            f"{reference} run{'s' if len(offsets) > 1 else ''}: **{stats['mean']:+.3g}**{ci} ({runs}).\n"]


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


def log_agreement(committed, rerun):
    """(records with the same step, loss and gradient norm, the first step where they differ or None)."""
    a, b = read_log(committed), read_log(rerun)
    same = [x["step"] == y["step"] and x["loss"] == y["loss"] and x["grad_norm"] == y["grad_norm"] for x, y in zip(a, b)]
    first = next((x["step"] for x, ok in zip(a, same) if not ok), None)
    return sum(same), len(a), len(b), first


def rerun_check(res, folder, rows, fid, final, spread, reference, command, machines):
    """Runs of the grid done again (their small files in <res>/<folder>/<run>/) against the committed
    runs, sample set by sample set: each set's FID, its Δ, Δ in units of √2 · `spread` (the std of two
    runs' difference if the rerun were another training seed: the scale a rerun on another CPU is
    read on, since its trajectory is another one from the first step), and how many of the set's
    metrics came out identical; the training logs record by record; and, with two reruns or more,
    the mean Δ of their `final` sets (a function of a row: the set the primary comparison reads) with
    its 95 % CI, a comparison whose true value is 0. Markdown lines."""
    redo = read_rows(os.path.join(res, folder))
    if not redo:
        return []
    committed = {(r["run"], r["tag"]): r for r in rows}
    lines, deltas = [], []
    for r in sorted(redo, key=lambda r: (r["run"], -(r["step"] or 0), r["tag"])):
        c = committed.get((r["run"], r["tag"]))
        if c is None or fid not in r["metrics"] or fid not in c["metrics"]:
            continue
        d = r["metrics"][fid] - c["metrics"][fid]
        same = sum(r["metrics"][m] == v for m, v in c["metrics"].items() if m in r["metrics"])
        lines.append([r["run"], r["tag"], fmt(c["metrics"][fid]), fmt(r["metrics"][fid]), f"{d:+.3g}",
                      f"{d / (np.sqrt(2) * spread):+.2f}" if spread > 0 else "?", f"{same} / {len(c['metrics'])}"])
        if final(r):
            deltas.append(d)
    logs = []
    for run in sorted({r["run"] for r in redo}):
        pair = [os.path.join(res, "runs", run, "log.jsonl"), os.path.join(res, folder, run, "log.jsonl")]
        if all(os.path.exists(p) for p in pair):
            same, n, n_redo, first = log_agreement(*pair)
            cpus = (machines.get((folder, run)), machines.get(("runs", run)))
            where = f" (rerun on {cpus[0] or 'a CPU not recorded'}, committed run on {cpus[1] or 'a CPU not recorded'})" if any(cpus) else ""
            logs.append(f"{run}{where}: {same} of {n} committed training-log records have the same step, loss and gradient norm ({n_redo} in the "
                        f"rerun's log)" + (f", the first that differs is step {first}" if first is not None else "") + ".")
    out = [f"\n**{RERUNS.get(folder, folder)}** (the small files of each rerun in `{folder}/<run>/`, copied there by `{command}`, or "
           "by hand from the rerun's runs/<run>/ before that flag existed): each sample "
           f"set's {fid} against the committed run's; Δ / (√2 σ) reads Δ on the scale of two training seeds, σ = {fmt(spread)} being "
           f"the std of {reference}'s {fid} over its training seeds; the last column counts the metrics of the set that came out "
           "identical (all of them on the CPU and build that made the run). " + " ".join(logs) + "\n",
           markdown_table(["run", "sample set", f"{fid} committed", "rerun", "Δ", "Δ / (√2 σ)", "metrics identical"], lines)]
    if len(deltas) >= 2:
        st = paired_stats(deltas)
        word = "found (the check fails)" if st["lo"] > 0 or st["hi"] < 0 else "not found, as it must not be"
        out.append(f"\nOver the {st['n']} reruns' final sets: mean Δ {st['mean']:+.3g} [{fmt(st['lo'])}, {fmt(st['hi'])}] (paired t p "
                   f"{fmt(st['p'])}); an effect of the rerun itself is {word}.\n")
    return out


def machine_of(prov):
    """'AMD EPYC (AVX2)' from a provenance.json's segments ('A; B' if a run ran on several)."""
    names = []
    for seg in prov.get("segments", []):
        name = f"{seg.get('cpu', '?')} ({'AVX-512' if seg.get('avx512') else 'no AVX-512'})"
        if name not in names:
            names.append(name)
    return "; ".join(names) or "?"


def machines(res):
    """{(folder, run): machine_of(its provenance.json)} over runs/ and the rerun folders."""
    out = {}
    for folder in ("runs", *RERUNS):
        for path in sorted(glob.glob(os.path.join(res, folder, "*", "provenance.json"))):
            with open(path) as f:
                out[(folder, os.path.basename(os.path.dirname(path)))] = machine_of(json.load(f))
    return out


def provenance_check(comparisons, rows, machine, reference, unrecorded):
    """The CPU of each run of the comparisons (from its provenance.json; `unrecorded` where it has none)
    and the pairs whose two runs ran on different CPUs. Markdown lines."""
    run_of = {(r["setting"], r["seed"]): r["run"] for r in rows}
    cpu = {run: machine.get(("runs", run), unrecorded) for run in run_of.values()}
    counts = {}
    for run, m in cpu.items():
        counts[m] = counts.get(m, 0) + 1
    mixed = []
    for c in comparisons:
        for seed in c["seeds"]:
            a, b = run_of.get((c["setting"], seed)), run_of.get((reference, seed))
            if a and b and cpu[a] != cpu[b]:
                mixed.append(f"{c['setting']} seed {seed}")
    return ["\n**Provenance** (each run's `provenance.json`: the commit it executed and the CPU of every segment): "
            + "; ".join(f"{n} runs on {m}" for m, n in sorted(counts.items())) + ". "
            + (f"Pairs whose two runs ran on different CPUs: {', '.join(mixed)}." if mixed else
               "No pair's CPUs are known to differ." if set(counts) == {unrecorded} else "Every pair's two runs ran on one CPU.") + "\n"]
