"""
Appendix A of Chen et al. (2024) in numbers: a class-conditional diffusion model on a Gaussian
mixture trained with corrupted conditions.     python -m models.gmm [--quick] [--out out/gmm]

Setting (the paper's). P(x) = Σ_y w_y N(μ_y, I) in R^d; n = n_k samples of class k, empirical mean m̂
and covariance Ŝ (1/n). Forward: the repo's DDPM schedule x_t = a_t x_0 + s_t ε, a_t² + s_t² = 1 (a
discretised OU process); generation: the probability-flow ODE (DDIM η=0 / DPM-Solver++ of
models/diffusion.py), no guidance. The class-k denoiser is linear in x_t and in the condition c ∈ R^K,
without intercept: D_t = A_t x_t + B_t c (c = e_k supplies the offset). Corruption: c = e_k + γξ,
ξ ~ N(0, I_K), at training only.

Lemma 3 (γ = 0): the MSE-optimal D_t is the posterior mean of N(m̂, Ŝ); the ODE generates N(m̂, Ŝ).
Lemma 4, derived. Only c_k = 1 + γξ_k correlates with x_0 (the rest of c is independent noise: weight
0). Write x_0 = m̃ c_k + r, m̃ = m̂/(1+γ²): E[r c_k] = 0, E[r rᵀ] = Ŝ + τ m̂m̂ᵀ =: S_r, τ = γ²/(1+γ²). The
linear optimum depends on second moments only and x_t − a_t m̃ c_k = a_t r + s_t ε is uncorrelated with
c_k, so D_t = m̃ c_k + a_t S_r (a_t² S_r + s_t² I)⁻¹ (x_t − a_t m̃ c_k), at c = e_k the posterior mean of
N(m̃, S_r). Corrupted training generates
    derived:  N(m̂/(1+γ²), Ŝ + τ m̂m̂ᵀ)        (rank-one inflation along m̂)
    paper:    N(m̂/(1+γ²), Ŝ + τ‖m̂‖² I)      (as Appendix A states it)
The means agree; the paper's covariance is wrong for this model (isotropic, d times the trace): the
linear denoiser fitted from the training MSE alone (`linear_denoiser`), sampled with the repo's
Sampler, lands on the rank-one Gaussian (pathwise rms < 0.02) and misses the isotropic one by τ‖m̂‖²
of variance in every direction ⟂ m̂ (tests). With an intercept γ would not matter; without one the
mean shrinks toward the origin, so every W2 result depends on ‖μ_k‖. CEP (second moments only):
CEP-G δ ~ N(0, γ²/K) is Lemma 4 with γ² → γ²/K, CEP-U with γ² → γ²/(3K).
Scores, exact for Gaussians: H = ½ log det(2πe S); W2² = ‖m1 − m2‖² + Tr(S1 + S2 − 2(S1^½ S2 S1^½)^½).
Expectations over data sets: Monte Carlo (m̂ ~ N(μ, I/n), nŜ ~ Wishart(n−1, I)), ± 1 s.e.

Theorem 1 (entropy gain Θ(γ²d)). Paper form: ΔH = ½ Σ_i log(1 + τ‖m̂‖²/λ_i) ≈ ½γ²d‖μ‖², Θ(γ²d) at
‖μ‖ = Θ(1). Derived: ΔH = ½ log(1 + τ m̂ᵀŜ⁻¹m̂) ≈ ½γ²(‖μ‖² + d/n), Θ(γ²d) only if ‖μ‖² = Θ(d).
ΔH/(γ²d) at γ = 0.1, n = 1000, d = 2/8/32: ‖μ‖ = 1: paper 0.50/0.50/0.53, derived 0.25/0.062/0.016;
μ = (1,…,1): paper 0.98/3.9/14, derived 0.49/0.48/0.44.
Theorem 2 (γ = O(1/√n) ⇒ E W2²(clean) − E W2²(γ) = Ω(γ²d/n)). Exactly, E‖m̂/(1+γ²) − μ‖² = d/n −
2τd/n + τ²(‖μ‖² + d/n): the (James–Stein-like) shrinkage gains 2τd/n. The covariance term gains at
first order (the 1/n covariance is too narrow) and loses ≈ τ²c_S‖μ‖⁴/4 at second (c_S = 1 derived, d
paper). So the drop holds for c = γ√n below c* ≈ √(nτ*), τ* ≈ [2d/n + c_S‖μ‖²(4 + 3d)/(8n)] /
[‖μ‖² + d/n + c_S‖μ‖⁴/4]; beyond, W2 grows. Agreement with a caveat: drop/(γ²d/n) at c = 0.3 is
2.3–17 (derived), 3.5–490 (paper) over d ∈ {2, 8, 32}, n ∈ {100, 1000}, but c* depends on ‖μ‖: derived
c* (MC/predicted), n = 100, d = 2/8/32: 2.1/2.1, 4.1/4.1, 8/9.7 at ‖μ‖ = 1; 1.4/1.5, 1.4/1.4, 1.1/1.3
at μ = (1,…,1).

Label flips (the repo's models.corruption.corrupt_labels): exactly round(ηN) examples, chosen uniformly,
each sent from class j to k ≠ j with probability w_k/(1 − w_j). At n → ∞ the examples labelled k form
P̃_k = Σ_j π_kj N(μ_j, I), π_kk ∝ (1−η)w_k, π_kj ∝ η w_j w_k/(1 − w_j).
- The optimal (memorising) score regenerates the corrupted training points (entropy −∞); at n → ∞ it
  generates P̃_k: entropy by Monte Carlo (± s.e.), W2 to N(μ_k, I) between the Gelbrich bound (W2 of
  the moment-matched Gaussians) and the coupling bound Σ_j π_kj‖μ_j − μ_k‖².
- The linear denoiser (γ = 0) on flipped labels generates, by Lemma 3, the Gaussian moment-matched to
  the corrupted class-k set; at n → ∞, with ρ = 1 − π_kk, Δ = μ_k − μ̄ (μ̄, C: the outsiders' mean and
  scatter), N(μ_k − ρΔ, I + ρ(1−ρ)ΔΔᵀ + ρC). For ρ ≤ ½ entropy and W2 (offset ρ‖Δ‖, covariance growing
  in Loewner order) both rise with η: flips only hurt.
- Finite n, heuristic expansion in ρ (n ≫ d, fixed class sizes): the covariance gain ρ‖Δ‖² E[uᵀ(I −
  Ŝ^-½)u] ≈ −ρ‖Δ‖²(3d + 7)/(8n) is offset by the flipped-in points' own noise, +ρ‖Δ‖²(d+1)/(2n),
  leaving +ρ‖Δ‖²(d − 3)/(8n), and +ρ²‖Δ‖²(1 + ‖Δ‖²/4) at second order. So W2 can drop only for d ≤ 2
  and below (3 − d)/(8 + 2‖Δ‖²) < ¼ flipped-in examples per class: for no integer number of flips.
  Flips do not shrink the mean (they pull it toward other classes), the γ-model's source of gain.
  Measured, 200 data sets: entropy rises with η (agreement); E W2² never drops (disagreement):
  (K, d, n_k) = (2, 1, 10): +0.0006 ± 0.004 at one flip, +0.23 at η = 0.5; (3, 2, 20): +0.005 ± 0.002
  at η = 0.025, +0.46; (5, 4, 20): +0.013 ± 0.002, +0.80.
- Real training: an MLP ε-model trained with the repo's GaussianDiffusion.training_losses, sampled
  with its Sampler, scored by the Gaussian fit of its samples (K = 3, d = 2, n_k = 50). On data sets
  2–7 (mlp_table(…, range(2, 8))) ΔW2² vs clean is +0.007/+0.016/+0.028/+0.107 at η = 0.025/0.05/0.1/
  0.2 (retraining noise 0.006), entropy +0.02…+0.20 nats; γ = 0.2: −0.004, γ = 1: +0.40. The default
  two data sets are noisier (retraining moves W2² by 0.03): −0.009…+0.008 for η ≤ 0.1, +0.43 at 0.5.
"""
import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import stats
from scipy.special import logsumexp

