"""
First-stage autoencoders for latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", LDM). The paper's latent models use two of them, both frozen:

- AutoencoderKL: Stable Diffusion's KL-regularised autoencoder (f=8, 4 latent channels), the first
  stage of DiT-XL/2 (Peebles & Xie 2023). Latents are drawn from the posterior N(mean, exp(logvar)).
- VQModel: LDM's VQ-regularised autoencoder VQ-f4 (64x64x3 latents for 256x256 images, codebook of
  8192 entries), the first stage of LDM-4. The diffusion model is trained on the *pre-quantisation*
  latents h; the decoder quantises (LDM Sec. 3.3, Appendix G).

Both are written from scratch, but with diffusers' parameter names, so a diffusers `save_pretrained`
folder (config.json + diffusion_pytorch_model.safetensors / .bin) loads with strict=True.

Scaling convention (LDM Sec. 4.3.2 and Appendix D.1). The diffusion model sees
    KL: z = scaling_factor * (a sample of, or the mean of, the posterior),  scaling_factor = 0.18215
    VQ: z = h, unscaled (LDM never rescales VQ latents: scale 1.0)
and `decode_latents` divides by the same factor before decoding. diffusers' VQModel config carries a
scaling_factor of 0.18215 by default (inherited from SD, PR #1860); VQModel here ignores it.
"""
import json
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.common import UsageError

# --------------------------------------------------------------------------------------------------
# Building blocks: LDM's encoder/decoder (taming-transformers' ResnetBlock / AttnBlock / Down- and
# Upsample), named as in diffusers (ResnetBlock2D, Attention, DownEncoderBlock2D, UpDecoderBlock2D).


