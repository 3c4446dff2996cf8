"""
The latent-diffusion U-Net (LDM, Rombach et al., CVPR 2022), itself ADM's U-Net (Dhariwal & Nichol,
NeurIPS 2021) with the attention layers replaced by cross-attention "SpatialTransformers".

One file, top to bottom: timestep embedding, the residual block, attention and the transformer
block, down/up-sampling, the U-Net, its configs and a FLOP count. Parameter names follow
CompVis' openaimodel.py / attention.py (time_embed, input_blocks.i.j, middle_block, output_blocks,
out, in_layers/emb_layers/out_layers/skip_connection, transformer_blocks.k.attn1/attn2/ff/norm1-3,
op / conv of the down/up-samplers), so a CompVis UNet state dict (keys "model.diffusion_model.*")
loads after stripping that prefix; LDM keeps the class table outside the U-Net
("cond_stage_model.embedding.weight" = our y_embedder.embedding_table.weight in 'crossattn' mode,
"label_emb.weight" in 'add' mode).

The interface is the DiT's (models/dit.py): forward(x, t, y, ...), in/out_channels, input_size,
num_classes, learn_sigma, cond_dim, y_embedder.embedding_table (with a null row num_classes when
trained with label dropout) and flops_per_forward(). Three ways to condition:
  - class_cond="crossattn" (LDM's ImageNet model, cin256-v2): c_θ(y) = y_embedder(y), width
    context_dim, is a length-1 token sequence that every SpatialTransformer cross-attends to.
  - class_cond="add" (ADM style): c_θ(y), width time_embed_dim = 4·model_channels, is added to the
    timestep embedding; the attention blocks are then self-attention only.
  - text (num_classes=0, context_dim set): `context` (N, L, context_dim) from a text encoder.
  (num_classes=0 and context_dim=None gives an unconditional U-Net.)

Condition embedding perturbation (CEP, Chen et al. 2024) enters through `cond_noise` δ, added to the
condition embedding before it is used anywhere:
  - class modes: δ (N, cond_dim) is added to the class embedding c_θ(y) = y_embedder(y), i.e. to the
    cross-attention token ('crossattn', d = context_dim) or to the vector added to the timestep
    embedding ('add', d = 4·model_channels). The timestep embedding itself is never perturbed.
  - text mode: δ (N, L, context_dim) is added to the text-encoder output, token by token (d = context_dim).
As in dit.py, the caller draws δ (models/cep.py), passes zeros for rows dropped to the null class,
and passes nothing at sampling.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.dit import LabelEmbedder, TimestepEmbedder, guidance_embedding, run_block

CLASS_COND_MODES = ("crossattn", "add")


# the sinusoidal timestep features and the class table are DiT's (cos-first order, as ADM / LDM)
timestep_embedding = TimestepEmbedder.timestep_embedding


def conv_flops(conv, out_h, out_w):
    """Multiply-adds x 2 of a Conv2d producing an out_h x out_w map (bias adds not counted)."""
    k_h, k_w = conv.kernel_size
    return 2 * out_h * out_w * conv.out_channels * (conv.in_channels // conv.groups) * k_h * k_w


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + a projection of the (time [+ class]) embedding as a per-channel bias,
    GroupNorm-SiLU-dropout-conv with the last conv zero-initialised, so that at init the block is
    its skip path (the identity when the width does not change; ADM / LDM)."""

    def __init__(self, channels, emb_channels, out_channels, dropout=0.0):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        nn.init.zeros_(self.out_layers[-1].weight)
        nn.init.zeros_(self.out_layers[-1].bias)
        self.skip_connection = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)

    def flops(self, size, context_len):
        conv1, conv2 = self.in_layers[-1], self.out_layers[-1]
        total = conv_flops(conv1, size, size) + conv_flops(conv2, size, size)
        total += 2 * self.emb_layers[1].in_features * self.emb_layers[1].out_features  # once per image
        if isinstance(self.skip_connection, nn.Conv2d):
            total += conv_flops(self.skip_connection, size, size)
        return total


