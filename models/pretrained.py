"""
Released diffusers pipelines as this repo's models (sample.py --pretrained SPEC): a pipeline folder
(model_index.json + one sub-folder per component) or a hub id, e.g. the paper's DiffusionNoise/*:
  - DiTPipeline: transformer (DiTTransformer2DModel / Transformer2DModel) -> models/dit.py's DiT,
    vae (AutoencoderKL) -> models/vae.py;
  - LDMClassToImagePipeline (the authors' diffusers fork, not in diffusers): unet
    (UNet2DConditionModel) -> models/unet.py's U-Net with the class embedder's table as its class
    table (crossattn: one class token), vqvae (VQModel) -> models/vae.py;
  - LDMTextToImagePipeline: unet as above, bert (LDMBertModel, BertModel, or CLIPTextModel as
    export.py writes a CLIP-conditioned run) + its tokenizer -> models/text.py's LDMBertEncoder, vqvae
    (VQModel or AutoencoderKL).
The scheduler's config gives the β schedule and prediction type; with the sampler sample.py is
asked for, it gives the grid (`scheduler_grid`): what diffusers' DDIMScheduler / DDPMScheduler /
DPMSolverMultistepScheduler `.from_config(that config)` would step through, as the authors' scripts
swap schedulers. Anything this repo's networks or samplers cannot reproduce is refused with one line
naming the component and the key.

The authors' class pipeline is known from their sampling scripts only (github.com/Hhhhhhao/
DiffusionNoise: `pipeline(class_labels, num_inference_steps, eta, guidance_scale, latents)`, imported
with `ClassEmbedder` from pipeline_latent_diffusion). Assumed, as CompVis' cin256-v2 and diffusers'
LDMTextToImagePipeline: the embedder is a component of class "ClassEmbedder" (any name) holding
CompVis' nn.Embedding `embedding.weight` (n_classes x embed_dim, config keys embed_dim / n_classes /
key / ucg_rate); its last row is the null class of guidance (cin256-v2: 1001 rows, class 1000); the
class embedding is the U-Net's one cross-attention token; latents are decoded as z / scaling_factor
of the vqvae's config; guidance ε(∅) + s (ε(y) - ε(∅)) on every channel.
"""
import json
import os
import re

import numpy as np
import torch

from models.common import UsageError
from models.dit import DiT
from models.from_diffusers import check_keys, dit_state_dict_from_diffusers, unet_config_from_diffusers, unet_state_dict_from_diffusers
from models.text import IdsOnly, LDMBert, LDMBertEncoder, TextConditioned
from models.unet import UNet
from models.vae import VQModel, load_vae, read_weights

SCHEDULER = "scheduler"
COMPONENTS = {  # pipeline class -> {component: accepted classes}
    "DiTPipeline": {"transformer": ("DiTTransformer2DModel", "Transformer2DModel"), "vae": ("AutoencoderKL",), SCHEDULER: None},
    "LDMClassToImagePipeline": {"unet": ("UNet2DConditionModel",), "vqvae": ("VQModel", "AutoencoderKL"), SCHEDULER: None},
    "LDMTextToImagePipeline": {"unet": ("UNet2DConditionModel",), "vqvae": ("VQModel", "AutoencoderKL"), "bert": ("LDMBertModel", "BertModel", "CLIPTextModel"),
                               "tokenizer": ("BertTokenizer", "BertTokenizerFast", "CLIPTokenizer", "CLIPTokenizerFast"), SCHEDULER: None},
}
CLASS_EMBEDDER = "ClassEmbedder"
CLASS_EMBEDDER_KEYS = ("embed_dim", "n_classes", "key", "ucg_rate")  # CompVis ClassEmbedder's arguments
NOT_COMPONENTS = ("id2label",)  # DiTPipeline's optional label names: not a network
# DiTTransformer2DModel / Transformer2DModel keys: read for the shape, numerics only, or the only value our DiT has
DIT_SHAPE_KEYS = {"num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers", "sample_size", "patch_size",
                  "num_embeds_ada_norm", "dropout", "norm_num_groups", "norm_eps", "upcast_attention", "use_linear_projection"}
DIT_ONLY = dict(attention_bias=(True,), activation_fn=("gelu-approximate",), norm_type=("ada_norm_zero",),
                norm_elementwise_affine=(False,), cross_attention_dim=(None,), num_vector_embeds=(None,), only_cross_attention=(False,),
                double_self_attention=(False,), attention_type=("default",), caption_channels=(None,), interpolation_scale=(None, 1),
                use_additional_conditions=(None, False))