def group_norm(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv3x3 twice, plus a skip connection (a 1x1 conv when the width changes)."""

    def __init__(self, in_ch, out_ch, groups):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class SelfAttention(nn.Module):
    """One-head self-attention over all H*W positions, with a residual (LDM's AttnBlock)."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers: [Linear, Dropout]

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = self.to_out[0](F.scaled_dot_product_attention(q, k, v).squeeze(1))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding right and bottom only (LDM's asymmetric padding)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock(nn.Module):
    def __init__(self, in_ch, out_ch, num_layers, groups, add_downsample):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(num_layers))
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if add_downsample else None

    def forward(self, x):
        for layer in [*self.resnets, *(self.downsamplers or [])]:
            x = layer(x)
        return x


class UpDecoderBlock(nn.Module):
    def __init__(self, in_ch, out_ch, num_layers, groups, add_upsample):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(num_layers))
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if add_upsample else None

    def forward(self, x):
        for layer in [*self.resnets, *(self.upsamplers or [])]:
            x = layer(x)
        return x


class MidBlock(nn.Module):
    """resnet, self-attention, resnet at the lowest resolution."""

    def __init__(self, channels, groups, add_attention):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([SelfAttention(channels, groups)] if add_attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """Image -> latent feature map, downsampled by 2 at every block but the last."""

    def __init__(self, in_ch, out_ch, block_out_channels, layers_per_block, groups, add_attention):
        super().__init__()
        widths = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_ch, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownEncoderBlock(widths[max(i - 1, 0)], w, layers_per_block, groups, add_downsample=i < len(widths) - 1)
            for i, w in enumerate(widths))
        self.mid_block = MidBlock(widths[-1], groups, add_attention)
        self.conv_norm_out = group_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], out_ch, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in [*self.down_blocks, self.mid_block]:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent -> image; the mirror of Encoder, with one more resnet per block (as in LDM)."""

    def __init__(self, in_ch, out_ch, block_out_channels, layers_per_block, groups, add_attention):
        super().__init__()
        widths = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(in_ch, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups, add_attention)
        self.up_blocks = nn.ModuleList(
            UpDecoderBlock(widths[max(i - 1, 0)], w, layers_per_block + 1, groups, add_upsample=i < len(widths) - 1)
            for i, w in enumerate(widths))
        self.conv_norm_out = group_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], out_ch, 3, padding=1)

    def forward(self, z):
        x = self.conv_in(z)
        for block in [self.mid_block, *self.up_blocks]:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# --------------------------------------------------------------------------------------------------
# Configs: diffusers' keys. Defaults are the paper's first stages, not diffusers' (tiny) defaults.

SD_KL_F8_CONFIG = dict(  # stabilityai/sd-vae-ft-ema (the DiT-XL/2 first stage)
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu", latent_channels=4,
    norm_num_groups=32, sample_size=256, scaling_factor=0.18215, shift_factor=None, latents_mean=None,
    latents_std=None, force_upcast=True, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True)

LDM_VQ_F4_CONFIG = dict(  # LDM's vq-f4 (n_embed 8192, embed_dim 3, ch 128, ch_mult 1,2,4, 2 res blocks)
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[128, 256, 512], layers_per_block=2, act_fn="silu", latent_channels=3, sample_size=256,
    num_vq_embeddings=8192, norm_num_groups=32, vq_embed_dim=3, scaling_factor=0.18215, norm_type="group",
    mid_block_add_attention=True, lookup_from_codebook=False, force_upcast=False)

# (key, the only value supported) for diffusers options this file does not implement
UNSUPPORTED_UNLESS = {"AutoencoderKL": [("shift_factor", None), ("latents_mean", None), ("latents_std", None)],
                      "VQModel": [("norm_type", "group"), ("lookup_from_codebook", False)]}


def resolve_config(class_name, defaults, config):
    """defaults updated by `config` (private '_' keys dropped); ValueError on anything unsupported."""
    given = {k: v for k, v in (config or {}).items() if not k.startswith("_")}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{class_name}: unsupported config key(s) {unknown}")
    cfg = {**defaults, **given}
    n = len(cfg["block_out_channels"])
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        cfg[key] = list(given.get(key, [block] * n))
        if cfg[key] != [block] * n:
            raise ValueError(f"{class_name}: {key} must be {n} x '{block}' (one per block_out_channels), got {cfg[key]}")
    if cfg["act_fn"] not in ("silu", "swish"):
        raise ValueError(f"{class_name}: config act_fn={cfg['act_fn']!r} is not supported (only 'silu')")
    for key, supported in UNSUPPORTED_UNLESS[class_name]:
        if cfg[key] != supported:
            raise ValueError(f"{class_name}: config {key}={cfg[key]!r} is not supported (only {supported!r})")
    return cfg


# --------------------------------------------------------------------------------------------------
# The two autoencoders


class AutoencoderKL(nn.Module):
    """SD's KL autoencoder: encode(x) -> (mean, logvar) of a diagonal Gaussian posterior."""

    def __init__(self, config=None):
        super().__init__()
        self.config = c = resolve_config("AutoencoderKL", SD_KL_F8_CONFIG, config)
        z, arch = c["latent_channels"], (c["block_out_channels"], c["layers_per_block"], c["norm_num_groups"],
                                         c["mid_block_add_attention"])
        self.encoder = Encoder(c["in_channels"], 2 * z, *arch)  # mean and logvar
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1) if c["use_quant_conv"] else None
        self.post_quant_conv = nn.Conv2d(z, z, 1) if c["use_post_quant_conv"] else None
        self.decoder = Decoder(z, c["out_channels"], *arch)
        self.scaling_factor = c["scaling_factor"]

    def encode(self, x):
        """x (N, C, H, W) in [-1, 1] -> mean, logvar (N, latent, H/f, W/f); logvar clamped to [-30, 20]
        as in LDM's DiagonalGaussianDistribution."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @staticmethod
    def sample_latent(mean, logvar, generator=None):
        """mean + std * ε; ε drawn on the generator's device (the same draw as diffusers' latent_dist.sample)."""
        device = generator.device if generator is not None else mean.device
        eps = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
        return mean + torch.exp(0.5 * logvar) * eps

    def decode(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


class VectorQuantizer(nn.Module):
    """Nearest codebook entry in L2 (van den Oord et al. 2017), with the straight-through gradient."""

    def __init__(self, num_embeddings, dim, rows_per_chunk=16384):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, dim)
        self.rows_per_chunk = rows_per_chunk  # bounds the (rows, num_embeddings) distance matrix

    def forward(self, h):
        """h (N, D, H, W) -> z_q (N, D, H, W), indices (N, H, W)."""
        n, d, height, width = h.shape
        flat = h.permute(0, 2, 3, 1).reshape(-1, d)
        codebook = self.embedding.weight
        indices = torch.cat([torch.cdist(rows, codebook).argmin(dim=1) for rows in flat.split(self.rows_per_chunk)])
        z_q = self.embedding(indices).view(n, height, width, d).permute(0, 3, 1, 2)
        return h + (z_q - h).detach(), indices.view(n, height, width)


class VQModel(nn.Module):
    """LDM's VQ autoencoder: encode(x) -> h (pre-quantisation); decode(h) quantises, then decodes."""

    scaling_factor = 1.0  # LDM trains on unscaled VQ latents; the config's scaling_factor is ignored

    def __init__(self, config=None):
        super().__init__()
        self.config = c = resolve_config("VQModel", LDM_VQ_F4_CONFIG, config)
        z, arch = c["latent_channels"], (c["block_out_channels"], c["layers_per_block"], c["norm_num_groups"],
                                         c["mid_block_add_attention"])
        embed_dim = c["vq_embed_dim"] if c["vq_embed_dim"] is not None else z
        self.encoder = Encoder(c["in_channels"], z, *arch)
        self.quant_conv = nn.Conv2d(z, embed_dim, 1)
        self.quantize = VectorQuantizer(c["num_vq_embeddings"], embed_dim)  # vae.quantize(h) -> z_q, indices
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)
        self.decoder = Decoder(z, c["out_channels"], *arch)

    def encode(self, x):
        return self.quant_conv(self.encoder(x))

    def decode(self, h, force_not_quantize=False, return_indices=False):
        """As diffusers' VQModel.decode (and LDM's VQModelInterface.decode): quantise h unless
        force_not_quantize, then post_quant_conv and the decoder. return_indices: also the codebook
        index of each position (N, h, w), None when not quantised."""
        z_q, indices = (h, None) if force_not_quantize else self.quantize(h)
        x = self.decoder(self.post_quant_conv(z_q))
        return (x, indices) if return_indices else x