class Attention(nn.Module):
    """Multi-head attention of query tokens x (N, T, query_dim) over context tokens (N, S,
    context_dim); self-attention when context_dim is None. Bias-free q/k/v as in LDM."""

    def __init__(self, query_dim, num_heads, head_dim, context_dim=None, dropout=0.0):
        super().__init__()
        inner_dim = num_heads * head_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None):
        context = x if context is None else context
        N, T, S = x.shape[0], x.shape[1], context.shape[1]
        q = self.to_q(x).view(N, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.to_k(context).view(N, S, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.to_v(context).view(N, S, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.to_out(out.transpose(1, 2).reshape(N, T, self.num_heads * self.head_dim))

    def flops(self, num_queries, num_keys):
        inner, query_dim, key_dim = self.to_q.out_features, self.to_q.in_features, self.to_k.in_features
        return (2 * num_queries * query_dim * inner       # q
                + 2 * 2 * num_keys * key_dim * inner      # k, v
                + 2 * 2 * num_queries * num_keys * inner  # q k^T and attn v
                + 2 * num_queries * inner * query_dim)    # output projection


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020): Linear(dim, 2·4dim) -> a * GELU(gate) -> Linear(4dim, dim)."""

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        self.inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, self.inner_dim), nn.Dropout(dropout), nn.Linear(self.inner_dim, dim))

    def forward(self, x):
        return self.net(x)

    def flops(self, num_tokens):
        dim = self.net[2].out_features
        return 2 * num_tokens * dim * 2 * self.inner_dim + 2 * num_tokens * self.inner_dim * dim


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention to the context (only when context_dim
    is given), GEGLU feed-forward, each on a residual path (LDM)."""

    def __init__(self, dim, num_heads, head_dim, context_dim=None, dropout=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads, head_dim, dropout=dropout)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, num_heads, head_dim, context_dim=context_dim, dropout=dropout)
        else:
            self.norm2 = self.attn2 = None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x, context=None):
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None:
            if context is None:
                raise ValueError("this transformer block cross-attends: a context is required")
            x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))

    def flops(self, num_tokens, context_len):
        total = self.attn1.flops(num_tokens, num_tokens) + self.ff.flops(num_tokens)
        if self.attn2 is not None:
            total += self.attn2.flops(num_tokens, context_len)
        return total


class SpatialTransformer(nn.Module):
    """Feature map -> GroupNorm -> 1x1 conv -> tokens (one per pixel) -> transformer blocks -> 1x1
    conv, zero-initialised, added back to the input: the identity at init (LDM, Sec. 3.3)."""

    def __init__(self, channels, num_heads, head_dim, depth=1, context_dim=None, dropout=0.0):
        super().__init__()
        inner_dim = num_heads * head_dim
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner_dim, num_heads, head_dim, context_dim, dropout) for _ in range(depth)])
        self.proj_out = nn.Conv2d(inner_dim, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, context=None):
        N, _, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (N, H*W, inner_dim)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.transpose(1, 2).reshape(N, -1, H, W)
        return x + self.proj_out(h)

    def flops(self, size, context_len):
        tokens = size * size
        total = conv_flops(self.proj_in, size, size) + conv_flops(self.proj_out, size, size)
        return total + sum(block.flops(tokens, context_len) for block in self.transformer_blocks)


