"""
Stage 2b: adapt a pre-trained run to a downstream task (Chen et al. 2024, Sec. 2.3 / Table 2: the
IN-1K and CC3M LDMs adapted with ControlNet and T2I-Adapter to Canny / SAM control on IN-100).

    python finetune.py --init out/demo --method controlnet --control canny        # embedded default
    python finetune.py --init out/demo --method full --classes classes.txt          # a new class set
    torchrun --standalone --nproc_per_node=8 finetune.py --init out/ldm4-in1k/ckpt/last.pt \\
        --method controlnet --control canny --dataset imagefolder --data-path /data/imagenet/train \\
        --classes in100.txt --image-size 256 --vae <the run's VQ-f4> --cep              # see README

--method controlnet | t2i-adapter: the pre-trained model is frozen and only the adapter trains
(models/adapters.py; at step 0 the output equals the pre-trained model's). --method full: every
weight trains; when the downstream classes differ (--classes), the class table is resized.
--method lcm: latent consistency distillation (Luo et al. 2023) of the pre-trained model (the
frozen teacher, guided by classifier-free guidance at a random w in [--w-min, --w-max]) into a
student that starts as its copy plus a zero-initialised guidance embedding; it samples in 1-8
steps with `sample.py --sampler lcm`. The maths is models/diffusion.py's consistency_* functions.
--control canny: OpenCV's Canny (models/controls.py, thresholds 100/200 as the paper) of each image,
computed once per split and cached under <out-dir>/data/<key>/ (or ahead of time by
corrupt_data.py --control canny); --control seg: segmentation colour
maps (SAM's output) from --control-path, a folder that mirrors the image folder. Downstream data:
--dataset / --data-path (default the init run's), Fashion-MNIST's held-out test split for the
embedded default, and --classes FILE for a subset (IN-100 is a class list over IN-1K).

The training loop is train.py's, unchanged: DDP, precision, EMA, CEP and the paper's other flags,
--resume, logs and checkpoints. This file supplies the data, the model and the held-out control set:
--val-size examples of the downstream set are kept out of training, and their control maps
(<run>/controls/<label>/<index>.png + control.json) and images (<run>/controls/reference.npz) are
written for `sample.py --control <run>/controls` and `evaluate.py --ref <run>/controls/reference.npz`.
"""
import copy
import hashlib
import os
import shutil
import tempfile

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import train
from models.adapters import METHODS, Adapted, resize_class_table
from models.build import FINETUNE_RECIPES, apply_recipe, build_model, model_from_checkpoint, recipe_table
from models.common import UMASK, UsageError, atomic_write_json, end_distributed, run_main, setup_distributed, update_ema
from models.controls import ControlData, control_cache_path, control_maps, image_uint8
from models.data import LatentDataset, SubsetData, dataset_key, latent_dir, load_dataset, read_class_list
from models.diffusion import DEFAULT_DIFFUSION, classifier_free_guidance, skipping_timesteps
from models.dit import config_from_state_dict
from models.runs import launch_ranks
from models.from_diffusers import checkpoint_from_diffusers_pipeline, is_diffusers_pipeline

CONTROLS = ("canny", "seg")
LCM_LOSSES = ("huber", "l2")
LCM_GUIDANCE_DIM = 256  # width of the guidance weight's Fourier features (diffusers' LCM: time_cond_proj_dim 256)
LCM_FLAGS = ("w_min", "w_max", "lcm_skip", "lcm_target_ema", "lcm_loss", "lcm_huber_c", "lcm_loss_weight", "lcm_guided_warmup")
# the architecture comes from --init: these flags must agree with it (or be left out)
ARCHITECTURE = ("model", "learn_sigma", "class_cond", "text_encoder", "text_mode", "caption_length", "schedule", "beta_start", "beta_end")


