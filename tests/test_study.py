"""study.py and models/report.py: the grid runs resumably end to end on a tiny budget, and the
tables' mean ± std and verdicts agree with an independent computation (numpy / statistics)."""
import json
import re
import shutil
import statistics
import sys

import numpy as np
import pytest
import scipy.stats

from tests.helpers import REPO, make_fake_fmnist, run_script

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


def test_verdicts_read_differences_against_the_pooled_spread():
    def group(setting, fids, accs, rmds):
        g = {"setting": setting, "cfg": 2.0, "mean": {}, "std": {}}
        for name, vals in (("fid_fmnist", fids), ("accuracy", accs), ("rmd_top1_fmnist", rmds)):
            g["mean"][name], g["std"][name] = float(np.mean(vals)), float(np.std(vals, ddof=1))
        return g
    clean = group("clean", [10, 11, 12], [0.80, 0.82, 0.84], [1.0, 1.1, 1.2])
    eta = group("η 5 %", [8.0, 8.5, 9.0], [0.81, 0.83, 0.85], [2.0, 2.1, 2.2])   # FID Δ −2.5 against s = √((1 + 0.25)/2) = 0.79
    worse = group("η 20 %", [14, 15, 16], [0.60, 0.61, 0.62], [0.5, 0.6, 0.7])
    lines = study.verdicts([clean, eta, worse], ["fid_fmnist", "accuracy", "rmd_top1_fmnist"])
    assert [ln[0] for ln in lines] == ["η 5 %", "η 20 %"]
    assert lines[0][2] == f"{-2.5:+.3g} (s {np.sqrt(1.25 / 2):.2g}) **better**"
    assert lines[0][3].endswith("≈")  # accuracy +0.01 against s = 0.02
    assert lines[0][4].endswith("↑")  # RMD: a difference, no better side
    assert lines[1][2].endswith("worse") and lines[1][3].endswith("worse")


def test_paired_deltas_pair_runs_by_seed_at_each_best_scale():
    """Δ_k = setting − clean on the same seed, each at its own best scale; a seed only one side has is
    left out; mean ± std (ddof 1) and the count of seeds on the better side match numpy's."""
    rng = np.random.default_rng(1)
    rows, table = [], {}
    for setting, best_cfg, seeds in (("clean", 3.0, (0, 1, 2)), ("CEP-U γ 1", 2.0, (0, 1, 2, 3))):
        for seed in seeds:
            for cfg in (2.0, 3.0):
                m = {"fid_fmnist": rng.uniform(40, 80), "accuracy": rng.uniform(0.5, 0.9), "rmd_top1_fmnist": rng.uniform(100, 200)}
                rows.append({"setting": setting, "seed": seed, "cfg": cfg, "metrics": m})
                table[setting, seed, cfg] = m
    chosen = [{"setting": "clean", "cfg": 3.0}, {"setting": "CEP-U γ 1", "cfg": 2.0}]
    (line,) = study.paired_deltas(rows, chosen, ["fid_fmnist", "accuracy", "rmd_top1_fmnist"])
    assert line[:3] == ["CEP-U γ 1", "2", "0,1,2"]  # seed 3 has no clean partner
    for cell, name, better in zip(line[3:], ("fid_fmnist", "accuracy", "rmd_top1_fmnist"), (-1, 1, 0)):
        d = np.array([table["CEP-U γ 1", k, 2.0][name] - table["clean", k, 3.0][name] for k in (0, 1, 2)])
        listed, summary = cell.split(" → ")
        assert [float(v) for v in listed.split(", ")] == pytest.approx(d, rel=6e-3)
        mean, rest = summary.split(" ± ")
        assert float(mean) == pytest.approx(d.mean(), rel=6e-3, abs=1e-3)
        assert float(rest.split(" ")[0]) == pytest.approx(d.std(ddof=1), rel=3e-2)
        assert (f"({int(np.sum(better * d > 0))}/3 better, p " in cell) == bool(better)
        t = d.mean() / (d.std(ddof=1) / np.sqrt(3))  # the paired t statistic, 2 degrees of freedom
        assert float(cell.split("p ")[1].rstrip(")")) == pytest.approx(2 * scipy.stats.t.sf(abs(t), 2), rel=5e-2)  # 2 digits