from models.common import one_thread
from models.corruption import corrupt_count, corrupt_labels
from models.diffusion import GaussianDiffusion, Sampler

ETAS = (0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5)


# ----------------------------------------------------------------------------------------- Gaussians

def _t(a):
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


def sqrtm_psd(S):
    """Symmetric square root of (a batch of) PSD matrices (float64 tensors)."""
    w, V = torch.linalg.eigh(S)
    return (V * w.clamp(min=0).sqrt()[..., None, :]) @ V.transpose(-1, -2)


def gaussian_entropy(S):
    """H(N(m, S)) = ½ log det(2πe S) in nats (batched over leading axes)."""
    S = _t(S)
    with one_thread():
        return 0.5 * (S.shape[-1] * math.log(2 * math.pi * math.e) + torch.linalg.slogdet(S)[1].numpy())


def w2_squared(m1, S1, m2, S2):
    """W2² between N(m1, S1) and N(m2, S2): ‖m1−m2‖² + Tr(S1 + S2 − 2(S1^½ S2 S1^½)^½) (batched)."""
    with one_thread():
        S1, S2 = _t(S1), _t(S2)
        r = sqrtm_psd(S1)
        tr = (S1 + S2 - 2 * sqrtm_psd(r @ S2 @ r)).diagonal(dim1=-2, dim2=-1).sum(-1)
        return np.maximum((((_t(m1) - _t(m2)) ** 2).sum(-1) + tr).numpy(), 0.0)


