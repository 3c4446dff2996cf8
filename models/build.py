"""Build any of the repo's denoisers by name (DiT-* from models/dit.py, LDM-4 / UNet-* from
models/unet.py), and rebuild one from a checkpoint, for train.py / sample.py / finetune.py."""
from models.dit import DIT_CONFIGS, build_dit, dit_from_checkpoint
from models.unet import CLASS_COND_MODES, UNET_CONFIGS, build_unet  # noqa: F401

MODEL_NAMES = (*DIT_CONFIGS, *UNET_CONFIGS)


def build_model(name, **config):
    """config: input_size, in_channels, num_classes, class_dropout, learn_sigma (+ class_cond for a U-Net)."""
    if name in DIT_CONFIGS:
        return build_dit(name, **config)
    if name in UNET_CONFIGS:
        return build_unet(name, **config)
    raise ValueError(f"unknown model '{name}'; choose one of: {', '.join(MODEL_NAMES)}")


def model_from_checkpoint(ckpt, use_ema=True):
    """The model a train.py checkpoint (or an official DiT state dict) describes, EMA weights by
    default, in eval mode. ValueError for anything else."""
    if not isinstance(ckpt, dict) or ckpt.get("model_config", {}).get("name") not in UNET_CONFIGS:
        return dit_from_checkpoint(ckpt, use_ema)
    weights = ckpt.get("ema" if use_ema else "model")
    if weights is None:
        raise ValueError("the checkpoint holds no model weights")
    config = dict(ckpt["model_config"])
    model = build_model(config.pop("name"), **config)
    model.load_state_dict(weights)
    return model.eval()
