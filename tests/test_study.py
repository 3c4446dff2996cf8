"""study.py, models/report.py and models/study_report.py: the grid runs resumably end to end on a tiny budget, and the
tables' mean ± std and verdicts agree with an independent computation (numpy / statistics)."""
import json
import re
import shlex
import shutil
import subprocess
import statistics
import sys

import numpy as np
import pytest
import scipy.stats

from tests.helpers import REPO, run_script

sys.path.insert(0, str(REPO))
import study  # noqa: E402


def fake_metrics(root, run, tag, rc, metrics, cfg=2.0, sampler="dpm-solver++", steps=20, seed=0):
    folder = root / run / "samples" / tag
    folder.mkdir(parents=True)
    sc = {"run_config": rc, "cfg_scale": cfg, "sampler": sampler, "steps": steps, "seed": seed, "step": 100}
    (folder / "metrics.json").write_text(json.dumps({"num_samples": 50, "metrics": metrics, "sample_config": sc}))


def seed_offset(setting):
    return len(setting)  # max_steps differs between runs: not a setting of its own (the step column tells)


def test_compare_gives_mean_and_std_over_seeds(tmp_path):
    """Runs that differ only in their seed form one row: n, the seeds, and mean ± sample std (ddof 1)."""
    rng = np.random.default_rng(0)
    values = {}
    for setting, rc in (("clean [lr=0.001]", {}), ("η 5 %", {"corrupt": 0.05}), ("CEP-G γ 1", {"cep": True, "cep_type": "gaussian"}),
                        ("clean [lr=0.002]", {"lr": 0.002})):  # trained otherwise: another setting, not more seeds
        rc = {"lr": 0.001, "max_steps": 100 + seed_offset(setting), **rc}
        for seed in (0, 1, 2):
            fid, acc, is_ = rng.uniform(5, 50), rng.uniform(0.3, 0.9), rng.uniform(2, 8)
            values.setdefault(setting, []).append((fid, acc, is_))
            # a run made before --precision existed, one that left it unrecorded, one that recorded it: one setting
            newer = {"precision": [None, "fp32"][seed - 1], "grad_checkpoint": False} if setting == "η 5 %" and seed else {}
            fake_metrics(tmp_path, f"{setting}-{seed}".replace(" ", ""), "s", {**rc, **newer, "seed": seed, "model": "DiT-T/4"},
                         {"fid_fmnist": fid, "accuracy": acc, "is_fmnist": is_})
    run_script("evaluate.py", ["--compare", tmp_path])
    table = (tmp_path / "comparison.md").read_text().splitlines()
    assert len(table) == 2 + 4 and table[2].startswith("| clean [lr=0.001] |")  # the reference first
    for setting, vals in values.items():
        line = next(ln for ln in table if ln.startswith(f"| {setting} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[9:11] == ["3", "0,1,2"]  # n, seeds
        for cell, col in zip(cells[11:], zip(*vals)):
            mean, std = (float(x) for x in cell.split("±"))
            assert mean == pytest.approx(statistics.mean(col), rel=2e-3) and std == pytest.approx(statistics.stdev(col), rel=2e-2)
    assert (tmp_path / "comparison_eta.png").stat().st_size > 0 and (tmp_path / "comparison_fid_is.png").stat().st_size > 0


def test_paired_stats_holm_and_power_against_independent_references():
    """paired_stats against scipy's paired t-test and t interval; holm against its definition by brute
    force; paired_power against a Monte-Carlo simulation of the test; the seed count it plans is the
    first that reaches the power."""
    from models.stats import detectable_effect, holm, paired_power, paired_stats, pooled_sd, seeds_for_power
    rng = np.random.default_rng(3)
    a, b = rng.normal(10, 2, 5), rng.normal(11, 2, 5)
    st = paired_stats(b - a)
    assert st["p"] == pytest.approx(scipy.stats.ttest_rel(b, a).pvalue, rel=1e-10)
    lo, hi = scipy.stats.t.interval(0.95, 4, loc=np.mean(b - a), scale=scipy.stats.sem(b - a))
    assert (st["lo"], st["hi"]) == pytest.approx((lo, hi), rel=1e-10) and st["sd"] == pytest.approx(np.std(b - a, ddof=1))
    assert paired_stats([1.0])["n"] == 1 and np.isnan(paired_stats([1.0])["lo"])
    assert paired_stats([2.0, 2.0, 2.0])["p"] == 0.0 and paired_stats([0.0, 0.0])["p"] == 1.0
    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan])
    m = 4
    brute = [min(1, max((m - j) * q for j, q in enumerate(sorted(p[:4])) if q <= pi)) for pi in p[:4]]  # max over the smaller-or-equal ones
    assert holm(p)[:4] == pytest.approx(brute) and np.isnan(holm(p)[4])
    for effect, sd, n in ((1.0, 2.0, 6), (0.7, 0.6, 4), (3.0, 3.8, 3), (0.757, 0.057, 2), (0.6, 0.03, 2)):  # the last two: nc 19 and 28 at 1 df, where nct.cdf is nan
        sims = rng.normal(effect, sd, (20000, n))
        t = sims.mean(1) / (sims.std(1, ddof=1) / np.sqrt(n))
        simulated = np.mean(np.abs(t) > scipy.stats.t.ppf(0.975, n - 1))
        assert paired_power(effect, sd, n) == pytest.approx(simulated, abs=0.015)
    n = seeds_for_power(0.7, 0.6)
    assert paired_power(0.7, 0.6, n) >= 0.8 > paired_power(0.7, 0.6, n - 1)
    assert paired_power(detectable_effect(0.6, 5), 0.6, 5) == pytest.approx(0.8, abs=1e-6)
    sd, df = pooled_sd([paired_stats([1, 2, 4]), paired_stats([0, 3]), paired_stats([5])])
    assert df == 3 and sd == pytest.approx(np.sqrt((2 * np.var([1, 2, 4], ddof=1) + np.var([0, 3], ddof=1)) / 3))