def moments(x):
    """Empirical mean and covariance (1/n: the moments the linear denoiser reproduces)."""
    xc = x - x.mean(0)
    return x.mean(0), xc.T @ xc / len(x)


def score(mus, fits):
    """Class-averaged (entropy, W2² to N(μ_k, I)) of per-class Gaussian fits [(m, S), ...]."""
    eye = np.eye(mus.shape[1])
    return (np.mean([gaussian_entropy(S) for _, S in fits]),
            np.mean([w2_squared(m, S, mus[k], eye) for k, (m, S) in enumerate(fits)]))


# ------------------------------------------------------------------------ the paper's linear model

def lemma4(m, S, gamma, form="derived"):
    """What the linear denoiser trained with c = e_k + γξ generates (γ = 0: Lemma 3). form='derived'
    (rank-one, this module's derivation) or 'paper' (isotropic, as Appendix A states). Batched."""
    outer = m[..., :, None] * m[..., None, :]
    isotropic = np.trace(outer, axis1=-2, axis2=-1)[..., None, None] * np.eye(m.shape[-1])
    inflation = outer if form == "derived" else isotropic
    return m / (1 + gamma ** 2), S + gamma ** 2 / (1 + gamma ** 2) * inflation


def linear_denoiser(m, S, gamma, K, k, diffusion):
    """eps_fn(x, t) at c = e_k of the class-k ε-model linear in z = (x_t, c) that minimises the training
    MSE for x_0 with moments (m, S) and c = e_k + γξ: W_t = E[ε zᵀ] E[z zᵀ]⁺ from exact second moments."""
    d, e, M2, cache = len(m), np.eye(K)[k], S + np.outer(m, m), {}  # M2: E[x_0 x_0ᵀ]; cache: W_t by t

    def weights(t):
        if t not in cache:
            ab = float(diffusion.alphas_cumprod[t])
            a, s = math.sqrt(ab), math.sqrt(1 - ab)
            G = np.block([[ab * M2 + (1 - ab) * np.eye(d), a * np.outer(m, e)],
                          [a * np.outer(e, m), np.outer(e, e) + gamma ** 2 * np.eye(K)]])
            W = np.hstack([s * np.eye(d), np.zeros((d, K))]) @ np.linalg.pinv(G)
            cache[t] = torch.tensor(W[:, :d].T, dtype=torch.float32), torch.tensor(W[:, d:] @ e, dtype=torch.float32)
        return cache[t]

    def eps_fn(x, t):
        A, b = weights(int(t[0]))
        return (x.flatten(1) @ A + b).view_as(x)
    return eps_fn


def sample_linear_model(m, S, gamma, K=3, k=0, n=20000, kind="dpm-solver++", steps=50, seed=0):
    """Samples of the fitted linear model via the probability-flow ODE (the repo's Sampler; DDIM with
    η = 0 and DPM-Solver++ both integrate it). Also returns the initial noise x_T (n, d)."""
    diffusion = GaussianDiffusion(learn_sigma=False)
    xT = torch.randn(n, len(m), 1, 1, generator=torch.Generator().manual_seed(seed))
    with one_thread():
        x = Sampler(diffusion, kind, steps).sample(linear_denoiser(m, S, gamma, K, k, diffusion), xT)
    return x.flatten(1).double().numpy(), xT.flatten(1).double().numpy()


