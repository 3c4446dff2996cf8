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
from models.cep import CEP_TYPES, cep_noise, fixed_cep_noise
from models.common import (UsageError, atomic_write_json, atomic_write_text, ema_decay_at, learning_rate,
                           measure_matmul_tflops, restore_rng, rng_states, run_main, seed_rank, setup_distributed,
                           step_generator, update_ema)
from models.diffusion import SCHEDULES, GaussianDiffusion
from models.text import build_text_encoder, cep_on_tokens, frozen_text_cache
from models.vae import latents_from_stats
from models import runs
from models.build import CLASS_COND_MODES, MODEL_NAMES, UNET_CONFIGS, apply_recipe, build_model, describe_recipe, recipe_table, with_legacy_defaults

# flags that do not change what is trained: a --resume may change them (the others must match)
NON_RUN_FLAGS = {"max_steps", "ckpt_every", "log_every", "compile", "grad_checkpoint", "device", "num_workers", "dry_run"}
NOT_SAVED = {"resume", "resume_from", "out_dir", "run", "dry_run", "nproc_per_node"}  # where the run is, not what it is


def get_parser():
    p = argparse.ArgumentParser(description="Pre-train a class-conditional DiT (corrupted labels, CEP).")
    a = p.add_argument
    a("--dataset", default="fashion-mnist", choices=DATASETS)
    a("--data-path", default=None, help="dataset folder (fashion-mnist: IDX files; default Debian's copy, else download)")
    a("--image-size", type=int, default=None, help="imagefolder crop size (default 256); fashion-mnist is 32")
    a("--model", default="DiT-T/4", help=f"one of {', '.join(MODEL_NAMES)}")
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
    a("--resume", action="store_true", help="continue <out-dir>/<run> from ckpt/last.pt")
    a("--resume-from", default=None, metavar="CKPT", help="continue a run from one of its numbered checkpoints, <run>/ckpt/<step>.pt")
    a("--device", default="auto", help="auto | cpu | cuda (the rank's GPU is cuda:LOCAL_RANK)")
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
    for name in ("global_batch_size", "max_steps", "ckpt_every", "log_every"):
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
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def check_only(args, parser, stage=None):
    """Every input check of train() for args.nproc_per_node ranks, in this process; writes nothing."""
    with contextlib.redirect_stdout(io.StringIO()):
        train(argparse.Namespace(**{**vars(args), "dry_run": True}), parser, 0, args.nproc_per_node,
              setup_distributed(args.device)[2], stage)


def load_data(args):
    """The training set (pre-extracted latents with --vae) and its folder name under <out-dir>/data."""
    dataset = load_dataset(args.dataset, args.data_path, args.image_size, download_root=os.path.join(args.out_dir, "data", "downloads"))
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


# ---- one step's inputs --------------------------------------------------------------------------