def test_power_under_holm_against_a_simulation_of_the_design():
    """The power under Holm over 4 comparisons (paired_power with family 4) against a Monte-Carlo
    simulation of the study's design: every setting paired with one shared clean run per seed (so
    the four Δ share clean's noise), one setting with a true effect and three without, paired
    t-tests, Holm at 0.05: the effect's rejection rate agrees within 0.02. With all four effects
    real, Holm rejects more often, so the formula is a lower bound there. Also: the seed count and
    the detectable change under Holm, the std's chi-square CI against a simulation, and
    Benjamini-Hochberg against scipy's false_discovery_control."""
    from models.stats import benjamini_hochberg, detectable_effect, holm, paired_power, sd_interval, seeds_for_power
    rng = np.random.default_rng(11)
    sims = 20000
    for effect, sd_delta, n in ((0.782, 0.478, 8), (0.782, 0.478, 3), (0.5, 0.4, 6)):
        unit = sd_delta / np.sqrt(2)  # one run's std: Δ = setting − clean has std √2 · unit
        clean = rng.normal(0, unit, (sims, 1, n))
        settings = rng.normal(0, unit, (sims, 4, n)) + np.array([effect, 0, 0, 0])[None, :, None]
        for effects in ("one", "all"):
            d = settings - clean + (np.array([0, effect, effect, effect])[None, :, None] if effects == "all" else 0)
            t = d.mean(2) / (d.std(2, ddof=1) / np.sqrt(n))
            p = 2 * scipy.stats.t.sf(np.abs(t), n - 1)
            rejected = np.mean([holm(row)[0] < 0.05 for row in p])
            formula = paired_power(effect, sd_delta, n, family=4)
            if effects == "one":
                assert formula == pytest.approx(rejected, abs=0.02), (effect, sd_delta, n)
            else:
                assert formula <= rejected + 0.01
        assert paired_power(effect, sd_delta, n, family=4) < paired_power(effect, sd_delta, n)
    n = seeds_for_power(0.782, 0.478, family=4)
    assert paired_power(0.782, 0.478, n, family=4) >= 0.8 > paired_power(0.782, 0.478, n - 1, family=4)
    assert paired_power(detectable_effect(0.478, 8, family=4), 0.478, 8, family=4) == pytest.approx(0.8, abs=1e-6)
    # the CI of a std: it covers the true σ in 95 % of simulated samples of 9 values (8 df)
    draws = rng.normal(0, 1.0, (4000, 9)).std(1, ddof=1)
    cover = np.mean([lo <= 1.0 <= hi for lo, hi in (sd_interval(s, 8) for s in draws)])
    assert cover == pytest.approx(0.95, abs=0.012)
    p = np.array([0.001, 0.04, 0.03, 0.2, 0.012, np.nan, 0.5, 0.012])
    valid = ~np.isnan(p)
    assert benjamini_hochberg(p)[valid] == pytest.approx(scipy.stats.false_discovery_control(p[valid], method="bh"), rel=1e-12)
    assert np.isnan(benjamini_hochberg(p)[5])


