"""
Downstream adaptation of a pre-trained denoiser (Chen et al. 2024, Sec. 2.3 / Table 2): spatial
control with ControlNet (Zhang et al., ICCV 2023) or T2I-Adapter (Mou et al., AAAI 2024), for both
backbones of the repo (models/dit.py, models/unet.py), and the class-table resize of plain full
fine-tuning on a new class set. finetune.py builds these; sample.py rebuilds them from checkpoints.

Adapted(base, adapter) freezes the pre-trained model: only the adapter trains and the base weights
stay bit-identical. Every path from the adapter into the base ends in a zero-initialised layer, so at
step 0 the adapted model computes exactly what the base computes.

ControlNet
  U-Net: a trainable copy of the encoder (input blocks + middle block), fed x_t, the frozen base's
         timestep/class (or caption) embedding, and the control image through a small conv "hint"
         encoder ending in a zero conv, added after the copy's first conv. The output of each copied
         block passes a zero-initialised 1x1 conv and is added to the base's matching skip connection;
         the copy's middle output is added to the base's middle output. (Zhang et al. also copy the
         time embedding MLP; here both branches share the frozen one, so CEP's δ reaches both.)
  DiT:   a trainable copy of the patch embedding and of the first half of the blocks (PixArt-δ's
         ControlNet-Transformer); hint tokens are added to the copy's input tokens, and copied block
         i's output passes a zero-initialised linear and is added to the tokens entering base block i+1.
T2I-Adapter
  U-Net: the control image is pixel-unshuffled to the model's grid, then a conv and per level two
         residual conv blocks (a stride-2 conv between levels) give one feature map per level, each
         projected by a zero-initialised 1x1 conv to that level's width and added to the base encoder's
         features at the end of the level. It does not see x_t or t.
  DiT:   the same at the token grid: one residual block per chosen base block, its features projected
         by a zero-initialised linear and added to the tokens entering that block.
  (Mou et al. do not zero-initialise the output; we do, so adaptation starts from the base model.)

Control images come at the resolution of the *images* (control_size): for a latent model that is the
VAE's factor (8 for SD's KL-f8) times the latent size, and the hint encoders downsample accordingly.
"""
import copy
import math

import torch
import torch.nn as nn

from models.dit import DiT
from models.unet import UNet

METHODS = ("controlnet", "t2i-adapter")


def zero_init(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


def log2_factor(size, grid, what):
    factor = size // grid
    if size % grid or factor & (factor - 1):
        raise ValueError(f"control images of {size}px do not reduce to the {what} grid of {grid} by a power of 2")
    return int(math.log2(factor))


class HintEncoder(nn.Module):
    """ControlNet's input hint block: 3x3 convs with SiLU, halving the resolution `downs` times
    (16 channels, doubled at every halving, at most 256), then a zero-initialised conv to out_channels."""

    def __init__(self, in_channels, out_channels, downs):
        super().__init__()
        width = 16
        layers = [nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU()]
        for _ in range(downs):
            wider = min(2 * width, 256)
            layers += [nn.Conv2d(width, wider, 3, padding=1, stride=2), nn.SiLU(), nn.Conv2d(wider, wider, 3, padding=1), nn.SiLU()]
            width = wider
        layers.append(zero_init(nn.Conv2d(width, out_channels, 3, padding=1)))
        self.net = nn.Sequential(*layers)

    def forward(self, control):
        return self.net(control)


class AdapterBlock(nn.Module):
    """T2I-Adapter's residual block: x + conv(ReLU(conv(x)))."""

    def __init__(self, channels):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(channels, channels, 3, padding=1), nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(x)))