LDMBERT_ONLY = dict(activation_function=("gelu",), scale_embedding=(False,))
# the scheduler each sampler stands for, with the defaults of the keys from_config carries over
SCHEDULER_DEFAULTS = {
    "ddim": dict(timestep_spacing="leading", steps_offset=0, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True),
    "ddpm": dict(timestep_spacing="leading", steps_offset=0, clip_sample=True, clip_sample_range=1.0, variance_type="fixed_small"),
    "dpm-solver++": dict(timestep_spacing="linspace", steps_offset=0, algorithm_type="dpmsolver++", solver_order=2,
                         solver_type="midpoint", final_sigmas_type="zero", variance_type=None, use_karras_sigmas=False,
                         use_lu_lambdas=False, use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False),
}
COMMON_DEFAULTS = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, trained_betas=None,
                       prediction_type="epsilon", thresholding=False, rescale_betas_zero_snr=False)
SCHEDULER_ONLY = dict(num_train_timesteps=(1000,), beta_schedule=("linear", "scaled_linear"), prediction_type=("epsilon",),
                      thresholding=(False,), rescale_betas_zero_snr=(False,), timestep_spacing=("leading", "linspace", "trailing"),
                      clip_sample_range=(1.0,), variance_type=(None, "fixed_small", "fixed_small_log", "learned_range"),
                      algorithm_type=("dpmsolver++",), solver_order=(2,), solver_type=("midpoint",), final_sigmas_type=("zero",),
                      use_karras_sigmas=(False,), use_lu_lambdas=(False,), use_exponential_sigmas=(False,), use_beta_sigmas=(False,),
                      use_flow_sigmas=(False,))
PIPELINE_PATTERNS = ["model_index.json", "*/config.json", "*/scheduler_config.json", "tokenizer/*.txt", "tokenizer/*.json", "*/*.safetensors"]


