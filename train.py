"""
Stage 2: pre-train a class-conditional DiT on (optionally corrupted) labels, optionally with CEP.

    python train.py --nproc-per-node 2 --corrupt 0.025 --cep                  # embedded default (README), CPU ok
    torchrun --standalone --nproc_per_node=2 train.py --corrupt 0.025 --cep   # the same job under torchrun
    torchrun --standalone --nproc_per_node=8 train.py --dataset imagefolder \\
        --data-path /data/imagenet/train --image-size 256 ...                 # see README for the recipe

Everything random in a step (timesteps, noise, label dropout, CEP δ, input-perturbation ξ) is drawn
for the whole global batch from a generator seeded by (seed, step), and each rank takes its share;
the data order is DistributedSampler's (seed, epoch) permutation. So a run is the same whatever the
number of ranks, and --resume continues exactly where the checkpoint stopped.

finetune.py runs this same loop, `train(..., stage)`, with its own data and (adapted) model.

Output: <out-dir>/<run>/config.json, log.jsonl, ckpt/last.pt and ckpt/<step>.pt
(model, ema, optimizer, scaler, step, RNG states, config; loadable with weights_only=True).
"""
import argparse
import contextlib
import copy
import io
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from models.corruption import CORRUPT_TYPES, is_text_dataset, prepare_corruption, resampled_conditions
from models.data import DATASETS, LatentDataset, batches, dataset_key, latent_dir, load_dataset
from models.cep import CEP_TYPES, step_conditions
from models.common import (Requeue, UsageError, atomic_write_json, atomic_write_text, ema_decay_at, end_distributed,
                           datasheet_peak_tflops, learning_rate, MATMUL_DTYPES, measure_matmul_tflops, restore_rng, run_main, seed_rank, setup_distributed,
                           step_generator, total_grad_norm, update_ema)
from models.diffusion import SCHEDULES, GaussianDiffusion
from models.text import build_text_encoder, frozen_text_cache
from models.vae import latents_from_stats
from models import faults, runs
from models.build import CLASS_COND_MODES, MODEL_NAMES, UNET_CONFIGS, apply_recipe, build_model, describe_recipe, recipe_table, with_legacy_defaults

# flags that do not change what is trained: a --resume may change them (the others must match)
NON_RUN_FLAGS = {"max_steps", "ckpt_every", "log_every", "compile", "grad_checkpoint", "device", "num_workers", "dry_run",
                 "time_limit", "skip_bad_files", "grad_accum", "batch", "peak_tflops"}
NOT_SAVED = {"resume", "resume_from", "out_dir", "run", "dry_run", "nproc_per_node"}  # where the run is, not what it is