class UNetControlNet(nn.Module):
    def __init__(self, base, control_channels, control_size):
        super().__init__()
        self.input_blocks = copy.deepcopy(base.input_blocks)
        self.middle_block = copy.deepcopy(base.middle_block)
        self.hint = HintEncoder(control_channels, base.model_channels, log2_factor(control_size, base.input_size, "U-Net"))
        self.zero_convs = nn.ModuleList(zero_init(nn.Conv2d(ch, ch, 1)) for ch in base.skip_channels)
        self.zero_middle = zero_init(nn.Conv2d(base.skip_channels[-1], base.skip_channels[-1], 1))

    def forward(self, base, x, t, control, **inputs):
        emb, context = base.embed(t, dtype=x.dtype, **inputs)
        h, skips = x, []
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            if i == 0:
                h = h + self.hint(control)
            skips.append(self.zero_convs[i](h))
        return {"skips": skips, "middle": self.zero_middle(self.middle_block(h, emb, context))}


class DiTControlNet(nn.Module):
    def __init__(self, base, control_channels, control_size, num_blocks=None):
        super().__init__()
        depth = len(base.blocks)
        num_blocks = num_blocks or depth // 2
        if not 1 <= num_blocks < depth:
            raise ValueError(f"a DiT ControlNet copies 1 to {depth - 1} of the {depth} blocks, not {num_blocks}")
        grid = base.input_size // base.patch_size
        self.x_embedder = copy.deepcopy(base.x_embedder)
        self.blocks = nn.ModuleList(copy.deepcopy(base.blocks[i]) for i in range(num_blocks))
        self.hint = HintEncoder(control_channels, base.hidden_size, log2_factor(control_size, grid, "DiT token"))
        self.zero_linears = nn.ModuleList(zero_init(nn.Linear(base.hidden_size, base.hidden_size)) for _ in range(num_blocks))

    def forward(self, base, x, t, control, **inputs):
        _, c, tokens, mask = base.embed(x, t, **inputs)
        h = self.x_embedder(x) + base.pos_embed + self.hint(control).flatten(2).transpose(1, 2)
        residuals = {}
        for i, (block, out) in enumerate(zip(self.blocks, self.zero_linears)):
            h = block(h, c, tokens, mask)
            residuals[i + 1] = out(h)  # into the base block after the copied one
        return residuals


class UNetT2IAdapter(nn.Module):
    def __init__(self, base, control_channels, control_size):
        super().__init__()
        factor = 2 ** log2_factor(control_size, base.input_size, "U-Net")
        widths = [base.skip_channels[i] for i in base.level_ends]
        self.targets = list(base.level_ends)
        self.unshuffle = nn.PixelUnshuffle(factor)
        self.conv_in = nn.Conv2d(control_channels * factor ** 2, widths[0], 3, padding=1)
        self.levels = nn.ModuleList(
            nn.Sequential(*([nn.Conv2d(widths[k - 1], w, 3, padding=1, stride=2)] if k else []), AdapterBlock(w), AdapterBlock(w))
            for k, w in enumerate(widths))
        self.outs = nn.ModuleList(zero_init(nn.Conv2d(w, w, 1)) for w in widths)

    def forward(self, base, x, t, control, **inputs):
        h, features = self.conv_in(self.unshuffle(control)), {}
        for level, out, target in zip(self.levels, self.outs, self.targets):
            h = level(h)
            features[target] = out(h)
        return {"features": features}