def test_study_runs_resumes_and_reports(tmp_path):
    """A tiny grid (2 settings x 1 seed, 4 steps): an interrupted run is resumed, every stage's
    files are written, a rerun does nothing, and the report holds both settings."""
    data, out, res = tmp_path / "data", tmp_path / "study", tmp_path / "results"
    make_fake_fmnist(data, n=200)
    # an interrupted run: 2 of its 4 steps done
    run_script("train.py", ["--data-path", data, "--out-dir", out, "--run-name", "clean_seed0", "--max-steps", "2",
                            "--global-batch-size", "8", "--log-every", "1"])
    flags = ["--only", "clean_seed0,eta5_seed0", "--data-path", data, "--out-dir", out, "--results", res, "--max-steps", "4",
             "--train-args", "--global-batch-size 8 --log-every 2", "--num-samples", "20", "--sample-steps", "3",
             "--cfg-scales", "2", "--fixed-cfg", "2", "--nproc-per-node", "1", "--sample-args", "--batch-size 10"]
    proc = run_script("study.py", flags)
    assert "resuming at step 2" in proc.stdout
    assert len(re.findall(r"^\$ .*train\.py", proc.stdout, re.M)) == 2
    for run, tags in (("clean_seed0", ["dpm3_cfg2", "dpm50_cfg2", "dpm3_cfg2_seed1", "dpm3_cfg2_seed2"]),
                      ("eta5_seed0", ["dpm3_cfg2"])):
        assert sorted(p.name for p in (out / run / "samples").iterdir()) == sorted(tags)
        for tag in tags:
            m = json.loads((out / run / "samples" / tag / "metrics.json").read_text())
            assert m["sample_config"]["step"] == 4 and np.isfinite(m["metrics"]["fid_fmnist"]) and "fid_fmnist" in m["floor"]
        times = json.loads((out / run / "study_times.json").read_text())
        assert times["train"] > 0 and len([k for k in times if k.startswith("sample ")]) == len(tags)
    assert json.loads((out / "eta5_seed0" / "config.json").read_text())["corrupt"] == 0.05
    readme = (res / "README.md").read_text()
    assert "| clean | " in readme and "| η 5 % | " in readme and "Sampling noise" in readme and "Sampler steps" in readme
    for name in ("eta.png", "eta_best.png", "fid_is.png", "cep.png", "runs/clean_seed0/samples/dpm3_cfg2/grid.png",
                 "runs/eta5_seed0/samples/dpm3_cfg2/grid.png", "runs/eta5_seed0/samples/dpm3_cfg2/metrics.json",
                 "runs/eta5_seed0/config.json", "runs/eta5_seed0/study_times.json"):
        assert (res / name).stat().st_size > 0, name
    assert "(runs/eta5_seed0/samples/dpm3_cfg2/grid.png)" in readme
    # the report needs only the copied files: without the runs it is regenerated the same
    (out / "eta5_seed0").rename(tmp_path / "moved")
    run_script("study.py", flags + ["--report-only"])
    assert (res / "README.md").read_text() == readme
    (tmp_path / "moved").rename(out / "eta5_seed0")
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
    # a rerun finds everything done: no stage runs again
    before = readme
    proc = run_script("study.py", flags)
    assert "$ " not in proc.stdout and (res / "README.md").read_text() == before
    # the condition probe on a run of the grid
    proc = run_script("-m", ["models.probe", "--ckpt", out / "clean_seed0" / "ckpt" / "last.pt", "--num-images", "16",
                             "--json", tmp_path / "probe.json"])
    assert len(re.findall(r"^t=\s*\d+ .*rms\(cond - uncond\)", proc.stdout, re.M)) == 5
    assert set(json.loads((tmp_path / "probe.json").read_text())["timesteps"]) == {"999", "700", "500", "300", "100"}
    proc = run_script("-m", ["models.probe", "--ckpt", tmp_path / "none.pt"], check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error:")
    listing = run_script("study.py", flags + ["--list"]).stdout
    assert re.search(r"clean_seed0\s+done\s+4/4", listing) and re.search(r"eta5_seed0\s+done\s+1/1", listing)


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