def get_parser():
    p = argparse.ArgumentParser(description="Pre-train a class-conditional DiT (corrupted labels, CEP).")
    a = p.add_argument
    a("--dataset", default="fashion-mnist", choices=DATASETS)
    a("--data-path", default=None, help="dataset folder (fashion-mnist: IDX files; default Debian's copy, else download)")
    a("--image-size", type=int, default=None, help="imagefolder crop size (default 256); fashion-mnist is 32")
    a("--model", default="DiT-T/4", help=f"one of {', '.join(MODEL_NAMES)}")
    a("--timestep-freqs", default="official", choices=("official", "diffusers"), help="DiT's timestep embedding: 10000^(-i/128) "
      "(official DiT) or 10000^(-i/127) (diffusers' DiTTransformer2DModel: export.py's DiTPipeline is then exact)")
    a("--class-cond", default="crossattn", choices=CLASS_COND_MODES, help="U-Net: class token by cross-attention (LDM) or added to the time embedding (ADM)")
    # text conditioning (caption datasets)
    a("--text-encoder", default="scratch", help="scratch (offline default) | bert[:dir|hub id] (trained jointly, the paper) | clip[:dir|hub id] (frozen)")
    a("--text-mode", default="crossattn", choices=("crossattn", "pooled"), help="DiT on text: cross-attention or pooled caption embedding")
    a("--caption-length", type=int, default=32, help="tokens per caption (padded / truncated)")
    # the diffusion (defaults: the model family's recipe, see the table below)
    a("--schedule", default=None, choices=SCHEDULES, help="β schedule: linear (DDPM/DiT) or scaled_linear (LDM's \"linear\": √β linear)")
    a("--beta-start", type=float, default=None, help="β_1 of the schedule")
    a("--beta-end", type=float, default=None, help="β_T of the schedule")
    a("--learn-sigma", action=argparse.BooleanOptionalAction, default=None, help="predict the variance too (hybrid loss L_simple + L_vb)")
    a("--vae", default=None, help="train on the latents corrupt_data.py --vae pre-extracted with this autoencoder")
    # condition corruption (corrupt_data.py)
    a("--corrupt", type=float, default=0.0, help="ratio η of training labels to corrupt, in [0, 1)")
    a("--corrupt-type", default=None, choices=CORRUPT_TYPES, help="default: symmetric (labels), swap (captions)")
    a("--rewrites", default=None, help="--corrupt-type rewrite: file of `index<TAB>rewritten caption` lines")
    a("--groups", default=None, help="asymmetric corruption: class-group file (imagefolder)")
    a("--corrupt-resample", action="store_true", help="re-draw the corrupted labels every epoch instead of once")
    # CEP and the paper's baselines
    a("--cep", action="store_true", help="condition embedding perturbation (uniform unless --cep-type)")
    a("--cep-type", default=None, choices=CEP_TYPES, help="CEP-U (uniform, default) or CEP-G (gaussian)")
    a("--cep-gamma", type=float, default=1.0, help="CEP magnitude γ: δ scale is γ/√d")
    a("--cep-fixed", action="store_true", help="ablation: one δ per training example, drawn once")
    a("--input-perturbation", type=float, default=0.0, help="IP baseline (Ning et al. 2023): λ in x_t from ε + λξ")
    a("--class-dropout", type=float, default=None, help="condition dropout to the null class / empty caption (classifier-free guidance)")
    # optimisation (defaults: the model family's recipe)
    a("--seed", type=int, default=0)
    a("--global-batch-size", type=int, default=None, help="summed over all ranks; fixed whatever the world size")
    a("--grad-accum", type=int, default=1, metavar="N", help="split each rank's share of the global batch into N micro-batches, "
      "one forward and backward each (DDP all-reduces on the last): less memory, the same run")
    a("--lr", type=float, default=None, help="learning rate of AdamW (constant after the warm-up)")
    a("--warmup-steps", type=int, default=None, help="linear learning-rate warm-up from 0 over the first N steps (0 = none)")
    a("--lr-decay", choices=("none", "cosine"), default=None, help="after the warm-up: constant lr, or cosine decay to 0 at --max-steps")
    a("--weight-decay", type=float, default=None, help="AdamW weight decay")
    a("--grad-clip", type=float, default=None, help="max gradient norm (0 = no clipping)")
    a("--max-steps", type=int, default=None)
    a("--ema-decay", type=float, default=None, help="EMA of the weights (0 = no EMA: the EMA copy is the weights)")
    a("--ema-warmup", action=argparse.BooleanOptionalAction, default=None,
      help="use decay min(ema_decay, (1+step)/(10+step)) so short runs get a useful EMA")
    a("--precision", default=None, choices=("fp32", "bf16", "fp16"), help="default: bf16 on GPU, fp32 on CPU")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--grad-checkpoint", action="store_true", help="activation checkpointing of every block: less memory, ~1/3 more compute")
    # bookkeeping
    a("--ckpt-every", type=int, default=None, help="numbered checkpoint (and last.pt) every N steps")
    a("--log-every", type=int, default=50)
    a("--num-workers", type=int, default=4, help="data-loader workers per rank (imagefolder)")
    a("--out-dir", default="out")
    # under torchrun write --run-name (or put `--` before train.py): torchrun's own parser rejects
    # `--run` as an ambiguous prefix of its --run-path / --run_path options
    a("--run", "--run-name", dest="run", default=None, help="run name (default: built from model, dataset, η, CEP, seed)")
    a("--resume", action="store_true", help="continue <out-dir>/<run> from its newest intact checkpoint, or start it if there is "
      "none: safe to repeat (torchrun --max-restarts, requeued jobs)")
    a("--resume-from", default=None, metavar="CKPT", help="continue a run from one of its numbered checkpoints, <run>/ckpt/<step>.pt")
    a("--time-limit", type=float, default=None, metavar="HOURS", help="stop after the step that passes HOURS of this process's "
      "time, write last.pt and status.json 'stopped', exit 75 to be requeued (as on a signal); leave a checkpoint's time to spare")
    a("--skip-bad-files", action="store_true", help="leave unreadable image files (and listed images that do not exist) out "
      "of training and list them in <run>/skipped_files.txt, instead of stopping with an error naming the file")
    a("--device", default="auto", help="auto | cpu | cuda (the rank's GPU is cuda:LOCAL_RANK)")
    a("--peak-tflops", type=float, default=None, help="the GPU's dense peak in the run's precision, for the logged MFU, where "
      "the device is not in models/common.py's datasheet table (H100/H200 SXM, PCIe and NVL, A100, L40S)")
    a("--nproc-per-node", type=int, default=1, help="start N ranks on this machine: checks the input, then runs torchrun "
      "--standalone --nproc_per_node=N with the same flags (ignored under torchrun)")
    a("--dry-run", action="store_true", help="check the input, print the effective configuration and exit (writes nothing)")
    p.epilog = recipe_table()
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    return p


