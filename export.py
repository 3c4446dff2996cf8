"""
Stage 6: publish a trained run the way the field shares models.

    RUN=out/DiT-T-4_fashion-mnist_eta0.025_cep-uniform1_seed0          # the README's quick-start run
    python export.py $RUN --out exported/quick                          # a diffusers DiTPipeline folder
    python export.py $RUN --format official --out exported/quick.pt     # facebookresearch/DiT's state dict

diffusers, a DiT: model_index.json (DiTPipeline, id2label), transformer/ (DiTTransformer2DModel), vae/
(AutoencoderKL), scheduler/ (the sampler sample.py defaults to, DPM-Solver++, with the run's β; or
--scheduler), safetensors weights, and README.md: a model card written from the run's files. A U-Net:
unet/ (UNet2DConditionModel), vqvae/ (AutoencoderKL), scheduler/, the card, and class_embedder/ (a
class U-Net, in the layout of the authors' LDMClassToImagePipeline) or bert/ + tokenizer/ (a CLIP text
U-Net, as diffusers' LDMTextToImagePipeline). What a pipeline cannot hold exactly is kept and said,
or refused, never dropped silently (docs/models.md#export):
  - the null class: DiTPipeline guides with class id 1000, so the class table is padded to 1001 rows
    (ids K..999 hold the null row too; models/pretrained.py reads the K classes back);
  - a pixel-space run: the first stage is export.identity_autoencoder (decodes as the identity, ~1e-7);
  - learned σ: a DiT keeps it in the transformer's output channels (DiTPipeline steps with ε only);
    a U-Net drops it, as the LDM pipelines step their scheduler with the U-Net's whole output;
  - the timestep frequencies: diffusers' DiT hard-codes 10000^(-i/127); a run trained with the official
    10000^(-i/128) (train.py --timestep-freqs official, the default) is exported as
    facebook/DiT-XL-2-256 was converted, and its ε is then off by the printed amount;
  - a text U-Net's encoder: LDMTextToImagePipeline runs it on the ids alone over 77 tokens, as a frozen
    CLIP runs in training; bert and scratch encoders (trained with the attention mask) are refused.
official: the EMA (or raw) weights under the official DiT's key names, the `.pt` its sample.py loads
(`--ckpt`, for its own configs: DiT-{S,B,L,XL}/{2,4,8}, 4 latent channels, learned σ).
"""
import argparse
import json
import os
import shutil
import sys

import torch

from models.common import UsageError, atomic_torch_save, run_main
from models.dit import DIT_CONFIGS, build_dit
from models.from_diffusers import dit_state_dict_to_diffusers, unet_config_to_diffusers, unet_state_dict_to_diffusers
from models.model_card import class_names, find_manifest, model_card
from models.text import rebuild_text_encoder
from models.unet import UNET_CONFIGS
from models.vae import AutoencoderKL, load_vae

DIFFUSERS_VERSION = "0.30.0"  # the first with DiTTransformer2DModel
NULL_CLASS = 1000  # DiTPipeline's unconditional id, hard-coded in its __call__
LDM_TEXT_TOKENS = 77  # LDMTextToImagePipeline pads every caption to 77 tokens, hard-coded in its __call__
# sample.py's samplers as the diffusers schedulers that step through the same grid (models/pretrained.py)
SCHEDULERS = {
    "dpm-solver++": dict(_class_name="DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2,
                         solver_type="midpoint", timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
                         lower_order_final=True, thresholding=False, use_karras_sigmas=False, variance_type=None),
    "ddim": dict(_class_name="DDIMScheduler", clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading",
                 steps_offset=0),
    "ddpm": dict(_class_name="DDPMScheduler", clip_sample=False, variance_type="fixed_small",
                 timestep_spacing="leading", steps_offset=0),
}


