"""Per-family training recipes (models/build.py), the β schedules, and the schedule a run was
trained with travelling in its checkpoint to sample.py and finetune.py."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
from models.common import learning_rate  # noqa: E402
from models.build import (FINETUNE_RECIPES, LEGACY_RUN, TRAINING_RECIPES, apply_recipe, recipe_family, training_recipe,  # noqa: E402
                          with_legacy_defaults)
from models.common import UsageError  # noqa: E402
from models.diffusion import GaussianDiffusion, beta_schedule  # noqa: E402
from tests.helpers import make_fake_fmnist, run_script, tree_snapshot  # noqa: E402


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fmnist")
    make_fake_fmnist(d, n=64)
    return d


def load_ckpt(run_dir, name="last.pt"):
    return torch.load(Path(run_dir) / "ckpt" / name, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# schedules


@pytest.mark.parametrize("schedule,start,end", [("linear", 1e-4, 0.02), ("scaled_linear", 0.0015, 0.0195),
                                                ("scaled_linear", 0.00085, 0.012)])
def test_schedules_match_diffusers(schedule, start, end):
    """diffusers' DDPMScheduler is the reference: "linear" is DDPM's, "scaled_linear" LDM's
    "linear" (√β linear, cin256-v2: 0.0015 -> 0.0195) and Stable Diffusion's (0.00085 -> 0.012)."""
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=start, beta_end=end, beta_schedule=schedule)
    ours = beta_schedule(schedule, start, end)
    np.testing.assert_allclose(ours, ref.betas.double().numpy(), rtol=1e-6)  # diffusers works in float32
    np.testing.assert_allclose(GaussianDiffusion(ours).alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=1e-5)
    # LDM's formula, written out: β_t = (√β_start + (√β_end − √β_start)·t/999)²
    if schedule == "scaled_linear":
        t = np.arange(1000)
        np.testing.assert_allclose(ours, (start ** 0.5 + (end ** 0.5 - start ** 0.5) * t / 999) ** 2, rtol=1e-12)
    with pytest.raises(ValueError, match="unknown schedule"):
        beta_schedule("cosine")


def test_old_checkpoints_get_ddpm_linear():
    np.testing.assert_array_equal(GaussianDiffusion.from_config(None).betas, np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_array_equal(GaussianDiffusion.from_config({"schedule": "scaled_linear", "beta_start": 0.0015,
                                                                 "beta_end": 0.0195}).betas,
                                  beta_schedule("scaled_linear", 0.0015, 0.0195))


# ---------------------------------------------------------------------------------------------
# the recipes


def test_recipe_table_values():
    """The values of the original code and the paper, one by one (a typo here changes a run)."""
    dit, ldm = training_recipe("DiT-XL/2"), training_recipe("LDM-4")
    assert dit == training_recipe("DiT-S/8") == training_recipe("DiT-B/4") == TRAINING_RECIPES["DiT"]
    assert (dit["schedule"], dit["beta_start"], dit["beta_end"], dit["learn_sigma"]) == ("linear", 1e-4, 0.02, True)
    assert (dit["lr"], dit["weight_decay"], dit["grad_clip"], dit["ema_decay"], dit["ema_warmup"]) == (1e-4, 0.0, 0.0, 0.9999, False)
    assert (dit["global_batch_size"], dit["max_steps"]) == (256, 400_000)
    assert (ldm["schedule"], ldm["beta_start"], ldm["beta_end"], ldm["learn_sigma"]) == ("scaled_linear", 0.0015, 0.0195, False)
    assert (ldm["lr"], ldm["weight_decay"], ldm["grad_clip"], ldm["ema_decay"]) == (1e-4, 0.01, 0.0, 0.0)
    assert (ldm["global_batch_size"], ldm["max_steps"]) == (512, 178_000)
    assert recipe_family("DiT-T/4") == recipe_family("UNet-T") == recipe_family("UNet-S") == "tiny"
    stock = training_recipe("DiT-XL/2", "controlnet")
    assert stock == training_recipe("LDM-4", "t2i-adapter") == FINETUNE_RECIPES["stock"]
    assert (stock["lr"], stock["weight_decay"], stock["grad_clip"], stock["ema_decay"], stock["class_dropout"]) == (5e-6, 0.01, 1.0, 0.0, 0.0)
    assert training_recipe("LDM-4", "full")["lr"] == 1e-4 and training_recipe("DiT-T/4", "controlnet") == FINETUNE_RECIPES["tiny"]


def test_explicit_flags_override_the_recipe():
    parser = train.get_parser()
    args = parser.parse_args(["--model", "LDM-4", "--lr", "3e-5", "--no-learn-sigma", "--ema-decay", "0.999", "--weight-decay", "0"])
    apply_recipe(args)
    assert (args.lr, args.ema_decay, args.weight_decay, args.schedule, args.beta_end, args.global_batch_size) == (3e-5, 0.999, 0.0, "scaled_linear", 0.0195, 512)
    args = parser.parse_args(["--model", "DiT-XL/2", "--learn-sigma", "--grad-clip", "2"])
    apply_recipe(args)
    assert (args.learn_sigma, args.grad_clip, args.lr, args.max_steps) == (True, 2.0, 1e-4, 400_000)


def test_help_shows_the_table():
    out = run_script("train.py", ["--help"]).stdout
    assert "LDM     scaled_linear  0.0015      0.0195    False        0.0001  0             none      0.01" in out
    assert "DiT     linear         0.0001      0.02      True         0.0001  0             none      0 " in out


@pytest.fixture(scope="module")
def folder64(tmp_path_factory):
    """A tiny ImageFolder (3 classes of 64x64 RGB images) for LDM-4 / DiT-XL/2 dry runs."""
    from PIL import Image
    root = tmp_path_factory.mktemp("folder64")
    rng = np.random.default_rng(0)
    for k in range(3):
        (root / f"c{k}").mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / f"c{k}" / f"{i}.png")
    return root


