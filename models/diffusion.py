"""
The Gaussian diffusion maths in one place (Ho et al. 2020; Nichol & Dhariwal 2021 for the learned
variance). Schedules are computed in float64 and gathered per timestep as float32.

Notation: ᾱ_t = prod_{s<=t} (1 - β_s); x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε.
Training: q_sample, the ε-prediction MSE, the hybrid loss L_simple + L_vb when the model also
predicts its variance, and input perturbation (Ning et al. 2023).
Sampling: ancestral DDPM and DDIM on a respaced subsequence of timesteps (ADM's spacing), and
DPM-Solver++(2M) (Lu et al. 2022), plus classifier-free guidance (Ho & Salimans 2022).
Consistency distillation (Song et al. 2023; latent consistency models, Luo et al. 2023): the
boundary parametrisation, the skipping-step DDIM teacher solver, the distillation loss, and
multistep consistency sampling.
"""
import math

import numpy as np
import torch


SCHEDULES = ("linear", "scaled_linear")
# what a checkpoint without a "diffusion" entry was trained with (the only schedule before it was stored)
DEFAULT_DIFFUSION = dict(schedule="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000)


def linear_beta_schedule(num_timesteps=1000, beta_start=1e-4, beta_end=0.02):
    """The DDPM linear schedule, rescaled to num_timesteps as in ADM (float64)."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def beta_schedule(schedule="linear", beta_start=1e-4, beta_end=0.02, num_timesteps=1000):
    """β_1..β_T in float64. "linear": DDPM / ADM / DiT (β linear in t). "scaled_linear": what LDM's
    code calls "linear" (√β linear in t, then squared; cin256-v2 uses 0.0015 -> 0.0195), also
    diffusers' "scaled_linear" and Stable Diffusion's schedule."""
    if schedule == "linear":
        return linear_beta_schedule(num_timesteps, beta_start, beta_end)
    if schedule == "scaled_linear":
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
    raise ValueError(f"unknown schedule '{schedule}'; choose one of {SCHEDULES}")


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    # the tanh approximation used by ADM; max error ~1e-3 away from the tails
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) for x in [-1, 1] quantised to 256 bins, under N(means, e^(2 log_scales)) integrated
    over each bin (the two edge bins extend to infinity). Elementwise, nats."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion:
    @classmethod
    def from_config(cls, config=None, learn_sigma=True):
        """The diffusion a checkpoint's "diffusion" entry describes (DEFAULT_DIFFUSION for older
        checkpoints, which had no other schedule); learn_sigma is the model's."""
        config = {**DEFAULT_DIFFUSION, **(config or {})}
        if config.get("betas") is not None:  # schedule "trained": a pipeline's trained_betas, β_1..β_T as listed
            betas = np.asarray(config["betas"], dtype=np.float64)
        else:
            betas = beta_schedule(config["schedule"], config["beta_start"], config["beta_end"], config["num_timesteps"])
        return cls(betas, learn_sigma=learn_sigma)

    def __init__(self, betas=None, learn_sigma=True):
        betas = linear_beta_schedule() if betas is None else np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance)   (DDPM Eq. 6-7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the variance is 0 at t = 0: clip the log to the t = 1 value, as ADM does
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    @staticmethod
    def _gather(table, t, x):
        """table[t] as float32 on x's device, shaped to broadcast against x."""
        out = torch.as_tensor(table, dtype=torch.float32, device=t.device)[t]
        return out.view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, t, noise):
        # x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε   (DDPM Eq. 4)
        return self._gather(self.sqrt_alphas_cumprod, t, x0) * x0 + self._gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior_mean_variance(self, x0, xt, t):
        mean = self._gather(self.posterior_mean_coef1, t, xt) * x0 + self._gather(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._gather(self.posterior_variance, t, xt), self._gather(self.posterior_log_variance_clipped, t, xt)

    def predict_x0_from_eps(self, xt, t, eps):
        return self._gather(self.sqrt_recip_alphas_cumprod, t, xt) * xt - self._gather(self.sqrt_recipm1_alphas_cumprod, t, xt) * eps

    def p_mean_variance(self, model_output, xt, t, clip_denoised=False):
        """Mean and log-variance of p(x_{t-1} | x_t) from the network output. With learn_sigma the
        output's second half v in [-1, 1] interpolates log β_t and log β̃_t (Nichol & Dhariwal
        Eq. 15); otherwise the posterior variance β̃_t is used."""
        C = xt.shape[1]
        if self.learn_sigma:
            eps, v = model_output[:, :C], model_output[:, C:]
            min_log = self._gather(self.posterior_log_variance_clipped, t, xt)
            max_log = self._gather(np.log(self.betas), t, xt)
            frac = (v + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_output
            log_variance = self._gather(self.posterior_log_variance_clipped, t, xt).expand_as(xt)
        x0 = self.predict_x0_from_eps(xt, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(x0, xt, t)
        return {"mean": mean, "log_variance": log_variance, "pred_x0": x0, "eps": eps}

    def vb_terms_bpd(self, model_output, x0, xt, t):
        """The variational bound term L_t in bits per dimension, averaged over dimensions:
        KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, the decoder NLL -log p(x_0|x_1) at t = 0."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, xt, t)
        out = self.p_mean_variance(model_output, xt, t)
        kl = normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]).mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"]).mean(dim=(1, 2, 3)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_fn, x0, t, noise, input_perturbation=0.0, perturbation_noise=None):
        """Per-example loss (N,). model_fn(x_t, t) returns ε̂ (and the variance channels with
        learn_sigma). Input perturbation (Ning et al. 2023): x_t is built from ε + λξ while the
        target stays ε."""
        noise_in = noise if input_perturbation == 0 else noise + input_perturbation * perturbation_noise
        xt = self.q_sample(x0, t, noise_in)
        model_output = model_fn(xt, t).float()
        C = x0.shape[1]
        mse = ((model_output[:, :C] - noise) ** 2).mean(dim=(1, 2, 3))  # L_simple (DDPM Eq. 14)
        if not self.learn_sigma:
            return {"loss": mse, "mse": mse}
        # L_hybrid = L_simple + λ L_vb with λ = 1 over T = 1000 steps (ADM's rescaling by T/1000);
        # the vb term trains only the variance: the mean enters it with stopped gradient
        frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
        vb = self.vb_terms_bpd(frozen, x0, xt, t) * (self.num_timesteps / 1000.0)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    # ---- consistency distillation (LCM, Luo et al. 2023, Algorithm 1) -----------------------------

    def ddim_jump(self, x0, eps, t_prev):
        """Deterministic DDIM (η = 0) to t_prev from the predictions x̂_0, ε̂ made at any t (per-example
        tensors): x_prev = √ᾱ_prev x̂_0 + √(1 - ᾱ_prev) ε̂ (DDIM Eq. 12)."""
        return self._gather(self.sqrt_alphas_cumprod, t_prev, x0) * x0 + self._gather(self.sqrt_one_minus_alphas_cumprod, t_prev, x0) * eps

    def consistency_function(self, eps, xt, t):
        """f(x_t, t) = c_skip(t) x_t + c_out(t) x̂_0(x_t, ε̂) (LCM Eq. 9): f(x, 0) = x exactly."""
        c_skip, c_out = consistency_boundary(t.float())
        shape = (-1, *([1] * (xt.dim() - 1)))
        return c_skip.view(shape) * xt + c_out.view(shape) * self.predict_x0_from_eps(xt, t, eps)

    def consistency_distillation_losses(self, student_fn, teacher_fn, target_fn, x0, t, t_prev, noise, distance="huber",
                                        huber_c=0.001, weight=None):
        """Per-example loss (N,) of latent consistency distillation. x_{t} = q_sample(x0, t, noise) with
        t = t_{n+k}; the guided teacher (teacher_fn(x, t) -> ε̃, with ε̃ = ε(∅) + (1 + w)(ε(c) - ε(∅)))
        takes one skipping DDIM step to t_prev = t_n; the loss is d(f_student(x_t, t), f_target(x_prev, t_n))
        with the target network under no gradient, times weight (N,) when given (consistency_weights).
        student_fn / target_fn return ε̂ (+ variance channels, ignored). distance: "huber"
        (sqrt(d² + c²) - c, LCM's) or "l2"."""
        C = x0.shape[1]
        xt = self.q_sample(x0, t, noise)
        online = self.consistency_function(student_fn(xt, t).float()[:, :C], xt, t)
        with torch.no_grad():
            eps = teacher_fn(xt, t).float()[:, :C]
            x_prev = self.ddim_jump(self.predict_x0_from_eps(xt, t, eps), eps, t_prev)
            target = self.consistency_function(target_fn(x_prev, t_prev).float()[:, :C], x_prev, t_prev)
        sq = (online - target) ** 2
        per_pixel = torch.sqrt(sq + huber_c ** 2) - huber_c if distance == "huber" else sq
        loss = per_pixel.mean(dim=(1, 2, 3))
        return {"loss": loss if weight is None else weight * loss, "mse": sq.mean(dim=(1, 2, 3))}

    def consistency_weights(self, t, t_prev, skip):
        """finetune.py --lcm-loss-weight ict: iCT's λ(t_n) = 1 / (σ(t_{n+k}) - σ(t_n)) (Song & Dhariwal
        2023, Sec. 3.4), σ(t) = √((1 - ᾱ_t) / ᾱ_t) the noise level of x_t / √ᾱ_t, normalised to mean 1
        over the skipping grid. f ≈ x̂_0 magnifies an error of ε̂ by σ(t) (157 at t = 999 on the linear
        schedule, ~15 on SD's scaled-linear one), so the uniform loss is ruled by the top of the grid;
        λ evens that out, as σ(t_{n+k}) - σ(t_n) grows about like σ."""
        sigma = torch.as_tensor(self.sqrt_recipm1_alphas_cumprod, dtype=torch.float64)
        grid = torch.from_numpy(skipping_timesteps(self.num_timesteps, skip))
        mean = (1.0 / (sigma[grid] - sigma[(grid - skip).clamp(min=0)])).mean()
        return (1.0 / ((sigma[t.cpu()] - sigma[t_prev.cpu()]) * mean)).float().to(t.device)

    def guidance_distillation_losses(self, student_fn, teacher_fn, x0, t, noise):
        """Per-example loss (N,) of guidance distillation (Meng et al. 2023, stage 1): the student's ε̂
        at x_t regressed on the guided teacher's ε̃ = ε(∅) + (1 + w)(ε(c) - ε(∅)), any t.
        finetune.py --lcm-guided-warmup: the student's first steps, before consistency distillation."""
        C = x0.shape[1]
        xt = self.q_sample(x0, t, noise)
        with torch.no_grad():
            eps = teacher_fn(xt, t).float()[:, :C]
        mse = ((student_fn(xt, t).float()[:, :C] - eps) ** 2).mean(dim=(1, 2, 3))
        return {"loss": mse, "mse": mse}


def consistency_boundary(t, sigma_data=0.5, timestep_scaling=10.0):
    """(c_skip(t), c_out(t)) of the consistency parametrisation on discrete timesteps, LCM's choice
    (Luo et al. 2023, Sec. 4.2, with CM's σ_data = 0.5 on t scaled by 10): c_skip(0) = 1, c_out(0) = 0."""
    scaled = timestep_scaling * t
    return sigma_data ** 2 / (scaled ** 2 + sigma_data ** 2), scaled / (scaled ** 2 + sigma_data ** 2) ** 0.5


def skipping_timesteps(num_timesteps, skip):
    """The teacher solver's grid of LCM's skipping-step schedule, ascending: t_n = n k - 1 for
    n = 1..T/k (19, 39, ..., 999 for k = 20); a distillation step goes from t_{n+1} to t_n = t_{n+1} - k."""
    if not 1 <= skip <= num_timesteps:
        raise ValueError(f"the skipping step k must be in [1, {num_timesteps}], got {skip}")
    return np.arange(1, num_timesteps // skip + 1, dtype=np.int64) * skip - 1


def lcm_timesteps(num_timesteps, skip, steps):
    """Multistep consistency sampling's `steps` timesteps, descending: the skipping grid from its top,
    at positions floor(i · N / steps), i = 0..steps-1 (N points in the grid), as diffusers'
    LCMScheduler.set_timesteps picks them: 4 steps of k = 20 -> 999, 759, 499, 259."""
    grid = skipping_timesteps(num_timesteps, skip)[::-1]
    if not 1 <= steps <= len(grid):
        raise ValueError(f"an LCM distilled with k = {skip} samples in 1 to {len(grid)} steps, not {steps}")
    return grid[np.arange(steps) * len(grid) // steps].tolist()


# ---------------------------------------------------------------------------------------------
# sampling


def spaced_timesteps(num_timesteps, steps):
    """ADM / DiT respacing: `steps` timesteps evenly spaced over [0, T-1], both ends included,
    descending (T-1 first)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    frac = (num_timesteps - 1) / (steps - 1)
    return sorted({round(i * frac) for i in range(steps)}, reverse=True)


def dpm_solver_timesteps(num_timesteps, steps):
    """DPM-Solver's grid (diffusers' 'linspace' spacing): `steps` timesteps from T-1 down, 0
    excluded; the last step goes to σ = 0, i.e. straight to the data prediction."""
    return np.linspace(0, num_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64).tolist()


def classifier_free_guidance(model, cond, null_cond, scale, guided_channels=None, model_kwargs=None):
    """A model function with guidance ε̃ = ε(∅) + s (ε(c) - ε(∅)) (Ho & Salimans, Eq. 6), the
    conditional and unconditional halves in one batched forward model(x, t, *cond). cond: the
    condition tensors (labels y, or caption ids and mask); null_cond: the null condition (the null
    class index for labels, or tensors like cond). All ε channels are guided unless
    guided_channels = k (DiT's legacy behaviour guides only the first 3 of 4 latent channels);
    learned-variance channels come from the conditional half. scale = 1: no extra forward; scale may
    also be a tensor (N,), one scale per example (consistency distillation's teacher).
    model_kwargs: tensors both halves get unchanged (the control image of an adapted model)."""
    cond = cond if isinstance(cond, tuple) else (cond,)
    if not isinstance(null_cond, tuple):
        null_cond = (torch.full_like(cond[0], null_cond),) if isinstance(null_cond, int) else (null_cond,)
    kwargs = model_kwargs or {}
    if not isinstance(scale, torch.Tensor) and scale == 1:
        return lambda x, t: model(x, t, *cond, **kwargs)

    def guided(x, t):
        out = model(torch.cat([x, x]), torch.cat([t, t]), *(torch.cat([c, n]) for c, n in zip(cond, null_cond)),
                    **{k: torch.cat([v, v]) for k, v in kwargs.items()})
        c_out, u_out = out.chunk(2)
        k, C = guided_channels or x.shape[1], x.shape[1]
        s = scale.view(-1, 1, 1, 1) if isinstance(scale, torch.Tensor) else scale
        eps = torch.cat([u_out[:, :k] + s * (c_out[:, :k] - u_out[:, :k]), c_out[:, k:C]], dim=1)
        return torch.cat([eps, c_out[:, C:]], dim=1)
    return guided


class Sampler:
    """Reverse process on a subsequence of timesteps. model_fn(x, t) returns ε̂ (and the variance
    channels for learn_sigma models); noise_fn() returns fresh N(0, I) noise shaped like x (the
    caller decides where it comes from, e.g. one generator per image).
    A diffusers scheduler's grid (models/pretrained.py) replaces the sampler's own: `grid` =
    (timesteps, the timestep each step goes to (< 0: the end), ᾱ at the end (DDIM's set_alpha_to_one
    False: ᾱ_0))."""

    def __init__(self, diffusion, kind="dpm-solver++", steps=50, ddim_eta=0.0, clip_denoised=False, lcm_skip=20, grid=None):
        if kind not in SAMPLERS:
            raise ValueError(f"unknown sampler '{kind}'; choose one of {SAMPLERS}")
        self.d, self.kind, self.eta, self.clip = diffusion, kind, ddim_eta, clip_denoised
        T = diffusion.num_timesteps
        if grid is not None:
            self.timesteps, self.next_timesteps, self.final_alpha_bar = list(grid[0]), list(grid[1]), float(grid[2])
            return
        if kind == "lcm":  # model_fn: a consistency-distilled student (its guidance weight built in)
            self.timesteps = lcm_timesteps(T, lcm_skip, steps)
        else:
            self.timesteps = dpm_solver_timesteps(T, steps) if kind == "dpm-solver++" else spaced_timesteps(T, steps)
        self.next_timesteps, self.final_alpha_bar = self.timesteps[1:] + [-1], 1.0

    def alpha_bar(self, t):
        return self.final_alpha_bar if t < 0 else float(self.d.alphas_cumprod[t])

    def predict(self, model_fn, x, t):
        out = model_fn(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).float()
        eps = out[:, :x.shape[1]]
        ab = self.alpha_bar(t)
        x0 = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        if self.clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)
        return x0, eps, out[:, x.shape[1]:]

    def ddpm_step(self, x, x0, v, t, t_prev, noise):
        """Ancestral step t -> t_prev of the respaced chain, β = 1 - ᾱ_t/ᾱ_prev (DDPM Eq. 6-7)."""
        ab, ab_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        beta = 1 - ab / ab_prev
        mean = (math.sqrt(ab_prev) * beta / (1 - ab)) * x0 + (math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)) * x
        if t_prev < 0:
            return mean  # the last step returns the mean (no noise at t = 0)
        posterior_var = beta * (1 - ab_prev) / (1 - ab)
        if self.d.learn_sigma:  # interpolate log β̃ and log β with v in [-1, 1] (Nichol & Dhariwal Eq. 15)
            frac = (v + 1) / 2
            log_var = frac * math.log(beta) + (1 - frac) * math.log(posterior_var)
        else:
            log_var = torch.full_like(x, math.log(posterior_var))
        return mean + torch.exp(0.5 * log_var) * noise

    def ddim_step(self, x, x0, eps, t, t_prev, noise):
        """DDIM (Song et al. 2021, Eq. 12); η = 0 is the deterministic probability-flow sampler."""
        ab, ab_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        sigma = self.eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps
        return x + sigma * noise if sigma > 0 else x

    def dpm_solver_step(self, x, x0, x0_prev, t, t_prev, t_next):
        """DPM-Solver++(2M) in data prediction (Lu et al. 2022, Alg. 2, midpoint form): first order at
        the first step and on the final step to σ = 0, second order in between."""
        def alpha_sigma_lambda(s):
            ab = self.alpha_bar(s)
            return math.sqrt(ab), math.sqrt(1 - ab), (0.5 * math.log(ab / (1 - ab)) if s >= 0 else math.inf)
        a_t, s_t, l_t = alpha_sigma_lambda(t)
        a_n, s_n, l_n = alpha_sigma_lambda(t_next)
        if t_next < 0:
            return x0  # σ_next = 0: the first-order update is exactly the data prediction
        h = l_n - l_t
        phi = math.expm1(-h)  # e^{-h} - 1
        x_next = (s_n / s_t) * x - a_n * phi * x0
        if x0_prev is not None:
            r = (l_t - alpha_sigma_lambda(t_prev)[2]) / h
            x_next = x_next - 0.5 * a_n * phi * (x0 - x0_prev) / r
        return x_next

    def consistency_step(self, x, x0, t, t_next, noise):
        """Multistep consistency sampling (Song et al. 2023, Alg. 1; LCM Alg. 3): jump to the
        consistency output f(x_t, t), then (unless last) re-noise it to t_next with fresh noise."""
        c_skip, c_out = consistency_boundary(float(t))
        f = c_skip * x + c_out * x0
        if t_next < 0:
            return f
        ab = self.alpha_bar(t_next)
        return math.sqrt(ab) * f + math.sqrt(1 - ab) * noise

    @torch.no_grad()
    def sample(self, model_fn, x, noise_fn=None, progress=None):
        ts = self.timesteps
        x0_prev = None
        for i in (progress(range(len(ts))) if progress else range(len(ts))):
            t, t_next = ts[i], self.next_timesteps[i]
            x0, eps, v = self.predict(model_fn, x, t)
            if self.kind == "ddpm":
                x = self.ddpm_step(x, x0, v, t, t_next, noise_fn() if t_next >= 0 else None)
            elif self.kind == "ddim":
                x = self.ddim_step(x, x0, eps, t, t_next, noise_fn() if self.eta > 0 and t_next >= 0 else None)
            elif self.kind == "lcm":
                x = self.consistency_step(x, x0, t, t_next, noise_fn() if t_next >= 0 else None)
            else:
                x = self.dpm_solver_step(x, x0, x0_prev, t, ts[i - 1] if i else None, t_next)
                x0_prev = x0
        return x


SAMPLERS = ("ddpm", "ddim", "dpm-solver++", "lcm")
# sample.py's images per forward pass (x2 with guidance). On 2 CPU cores DiT-T/4 samples as fast at
# 64 as at 128 and 10 % slower at 256 (benchmark.py); on a GPU pass a larger --batch-size.
SAMPLE_BATCH = 64