def identity_autoencoder(channels, image_size, k=1e4):
    """An AutoencoderKL (latent = image, scaling_factor 1) whose decode and encode are the identity
    to float rounding: what export.py gives a pixel-space DiT, since diffusers' DiTPipeline always
    decodes through a VAE. conv_in writes (x, -x) per channel plus the constants (k, -k); every
    resnet adds a zero branch; GroupNorm (one group) then divides by σ = k sqrt(2 / width) (1 + ~Σx²/2k²,
    ~1e-8 at k = 1e4); and silu(a) - silu(-a) = a, scaled back by σ in conv_out."""
    width = 2 * channels + 2
    config = dict(in_channels=channels, out_channels=channels, down_block_types=["DownEncoderBlock2D"],
                  up_block_types=["UpDecoderBlock2D"], block_out_channels=[width], layers_per_block=1,
                  latent_channels=channels, norm_num_groups=1, sample_size=image_size, scaling_factor=1.0,
                  use_quant_conv=False, use_post_quant_conv=False,
                  mid_block_add_attention=False, force_upcast=False)
    vae = AutoencoderKL(config)
    scale = k * (2 / width) ** 0.5
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for coder, outputs in ((vae.encoder, channels), (vae.decoder, channels)):
            for c in range(channels):
                coder.conv_in.weight[2 * c, c, 1, 1], coder.conv_in.weight[2 * c + 1, c, 1, 1] = 1.0, -1.0
                coder.conv_out.weight[c, 2 * c, 1, 1], coder.conv_out.weight[c, 2 * c + 1, 1, 1] = scale, -scale
            coder.conv_in.bias[-2:] = torch.tensor([k, -k])
            for m in coder.modules():
                if isinstance(m, torch.nn.GroupNorm):
                    m.weight.fill_(1.0)
        vae.encoder.conv_out.bias[channels:] = -30.0  # log σ² of the posterior: a point mass (clamped there anyway)
    return vae.eval().requires_grad_(False)


def get_parser():
    p = argparse.ArgumentParser(description="Export a run as a diffusers pipeline (DiT, class or CLIP-text U-Net) "
                                            "or an official DiT .pt.")
    a = p.add_argument
    a("run", help="run directory (<out-dir>/<run>); uses ckpt/last.pt")
    a("--ckpt", default=None, help="another checkpoint of the run, e.g. <run>/ckpt/0010000.pt")
    a("--out", required=True, help="the folder (diffusers) or .pt file (official) to write; must not exist")
    a("--format", default="diffusers", choices=("diffusers", "official"),
      help="diffusers: a pipeline folder; official: facebookresearch/DiT's state dict (DiTs)")
    a("--weights", default="ema", choices=("ema", "model"), help="the EMA weights (sample.py's) or the raw ones")
    a("--dtype", default="fp32", choices=("fp32", "bf16"), help="the weights' precision in the files")
    a("--scheduler", default="dpm-solver++", choices=tuple(SCHEDULERS),
      help="diffusers: the pipeline's scheduler (any can be swapped in with from_config; the β schedule is the run's)")
    a("--bin", action="store_true", help="diffusers: pickled diffusion_pytorch_model.bin instead of safetensors")
    return p


def read_run(args):
    """(checkpoint, its path, the weights) of a run a pipeline holds exactly; one UsageError line otherwise."""
    path = args.ckpt or os.path.join(args.run, "ckpt", "last.pt")
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file)
        raise UsageError(f"cannot read {path}: {type(e).__name__}")
    config = ckpt.get("model_config") if isinstance(ckpt, dict) else None
    if not config or args.weights not in ckpt:
        raise UsageError(f"{path} is not a train.py / finetune.py checkpoint")
    name, text = config.get("name"), "text_encoder" in config
    if "adapter" in config or config.get("guidance_dim") or name not in {**DIT_CONFIGS, **UNET_CONFIGS}:
        kind = "LCM " if config.get("guidance_dim") else "adapted " if "adapter" in config else ""
        raise UsageError(f"{path} holds a {name} {kind}model: export.py writes pre-trained DiTs and U-Nets "
                         "(adapted and LCM models: not supported yet)")
    if args.format == "official" and name not in DIT_CONFIGS:
        raise UsageError(f"--format official is facebookresearch/DiT's checkpoint; {path} holds a {name}")
    if name in DIT_CONFIGS and text:
        raise UsageError(f"{path} holds a text-conditioned DiT: no diffusers pipeline runs one "
                         "(export a class DiT or a text U-Net)")
    if name in UNET_CONFIGS and not text and config.get("class_cond", "crossattn") != "crossattn":
        raise UsageError(f"{path} holds a U-Net with --class-cond {config['class_cond']}: the LDM class pipeline "
                         "gives the class as a cross-attention token (train with --class-cond crossattn)")
    if name in UNET_CONFIGS and text:
        encoder = config["text_encoder"]
        if encoder.get("kind") != "clip" or encoder.get("max_length") != LDM_TEXT_TOKENS:
            raise UsageError(f"{path} is conditioned by a {encoder.get('kind')} text encoder over "
                             f"{encoder.get('max_length')} tokens: LDMTextToImagePipeline runs its encoder on the ids "
                             f"alone (no attention mask) over {LDM_TEXT_TOKENS}, as only a frozen CLIP (train.py "
                             f"--text-encoder clip:... --caption-length {LDM_TEXT_TOKENS}) runs in training; a bert or "
                             "scratch encoder is trained with the mask")
    if not config.get("class_dropout"):
        raise UsageError(f"{path} was trained without {'caption' if text else 'label'} dropout (--class-dropout 0): "
                         "pipelines need a null condition")
    return ckpt, path, ckpt[args.weights]


