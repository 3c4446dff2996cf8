"""
Stage 3: generate images from a trained (or adapted) run, sharded over ranks.

    RUN=out/DiT-T-4_fashion-mnist_eta0.025_cep-uniform1_seed0          # the README's quick-start run
    python sample.py --run $RUN --num-samples 100 --sampler ddim --steps 25 --cfg-scale 1.5
    torchrun --standalone --nproc_per_node=2 sample.py --run-dir $RUN --num-samples 100   # same images, half the time each
    python sample.py --run $RUN --cfg-scale 1,2,3,4                    # a guidance sweep: one folder each

Every image has a global index i, a class (i mod K, so any prefix is class-balanced, or --class)
and its own noise stream (PCG64 seeded by the full (seed, i), models.common.ImageNoise) for its
initial noise and every later noise draw, so no two images share noise. Images
are sampled in fixed batches of consecutive indices, batch j on rank j mod W, so 1 or N ranks give
byte-identical images; a rerun of the same command skips the images already written.

Adapted models (finetune.py --method controlnet / t2i-adapter) need --control <folder>: image i
follows control image i mod M (and takes its class), e.g. the held-out controls <run>/controls.
Consistency-distilled students (finetune.py --method lcm) sample with `--sampler lcm --steps N`
(N = 1, 2, 4, 8: multistep consistency sampling); --cfg-scale s is then the embedded guidance
w = s - 1, inside the range the student was distilled on, at the cost of one forward per step.

    python sample.py --run out/<lcm run> --sampler lcm --steps 4 --cfg-scale 3

Released diffusers pipelines (the paper's DiffusionNoise/* on the hub, or a pipeline folder) are
converted to our networks and sampled the same way, into <out-dir>/<name>/samples/<tag>
(models/pretrained.py; the pipeline's scheduler sets the β schedule and timestep grid):

    python sample.py --pretrained DiffusionNoise/dit-xl-2_imagenet_clean --num-samples 50000 --cfg-scale 1.75

Writes <run>/samples/<tag>/: images/<index>.png (.jpg: --image-format jpeg), samples.npz (ADM evaluator layout: arr_0 uint8
N x H x W x C, arr_1 labels), grid.png and sample_config.json (and controls.npz: each image's
control, for evaluate.py's control fidelity; for a VQ latent model codes.npy, N x h x w: the codebook
index of each latent position at quantisation, the codes the images were decoded from, for
evaluate.py's codebook entropy, assembled from one codes/<first index>.npy per batch).
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from models.common import (ImageNoise, UsageError, atomic_write_json, atomic_write_npy, atomic_write_text, compile_for_inference, end_distributed,
                           run_main, setup_distributed)
from models.data import load_dataset
from models.diffusion import DEFAULT_DIFFUSION, SAMPLE_BATCH, SAMPLERS, GaussianDiffusion, Sampler, classifier_free_guidance, lcm_timesteps
from models.build import model_from_checkpoint
from models.runs import check_writable
from models.dit import config_from_state_dict
from models.vae import decode_latents, open_vae


# the DiffusionNoise authors' sampling (their README; github.com/Hhhhhhao/DiffusionNoise scripts/*.py default to DDIM 50
# at 7.5): DPM-Solver++ 50 steps at guidance 2.25, fp16, each image saved as JPEG quality 100 without chroma subsampling
PRESETS = {"authors": dict(sampler="dpm-solver++", steps=50, cfg_scale="2.25", precision="fp16", image_format="jpeg")}


def get_parser():
    p = argparse.ArgumentParser(description="Sample class-conditional images from a train.py run.")
    a = p.add_argument
    a("--preset", default=None, choices=tuple(PRESETS), help="authors: DPM-Solver++ 50 steps, guidance 2.25, fp16, JPEG "
      "quality 100 (4:4:4), as the authors sampled their releases; flags given with it override it")
    a("--run", "--run-dir", dest="run", default=None, help="run directory (<out-dir>/<run>); uses ckpt/last.pt")
    a("--ckpt", default=None, help="a checkpoint file instead of --run (samples go next to its run)")
    a("--pretrained", default=None, metavar="SPEC", help="a released diffusers pipeline instead of --run: a folder or hub id "
      "(DiTPipeline, the authors' LDMClassToImagePipeline, LDMTextToImagePipeline; e.g. DiffusionNoise/dit-xl-2_imagenet_clean), "
      "converted to our networks; its scheduler gives the β schedule and the sampler's timesteps")
    a("--out-dir", default="out", help="--pretrained: samples go to <out-dir>/<the folder's or hub id's last part>/samples/<tag>")
    a("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    a("--sampler", default="dpm-solver++", choices=SAMPLERS, help="the paper's default is DPM-Solver++ with 50 steps; "
      "lcm: multistep consistency sampling of a finetune.py --method lcm run")
    a("--force-sampler", action="store_true", help="run --sampler ddpm / ddim / dpm-solver++ on an LCM student's ε-prediction "
      "(at its embedded guidance) although it was distilled for --sampler lcm")
    a("--steps", type=int, default=50)
    a("--ddim-eta", type=float, default=0.0, help="DDIM stochasticity (0 = deterministic)")
    a("--cfg-scale", default="1.5", help="guidance scale, or a comma list for a sweep (1 = no guidance)")
    a("--cfg-channels", type=int, default=None, help="guide only the first k channels (DiT's legacy: 3)")
    a("--clip-denoised", action="store_true", help="clip the predicted x_0 to [-1, 1] (pixel-space models)")
    a("--num-samples", type=int, default=1000)
    a("--class", dest="class_label", type=int, default=None, help="sample only this class")
    a("--batch-size", type=int, default=SAMPLE_BATCH, help="images per forward pass (x2 with guidance; fixed across world sizes)")
    a("--seed", type=int, default=0)
    a("--tag", default=None, help="output folder name under <run>/samples/ (default: built from the settings)")
    a("--device", default="auto", help="auto | cpu | cuda")
    a("--vae", default=None, help="autoencoder that decodes a latent model's samples (default: the run's --vae)")
    a("--prompts", default=None, help="text models: a file of captions, one per line (default: held-out captions)")
    a("--precision", default=None, choices=("fp32", "bf16", "fp16"), help="default: bf16 on GPU, fp32 on CPU")
    a("--image-format", default="png", choices=("png", "jpeg"), help="each image's file (samples.npz holds its pixels, "
      "what evaluate.py scores): png (lossless) or jpeg (quality 100, no chroma subsampling, as the authors saved theirs)")
    a("--compile", action="store_true", help="torch.compile the model with frozen weights (pays off for large sample sets; "
      "with --precision bf16 about 2x faster on a CPU with bf16 instructions)")
    a("--control", default=None, help="adapted models (finetune.py): folder of control images, <label>/<name>.png "
      "(or flat, labels i mod K), e.g. <run>/controls; image i gets control i mod M and its label (classes interleaved)")
    return p


TIMING = ("img_per_s", "seconds")  # written to sample_config.json after sampling; not settings


def read_controls(folder, model):
    """The control images of a folder as uint8 (M, C, S, S), their labels (from class-id
    sub-folders; -1 when flat or in the folder -1) and, for finetune.py's held-out controls of a caption dataset, their
    captions (else None). Refuses controls of another kind than the model was adapted to."""
    adapter = model.config
    if not os.path.isdir(folder):
        raise UsageError(f"--control {folder} is not a folder")
    meta_path, meta = os.path.join(folder, "control.json"), {}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        kind = meta.get("control")
        if kind != adapter["control"]:
            raise UsageError(f"this model was adapted to {adapter['control']} control; {folder} holds {kind} controls")
    entries = []
    for dirpath, _, files in sorted(os.walk(folder)):
        rel = os.path.relpath(dirpath, folder)
        for f in sorted(files):
            if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")):
                if rel != "." and not (rel.isdigit() or rel == "-1"):  # -1: finetune.py's controls of unlabelled captions
                    raise UsageError(f"--control: sub-folders name class ids (0, 1, ..., or -1 for none), found {rel}")
                entries.append((int(rel) if rel != "." else -1, os.path.join(dirpath, f)))
    if not entries:
        raise UsageError(f"--control {folder} holds no images")
    entries.sort(key=lambda e: (e[0], e[1]))
    seen, keyed = {}, []
    for label, path in entries:  # interleave the classes, so that any prefix of the samples is class-balanced
        keyed.append((seen.get(label, 0), label, path))
        seen[label] = seen.get(label, 0) + 1
    entries = [(label, path) for _, label, path in sorted(keyed)]
    mode = "L" if adapter["control_channels"] == 1 else "RGB"
    maps, size = [], adapter["control_size"]
    for _, path in entries:
        with Image.open(path) as img:
            if img.size != (size, size) or (img.mode == "L") != (mode == "L"):
                raise UsageError(f"{path} is {img.mode} {img.size[0]}x{img.size[1]}; the model takes "
                                 f"{adapter['control']} maps ({mode}) of {size}x{size}")
            arr = np.asarray(img.convert(mode))
        maps.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    captions = None
    if meta.get("captions"):  # files are named by their row in the dataset
        caption_of = dict(zip(meta["rows"], meta["captions"]))
        stems = [os.path.splitext(os.path.basename(path))[0] for _, path in entries]
        if all(s.isdigit() and int(s) in caption_of for s in stems):
            captions = [caption_of[int(s)] for s in stems]
    return np.stack(maps), np.array([label for label, _ in entries], dtype=np.int64), captions


def load_pretrained_model(args):
    """--pretrained: our networks converted from a diffusers pipeline; samples go under <out-dir>/<its name>."""
    from models.pretrained import load_pretrained, scheduler_grid
    if args.run or args.ckpt or args.vae or args.control or args.no_ema:
        raise UsageError("--pretrained takes none of --run, --ckpt, --vae, --control, --no-ema")
    model, vae, ckpt, folder = load_pretrained(args.pretrained)
    try:
        plan = scheduler_grid(ckpt.pop("scheduler"), args.sampler, args.steps)
    except ValueError as e:
        raise UsageError(f"--pretrained {args.pretrained}: scheduler: {e}")
    ckpt["diffusion"], args.vae, args.pipeline_vae, args.plan = plan.pop("diffusion"), ckpt["config"]["vae"], vae, plan
    return model, ckpt, os.path.join(args.out_dir, os.path.basename(os.path.normpath(args.pretrained))), folder


def load_model(args):
    if args.pretrained:
        return load_pretrained_model(args)
    path = args.ckpt or (os.path.join(args.run, "ckpt", "last.pt") if args.run else None)
    if path is None:
        raise UsageError("pass --run <out-dir>/<run> or --ckpt <file>")
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # every rank: pages shared, read on use
        model = model_from_checkpoint(ckpt, use_ema=not args.no_ema)
    except Exception as e:  # noqa: BLE001  (unreadable file, another model's weights)
        raise UsageError(f"cannot load a model from {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    vae_spec = args.vae or (ckpt.get("config") or {}).get("vae")
    if model.in_channels not in (1, 3) and not vae_spec:
        raise UsageError(f"{path} is a latent-space model ({model.in_channels} channels): pass --vae to decode its samples")
    args.vae = vae_spec
    adapted = "adapter" in (ckpt.get("model_config") or {})
    if adapted and not args.control:
        raise UsageError(f"{path} was adapted to {ckpt['model_config']['adapter']['control']} control: pass --control <folder>")
    if args.control and not adapted:
        raise UsageError(f"--control: {path} is not an adapted model (finetune.py --method controlnet / t2i-adapter)")
    if "model_config" not in ckpt:  # an official DiT state dict: describe it like one of ours
        ckpt = {"model_config": config_from_state_dict(ckpt), "config": {}, "step": None}
    run_dir = args.run or os.path.dirname(os.path.dirname(os.path.abspath(path)))
    return model, ckpt, run_dir, path


def text_prompts(args, ckpt):
    """Captions for a text model: --prompts FILE (one per line), else the held-out captions of the
    embedded dataset (Fashion-MNIST's test split). Returns (prompts, their class labels or -1)."""
    if args.prompts:
        if not os.path.isfile(args.prompts):
            raise UsageError(f"--prompts {args.prompts} does not exist")
        with open(args.prompts, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise UsageError(f"--prompts {args.prompts} holds no captions")
        return prompts, np.full(len(prompts), -1, dtype=np.int64)
    run_config = ckpt.get("config") or {}
    if run_config.get("dataset") != "fashion-mnist-captions":
        raise UsageError("a text model needs --prompts FILE (one caption per line)")
    held_out = load_dataset("fashion-mnist-captions", run_config.get("data_path"), split="test")
    return held_out.captions, held_out.labels


def image_labels(num_samples, num_classes, class_label):
    if class_label is not None:
        return np.full(num_samples, class_label, dtype=np.int64)
    return np.arange(num_samples, dtype=np.int64) % num_classes  # class-balanced for every prefix


def to_uint8(x):
    """[-1, 1] float NCHW -> uint8 NHWC, as ADM / DiT quantise samples."""
    return (127.5 * x + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_image(path, arr):
    """PNG, or JPEG at quality 100 without chroma subsampling (4:4:4), by the path's extension."""
    ext = os.path.splitext(path)[1]
    tmp = path + ".tmp" + ext
    jpeg = dict(format="JPEG", quality=100, subsampling=0) if ext == ".jpg" else {}
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(tmp, **jpeg)
    os.replace(tmp, path)


def make_grid(images, ncol):
    n, h, w, c = images.shape
    rows = -(-n // ncol)
    grid = np.zeros((rows * (h + 2) + 2, ncol * (w + 2) + 2, c), dtype=np.uint8)
    for k, img in enumerate(images):
        r, col = divmod(k, ncol)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + col * (w + 2): 2 + col * (w + 2) + w] = img
    return grid


def main():
    parser = get_parser()
    preset = parser.parse_known_args()[0].preset
    if preset:  # the preset's values become the defaults: flags given still win
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args()
    try:
        scales = [float(s) for s in args.cfg_scale.split(",")]
    except ValueError:
        raise UsageError(f"--cfg-scale takes numbers separated by commas, got {args.cfg_scale}")
    for flag, value, ok, rule in (("--cfg-scale", args.cfg_scale, all(s >= 1 for s in scales), ">= 1 (1 = no guidance)"),
                                  ("--num-samples", args.num_samples, args.num_samples > 0, "positive"),
                                  ("--batch-size", args.batch_size, args.batch_size > 0, "positive"),
                                  ("--steps", args.steps, args.steps > 0, "positive"),
                                  ("--ddim-eta", args.ddim_eta, args.ddim_eta >= 0, ">= 0")):
        if not ok:
            raise UsageError(f"{flag} must be {rule}, got {value}")
    if args.steps > 1000:
        raise UsageError("--steps must be at most the 1000 training timesteps")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    model, ckpt, run_dir, ckpt_path = load_model(args)
    check_writable(os.path.join(run_dir, "samples"), "--out-dir" if args.pretrained else "--run" if args.run else "--ckpt")
    num_classes = model.num_classes
    args.control_maps = args.control_labels = captions = None
    if args.control:
        args.control_maps, args.control_labels, captions = read_controls(args.control, model)
    if num_classes == 0:  # a text model: prompts instead of classes
        if args.class_label is not None:
            raise UsageError("--class is for class-conditional models; a text model takes --prompts")
        if captions is not None and not args.prompts:  # held-out controls (finetune.py) come with their captions
            args.prompt_list, args.prompt_labels = captions, args.control_labels
        else:
            args.prompt_list, args.prompt_labels = text_prompts(args, ckpt)
    elif args.prompts:
        raise UsageError("--prompts is for text models; this one is class-conditional")
    if args.class_label is not None and not 0 <= args.class_label < num_classes:
        raise UsageError(f"--class must be in [0, {num_classes})")
    if args.control:
        if num_classes and (args.control_labels >= num_classes).any():
            raise UsageError(f"--control {args.control} has class folders beyond the model's {num_classes} classes")
    run_config = ckpt.get("config") or {}
    args.lcm = run_config.get("method") == "lcm"
    if args.sampler == "lcm" and not args.lcm:
        raise UsageError(f"--sampler lcm samples a consistency-distilled run (finetune.py --method lcm); {ckpt_path} is not one")
    if args.lcm:
        if args.sampler != "lcm" and not args.force_sampler:
            raise UsageError(f"{ckpt_path} is a consistency-distilled student: sample it with --sampler lcm --steps 1..8, or pass "
                             f"--force-sampler to run {args.sampler} on its ε-prediction")
        w_min, w_max = run_config["w_min"], run_config["w_max"]
        for s in scales:
            if not w_min - 1e-9 <= s - 1 <= w_max + 1e-9:
                raise UsageError(f"--cfg-scale {s:g} is outside the guidance this student was distilled on: scales "
                                 f"{1 + w_min:g} to {1 + w_max:g} (w = scale - 1 in [{w_min:g}, {w_max:g}])")
        if args.sampler == "lcm":
            try:
                lcm_timesteps({**DEFAULT_DIFFUSION, **ckpt.get("diffusion", {})}["num_timesteps"], run_config["lcm_skip"], args.steps)
            except ValueError as e:
                raise UsageError(f"--steps {args.steps}: {e}")
    elif num_classes and any(s != 1 for s in scales) and model.y_embedder.embedding_table.num_embeddings == num_classes:
        raise UsageError("this model was trained without label dropout (no null class): use --cfg-scale 1")

    rank, world, device = setup_distributed(args.device)
    try:
        vae = open_vae(args.vae, device) if args.vae and not args.pretrained else None  # a bad --vae fails before anything is written
        vae = args.pipeline_vae.to(device) if args.pretrained else vae
        for scale in scales:
            sample_one_setting(args, model, vae, ckpt, run_dir, ckpt_path, scale, rank, world, device)
        end_distributed(barrier=True)  # every rank done before any tears the group down
    finally:
        end_distributed()


def sample_one_setting(args, model, vae, ckpt, run_dir, ckpt_path, scale, rank, world, device):
    if args.tag:  # a sweep appends the scale to the tag
        tag = args.tag if len(args.cfg_scale.split(",")) == 1 else f"{args.tag}_cfg{scale:g}"
    else:
        tag = (f"{args.sampler}{args.steps}_cfg{scale:g}_n{args.num_samples}_seed{args.seed}"
               + (f"_class{args.class_label}" if args.class_label is not None else "") + ("_noema" if args.no_ema else "")
               + ("_fp16" if args.precision == "fp16" else "") + ("_jpeg" if args.image_format == "jpeg" else ""))
    out = os.path.join(run_dir, "samples", tag)
    config = {"checkpoint": os.path.abspath(ckpt_path), "step": ckpt.get("step"), "ema": not args.no_ema,
              "sampler": args.sampler, "steps": args.steps, "ddim_eta": args.ddim_eta, "cfg_scale": scale,
              "cfg_channels": args.cfg_channels, "vae": args.vae, "prompts": args.prompts, "clip_denoised": args.clip_denoised, "num_samples": args.num_samples,
              "class": args.class_label, "batch_size": args.batch_size, "seed": args.seed, "noise": "pcg64-box-muller",
              "control": os.path.abspath(args.control) if args.control else None,
              "model_config": ckpt["model_config"], "run_config": ckpt.get("config", {}),
              "diffusion": {**DEFAULT_DIFFUSION, **ckpt.get("diffusion", {})},
              **({"scheduler": args.plan} if args.pretrained else {}),  # a pipeline's scheduler, converted
              # recorded only away from what every older set was made with, so that those still resume
              **({"precision": "fp16"} if args.precision == "fp16" else {}),
              **({"image_format": "jpeg"} if args.image_format == "jpeg" else {})}
    config_path = os.path.join(out, "sample_config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            saved, now = json.load(f), json.loads(json.dumps(config))
        differ = [k if isinstance(saved.get(k), dict) else f"{k} {saved.get(k)} (now {now.get(k)})"
                  for k in sorted((saved.keys() | now.keys()) - set(TIMING)) if saved.get(k) != now.get(k)]
        if differ:
            raise UsageError(f"{out} holds samples made with other settings: {', '.join(differ)}; choose another --tag")
        config.update({k: saved[k] for k in TIMING if k in saved})  # a rerun that makes nothing keeps them
    if world > 1:
        dist.barrier()
    if rank == 0:
        os.makedirs(os.path.join(out, "images"), exist_ok=True)
        atomic_write_json(config_path, config)
    if world > 1:
        dist.barrier()

    model.to(device)
    plan = args.plan if args.pretrained else {}  # a pipeline's scheduler: its grid, clipping and variance
    learned = plan.get("learned_variance")
    learn_sigma = model.learn_sigma if learned is None else learned and model.learn_sigma
    diffusion = GaussianDiffusion.from_config(ckpt.get("diffusion"), learn_sigma=learn_sigma)  # the run's (pipeline's) schedule
    sampler = Sampler(diffusion, args.sampler, args.steps, args.ddim_eta, args.clip_denoised or plan.get("clip", False),
                      lcm_skip=ckpt["config"]["lcm_skip"] if args.lcm else 20, grid=plan.get("grid"))
    text = model.num_classes == 0
    if text:  # image i gets prompt i mod P; its label (held-out class, or -1) goes to arr_1
        prompts = [args.prompt_list[i % len(args.prompt_list)] for i in range(args.num_samples)]
        labels = np.asarray([args.prompt_labels[i % len(args.prompt_list)] for i in range(args.num_samples)], dtype=np.int64)
    else:
        labels = image_labels(args.num_samples, model.num_classes, args.class_label)
    controls = None
    if args.control_maps is not None:  # image i gets control i mod M, and its class when the folder names one
        rows = np.arange(args.num_samples) % len(args.control_maps)
        controls = args.control_maps[rows]
        if not text and args.class_label is None:
            labels = np.where(args.control_labels[rows] >= 0, args.control_labels[rows], labels)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    shape = (model.in_channels, model.input_size, model.input_size)
    ext = ".jpg" if args.image_format == "jpeg" else ".png"
    png = lambda i: os.path.join(out, "images", f"{i:06d}{ext}")  # noqa: E731
    codes_of = lambda b: os.path.join(out, "codes", f"{b.start:06d}.npy")  # noqa: E731  (VQ: a batch's codes)
    batches = [range(s, min(s + args.batch_size, args.num_samples)) for s in range(0, args.num_samples, args.batch_size)]
    mine = [b for j, b in enumerate(batches) if j % world == rank and not all(os.path.exists(png(i)) for i in b)]
    net = compile_for_inference(model) if args.compile else model
    t_start, made = time.perf_counter(), torch.tensor(sum(len(b) for b in mine), device=device)
    for idx in tqdm(mine, desc=f"{tag} rank {rank}", disable=rank != 0):
        draw = ImageNoise(args.seed, idx, shape, device)  # image i's noise depends on (seed, i) only
        if text:  # guidance against the empty caption
            tok, null = model.tokenize(prompts[idx.start: idx.stop]), model.tokenize([""] * len(idx))
            cond, null = (tok["input_ids"].to(device), tok["attention_mask"].to(device)), (null["input_ids"].to(device), null["attention_mask"].to(device))
        else:
            cond, null = torch.from_numpy(labels[idx.start: idx.stop]).to(device), model.num_classes
        extra = {"control": torch.from_numpy(controls[idx.start: idx.stop]).to(device).float() / 255} if controls is not None else {}
        if args.lcm:  # the student's embedded guidance w = s - 1: one forward, no unconditional half
            w = torch.full((len(idx),), scale - 1.0, device=device)
            model_fn = lambda x, t: net(x, t, *(cond if isinstance(cond, tuple) else (cond,)), guidance=w, **extra)  # noqa: E731
        else:
            model_fn = classifier_free_guidance(net, cond, null, scale, args.cfg_channels, extra)
        with torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16, enabled=precision != "fp32"):
            x = sampler.sample(model_fn, draw(), noise_fn=draw)
        if vae is not None:
            x, codes = decode_latents(vae, x.float(), return_codes=True)
            if codes is not None:  # before the PNGs: a batch whose PNGs all exist has its codes
                atomic_write_npy(codes_of(idx), codes.cpu().numpy().astype(np.min_scalar_type(vae.quantize.embedding.num_embeddings - 1)))
        for i, arr in zip(idx, to_uint8(x)):
            save_image(png(i), arr)
    seconds = time.perf_counter() - t_start
    if world > 1:
        dist.all_reduce(made)  # images made by all ranks (the barrier the assembly needs)
    if rank == 0 and made > 0:  # sampling speed of this invocation, all ranks together
        config.update(img_per_s=round(made.item() / seconds, 2), seconds=round(seconds, 1))
        atomic_write_json(config_path, config)
    if rank == 0:  # assemble from the image files, so the arrays are exactly what is on disk (JPEG: decoded)
        images = np.stack([np.asarray(Image.open(png(i))) for i in range(args.num_samples)])
        if images.ndim == 3:
            images = images[..., None]
        tmp = os.path.join(out, "samples.tmp.npz")
        np.savez(tmp, arr_0=images, arr_1=labels)
        os.replace(tmp, os.path.join(out, "samples.npz"))
        if vae is not None and all(os.path.exists(codes_of(b)) for b in batches):  # none for KL, or images of an older sample.py
            atomic_write_npy(os.path.join(out, "codes.npy"), np.concatenate([np.load(codes_of(b)) for b in batches]))
        if text:
            atomic_write_text(os.path.join(out, "prompts.txt"), "\n".join(prompts) + "\n")
        if controls is not None:  # what each image was asked to follow (evaluate.py: control fidelity)
            tmp = os.path.join(out, "controls.tmp.npz")
            np.savez(tmp, arr_0=controls.transpose(0, 2, 3, 1), arr_1=labels)
            os.replace(tmp, os.path.join(out, "controls.npz"))
        grid = make_grid(images[:100], ncol=min(10, model.num_classes or 10) if args.class_label is None else 10)
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(os.path.join(out, "grid.png"))
        print(f"{args.num_samples} samples -> {out}")


if __name__ == "__main__":
    run_main(main)
