"""
DiT: a Diffusion Transformer with adaLN-Zero conditioning (Peebles & Xie, ICCV 2023).

One file, top to bottom: patch embedding, timestep and label embedders, the DiT block, the final
layer, the model, its configs and a FLOP count. Parameter names follow the official release
(x_embedder.proj, t_embedder.mlp, y_embedder.embedding_table, blocks.N.adaLN_modulation,
final_layer) so that official DiT checkpoints load with `load_state_dict`.

Condition embedding perturbation (CEP, Chen et al. 2024) enters in `forward` through `cond_noise`:
it is added to the *class embedding* c_θ(y) = y_embedder(y) (width d = hidden_size), before the
timestep embedding is added. The caller (train.py, via models/cep.py) draws δ and passes zeros for
rows whose label was dropped to the null class: the null (unconditional) embedding is never
perturbed, because it carries no condition that could be corrupted, and the unconditional branch
of classifier-free guidance at sampling must match what training saw. At sampling `cond_noise` is
simply not passed.

Text conditioning (`text_dim > 0`, `num_classes = 0`; the CC3M half of the paper) takes caption token
embeddings `context` (N, L, text_dim) from a frozen text encoder and a 0/1 `context_mask` (N, L):
  "pooled":    c = t_emb + W_pool · mean_valid(context)   (the pooled caption replaces c_θ(y))
  "crossattn": the same c, plus in every block a cross-attention from the image tokens to the
               projected caption tokens between self-attention and MLP, whose zero-initialised output
               projection keeps the block the identity at init (adaLN-Zero spirit).
The null condition is the empty caption, encoded by the caller (which gives its rows δ = 0, as for the
null class). CEP on text perturbs every token embedding of the caption: the model, and only the model
(the caller must not add it too), adds `cond_noise` to every valid token of `context` before pooling
and projection; a (N, text_dim) δ, what models/cep.py draws, is shared by the tokens of a caption, a
(N, L, text_dim) δ is per token. Padding (mask 0) is zeroed first: neither its values nor its δ count.
`cond_dim` is then text_dim, the width of the embedding CEP perturbs.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x, shift, scale):
    # adaLN: LayerNorm output scaled and shifted per sample (DiT Sec. 3.2)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Image (N, C, H, W) -> tokens (N, T, D) by a p x p convolution with stride p."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def guidance_embedding(w, dim):
    """Fourier features of the guidance weight w (N,) of a latent consistency model (Luo et al. 2023,
    Sec. 4.2; VDM's embedding, as diffusers' LCM): [sin(1000 w f_i), cos(1000 w f_i)], f_i = 10000^(-i/(half-1))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=w.device) / (half - 1))
    args = 1000.0 * w.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> sinusoidal frequency embedding (256 wide) -> 2-layer MLP. guidance_dim > 0
    (a consistency-distilled student, finetune.py --method lcm): the guidance weight's Fourier features,
    projected by `cond_proj` (zero at initialisation), are added to the frequency embedding."""

    def __init__(self, hidden_size, frequency_embedding_size=256, freq_shift=0, guidance_dim=0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift
        self.cond_proj = nn.Linear(guidance_dim, frequency_embedding_size, bias=False) if guidance_dim else None
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000, freq_shift=0):
        # [cos(t * f_i), sin(t * f_i)] with f_i = max_period^(-i / (half - freq_shift)); freq_shift = 0 is the
        # official DiT, 1 is diffusers' DiT (Timesteps(flip_sin_to_cos=True, downscale_freq_shift=1))
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                          / (half - freq_shift))
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t, guidance=None):
        freq = self.timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
        if guidance is not None:
            if self.cond_proj is None:
                raise ValueError("this model has no guidance embedding (not a consistency-distilled student)")
            freq = freq + self.cond_proj(guidance_embedding(guidance, self.cond_proj.in_features))
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> embeddings. Row `num_classes` is the null class used for classifier-free
    guidance; it exists only when the model is trained with label dropout (as in the official
    DiT). Label dropout itself is decided by the caller, which passes y = num_classes."""

    def __init__(self, num_classes, hidden_size, class_dropout):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + int(class_dropout > 0), hidden_size)

    def forward(self, y):
        return self.embedding_table(y)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernels on GPU
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class CrossAttention(nn.Module):
    """Queries from the image tokens x (N, T, D), keys and values from the caption tokens (N, L, D)
    (already projected to width D); `mask` (N, L) bool, True = real token, False = padding, which
    the softmax never sees. A caption without any real token contributes exactly zero."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)  # zero-initialised by DiT.initialize_weights: the gate of this branch

    def forward(self, x, context, mask=None):
        (B, T, D), L, H = x.shape, context.shape[1], self.num_heads
        if mask is None:
            mask = torch.ones(B, L, dtype=torch.bool, device=x.device)
        q = self.q(x).view(B, T, H, D // H).transpose(1, 2)
        k, v = self.kv(context).view(B, L, 2, H, D // H).permute(2, 0, 3, 1, 4)
        any_token = mask.any(dim=1)
        # an all-padding row would give softmax over nothing (NaN): let it attend anywhere, then zero it
        keep = (mask | ~any_token[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.proj(out.transpose(1, 2).reshape(B, T, D)) * any_token[:, None, None]


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def run_block(block, grad_checkpoint, *inputs):
    """block(*inputs), with activation checkpointing when training with grad_checkpoint: the
    block's activations are recomputed in the backward pass instead of kept (memory for time)."""
    if grad_checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False)
    return block(*inputs)


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by the condition c (adaLN-Zero): shift,
    scale and a residual gate for both the attention and the MLP branch, regressed from c by a
    zero-initialised linear so that every block starts as the identity. With `cross_attn`, a
    (LayerNorm -> cross-attention to the caption tokens) residual branch sits between the two; its
    zero-initialised output projection keeps the block the identity at init."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, cross_attn=False, mlp_norm_eps=1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        if cross_attn:
            self.norm_cross = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.cross_attn = CrossAttention(hidden_size, num_heads)
        else:
            self.cross_attn = None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, context=None, context_mask=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def sincos_pos_embed_2d(embed_dim, grid_size):
    """Fixed 2-D sin-cos positions (MAE / DiT): half the channels encode the row, half the column;
    returns (grid_size**2, embed_dim) float64."""
    def one_axis(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64))
    # the official code embeds the w-coordinate grid first: keep that order so checkpoints agree
    return np.concatenate([one_axis(embed_dim // 2, grid_w), one_axis(embed_dim // 2, grid_h)], axis=1)


TEXT_MODES = ("pooled", "crossattn")


class DiT(nn.Module):
    """Class-conditional (num_classes > 0, the default 1000) or text-conditional (text_dim > 0,
    num_classes = 0 or None) DiT; see the module docstring. `t_freq_shift=1` reproduces the timestep
    frequencies of diffusers' DiTTransformer2DModel, and `mlp_norm_eps` its config's norm_eps (the
pre-MLP LayerNorm's; 1e-6 in the official DiT, diffusers' default 1e-5; see models/from_diffusers.py)."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout=0.1, num_classes=None, learn_sigma=True, text_dim=0,
                 text_mode="pooled", t_freq_shift=0, guidance_dim=0, mlp_norm_eps=1e-6):
        super().__init__()
        self.grad_checkpoint = False  # train.py --grad-checkpoint: recompute each block's activations in the backward
        num_classes = (0 if text_dim else 1000) if num_classes is None else num_classes
        if text_mode not in TEXT_MODES:
            raise ValueError(f"unknown text_mode '{text_mode}'; choose one of {TEXT_MODES}")
        if (text_dim > 0) == (num_classes > 0):
            raise ValueError("a DiT is conditioned on class labels (num_classes > 0) or on text (text_dim > 0, "
                             f"num_classes = 0), not {'both' if text_dim else 'neither'}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.text_dim, self.text_mode = text_dim, text_mode
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=t_freq_shift, guidance_dim=guidance_dim)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout) if num_classes else None
        cross = bool(text_dim) and text_mode == "crossattn"
        self.text_pool = nn.Linear(text_dim, hidden_size) if text_dim else None  # masked-mean caption -> c
        self.context_proj = nn.Linear(text_dim, hidden_size) if cross else None  # caption tokens for cross-attn
        num_patches = (input_size // patch_size) ** 2
        # fixed, not learned; kept as a frozen Parameter so the official state dict (which has it) loads
        pos = torch.from_numpy(sincos_pos_embed_2d(hidden_size, input_size // patch_size)).float()
        self.pos_embed = nn.Parameter(pos.unsqueeze(0), requires_grad=False)
        assert self.pos_embed.shape[1] == num_patches
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio, cross, mlp_norm_eps) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def cond_dim(self):
        """Width d of the condition embedding that CEP perturbs: the class embedding (hidden_size) or
        the caption token embeddings (text_dim)."""
        return self.text_dim or self.hidden_size

    def initialize_weights(self):
        def basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.apply(basic_init)
        w = self.x_embedder.proj.weight  # init the patch conv like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.t_embedder.cond_proj is not None:
            nn.init.zeros_(self.t_embedder.cond_proj.weight)  # the guidance embedding starts as a no-op
        # adaLN-Zero: every modulation, every cross-attention output and the output projection start at zero
        for block in self.blocks:
            zero = [block.adaLN_modulation[-1]] + ([block.cross_attn.proj] if block.cross_attn is not None else [])
            for layer in zero:
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        p, c = self.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def embed_text(self, context, context_mask=None, cond_noise=None):
        """Caption tokens (N, L, text_dim) -> (pooled condition (N, D), tokens for cross-attention
        (N, L, D) or None, bool mask (N, L)). CEP δ is added here to every valid token."""
        if context is None:
            raise ValueError("a text-conditioned DiT needs `context` (caption token embeddings)")
        mask = (torch.ones(context.shape[:2], dtype=torch.bool, device=context.device) if context_mask is None
                else context_mask.bool())
        if cond_noise is not None:
            noise = cond_noise.to(context.dtype)
            context = context + (noise.unsqueeze(1) if noise.dim() == 2 else noise)
        context = context.masked_fill(~mask.unsqueeze(-1), 0.0)  # padding carries nothing, whatever its values
        pooled = context.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1).to(context.dtype)
        tokens = self.context_proj(context) if self.context_proj is not None else None
        return self.text_pool(pooled), tokens, mask

    def embed(self, x, t, y=None, cond_noise=None, context=None, context_mask=None, guidance=None):
        """The block inputs: image tokens (N, T, D), the adaLN condition c = t_emb(t, w) + c_θ(y) (+ δ),
        and the caption tokens and mask of a text model (None for a class model)."""
        h = self.x_embedder(x) + self.pos_embed
        tokens = mask = None
        if self.text_dim:
            cond, tokens, mask = self.embed_text(context, context_mask, cond_noise)
        else:
            if y is None:
                raise ValueError("a class-conditional DiT needs labels `y`")
            cond = self.y_embedder(y)
            if cond_noise is not None:
                cond = cond + cond_noise.to(cond.dtype)  # CEP: c_θ(y) + δ  (Chen et al. 2024, Eq. 3)
        return h, self.t_embedder(t, guidance) + cond, tokens, mask

    def forward(self, x, t, y=None, cond_noise=None, context=None, context_mask=None, residuals=None, guidance=None):
        """x: (N, C, H, W) noisy input, t: (N,) timesteps, y: (N,) labels (num_classes = null) of a class
        model; context (N, L, text_dim) and context_mask (N, L) (1 = token, 0 = padding; None = all 1)
        of a text model. cond_noise: optional CEP perturbation δ, (N, hidden_size) added to the class
        embedding, or (N, text_dim) / (N, L, text_dim) added to every valid caption token.
        residuals: {block index i: (N, T, D)} added to the tokens entering block i (ControlNet and
        T2I-Adapter, models/adapters.py). guidance: (N,) guidance weights w of a consistency-distilled
        student (built with guidance_dim > 0)."""
        h, c, tokens, mask = self.embed(x, t, y, cond_noise, context, context_mask, guidance)
        for i, block in enumerate(self.blocks):
            if residuals and i in residuals:
                h = h + residuals[i].to(h.dtype)
            h = run_block(block, self.grad_checkpoint, h, c, tokens, mask)
        return self.unpatchify(self.final_layer(h, c))

    def flops_per_forward(self, context_len=77):
        """Matmul FLOPs (2 per multiply-add) of one forward pass for one image; a training step
        costs about 3x this (forward + backward). Elementwise ops are ignored, as in MFU reports.
        `context_len` is the (padded) caption length L a text model attends to."""
        D, T = self.hidden_size, self.pos_embed.shape[1]
        p, depth, L = self.patch_size, len(self.blocks), context_len
        mlp_hidden = self.blocks[0].mlp.fc1.out_features if depth else 0
        per_block = (2 * T * D * 3 * D          # qkv
                     + 2 * 2 * T * T * D        # q k^T and attn v
                     + 2 * T * D * D            # attention output projection
                     + 2 * 2 * T * D * mlp_hidden  # MLP
                     + 2 * D * 6 * D)           # adaLN modulation (once per image)
        embed = 2 * T * p * p * self.in_channels * D + 2 * (self.t_embedder.frequency_embedding_size * D + D * D)
        final = 2 * T * D * p * p * self.out_channels + 2 * D * 2 * D
        text = 2 * self.text_dim * D            # pooled caption projection
        if self.context_proj is not None:
            text += 2 * L * self.text_dim * D   # caption tokens -> width D
            per_block += (2 * T * D * D         # cross-attention q
                          + 2 * L * D * 2 * D   # k, v from the caption tokens
                          + 2 * 2 * T * L * D   # q k^T and attn v
                          + 2 * T * D * D)      # output projection
        return depth * per_block + embed + final + text


# depth, hidden size, heads of the DiT paper (Table 1), plus a tiny one for CPU runs
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16), "T": (6, 128, 4)}
DIT_CONFIGS = {f"DiT-{size}/{p}": dict(depth=d, hidden_size=h, num_heads=n, patch_size=p)
               for size, (d, h, n) in DIT_SIZES.items() for p in (2, 4, 8)}


def build_dit(name, **kwargs):
    if name not in DIT_CONFIGS:
        raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(DIT_CONFIGS)}")
    return DiT(**DIT_CONFIGS[name], **kwargs)


def config_from_state_dict(sd):
    """Model config of a bare state dict: official DiT checkpoint (DiT-XL-2-256x256.pt) or our text model."""
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    name = next((n for n, c in DIT_CONFIGS.items() if (c["depth"], c["hidden_size"], c["patch_size"]) == (depth, hidden, patch)), None)
    if name is None:
        raise ValueError(f"no DiT config with depth {depth}, width {hidden}, patch {patch}")
    out_channels = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    config = dict(name=name, input_size=int(round(sd["pos_embed"].shape[1] ** 0.5)) * patch, in_channels=in_channels)
    if "text_pool.weight" in sd:
        config.update(num_classes=0, text_dim=sd["text_pool.weight"].shape[1],
                      text_mode="crossattn" if "context_proj.weight" in sd else "pooled")
    else:
        config.update(num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1, class_dropout=0.1)
    if "t_embedder.cond_proj.weight" in sd:
        config["guidance_dim"] = sd["t_embedder.cond_proj.weight"].shape[1]
    return dict(config, learn_sigma=out_channels == 2 * in_channels)


def dit_from_checkpoint(ckpt, use_ema=True):
    """Build the DiT a train.py checkpoint (or an official bare state dict, which holds EMA
    weights) describes and load its EMA (or raw) weights."""
    if isinstance(ckpt, dict) and "x_embedder.proj.weight" in ckpt:
        config, weights = config_from_state_dict(ckpt), ckpt
    elif isinstance(ckpt, dict) and "model_config" in ckpt and ("ema" if use_ema else "model") in ckpt:
        config, weights = dict(ckpt["model_config"]), ckpt["ema" if use_ema else "model"]
    else:
        raise ValueError("neither a train.py checkpoint nor an official DiT state dict")
    model = build_dit(config.pop("name"), **config)
    model.load_state_dict(weights)
    return model.eval()