def refuse_existing(out):
    if os.path.lexists(out):
        raise UsageError(f"--out {out} exists: export.py never overwrites (remove it or pick another path)")


def timestep_error(model_config, weights):
    """Relative rms change of ε when the run's DiT takes diffusers' timestep frequencies, on a fixed batch."""
    config = {k: v for k, v in model_config.items() if k != "name"}
    ours, theirs = (build_dit(model_config["name"], **{**config, "t_freq_shift": s}).eval()
                    for s in (config.get("t_freq_shift", 0), 1))
    for m in (ours, theirs):
        m.load_state_dict(weights)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, ours.in_channels, ours.input_size, ours.input_size, generator=g)
    t, y = torch.linspace(50, 950, 8).round().long(), torch.arange(8) % ours.num_classes
    with torch.no_grad():
        a, b = ours(x, t, y)[:, :ours.in_channels], theirs(x, t, y)[:, :ours.in_channels]
    return float((a - b).norm() / a.norm())


def transformer_config(model_config, num_rows):
    arch = DIT_CONFIGS[model_config["name"]]
    c = model_config["in_channels"]
    return dict(_class_name="DiTTransformer2DModel", _diffusers_version=DIFFUSERS_VERSION,
                num_attention_heads=arch["num_heads"], attention_head_dim=arch["hidden_size"] // arch["num_heads"],
                in_channels=c, out_channels=2 * c if model_config.get("learn_sigma", True) else c,
                num_layers=arch["depth"], dropout=0.0, norm_num_groups=32, attention_bias=True,
                sample_size=model_config["input_size"], patch_size=arch["patch_size"], activation_fn="gelu-approximate",
                num_embeds_ada_norm=num_rows - 1, upcast_attention=False, norm_type="ada_norm_zero",
                norm_elementwise_affine=False, norm_eps=model_config.get("mlp_norm_eps", 1e-6))


def padded_class_table(table, num_classes):
    """Rows 0..K-1 the classes, K..1000 the null row (DiTPipeline's null id is 1000)."""
    if num_classes > NULL_CLASS:
        raise UsageError(f"the run has {num_classes} classes: DiTPipeline's null class id 1000 leaves room for 1000")
    return torch.cat([table[:num_classes], table[num_classes:num_classes + 1].expand(NULL_CLASS + 1 - num_classes, -1)])


def scheduler_config(kind, diffusion):
    return dict(SCHEDULERS[kind], _diffusers_version=DIFFUSERS_VERSION, num_train_timesteps=diffusion["num_timesteps"],
                beta_schedule=diffusion["schedule"], beta_start=diffusion["beta_start"], beta_end=diffusion["beta_end"],
                trained_betas=None, prediction_type="epsilon")


def first_stage(ckpt, model_config):
    """(the vae, what it is): the run's AutoencoderKL, or the identity for a pixel run."""
    spec = (ckpt.get("config") or {}).get("vae")
    if not spec:
        vae = identity_autoencoder(model_config["in_channels"], model_config["input_size"])
        return vae, "the identity (a pixel-space run; export.identity_autoencoder: the DiT's pixels, error ~1e-7)"
    try:
        vae = load_vae(spec)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise UsageError(f"the run's --vae {spec} cannot be read: {str(e).splitlines()[0]}")
    if not isinstance(vae, AutoencoderKL):
        raise UsageError(f"the run's --vae {spec} is a {type(vae).__name__}: DiTPipeline decodes with an AutoencoderKL")
    return vae, f"`{spec}`, the run's first stage (scaling factor {vae.scaling_factor:g})"


