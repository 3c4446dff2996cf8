"""Latent consistency distillation (finetune.py --method lcm) and multistep consistency sampling
(sample.py --sampler lcm): the boundary condition, the student equal to its teacher at step 0, the
skipping-step DDIM solver against the DDIM sampler, and on Gaussian data (whose probability-flow
ODE map is closed form) the distillation target, the loss gradient and one-step sampling; then end
to end on a fake Fashion-MNIST (class and text teachers, corruption, CEP, resume) and the bad input."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.build import build_model  # noqa: E402
from models.diffusion import GaussianDiffusion, Sampler, classifier_free_guidance, consistency_boundary, lcm_timesteps, skipping_timesteps  # noqa: E402
from models.text import build_text_encoder  # noqa: E402
from tests.helpers import make_fake_fmnist, make_tiny_sd_pipeline, run_script, run_scripts_at_once, tree_snapshot  # noqa: E402

D = GaussianDiffusion(learn_sigma=False)  # DDPM's linear schedule
AB = torch.tensor(D.alphas_cumprod, dtype=torch.float64)
MU, S2 = torch.tensor([0.3, -0.5], dtype=torch.float64).view(1, 2, 1, 1), 0.16  # the data: N(μ, s² I) in 2 dimensions


def col(v):
    return v.view(-1, 1, 1, 1)


def marginal_var(t, s2=S2):
    return col(AB[t]) * s2 + 1 - col(AB[t])


def exact_eps(x, t, mu=MU, s2=S2):
    """E[ε | x_t] for Gaussian data: √(1-ᾱ)(x - √ᾱ μ) / (ᾱ s² + 1 - ᾱ)."""
    return (1 - col(AB[t])).sqrt() * (x.double() - col(AB[t]).sqrt() * mu) / marginal_var(t, s2)


def ode_map(x, t, t_to, mu=MU, s2=S2):
    """The probability-flow ODE map x_t -> x_{t_to} of Gaussian data: it keeps the standardised value."""
    return col(AB[t_to]).sqrt() * mu + (marginal_var(t_to, s2) / marginal_var(t, s2)).sqrt() * (x.double() - col(AB[t]).sqrt() * mu)


def exact_student(x, t, mu=MU, s2=S2):
    """The ε-output whose consistency function c_skip x + c_out x̂_0(ε) is the exact ODE map to t = 0."""
    c_skip, c_out = (col(c) for c in consistency_boundary(t.double()))
    x0 = (ode_map(x, t, torch.zeros_like(t), mu, s2) - c_skip * x.double()) / c_out.clamp(min=1e-30)
    eps = (x.double() - col(AB[t]).sqrt() * x0) / (1 - col(AB[t])).sqrt()
    return torch.where(col(t) == 0, torch.zeros_like(eps), eps)  # at t = 0, f = x whatever ε


def test_boundary_condition_and_timesteps():
    assert consistency_boundary(0.0) == (1.0, 0.0)
    t = torch.tensor([0, 0, 19, 999])
    x, eps = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    f = D.consistency_function(eps, x, t)
    assert torch.equal(f[:2], x[:2])  # f(x, 0) = x exactly, whatever the network says
    c_skip, c_out = consistency_boundary(19.0)
    assert math.isclose(c_skip, 0.25 / (190 ** 2 + 0.25)) and math.isclose(c_out, 190 / math.sqrt(190 ** 2 + 0.25))
    assert torch.allclose(f[2], c_skip * x[2] + c_out * D.predict_x0_from_eps(x[2:3], t[2:3], eps[2:3])[0])
    assert skipping_timesteps(1000, 20).tolist() == list(range(19, 1000, 20))
    assert lcm_timesteps(1000, 20, 1) == [999] and lcm_timesteps(1000, 20, 2) == [999, 499]
    assert lcm_timesteps(1000, 20, 4) == [999, 759, 499, 259]  # diffusers' LCMScheduler for 4 steps
    from diffusers import LCMScheduler  # the reference, step count by step count
    for skip, original_steps in ((20, 50), (10, 100), (40, 25)):
        scheduler = LCMScheduler(num_train_timesteps=1000, original_inference_steps=original_steps)
        for steps in range(1, original_steps + 1):
            scheduler.set_timesteps(steps)
            assert lcm_timesteps(1000, skip, steps) == scheduler.timesteps.tolist(), (skip, steps)
    with pytest.raises(ValueError):
        lcm_timesteps(1000, 20, 51)


def perturbed(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("name, text", [("DiT-T/4", False), ("UNet-T", False), ("DiT-T/4", True), ("UNet-T", True)])
def test_student_equals_teacher_at_initialisation(name, text):
    """finetune.py's student: the teacher's weights plus a zero-initialised guidance projection, so its
    ε equals the teacher's at every w; once that projection is not zero, w changes the output."""
    torch.manual_seed(0)
    config = dict(name=name, input_size=32, in_channels=1, num_classes=10, class_dropout=0.1, learn_sigma=True)
    if text:
        config["text_encoder"] = build_text_encoder("scratch", captions=["a bag", "a shirt"], max_length=4)
    teacher = perturbed(build_model(**config))
    student = build_model(**config, guidance_dim=256).eval()
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and missing and all("cond_proj" in k for k in missing)
    x, t = torch.randn(3, 1, 32, 32), torch.tensor([5, 500, 999])
    tok = teacher.tokenize(["a bag", "a shirt", ""]) if text else None
    cond = (tok["input_ids"], tok["attention_mask"]) if text else (torch.tensor([0, 3, 10]),)
    w = torch.tensor([0.0, 2.5, 14.0])
    with torch.no_grad():
        assert torch.equal(student(x, t, *cond, guidance=w), teacher(x, t, *cond))
        proj = [p for n, p in student.named_parameters() if "cond_proj" in n][0]
        proj.normal_(std=0.1)
        a, b = student(x, t, *cond, guidance=w), student(x, t, *cond, guidance=w + 1)
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="no guidance embedding"):
        teacher(x, t, *cond, guidance=w)