@torch.no_grad()
def vq_code_indices(vae, x):
    """Images (N, C, H, W) in [-1, 1] -> the codebook index of each latent position (N, h, w): LDM's
    encode, then the nearest-codebook-entry quantisation (evaluate.py's codebook entropy of sample
    folders written before sample.py recorded the sampled codes)."""
    param = next(vae.parameters())
    return vae.quantize(vae.encode(x.to(param.device, param.dtype)))[1]


# --------------------------------------------------------------------------------------------------
# Loading a diffusers-format folder (or a hub id)

VAE_CLASSES = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# attention names of diffusers < 0.14 checkpoints -> current names (diffusers renames them on load too)
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
HUB_ID = re.compile(r"^([\w.-]+/[\w.-]+)(?:/([\w.-]+))?$")  # owner/name, or owner/name/subfolder


def _download(repo_id, subfolder):
    """Fetch config + weights of a hub repo (cached files are used offline); FileNotFoundError if impossible."""
    from huggingface_hub import snapshot_download
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        for weights in WEIGHT_FILES:  # the .bin only when there is no .safetensors
            folder = os.path.join(snapshot_download(repo_id, allow_patterns=[prefix + "config.json", prefix + weights]),
                                  prefix)
            if os.path.exists(os.path.join(folder, weights)):
                break
    except Exception as e:
        raise FileNotFoundError(f"'{repo_id}' is not a local folder and could not be fetched from the Hugging Face "
                                f"Hub (offline, or no such repo?): {type(e).__name__}: {e}") from e
    return folder


def read_weights(folder):
    """(path, state dict) of a diffusers save_pretrained folder's weights, safetensors first; (None, None) if none."""
    weights = next((os.path.join(folder, w) for w in WEIGHT_FILES if os.path.isfile(os.path.join(folder, w))), None)
    if weights is None:
        return None, None
    if weights.endswith(".safetensors"):
        from safetensors.torch import load_file
        return weights, load_file(weights)
    return weights, torch.load(weights, map_location="cpu", weights_only=True)