class DiTT2IAdapter(nn.Module):
    def __init__(self, base, control_channels, control_size, num_blocks=None, width=128):
        super().__init__()
        depth = len(base.blocks)
        num_blocks = num_blocks or min(4, depth // 2)
        if not 1 <= num_blocks <= depth // 2:
            raise ValueError(f"a DiT T2I-Adapter feeds 1 to {depth // 2} blocks (the first half), not {num_blocks}")
        self.targets = [round(k * (depth // 2) / num_blocks) for k in range(num_blocks)]  # spread over the first half
        factor = 2 ** log2_factor(control_size, base.input_size // base.patch_size, "DiT token")
        self.unshuffle = nn.PixelUnshuffle(factor)
        self.conv_in = nn.Conv2d(control_channels * factor ** 2, width, 3, padding=1)
        self.levels = nn.ModuleList(AdapterBlock(width) for _ in self.targets)
        self.outs = nn.ModuleList(zero_init(nn.Linear(width, base.hidden_size)) for _ in self.targets)

    def forward(self, base, x, t, control, **inputs):
        h, residuals = self.conv_in(self.unshuffle(control)), {}
        for level, out, target in zip(self.levels, self.outs, self.targets):
            h = level(h)
            residuals[target] = out(h.flatten(2).transpose(1, 2))
        return residuals


ADAPTERS = {("controlnet", DiT): DiTControlNet, ("controlnet", UNet): UNetControlNet,
            ("t2i-adapter", DiT): DiTT2IAdapter, ("t2i-adapter", UNet): UNetT2IAdapter}


class Adapted(nn.Module):
    """A frozen pre-trained model (class- or text-conditional) plus a trainable adapter. Called like
    the base, with the control image as a keyword: model(x, t, *cond, cond_noise=δ, control=c)."""

    def __init__(self, base, method, control, control_channels, control_size, num_blocks=None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown adaptation method '{method}'; choose one of {METHODS}")
        self.text = hasattr(base, "denoiser")
        denoiser = base.denoiser if self.text else base
        options = {"num_blocks": num_blocks} if isinstance(denoiser, DiT) else {}
        if num_blocks and not options:
            raise ValueError("the number of adapted blocks is a DiT option")
        self.adapter = ADAPTERS[method, type(denoiser)](denoiser, control_channels, control_size, **options).requires_grad_(True)
        self.base = base.requires_grad_(False)  # (after the copies: a ControlNet's copied blocks train)
        self.config = dict(method=method, control=control, control_channels=control_channels,
                           control_size=control_size, num_blocks=num_blocks)
        for name in ("in_channels", "out_channels", "input_size", "learn_sigma", "num_classes", "cond_dim"):
            setattr(self, name, getattr(base, name))

    @property
    def denoiser(self):
        return self.base.denoiser if self.text else self.base

    @property
    def y_embedder(self):
        return self.base.y_embedder

    @property
    def text_encoder(self):
        return self.base.text_encoder

    def tokenize(self, captions):
        return self.base.tokenize(captions)

    def forward(self, x, t, *cond, cond_noise=None, control=None, context=None):
        if control is None:
            raise ValueError(f"this model was adapted to {self.config['control']} control: pass control=")
        if self.text:
            inputs = self.base.denoiser_inputs(*cond, cond_noise=cond_noise, context=context)
        else:
            inputs = {"y": cond[0], "cond_noise": cond_noise}
        residuals = self.adapter(self.denoiser, x, t, control.to(x.dtype), **inputs)
        return self.denoiser(x, t, **inputs, residuals=residuals)

    def flops_per_forward(self):
        """Approximate: the base plus the share of it that the adapter copies (for the MFU log)."""
        share = len(getattr(self.adapter, "blocks", [])) / len(self.denoiser.blocks) if isinstance(self.denoiser, DiT) else 0.5
        return self.base.flops_per_forward() * (1 + (share if self.config["method"] == "controlnet" else 0.0))


def resize_class_table(model, num_classes, generator=None):
    """--method full on a new class set: num_classes fresh rows drawn elementwise from N(mean, std)
    of the pre-trained class rows, the null (unconditional) row carried over."""
    table = model.y_embedder.embedding_table
    old = table.weight.data[:model.num_classes]
    has_null = table.num_embeddings == model.num_classes + 1
    new = nn.Embedding(num_classes + int(has_null), table.embedding_dim).to(table.weight.device)
    rows = torch.randn(num_classes, table.embedding_dim, generator=generator) * old.std(0).cpu() + old.mean(0).cpu()
    new.weight.data[:num_classes] = rows.to(new.weight)
    if has_null:
        new.weight.data[num_classes] = table.weight.data[model.num_classes]
    model.y_embedder.embedding_table = new
    model.y_embedder.num_classes = model.num_classes = num_classes
    return model
