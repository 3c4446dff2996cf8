"""The statistics of the study's comparisons: two settings trained on the same seeds are compared
through the per-seed differences d_k = metric(setting, seed k) − metric(reference, seed k), never
through two means over different seeds.

- paired_stats: mean of the d_k, their 95 % CI (Student t with n − 1 degrees of freedom) and the
  two-sided paired t-test p (t = mean / (sd / √n)).
- holm: Holm's step-down adjustment of a family of p-values (controls the family-wise error);
  benjamini_hochberg: the step-up adjustment that controls the false discovery rate instead.
- paired_power / seeds_for_power / detectable_effect: the power of that test for a true mean
  difference δ when the d_k have std σ: P(|T| > t_crit) with T noncentral t (df n − 1,
  noncentrality δ√n / σ). With `family` m > 1 they give the power under Holm over m comparisons:
  the test at level α / m, Holm's first step. That is what a comparison needs when the others have no
  effect (Holm's later steps add < 0.01 there, tests/test_study.py simulates it), and a lower bound
  otherwise.
- sd_interval: the 95 % CI of a std from its degrees of freedom (chi-square).
- best_scale_groups / paired_comparisons: the study's rows (models/report.py) paired by seed in its report (models/study_report.py).
"""
import math

import numpy as np
import scipy.stats


def paired_stats(deltas, alpha=0.05):
    """{'n', 'mean', 'sd', 'lo', 'hi', 'p'} of the per-seed differences (NaN where n < 2)."""
    d = np.asarray(deltas, dtype=np.float64)
    n = len(d)
    out = dict(n=n, mean=float(d.mean()) if n else math.nan, sd=math.nan, lo=math.nan, hi=math.nan, p=math.nan)
    if n < 2:
        return out
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = scipy.stats.t.ppf(1 - alpha / 2, n - 1) * sd / math.sqrt(n)
    # equal differences on every seed: no spread to test against (p 0 unless they are all 0)
    p = 2 * scipy.stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1) if sd > 0 else float(mean == 0)
    out.update(sd=sd, lo=mean - half, hi=mean + half, p=float(p))
    return out