def pipeline_folder(spec):
    """A local pipeline folder, or a hub id fetched (configs, tokenizer, weights; cached files offline)."""
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "model_index.json")):
            raise UsageError(f"--pretrained {spec} is not a diffusers pipeline: no model_index.json")
        return spec
    if os.path.exists(spec) or not re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        raise UsageError(f"--pretrained {spec}: neither a pipeline folder nor a hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
        folder = snapshot_download(spec, allow_patterns=PIPELINE_PATTERNS)
        missing = [c for c in os.listdir(folder) if os.path.isfile(os.path.join(folder, c, "config.json"))
                   and not any(f.endswith(".safetensors") for f in os.listdir(os.path.join(folder, c)))]
        if missing:  # weights saved as .bin only
            folder = snapshot_download(spec, allow_patterns=PIPELINE_PATTERNS + [f"{c}/*.bin" for c in missing])
    except Exception as e:  # noqa: BLE001  (offline, no such repo)
        raise UsageError(f"--pretrained {spec} is not a local folder and could not be fetched from the Hugging Face Hub "
                         f"(offline, or no such repo?): {type(e).__name__}")
    return folder


def read_json(folder, path, what):
    full = os.path.join(folder, path)
    if not os.path.isfile(full):
        raise UsageError(f"--pretrained {folder}: {what} has no {path}")
    try:
        with open(full) as f:
            return json.load(f)
    except ValueError as e:
        raise UsageError(f"--pretrained {folder}: {path} is not JSON ({e})")


def refuse(folder, component, error):
    raise UsageError(f"--pretrained {folder}: {component}: {str(error).splitlines()[0]}")


def read_components(folder):
    """(pipeline class, {component: class}) from model_index.json, checked against COMPONENTS."""
    index = read_json(folder, "model_index.json", "the pipeline")
    kind = index.get("_class_name")
    if kind not in COMPONENTS:
        raise UsageError(f"--pretrained {folder}: pipeline {kind!r} is not supported (supported: {', '.join(COMPONENTS)})")
    wanted, found = COMPONENTS[kind], {}
    for name, value in index.items():
        if name.startswith("_") or name in NOT_COMPONENTS:
            continue
        if not (isinstance(value, list) and len(value) == 2):
            refuse(folder, "model_index.json", f"key '{name}' not understood")
        if value == [None, None]:  # an optional component left out
            continue
        cls = value[1]
        if name not in wanted and not (kind == "LDMClassToImagePipeline" and cls == CLASS_EMBEDDER):
            refuse(folder, "model_index.json", f"component '{name}' ({cls}) not understood by a {kind}")
        accepted = wanted.get(name, (CLASS_EMBEDDER,))
        if (not str(cls).endswith("Scheduler")) if accepted is None else cls not in accepted:
            refuse(folder, name, f"class {cls} is not supported (supported: {', '.join(accepted or ('a diffusers scheduler',))})")
        found[name] = cls
    missing = [n for n in wanted if n not in found]
    if kind == "LDMClassToImagePipeline" and CLASS_EMBEDDER not in found.values():
        missing.append(f"a {CLASS_EMBEDDER}")
    if missing:
        raise UsageError(f"--pretrained {folder}: this {kind} lacks {', '.join(missing)}")
    return kind, found


def weights_of(folder, component):
    """The float32 state dict of a component: diffusers' diffusion_pytorch_model.* or transformers' model.* files."""
    path, state = read_weights(os.path.join(folder, component))
    for name in ("model.safetensors", "pytorch_model.bin"):
        full = os.path.join(folder, component, name)
        if path is None and os.path.isfile(full):
            import torch
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file
                path, state = full, load_file(full)
            else:
                path, state = full, torch.load(full, map_location="cpu", weights_only=True)
    if path is None:
        raise UsageError(f"--pretrained {folder}: {component}/ holds no weights")
    return {k: v.float() for k, v in state.items()}


def load_weights(module, state, folder, component):
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        refuse(folder, component, f"weights do not match the config ({str(e).splitlines()[0]})")
    return module.eval().requires_grad_(False)


def build_dit(folder, name):
    cfg = read_json(folder, f"{name}/config.json", name)
    try:
        check_keys(cfg, DIT_SHAPE_KEYS, DIT_ONLY)
    except ValueError as e:
        refuse(folder, name, e)
    heads, in_ch = cfg.get("num_attention_heads", 16), cfg.get("in_channels", 4)
    kwargs = dict(input_size=cfg.get("sample_size", 32), patch_size=cfg.get("patch_size", 2), in_channels=in_ch,
                  hidden_size=heads * cfg.get("attention_head_dim", 72), depth=cfg.get("num_layers", 28), num_heads=heads,
                  num_classes=cfg.get("num_embeds_ada_norm", 1000), learn_sigma=cfg.get("out_channels") == 2 * in_ch, t_freq_shift=1,
                  mlp_norm_eps=cfg.get("norm_eps", 1e-5))  # diffusers' pre-MLP LayerNorm (norm3) takes the config's eps
    state = weights_of(folder, name)
    try:
        state = dit_state_dict_from_diffusers(state, kwargs["input_size"])
    except (KeyError, ValueError) as e:
        refuse(folder, name, f"not a DiT of our layout ({e})")
    table = state["y_embedder.embedding_table.weight"]
    kwargs["class_dropout"] = 0.1 if table.shape[0] > kwargs["num_classes"] else 0.0
    named = len(read_json(folder, "model_index.json", "the pipeline").get("id2label") or {})
    if kwargs["class_dropout"] and 0 < named < kwargs["num_classes"] and torch.equal(table[named:], table[-1:].expand(len(table) - named, -1)):
        # export.py's padding: K named classes, rows K..num_embeds_ada_norm the null row (DiTPipeline's null id 1000)
        state["y_embedder.embedding_table.weight"], kwargs["num_classes"] = table[:named + 1].clone(), named
    return load_weights(DiT(**kwargs), state, folder, name), kwargs


def build_unet(folder, context_dim, num_classes=0, class_rows=0):
    cfg = read_json(folder, "unet/config.json", "unet")
    try:
        kwargs = unet_config_from_diffusers(cfg)
    except ValueError as e:
        refuse(folder, "unet", e)
    if kwargs["context_dim"] != context_dim:
        refuse(folder, "unet", f"cross_attention_dim {kwargs['context_dim']} differs from its condition's width {context_dim}")
    kwargs.update(num_classes=num_classes, class_dropout=0.1 if class_rows > num_classes else 0.0)
    state = unet_state_dict_from_diffusers(weights_of(folder, "unet"), kwargs["num_res_blocks"])
    return UNet(**kwargs), state, kwargs


def build_class_unet(folder, embedder):
    cfg = read_json(folder, f"{embedder}/config.json", embedder)
    unknown = [k for k in cfg if not k.startswith("_") and k not in CLASS_EMBEDDER_KEYS]
    if unknown:
        refuse(folder, embedder, f"config key '{unknown[0]}' not understood (a {CLASS_EMBEDDER} takes {', '.join(CLASS_EMBEDDER_KEYS)})")
    table = weights_of(folder, embedder)
    if set(table) != {"embedding.weight"}:
        refuse(folder, embedder, f"weights {sorted(table)[:4]} not understood (a {CLASS_EMBEDDER} holds embedding.weight)")
    rows, width = table["embedding.weight"].shape
    model, state, kwargs = build_unet(folder, width, num_classes=rows - 1, class_rows=rows)  # the last row: the null class
    state["y_embedder.embedding_table.weight"] = table["embedding.weight"]
    return load_weights(model, state, folder, "unet"), dict(kwargs, class_cond="crossattn")


def build_text_unet(folder, bert_class="LDMBertModel", tokenizer_class="BertTokenizer"):
    """The text U-Net of an LDMTextToImagePipeline. Its `bert` is diffusers' LDMBertModel (LDM's
    LDMBert-1280), a transformers BertModel (bert-base size: what the CC3M releases' 438 MB
    bert/model.safetensors suggests, as the paper cites BERT) or a CLIPTextModel (export.py); each runs
    as the pipeline runs it."""
    cfg = read_json(folder, "bert/config.json", "bert")
    if cfg.get("max_position_embeddings", 77) < 77:
        refuse(folder, "bert", "max_position_embeddings must be at least the pipeline's 77 tokens")
    if bert_class != "LDMBertModel":
        import transformers
        try:
            bert = IdsOnly(getattr(transformers, bert_class).from_pretrained(os.path.join(folder, "bert")).float())
        except Exception as e:  # noqa: BLE001  (weights that do not match the config, a malformed folder)
            refuse(folder, "bert", f"cannot load the {bert_class} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    else:
        for key, only in LDMBERT_ONLY.items():
            if cfg.get(key, only[0]) not in only:
                refuse(folder, "bert", f"{key}={cfg[key]!r} is not supported (only {only[0]!r})")
        bert = LDMBert(*(cfg.get(k, d) for k, d in (("vocab_size", 30522), ("max_position_embeddings", 77), ("d_model", 1280),
                                                    ("encoder_layers", 32), ("encoder_attention_heads", 8), ("head_dim", 64),
                                                    ("encoder_ffn_dim", 5120))))
        state = {k[len("model."):]: v for k, v in weights_of(folder, "bert").items() if k.startswith("model.")}
        load_weights(bert, state, folder, "bert")
    try:
        encoder = LDMBertEncoder(bert, os.path.join(folder, "tokenizer"), tokenizer_class=tokenizer_class)
    except Exception as e:  # noqa: BLE001  (a missing or malformed vocabulary)
        refuse(folder, "tokenizer", f"cannot load the {tokenizer_class} ({type(e).__name__})")
    denoiser, state, kwargs = build_unet(folder, encoder.width)
    load_weights(denoiser, state, folder, "unet")
    return TextConditioned(denoiser, encoder).eval(), dict(kwargs, text_encoder=encoder.config())


def card_setting(folder):
    """The training setting a model card (README.md) states in its metadata, as export.py writes it
    (`training_setting: {json}` between the front matter's --- lines), or None."""
    path = os.path.join(folder, "README.md") if folder else None
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    end = lines.index("---", 1) if lines[:1] == ["---"] and "---" in lines[1:] else 0
    for line in lines[1:end]:
        if line.startswith("training_setting:"):
            try:
                setting = json.loads(line.split(":", 1)[1])
            except ValueError:
                return None
            return setting if isinstance(setting, dict) else None
    return None


def release_setting(spec, folder=None):
    """What a release says it was trained with, in train.py's config keys, with `release_setting`
    saying where it came from: its model card's metadata (export.py's), else its id as the authors
    name them (`…_clean`, `…_random_noise_<η in %>`, `…_clean_condnoise_uniform` / `_gaussian`: CEP-U
    / CEP-G at γ 1); anything else gives release_setting "unknown" and no setting (never "clean")."""
    card = card_setting(folder)
    if card is not None:
        return {**card, "release_setting": "from the model card"}
    name = os.path.basename(os.path.normpath(os.fspath(spec)))
    swap = "_cc3m_" in name  # the CC3M releases swap captions, the ImageNet ones flip labels
    corrupt_type = "swap" if swap else "symmetric"
    noise = re.search(r"_random_noise_(\d+(?:\.\d+)?)$", name)
    if noise:
        return dict(corrupt=float(noise.group(1)) / 100, corrupt_type=corrupt_type, release_setting="from the id")
    cep = re.search(r"_clean_condnoise_(uniform|gaussian)$", name)
    if cep:
        return dict(corrupt=0.0, cep=True, cep_type=cep.group(1), cep_gamma=1.0, release_setting="from the id")
    if name.endswith("_clean"):
        return dict(corrupt=0.0, release_setting="from the id")
    return dict(release_setting="unknown")


def load_pretrained(spec):
    """-> (model, vae, checkpoint-like dict (model_config, config naming the source, diffusion: the β
    schedule; scheduler: the pipeline's scheduler config), folder). UsageError with one line otherwise."""
    folder = pipeline_folder(spec)
    kind, components = read_components(folder)
    if kind == "DiTPipeline":
        name = "transformer"
        model, model_config = build_dit(folder, name)
        vae_name = "vae"
    elif kind == "LDMClassToImagePipeline":
        model, model_config = build_class_unet(folder, next(n for n, c in components.items() if c == CLASS_EMBEDDER))
        vae_name = "vqvae"
    else:
        model, model_config = build_text_unet(folder, components["bert"], components["tokenizer"])
        vae_name = "vqvae"
    try:
        vae = load_vae(os.path.join(folder, vae_name))
    except (FileNotFoundError, ValueError) as e:
        refuse(folder, vae_name, e)
    if isinstance(vae, VQModel):  # the pipelines decode z / scaling_factor of the config, VQ included
        vae.scaling_factor = vae.config["scaling_factor"]
    sched = read_json(folder, f"{SCHEDULER}/scheduler_config.json", SCHEDULER)
    model_config = {"name": f"{kind}:{components.get('transformer') or components['unet']}", **model_config}
    ckpt = dict(model_config=model_config, step=None, scheduler=sched,
                config=dict(pretrained=spec, pipeline=kind, folder=os.path.abspath(folder), vae=os.path.join(folder, vae_name),
                            **release_setting(spec, folder)))
    return model, vae, ckpt, folder


def scheduler_grid(sched, kind, steps):
    """What diffusers' scheduler for `kind` (DDIMScheduler / DDPMScheduler / DPMSolverMultistepScheduler)
    built by from_config(sched) does with `steps` steps, in this repo's terms: dict(diffusion (the β
    schedule), grid (Sampler's grid=), clip (x̂_0 clipped to [-1, 1]), learned_variance (DDPM's
    learned_range; None: the model's own)). ValueError naming the key it cannot reproduce."""
    if kind not in SCHEDULER_DEFAULTS:
        raise ValueError(f"--sampler {kind} is not one a diffusers pipeline's scheduler gives (ddim, ddpm, dpm-solver++)")
    defaults = {**COMMON_DEFAULTS, **SCHEDULER_DEFAULTS[kind]}
    cfg = {k: sched.get(k, v) for k, v in defaults.items()}  # the keys it does not take are ignored, as by from_config
    for key, value in cfg.items():
        if key in SCHEDULER_ONLY and value not in SCHEDULER_ONLY[key] and not (key == "clip_sample_range" and not cfg["clip_sample"]):
            raise ValueError(f"{key}={value!r} is not supported with --sampler {kind} (supported: {', '.join(map(repr, SCHEDULER_ONLY[key]))})")
    if kind == "ddpm" and cfg["variance_type"] is None:
        raise ValueError("variance_type=None is not supported with --sampler ddpm")
    T, spacing, offset = cfg["num_train_timesteps"], cfg["timestep_spacing"], cfg["steps_offset"]
    if not 1 <= steps <= T:
        raise ValueError(f"--steps must be in [1, {T}]")
    n = steps + 1 if kind == "dpm-solver++" else steps  # DPM-Solver's grid has one more point, the last dropped
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(n) * (T // n)).round()[::-1] + offset
    else:
        ts = np.round(np.arange(T, 0, -T / steps)) - 1
    ts = [int(t) for t in (ts[:-1] if kind == "dpm-solver++" and spacing != "trailing" else ts)]
    # DDIM steps t -> t - T // steps whatever the spacing; DDPM and DPM-Solver to the next timestep
    nxt = [t - T // steps for t in ts] if kind == "ddim" else ts[1:] + [-1]
    if cfg["trained_betas"] is not None:  # diffusers then ignores beta_schedule / beta_start / beta_end
        if len(cfg["trained_betas"]) != T:
            raise ValueError(f"trained_betas holds {len(cfg['trained_betas'])} values, not num_train_timesteps={T}")
        diffusion = dict(schedule="trained", betas=[float(b) for b in cfg["trained_betas"]], num_timesteps=T)
    else:
        diffusion = dict(schedule=cfg["beta_schedule"], beta_start=cfg["beta_start"], beta_end=cfg["beta_end"], num_timesteps=T)
    final = 1.0
    if kind == "ddim" and not cfg["set_alpha_to_one"]:
        from models.diffusion import GaussianDiffusion
        final = float(GaussianDiffusion.from_config(diffusion).alphas_cumprod[0])
    return dict(diffusion=diffusion, grid=[ts, nxt, final], clip=bool(cfg.get("clip_sample", False)),
                learned_variance={"learned_range": True, None: None}.get(cfg.get("variance_type"), False))
