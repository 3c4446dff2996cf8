"""Build any of the repo's denoisers by name (DiT-* from models/dit.py, LDM-4 / UNet-* from
models/unet.py), rebuild one from a checkpoint, and the training recipe of each model family (the
defaults train.py and finetune.py fill in), for train.py / sample.py / finetune.py."""
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


# ---------------------------------------------------------------------------------------------
# Training recipes: each family's defaults, as its original code and the paper ran it. train.py /
# finetune.py flags override any entry; the start-up line prints the effective values.
#   schedule, beta_start, beta_end: the β schedule over 1000 steps (models/diffusion.beta_schedule)
#   learn_sigma: predict the variance too, trained by the hybrid loss L_simple + L_vb (else L_simple)
#   ema_decay 0: no EMA (the "EMA" copy sample.py uses is then the weights themselves)
#   global_batch_size: summed over all GPUs; class_dropout: label dropout for classifier-free guidance
#   (not stated by the paper nor cin256-v2; DiT's 0.1 for every family)
TRAINING_RECIPES = {
    # facebookresearch/DiT train.py (AdamW lr 1e-4, no weight decay, no clipping, EMA 0.9999 from
    # step 0, batch 256) with the paper's DiT-XL/2 length: 400 K steps at 32 per GPU x 8 A100
    "DiT": dict(schedule="linear", beta_start=1e-4, beta_end=0.02, learn_sigma=True, lr=1e-4, warmup_steps=0, lr_decay="none",
                weight_decay=0.0, grad_clip=0.0, ema_decay=0.9999, ema_warmup=False, global_batch_size=256, max_steps=400_000,
                class_dropout=0.1, ckpt_every=50_000),
    # CompVis latent-diffusion configs/latent-diffusion/cin256-v2.yaml: LDM's "linear" schedule
    # 0.0015 -> 0.0195 (√β linear), 3 output channels (eps, L_simple only), base_learning_rate 1e-4,
    # use_ema False, AdamW at torch's default weight decay 0.01, no clipping (Lightning's default);
    # the paper: lr 1e-4, 64 per GPU x 8 A100, 178 K steps on ImageNet-1K (396 K on CC3M)
    "LDM": dict(schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, learn_sigma=False, lr=1e-4,
                warmup_steps=0, lr_decay="none", weight_decay=0.01, grad_clip=0.0, ema_decay=0.0, ema_warmup=False, global_batch_size=512,
                class_dropout=0.1, max_steps=178_000, ckpt_every=10_000),
    # the tiny CPU models (DiT-T/*, UNet-T/S) of the embedded Fashion-MNIST run: ~11 min on 2 idle cores;
    # lr 4e-3 with 200 warm-up steps and a cosine decay is what trains DiT-T/4 in that budget
    # (results/fashion-mnist/recipe: at 3e-4 it had not learned the class after 1,500 steps)
    "tiny": dict(schedule="linear", beta_start=1e-4, beta_end=0.02, learn_sigma=True, lr=4e-3, warmup_steps=200, lr_decay="cosine", weight_decay=0.0,
                 grad_clip=1.0, ema_decay=0.9999, ema_warmup=True, global_batch_size=64, class_dropout=0.1, max_steps=2000,
                 ckpt_every=500),
}
# what runs saved before these flags existed were trained with (their config.json lacks them)
LEGACY_RUN = dict(schedule="linear", beta_start=1e-4, beta_end=0.02, weight_decay=0.0, warmup_steps=0, lr_decay="none",
                  timestep_freqs="official")
LEGACY_LCM = dict(lcm_guided_warmup=0, lcm_loss_weight="uniform")  # LCM students distilled before these flags existed


def with_legacy_defaults(config):
    """A run's saved config plus the values of the flags it predates: it was trained without them."""
    config = {**LEGACY_RUN, **config}
    return {**LEGACY_LCM, **config} if config.get("method") == "lcm" else config

# finetune.py: the schedule and learn_sigma are the pre-trained model's; these set the optimisation.
# Stock diffusers examples (train_controlnet.py, train_t2i_adapter_sdxl.py; the paper adapts with
# them at their default lr and batch): AdamW lr 5e-6, weight decay 1e-2, max_grad_norm 1.0, constant
# lr, no EMA, no prompt dropout (proportion_empty_prompts 0), 4 images per GPU (x 8 GPUs = 32).
# train_text_to_image.py (full fine-tuning): lr 1e-4, 16 per GPU (x 8 = 128), the rest the same.
# max_steps 40 K is about the paper's 10 epochs of ImageNet-100 (126,689 images) at batch 32.
STOCK_ADAPTATION = dict(lr=5e-6, warmup_steps=0, lr_decay="none", weight_decay=0.01, grad_clip=1.0, ema_decay=0.0, ema_warmup=False, global_batch_size=32,
                        class_dropout=0.0, max_steps=40_000, ckpt_every=500)
LCM_DEFAULTS = dict(w_min=5.0, w_max=15.0, lcm_skip=20, lcm_target_ema=0.95, lcm_loss="huber", lcm_huber_c=0.001, lcm_loss_weight="uniform",
                    lcm_guided_warmup=0)
