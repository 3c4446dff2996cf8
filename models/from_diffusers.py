"""
Models from diffusers in this repo's terms: a DiTTransformer2DModel's weights as models/dit.py's DiT,
a UNet2DConditionModel's config and weights as models/unet.py's U-Net (CompVis names; both ways, for
export.py), and a whole
Stable Diffusion pipeline (folder or hub id: unet/, text_encoder/, tokenizer/, vae/, scheduler/) as a
train.py-style checkpoint: U-Net + frozen CLIP text tower, β schedule, VAE (the teacher of the
paper's LCM-v1.5: finetune.py --method lcm --init <pipeline>).
"""
import json
import os
import re

import torch

from models.dit import sincos_pos_embed_2d
from models.text import TextConditioned, rebuild_text_encoder
from models.unet import build_unet
from models.vae import read_weights


def dit_state_dict_from_diffusers(sd, sample_size=32):
    """State dict of a diffusers `DiTTransformer2DModel` -> ours. Per block: attn1.to_q/k/v -> attn.qkv
    (rows q, k, v), attn1.to_out.0 -> attn.proj, ff.net.0.proj / ff.net.2 -> mlp.fc1 / fc2, norm1.linear ->
    adaLN_modulation.1 (same shift/scale/gate order); proj_out_1 / proj_out_2 -> final_layer.adaLN_modulation.1
    / final_layer.linear. diffusers gives every block its own timestep and class embedder
    (norm1.emb.timestep_embedder / class_embedder; the final layer reuses block 0's); ours shares one,
    so all copies must be equal (as in converted official checkpoints), else ValueError. pos_embed is
    a non-persistent buffer there: rebuilt here for the latent side `sample_size` (config.sample_size).
    Conventions that differ (pinned down in tests/test_dit_diffusers.py):
      * timestep frequencies: diffusers has downscale_freq_shift=1 (10000^(-i/127)), the official DiT
        10000^(-i/128): build our DiT with t_freq_shift=1 to reproduce diffusers;
      * the pre-MLP LayerNorm eps is diffusers' config.norm_eps (default 1e-5; 1e-6 in the official DiT
        and our default): build our DiT with mlp_norm_eps=config.norm_eps to reproduce diffusers;
      * null class = row num_embeds_ada_norm in both, but diffusers' LabelEmbedding drops labels itself
        in train() (p = 0.1, independently in every block's copy): compare in eval()."""
    sd, out = dict(sd), {}
    for src, dst in [("pos_embed.proj", "x_embedder.proj"), ("proj_out_1", "final_layer.adaLN_modulation.1"),
                     ("proj_out_2", "final_layer.linear")]:
        for kind in ("weight", "bias"):
            out[f"{dst}.{kind}"] = sd.pop(f"{src}.{kind}")
    depth = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    emb_keys = {f"timestep_embedder.linear_{j}.{k}": f"t_embedder.mlp.{2 * j - 2}.{k}"
                for j in (1, 2) for k in ("weight", "bias")}
    emb_keys["class_embedder.embedding_table.weight"] = "y_embedder.embedding_table.weight"
    for i in range(depth):
        b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        for src, dst in emb_keys.items():
            value = sd.pop(f"{b}norm1.emb.{src}")
            if i == 0:
                out[dst] = value
            elif not torch.equal(value, out[dst]):
                raise ValueError(f"block {i}'s norm1.emb.{src} differs from block 0's: our DiT shares one embedder")
        for kind in ("weight", "bias"):
            out[f"{o}attn.qkv.{kind}"] = torch.cat([sd.pop(f"{b}attn1.to_{n}.{kind}") for n in "qkv"], dim=0)
            for src, dst in [("attn1.to_out.0", "attn.proj"), ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2"),
                             ("norm1.linear", "adaLN_modulation.1")]:
                out[f"{o}{dst}.{kind}"] = sd.pop(f"{b}{src}.{kind}")
    if sd:
        raise ValueError(f"diffusers keys with no counterpart in our DiT: {sorted(sd)[:8]}")
    hidden, _, patch, _ = out["x_embedder.proj.weight"].shape
    out["pos_embed"] = torch.from_numpy(sincos_pos_embed_2d(hidden, sample_size // patch)).float().unsqueeze(0)
    return out


def dit_state_dict_to_diffusers(sd):
    """Our DiT's state dict -> a diffusers DiTTransformer2DModel's: the inverse of
    dit_state_dict_from_diffusers, the shared embedders copied into every block, pos_embed left out
    (diffusers recomputes it)."""
    sd, out = dict(sd), {}
    sd.pop("pos_embed")
    for dst, src in [("pos_embed.proj", "x_embedder.proj"), ("proj_out_1", "final_layer.adaLN_modulation.1"),
                     ("proj_out_2", "final_layer.linear")]:
        for kind in ("weight", "bias"):
            out[f"{dst}.{kind}"] = sd.pop(f"{src}.{kind}")
    embedders = {f"t_embedder.mlp.{2 * j - 2}.{k}": f"timestep_embedder.linear_{j}.{k}" for j in (1, 2) for k in ("weight", "bias")}
    embedders["y_embedder.embedding_table.weight"] = "class_embedder.embedding_table.weight"
    shared = {dst: sd.pop(src) for src, dst in embedders.items()}
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        out.update({f"{b}norm1.emb.{k}": v.clone() for k, v in shared.items()})
        for kind in ("weight", "bias"):
            for n, part in zip("qkv", sd.pop(f"{o}attn.qkv.{kind}").chunk(3, dim=0)):
                out[f"{b}attn1.to_{n}.{kind}"] = part.clone()
            for dst, src in [("attn1.to_out.0", "attn.proj"), ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2"),
                             ("norm1.linear", "adaLN_modulation.1")]:
                out[f"{b}{dst}.{kind}"] = sd.pop(f"{o}{src}.{kind}")
    if sd:
        raise ValueError(f"DiT keys with no counterpart in diffusers' DiTTransformer2DModel: {sorted(sd)[:8]}")
    return out


def check_keys(cfg, shape_keys, only):
    """A diffusers config against what our network reproduces: every key is read for the shape (or only
    changes numerics), or `only` lists the values we have. ValueError naming the first other key."""
    for key, value in cfg.items():
        if key.startswith("_") or key in shape_keys:
            continue
        if key not in only:
            raise ValueError(f"config key '{key}' not understood")
        if value not in only[key]:
            raise ValueError(f"config {key}={value!r} is not supported (only {', '.join(map(repr, only[key]))})")


# UNet2DConditionModel keys: read for the shape (or numerics only: dropout, attention upcasting), or the
# only value models/unet.py has (diffusers' defaults: SD's and LDM's U-Nets)
UNET_SHAPE_KEYS = {"sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                   "layers_per_block", "attention_head_dim", "num_attention_heads", "cross_attention_dim", "norm_num_groups",
                   "transformer_layers_per_block", "mid_block_type", "time_cond_proj_dim", "use_linear_projection", "upcast_attention",
                   "dropout", "addition_embed_type_num_heads"}
UNET_ONLY = dict(center_input_sample=(False,), flip_sin_to_cos=(True,), freq_shift=(0,), only_cross_attention=(False,), downsample_padding=(1,),
                 mid_block_scale_factor=(1,), act_fn=("silu", "swish"), norm_eps=(1e-5,), reverse_transformer_layers_per_block=(None,),
                 encoder_hid_dim=(None,), encoder_hid_dim_type=(None,), dual_cross_attention=(False,), class_embed_type=(None,),
                 addition_embed_type=(None,), addition_time_embed_dim=(None,), num_class_embeds=(None,), resnet_time_scale_shift=("default",),
                 resnet_skip_time_act=(False,), resnet_out_scale_factor=(1.0,), time_embedding_type=("positional",), time_embedding_dim=(None,),
                 time_embedding_act_fn=(None,), timestep_post_act=(None,), conv_in_kernel=(3,), conv_out_kernel=(3,),
                 projection_class_embeddings_input_dim=(None,), attention_type=("default",), class_embeddings_concat=(False,),
                 mid_block_only_cross_attention=(None, False), cross_attention_norm=(None,))


def unet_config_from_diffusers(cfg):
    """UNet(...) keywords for a diffusers UNet2DConditionModel config.json (a dict). ValueError naming
    the key of a layout this U-Net does not have (SDXL's added embeddings, class embeddings, uneven heads, ...)."""
    check_keys(cfg, UNET_SHAPE_KEYS, UNET_ONLY)
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"config mid_block_type={cfg.get('mid_block_type')!r} is not supported")
    kinds = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
    down = list(cfg.get("down_block_types", []))
    if any(k not in kinds for k in down) or list(cfg.get("up_block_types", [])) != [kinds[k] for k in reversed(down)]:
        raise ValueError(f"config down_block_types / up_block_types {down} / {cfg.get('up_block_types')} are not supported "
                         "(CrossAttnDownBlock2D / DownBlock2D, mirrored)")
    channels = list(cfg["block_out_channels"])
    mc = channels[0]
    if any(c % mc for c in channels) or cfg.get("norm_num_groups", 32) != 32 or not isinstance(cfg.get("layers_per_block", 2), int):
        raise ValueError("supported: block widths multiple of the first, 32 groups, one layers_per_block")
    attention = [i for i, kind in enumerate(cfg["down_block_types"]) if kind.startswith("CrossAttn")]
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)  # SD 1.x's attention_head_dim is the head count
    if isinstance(heads, (list, tuple)):
        widths = {channels[i] // heads[i] for i in attention}
        if len(widths) != 1:
            raise ValueError(f"attention heads {heads} give different head widths")
        head_kwargs = dict(num_head_channels=widths.pop())
    else:
        head_kwargs = dict(num_heads=heads)
    depth = cfg.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):
        raise ValueError("transformer_layers_per_block must be one number")
    return dict(input_size=cfg["sample_size"], in_channels=cfg["in_channels"], model_channels=mc,
                channel_mult=tuple(c // mc for c in channels), num_res_blocks=cfg.get("layers_per_block", 2),
                attention_resolutions=tuple(2 ** i for i in reversed(attention)), transformer_depth=depth,
                context_dim=cfg["cross_attention_dim"], num_classes=0, learn_sigma=cfg["out_channels"] == 2 * cfg["in_channels"],
                guidance_dim=cfg.get("time_cond_proj_dim") or 0, **head_kwargs)


RESNET_KEYS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
               "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_state_dict_from_diffusers(sd, num_res_blocks=2):
    """State dict of a diffusers UNet2DConditionModel -> this U-Net's (CompVis names). Level i's j-th
    ResBlock (+ transformer) of the encoder is input_blocks.{1 + i(R+1) + j}, its down-sampler
    input_blocks.{(i+1)(R+1)}; the decoder's up_blocks are output_blocks.{i(R+1) + j}, deepest first;
    a linear proj_in / proj_out (use_linear_projection) becomes the equivalent 1x1 conv."""
    R, out = num_res_blocks, {}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "time_embedding.cond_proj": "time_cond_proj", "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    up_has_attention = {k.split(".")[1] for k in sd if k.startswith("up_blocks.") and ".attentions." in k}
    for key, value in sd.items():
        parts = key.split(".")
        head = next((f for f in fixed if key.startswith(f + ".")), None)
        if head is not None:
            new = fixed[head] + key[len(head):]
        elif parts[0] == "down_blocks" and parts[2] == "downsamplers":
            new = f"input_blocks.{(int(parts[1]) + 1) * (R + 1)}.0.op." + ".".join(parts[5:])
        elif parts[0] == "up_blocks" and parts[2] == "upsamplers":
            new = f"output_blocks.{int(parts[1]) * (R + 1) + R}.{2 if parts[1] in up_has_attention else 1}.conv." + ".".join(parts[5:])
        elif parts[0] in ("down_blocks", "up_blocks"):
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            block = 1 + i * (R + 1) + j if parts[0] == "down_blocks" else i * (R + 1) + j
            new = f"{'input' if parts[0] == 'down_blocks' else 'output'}_blocks.{block}." + ("0." if kind == "resnets" else "1.")
            new += (RESNET_KEYS[rest[0]] + "." + ".".join(rest[1:])) if kind == "resnets" else ".".join(rest)
        elif parts[0] == "mid_block":
            index = {("resnets", "0"): "0", ("attentions", "0"): "1", ("resnets", "1"): "2"}[(parts[1], parts[2])]
            rest = parts[3:]
            new = f"middle_block.{index}." + ((RESNET_KEYS[rest[0]] + "." + ".".join(rest[1:])) if parts[1] == "resnets" else ".".join(rest))
        else:
            raise ValueError(f"unexpected key in a diffusers UNet2DConditionModel state dict: {key}")
        if new.split(".")[-2] in ("proj_in", "proj_out") and value.dim() == 2:
            value = value[:, :, None, None]  # use_linear_projection: Linear == 1x1 conv
        out[new] = value
    return out


def unet_config_to_diffusers(model_config):
    """A diffusers UNet2DConditionModel config for a U-Net that train.py built (its model_config: a
    config name plus overrides): the inverse of unet_config_from_diffusers. The cross-attention width is
    the class token's ('crossattn') or the text encoder's; an 'add' U-Net or a guidance-conditioned one
    (LCM) has no such layout and raises ValueError."""
    from models.unet import UNET_CONFIGS
    cfg = {**UNET_CONFIGS[model_config["name"]], **{k: v for k, v in model_config.items() if k != "name"}}
    text = "text_encoder" in model_config
    if (cfg.get("num_classes") and cfg.get("class_cond", "crossattn") != "crossattn") or cfg.get("guidance_dim"):
        raise ValueError("only a cross-attention U-Net (class token or text) has a UNet2DConditionModel layout here")
    context = model_config["text_encoder"]["width"] if text else cfg["context_dim"]
    mc, levels = cfg["model_channels"], len(cfg["channel_mult"])
    channels = [mc * m for m in cfg["channel_mult"]]
    attends = [2 ** i in cfg["attention_resolutions"] for i in range(levels)]  # level i works at down-sampling 2^i
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)]
    # diffusers' attention_head_dim is the head count (a naming kept from SD 1.x); per level when heads have a fixed width
    heads = [c // cfg["num_head_channels"] for c in channels] if cfg.get("num_head_channels") else cfg.get("num_heads", 1)
    return dict(_class_name="UNet2DConditionModel", sample_size=cfg["input_size"], in_channels=cfg["in_channels"],
                out_channels=cfg["in_channels"], down_block_types=down, up_block_types=up, block_out_channels=channels,
                layers_per_block=cfg["num_res_blocks"], attention_head_dim=heads, cross_attention_dim=context,
                transformer_layers_per_block=cfg.get("transformer_depth", 1), norm_num_groups=32, norm_eps=1e-5,
                use_linear_projection=False, flip_sin_to_cos=True, freq_shift=0, act_fn="silu", dropout=0.0)


def unet_state_dict_to_diffusers(sd, num_res_blocks):
    """This U-Net's state dict (CompVis names, no class table) -> a diffusers UNet2DConditionModel's:
    the inverse of unet_state_dict_from_diffusers (see there for the block numbering). An encoder
    block input_blocks.n (n >= 1) is level (n - 1) // (R + 1), slot (n - 1) % (R + 1), slot R being the
    down-sampler; a decoder block output_blocks.n is level n // (R + 1), resnet n % (R + 1); a module
    whose own keys start with conv. there is the up-sampler."""
    R, out = num_res_blocks, {}
    fixed = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "time_cond_proj": "time_embedding.cond_proj", "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    resnet = {v: k for k, v in RESNET_KEYS.items()}

    def resnet_key(rest):
        head = next(h for h in resnet if ".".join(rest).startswith(h + "."))
        return resnet[head] + ".".join(rest)[len(head):]
    for key, value in sd.items():
        parts = key.split(".")
        head = next((f for f in fixed if key.startswith(f + ".")), None)
        if head is not None:
            new = fixed[head] + key[len(head):]
        elif parts[0] == "input_blocks":
            level, slot = divmod(int(parts[1]) - 1, R + 1)
            if slot == R:
                new = f"down_blocks.{level}.downsamplers.0.conv." + ".".join(parts[4:])
            elif parts[2] == "0":
                new = f"down_blocks.{level}.resnets.{slot}." + resnet_key(parts[3:])
            else:
                new = f"down_blocks.{level}.attentions.{slot}." + ".".join(parts[3:])
        elif parts[0] == "output_blocks":
            level, slot = divmod(int(parts[1]), R + 1)
            if parts[2] == "0":
                new = f"up_blocks.{level}.resnets.{slot}." + resnet_key(parts[3:])
            elif parts[3] == "conv":
                new = f"up_blocks.{level}.upsamplers.0.conv." + ".".join(parts[4:])
            else:
                new = f"up_blocks.{level}.attentions.{slot}." + ".".join(parts[3:])
        elif parts[0] == "middle_block":
            kind, index = {"0": ("resnets", "0"), "1": ("attentions", "0"), "2": ("resnets", "1")}[parts[1]]
            new = f"mid_block.{kind}.{index}." + (resnet_key(parts[2:]) if kind == "resnets" else ".".join(parts[2:]))
        else:
            raise ValueError(f"U-Net key with no counterpart in diffusers' UNet2DConditionModel: {key}")
        out[new] = value
    return out


def is_diffusers_pipeline(spec):
    """A diffusers pipeline folder (model_index.json, or unet/config.json), or what can only be a hub
    id ('owner/name', not a local path): finetune.py --init then loads a Stable Diffusion teacher."""
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        return any(os.path.isfile(os.path.join(spec, f)) for f in ("model_index.json", os.path.join("unet", "config.json")))
    hub = bool(re.fullmatch(r"[\w.-]+/[\w.-]+", spec)) and not spec.endswith(".pt")
    return hub and not os.path.exists(spec) and not os.path.isdir(spec.split("/")[0])  # out/<run>: a local run


PIPELINE_FILES = ["model_index.json", "unet/config.json", "scheduler/scheduler_config.json", "vae/config.json",
                  "text_encoder/config.json", "tokenizer/*"]


def checkpoint_from_diffusers_pipeline(spec):
    """A Stable Diffusion 1.x / 2.x pipeline (diffusers folder or hub id, e.g. runwayml/stable-diffusion-v1-5)
    as a train.py checkpoint dict: its U-Net (models/unet.py, weights converted from diffusers') and
    frozen CLIP text tower as one TextConditioned model ("ema"), their config, its β schedule, and a
    run config whose --vae is the pipeline's vae/ and --image-size its pixel size. ValueError if it is
    not one (another prediction type, an unsupported layout, missing files)."""
    spec = os.fspath(spec)
    folder = spec
    if not os.path.isdir(spec):  # a hub id: fetch what is needed (the cache is used offline)
        from huggingface_hub import snapshot_download
        weights = [f"{part}/{w}" for part in ("unet", "vae", "text_encoder")
                   for w in ("diffusion_pytorch_model.safetensors", "model.safetensors")]
        try:
            folder = snapshot_download(spec, allow_patterns=PIPELINE_FILES + weights)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"'{spec}' is not a local folder and could not be fetched from the Hugging Face Hub "
                             f"(offline?): {type(e).__name__}") from e

    def read(name):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ValueError(f"{spec} is not a Stable Diffusion pipeline: no {name}")
        with open(path) as f:
            return json.load(f)
    unet_cfg, sched, vae_cfg = read("unet/config.json"), read("scheduler/scheduler_config.json"), read("vae/config.json")
    if sched.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"{spec} predicts {sched['prediction_type']}; this repo's diffusion is ε-prediction")
    schedule = {"scaled_linear": "scaled_linear", "linear": "linear"}.get(sched.get("beta_schedule"))
    if schedule is None or sched.get("num_train_timesteps", 1000) != 1000:
        raise ValueError(f"{spec}: β schedule {sched.get('beta_schedule')} over {sched.get('num_train_timesteps')} steps is not supported")
    unet_kwargs = unet_config_from_diffusers(unet_cfg)
    weights, state = read_weights(os.path.join(folder, "unet"))
    if weights is None:
        raise ValueError(f"{spec}: no U-Net weights in unet/")
    text_cfg = read("text_encoder/config.json")
    length = text_cfg.get("max_position_embeddings") or text_cfg.get("text_config", {}).get("max_position_embeddings", 77)
    encoder = rebuild_text_encoder({"kind": "clip", "spec": f"clip:{folder}", "max_length": length})
    model_config = dict(name="SD-1.5", class_dropout=0.1,  # SD dropped 10 % of the captions (the null caption is "")
                        **{k: v for k, v in unet_kwargs.items() if k not in ("num_classes", "context_dim")})
    denoiser = build_unet("SD-1.5", num_classes=0, context_dim=encoder.width, **{k: v for k, v in model_config.items() if k != "name"})
    denoiser.load_state_dict({k: v.float() for k, v in unet_state_dict_from_diffusers(state, unet_kwargs["num_res_blocks"]).items()})
    model = TextConditioned(denoiser, encoder)
    model_config.update(num_classes=0, text_encoder=encoder.config(), text_mode="crossattn")
    vae_factor = 2 ** (len(vae_cfg.get("block_out_channels", [0] * 4)) - 1)
    diffusion = dict(schedule=schedule, beta_start=sched["beta_start"], beta_end=sched["beta_end"], num_timesteps=1000,
                     learn_sigma=False, loss="simple")
    run = dict(text_encoder=f"clip:{folder}", text_mode="crossattn", caption_length=length, schedule=schedule,
               beta_start=sched["beta_start"], beta_end=sched["beta_end"], learn_sigma=False, class_dropout=0.1,
               vae=os.path.join(spec, "vae"), image_size=unet_kwargs["input_size"] * vae_factor, pipeline=spec)
    return {"ema": model.state_dict(), "model_config": model_config, "config": run, "diffusion": diffusion}