def save_weights(folder, state, dtype, pickled, name="diffusion_pytorch_model"):
    """diffusers' diffusion_pytorch_model.{safetensors,bin}, or with name="model" transformers' model.safetensors
    / pytorch_model.bin."""
    state = {k: v.detach().to(dtype).contiguous() for k, v in state.items()}
    os.makedirs(folder)
    if pickled:
        torch.save(state, os.path.join(folder, "pytorch_model.bin" if name == "model" else f"{name}.bin"))
    else:
        from safetensors.torch import save_file
        save_file(state, os.path.join(folder, f"{name}.safetensors"), metadata={"format": "pt"})


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def dit_components(args, ckpt, weights, tmp, dtype):
    """transformer/ of a DiTPipeline; (components, notes)."""
    model_config = ckpt["model_config"]
    num_classes, notes = model_config["num_classes"], []
    sd = dict(weights)
    sd["y_embedder.embedding_table.weight"] = padded_class_table(sd["y_embedder.embedding_table.weight"], num_classes)
    if num_classes < NULL_CLASS:
        notes.append(f"class ids {num_classes}..999 are the null class (DiTPipeline's null id is 1000): "
                     f"use 0..{num_classes - 1} (or `pipe.get_label_ids`)")
    if model_config.get("t_freq_shift", 0) != 1:
        err = timestep_error(model_config, weights)
        notes.append(f"the run was trained with the official DiT's timestep frequencies 10000^(-i/128); diffusers' "
                     f"DiTTransformer2DModel hard-codes 10000^(-i/127), which changes this model's ε by {err:.2%} "
                     "(relative rms): its images are close to sample.py's, not equal (train with --timestep-freqs "
                     "diffusers for an exact export)")
    if model_config.get("learn_sigma", True):
        notes.append("the learned variance is kept in the transformer's output channels; DiTPipeline steps with ε "
                     "only (sample.py's DDPM uses the learned σ, so DDPM images differ; DDIM and DPM-Solver++ "
                     "ignore σ)")
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    save_weights(os.path.join(tmp, "transformer"), dit_state_dict_to_diffusers(sd), dtype, args.bin)
    write_json(os.path.join(tmp, "transformer", "config.json"), transformer_config(model_config, rows))
    return {"transformer": ["diffusers", "DiTTransformer2DModel"]}, notes


def ldm_components(args, ckpt, weights, tmp, dtype):
    """unet/ (UNet2DConditionModel) and the condition's parts of an LDM pipeline: class_embedder/ (the
    authors' ClassEmbedder: the class table, null class last) or bert/ + tokenizer/ (the run's frozen
    CLIP text tower, run on the ids alone as in training); (components, notes)."""
    model_config, notes = ckpt["model_config"], []
    text = "text_encoder" in model_config
    unet = {k[len("denoiser."):]: v for k, v in weights.items() if k.startswith("denoiser.")} if text else \
        {k: v for k, v in weights.items() if not k.startswith("y_embedder.")}
    channels = model_config["in_channels"]
    if model_config.get("learn_sigma"):  # the LDM pipelines step their scheduler with the U-Net's whole output
        unet["out.2.weight"], unet["out.2.bias"] = unet["out.2.weight"][:channels], unet["out.2.bias"][:channels]
        notes.append("the learned variance is dropped: the LDM pipelines step their scheduler with the U-Net's "
                     "whole output, so unet/ keeps the ε channels only (sample.py's DDPM uses the learned σ, so "
                     "DDPM images differ; DDIM and DPM-Solver++ ignore σ)")
    config = unet_config_to_diffusers(model_config)
    unet = unet_state_dict_to_diffusers(unet, config["layers_per_block"])
    save_weights(os.path.join(tmp, "unet"), unet, dtype, args.bin)
    write_json(os.path.join(tmp, "unet", "config.json"), {**config, "_diffusers_version": DIFFUSERS_VERSION})
    if text:
        state = {k[len("text_encoder."):]: v for k, v in weights.items() if k.startswith("text_encoder.")}
        try:
            encoder = rebuild_text_encoder(model_config["text_encoder"], state)
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"the run's text encoder cannot be rebuilt: {str(e).splitlines()[0]}")
        save_weights(os.path.join(tmp, "bert"), encoder.model.state_dict(), dtype, args.bin, name="model")
        encoder.model.config.save_pretrained(os.path.join(tmp, "bert"))
        encoder.tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        return {"unet": ["diffusers", "UNet2DConditionModel"], "bert": ["transformers", type(encoder.model).__name__],
                "tokenizer": ["transformers", type(encoder.tokenizer).__name__]}, notes
    table = weights["y_embedder.embedding_table.weight"]  # K classes + the null row K, as the authors' ClassEmbedder
    save_weights(os.path.join(tmp, "class_embedder"), {"embedding.weight": table}, dtype, args.bin)
    write_json(os.path.join(tmp, "class_embedder", "config.json"),
               {"_class_name": "ClassEmbedder", "embed_dim": table.shape[1], "n_classes": table.shape[0],
                "key": "class_label"})
    notes.append(f"class id {table.shape[0] - 1} (the last row of class_embedder/) is the null class of guidance")
    return {"unet": ["diffusers", "UNet2DConditionModel"], "class_embedder": ["diffusers", "ClassEmbedder"]}, notes