@pytest.mark.parametrize("model,expected", [
    ("LDM-4", "scaled_linear β 0.0015 -> 0.0195, fixed variance (L_simple), AdamW lr 0.0001 weight decay 0.01, "
              "no grad clip, no EMA, class dropout 0.1, global batch 8, 1 steps"),
    ("DiT-XL/2", "linear β 0.0001 -> 0.02, learn_sigma (L_simple + L_vb), AdamW lr 0.0001 weight decay 0, "
                 "no grad clip, EMA 0.9999, class dropout 0.1, global batch 8, 1 steps")])
def test_dry_run_prints_the_family_defaults_and_writes_nothing(folder64, tmp_path, model, expected):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_script("train.py", ["--model", model, "--dataset", "imagefolder", "--data-path", folder64, "--image-size", "64",
                                   "--out-dir", out, "--dry-run", "--global-batch-size", "8", "--max-steps", "1"])
    assert expected in proc.stdout
    assert "dry run: nothing written" in proc.stdout and tree_snapshot(out) == {}
    # without the size flags: the paper's batch and length
    proc = run_script("train.py", ["--model", model, "--dataset", "imagefolder", "--data-path", folder64, "--image-size", "64",
                                   "--out-dir", out, "--dry-run", "--corrupt", "0.25"], check=False)
    assert proc.returncode == 2 and "exceeds the 12 training examples" in proc.stderr  # batch 512 / 256 > 12 images


def test_effective_values_are_saved_and_used(fake_data, tmp_path):
    run_script("train.py", ["--data-path", fake_data, "--out-dir", tmp_path, "--run", "r", "--model", "DiT-T/8",
                            "--global-batch-size", "8", "--max-steps", "2", "--weight-decay", "0.05", "--schedule", "scaled_linear",
                            "--beta-start", "0.0015", "--beta-end", "0.0195"])
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert {k: config[k] for k in ("lr", "warmup_steps", "grad_clip", "ema_decay", "ema_warmup", "learn_sigma", "class_dropout")} == \
        dict(lr=4e-3, warmup_steps=200, grad_clip=1.0, ema_decay=0.9999, ema_warmup=True, learn_sigma=True, class_dropout=0.1)
    ckpt = load_ckpt(tmp_path / "r")
    assert ckpt["diffusion"] == dict(schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, num_timesteps=1000,
                                     learn_sigma=True, loss="hybrid")
    assert ckpt["opt"]["param_groups"][0]["weight_decay"] == 0.05
    assert ckpt["opt"]["param_groups"][0]["lr"] == pytest.approx(4e-3 * 2 / 200, rel=1e-12)  # step 2 of the linear warm-up


@pytest.mark.slow  # CI time, ~9 s: test_schedules_match_diffusers checks the schedules
def test_sample_rebuilds_the_stored_schedule(fake_data, tmp_path):
    """The same weights sampled under the checkpoint's schedule: a checkpoint without the entry (an
    older one) samples exactly as DDPM-linear, and changing only the stored schedule changes the
    images, so sample.py reads it rather than assuming one."""
    run_script("train.py", ["--data-path", fake_data, "--out-dir", tmp_path, "--run", "lin", "--model", "DiT-T/8",
                            "--global-batch-size", "8", "--max-steps", "3", "--lr", "1e-2"])
    ckpt = load_ckpt(tmp_path / "lin")
    for name, diffusion in (("old", None), ("ldm", dict(ckpt["diffusion"], schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195))):
        copy = {k: v for k, v in ckpt.items() if k != "diffusion"}
        if diffusion:
            copy["diffusion"] = diffusion
        (tmp_path / name / "ckpt").mkdir(parents=True)
        torch.save(copy, tmp_path / name / "ckpt" / "last.pt")
    images = {}
    for name in ("lin", "old", "ldm"):
        run_script("sample.py", ["--run", tmp_path / name, "--num-samples", "4", "--batch-size", "4", "--sampler", "ddpm",
                                 "--steps", "5", "--tag", "s"])
        images[name] = np.load(tmp_path / name / "samples" / "s" / "samples.npz")["arr_0"]
        saved = json.loads((tmp_path / name / "samples" / "s" / "sample_config.json").read_text())["diffusion"]
        assert saved["schedule"] == ("scaled_linear" if name == "ldm" else "linear")
    assert np.array_equal(images["lin"], images["old"])
    assert not np.array_equal(images["lin"], images["ldm"])


