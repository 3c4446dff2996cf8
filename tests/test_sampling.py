"""Samplers against closed forms (Gaussian data, whose exact denoiser and probability-flow map are
known) and against diffusers' schedulers step for step."""
import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.diffusion import (GaussianDiffusion, Sampler, classifier_free_guidance,  # noqa: E402
                              dpm_solver_timesteps, spaced_timesteps)

DIFF = GaussianDiffusion(learn_sigma=False)
MEAN = torch.tensor([0.5, -1.0, 0.0])
VAR = torch.tensor([0.25, 1.0, 0.04])  # diagonal data covariance, shapes (N, 3, 1, 1)


def view(v):
    return v.view(1, -1, 1, 1)


def exact_eps(x, t):
    """E[ε | x_t] for x_0 ~ N(MEAN, diag(VAR)): x_0|x_t is Gaussian with
    E[x_0|x_t] = m + sqrt(ᾱ) S (ᾱ S + 1 - ᾱ)^-1 (x_t - sqrt(ᾱ) m)."""
    ab = torch.as_tensor(DIFF.alphas_cumprod, dtype=torch.float64)[t].view(-1, 1, 1, 1)
    x = x.double()
    x0 = view(MEAN).double() + ab.sqrt() * view(VAR).double() / (ab * view(VAR).double() + 1 - ab) * (x - ab.sqrt() * view(MEAN).double())
    return ((x - ab.sqrt() * x0) / (1 - ab).sqrt()).float()


def pf_ode_map(x_T, t_T):
    """Exact probability-flow ODE solution from t_T to 0 for Gaussian data: along the flow,
    (x_t - sqrt(ᾱ_t) m) / sqrt(ᾱ_t S + 1 - ᾱ_t) is constant (per eigen-direction)."""
    ab = float(DIFF.alphas_cumprod[t_T])
    return view(MEAN) + view(VAR).sqrt() / (ab * view(VAR) + 1 - ab).sqrt() * (x_T - math.sqrt(ab) * view(MEAN))


def run(kind, steps, x, seed=0, eta=0.0):
    g = torch.Generator().manual_seed(seed)
    return Sampler(DIFF, kind, steps, ddim_eta=eta).sample(exact_eps, x.clone(), noise_fn=lambda: torch.randn(x.shape, generator=g))


@pytest.mark.parametrize("kind,steps", [("ddpm", 1000), ("ddpm", 250), ("ddim", 250), ("dpm-solver++", 50)])
def test_samplers_reproduce_gaussian_data(kind, steps):
    n = 20000
    x = torch.randn(n, 3, 1, 1, generator=torch.Generator().manual_seed(1))
    out = run(kind, steps, x).view(n, 3).double()
    # Monte-Carlo: std error of the mean sqrt(var/n) <= 0.007, of a variance var*sqrt(2/n) <= 0.01
    assert torch.allclose(out.mean(0), MEAN.double(), atol=5 * math.sqrt(1.0 / n) + 0.01)
    cov = torch.cov(out.T)
    assert torch.allclose(cov.diagonal(), VAR.double(), rtol=0.05 + 5 * math.sqrt(2 / n), atol=2e-3)
    off = cov - torch.diag(cov.diagonal())
    assert off.abs().max() < 5 * 1 / math.sqrt(n) + 0.01
    # a sampler that ignored the model (e.g. returned noise) would have var 1 in every direction
    assert cov[2, 2] < 0.1


def test_ddim_1000_steps_is_the_probability_flow_ode():
    x = torch.randn(2000, 3, 1, 1, generator=torch.Generator().manual_seed(2))
    ddim = run("ddim", 1000, x)
    exact = pf_ode_map(x, 999)
    err = (ddim - exact).abs().max().item()
    assert err < 1e-2, err
    # DDIM is a first-order solver of this ODE: 4x fewer steps, ~4x the error; so the 1000-step
    # result is converging to the exact map, not merely close to it
    err_250 = (run("ddim", 250, x) - exact).abs().max().item()
    assert 3 < err_250 / err < 5, (err, err_250)


def test_dpm_solver_20_beats_ddim_20():
    x = torch.randn(2000, 3, 1, 1, generator=torch.Generator().manual_seed(3))
    reference = run("ddim", 1000, x)
    err_dpm = (run("dpm-solver++", 20, x) - reference).pow(2).mean().sqrt().item()
    err_ddim = (run("ddim", 20, x) - reference).pow(2).mean().sqrt().item()
    assert err_dpm < 0.5 * err_ddim, (err_dpm, err_ddim)