def check_args(args):
    if args.model not in MODEL_NAMES:
        raise UsageError(f"unknown --model '{args.model}'; choose one of: {', '.join(MODEL_NAMES)}")
    apply_recipe(args)
    if args.timestep_freqs == "diffusers" and args.model in UNET_CONFIGS:
        raise UsageError("--timestep-freqs diffusers is a DiT option (the U-Net's embedding is LDM's)")
    if not 0 <= args.corrupt < 1:
        raise UsageError(f"--corrupt must be in [0, 1), got {args.corrupt}")
    if args.cep_gamma < 0 or not math.isfinite(args.cep_gamma):
        raise UsageError(f"--cep-gamma must be >= 0, got {args.cep_gamma}")
    if (args.cep_type is not None or args.cep_fixed) and not args.cep:
        raise UsageError("--cep-type and --cep-fixed need --cep")
    if args.cep and args.cep_type is None:
        args.cep_type = "uniform"  # CEP-U is the default
    if args.input_perturbation < 0:
        raise UsageError(f"--input-perturbation must be >= 0, got {args.input_perturbation}")
    if not 0 <= args.class_dropout < 1:
        raise UsageError(f"--class-dropout must be in [0, 1), got {args.class_dropout}")
    if not 0 <= args.ema_decay < 1:
        raise UsageError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    for name in ("global_batch_size", "grad_accum", "max_steps", "ckpt_every", "log_every"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive")
    if args.warmup_steps < 0:
        raise UsageError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.lr <= 0 or args.grad_clip < 0 or args.weight_decay < 0:
        raise UsageError(f"--lr must be > 0, --grad-clip and --weight-decay >= 0 (got {args.lr:g}, {args.grad_clip:g}, {args.weight_decay:g})")
    if not 0 < args.beta_start < args.beta_end < 1:
        raise UsageError(f"the schedule needs 0 < --beta-start < --beta-end < 1, got {args.beta_start:g}, {args.beta_end:g}")


def default_run_name(args):
    name = f"{args.model.replace('/', '-')}_{args.dataset}_eta{args.corrupt:g}"
    if args.corrupt and args.corrupt_type not in (None, "symmetric", "swap"):
        name += f"-{args.corrupt_type}"
    if args.cep:
        name += f"_cep-{args.cep_type}{args.cep_gamma:g}" + ("-fixed" if args.cep_fixed else "")
    if args.input_perturbation:
        name += f"_ip{args.input_perturbation:g}"
    return name + f"_seed{args.seed}"


def resolve_run(args, parser):
    """The run directory and the checkpoint to continue from (models/runs.py); writes nothing."""
    return runs.resolve_run(args, parser, NON_RUN_FLAGS, with_legacy_defaults, default_run_name)


def run_config(args):
    return {k: v for k, v in vars(args).items() if k not in NOT_SAVED}


def main():
    parser = get_parser()
    args = parser.parse_args()
    check_args(args)
    if args.nproc_per_node > 1 and "RANK" not in os.environ:  # check here, then start the ranks with torchrun
        runs.launch_ranks(args.nproc_per_node, lambda: check_only(args, parser))
    rank, world, device = setup_distributed(args.device)
    try:
        train(args, parser, rank, world, device)
        end_distributed(barrier=True)  # every rank done before any tears the group down
    finally:
        end_distributed()


def check_only(args, parser, stage=None):
    """The launcher's checks before it starts N ranks: train()'s input checks and the run's lock, in this
    process; builds, locks and writes nothing, whatever a resumed run's config.json holds. The run folder."""
    args = argparse.Namespace(**vars(args))  # resolve_run fills in the saved flags: not the caller's
    with contextlib.redirect_stdout(io.StringIO()):
        run_dir, _, _ = check_input(args, parser, args.nproc_per_node, stage)
    faults.lock_run(run_dir, 0, 1, write=False)  # is another process writing the run?
    return run_dir


def load_data(args):
    """The training set (pre-extracted latents with --vae) and its folder name under <out-dir>/data."""
    dataset = load_dataset(args.dataset, args.data_path, args.image_size, download_root=os.path.join(args.out_dir, "data", "downloads"),
                           skip_missing=args.skip_bad_files)
    key = dataset_key(args.dataset, dataset)
    if args.vae:  # latent diffusion: the same examples and conditions, as pre-extracted latents
        dataset = LatentDataset(latent_dir(args.out_dir, key, args.vae, dataset.image_size), dataset)
    return dataset, key


def new_model(args, dataset, text):
    """A freshly initialised denoiser for the dataset, and the config that rebuilds it."""
    model_config = dict(name=args.model, input_size=dataset.image_size, in_channels=dataset.channels,
                        num_classes=0 if text else len(dataset.classes), class_dropout=args.class_dropout,
                        learn_sigma=args.learn_sigma)
    if args.model in UNET_CONFIGS and not text:
        model_config["class_cond"] = args.class_cond
    if args.timestep_freqs == "diffusers":
        model_config["t_freq_shift"] = 1  # models/dit.py: diffusers' downscale_freq_shift
    torch.manual_seed(args.seed)  # same initial weights on every rank and every world size
    try:
        encoder = build_text_encoder(args.text_encoder, dataset.captions, args.caption_length) if text else None
        model = build_model(**model_config, **({"text_encoder": encoder, "text_mode": args.text_mode} if text else {}))
    except ValueError as e:  # an input size the U-Net's levels do not divide, a text encoder not found, ...
        raise UsageError(f"--model {args.model}: {str(e).splitlines()[0]}")
    if text:
        model_config.update(text_encoder=encoder.config(), text_mode=args.text_mode, num_classes=0)
    return model, model_config


def diffusion_config(args):
    """What the checkpoint records so sample.py / finetune.py rebuild this run's diffusion."""
    return dict(schedule=args.schedule, beta_start=args.beta_start, beta_end=args.beta_end, num_timesteps=1000,
                learn_sigma=args.learn_sigma, loss="hybrid" if args.learn_sigma else "simple")


# ---- before the loop: the checks, the training state, the run's files -----------------------------

def check_input(args, parser, world, stage):
    """Every check of train() that reads the input: the run folder, the flags, the data and the
    corruption. Returns (run_dir, checkpoint or None, data); writes nothing."""
    run_dir, ckpt = resolve_run(args, parser)
    runs.check_writable(run_dir, "--out-dir")
    check_args(args)
    if args.global_batch_size % (world * args.grad_accum):
        raise UsageError(f"--global-batch-size {args.global_batch_size} is not divisible by {world} ranks"
                         + (f" x --grad-accum {args.grad_accum}" if args.grad_accum > 1 else ""))
    if getattr(args, "method", None) == "lcm" and args.grad_accum > 1:
        raise UsageError("--grad-accum is not implemented for --method lcm (its step draws t and w for the whole share)")
    dataset, key = stage.load_data(args) if stage else load_data(args)
    if len(dataset) < args.global_batch_size:
        raise UsageError(f"--global-batch-size {args.global_batch_size} exceeds the {len(dataset)} training examples")
    conditions, manifest, manifest_file = prepare_corruption(dataset, key, args.out_dir, args.corrupt, args.seed,
                                                             args.corrupt_type, args.groups, args.rewrites)
    text = is_text_dataset(dataset)
    if text and args.cep_fixed:
        raise UsageError("--cep-fixed is implemented for class labels only")
    if text and args.corrupt_resample and manifest["corrupt_type"] == "rewrite":
        raise UsageError("--corrupt-resample re-draws caption swaps; it does not apply to --corrupt-type rewrite")
    args.corrupt_type = manifest["corrupt_type"]  # config.json records the values used, not the defaults that chose them
    data = argparse.Namespace(dataset=dataset, key=key, conditions=conditions, manifest=manifest, manifest_file=manifest_file, text=text)
    return run_dir, ckpt, data


def build_state(args, device, data, stage, ckpt):
    """The model, its EMA, the optimizer and the loss scaler, restored from the checkpoint if any;
    the step to start at, the loss accumulator and a startup line."""
    model, model_config = stage.new_model(args, data.dataset, data.text) if stage else new_model(args, data.dataset, data.text)
    model = model.to(device)
    for module in model.modules():  # the denoiser (inside a text or adapted model too)
        if hasattr(module, "grad_checkpoint"):
            module.grad_checkpoint = args.grad_checkpoint
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema_decay > 0 else model  # decay 0: no EMA copy
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    # (sum of step losses, steps) since the last log, kept on the device: read only at log steps
    start_step, loss_acc, rng_note = 0, torch.zeros(2, dtype=torch.float64, device=device), ""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    seed_rank(args.seed, rank)  # the weights are built (the same on every rank): from here each rank draws its own
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["opt"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UsageError(f"--resume: checkpoint does not fit {args.model}: {str(e).splitlines()[0]}")
        scaler.load_state_dict(ckpt["scaler"])
        start_step = ckpt["step"]
        loss_acc = ckpt["loss_acc"].to(device) if rank == 0 else loss_acc
        if not restore_rng(ckpt["rng"], rank, world, args.seed, start_step, device):
            rng_note = " (RNG reseeded: the checkpoint has another number of ranks)"
        if stage is not None:
            stage.resume(ckpt)
    startup = (f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters "
               f"({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trained), {world} rank(s) on {device.type}, "
               f"{args.precision}" + (f", resuming at step {start_step}" if start_step else "") + rng_note
               + (" (torchrun starts 1 rank unless --nproc_per_node=N)" if world == 1 and "TORCHELASTIC_RUN_ID" in os.environ else "")
               + (f", global batch {args.global_batch_size} = {args.batch['micro_batch_per_rank']} per micro-batch x {world} rank(s) "
                  f"x {args.grad_accum} (--grad-accum)" if args.grad_accum > 1 else ""))
    return model, ema, opt, scaler, model_config, start_step, loss_acc, startup


def write_run_files(args, run_dir, data, stage, start_step, startup):
    """Rank 0, once every check has passed: the manifest, config.json and (on resume) the log trimmed
    to the checkpoint's step."""
    if not os.path.exists(data.manifest_file):
        atomic_write_json(data.manifest_file, data.manifest)
    atomic_write_json(os.path.join(run_dir, "config.json"), run_config(args))
    log_path = os.path.join(run_dir, "log.jsonl")
    if os.path.exists(log_path):  # drop lines logged after the checkpoint we resume from
        with open(log_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
        atomic_write_text(log_path, "".join(kept))
    if stage is not None:
        stage.prepare(args, run_dir)
    print(f"{data.manifest['summary']}\n{startup}, run {run_dir}\n{describe_recipe(args)}", flush=True)


# ---- the steps of the loop, in the order it calls them ------------------------------------------

def step_inputs(args, diffusion, model, data, x, idx, conditions, g, B, share, text_cache):
    """Every random draw of the step, for the global batch (this rank keeps rows rank::world): the
    latents (drawn from their stored mean / log-variance), t, ε, the dropped conditions, ξ (input
    perturbation), and the conditions with their CEP δ."""
    device = x.device
    if args.vae:
        x = latents_from_stats(x, data.dataset.index["scaling_factor"], g, B, share)
    t = torch.randint(0, diffusion.num_timesteps, (B,), generator=g, device=device)[share]
    noise = torch.randn((B, *x.shape[1:]), generator=g, device=device)[share]
    dropped = (torch.rand(B, generator=g, device=device) < args.class_dropout)[share]
    xi = torch.randn((B, *x.shape[1:]), generator=g, device=device)[share] if args.input_perturbation else None
    cond, extra, delta = step_conditions(args, model, conditions, idx, dropped, g, B, share, text_cache)
    return argparse.Namespace(x=x, t=t, noise=noise, xi=xi, cond=cond, extra=extra, delta=delta)


def step_losses(args, stage, step, net, diffusion, inp, g, B, share):
    """The per-example losses: the diffusion loss of the model (ε-prediction, plus L_vb when it learns
    the variance), or finetune.py --method lcm's consistency distillation."""
    if stage is not None and stage.distills:
        return stage.distillation_losses(args, step, net, inp.x, inp.noise, inp.cond, inp.extra, inp.delta, g, B, share, diffusion)
    return diffusion.training_losses(lambda xt, tt: net(xt, tt, *inp.cond, cond_noise=inp.delta, **inp.extra), inp.x, inp.t,
                                     inp.noise, args.input_perturbation, inp.xi)


def share_of_loss(per_example, keep, total):
    """A micro-batch's part of the loss: the sum of its kept rows over the rank's kept rows (`total`), so
    the parts add up to the mean over this rank's examples, less the rows of unreadable files
    (--skip-bad-files). One micro-batch: that mean."""
    if keep is None:
        return per_example.mean() if len(per_example) == total else per_example.sum() / total
    return (per_example * keep).sum() / total


def micro_batch(inp, rows):
    """The rows `rows` of every per-example tensor of the step's inputs (x, t, ε, ξ, the conditions)."""
    cut = lambda v: v[rows] if isinstance(v, torch.Tensor) else v  # noqa: E731
    return argparse.Namespace(**{k: (tuple(map(cut, v)) if isinstance(v, tuple) else {n: cut(w) for n, w in v.items()}
                                     if isinstance(v, dict) else cut(v)) for k, v in vars(inp).items()})


def forward_backward(args, stage, step, net, ddp, diffusion, inp, bad, autocast, scaler, g, B, share):
    """The loss of this rank's share and its gradient, in --grad-accum micro-batches: each one's forward
    and backward (DDP all-reduces on the last only), their gradients summing to the share's. Returns
    the loss (detached)."""
    n = len(inp.t)
    keep = faults.kept_rows(bad, n, inp.t.device)
    total = n if keep is None else keep.sum()
    loss = 0
    for k, rows in enumerate(torch.arange(n).chunk(args.grad_accum) if args.grad_accum > 1 else [None]):
        micro = inp if rows is None else micro_batch(inp, rows.to(inp.t.device))
        sync = contextlib.nullcontext() if ddp is None or k == args.grad_accum - 1 else ddp.no_sync()
        with sync:
            with autocast:
                losses = step_losses(args, stage, step, net, diffusion, micro, g, B, share)
            part = share_of_loss(losses["loss"], keep[rows] if keep is not None and rows is not None else keep, total)
            scaler.scale(part).backward()
        loss = loss + part.detach()
    return loss


def optimizer_step(args, step, model, opt, scaler):
    """Gradient clipping (unscaled first under fp16), the AdamW step at this step's learning rate.
    Returns (grad norm, lr); the norm stays on the device."""
    lr = learning_rate(step, args)
    for group in opt.param_groups:
        group["lr"] = lr
    scaler.unscale_(opt)
    params = [p for p in model.parameters() if p.grad is not None]
    if args.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    else:  # the norm alone (logged, and checked for divergence): no scaling of the gradients by 1
        grad_norm = total_grad_norm(params)
    scaler.step(opt)  # under fp16 a step with a non-finite gradient is skipped (and the scale lowered)
    scaler.update()
    opt.zero_grad(set_to_none=not dist.is_initialized())  # under DDP the gradients stay DDP's bucket views
    return grad_norm, lr



def train(args, parser, rank, world, device, stage=None):
    """The training loop of train.py, and of finetune.py, whose `stage` supplies the data
    (load_data), the model (new_model: the pre-trained one, adapted) and files to write (prepare).
    Returns the run folder."""
    master = rank == 0
    run_dir, ckpt, data = check_input(args, parser, world, stage)  # every check before anything is written
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.dry_run:
        faults.lock_run(run_dir, rank, world, write=False)  # is another process writing the run?
        if master:
            print(f"{data.manifest['summary']}\n{args.model}, {world} rank(s) on {device.type}, {args.precision}, run {run_dir}\n"
                  f"{describe_recipe(args)}\ndry run: nothing written")
        return run_dir
    # config.json's record of how this launch splits the global batch (not a flag: a resume may change it)
    args.batch = dict(global_batch=args.global_batch_size, ranks=world, grad_accum=args.grad_accum,
                      micro_batch_per_rank=args.global_batch_size // world // args.grad_accum)
    model, ema, opt, scaler, model_config, start_step, loss_acc, startup = build_state(args, device, data, stage, ckpt)
    lock, stops, done = faults.lock_run(run_dir, rank, world, write=True), None, start_step  # one writer per run, from here on
    try:
        if master:
            write_run_files(args, run_dir, data, stage, start_step, startup)
            runs.write_status(run_dir, "running", start_step)
        if world > 1:
            dist.barrier()

        # ---- the training loop ---------------------------------------------------------------
        diffusion = GaussianDiffusion.from_config(diffusion_config(args), learn_sigma=args.learn_sigma)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        # DDP around the model, then torch.compile around DDP (dynamo splits the graph at DDP's buckets, so
        # the all-reduce overlaps the backward); one rank needs no DDP
        ddp = (DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
               if world > 1 else None)
        net = torch.compile(ddp or model) if args.compile else (ddp or model)
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float16)
                    if args.precision != "fp32" else contextlib.nullcontext())
        conditions, conditions_epoch = (data.conditions if data.text else torch.from_numpy(data.conditions).to(device)), None
        text_cache = (frozen_text_cache(model.text_encoder, list(data.dataset.captions) + list(data.conditions),  # a frozen encoder
                                        os.path.join(args.out_dir, "data", data.key, f"text-{args.text_encoder.replace('/', '_').replace(':', '-')}"
                                                     f"-L{args.caption_length}"), master, world)  # (CLIP) runs once per caption
                      if data.text and model.text_encoder.is_frozen else None)
        B, share = args.global_batch_size, slice(rank, None, world)
        run_state = lambda: {"config": run_config(args), "model_config": model_config, "diffusion": diffusion_config(args),  # noqa: E731
                             **(stage.checkpoint_state() if stage is not None else {})}
        stops = faults.StopRequests(world, args.time_limit, refuse_bad_files=not args.skip_bad_files)
        diverged, skipped_files = faults.DivergenceCheck(device, args.precision == "fp16"), 0
        clock = dict(start=time.perf_counter(), last=time.perf_counter(), steps=0, start_step=start_step, skipped_files=0,
                     flops_per_image=3 * model.flops_per_forward(), peak_tflops=args.peak_tflops or datasheet_peak_tflops(device, args.precision),
                     matmul_tflops=measure_matmul_tflops(device, MATMUL_DTYPES[args.precision]) if device.type == "cuda" else None)
        if master and device.type == "cuda":  # the two MFU denominators of the log
            peak = f"{clock['peak_tflops']:g} TFLOP/s" if clock["peak_tflops"] else "no datasheet peak (give --peak-tflops)"
            print(f"mfu against {peak} ({torch.cuda.get_device_name(device)}, {args.precision}); mfu_matmul against the "
                  f"measured matmul peak, {clock['matmul_tflops']:.0f} TFLOP/s", flush=True)
        loader = batches(data.dataset, B, rank, world, args.seed, start_step, args.num_workers, device)
        progress = tqdm(total=args.max_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False,
                        disable=not (master and sys.stderr.isatty()))  # the log lines carry the ETA when there is no terminal
        one = torch.ones((), dtype=torch.float64, device=device)
        model.train()
        for step in range(start_step, args.max_steps):
            x, idx, epoch, bad = next(loader)
            x, control = x if isinstance(x, tuple) else (x, None)  # finetune.py: control images beside the data
            if bad:  # unreadable image files: refused at the agreed step, or (--skip-bad-files) left out of the loss
                stops.bad_files += [message for _, message in bad]
                skipped_files += faults.record_skipped(run_dir, bad) if args.skip_bad_files else 0
            if args.corrupt_resample and epoch != conditions_epoch:
                conditions, conditions_epoch = resampled_conditions(data.dataset, args.corrupt, args.seed, data.manifest, epoch, device), epoch
            g = step_generator(args.seed, step, device)  # every random draw of the step, for the global batch
            inp = step_inputs(args, diffusion, model, data, x, idx, conditions, g, B, share, text_cache)
            if control is not None:  # kept for dropped conditions too: guidance is over the class / caption only
                inp.extra["control"] = control
            loss = forward_backward(args, stage, step, net, ddp, diffusion, inp, bad, autocast, scaler, g, B, share)
            grad_norm, lr = optimizer_step(args, step, model, opt, scaler)
            if ema is not model:  # (at --ema-decay 0 the EMA is the weights themselves)
                update_ema(ema, model, ema_decay_at(step, args.ema_decay, args.ema_warmup))
            if stage is not None:
                stage.after_step(args, model)  # --method lcm: the target network's EMA
            diverged.update(step + 1, loss.detach(), grad_norm)  # on the device: no host sync between log steps
            loss_acc += torch.stack((loss.detach().double(), one))
            done, clock["steps"] = step + 1, clock["steps"] + 1
            progress.update()
            stop = stops.poll(final=done == args.max_steps)  # a signal, --time-limit or a bad file on any rank: all stop here
            if stop & stops.BAD_FILE:
                faults.refuse_bad_files(stops.bad_files, world)
            if done % args.log_every == 0 or done == args.max_steps:  # (a stop's checkpoint keeps the interval's losses)
                record = {"step": done, "epoch": epoch, "grad_norm": grad_norm.item(), "lr": lr}
                runs.log_step(args, run_dir, record, loss_acc, diverged, skipped_files, clock, world)
            stopped = stops.reason(stop) if stop and done < args.max_steps else None  # recorded in last.pt for the launcher
            if done % args.ckpt_every == 0 or done == args.max_steps or stopped:
                runs.checkpoint_step(args, run_dir, done, stopped, model, ema, opt, scaler, loss_acc, diverged,
                                     run_state, rank, world, device)
            if stopped:
                if master:
                    runs.write_status(run_dir, "stopped", done, reason=stopped)
                raise Requeue(f"stopped after step {done} ({stopped}): {os.path.join(run_dir, 'ckpt', 'last.pt')} written, "
                              f"status.json 'stopped'; rerun the same command with --resume to continue")
        progress.close()
        if master:
            runs.write_status(run_dir, "finished", done)
            print(f"done: {run_dir} ({args.max_steps} steps, {(time.perf_counter() - clock['start']) / 60:.1f} min)"
                  + (f"; {clock['skipped_files']} unreadable file(s) skipped, listed in {faults.skipped_list(run_dir)}"
                     if clock["skipped_files"] else "")
                  + f"\nnext:\n{runs.next_commands(args, run_dir)}", flush=True)
        return run_dir
    except Exception as e:  # a bad file, a full disk, a lost rank, divergence: the error line, for the job script
        if master and not isinstance(e, Requeue):
            runs.write_failure(run_dir, done, e)
        raise
    finally:
        if stops is not None:
            stops.close()
        lock.release()


if __name__ == "__main__":
    run_main(main)