class Downsample(nn.Module):
    """Strided 3x3 conv halving the resolution."""

    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)

    def flops(self, size, context_len):
        return conv_flops(self.op, (size + 1) // 2, (size + 1) // 2)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))

    def flops(self, size, context_len):
        return conv_flops(self.conv, 2 * size, 2 * size)


class EmbedSequential(nn.Sequential):
    """A sequence of layers, each given what it needs: ResBlocks the embedding, SpatialTransformers
    the context, everything else only the feature map (LDM's TimestepEmbedSequential)."""

    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x

    def flops(self, size, context_len):
        """FLOPs of the sequence on a size x size input, and the output size."""
        total = 0
        for layer in self:
            if isinstance(layer, nn.Conv2d):
                total += conv_flops(layer, size, size)  # only conv_in, 3x3 with padding 1
            else:
                total += layer.flops(size, context_len)
            if isinstance(layer, Downsample):
                size = (size + 1) // 2
            elif isinstance(layer, Upsample):
                size = 2 * size
        return total, size


class UNet(nn.Module):
    """attention_resolutions are *down-sampling factors* (LDM's convention: `ds in
    attention_resolutions`, ds = 1 at the input and doubled by every Downsample): (8, 4, 2) on a
    64x64 latent puts attention on the 8x8, 16x16 and 32x32 maps. The middle block always attends.
    Heads: num_head_channels (if given) fixes the width of a head, else num_heads fixes their number.
    Weights keep PyTorch's default initialisation except for the zero-initialised layers (as LDM)."""

    def __init__(self, input_size=32, in_channels=1, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(2,), num_heads=1, num_head_channels=None, transformer_depth=1,
                 context_dim=None, num_classes=10, class_cond="crossattn", class_dropout=0.1,
                 learn_sigma=False, dropout=0.0, guidance_dim=0):
        super().__init__()
        self.grad_checkpoint = False  # train.py --grad-checkpoint (models/dit.py run_block)
        if num_classes and class_cond not in CLASS_COND_MODES:
            raise ValueError(f"unknown class_cond '{class_cond}'; choose one of {CLASS_COND_MODES}")
        if num_classes and class_cond == "crossattn" and context_dim is None:
            raise ValueError("class_cond='crossattn' needs context_dim (the width of the class token)")
        if input_size % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"input_size {input_size} is not divisible by 2^{len(channel_mult) - 1} (one halving per level)")
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.class_cond = class_cond if num_classes else None
        self.model_channels = model_channels
        time_embed_dim = 4 * model_channels
        self.time_embed_dim = time_embed_dim
        # the width of what cross-attention attends to; None: no cross-attention ('add', unconditional)
        self.context_dim = None if self.class_cond == "add" else context_dim

        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))
        # a consistency-distilled student (finetune.py --method lcm): the guidance weight's Fourier
        # features, projected onto the timestep features (diffusers' time_embedding.cond_proj), zero at start
        self.time_cond_proj = nn.Linear(guidance_dim, model_channels, bias=False) if guidance_dim else None
        if guidance_dim:
            nn.init.zeros_(self.time_cond_proj.weight)
        if num_classes:
            width = context_dim if class_cond == "crossattn" else time_embed_dim
            self.y_embedder = LabelEmbedder(num_classes, width, class_dropout)

        def attention(ch):
            heads = ch // num_head_channels if num_head_channels else num_heads
            if ch % heads:
                raise ValueError(f"{ch} channels do not split into {heads} heads")
            return SpatialTransformer(ch, heads, ch // heads, transformer_depth, self.context_dim, dropout)

        # down path: every block's output is kept as a skip connection for the up path
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_channels, ch, ds = [model_channels], model_channels, 1
        self.level_ends = []  # index of the last input block of each level (before its Downsample)
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, time_embed_dim, mult * model_channels, dropout)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            self.level_ends.append(len(self.input_blocks) - 1)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.skip_channels = list(skip_channels)  # channels of each input block's output
        self.middle_block = EmbedSequential(ResBlock(ch, time_embed_dim, ch, dropout), attention(ch),
                                            ResBlock(ch, time_embed_dim, ch, dropout))

        # up path: num_res_blocks + 1 ResBlocks per level, each eating one skip connection
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), time_embed_dim, mult * model_channels, dropout)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))
        assert not skip_channels

        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), nn.Conv2d(model_channels, self.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @property
    def cond_dim(self):
        """Width d of the condition embedding that CEP perturbs (None for an unconditional U-Net)."""
        if self.num_classes:
            return self.y_embedder.embedding_table.embedding_dim
        return self.context_dim

    def embed(self, t, y=None, context=None, cond_noise=None, dtype=torch.float32, guidance=None):
        """(timestep (+ guidance, + class) embedding added in every ResBlock, cross-attention context)."""
        freq = timestep_embedding(t, self.model_channels)
        if guidance is not None:
            if self.time_cond_proj is None:
                raise ValueError("this model has no guidance embedding (not a consistency-distilled student)")
            freq = freq + self.time_cond_proj(guidance_embedding(guidance, self.time_cond_proj.in_features))
        emb = self.time_embed(freq.to(dtype))
        if self.num_classes:
            if y is None:
                raise ValueError("class-conditional U-Net: labels y are required")
            if context is not None:  # e.g. a DiT-style call model(x, t, y, δ), which must name cond_noise=δ
                raise ValueError("class-conditional U-Net: the context is built from y; pass δ as cond_noise=")
            class_emb = self.y_embedder(y)
            if cond_noise is not None:
                if cond_noise.shape != class_emb.shape:
                    raise ValueError(f"cond_noise has shape {tuple(cond_noise.shape)}, expected {tuple(class_emb.shape)}")
                class_emb = class_emb + cond_noise.to(class_emb.dtype)  # CEP: c_θ(y) + δ (Chen et al. 2024, Eq. 3)
            if self.class_cond == "add":
                emb = emb + class_emb
            else:
                context = class_emb.unsqueeze(1)  # one token per image
        elif self.context_dim is not None:
            if context is None or y is not None:
                raise ValueError("text-conditional U-Net: pass context (N, L, context_dim) and no labels")
            if cond_noise is not None:
                if cond_noise.dim() != 3:
                    raise ValueError("text-conditional U-Net: cond_noise must be (N, L, context_dim) or (N, 1, context_dim)")
                context = context + cond_noise.to(context.dtype)  # CEP on every text token
        elif y is not None or context is not None or cond_noise is not None:
            raise ValueError("unconditional U-Net: y, context and cond_noise must be None")
        return emb, context

    def forward(self, x, t, y=None, context=None, cond_noise=None, residuals=None, guidance=None):
        """x: (N, C, H, W), t: (N,) timesteps, y: (N,) labels (num_classes = null) for a
        class-conditional model, context: (N, L, context_dim) text tokens for a text model,
        cond_noise: CEP δ, (N, cond_dim) for class models, (N, L, context_dim) for text models.
        residuals (models/adapters.py): {"skips": one tensor per input block, added to the skip
        connections only, "middle": added to the middle block's output} (ControlNet), or
        {"features": {input block index: tensor}} added to the encoder's features (T2I-Adapter).
        guidance: (N,) guidance weights w of a consistency-distilled student (guidance_dim > 0)."""
        emb, context = self.embed(t, y, context, cond_noise, x.dtype, guidance)
        residuals = residuals or {}
        skips, h = [], x
        for i, block in enumerate(self.input_blocks):
            h = run_block(block, self.grad_checkpoint, h, emb, context)
            if i in residuals.get("features", {}):
                h = h + residuals["features"][i].to(h.dtype)
            skips.append(h)
        h = run_block(self.middle_block, self.grad_checkpoint, h, emb, context)
        if "skips" in residuals:
            skips = [s + r.to(s.dtype) for s, r in zip(skips, residuals["skips"])]
            h = h + residuals["middle"].to(h.dtype)
        for block in self.output_blocks:
            h = run_block(block, self.grad_checkpoint, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)

    def flops_per_forward(self, context_len=77):
        """Matmul + conv FLOPs (2 per multiply-add) of one forward pass for one image at input_size;
        a training step costs about 3x this. Norms and elementwise ops are ignored, as in MFU
        reports. context_len (text tokens, CLIP's 77 by default) only matters in text mode; the
        class token of 'crossattn' is one token."""
        context_len = 1 if self.class_cond == "crossattn" else context_len
        E, mc = self.time_embed_dim, self.model_channels
        total = 2 * (mc * E + E * E)  # timestep MLP
        size = self.input_size
        for block in self.input_blocks:
            flops, size = block.flops(size, context_len)
            total += flops
        total += self.middle_block.flops(size, context_len)[0]
        for block in self.output_blocks:
            flops, size = block.flops(size, context_len)
            total += flops
        return total + conv_flops(self.out[-1], size, size)


# SD-1.5 is Stable Diffusion v1's U-Net (CompVis v1-inference.yaml, diffusers' UNet2DConditionModel of
# runwayml/stable-diffusion-v1-5: 859,520,964 parameters): 64x64x4 latents of the KL-f8 VAE, captions
# through the frozen CLIP ViT-L/14 text tower (context 768), 8 heads, attention at 64, 32 and 16 px.
# LDM-4 is CompVis' cin256-v2.yaml (the released class-conditional ImageNet 256 model; LDM Table 3,
# "LDM-4", 400M parameters): 64x64x3 VQ latents, class token via cross-attention from a 1001-row
# ClassEmbedder of width 512. That config sets num_heads: 1 (legacy=True: one head of width ch).
# The small configs are for 32x32 single-channel Fashion-MNIST on CPU.
UNET_CONFIGS = {
    "LDM-4": dict(input_size=64, in_channels=3, model_channels=192, channel_mult=(1, 2, 3, 5), num_res_blocks=2,
                  attention_resolutions=(8, 4, 2), num_heads=1, transformer_depth=1, context_dim=512,
                  num_classes=1000, class_cond="crossattn"),
    "UNet-T": dict(input_size=32, in_channels=1, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(2,), num_head_channels=16, context_dim=64, num_classes=10, class_cond="crossattn"),
    "UNet-S": dict(input_size=32, in_channels=1, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                   attention_resolutions=(2, 4), num_head_channels=32, context_dim=128, num_classes=10, class_cond="crossattn"),
    "SD-1.5": dict(input_size=64, in_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                   attention_resolutions=(4, 2, 1), num_heads=8, transformer_depth=1, context_dim=768, num_classes=0),
}


def build_unet(name, **overrides):
    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(UNET_CONFIGS)}")
    return UNet(**{**UNET_CONFIGS[name], **overrides})