def test_timestep_grids():
    assert spaced_timesteps(1000, 1000) == list(range(999, -1, -1))
    ts = spaced_timesteps(1000, 250)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 250
    assert dpm_solver_timesteps(1000, 50)[0] == 999 and 0 not in dpm_solver_timesteps(1000, 50)
    with pytest.raises(ValueError):
        spaced_timesteps(1000, 0)


def test_classifier_free_guidance():
    C = 2

    def model(x, t, y):  # ε depends on the label; the variance channels mark which half they came from
        eps = x * 0 + y.view(-1, 1, 1, 1).float()
        return torch.cat([eps, eps * 0 + 10 * y.view(-1, 1, 1, 1).float()], 1)
    x, t, y = torch.zeros(3, C, 2, 2), torch.zeros(3, dtype=torch.long), torch.tensor([1, 2, 3])
    out = classifier_free_guidance(model, y, 7, 4.0)(x, t)
    # ε̃ = ε(∅) + s (ε(y) - ε(∅)) = 7 + 4 (y - 7) on every ε channel; variance from the conditional half
    assert torch.equal(out[:, :C, 0, 0], (7 + 4 * (y - 7)).float().view(-1, 1).expand(3, C))
    assert torch.equal(out[:, C:, 0, 0], (10 * y).float().view(-1, 1).expand(3, C))
    legacy = classifier_free_guidance(model, y, 7, 4.0, guided_channels=1)(x, t)
    assert torch.equal(legacy[:, 1, 0, 0], y.float())  # channel 1 left unguided (DiT's old behaviour)
    assert torch.equal(classifier_free_guidance(model, y, 7, 1.0)(x, t), model(x, t, y))


# ---------------------------------------------------------------------------------------------
# diffusers, step for step (test-only dependency)

def test_against_diffusers_step_for_step():
    if os.environ.get("CI"):
        import diffusers  # noqa: F401  (must be installed in CI)
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    learned = GaussianDiffusion(learn_sigma=True)
    x_start = torch.randn(4, 3, 8, 8)

    def model_fn(x, t):  # exact ε for the Gaussian data plus a learned-variance channel in [-1, 1]
        return torch.cat([exact_eps(x.view(-1, 3, 8 * 8, 1), t).view_as(x), torch.tanh(x.mean(1, keepdim=True)).expand_as(x)], 1)

    common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    cases = [
        ("ddpm", diffusers.DDPMScheduler(variance_type="learned_range", clip_sample=False, **common), 25),
        ("ddim", diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="leading", **common), 25),
        ("dpm-solver++", diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **common), 20),
    ]
    for kind, scheduler, steps in cases:
        ours = Sampler(learned, kind, steps)
        if kind == "ddim":  # diffusers' DDIM steps t -> t - T/n: use its ('leading') grid
            scheduler.set_timesteps(steps)
            ours.timesteps = scheduler.timesteps.tolist()
        else:
            scheduler.set_timesteps(timesteps=ours.timesteps) if kind == "ddpm" else scheduler.set_timesteps(steps)
        assert ours.timesteps == scheduler.timesteps.tolist(), kind
        x = x_start.clone()
        x0_prev, ts = None, ours.timesteps
        for i, t in enumerate(ts):
            t_next = ts[i + 1] if i + 1 < len(ts) else -1
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
            out = model_fn(x, torch.full((4,), t))
            ref = scheduler.step(out if kind == "ddpm" else out[:, :3], t, x, generator=torch.Generator().manual_seed(i)).prev_sample
            x0, eps, v = ours.predict(model_fn, x, t)
            if kind == "ddpm":
                mine = ours.ddpm_step(x, x0, v, t, t_next, noise)
            elif kind == "ddim":
                mine = ours.ddim_step(x, x0, eps, t, t_next, None)
            else:
                mine = ours.dpm_solver_step(x, x0, x0_prev, t, ts[i - 1] if i else None, t_next)
                x0_prev = x0
            assert torch.allclose(mine, ref, atol=2e-5, rtol=1e-4), (kind, i, t, (mine - ref).abs().max().item())
            x = ref