def get_parser():
    p = train.get_parser()
    p.description = "Adapt a pre-trained run: ControlNet, T2I-Adapter, full fine-tuning or consistency distillation (with CEP, corruption, ...)."
    a = p.add_argument_group("adaptation").add_argument
    a("--init", default=None, help="the pre-trained run (<out-dir>/<run>: its ckpt/last.pt) or a checkpoint file")
    a("--method", default="controlnet", choices=(*METHODS, "full", "lcm"))
    a("--control", default=None, choices=CONTROLS, help="controlnet / t2i-adapter: Canny edges or segmentation maps")
    a("--control-path", default=None, help="--control seg: folder of segmentation maps mirroring the image folder")
    a("--canny-low", type=float, default=100.0, help="Canny hysteresis thresholds (OpenCV's, on 0-255 images)")
    a("--canny-high", type=float, default=200.0)
    a("--split", default=None, choices=("train", "test"), help="fashion-mnist: which split to adapt on (default test, held out from pre-training)")
    a("--classes", default=None, help="class-list file (folder names, class names or ids): adapt on these classes only")
    a("--val-size", type=int, default=None, help="downstream examples held out for sampling with controls and evaluation "
      "(default 500; 0 for --method lcm)")
    a("--adapter-blocks", type=int, default=None, help="DiT: blocks the ControlNet copies (default half) / the adapter feeds (default 4)")
    c = p.add_argument_group("consistency distillation (--method lcm)").add_argument
    c("--w-min", type=float, default=None, help="guidance weights w are drawn from U[w_min, w_max]; scale = 1 + w (LCM's ω)")
    c("--w-max", type=float, default=None)
    c("--lcm-skip", type=int, default=None, help="skipping step k: the teacher's DDIM step goes from t_{n+k} to t_n (LCM: 20)")
    c("--lcm-target-ema", type=float, default=None, help="target network = EMA of the student at this decay (0: the student itself; LCM: 0.95)")
    c("--lcm-loss", default=None, choices=LCM_LOSSES, help="distance between online and target outputs (LCM: huber)")
    c("--lcm-huber-c", type=float, default=None, help="Huber constant c: sqrt(d² + c²) - c (LCM: 0.001)")
    c("--lcm-loss-weight", default=None, choices=("uniform", "ict"), help="weight of each grid point's loss: uniform (LCM's) or "
      "iCT's 1 / (σ(t_{n+k}) - σ(t_n)), σ = √((1-ᾱ)/ᾱ), which keeps the top of a linear schedule from ruling the loss")
    c("--lcm-guided-warmup", type=int, default=None, help="first steps regress the student's ε on the guided teacher's at any t "
      "(guidance distillation, Meng et al. 2023) before consistency distillation (LCM: 0)")
    # the optimisation defaults are --method's recipe (models/build.py FINETUNE_RECIPES); the
    # architecture and the diffusion schedule are the pre-trained run's
    p.set_defaults(model=None, dataset=None, class_cond=None, text_encoder=None, text_mode=None, caption_length=None)
    p.epilog = recipe_table(FINETUNE_RECIPES, "defaults (tiny: UNet-T, UNet-S, DiT-T/*; stock: the other models' controlnet /"
                                              " t2i-adapter; stock-full: their --method full), overridden by any flag given:")
    return p


def load_init(path):
    """The pre-trained checkpoint --init names -> (checkpoint dict, its model_config, its run config).
    A diffusers Stable Diffusion pipeline (folder or hub id) is read as such a checkpoint."""
    if is_diffusers_pipeline(path):
        try:
            ckpt = checkpoint_from_diffusers_pipeline(path)
        except (ValueError, OSError) as e:
            raise UsageError(f"--init {path}: {str(e).splitlines()[0]}")
        return ckpt, ckpt["model_config"], ckpt["config"]
    ckpt_path = os.path.join(path, "ckpt", "last.pt") if os.path.isdir(path) else path
    if not os.path.isfile(ckpt_path):
        raise UsageError(f"--init {path}: no checkpoint (expected a run folder with ckpt/last.pt or a .pt file)")
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        model_from_checkpoint(ckpt)  # readable as a model of this repo, or an official DiT state dict
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--init {ckpt_path} is not a checkpoint of train.py or DiT ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if "model_config" not in ckpt:  # an official DiT state dict
        ckpt = {"ema": ckpt, "model_config": config_from_state_dict(ckpt), "config": {}}
    if "adapter" in ckpt["model_config"]:
        raise UsageError(f"--init {ckpt_path} is already an adapted model ({ckpt['model_config']['adapter']['method']}); adapt its pre-trained run")
    return ckpt, ckpt["model_config"], ckpt.get("config") or {}