def step_conditions(args, model, conditions, idx, dropped, g, B, share, text_cache):
    """The condition of each example of this rank's share: (cond, extra model kwargs, CEP δ or None).
    Dropped rows (classifier-free guidance) get the null condition, never perturbed. CEP (Chen et al.
    2024, Eq. 4) adds δ to the condition embedding c_θ(y), drawn for the global batch."""
    device = idx.device
    if isinstance(conditions, torch.Tensor):  # class labels: the null class is num_classes
        cond = (torch.where(dropped, model.num_classes, conditions[idx]),)
        if not args.cep:
            return cond, {}, None
        if args.cep_fixed:  # ablation: one δ per training example, drawn once
            delta = fixed_cep_noise(idx, model.cond_dim, args.cep_gamma, args.cep_type, args.seed)
        else:
            delta = cep_noise(B, model.cond_dim, args.cep_gamma, args.cep_type, generator=g, device=device)[share]
        return cond, {}, delta * (~dropped).unsqueeze(1)
    captions = ["" if d else conditions[i] for i, d in zip(idx.tolist(), dropped.tolist())]  # "": the null caption
    tokens = model.tokenize(captions)
    cond = (tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
    extra = {"context": text_cache.lookup(captions, device)} if text_cache else {}
    if not args.cep:
        return cond, extra, None
    L = cond[0].shape[1]  # δ on every caption token, none on padding or null rows
    delta = cep_on_tokens(torch.zeros(B, L, model.cond_dim, device=device), torch.ones(B, L), args.cep_gamma,
                          args.cep_type, generator=g)[share]
    return cond, extra, delta * (cond[1].unsqueeze(-1) * (~dropped).view(-1, 1, 1))


def log(log_path, record, eta_s):
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    tqdm.write(f"step {record['step']:7d} | loss {record['loss']:.4f} | grad {record['grad_norm']:.3f} | {record['img_per_s']:8.1f} img/s"
               + (f" | MFU {record['mfu']:.1%}" if "mfu" in record else "") + f" | ETA {eta_s // 60:.0f}m{eta_s % 60:02.0f}s")
    sys.stdout.flush()


def train(args, parser, rank, world, device, stage=None):
    """The training loop of train.py, and of finetune.py, whose `stage` supplies the data
    (load_data), the model (new_model: the pre-trained one, adapted) and files to write (prepare)."""
    master = rank == 0
    # ---- check all input before writing anything -------------------------------------------
    run_dir, ckpt = resolve_run(args, parser)
    runs.check_writable(run_dir, "--out-dir")
    check_args(args)
    if args.global_batch_size % world:
        raise UsageError(f"--global-batch-size {args.global_batch_size} is not divisible by {world} ranks")
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
    # config.json records the values used, not the defaults that chose them
    args.precision = precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.corrupt_type = manifest["corrupt_type"]
    if args.dry_run:
        if master:
            print(f"{manifest['summary']}\n{args.model}, {world} rank(s) on {device.type}, {precision}, run {run_dir}\n"
                  f"{describe_recipe(args)}\ndry run: nothing written")
        return
    model, model_config = stage.new_model(args, dataset, text) if stage else new_model(args, dataset, text)
    model = model.to(device)
    for module in model.modules():  # the denoiser (inside a text or adapted model too)
        if hasattr(module, "grad_checkpoint"):
            module.grad_checkpoint = args.grad_checkpoint
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    # (sum of step losses, steps) since the last log, kept on the device: read only at log steps
    start_step, loss_acc = 0, torch.zeros(2, dtype=torch.float64, device=device)
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
        loss_acc = ckpt["loss_acc"].to(device) if master else loss_acc
        rng_restored = restore_rng(ckpt["rng"], rank, world, args.seed, start_step, device)
        if stage is not None:
            stage.resume(ckpt)
    startup = (f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters "
               f"({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trained), {world} rank(s) on {device.type}, "
               f"{precision}, run {run_dir}" + (f", resuming at step {start_step}" if start_step else "")
               + ("" if ckpt is None or rng_restored else " (RNG reseeded: the checkpoint has another number of ranks)")
               + (" (torchrun starts 1 rank unless --nproc_per_node=N)" if world == 1 and "TORCHELASTIC_RUN_ID" in os.environ else ""))

    # ---- all checks passed: write the manifest, config and (on resume) the trimmed log ------
    config = run_config(args)
    log_path = os.path.join(run_dir, "log.jsonl")
    if master:
        if not os.path.exists(manifest_file):
            atomic_write_json(manifest_file, manifest)
        atomic_write_json(os.path.join(run_dir, "config.json"), config)
        if os.path.exists(log_path):  # drop lines logged after the checkpoint we resume from
            with open(log_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
            atomic_write_text(log_path, "".join(kept))
        if stage is not None:
            stage.prepare(args, run_dir)
        print(f"{manifest['summary']}\n{startup}\n{describe_recipe(args)}", flush=True)
    if world > 1:
        dist.barrier()

    # ---- the training loop -------------------------------------------------------------------
    diffusion = GaussianDiffusion.from_config(diffusion_config(args), learn_sigma=args.learn_sigma)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    net = torch.compile(model) if args.compile else model
    if world > 1:
        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True, static_graph=True)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision != "fp32" else contextlib.nullcontext())
    train_conditions = conditions if text else torch.from_numpy(conditions).to(device)
    text_cache = None
    if text and model.text_encoder.is_frozen:  # a frozen encoder (CLIP) runs once per distinct caption
        cache = f"text-{args.text_encoder.replace('/', '_').replace(':', '-')}-L{args.caption_length}"
        text_cache = frozen_text_cache(model.text_encoder, list(dataset.captions) + list(conditions),
                                       os.path.join(args.out_dir, "data", key, cache), master, world)
    conditions_epoch = None
    B, share = args.global_batch_size, slice(rank, None, world)
    flops_per_image = 3 * model.flops_per_forward()
    peak_tflops = measure_matmul_tflops(device) if device.type == "cuda" else None
    data = batches(dataset, B, rank, world, args.seed, start_step, args.num_workers, device)
    model.train()
    progress = tqdm(total=args.max_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False,
                    disable=not (master and sys.stderr.isatty()))  # the log lines carry the ETA when there is no terminal
    t_start = t_last = time.perf_counter()
    steps_since_log = 0
    one = torch.ones((), dtype=torch.float64, device=device)
    for step in range(start_step, args.max_steps):
        x, idx, epoch = next(data)
        x, control = x if isinstance(x, tuple) else (x, None)  # finetune.py: control images beside the data
        if args.corrupt_resample and epoch != conditions_epoch:
            train_conditions, conditions_epoch = resampled_conditions(dataset, args.corrupt, args.seed, manifest, epoch, device), epoch
        # every random draw of the step, for the global batch; this rank keeps rows rank::world
        g = step_generator(args.seed, step, device)
        if args.vae:
            x = latents_from_stats(x, dataset.index["scaling_factor"], g, B, share)
        t = torch.randint(0, diffusion.num_timesteps, (B,), generator=g, device=device)[share]
        noise = torch.randn((B, *x.shape[1:]), generator=g, device=device)[share]
        dropped = (torch.rand(B, generator=g, device=device) < args.class_dropout)[share]
        xi = torch.randn((B, *x.shape[1:]), generator=g, device=device)[share] if args.input_perturbation else None
        cond, extra, delta = step_conditions(args, model, train_conditions, idx, dropped, g, B, share, text_cache)
        if control is not None:  # kept for dropped conditions too: guidance is over the class / caption only
            extra["control"] = control
        with autocast:
            if stage is not None and stage.distills:  # finetune.py --method lcm: consistency distillation
                losses = stage.distillation_losses(args, step, net, x, noise, cond, extra, delta, g, B, share, diffusion)
            else:
                losses = diffusion.training_losses(lambda xt, tt: net(xt, tt, *cond, cond_noise=delta, **extra), x, t, noise,
                                                   args.input_perturbation, xi)
        loss = losses["loss"].mean()
        lr = learning_rate(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, model, ema_decay_at(step, args.ema_decay, args.ema_warmup))
        if stage is not None:
            stage.after_step(args, model)  # --method lcm: the target network's EMA
        loss_acc += torch.stack((loss.detach().double(), one))  # on the device: no host sync between log steps
        steps_since_log += 1
        done = step + 1
        progress.update()

        if done % args.log_every == 0 or done == args.max_steps:
            total = loss_acc.clone()
            if world > 1:
                dist.all_reduce(total)  # sum over ranks of (sum of local mean losses, count)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            img_per_s = B * steps_since_log / (time.perf_counter() - t_last)
            record = {"step": done, "epoch": epoch, "loss": (total[0] / total[1]).item(), "grad_norm": grad_norm.item(),
                      "lr": lr, "img_per_s": round(img_per_s, 2), "time": round(time.time(), 1)}
            if peak_tflops:
                record["mfu"] = round(flops_per_image * img_per_s / world / (peak_tflops * 1e12), 4)
            if master:
                log(log_path, record, (time.perf_counter() - t_start) / (done - start_step) * (args.max_steps - done))
            loss_acc.zero_()
            t_last, steps_since_log = time.perf_counter(), 0

        if done % args.ckpt_every == 0 or done == args.max_steps:
            acc = loss_acc.clone()
            if world > 1:
                dist.all_reduce(acc)  # so a resume mid-interval logs the same mean
            rng = rng_states(device, world)  # every rank's, so a resume restores each rank's own
            if master:
                state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "scaler": scaler.state_dict(), "step": done, "rng": rng, "loss_acc": acc.cpu(),
                         "config": config, "model_config": model_config, "diffusion": diffusion_config(args),
                         **(stage.checkpoint_state() if stage is not None else {})}
                runs.save_checkpoint(run_dir, state, numbered=done % args.ckpt_every == 0)
    progress.close()
    if master:
        minutes = (time.perf_counter() - t_start) / 60
        print(f"done: {run_dir} ({args.max_steps} steps, {minutes:.1f} min)\nnext:\n{runs.next_commands(args, run_dir)}", flush=True)


if __name__ == "__main__":
    run_main(main)
