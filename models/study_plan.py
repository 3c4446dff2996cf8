"""study.py --plan: how many seeds a grid needs, from its finished runs.

- from a pilot (the reference's finished runs): the std of FID over its seeds (or over one run's
  sampling seeds, if larger), the std of the per-seed Δ that implies, the seeds for power 0.8
  against a 10 % change, the wall time of a run and how many seeds fit the hours given;
- from paired runs of the primary settings: the pooled std of their Δ with its CI, and at each end
  the power, the detectable change and the seeds needed under Holm over the family (unadjusted
  beside, labelled)."""
import json
import os

import numpy as np

from models.common import UsageError
from models.report import aggregate, main_metric, read_rows
from models.stats import (best_scale_groups, detectable_effect, paired_comparisons, paired_power, pooled_sd, sd_interval,
                          seeds_for_power)


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


def plan(out_dir, runs, reference, primary, sampler, max_steps, fixed_cfg, short_runs_dir, short_sampler, core, hours, seeds):
    """Print the plan from the runs named `runs` under out_dir; the ratio σ_Δ / σ_ref comes from the
    1,000-step grid's runs (short_runs_dir), the only grid where both were measured."""
    pilot = [r for r in read_rows(out_dir, {r for r in runs if r.startswith(f"{reference}_seed")})
             if r["step"] == max_steps and r["sample_seed"] == 0 and r["sampler"] == sampler]
    if len({r["seed"] for r in pilot}) < 2:
        raise UsageError(f"--plan needs at least 2 finished {reference} runs in {out_dir}")
    fid = main_metric(pilot[0]["metrics"], "fid")
    (ref,) = best_scale_groups(aggregate(pilot), fid)
    short = [r for r in read_rows(short_runs_dir) if r["sample_seed"] == 0 and r["sampler"] == short_sampler]
    short_best = best_scale_groups(aggregate(short), fid)
    short_ref = next(g for g in short_best if g["setting"] == reference)
    ratio = pooled_sd([c["stats"][fid] for c in paired_comparisons(short, short_best, [fid], reference, primary, fid)
                       if c["setting"] in primary])[0] / short_ref["std"][fid]
    # the std over training seeds (one sample set each) includes the sampling noise, so it cannot be
    # below the std over sampling seeds of one model; from 2-3 sets each, take the larger
    noise = [r["metrics"][fid] for r in read_rows(out_dir, {f"{reference}_seed0"}) if r["step"] == max_steps
             and r["cfg"] == fixed_cfg and r["sampler"] == sampler]
    sigma = max(ref["std"][fid], np.std(noise, ddof=1) if len(noise) > 1 else 0.0)
    run_hours = np.mean([run_seconds(os.path.join(out_dir, r)) for r in {r["run"] for r in pilot}]) / 3600
    effect = 0.1 * ref["mean"][fid]
    fit = int(hours // (core * run_hours))
    print(f"pilot: {reference} seeds {ref['seeds']}, {fid} at the best scale {ref['cfg']:g}: {ref['mean'][fid]:.3f} ± {ref['std'][fid]:.3f}; "
          f"a 10 % change is {effect:.3f}")
    if len(noise) > 1:
        print(f"std over {len(noise)} sampling seeds of {reference}_seed0 at guidance {fixed_cfg:g}: {np.std(noise, ddof=1):.3f}; "
              f"σ_ref = {sigma:.3f}, the larger of the two")
    for what, sd in ((f"paired (σ_Δ / σ_ref = {ratio:.2f}, the 1,000-step grid's)", ratio * sigma),
                     ("unpaired bound (√2 σ_ref)", np.sqrt(2) * sigma)):
        print(f"σ_Δ {sd:.3f} {what}: {seeds_for_power(effect, sd)} seeds for power 0.8")
    print(f"one run (train, sample, evaluate) at idle speed: {run_hours:.2f} h; {core} core settings: {fit} seeds fit {hours:g} h")
    plan_from_pairs(out_dir, runs, reference, primary, sampler, max_steps, fixed_cfg, fid, effect, seeds)


def plan_from_pairs(out_dir, runs, reference, primary, sampler, max_steps, fixed_cfg, fid, effect, seeds):
    """Where out_dir holds paired runs of the primary settings: the std of their per-seed Δ at the
    fixed scale, pooled over the primary family, with its 95 % CI, and at each end of it the power for
    `effect`, the change detectable with power 0.8 and the seeds that power needs, under Holm over the
    family (unadjusted beside, labelled), at `seeds` seeds and at 5 (the amendment's new seeds alone)."""
    rows = [r for r in read_rows(out_dir, set(runs)) if r["step"] == max_steps and r["sample_seed"] == 0 and r["sampler"] == sampler
            and r["cfg"] == fixed_cfg]
    family = [c for c in paired_comparisons(rows, aggregate(rows), [fid], reference, primary, fid) if c["setting"] in primary]
    sd, df = pooled_sd([c["stats"][fid] for c in family])
    if not df:
        return
    m, measured = len(family), max(len(c["seeds"]) for c in family)
    lo, hi = sd_interval(sd, df)
    print(f"paired: σ_Δ of {fid} at guidance {fixed_cfg:g}, pooled over {m} primary comparisons of {measured} seeds: {sd:.3f} "
          f"({df} df, 95 % CI [{lo:.3f}, {hi:.3f}]); a 10 % change is {effect:.3f}")
    for n in (seeds, 5):
        for label, s_ in (("CI low", lo), ("measured", sd), ("CI high", hi)):
            print(f"  {n} seeds, σ_Δ {s_:.3f} ({label}): Holm over {m}: power {paired_power(effect, s_, n, family=m):.3f}, detectable "
                  f"{detectable_effect(s_, n, family=m):.2f}, seeds for power 0.8 {seeds_for_power(effect, s_, family=m)}; unadjusted: "
                  f"power {paired_power(effect, s_, n):.3f}, detectable {detectable_effect(s_, n):.2f}, seeds {seeds_for_power(effect, s_)}")