FINETUNE_RECIPES = {
    "stock": STOCK_ADAPTATION,
    "stock-full": {**STOCK_ADAPTATION, "lr": 1e-4, "global_batch_size": 128, "max_steps": 10_000},
    "tiny": dict(lr=1e-4, warmup_steps=0, lr_decay="none", weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999, ema_warmup=True, global_batch_size=64,
                 class_dropout=0.1, max_steps=1000, ckpt_every=500),
    # --method lcm (latent consistency distillation). The paper's LCM-v1.5: lr 1e-5, 35 K iterations;
    # the rest as diffusers' train_lcm_distill_sd_wds.py, the SD-1.5 script (LCM's reference setting):
    # guidance w in [5, 15] (its w_min / w_max defaults; scale 1 + w; [3, 15] is the SDXL script's),
    # skipping step k = 20 of 1000, target network = EMA 0.95 of the student,
    # Huber loss c = 0.001, AdamW weight decay 1e-2, grad clip 1, no prompt dropout, 12 per GPU x 8
    "stock-lcm": dict(lr=1e-5, warmup_steps=0, lr_decay="none", weight_decay=0.01, grad_clip=1.0, ema_decay=0.0, ema_warmup=False,
                      global_batch_size=96, class_dropout=0.0, max_steps=35_000, ckpt_every=1000, **LCM_DEFAULTS),
    # the embedded CPU distillation of the tiny teacher (results/fashion-mnist/lcm): 300-step trials at
    # constant lr 1e-4 / 3e-4 / 1e-3 scored fid_fmnist 77 / 70 / 184 (4 steps, guidance 3), so 3e-4,
    # warmed up and decayed as the teacher's recipe; w in [1, 4] around the teacher's best guidance
    # scales (2-4); 1000 steps in under 15 min on 2 cores. The first 300 steps distil the guidance
    # alone (--lcm-guided-warmup; at 1000 steps, 4 LCM steps at guidance 3): 0 / 100 / 300 / 500
    # warm-up steps gave fid_fmnist 54.1 / 49.6 / 55.0 / 60.8 and accuracy 0.742 / 0.797 / 0.839 / 0.849;
    # 300 is the least that beats the teacher's 4-step DPM-Solver++ on both (66.5, 0.814). iCT's loss
    # weight (--lcm-loss-weight ict) then took the 4-step student from 53.4 / 0.837 to 38.5 / 0.867
    # (same teacher and machine; the teacher's 50 steps: 30.3): on this linear schedule the uniform
    # loss is ruled by the top of the grid, where x̂_0 magnifies ε errors 157-fold
    "tiny-lcm": dict(lr=3e-4, warmup_steps=100, lr_decay="cosine", weight_decay=0.0, grad_clip=1.0, ema_decay=0.999, ema_warmup=True,
                     global_batch_size=64, class_dropout=0.0, max_steps=1000, ckpt_every=500,
                     **{**LCM_DEFAULTS, "w_min": 1.0, "w_max": 4.0, "lcm_guided_warmup": 300, "lcm_loss_weight": "ict"}),
}
TINY_MODELS = ("UNet-T", "UNet-S", *(n for n in DIT_CONFIGS if n.startswith("DiT-T/")))


def recipe_family(name):
    return "tiny" if name in TINY_MODELS else "DiT" if name in DIT_CONFIGS else "LDM"


def training_recipe(name, method=None):
    """The defaults of pre-training model `name` (method None), or of adapting it with finetune.py's
    --method (controlnet / t2i-adapter / full / lcm)."""
    if method is None:
        return TRAINING_RECIPES[recipe_family(name)]
    tiny = recipe_family(name) == "tiny"
    if method == "lcm":
        return FINETUNE_RECIPES["tiny-lcm" if tiny else "stock-lcm"]
    if tiny:
        return FINETUNE_RECIPES["tiny"]
    return FINETUNE_RECIPES["stock-full" if method == "full" else "stock"]


def recipe_table(recipes=TRAINING_RECIPES, title="defaults by model family (tiny: UNet-T, UNet-S, DiT-T/*; DiT: the "
                 "other DiT-*; LDM: LDM-4), overridden by any flag given:"):
    """The per-family defaults as the text table --help shows."""
    keys = list(dict.fromkeys(k for r in recipes.values() for k in r))
    rows = [["family", *keys]] + [[name, *(f"{r[k]:g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys)]
                                  for name, r in recipes.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return title + "\n  " + "\n  ".join(lines)


def apply_recipe(args):
    """Fill every flag left unset from the model family's recipe (finetune.py: its --method's)."""
    recipe = training_recipe(args.model, getattr(args, "method", None))
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return recipe


def describe_recipe(args):
    """One line of the effective diffusion and optimisation settings."""
    ema = f"EMA {args.ema_decay:g}" + (" (warm-up)" if args.ema_warmup else "") if args.ema_decay else "no EMA"
    return (f"{args.schedule} β {args.beta_start:g} -> {args.beta_end:g}, "
            + ("learn_sigma (L_simple + L_vb)" if args.learn_sigma else "fixed variance (L_simple)")
            + f", AdamW lr {args.lr:g}" + (f" (linear warm-up over {args.warmup_steps} steps)" if args.warmup_steps else "")
            + (", cosine decay to 0," if args.lr_decay == "cosine" else "")
            + f" weight decay {args.weight_decay:g}, "
            + (f"grad clip {args.grad_clip:g}" if args.grad_clip else "no grad clip")
            + f", {ema}, class dropout {args.class_dropout:g}, global batch {args.global_batch_size}, {args.max_steps} steps"
            + (f"; consistency distillation: w in [{args.w_min:g}, {args.w_max:g}], skipping step {args.lcm_skip}, target "
               + (f"EMA {args.lcm_target_ema:g}" if args.lcm_target_ema else "the student") + f", {args.lcm_loss} loss"
               + (", iCT's loss weight" if getattr(args, "lcm_loss_weight", "uniform") == "ict" else "")
               + (f", after {args.lcm_guided_warmup} steps of guidance distillation" if args.lcm_guided_warmup else "")
               if getattr(args, "method", None) == "lcm" else ""))