def paper_model_gains(mu, n, gammas, reps=400, seed=0):
    """{form: (ΔH, W2² drop)}, each (len(gammas), reps): corrupted vs clean on the same `reps` data
    sets of n points from N(μ, I), drawn as m̂ ~ N(μ, I/n), nŜ ~ Wishart(n−1, I)."""
    rng, d, eye = np.random.default_rng(seed), len(mu), np.eye(len(mu))
    S = stats.wishart(df=n - 1, scale=eye).rvs(size=reps, random_state=rng).reshape(reps, d, d) / n
    m = mu + rng.standard_normal((reps, d)) / math.sqrt(n)
    h0, w0 = gaussian_entropy(S), w2_squared(m, S, mu, eye)
    out = {}
    for form in ("paper", "derived"):
        gm = [lemma4(m, S, g, form) for g in gammas]
        out[form] = (np.array([gaussian_entropy(Sg) - h0 for _, Sg in gm]),
                     np.array([w0 - w2_squared(mg, Sg, mu, eye) for mg, Sg in gm]))
    return out


def predicted_tau_star(d, n, r2, form):
    """Second-order estimate of the τ = γ²/(1+γ²) below which E W2² drops (module docstring)."""
    cs = 1 if form == "derived" else d
    return (2 * d / n + cs * r2 * (4 + 3 * d) / (8 * n)) / (r2 + d / n + cs * r2 ** 2 / 4)


# ----------------------------------------------------------------------------------- label flips

def class_means(K, d, sep):
    """K means at pairwise distance `sep`, centred at 0: a regular simplex (needs d ≥ K − 1)."""
    U, s, _ = np.linalg.svd(sep / math.sqrt(2) * (np.eye(K) - 1 / K))  # rows: the centred one-hots
    return np.pad((U * s)[:, :K - 1], ((0, 0), (0, d - K + 1)))


def sample_mixture(mus, n, rng):
    """n points of every class: x (K·n, d), y (K·n,)."""
    y = np.repeat(np.arange(len(mus)), n)
    return mus[y] + rng.standard_normal((len(y), mus.shape[1])), y


def flip_transition(w, eta):
    """π[k, j]: share of the examples labelled k after corrupt_labels that come from class j (n → ∞)."""
    w = np.asarray(w, dtype=np.float64)
    P = eta * w[:, None] * w[None, :] / (1 - w[:, None])  # P[j, k]: mass moved from j to k
    np.fill_diagonal(P, (1 - eta) * w)
    return (P / P.sum(0)).T


def population_fit(mus, pi_row):
    """Moment-matched Gaussian of the mixture Σ_j π_j N(μ_j, I)."""
    D = mus - pi_row @ mus
    return pi_row @ mus, np.eye(mus.shape[1]) + (pi_row[:, None] * D).T @ D


def mixture_entropy(mus, pi_row, n_mc=20000, seed=0):
    """Monte-Carlo entropy of Σ_j π_j N(μ_j, I): (estimate, standard error)."""
    rng, d = np.random.default_rng(seed), mus.shape[1]
    x = mus[rng.choice(len(mus), size=n_mc, p=pi_row)] + rng.standard_normal((n_mc, d))
    with np.errstate(divide="ignore"):  # log 0 = -inf for absent components is fine in logsumexp
        logp = logsumexp(-0.5 * ((x[:, None] - mus[None]) ** 2).sum(-1) + np.log(pi_row), axis=1)
    logp -= 0.5 * d * math.log(2 * math.pi)
    return -logp.mean(), logp.std() / math.sqrt(n_mc)


def flip_fits(x, y, K, eta, seed):
    """Per-class moments of the corrupted training set (None for a class left with < 2 points)."""
    yc, _ = corrupt_labels(y, K, eta, seed)
    return [moments(x[yc == k]) if (yc == k).sum() > 1 else None for k in range(K)], yc