def test_paired_comparisons_pair_runs_by_seed_at_each_best_scale():
    """Δ_k = setting − clean on the same seed, each at its own best scale (lowest mean FID); a seed only
    one side has is left out; the CI and p match scipy's on those differences; the primary family's
    FID p-values are Holm-adjusted together; verdicts need the CI to exclude 0 (and Holm there)."""
    from models.report import aggregate
    from models.study_report import claims_table, verdict
    from models.stats import best_scale_groups, holm, paired_comparisons
    rng = np.random.default_rng(1)
    rows, table = [], {}
    for setting, shift, seeds in (("clean", 0, (0, 1, 2)), ("CEP-U γ 1", -5, (0, 1, 2, 3)), ("η 2.5 %", 0.3, (0, 1, 2)), ("IP λ 0.1", 9, (0, 1, 2))):
        for seed in seeds:
            for cfg in (2.0, 3.0):
                m = {"fid_fmnist": 50 + shift + 10 * seed + (3 if cfg == 2.0 else 0) * (setting == "clean") + rng.normal(0, 0.3),
                     "accuracy": rng.uniform(0.5, 0.9), "rmd_top1_fmnist": rng.uniform(100, 200)}
                rows.append({"setting": setting, "seed": seed, "cfg": cfg, "metrics": m, "step": 100, "model": "m", "sampler": "s",
                             "sampler_options": "", "num_samples": 9, "sample_seed": 0, "train_min": 1.0, "train_img_s": 1.0})
                table[setting, seed, cfg] = m
    best = best_scale_groups(aggregate(rows), "fid_fmnist")
    assert {g["setting"]: g["cfg"] for g in best}["clean"] == 3.0  # clean's scale 2 is 3 points worse
    names = ["fid_fmnist", "accuracy", "rmd_top1_fmnist"]
    comps = {c["setting"]: c for c in paired_comparisons(rows, best, names, "clean", ("CEP-U γ 1", "η 2.5 %"), "fid_fmnist")}
    cep = comps["CEP-U γ 1"]
    assert cep["seeds"] == [0, 1, 2]  # seed 3 has no clean partner
    for name in names:
        d = np.array([table["CEP-U γ 1", k, cep["cfg"]][name] - table["clean", k, 3.0][name] for k in (0, 1, 2)])
        st = cep["stats"][name]
        assert st["mean"] == pytest.approx(d.mean()) and st["p"] == pytest.approx(scipy.stats.ttest_1samp(d, 0).pvalue)
    family = [comps[s]["stats"]["fid_fmnist"]["p"] for s in ("CEP-U γ 1", "η 2.5 %")]
    assert [comps[s]["stats"]["fid_fmnist"]["holm"] for s in ("CEP-U γ 1", "η 2.5 %")] == pytest.approx(list(holm(family)))
    assert comps["IP λ 0.1"]["stats"]["fid_fmnist"]["holm"] is None  # not primary
    # −5 with a spread of ~0.4 in Δ: better; IP +9 is in no family (not primary, not a control): a lead;
    # η 2.5 %'s +0.3: within the CI
    from models.study_report import analyse
    a = analyse(rows, False, 3.0, 100, "s", "fid_fmnist", names, "clean", ("CEP-U γ 1", "η 2.5 %"), ())
    comps = {c["setting"]: c for c in a["comparisons"]}
    cep = comps["CEP-U γ 1"]
    assert verdict(cep["stats"]["fid_fmnist"], "fid_fmnist") == "**better**"
    assert verdict(comps["IP λ 0.1"]["stats"]["fid_fmnist"], "fid_fmnist") == "lead: worse (uncorrected)"
    assert verdict(comps["η 2.5 %"]["stats"]["fid_fmnist"], "fid_fmnist").startswith("≈")
    assert verdict(cep["stats"]["rmd_top1_fmnist"], "rmd_top1_fmnist") in ("↑", "↓", "≈", "lead: ↑ (not after BH)", "lead: ↓ (not after BH)")
    # the secondary family: every other metric of the primary settings, Benjamini-Hochberg as one
    tests = [t[3] for t in a["secondary"]]
    assert len(tests) == 4 and {t[2] for t in a["secondary"]} == {"accuracy", "rmd_top1_fmnist"}
    assert [t["q"] for t in tests] == pytest.approx(list(scipy.stats.false_discovery_control([t["p"] for t in tests])))
    claims = claims_table(a, names)
    assert "| CEP-U lowers FID | CEP-U γ 1 | fid_fmnist | 3 |" in claims and "| supported |" in claims
    assert "| slight corruption lowers FID | η 2.5 % | fid_fmnist | 3 |" in claims and "inconclusive at this power" in claims
    assert "(Holm over 2)" in claims  # the power is the family's


def test_training_order_counts_runs_whose_fid_falls_at_every_step():
    """A run counts only if its value falls at every evaluated step at the fixed scale; a run missing a
    step, a set at another scale, and a metric a run lacks are left out; one step gives no check."""
    from models.study_checks import training_order_check
    steps = [10, 20, 40]
    fids = {"a_seed0": (9, 5, 2), "b_seed0": (9, 2, 5), "c_seed0": (3, 3, 1), "d_seed0": (8, 4, 1)}
    rows = [{"run": run, "cfg": 1.5, "step": st, "metrics": {"fid": v, **({"fid_ae": v} if run != "d_seed0" else {})}}
            for run, vs in fids.items() for st, v in zip(steps, vs)]
    rows += [{"run": "e_seed0", "cfg": 1.5, "step": 10, "metrics": {"fid": 9}},  # no later checkpoints
             {"run": "b_seed0", "cfg": 2.0, "step": 10, "metrics": {"fid": 0}}]  # another scale
    lines = training_order_check(rows, ["fid", "fid_ae"], 1.5, steps)
    table = {ln.split(" | ")[0].strip("| "): ln.split(" | ") for ln in lines[1].splitlines()[2:]}
    assert table["fid"][-1].strip(" |") == "2 / 4" and table["fid_ae"][-1].strip(" |") == "1 / 3"
    assert float(table["fid"][1]) == pytest.approx(np.mean([9, 9, 3, 8]), abs=0.05)
    assert training_order_check(rows, ["fid"], 1.5, [40]) == []