def holm(pvalues):
    """Holm-adjusted p-values, in the input order: the i-th smallest p times (m − i + 1), made
    non-decreasing, capped at 1. NaN entries stay NaN and are not counted in m."""
    p = np.asarray(pvalues, dtype=np.float64)
    adjusted = np.full(len(p), math.nan)
    valid = np.flatnonzero(~np.isnan(p))
    running = 0.0
    for rank, i in enumerate(valid[np.argsort(p[valid], kind="stable")]):
        running = max(running, min(1.0, (len(valid) - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def benjamini_hochberg(pvalues):
    """Benjamini-Hochberg adjusted p-values (q-values), in the input order: the i-th smallest p times
    m / i, made non-decreasing from the largest down, capped at 1. NaN entries stay NaN and are not
    counted in m."""
    p = np.asarray(pvalues, dtype=np.float64)
    adjusted = np.full(len(p), math.nan)
    valid = np.flatnonzero(~np.isnan(p))
    running = 1.0
    order = valid[np.argsort(p[valid], kind="stable")]
    for rank in range(len(order) - 1, -1, -1):
        running = min(running, len(order) * p[order[rank]] / (rank + 1))
        adjusted[order[rank]] = running
    return adjusted


def paired_power(effect, sd, n, alpha=0.05, family=1):
    """Power of the two-sided paired t-test at level alpha with n pairs to detect a mean difference
    `effect` when the differences have std `sd`; under Holm over `family` comparisons, at alpha / family."""
    if n < 2 or not sd > 0:
        return math.nan
    df, nc = n - 1, abs(effect) * math.sqrt(n) / sd
    t_crit = scipy.stats.t.ppf(1 - alpha / family / 2, df)
    # P(T > t_crit) + P(T < −t_crit), the lower tail as P(T' > t_crit) with T' of noncentrality −nc:
    # scipy's nct.cdf returns nan far out in that tail (e.g. df 1, nc 15–30), its sf does not.
    return float(scipy.stats.nct.sf(t_crit, df, nc) + scipy.stats.nct.sf(t_crit, df, -nc))


def seeds_for_power(effect, sd, power=0.8, alpha=0.05, most=1000, family=1):
    """The smallest number of pairs whose paired_power reaches `power` (None beyond `most`)."""
    return next((n for n in range(2, most + 1) if paired_power(effect, sd, n, alpha, family) >= power), None)


def detectable_effect(sd, n, power=0.8, alpha=0.05, family=1):
    """The smallest mean difference that n pairs detect with `power` (bisection on paired_power)."""
    if n < 2 or not sd > 0:
        return math.nan
    lo, hi = 0.0, sd
    while paired_power(hi, sd, n, alpha, family) < power:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if paired_power(mid, sd, n, alpha, family) < power else (lo, mid)
    return hi


def sd_interval(sd, df, level=0.95):
    """(lo, hi): the CI of a normal std estimated as `sd` with `df` degrees of freedom, from
    df · s² / σ² ~ χ²(df)."""
    if not df or not np.isfinite(sd):
        return math.nan, math.nan
    tail = (1 - level) / 2
    return (sd * math.sqrt(df / scipy.stats.chi2.ppf(1 - tail, df)), sd * math.sqrt(df / scipy.stats.chi2.ppf(tail, df)))


def pooled_sd(stats):
    """(std, degrees of freedom) of several comparisons' per-seed differences pooled:
    √(Σ (n_i − 1) s_i² / Σ (n_i − 1)) over the paired_stats entries with n ≥ 2."""
    parts = [(st["n"] - 1, st["sd"]) for st in stats if st["n"] >= 2 and np.isfinite(st["sd"])]
    df = sum(d for d, _ in parts)
    return (math.sqrt(sum(d * s * s for d, s in parts) / df) if df else math.nan), df


def best_scale_groups(groups, fid):
    """Per (setting, step), the group (over seeds) of the guidance scale with the lowest mean FID."""
    best = {}
    for g in groups:
        key = (g["setting"], g["step"])
        if fid in g["mean"] and (key not in best or g["mean"][fid] < best[key]["mean"][fid]):
            best[key] = g
    return list(best.values())  # in the order of `groups`


def paired_comparisons(rows, best, names, reference, primary, fid):
    """Each setting against the reference at one training step, seed by seed: seed k of every setting
    starts from the same weights and data order, so Δ_k = metric(setting, k) − metric(reference, k),
    each at its own best scale, pairs away what the seeds share. Returns [{'setting', 'cfg', 'seeds',
    'stats': {metric: paired_stats + 'holm'}}]; the primary settings' FID p-values are Holm-adjusted
    as one family (the others keep 'holm' None)."""
    ref = next((g for g in best if g["setting"] == reference), None)
    if ref is None:
        return []

    def by_seed(g):
        return {r["seed"]: r["metrics"] for r in rows if r["setting"] == g["setting"] and r["cfg"] == g["cfg"] and r["step"] == g["step"]}
    ref_values, out = by_seed(ref), []
    for g in best:
        if g is ref or g["step"] != ref["step"]:
            continue
        values = by_seed(g)
        seeds = sorted(set(values) & set(ref_values))
        stats = {n: dict(paired_stats([values[k][n] - ref_values[k][n] for k in seeds if n in values[k] and n in ref_values[k]]), holm=None)
                 for n in names}
        out.append(dict(setting=g["setting"], cfg=g["cfg"], seeds=seeds, stats=stats))
    family = [c for c in out if c["setting"] in primary and fid in c["stats"]]
    for c, p in zip(family, holm([c["stats"][fid]["p"] for c in family])):
        c["stats"][fid]["holm"] = p
    return out