def finite_flip_stats(mus, n, etas, seeds):
    """Class-averaged entropy and W2² of the linear model per (data set, η); NaN if a class emptied."""
    H, W = np.full((2, len(seeds), len(etas)), np.nan)
    for i, s in enumerate(seeds):
        x, y = sample_mixture(mus, n, np.random.default_rng(s))
        for j, eta in enumerate(etas):
            fits, _ = flip_fits(x, y, len(mus), eta, s)
            if all(f is not None for f in fits):
                H[i, j], W[i, j] = score(mus, fits)
    return H, W


def infinite_flip_stats(mus, eta, n_mc=20000):
    """n → ∞, class-averaged: Gaussian-fit H and W2² (exact), mixture H (MC) ± s.e., coupling bound."""
    K = len(mus)
    pi = flip_transition(np.full(K, 1 / K), eta)
    h, w2 = score(mus, [population_fit(mus, p) for p in pi])
    hm, se = np.mean([mixture_entropy(mus, p, n_mc, seed=k) for k, p in enumerate(pi)], axis=0)
    upper = np.mean([p @ ((mus - mus[k]) ** 2).sum(1) for k, p in enumerate(pi)])
    return h, w2, hm, se / math.sqrt(K), upper


# ------------------------------------------------------------------------------ real training (MLP)

class Denoiser(nn.Module):
    """ε̂(x_t, t, c): a 3-layer SiLU MLP on [x_t, c, sin/cos features of t]; x is (B, d, 1, 1)."""

    def __init__(self, d, K, width=128, nfreq=8):
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(1000.0) * torch.arange(nfreq) / nfreq))
        self.net = nn.Sequential(nn.Linear(d + K + 2 * nfreq, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, d))

    def forward(self, x, t, c):
        f = t[:, None].float() * self.freqs
        return self.net(torch.cat([x.flatten(1), c, f.sin(), f.cos()], 1)).view_as(x)


def train_and_sample(x, labels, K, gamma=0.0, steps=1500, batch=256, lr=2e-3, n_samples=2000, seed=0):
    """Train the MLP with GaussianDiffusion.training_losses on (x, labels), one-hot condition plus
    γξ (training only), then sample every class with the Sampler. Returns (K, n_samples, d)."""
    with one_thread():
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        diffusion = GaussianDiffusion(learn_sigma=False)
        model = Denoiser(x.shape[1], K)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)  # decay: much less seed noise
        x0 = torch.tensor(x, dtype=torch.float32)[:, :, None, None]
        onehot = F.one_hot(torch.as_tensor(labels), K).float()
        for _ in range(steps):
            i = torch.randint(0, len(x0), (batch,), generator=g)
            t = torch.randint(0, diffusion.num_timesteps, (batch,), generator=g)
            c = onehot[i] + gamma * torch.randn(batch, K, generator=g)
            loss = diffusion.training_losses(lambda xt, tt: model(xt, tt, c), x0[i], t,
                                             torch.randn(x0[i].shape, generator=g))["loss"].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        sampler, out = Sampler(diffusion, "dpm-solver++", 25), []
        for k in range(K):
            c = F.one_hot(torch.full((n_samples,), k), K).float()
            xT = torch.randn(n_samples, x.shape[1], 1, 1, generator=g)
            out.append(sampler.sample(lambda xt, tt: model(xt, tt, c), xT).flatten(1).double().numpy())
        return np.stack(out)


# ------------------------------------------------------------------------------------ experiments

def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


MU = {"‖μ‖=1": lambda d: np.eye(d)[0], "μ=(1,…,1)": lambda d: np.ones(d)}


def theorem1_table(reps, n=1000, gammas=(0.1, 0.3, 1.0)):
    rows = []
    for name, mu_f in MU.items():
        for d in (2, 8, 32):
            g = paper_model_gains(mu_f(d), n, gammas, reps)
            for gm, ph, dh in zip(gammas, g["paper"][0].mean(1), g["derived"][0].mean(1)):
                rows.append([name, str(d), f"{gm:g}", f"{ph:.4f}", f"{dh:.4f}", f"{ph / (gm ** 2 * d):.3f}",
                             f"{dh / (gm ** 2 * d):.3f}"])
    return table(["μ", "d", "γ", "ΔH paper", "ΔH derived", "ΔH/(γ²d) paper", "ΔH/(γ²d) derived"], rows)