@pytest.mark.parametrize("full", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["core", "full"])
def test_study_runs_resumes_and_reports(tmp_path, fake_fmnist, full):
    """A tiny converged grid (2 settings x 2 seeds, 4 steps): an interrupted run is resumed, every
    stage's files are written, the report pairs the settings by seed, the report is regenerated the
    same from the copied files alone, a rerun does nothing. The full (slow) case adds the learning
    curve at steps 1 and 2, --plan, the copies' upkeep, the probe, --list and the reproduction
    section. On the session's fake dataset, whose feature classifier and autoencoder evaluate.py
    has already trained and cached."""
    data, out, res = fake_fmnist, tmp_path / "study", tmp_path / "results"
    # an interrupted run: 2 of its 4 steps done
    run_script("train.py", ["--data-path", data, "--out-dir", out, "--run-name", "clean_seed0", "--max-steps", "2",
                            "--global-batch-size", "8", "--log-every", "1", "--ckpt-every", "1"])
    flags = ["--grid", "converged", "--seeds", "2", "--only", "clean_*,eta5_*", "--data-path", data, "--out-dir", out, "--results", res,
             "--max-steps", "4", "--train-args", "--global-batch-size 8 --log-every 2", "--num-samples", "20", "--sample-steps", "3",
             "--cfg-scales", "2", "--curve-scales", "2" if full else "none", "--fixed-cfg", "2", "--nproc-per-node", "1",
             "--sample-args", "--batch-size 10", "--code", "checkout"]
    proc = run_script("study.py", flags)
    assert "resuming at step 2" in proc.stdout
    assert re.findall(r"^== \[\d/4\] (\S+)", proc.stdout, re.M) == ["clean_seed0", "eta5_seed0", "clean_seed1", "eta5_seed1"]  # seed-major
    assert len(re.findall(r"^\$ .*train\.py", proc.stdout, re.M)) == 4
    curve = {"step1_dpm3_cfg2": 1, "step2_dpm3_cfg2": 2, "dpm3_cfg2": 4} if full else {"dpm3_cfg2": 4}
    for run, tags in (("clean_seed0", {**curve, "dpm50_cfg2": 4, "dpm3_cfg2_seed1": 4, "dpm3_cfg2_seed2": 4}),
                      ("eta5_seed0", curve), ("clean_seed1", curve), ("eta5_seed1", curve)):
        assert sorted(p.name for p in (out / run / "samples").iterdir()) == sorted(tags)
        for tag, step in tags.items():
            m = json.loads((out / run / "samples" / tag / "metrics.json").read_text())
            assert m["sample_config"]["step"] == step and np.isfinite(m["metrics"]["fid_fmnist"]) and "fid_fmnist" in m["floor"]
        times = json.loads((out / run / "study_times.json").read_text())
        assert times["train"] > 0 and len([k for k in times if k.startswith("sample ")]) == len(tags)
    assert json.loads((out / "eta5_seed1" / "config.json").read_text())["corrupt"] == 0.05
    readme = (res / "README.md").read_text()
    assert "| clean | " in readme and "| η 5 % | " in readme and "Sampling noise" in readme and "Sampler steps" in readme
    assert ("Training order" in readme) == full  # from the learning curve
    # the paired analysis: η 5 % against clean on seeds 0 and 1, with a CI, a verdict, the power, the claim, the learning curve
    line = next(ln for ln in readme.splitlines() if ln.startswith("| η 5 % | 2 | 0,1 | "))
    d = [json.loads((out / f"eta5_seed{k}" / "samples" / "dpm3_cfg2" / "metrics.json").read_text())["metrics"]["fid_fmnist"]
         - json.loads((out / f"clean_seed{k}" / "samples" / "dpm3_cfg2" / "metrics.json").read_text())["metrics"]["fid_fmnist"] for k in (0, 1)]
    assert line.split(" | ")[3].startswith(f"{np.mean(d):+.3g} [")
    assert "| slight corruption lowers FID | η 5 % | fid_fmnist | 2 |" in readme and ("## Learning curve" in readme) == full
    for name in ("eta.png", "fid_is.png", "runs/eta5_seed0/samples/dpm3_cfg2/grid.png", "runs/eta5_seed0/config.json"):
        assert (res / name).stat().st_size > 0, name
    # the report needs only the copied files: without the runs it is regenerated the same
    (out / "eta5_seed0").rename(tmp_path / "moved")
    run_script("study.py", flags + ["--report-only"])
    assert (res / "README.md").read_text() == readme
    (tmp_path / "moved").rename(out / "eta5_seed0")
    # a rerun finds everything done: no stage runs again
    proc = run_script("study.py", flags)
    assert "$ " not in proc.stdout and (res / "README.md").read_text() == readme
    if not full:
        return
    assert re.search(r"\| η 5 % \| [^|]+ \| [^|]+ \| [+-]", readme.split("## Learning curve")[1])  # Δ at every step
    # --plan: the pilot's spread (clean's seeds at the best scale), read from the runs; the seeds for power 0.8 at 10 %
    fids = [json.loads((out / f"clean_seed{k}" / "samples" / "dpm3_cfg2" / "metrics.json").read_text())["metrics"]["fid_fmnist"] for k in (0, 1)]
    planned = run_script("study.py", flags + ["--plan"]).stdout
    assert f"{np.mean(fids):.3f} ± {np.std(fids, ddof=1):.3f}; a 10 % change is {0.1 * np.mean(fids):.3f}" in planned
    from models.stats import seeds_for_power
    # σ_ref: the larger of the std over training seeds and the std over clean_seed0's sampling seeds
    noise = [json.loads((out / "clean_seed0" / "samples" / tag / "metrics.json").read_text())["metrics"]["fid_fmnist"]
             for tag in ("dpm3_cfg2", "dpm3_cfg2_seed1", "dpm3_cfg2_seed2")]
    sigma = max(np.std(fids, ddof=1), np.std(noise, ddof=1))
    assert f"std over 3 sampling seeds of clean_seed0 at guidance 2: {np.std(noise, ddof=1):.3f}; σ_ref = {sigma:.3f}" in planned
    bound = np.sqrt(2) * sigma
    assert f"σ_Δ {bound:.3f} unpaired bound (√2 σ_ref): {seeds_for_power(0.1 * np.mean(fids), bound)} seeds" in planned
    assert re.search(r"5 core settings: \d+ seeds fit 15 h", planned)
    # the hours of a run at idle speed: training at the 90th percentile of the logged img/s, each
    # sample set and evaluation at the median of its kind
    from models.study_plan import run_seconds
    logged = [json.loads(ln)["img_per_s"] for ln in (out / "clean_seed1" / "log.jsonl").read_text().splitlines()]
    times = json.loads((out / "clean_seed1" / "study_times.json").read_text())
    expect = 4 * 8 / np.percentile(logged, 90) + sum(len(v) * np.median(v) for v in
                                                     ([v for k, v in times.items() if k.startswith(w)] for w in ("sample ", "evaluate ")))
    assert run_seconds(str(out / "clean_seed1")) == pytest.approx(expect)
    for name in ("eta.png", "eta_best.png", "fid_is.png", "cep.png", "curve.png", "runs/clean_seed0/samples/dpm3_cfg2/grid.png",
                 "runs/eta5_seed0/samples/dpm3_cfg2/grid.png", "runs/eta5_seed0/samples/step1_dpm3_cfg2/metrics.json",
                 "runs/eta5_seed0/config.json", "runs/eta5_seed0/study_times.json"):
        assert (res / name).stat().st_size > 0, name
    assert not (res / "runs/eta5_seed0/samples/step1_dpm3_cfg2/grid.png").exists()  # the final weights' grid only
    assert "(runs/eta5_seed0/samples/dpm3_cfg2/grid.png)" in readme
    # a run being redone (here: a sample set not yet scored) keeps its committed files, and a
    # finished run's copy drops a set that is no longer in its folder
    m = out / "eta5_seed0" / "samples" / "dpm3_cfg2" / "metrics.json"
    m.rename(tmp_path / "metrics.json")
    stale = res / "runs" / "clean_seed0" / "samples" / "dpm9_cfg2"
    shutil.copytree(res / "runs" / "clean_seed0" / "samples" / "dpm3_cfg2", stale)
    run_script("study.py", flags + ["--report-only"])
    assert (res / "README.md").read_text() == readme and not stale.exists()
    assert (res / "runs" / "eta5_seed0" / "samples" / "dpm3_cfg2" / "metrics.json").exists()
    (tmp_path / "metrics.json").rename(m)
    # a sample set outside the grid (an exploration in the run's folder) stays out of the report
    shutil.copytree(out / "clean_seed0" / "samples" / "dpm3_cfg2", out / "clean_seed0" / "samples" / "explore_cfg9")
    run_script("study.py", flags + ["--report-only"])
    assert (res / "README.md").read_text() == readme and not (res / "runs" / "clean_seed0" / "samples" / "explore_cfg9").exists()
    # the condition probe on a run of the grid
    proc = run_script("-m", ["models.probe", "--ckpt", out / "clean_seed0" / "ckpt" / "last.pt", "--num-images", "16",
                             "--json", tmp_path / "probe.json"])
    assert len(re.findall(r"^t=\s*\d+ .*rms\(cond - uncond\)", proc.stdout, re.M)) == 5
    assert set(json.loads((tmp_path / "probe.json").read_text())["timesteps"]) == {"999", "700", "500", "300", "100"}
    proc = run_script("-m", ["models.probe", "--ckpt", tmp_path / "none.pt"], check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error:")
    listing = run_script("study.py", flags + ["--list"]).stdout
    assert re.search(r"clean_seed0\s+done\s+6/6", listing) and re.search(r"eta5_seed1\s+done\s+3/3", listing)
    # a run rerun from a fresh clone, its small files copied to reproduction/: each set against the committed one
    from models.report import fmt
    shutil.copytree(res / "runs" / "clean_seed1", res / "reproduction" / "clean_seed1")
    m = res / "reproduction" / "clean_seed1" / "samples" / "dpm3_cfg2" / "metrics.json"
    doc = json.loads(m.read_text())
    committed, n = doc["metrics"]["fid_fmnist"], len(doc["metrics"])
    doc["metrics"]["fid_fmnist"] += 0.5
    m.write_text(json.dumps(doc))
    run_script("study.py", flags + ["--report-only"])
    section = (res / "README.md").read_text().split("**Reproduction from a fresh clone**")[1].split("\n## ")[0]
    # read on the scale of two training seeds: σ, clean's std over its seeds at the fixed scale
    sigma = np.std(fids, ddof=1)
    assert f"σ = {fmt(sigma)} being the std of clean's fid_fmnist" in section
    assert "`python study.py --grid converged --only <run> --rerun reproduction`" in section
    records = len((res / "runs" / "clean_seed1" / "log.jsonl").read_text().splitlines())
    assert f"clean_seed1: {records} of {records} committed training-log records have the same step, loss" in section
    assert (f"| clean_seed1 | dpm3_cfg2 | {fmt(committed)} | {fmt(committed + 0.5)} | +0.5 | "
            f"{0.5 / (np.sqrt(2) * sigma):+.2f} | {n - 1} / {n} |") in section
    assert re.search(rf"\| clean_seed1 \| step1_dpm3_cfg2 \| [^|]+ \| [^|]+ \| \+0 \| \+0.00 \| {n} / {n} \|", section)


def test_study_refuses_bad_input(tmp_path):
    for extra, words in ((["--only", "nothing*"], "matches no run"), (["--cfg-scales", "1,x"], "--cfg-scales"),
                         (["--fixed-cfg", "7", "--cfg-scales", "1,2"], "--fixed-cfg"),
                         (["--train-args", "--max-steps 3"], "--max-steps"),
                         (["--dataset", "imagefolder", "--only", "asym5_seed0"], "--groups")):
        proc = run_script("study.py", ["--out-dir", tmp_path / "o", "--results", tmp_path / "r", *extra], check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error:") and words in proc.stderr, (extra, proc.stderr)
        assert proc.stderr.strip().count("\n") == 0
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


def test_probe_against_the_exact_class_denoiser():
    """Data of class k is the single image μ_k: the exact conditional ε-prediction is
    (x_t − √ᾱ μ_y)/√(1−ᾱ), so with the true label the error is 0, with a wrong label w it is
    ᾱ/(1−ᾱ)·mean((μ_y − μ_w)²), and against a null prediction of 0 the rms difference is rms(ε)."""
    import torch
    from models.diffusion import GaussianDiffusion
    from models.probe import probe
    torch.manual_seed(0)
    K, n = 4, 64
    mu = torch.randn(K, 1, 8, 8, dtype=torch.float64)
    diffusion = GaussianDiffusion.from_config(None, learn_sigma=False)
    abar = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float64)

    class Exact(torch.nn.Module):
        num_classes = K

        def forward(self, x, t, y):
            a = abar[t].view(-1, 1, 1, 1)
            eps = (x - a.sqrt() * mu[y.clamp(max=K - 1)]) / (1 - a).sqrt()
            return torch.where((y == K).view(-1, 1, 1, 1), torch.zeros_like(x), eps)

    labels = torch.arange(n) % K
    images = mu[labels]
    result = probe(Exact(), diffusion, images, labels, timesteps=(900, 500, 100), seed=3)
    g = torch.Generator().manual_seed(3)
    wrong = (labels + torch.randint(1, K, labels.shape, generator=g)) % K  # the probe's draw, repeated
    for tv, r in result.items():
        noise = torch.randn(images.shape, generator=g)
        expect_wrong = abar[tv] / (1 - abar[tv]) * ((mu[labels] - mu[wrong]) ** 2).mean()
        assert r["mse_true"] < 1e-12
        assert r["mse_wrong"] == pytest.approx(float(expect_wrong), rel=1e-6)
        assert r["rms_cond_minus_uncond"] == pytest.approx(float((noise ** 2).mean().sqrt()), rel=1e-6)
        assert r["mse_null"] == pytest.approx(float((noise ** 2).mean()), rel=1e-6)


def test_settings_are_ordered_by_kind_then_eta():
    """The report's row order: clean, the symmetric sweep by η (not as text: 10 after 7.5), the
    CEP / IP settings, then the asymmetric settings by η."""
    from models.report import setting_order
    labels = ["η 10 % asym", "CEP-U γ 1", "η 10 %", "η 5 % asym", "clean", "η 7.5 %", "IP λ 0.1", "η 2.5 %"]
    assert sorted(labels, key=setting_order) == ["clean", "η 2.5 %", "η 7.5 %", "η 10 %", "CEP-U γ 1", "IP λ 0.1",
                                                 "η 5 % asym", "η 10 % asym"]


def test_pinned_code_runs_what_this_study_asks(tmp_path):
    """The converged grid runs its pinned commit's study.py: that code accepts the command this
    study.py builds and lists exactly the run asked for with the sets it will make (the amendment's
    fixed scale for a new seed or the positive control, the protocol's sweep for seeds 0-2; the extra
    sampling seeds are this study.py's). A worktree that is not a clean checkout of the commit is
    refused."""
    commit = study.GRIDS["converged"]["pinned"]
    path = study.pinned_worktree(commit, str(REPO), root=tmp_path / "pinned")
    args = study.get_parser().parse_args(["--grid", "converged", "--out-dir", str(tmp_path / "out"), "--results", str(tmp_path / "res")])
    study.check_args(args)
    for run, pinned_sets, ours in (("eta15_seed0", 3, 3), ("clean_seed3", 3, 5), ("eta5_seed1", 9, 9)):
        name, seed = study.run_seed(run)
        assert len(study.sample_sets(args, run)) == ours
        cmd = study.pinned_command(args, run, name, seed)
        assert cmd[1] == "study.py" and cmd[cmd.index("--only") + 1] == run
        listing = subprocess.run(cmd + ["--list"], cwd=path, capture_output=True, text=True, timeout=300)
        assert listing.returncode == 0, listing.stderr
        assert re.fullmatch(rf"{re.escape(run)}\s+todo\s+0/{pinned_sets} sample sets evaluated\s+train.py {re.escape(shlex.join(study.SETTINGS[name]) or '(clean)')}\n",
                            listing.stdout), listing.stdout
    (tmp_path / "pinned" / commit[:7] / "train.py").write_text("# changed\n")
    with pytest.raises(study.UsageError, match="not a clean checkout"):
        study.pinned_worktree(commit, str(REPO), root=tmp_path / "pinned")


def test_report_reads_the_amendment_only_when_complete_and_checks_its_positive_control(tmp_path):
    """Hand-made runs of a grid with an amendment (seeds 3-4 and a positive control η 15 %): while any
    of the amendment's runs is missing, the report reads seeds 0-2 only and lists what is done (a fixed
    n); once all are done it reads every seed, with the sensitivity analyses, and its positive-control
    check finds an effect that is there (+3 FID on every seed) and says the design fails its check when
    the control has none. The secondary family is corrected together (Benjamini-Hochberg over 2 metrics
    x 4 settings)."""
    import argparse
    from models.study_report import write_study_report
    settings = {"clean": {}, "eta2.5": {"corrupt": 0.025}, "eta5": {"corrupt": 0.05}, "cep-u": {"cep": True, "cep_type": "uniform"},
                "cep-g": {"cep": True, "cep_type": "gaussian"}, "eta15": {"corrupt": 0.15}}
    runs = [f"{name}_seed{k}" for k in range(5) for name in settings]
    amendment = {"runs": {r for r in runs if int(r[-1]) >= 3 or r.startswith("eta15")}, "first_seed": 3}

    def grid(root, control_effect, only=None):
        rng = np.random.default_rng(5)
        for run in runs:
            name, seed = study.run_seed(run)
            fid = 8 + [0.0, 0.7, -0.4, 1.1, -0.9][seed] + (control_effect if name == "eta15" else 0) + rng.normal(0, 0.05)
            if only is None or run in only:
                fake_metrics(root / "runs", run, "dpm20_cfg1.5", {**settings[name], "seed": seed, "max_steps": 100},
                             {"fid_fmnist": fid, "accuracy": 0.87 - (0.05 if name == "eta15" else 0) + rng.normal(0, 0.002),
                              "recall_fmnist": 0.78 + rng.normal(0, 0.01)}, cfg=1.5)

    def report(root):
        args = argparse.Namespace(results=str(root), out_dir=str(root / "out"), sample_steps=20, fixed_cfg=1.5, max_steps=100,
                                  scale="fixed", grid="converged", only=None)
        write_study_report(args, runs, "clean", study.PRIMARY, ["η 15 %"], amendment)
        return (root / "README.md").read_text()

    partial = tmp_path / "partial"
    grid(partial, 3.0, only={r for r in runs if r not in amendment["runs"]} | {"eta15_seed0", "eta15_seed1", "clean_seed3"})
    text = report(partial)
    assert "**3 of 15 done**" in text and "Done: eta15_seed0, eta15_seed1, clean_seed3." in text
    assert "| η 5 % | 3 | " in text and "| η 5 % | 5 | " not in text  # seeds 0-2 only
    assert "- η 15 %: no finished runs in this analysis." in text and "## Sensitivity" not in text
    assert "Benjamini-Hochberg over 8" in text
    full = tmp_path / "full"
    grid(full, 3.0)
    text = report(full)
    assert "**complete**" in text and "| η 5 % | 5 | " in text and "## Sensitivity" in text
    control = next(ln for ln in text.splitlines() if ln.startswith("- η 15 % against the reference, 5 seeds"))
    assert "**the design detects it**" in control and "accuracy" in control
    assert "Seeds 3 to 4 alone" in text and "Seeds 0 to 2 alone" in text and "Verdicts that differ" in text
    null = tmp_path / "null"
    grid(null, 0.0)
    control = next(ln for ln in report(null).splitlines() if ln.startswith("- η 15 % against the reference, 5 seeds"))
    assert "**the design fails its own check**" in control


@pytest.mark.slow
def test_pinned_run_end_to_end(tmp_path, fake_fmnist):
    """One tiny run of the converged grid through its pinned code (the default, --code pinned): the
    pinned commit's train.py, sample.py and evaluate.py make it in .pinned/<commit>, the amendment's
    extra sampling seeds on clean come from the same worktree, and the run's small files, with its
    provenance (commit, CPU), reach the results."""
    out, res = tmp_path / "out", tmp_path / "res"
    flags = ["--grid", "converged", "--seeds", "4", "--only", "clean_seed3", "--data-path", fake_fmnist, "--out-dir", out, "--results", res,
             "--max-steps", "4", "--train-args", "--global-batch-size 8 --log-every 2", "--num-samples", "20", "--sample-steps", "3",
             "--cfg-scales", "2", "--curve-scales", "none", "--fixed-cfg", "2", "--nproc-per-node", "1", "--sample-args", "--batch-size 10",
             "--no-report"]
    proc = run_script("study.py", flags, timeout=1200)
    commit = study.GRIDS["converged"]["pinned"]
    assert f"(cd {REPO / '.pinned' / commit[:7]} && " in proc.stdout and "--only clean_seed3" in proc.stdout
    assert sorted(p.name for p in (res / "runs" / "clean_seed3" / "samples").iterdir()) == ["dpm3_cfg2", "dpm3_cfg2_seed1", "dpm3_cfg2_seed2"]
    seeds = [json.loads((res / "runs" / "clean_seed3" / "samples" / t / "metrics.json").read_text())["sample_config"]["seed"]
             for t in ("dpm3_cfg2", "dpm3_cfg2_seed1", "dpm3_cfg2_seed2")]
    assert seeds == [0, 1, 2]
    prov = json.loads((res / "runs" / "clean_seed3" / "provenance.json").read_text())
    assert prov["commit"] == commit and prov["segments"][0]["from_step"] == 0 and "avx512" in prov["segments"][0]
    assert [s["what"] for s in prov["segments"]] == ["study.py --only clean_seed3", "sample.py --tag dpm3_cfg2_seed1", "sample.py --tag dpm3_cfg2_seed2"]
    # done: a second call runs nothing
    assert "$ " not in run_script("study.py", flags, timeout=600).stdout


@pytest.mark.slow
def test_pinned_run_interrupted_and_rerun_ends_as_an_uninterrupted_one(tmp_path, fake_fmnist):
    """As an operator runs it: `study.py --grid converged --only <run>` (through the pinned code) gets
    SIGTERM on its whole process group after the run's first checkpoint (train.py writes last.pt, the
    study processes end), and the same command run again resumes and finishes. Its training log (step, loss, gradient norm)
    and the metrics of its sample set are those of the same command run without interruption."""
    import os
    import signal
    import time
    from tests.helpers import wait_for

    def flags(out):
        return ["--grid", "converged", "--seeds", "4", "--only", "eta5_seed3", "--data-path", str(fake_fmnist), "--out-dir", str(out),
                "--results", str(out) + "_res", "--max-steps", "60", "--train-args", "--global-batch-size 8 --log-every 2 --ckpt-every 10",
                "--num-samples", "20", "--sample-steps", "3", "--cfg-scales", "2", "--curve-scales", "none", "--fixed-cfg", "2",
                "--nproc-per-node", "1", "--sample-args", "--batch-size 10", "--no-report"]
    run_script("study.py", flags(tmp_path / "whole"), timeout=1200)
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "study.py", *flags(cut)], cwd=REPO, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(cut / "eta5_seed3" / "ckpt" / "0000010.pt", proc, timeout=600)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode != 0, (out[-2000:], err[-2000:])  # the study processes die of the signal; train.py writes last.pt first
    stopped_at = study.trained_steps(str(cut / "eta5_seed3"))
    assert 10 <= stopped_at < 60
    proc = run_script("study.py", flags(cut), timeout=1200)
    assert f"resuming at step {stopped_at}" in proc.stdout

    def log(root):
        return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, (root / "eta5_seed3" / "log.jsonl").read_text().splitlines())]

    def metrics(root):
        return json.loads((root / "eta5_seed3" / "samples" / "dpm3_cfg2" / "metrics.json").read_text())["metrics"]
    assert log(cut) == log(tmp_path / "whole") and len(log(cut)) == 30
    assert metrics(cut) == metrics(tmp_path / "whole")