def test_skipping_ddim_step_is_the_ddim_sampler_step():
    sampler = Sampler(D, "ddim", steps=50)
    g = torch.Generator().manual_seed(0)
    x0, eps, x = (torch.randn(1, 1, 8, 8, generator=g) for _ in range(3))
    for t in (19, 39, 519, 999):
        for t_prev in (t - 20, max(t - 20, 0)):
            if t_prev < 0:
                continue
            jump = D.ddim_jump(x0, eps, torch.tensor([t_prev]))
            assert torch.allclose(jump, sampler.ddim_step(x, x0, eps, t, t_prev, None), atol=1e-6), (t, t_prev)


def distillation_mse(k, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.from_numpy(skipping_timesteps(1000, k))
    t = grid[torch.randint(0, len(grid), (n,), generator=g)]
    x0 = MU + math.sqrt(S2) * torch.randn(n, 2, 1, 1, generator=g, dtype=torch.float64)
    noise = torch.randn(n, 2, 1, 1, generator=g)
    as32 = lambda fn: lambda x, tt: fn(x, tt).float()  # noqa: E731
    out = D.consistency_distillation_losses(as32(exact_student), as32(exact_eps), as32(exact_student), x0.float(), t,
                                            (t - k).clamp(min=0), noise, "l2")
    return out["mse"].mean().item()


def test_distillation_target_is_the_probability_flow_map():
    """With the exact denoiser as teacher and the exact consistency function as target network, the
    target c_skip x_prev + c_out x̂_0 after the teacher's DDIM jump is the ODE map of x_{t_{n+k}} to 0,
    up to DDIM's local error, O(k²): the squared error falls 16-fold when k halves."""
    e20, e10, e5 = distillation_mse(20), distillation_mse(10), distillation_mse(5)
    assert e20 < 1e-4 * S2, e20  # rms 1 % of the data scale at LCM's k = 20
    assert e10 < e20 / 8 and e5 < e10 / 8, (e20, e10, e5)


def test_ict_loss_weight_is_the_closed_form():
    """--lcm-loss-weight ict: λ = 1 / (σ(t) - σ(t_prev)), σ = √((1 - ᾱ)/ᾱ), mean 1 over the grid, against
    float64 numpy from the β schedule; the weighted per-example loss is λ times the uniform one."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    sigma = np.sqrt(1 / np.cumprod(1 - betas) - 1)
    grid = np.arange(1, 51) * 20 - 1
    lam = 1 / (sigma[grid] - sigma[np.maximum(grid - 20, 0)])
    lam /= lam.mean()
    t = torch.tensor([19, 279, 519, 999, 19])
    got = D.consistency_weights(t, (t - 20).clamp(min=0), 20)
    want = torch.from_numpy(lam[(t.numpy() + 1) // 20 - 1]).float()
    assert torch.allclose(got, want, rtol=1e-5) and got[3] < 0.01 < 2 < got[0]  # the top of the grid counts ~400x less
    x0, noise = torch.randn(5, 2, 4, 4), torch.randn(5, 2, 4, 4)
    fn = lambda x, tt: 0.9 * x  # noqa: E731  (any ε-predictor)
    plain = D.consistency_distillation_losses(fn, fn, fn, x0, t, (t - 20).clamp(min=0), noise)["loss"]
    weighted = D.consistency_distillation_losses(fn, fn, fn, x0, t, (t - 20).clamp(min=0), noise, weight=got)["loss"]
    assert torch.allclose(weighted, got * plain)


@pytest.mark.parametrize("weighting", ["uniform", "ict"])
def test_loss_gradient_leads_to_the_data_gaussian(weighting):
    """A student of the Gaussian family (mean m, variance v) trained by the distillation loss (Huber,
    target = the student itself under no gradient) with the exact teacher ends at the data's (μ, s²),
    with LCM's uniform loss weight and with iCT's; at the truth the mean's gradient is nearly zero,
    away from it it is not."""
    m = torch.tensor([[0.8], [0.2]], dtype=torch.float64).view(1, 2, 1, 1).requires_grad_(True)
    log_v = torch.tensor(math.log(0.5), dtype=torch.float64, requires_grad=True)
    student = lambda x, t: exact_student(x, t, m, log_v.exp()).float()  # noqa: E731
    frozen = lambda x, t: exact_student(x, t, m.detach(), log_v.detach().exp()).float()  # noqa: E731
    grid = torch.from_numpy(skipping_timesteps(1000, 20))
    g = torch.Generator().manual_seed(0)

    def loss(n=512):
        t = grid[torch.randint(0, len(grid), (n,), generator=g)]
        x0 = MU + math.sqrt(S2) * torch.randn(n, 2, 1, 1, generator=g, dtype=torch.float64)
        t_prev = (t - 20).clamp(min=0)
        weight = D.consistency_weights(t, t_prev, 20) if weighting == "ict" else None
        return D.consistency_distillation_losses(student, lambda x, tt: exact_eps(x, tt).float(), frozen, x0.float(), t,
                                                 t_prev, torch.randn(n, 2, 1, 1, generator=g), "huber", weight=weight)["loss"].mean()

    start = torch.autograd.grad(loss(4096), [m, log_v])
    opt = torch.optim.Adam([m, log_v], lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert torch.allclose(m.detach(), MU, atol=0.03), m.flatten()
    assert abs(log_v.exp().item() - S2) < 0.02, log_v.exp().item()
    with torch.no_grad():
        m.copy_(MU)
        log_v.fill_(math.log(S2))
    at_truth = torch.autograd.grad(loss(4096), [m, log_v])
    # the mean's gradient; the variance's stays at ~0.02-0.04 whatever the batch: the Huber loss with
    # c = 0.001 is nearly L1, whose gradient is the sign of DDIM's tiny local error, not its size
    assert at_truth[0].norm() < 0.05 * start[0].norm(), (at_truth, start)


def test_guided_warmup_learns_the_guided_gaussian():
    """--lcm-guided-warmup: a teacher exact for class data N(μ_c, s²) and for the mixture's stand-in
    N(μ_∅, s²) under the null class; guided at scale s, its ε is exactly the Gaussian ε of mean
    μ_∅ + s (μ_c - μ_∅) (ε is affine in the mean). A Gaussian-family student (mean m) trained by the
    guidance-distillation loss at t drawn from all T ends there, not at μ_c."""
    mu_null = torch.tensor([-0.2, 0.1], dtype=torch.float64).view(1, 2, 1, 1)
    teacher = lambda x, t, y: torch.where(col(y) == 1, exact_eps(x, t, mu_null), exact_eps(x, t)).float()  # noqa: E731
    m = torch.zeros(1, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    opt, g = torch.optim.Adam([m], lr=0.02), torch.Generator().manual_seed(0)
    scale = torch.full((512,), 3.0)  # w = 2
    for _ in range(400):
        t = torch.randint(0, 1000, (512,), generator=g)
        x0 = MU + math.sqrt(S2) * torch.randn(512, 2, 1, 1, generator=g, dtype=torch.float64)
        guided = classifier_free_guidance(teacher, torch.zeros(512, dtype=torch.long), 1, scale)
        loss = D.guidance_distillation_losses(lambda x, tt: exact_eps(x, tt, m).float(), guided, x0.float(), t,
                                              torch.randn(512, 2, 1, 1, generator=g))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.allclose(m.detach(), mu_null + 3 * (MU - mu_null), atol=0.02), m.flatten()


@pytest.mark.parametrize("steps", [1, 4])
def test_perfect_student_samples_the_data_gaussian(steps):
    """Multistep consistency sampling with the exact consistency function: from N(0, I) noise, in 1 or
    4 steps (re-noised in between), the samples are the data Gaussian at t = 0 (√ᾱ_0 μ, ᾱ_0 s² + β_1)."""
    sampler = Sampler(D, "lcm", steps=steps)
    g = torch.Generator().manual_seed(1)
    x = sampler.sample(lambda x, t: exact_student(x, t).float(), torch.randn(20000, 2, 1, 1, generator=g),
                       noise_fn=lambda: torch.randn(20000, 2, 1, 1, generator=g)).double()
    mean, var = x.mean(dim=0).flatten(), x.var(dim=0).flatten()
    assert torch.allclose(mean, math.sqrt(D.alphas_cumprod[0]) * MU.flatten(), atol=0.012), mean
    assert torch.allclose(var, torch.full((2,), D.alphas_cumprod[0] * S2 + 1 - D.alphas_cumprod[0], dtype=torch.float64), rtol=0.05), var


# ---- end to end on a fake Fashion-MNIST ---------------------------------------------------------

@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("lcm")
    make_fake_fmnist(root / "data", n=256)
    out = root / "out"
    common = ["--data-path", root / "data", "--out-dir", out, "--global-batch-size", "16", "--lr", "1e-3", "--max-steps", "4"]
    run_script("train.py", [*common, "--run", "dit", "--model", "DiT-T/8"])
    run_script("train.py", [*common, "--run", "text", "--model", "UNet-T", "--dataset", "fashion-mnist-captions"])
    return root, out


LCM = ["--method", "lcm", "--global-batch-size", "8", "--log-every", "1", "--lr", "1e-3", "--lcm-guided-warmup", "0"]  # consistency steps


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow  # CI time, ~27 s: the text-teacher LCM run is CI's end-to-end LCM distillation
def test_distillation_run_target_network_sampling_and_compare(teachers):
    root, out = teachers
    run_script("finetune.py", ["--init", out / "dit", "--out-dir", out, "--run", "lcm1", *LCM, "--max-steps", "1"])
    ckpt, teacher = load(out / "lcm1" / "ckpt" / "last.pt"), load(out / "dit" / "ckpt" / "last.pt")
    assert ckpt["model_config"]["guidance_dim"] == 256 and ckpt["config"]["w_min"] == 1.0 and ckpt["config"]["split"] == "train"
    for k, v in ckpt["model"].items():  # θ⁻ = 0.95 θ⁻_0 + 0.05 θ_1, θ⁻_0 = the student at init = the teacher's EMA
        start = teacher["ema"].get(k, torch.zeros_like(v))
        assert torch.allclose(ckpt["lcm_target"][k], 0.95 * start + 0.05 * v, atol=1e-6), k
    assert any((ckpt["model"][k] - teacher["ema"][k]).abs().max() > 0 for k in teacher["ema"])
    run_script("sample.py", ["--run", out / "lcm1", "--sampler", "lcm", "--steps", "2", "--cfg-scale", "2,3",
                             "--num-samples", "10", "--tag", "l"])
    sc = json.loads((out / "lcm1" / "samples" / "l_cfg3" / "sample_config.json").read_text())
    assert sc["sampler"] == "lcm" and sc["steps"] == 2
    assert np.load(out / "lcm1" / "samples" / "l_cfg2" / "samples.npz")["arr_0"].shape == (10, 32, 32, 1)
    assert ckpt["model"]["t_embedder.cond_proj.weight"].abs().max() > 0  # the guidance embedding trains
    run_script("sample.py", ["--run", out / "lcm1", "--sampler", "ddim", "--force-sampler", "--steps", "2", "--cfg-scale", "3",
                             "--num-samples", "4", "--tag", "forced"])
    run_script("evaluate.py", ["--samples", out / "lcm1" / "samples" / "l_cfg3"])
    report = run_script("evaluate.py", ["--compare", out]).stdout + (out / "comparison.md").read_text()
    assert "LCM clean" in report and "lcm-2" in report


@pytest.mark.slow  # CI time (issue 31): its stage runs end to end in faster tests
def test_distillation_resume_is_exact(teachers):
    """Stopped and resumed at the end of the guided warm-up, the run ends bit for bit where the
    straight run ends; the warm-up's step (guidance distillation) is not the consistency step."""
    root, out = teachers
    args = ["--init", out / "dit", "--out-dir", out, *LCM, "--cep", "--lcm-loss", "l2", "--lcm-guided-warmup", "1"]
    run_script("finetune.py", [*args, "--run", "straight", "--max-steps", "2"])
    run_script("finetune.py", [*args, "--run", "halves", "--max-steps", "1"])
    first = load(out / "halves" / "ckpt" / "last.pt")
    run_script("finetune.py", ["--resume", "--run", "halves", "--out-dir", out, "--max-steps", "2"])
    a, b = load(out / "straight" / "ckpt" / "last.pt"), load(out / "halves" / "ckpt" / "last.pt")
    for part in ("model", "ema", "lcm_target"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    run_script("finetune.py", [*args[:-2], "--run", "no-warmup", "--max-steps", "1"])
    consistency = load(out / "no-warmup" / "ckpt" / "last.pt")
    assert first["config"]["lcm_guided_warmup"] == 1 and consistency["config"]["lcm_guided_warmup"] == 0
    assert any(not torch.equal(first["model"][k], consistency["model"][k]) for k in first["model"])


@pytest.mark.slow  # the default suite's time (README); run with -m slow
def test_two_ranks_match_one(teachers):
    """train.py's DDP loop under --method lcm: t, w, noise and δ are drawn for the global batch, so 2
    gloo ranks end where 1 rank ends (student and target network)."""
    root, out = teachers
    args = ["--init", out / "dit", "--out-dir", out, *LCM, "--cep", "--max-steps", "2"]
    run_script("finetune.py", [*args, "--run", "one"])
    run_script("finetune.py", [*args, "--run", "two"], nproc=2)
    a, b = load(out / "one" / "ckpt" / "last.pt"), load(out / "two" / "ckpt" / "last.pt")
    for part in ("model", "lcm_target"):
        assert max((a[part][k] - b[part][k]).abs().max().item() for k in a[part]) < 1e-4, part


def test_text_teacher_with_corrupted_captions_and_cep(teachers):
    root, out = teachers
    run_script("finetune.py", ["--init", out / "text", "--out-dir", out, "--run", "tl", *LCM, "--max-steps", "2",
                               "--corrupt", "0.25", "--cep", "--lcm-target-ema", "0", "--lcm-guided-warmup", "1"])
    ckpt = load(out / "tl" / "ckpt" / "last.pt")
    assert "lcm_target" not in ckpt and ckpt["config"]["corrupt"] == 0.25 and ckpt["config"]["cep_type"] == "uniform"
    run_script("sample.py", ["--run", out / "tl", "--sampler", "lcm", "--steps", "1", "--cfg-scale", "3", "--num-samples", "4"])


@pytest.mark.slow  # CI time (issue 31): its stage runs end to end in faster tests
def test_bad_input_one_line_exit_2_nothing_written(teachers):
    root, out = teachers
    run_script("train.py", ["--data-path", root / "data", "--out-dir", out, "--run", "nodrop", "--model", "DiT-T/8",
                            "--class-dropout", "0", "--global-batch-size", "16", "--max-steps", "1"])
    run_script("finetune.py", ["--init", out / "dit", "--out-dir", out, "--run", "ok", *LCM, "--max-steps", "1"])
    before = tree_snapshot(out)
    cases = [
        ("finetune.py", ["--init", out / "nodrop", "--out-dir", out, "--run", "x", *LCM], "no null condition"),
        ("finetune.py", ["--init", out / "dit", "--out-dir", out, "--run", "x", *LCM, "--w-min", "5", "--w-max", "2"], "--w-min <= --w-max"),
        ("finetune.py", ["--init", out / "dit", "--out-dir", out, "--run", "x", *LCM, "--lcm-guided-warmup", "-1"], "--lcm-guided-warmup >= 0"),
        ("finetune.py", ["--init", out / "dit", "--out-dir", out, "--run", "x", "--method", "full", "--w-max", "2"], "--w-max is for --method lcm"),
        ("finetune.py", ["--init", out / "dit", "--out-dir", out, "--run", "x", *LCM, "--control", "canny"], "no control input"),
        ("finetune.py", ["--init", out / "dit", "--out-dir", out, "--run", "x", *LCM, "--grad-accum", "2"], "not implemented for --method lcm"),
        ("sample.py", ["--run", out / "dit", "--sampler", "lcm", "--steps", "4"], "not one"),
        ("sample.py", ["--run", out / "ok", "--sampler", "lcm", "--steps", "4", "--cfg-scale", "7"], "outside the guidance"),
        ("sample.py", ["--run", out / "ok", "--sampler", "lcm", "--steps", "4", "--cfg-scale", "1"], "outside the guidance"),
        ("sample.py", ["--run", out / "ok", "--sampler", "lcm", "--steps", "60", "--cfg-scale", "3"], "--steps 60"),
        ("sample.py", ["--run", out / "ok", "--cfg-scale", "3"], "--force-sampler"),
    ]
    for (script, args, message), proc in zip(cases, run_scripts_at_once([c[:2] for c in cases])):
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)
    assert tree_snapshot(out) == before


# ---- a Stable Diffusion pipeline as the teacher (--init <diffusers folder or hub id>) --------------

@pytest.mark.slow  # ~30 s; CI's README walk runs the same path (the LCM-v1.5 recipe on a tiny pipeline)
def test_stable_diffusion_pipeline_teacher_distils_and_samples(tmp_path, monkeypatch):
    """The pipeline read as a checkpoint gives diffusers' U-Net output on CLIP's last hidden state (the
    SD teacher, exactly); then corrupt_data.py extracts latents with its vae/, finetune.py --method lcm
    distils it (with corrupted captions and CEP) and sample.py --sampler lcm decodes samples."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from models.build import model_from_checkpoint
    from models.from_diffusers import checkpoint_from_diffusers_pipeline, is_diffusers_pipeline
    pipe = tmp_path / "sd"
    unet = make_tiny_sd_pipeline(pipe).eval()  # tests/helpers.py
    assert is_diffusers_pipeline(pipe) and is_diffusers_pipeline("runwayml/stable-diffusion-v1-5")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)  # out/run names a (missing) local run, not a hub repo
    assert not is_diffusers_pipeline(tmp_path) and not is_diffusers_pipeline("out/run") and not is_diffusers_pipeline(f"{tmp_path}/x")
    ckpt = checkpoint_from_diffusers_pipeline(pipe)
    assert ckpt["diffusion"]["schedule"] == "scaled_linear" and ckpt["config"]["image_size"] == 32
    teacher = model_from_checkpoint(ckpt)
    tokenizer, clip = CLIPTokenizer.from_pretrained(pipe / "tokenizer"), CLIPTextModel.from_pretrained(pipe / "text_encoder").eval()
    ids = tokenizer(["a photo of a bag", ""], padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids
    tok = teacher.tokenize(["a photo of a bag", ""])
    assert torch.equal(tok["input_ids"], ids)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        theirs = unet(x, t, encoder_hidden_states=clip(input_ids=ids).last_hidden_state).sample
        mine = teacher(x, t, tok["input_ids"], tok["attention_mask"])
    assert theirs.abs().max() > 1e-2 and (mine - theirs).abs().max() < 1e-4 * max(1.0, theirs.abs().max().item())

    make_fake_fmnist(tmp_path / "data", n=64)
    out = tmp_path / "out"
    data = ["--dataset", "fashion-mnist-captions", "--data-path", tmp_path / "data", "--out-dir", out]
    run_script("corrupt_data.py", [*data, "--vae", pipe / "vae", "--vae-batch-size", "16"])
    proc = run_script("finetune.py", ["--init", pipe, "--out-dir", out, "--run", "sd"], check=False)
    assert proc.returncode == 2 and "pass --dataset" in proc.stderr
    run_script("finetune.py", ["--init", pipe, *data, "--run", "sd-lcm", *LCM, "--max-steps", "2", "--corrupt", "0.25", "--cep"])
    ckpt = load(out / "sd-lcm" / "ckpt" / "last.pt")
    assert ckpt["model_config"]["guidance_dim"] == 256 and ckpt["config"]["vae"] == str(pipe / "vae")
    run_script("sample.py", ["--run", out / "sd-lcm", "--sampler", "lcm", "--steps", "2", "--cfg-scale", "7", "--num-samples", "4",
                             "--tag", "s"])
    assert np.load(out / "sd-lcm" / "samples" / "s" / "samples.npz")["arr_0"].shape == (4, 32, 32, 3)
