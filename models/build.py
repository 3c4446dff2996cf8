"""Build any of the repo's denoisers by name (DiT-* from models/dit.py, LDM-4 / UNet-* from
models/unet.py), and rebuild one from a checkpoint, for train.py / sample.py / finetune.py."""
import torch.nn as nn

from models.adapters import Adapted
from models.dit import DIT_CONFIGS, build_dit, dit_from_checkpoint
from models.text import TextConditioned, rebuild_text_encoder
from models.unet import CLASS_COND_MODES, UNET_CONFIGS, build_unet  # noqa: F401

MODEL_NAMES = (*DIT_CONFIGS, *UNET_CONFIGS)


def build_model(name, text_encoder=None, text_mode="crossattn", **config):
    """config: input_size, in_channels, num_classes, class_dropout, learn_sigma (+ class_cond for a
    U-Net). With text_encoder (a module, or its config() from a checkpoint) the denoiser is
    conditioned on captions: a TextConditioned(denoiser, encoder), num_classes 0."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(MODEL_NAMES)}")
    if text_encoder is None:
        return build_dit(name, **config) if name in DIT_CONFIGS else build_unet(name, **config)
    encoder = text_encoder if isinstance(text_encoder, nn.Module) else rebuild_text_encoder(text_encoder)
    config = {k: v for k, v in config.items() if k not in ("num_classes", "class_cond")}
    if name in DIT_CONFIGS:
        denoiser = build_dit(name, num_classes=0, text_dim=encoder.width, text_mode=text_mode, **config)
    else:
        denoiser = build_unet(name, num_classes=0, context_dim=encoder.width, **config)
    return TextConditioned(denoiser, encoder)


def model_from_checkpoint(ckpt, use_ema=True):
    """The model a train.py / finetune.py checkpoint (or an official DiT state dict) describes, EMA
    weights by default, in eval mode. ValueError for anything else."""
    config = ckpt.get("model_config", {}) if isinstance(ckpt, dict) else {}
    if config.get("name") not in UNET_CONFIGS and "text_encoder" not in config and "adapter" not in config:
        return dit_from_checkpoint(ckpt, use_ema)
    weights = ckpt.get("ema" if use_ema else "model")
    if weights is None:
        raise ValueError("the checkpoint holds no model weights")
    config = dict(ckpt["model_config"])
    adapter = config.pop("adapter", None)
    model = build_model(config.pop("name"), **config)
    if adapter is not None:  # finetune.py --method controlnet / t2i-adapter: base + adapter
        model = Adapted(model, **adapter)
    model.load_state_dict(weights)
    return model.eval()