@pytest.mark.slow  # CI time, ~11 s
def test_finetune_inherits_the_schedule(fake_data, tmp_path):
    common = ["--data-path", fake_data, "--out-dir", tmp_path, "--global-batch-size", "8", "--max-steps", "2"]
    run_script("train.py", [*common, "--run", "base", "--model", "DiT-T/8", "--schedule", "scaled_linear",
                            "--beta-start", "0.001", "--beta-end", "0.015", "--no-learn-sigma"])
    ft = ["finetune.py", [*common, "--init", tmp_path / "base", "--method", "full", "--val-size", "8"]]
    proc = run_script(ft[0], [*ft[1], "--dry-run"])
    assert "scaled_linear β 0.001 -> 0.015, fixed variance (L_simple), AdamW lr 0.0001 weight decay 0, grad clip 1, EMA 0.9999 (warm-up)" in proc.stdout
    run_script(ft[0], [*ft[1], "--run", "ft"])
    assert load_ckpt(tmp_path / "ft")["diffusion"] == load_ckpt(tmp_path / "base")["diffusion"]
    proc = run_script(ft[0], [*ft[1], "--run", "ft2", "--schedule", "linear"], check=False)
    assert proc.returncode == 2 and "--schedule scaled_linear, not linear" in proc.stderr


def test_resume_of_a_run_saved_before_the_recipes(tmp_path):
    """An LDM-4 run whose config.json predates --schedule / --weight-decay was trained with DDPM's
    schedule and no weight decay; a resume must keep those, not take cin256-v2's."""
    run = tmp_path / "old"
    (run / "ckpt").mkdir(parents=True)
    parser = train.get_parser()
    saved = {k: v for k, v in vars(parser.parse_args(["--model", "LDM-4"])).items() if k not in train.NOT_SAVED}
    saved.update(learn_sigma=True, lr=1e-4, grad_clip=1.0, ema_decay=0.9999, ema_warmup=True, global_batch_size=64,
                 max_steps=10, ckpt_every=5, class_dropout=0.1)
    for key in LEGACY_RUN:
        saved.pop(key)
    (run / "config.json").write_text(json.dumps(saved))
    torch.save({"model": {}, "ema": {}, "opt": {}, "step": 5}, run / "ckpt" / "last.pt")
    sys_argv, sys.argv = sys.argv, ["train.py", "--out-dir", str(tmp_path), "--run", "old", "--resume"]
    try:
        args = parser.parse_args()
        train.resolve_run(args, parser)
        train.check_args(args)
        assert (args.schedule, args.beta_start, args.beta_end, args.weight_decay, args.learn_sigma) == ("linear", 1e-4, 0.02, 0.0, True)
        sys.argv += ["--weight-decay", "0.01"]
        with pytest.raises(UsageError, match="--weight-decay=0.0 \\(now 0.01\\)"):
            train.resolve_run(parser.parse_args(), parser)
    finally:
        sys.argv = sys_argv
    shutil.rmtree(run)


def test_learning_rate_warm_up_then_cosine():
    import math
    from argparse import Namespace
    cosine = Namespace(lr=2.0, warmup_steps=4, lr_decay="cosine", max_steps=12)
    got = [learning_rate(s, cosine) for s in range(12)]
    assert got[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # (s + 1) / 4 of the peak
    assert got[8] == pytest.approx(1.0)  # half-way through the decay: cos(π/2) = 0
    assert got[11] == pytest.approx(1 + math.cos(7 * math.pi / 8)) and got[11] < 0.04 * 2  # last step: under 4 % of the peak
    assert all(a > b for a, b in zip(got[4:], got[5:]))
    constant = Namespace(lr=2.0, warmup_steps=0, lr_decay="none", max_steps=12)
    assert [learning_rate(s, constant) for s in (0, 5, 11)] == [2.0, 2.0, 2.0]


def test_lcm_students_saved_before_the_guided_warmup():
    """An LCM run whose config predates --lcm-guided-warmup was distilled without it: read as 0, so the
    report keeps it apart from a run with the warm-up; other methods get no such key."""
    from models.report import distinguish_settings
    base = {"method": "lcm", "lr": 3e-4, "lcm_skip": 20, "seed": 0}
    old, new = with_legacy_defaults(base), with_legacy_defaults({**base, "lcm_guided_warmup": 100})
    assert old["lcm_guided_warmup"] == 0 and new["lcm_guided_warmup"] == 100
    assert "lcm_guided_warmup" not in with_legacy_defaults({"method": "controlnet"})
    rows = [{"setting": "LCM clean", "rc": rc} for rc in (old, new, with_legacy_defaults({**base, "lcm_skip": 50}))]
    distinguish_settings(rows)
    assert len({r["setting"] for r in rows}) == 3, [r["setting"] for r in rows]