def pipeline_class(model_config):
    if model_config["name"] in DIT_CONFIGS:
        return "DiTPipeline"
    return "LDMTextToImagePipeline" if "text_encoder" in model_config else "LDMClassToImagePipeline"


def export_diffusers(args, ckpt, ckpt_path, weights):
    """The run as a diffusers pipeline folder, written under a temporary name and renamed."""
    import train  # the card's reproduce command is relative to train.py's parser
    model_config = ckpt["model_config"]
    pipeline = pipeline_class(model_config)
    vae_name = "vae" if pipeline == "DiTPipeline" else "vqvae"  # the LDM pipelines' name, whatever the first stage
    vae, vae_note = first_stage(ckpt, model_config)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tmp = f"{os.path.normpath(args.out)}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        write_components = dit_components if pipeline == "DiTPipeline" else ldm_components
        components, notes = write_components(args, ckpt, weights, tmp, dtype)
        save_weights(os.path.join(tmp, vae_name), vae.state_dict(), dtype, args.bin)
        write_json(os.path.join(tmp, vae_name, "config.json"),
                   {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, **vae.config})
        os.makedirs(os.path.join(tmp, "scheduler"))
        write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"),
                   scheduler_config(args.scheduler, ckpt["diffusion"]))
        index = {"_class_name": pipeline, "_diffusers_version": DIFFUSERS_VERSION}
        if model_config["num_classes"]:
            run_config = ckpt.get("config") or {}
            names = class_names(run_config, find_manifest(args.run, run_config)[1], model_config["num_classes"])
            index["id2label"] = {str(k): v for k, v in enumerate(names)}
        index.update({**components, "scheduler": ["diffusers", SCHEDULERS[args.scheduler]["_class_name"]],
                      vae_name: ["diffusers", "AutoencoderKL"]})
        write_json(os.path.join(tmp, "model_index.json"), dict(sorted(index.items())))
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(model_card(args.run, args.out, ckpt, ckpt_path, pipeline, SCHEDULERS[args.scheduler]["_class_name"],
                               args.weights, args.dtype, notes, vae_note, train.get_parser()))
        os.rename(tmp, args.out)  # the folder appears whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return notes


def main():
    args = get_parser().parse_args()
    if not os.path.isdir(args.run):
        raise UsageError(f"run {args.run} is not a folder")
    if args.bin and args.format == "official":
        raise UsageError("--bin is for --format diffusers (the official .pt is always a pickle)")
    refuse_existing(args.out)
    ckpt, ckpt_path, weights = read_run(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.format == "official":
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        atomic_torch_save(args.out, {k: v.to(dtype) for k, v in weights.items()})
        notes = ([] if ckpt["model_config"].get("t_freq_shift", 0) == 0 else
                 ["trained with --timestep-freqs diffusers: the official DiT's code embeds t at 10000^(-i/128)"])
    else:
        notes = export_diffusers(args, ckpt, ckpt_path, weights)
    print(f"wrote {args.out} ({args.format}, {args.weights} weights, {args.dtype}, step {ckpt.get('step')})")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    run_main(main)