def theorem2_table(reps):
    """drop/(γ²d/n) at c = γ√n ∈ {0.3, 1, 3}, and c*: the last c of a scan with a mean drop > 0."""
    cs = np.concatenate([[0.3, 1.0, 3.0], np.geomspace(0.05, 30, 30)])
    rows, curves = [], {}
    for name, mu_f in MU.items():
        for d in (2, 8, 32):
            for n in (100, 1000):
                mu, r = mu_f(d), reps * 32 // d  # more data sets where they are cheap (small d)
                g = paper_model_gains(mu, n, cs / math.sqrt(n), r, seed=d + n)
                row = [name, str(d), str(n)]
                for form in ("paper", "derived"):
                    ratio = g[form][1] / (cs[:, None] ** 2 * d / n ** 2)  # per data set
                    mean, se = ratio.mean(1), ratio.std(1) / math.sqrt(r)
                    scan = mean[3:] > 0
                    last = len(scan) if scan.all() else np.argmin(scan)  # first scan point without a drop
                    tau = predicted_tau_star(d, n, mu @ mu, form)
                    row += [" / ".join(f"{a:.2f}±{b:.2f}" for a, b in zip(mean[:3], se[:3])),
                            f"{cs[2 + last]:.2g}" if last else "<0.05", f"{math.sqrt(n * tau / (1 - tau)):.2g}"]
                    if d == 8 and n == 100:
                        curves[(name, form)] = (cs[3:], mean[3:])
                rows.append(row)
    header = ["μ", "d", "n"] + [h.format(f) for f in ("paper", "derived")
                                for h in ("{}: drop/(γ²d/n) at γ√n=0.3/1/3", "{}: c* MC", "{}: c* pred.")]
    return table(header, rows), curves


def flip_table(K, d, n, sep, seeds, etas, n_mc):
    """Linear model on corrupt_labels' flips: finite n (mean over data sets) and n → ∞."""
    mus = class_means(K, d, sep)
    H, W = finite_flip_stats(mus, n, etas, seeds)
    dW, rows = W - W[:, :1], []
    se = lambda a: np.nanstd(a) / math.sqrt(np.isfinite(a).sum())
    for j, eta in enumerate(etas):
        h, w2, hm, hse, upper = infinite_flip_stats(mus, eta, n_mc)
        rows.append([f"{eta:g}", str(corrupt_count(eta, K * n)), f"{np.nanmean(H[:, j]):.3f}±{se(H[:, j]):.3f}",
                     f"{np.nanmean(W[:, j]):.4f}", f"{np.nanmean(dW[:, j]):+.4f}±{se(dW[:, j]):.4f}", f"{h:.3f}",
                     f"{hm:.3f}±{hse:.3f}", f"{w2:.4f}", f"{upper:.3f}"])
    text = (f"K={K}, d={d}, n_k={n}, class separation {sep} ({len(seeds)} data sets; {int(np.isnan(W).any(1).sum())} "
            "with an emptied class dropped)\n\n" + table(
                ["η", "flips", "H (n_k)", "W2² (n_k)", "ΔW2² vs η=0", "H Gauss (∞)", "H mixture (∞, MC)",
                 "W2² Gauss = Gelbrich (∞)", "W2² coupling bound (∞)"], rows))
    return text, f"K, d, n, sep = {K}, {d}, {n}, {sep}", (etas, np.nanmean(dW, 0), np.nanmean(H - H[:, :1], 0))


