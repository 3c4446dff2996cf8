"""
Condition embedding perturbation (CEP, Chen et al. 2024, Sec. 4): train on
    E || ε - ε_θ(x_t, t, c_θ(y) + δ) ||²,
with δ drawn afresh for every example at every step, at training time only:
    CEP-U  δ ~ U(-γ/√d, γ/√d)        CEP-G  δ ~ N(0, (γ/√d)²)
where d is the width of the condition embedding c_θ(y) (the class embedding of DiT / the U-Net, the
text-encoder output for captions) and γ the magnitude (γ = 1 throughout the paper). Std γ/√d for
CEP-G follows the public ports (EveryDream2, kohya sd-scripts).

Which embedding is touched is the model's business (see its `forward(..., cond_noise=)`); this
file only draws δ. Rows whose label was dropped to the null class get δ = 0: the unconditional
embedding is not perturbed.

`--cep-fixed` (the paper's "fixed CEP" ablation) draws one δ per training example, once: δ is a
pure function of (seed, example index), so it is the same at every epoch and on every rank.
"""
import math

import numpy as np
import torch

CEP_TYPES = ("uniform", "gaussian")


def cep_noise(n, dim, gamma, kind, generator=None, device="cpu"):
    """(n, dim) perturbation δ for CEP-U ('uniform') or CEP-G ('gaussian')."""
    scale = gamma / math.sqrt(dim)
    if kind == "uniform":
        return (torch.rand(n, dim, generator=generator, device=device) * 2 - 1) * scale
    if kind == "gaussian":
        return torch.randn(n, dim, generator=generator, device=device) * scale
    raise ValueError(f"unknown CEP type '{kind}'; choose one of {CEP_TYPES}")


def fixed_cep_noise(example_ids, dim, gamma, kind, seed):
    """One δ per training example, the same every time it is drawn (fixed-CEP ablation): drawn from
    numpy's PCG64 stream of (seed, example id), independent for every pair."""
    scale = gamma / math.sqrt(dim)
    rows = []
    for i in example_ids.tolist():
        rng = np.random.default_rng([seed, int(i)])
        if kind == "uniform":
            rows.append(rng.uniform(-scale, scale, dim))
        elif kind == "gaussian":
            rows.append(rng.normal(0.0, scale, dim))
        else:
            raise ValueError(f"unknown CEP type '{kind}'; choose one of {CEP_TYPES}")
    return torch.from_numpy(np.stack(rows)).float().to(example_ids.device)


def step_conditions(args, model, conditions, idx, dropped, g, B, share, text_cache):
    """The condition of each example of this rank's share: (cond, extra model kwargs, CEP δ or None).
    Dropped rows (classifier-free guidance) get the null condition, never perturbed. CEP (Chen et al.
    2024, Eq. 4) adds δ to the condition embedding c_θ(y), drawn for the global batch."""
    device = idx.device
    if isinstance(conditions, torch.Tensor):  # class labels: the null class is num_classes
        cond = (torch.where(dropped, model.num_classes, conditions[idx]),)
        if not args.cep:
            return cond, {}, None
        if args.cep_fixed:  # ablation: one δ per training example, drawn once
            delta = fixed_cep_noise(idx, model.cond_dim, args.cep_gamma, args.cep_type, args.seed)
        else:
            delta = cep_noise(B, model.cond_dim, args.cep_gamma, args.cep_type, generator=g, device=device)[share]
        return cond, {}, delta * (~dropped).unsqueeze(1)
    captions = ["" if d else conditions[i] for i, d in zip(idx.tolist(), dropped.tolist())]  # "": the null caption
    tokens = model.tokenize(captions)
    cond = (tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
    extra = {"context": text_cache.lookup(captions, device)} if text_cache else {}
    if not args.cep:
        return cond, extra, None
    L = cond[0].shape[1]  # δ on every caption token (drawn row-major for the global batch), none on padding or null rows
    delta = cep_noise(B * L, model.cond_dim, args.cep_gamma, args.cep_type, generator=g, device=device).view(B, L, -1)[share]
    return cond, extra, delta * (cond[1].unsqueeze(-1) * (~dropped).view(-1, 1, 1))