def load_vae(spec, kind=None, subfolder=None):
    """A frozen (eval, no grad) first stage from a diffusers `save_pretrained` folder, or from a hub id
    'owner/name' (+ subfolder, e.g. 'vae' / 'vqvae', also written 'owner/name/vqvae') when online or
    cached. `kind` ('AutoencoderKL' /
    'VQModel') is read from the config's _class_name when not given."""
    spec = os.fspath(spec)
    folder = os.path.join(spec, subfolder) if subfolder else spec
    if not os.path.exists(folder):
        hub = HUB_ID.match(spec)
        if os.path.exists(spec) or not hub:
            raise FileNotFoundError(f"no such VAE folder: {folder}")
        folder = _download(hub.group(1), subfolder or hub.group(2))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"a VAE must be a folder with config.json and weights, not {folder}")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in VAE folder {folder}")
    with open(config_path) as f:
        config = json.load(f)
    class_name = config.get("_class_name", kind)
    if kind is not None and class_name != kind:
        raise ValueError(f"{config_path} describes a {class_name}, not the requested {kind}")
    if class_name not in VAE_CLASSES:
        raise ValueError(f"{config_path}: unsupported autoencoder class {class_name!r} "
                         f"(supported: {', '.join(VAE_CLASSES)})")
    weights, state = read_weights(folder)
    if weights is None:
        raise FileNotFoundError(f"no weights in VAE folder {folder} (expected one of {', '.join(WEIGHT_FILES)})")
    state = {re.sub(r"(attentions\.\d+)\.(query|key|value|proj_attn)\.",
                    lambda m: f"{m[1]}.{LEGACY_ATTENTION_NAMES[m[2]]}.", k): v.float() for k, v in state.items()}
    with torch.device("meta"):  # no random init: every tensor comes from the file
        vae = VAE_CLASSES[class_name](config)
    try:
        vae.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{weights} does not match its config ({class_name}): {e}") from e
    return vae.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# What corrupt_data.py / train.py / sample.py call


@torch.no_grad()
def encode_images(vae, x):
    """Images (N, C, H, W) in [-1, 1] -> what the diffusion data pipeline stores, *unscaled*:
    KL: (mean, logvar) of the posterior; VQ: (h, None), the pre-quantisation latents.
    Turn them into diffusion latents with `diffusion_latents`."""
    param = next(vae.parameters())
    x = x.to(param.device, param.dtype)
    if isinstance(vae, AutoencoderKL):
        return vae.encode(x)
    return vae.encode(x), None


def diffusion_latents(vae, mean, logvar=None, generator=None):
    """z the diffusion model trains on: scaling_factor * a posterior sample (KL; the mean when logvar is
    None) or h itself (VQ: scaling_factor 1.0)."""
    z = mean if logvar is None else AutoencoderKL.sample_latent(mean, logvar, generator)
    return z * vae.scaling_factor


def latents_from_stats(stats, scaling_factor, g, B, share):
    """train.py --vae: a rank's share (rows, stats, C, h, w) of pre-extracted latents -> diffusion
    latents. stats = (mean, logvar) of the KL posterior, z = scale * a posterior sample whose noise
    comes from the step generator g for the global batch of B (this rank keeps rows `share`), so
    any number of ranks draws the same; stats = (h,) for VQ, z = h."""
    x = stats[:, 0]
    if stats.shape[1] == 2:  # the posterior noise, drawn for the global batch
        posterior = torch.randn((B, *x.shape[1:]), generator=g, device=x.device)[share]
        x = x + torch.exp(0.5 * stats[:, 1].clamp(-30, 20)) * posterior
    return x * scaling_factor


@torch.no_grad()
def decode_latents(vae, z, force_not_quantize=False, return_codes=False):
    """Diffusion latents -> images, roughly in [-1, 1] (not clamped): divide by scaling_factor, then
    decode. A VQ decoder quantises first, as LDM does, unless force_not_quantize. return_codes:
    (images, the codebook indices the VQ decoder quantised to (N, h, w); None for a KL model),
    what sample.py records for evaluate.py's codebook entropy."""
    param = next(vae.parameters())
    z = z.to(param.device, param.dtype) / vae.scaling_factor
    if isinstance(vae, VQModel):
        return vae.decode(z, force_not_quantize=force_not_quantize, return_indices=return_codes)
    return (vae.decode(z), None) if return_codes else vae.decode(z)


def open_vae(spec, device="cpu"):
    try:
        return load_vae(spec).to(device)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--vae: {str(e).splitlines()[0]}")