def mlp_table(etas, steps, data_seeds, K=3, d=2, n=50, sep=1.5):
    """Per data set: nested corruptions and the same training noise in every row; one row retrains
    the clean model with another seed (the noise scale), two rows put γξ on the one-hot input."""
    mus = class_means(K, d, sep)
    settings = [(e, 0.0, 0) for e in etas] + [(0.0, 0.0, 1), (0.0, 0.2, 0), (0.0, 1.0, 0)]  # (η, γ, seed offset)
    res = np.zeros((len(data_seeds), len(settings), 4))  # H linear, W2² linear, H MLP, W2² MLP
    for i, s in enumerate(data_seeds):
        x, y = sample_mixture(mus, n, np.random.default_rng(s))
        for j, (eta, gamma, offset) in enumerate(settings):
            fits, yc = flip_fits(x, y, K, eta, s)
            samples = train_and_sample(x, yc, K, gamma, steps=steps, n_samples=8000, seed=s + 1000 * offset)
            res[i, j] = *score(mus, [lemma4(m, S, gamma) for m, S in fits]), *score(mus, [moments(a) for a in samples])
    r = res.mean(0)
    rows = [[f"{e:g}" + " (retrained)" * o, f"{g:g}", f"{r[j, 0]:.3f}", f"{r[j, 2]:.3f}", f"{r[j, 1]:.4f}",
             f"{r[j, 3]:.4f}", f"{r[j, 3] - r[0, 3]:+.4f}"] for j, (e, g, o) in enumerate(settings)]
    text = (f"MLP: K={K}, d={d}, n_k={n}, separation {sep}; mean over data sets {list(data_seeds)}; {steps} Adam "
            "steps (lr 2e-3, cosine), batch 256; DPM-Solver++ 25 steps, 8000 samples per class. 'linear' = "
            "Lemma 3/4 Gaussian of the same training set\n\n" + table(
                ["η", "γ", "H linear", "H MLP", "W2² linear", "W2² MLP", "ΔW2² MLP vs clean"], rows))
    return text, (etas, r[:len(etas), 3] - r[0, 3], r[:len(etas), 2] - r[0, 2])


def plot(path, th_curves, flip_curves):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for (name, form), (c, ratio) in th_curves.items():
        ax[0].semilogx(c, ratio, label=f"{form}, {name}")
    ax[0].set_yscale("symlog", linthresh=1)
    ax[0].set(xlabel="c = γ√n", ylabel="E W2² drop / (γ²d/n)", title="paper's γ-model, d=8, n=100 (>0: drop)")
    for key, (etas, dw, dh) in flip_curves.items():
        ax[1].plot(etas, dw, "o-", label=key)
        ax[2].plot(etas, dh, "o-")
    ax[1].set(xlabel="η (label flips)", ylabel="E W2² − E W2²(η=0)", title="label flips: W2² to the truth")
    ax[2].set(xlabel="η (label flips)", ylabel="E H − E H(η=0) (nats)", title="label flips: entropy")
    for a in ax[:2]:
        a.axhline(0, color="k", lw=0.5)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description="Appendix A of Chen et al. 2024 on a Gaussian mixture (tables + plot)")
    p.add_argument("--quick", action="store_true", help="fewer data sets, η values and MLP steps (~20 s)")
    p.add_argument("--mlp-seeds", type=int, default=None, help="data sets for the MLP table (default 2, quick 1)")
    p.add_argument("--out", default="out/gmm")
    args = p.parse_args()
    t0 = time.time()
    reps, seeds = (100, range(40)) if args.quick else (300, range(200))
    etas = (0.0, 0.05, 0.2, 0.5) if args.quick else ETAS
    doc = ["# Gaussian-mixture check of Appendix A", "## Theorem 1: entropy gain (n = 1000)", theorem1_table(reps)]
    t2, th_curves = theorem2_table(reps)
    doc += ["## Theorem 2: expected W2² drop (ratio > 0: drop; c*: largest γ√n with a drop)", t2,
            "## Label flips (corrupt_labels): linear model at n_k (Gaussian fit) and at n → ∞"]
    configs = [(2, 1, 10, 1.0), (3, 2, 20, 1.5), (5, 4, 20, 2.0)]  # K, d, n_k, class separation
    flips = [flip_table(*c, seeds, etas, 5000 if args.quick else 20000) for c in configs]
    doc, flip_curves = doc + [f[0] for f in flips], {key: curve for _, key, curve in flips}
    seeds = range(args.mlp_seeds or (1 if args.quick else 2))
    mlp, flip_curves["MLP: 3, 2, 50, 1.5"] = mlp_table(etas, 500 if args.quick else 1500, seeds)
    text = "\n\n".join(doc + [mlp]) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gmm.md"), "w") as f:
        f.write(text)
    plot(os.path.join(args.out, "gmm.png"), th_curves, flip_curves)
    print(f"wrote {args.out}/gmm.md and gmm.png in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