class Finetune:
    """What finetune.py changes in train.train: the data, the model and the held-out control set."""

    def __init__(self, args):
        self.teacher = self.target = None
        if args.init is None:
            raise UsageError("pass --init, the pre-trained run (<out-dir>/<run>) or checkpoint to adapt")
        self.ckpt, self.init_config, init_run = load_init(args.init)
        self.diffusion = {**DEFAULT_DIFFUSION, **self.ckpt.get("diffusion", {})}  # older checkpoints: DDPM linear
        self.inherit_architecture(args, init_run)
        self.default_data(args, init_run)
        self.check_method_flags(args)
        self.choose_split(args)
        if args.run is None:
            tag = f"{args.method}-{args.control}" if args.control else args.method
            name = train.default_run_name(args).replace(f"{args.model.replace('/', '-')}_", "", 1)
            args.run = f"{os.path.basename(os.path.normpath(args.init)).removesuffix('.pt')}_ft-{tag}_{name}"

    def inherit_architecture(self, args, init_run):
        """The architecture and diffusion are the pre-trained run's: a flag that names another is refused."""
        saved = {**init_run, **{k: v for k, v in self.diffusion.items() if k in ARCHITECTURE},
                 "model": self.init_config["name"], "learn_sigma": self.init_config.get("learn_sigma", True)}
        for name in ARCHITECTURE:
            given, pretrained = getattr(args, name), saved.get(name)
            if given is not None and pretrained is not None and given != pretrained:
                raise UsageError(f"--init {args.init} holds a model with --{name.replace('_', '-')} {pretrained}, not {given}")
            setattr(args, name, given if given is not None else pretrained)
        train_defaults = train.get_parser().parse_args([])
        for name in ARCHITECTURE:  # an official DiT checkpoint has no run config: train.py's defaults
            if getattr(args, name) is None:
                setattr(args, name, getattr(train_defaults, name))

    def default_data(self, args, init_run):
        """The data default to the pre-training data (a pipeline has none: --dataset is then needed)."""
        if args.dataset is None:
            if "pipeline" in init_run:
                raise UsageError(f"--init {args.init} is a pipeline without training data: pass --dataset and --data-path "
                                 "(their latents pre-extracted by corrupt_data.py --vae <pipeline>/vae)")
            args.dataset = init_run.get("dataset", "fashion-mnist")
            args.data_path = args.data_path or init_run.get("data_path")
        args.image_size = args.image_size or init_run.get("image_size")  # the model's input space, whatever the data
        args.vae = args.vae or init_run.get("vae")

    def check_method_flags(self, args):
        """Each --method's own flags: controls for the adapters, the LCM flags for distillation only."""
        if args.method in ("full", "lcm") and args.control:
            raise UsageError(f"--method {args.method} has no control input; --control is for controlnet / t2i-adapter")
        if args.method == "lcm":
            self.check_distillation(args)
        elif any(getattr(args, name) is not None for name in LCM_FLAGS):
            raise UsageError(f"--{next(n for n in LCM_FLAGS if getattr(args, n) is not None).replace('_', '-')} is for --method lcm")
        if args.method not in ("full", "lcm") and args.control is None:
            raise UsageError(f"--method {args.method} needs --control ({' or '.join(CONTROLS)})")
        if args.control == "seg" and not args.control_path:
            raise UsageError("--control seg needs --control-path, the folder of segmentation maps")
        args.val_size = (0 if args.method == "lcm" else 500) if args.val_size is None else args.val_size
        if args.val_size < 0 or (args.adapter_blocks is not None and args.adapter_blocks < 1):
            raise UsageError("--val-size must be >= 0 and --adapter-blocks >= 1")

    def choose_split(self, args):
        """Adaptation: Fashion-MNIST's held-out test split; distillation: the pre-training data."""
        fmnist = args.dataset.startswith("fashion-mnist")
        if args.split is not None and not fmnist:
            raise UsageError("--split is for fashion-mnist; for a folder dataset pass another --data-path")
        self.split = (args.split or ("train" if args.method == "lcm" else "test")) if fmnist else "train"
        args.split = self.split if fmnist else None

    def check_distillation(self, args):
        """--method lcm: the teacher must have a null condition (classifier-free guidance) and the flags a valid range."""
        if self.init_config.get("class_dropout", 0) <= 0:
            raise UsageError(f"--method lcm distils the teacher's classifier-free guidance; --init {args.init} was trained "
                             "without condition dropout (no null condition)")
        apply_recipe(args)  # --w-min, --w-max and the --lcm-* flags from --method lcm's recipe
        if not 0 <= args.w_min <= args.w_max:
            raise UsageError(f"--method lcm needs 0 <= --w-min <= --w-max, got {args.w_min:g}, {args.w_max:g}")
        if not 1 <= args.lcm_skip <= 1000 or not 0 <= args.lcm_target_ema < 1 or args.lcm_huber_c <= 0 or args.lcm_guided_warmup < 0:
            raise UsageError("--lcm-skip must be in [1, 1000], --lcm-target-ema in [0, 1), --lcm-huber-c > 0, --lcm-guided-warmup >= 0")

    def load_data(self, args):
        images = load_dataset(args.dataset, args.data_path, args.image_size, split=self.split,
                              download_root=os.path.join(args.out_dir, "data", "downloads"), skip_missing=args.skip_bad_files)
        key = dataset_key(args.dataset, images) + ("-test" if self.split == "test" else "")
        class_ids = read_class_list(args.classes, images.classes) if args.classes and images.labels is not None else None
        if args.classes and images.labels is None:
            raise UsageError("--classes needs a dataset with class labels")
        train_rows = self.hold_out(args, images, class_ids)
        self.relabel = class_ids if args.method == "full" else None
        data = LatentDataset(latent_dir(args.out_dir, key, args.vae, images.image_size), images) if args.vae else images
        dataset = SubsetData(data, train_rows, self.relabel)
        digest = hashlib.sha1(np.concatenate([train_rows, class_ids if self.relabel is not None else []]).astype(np.int64).tobytes()).hexdigest()[:8]
        self.maps = None
        if args.control:
            self.maps = self.control_maps(args, images, key)
            dataset = ControlData(dataset, self.maps, train_rows)
        return dataset, f"{key}-subset{digest}"  # corruption manifests of this subset live there

    def hold_out(self, args, images, class_ids):
        """--val-size examples (of --classes) held out for sampling with controls; returns the training rows."""
        self.images = images
        rows = np.arange(len(images)) if class_ids is None else np.flatnonzero(np.isin(images.labels, class_ids))
        if args.val_size >= len(rows):
            raise UsageError(f"--val-size {args.val_size} leaves no training examples of the {len(rows)}")
        held_out = np.zeros(len(rows), dtype=bool)
        held_out[np.random.default_rng(args.seed).choice(len(rows), args.val_size, replace=False)] = True
        self.val_rows = rows[held_out]
        return rows[~held_out]

    def control_maps(self, args, images, key):
        """The control map of every image of the split, cached: rank 0 computes the cache once, the others then map it."""
        cache = control_cache_path(args.out_dir, key, args.control, images.image_size, args.canny_low, args.canny_high, args.control_path)
        build = lambda: control_maps(args.control, images, cache, args.control_path, self.split,  # noqa: E731
                                     args.canny_low, args.canny_high, args.num_workers)
        first = not dist.is_initialized() or dist.get_rank() == 0
        maps = build() if first else None
        if dist.is_initialized():
            dist.barrier()
        return maps if first else build()

    def new_model(self, args, dataset, text):
        config = dict(self.init_config)
        base = model_from_checkpoint(self.ckpt).train()  # the pre-trained EMA weights
        self.check_fits(args, base, config, dataset, text)
        torch.manual_seed(args.seed)  # the same new weights on every rank
        if args.method == "lcm":
            return self.student(args, base, config)
        if args.method == "full":
            if not text and len(dataset.classes) != base.num_classes:
                resize_class_table(base, len(dataset.classes))
                config["num_classes"] = len(dataset.classes)
            return base, config
        if not text and len(dataset.classes) != base.num_classes:
            raise UsageError(f"--init knows {base.num_classes} classes, the data {len(dataset.classes)}: controls keep the "
                             "pre-trained classes (pick some with --classes), a new class set needs --method full")
        try:
            model = Adapted(base, args.method, args.control, self.maps.shape[1], self.images.image_size, args.adapter_blocks)
        except ValueError as e:
            raise UsageError(f"--method {args.method}: {e}")
        return model, {**config, "adapter": model.config}

    @staticmethod
    def check_fits(args, base, config, dataset, text):
        """The pre-trained model takes this data: the same kind of condition, input shape and null class."""
        if text != (config.get("num_classes", 1) == 0):
            raise UsageError(f"--init holds a {'text' if not config.get('num_classes', 1) else 'class'}-conditional model; "
                             f"{args.dataset} has {'captions' if text else 'class labels'}")
        if (base.in_channels, base.input_size) != (dataset.channels, dataset.image_size):
            raise UsageError(f"--init takes {base.in_channels}x{base.input_size}x{base.input_size} inputs; the data are "
                             f"{dataset.channels}x{dataset.image_size}x{dataset.image_size} (--vae / --image-size of the pre-training?)")
        if not text and args.class_dropout > 0 and base.y_embedder.embedding_table.num_embeddings == base.num_classes:
            raise UsageError("--init was trained without label dropout (no null class): pass --class-dropout 0")

    def student(self, args, base, config):
        """--method lcm: the student is the teacher plus a zero-initialised guidance embedding; the
        teacher is frozen, the target network an EMA copy of the student."""
        config["guidance_dim"] = LCM_GUIDANCE_DIM
        student = build_model(**config).train()
        missing, unexpected = student.load_state_dict(base.state_dict(), strict=False)
        assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
        self.teacher = base.eval().requires_grad_(False)
        self.target = copy.deepcopy(student).requires_grad_(False) if args.lcm_target_ema > 0 else None
        self.grid = torch.from_numpy(skipping_timesteps(self.diffusion["num_timesteps"], args.lcm_skip))
        return student, config

    # ---- what train.train calls for --method lcm (no-ops for the other methods) ---------------

    @property
    def distills(self):
        return self.teacher is not None

    def distillation_losses(self, args, step, net, x, noise, cond, extra, delta, g, B, share, diffusion):
        """One step of latent consistency distillation (LCM, Luo et al. 2023, Algorithm 1): t = t_{n+k}
        from the skipping grid and w ~ U[w_min, w_max], drawn for the global batch; the teacher sees the
        same (possibly corrupted) condition, its null condition for guidance, and no CEP δ, which only
        the online student gets (the paper's CEP acts on the model being trained). The first
        --lcm-guided-warmup steps distil the guidance alone, at t drawn from all T timesteps."""
        device = x.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
            self.target = self.target.to(device) if self.target is not None else None
        grid = self.grid.to(device)
        t = grid[torch.randint(0, len(grid), (B,), generator=g, device=device)][share]
        t_prev = (t - args.lcm_skip).clamp(min=0)  # the first grid point k - 1 steps to 0, where f(x, 0) = x
        w = (args.w_min + (args.w_max - args.w_min) * torch.rand(B, generator=g, device=device))[share]
        if len(cond) == 1:  # class labels: the null class
            null = self.teacher.num_classes
        else:  # captions: the empty caption
            tokens = self.teacher.tokenize([""] * len(t))
            null = (tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        teacher_fn = classifier_free_guidance(self.teacher, cond, null, 1 + w)  # ε(∅) + (1 + w)(ε(c) - ε(∅))
        student_fn = lambda xt, tt: net(xt, tt, *cond, cond_noise=delta, guidance=w, **extra)  # noqa: E731
        if step < args.lcm_guided_warmup:  # any t, not the grid's (drawn after it: the same draws as consistency steps)
            t_any = torch.randint(0, diffusion.num_timesteps, (B,), generator=g, device=device)[share]
            return diffusion.guidance_distillation_losses(student_fn, teacher_fn, x, t_any, noise)
        target = self.target if self.target is not None else net  # --lcm-target-ema 0: the student, no gradient
        weight = diffusion.consistency_weights(t, t_prev, args.lcm_skip) if args.lcm_loss_weight == "ict" else None
        return diffusion.consistency_distillation_losses(
            student_fn, teacher_fn, lambda xt, tt: target(xt, tt, *cond, guidance=w, **extra), x, t, t_prev, noise,
            args.lcm_loss, args.lcm_huber_c, weight)

    def after_step(self, args, model):
        if self.target is not None:  # θ⁻ <- μ θ⁻ + (1 - μ) θ (LCM Algorithm 1)
            update_ema(self.target, model, args.lcm_target_ema)

    def checkpoint_state(self):
        return {"lcm_target": self.target.state_dict()} if self.target is not None else {}

    def resume(self, ckpt):
        if self.target is not None:
            self.target.load_state_dict(ckpt["lcm_target"])

    def prepare(self, args, run_dir):
        """Rank 0, once every check has passed: the held-out controls and images, written to a
        temporary folder and renamed into place (kept as they are on --resume)."""
        out = os.path.join(run_dir, "controls")
        if os.path.isdir(out) or not len(self.val_rows):
            return
        tmp = tempfile.mkdtemp(dir=run_dir, prefix=".controls-")
        os.chmod(tmp, 0o777 & ~UMASK)  # mkdtemp makes 0700
        labels = self.images.labels[self.val_rows] if self.images.labels is not None else np.full(len(self.val_rows), -1)
        if self.relabel is not None:
            labels = np.searchsorted(self.relabel, labels)
        try:
            images = image_uint8(self.images, self.val_rows).permute(0, 2, 3, 1).numpy()
            np.savez(os.path.join(tmp, "reference.npz"), arr_0=images, arr_1=labels)
            if self.maps is not None:
                for row, label in zip(self.val_rows, labels):
                    os.makedirs(os.path.join(tmp, str(label)), exist_ok=True)
                    arr = np.asarray(self.maps[row]).transpose(1, 2, 0)
                    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(os.path.join(tmp, str(label), f"{row:06d}.png"))
            atomic_write_json(os.path.join(tmp, "control.json"), {
                "control": args.control, "canny": [args.canny_low, args.canny_high] if args.control == "canny" else None,
                "dataset": args.dataset, "split": self.split, "classes": args.classes, "rows": self.val_rows.tolist(),
                "captions": [self.images.captions[r] for r in self.val_rows] if getattr(self.images, "captions", None) else None})
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def main():
    parser = get_parser()
    args = parser.parse_args()
    if args.resume_from or (args.resume and args.run is not None):  # the run's config.json restores --init and the rest
        train.resolve_run(args, parser)
    stage = Finetune(args)
    train.check_args(args)
    if args.nproc_per_node > 1 and "RANK" not in os.environ:  # check here, then start the ranks with torchrun
        launch_ranks(args.nproc_per_node, lambda: train.check_only(args, parser, stage))
    rank, world, device = setup_distributed(args.device)
    try:
        train.train(args, parser, rank, world, device, stage)
        end_distributed(barrier=True)  # every rank done before any tears the group down
    finally:
        end_distributed()


if __name__ == "__main__":
    run_main(main)
