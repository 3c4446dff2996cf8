"""Shared test helpers: a tiny synthetic Fashion-MNIST in IDX format and script runners."""
import gzip
import json
import hashlib
import os
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def write_idx(path, array, magic_type=0x08):
    header = bytes([0, 0, magic_type, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_fake_fmnist(directory, n=256, num_classes=10, seed=0):
    """Class k is a bright horizontal bar at rows 2k..2k+3 plus a little noise: easy to learn."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    images = rng.integers(0, 30, size=(n, 28, 28))
    for i, k in enumerate(labels):
        images[i, 2 * k + 2: 2 * k + 6, 4:24] = 220
    os.makedirs(directory, exist_ok=True)
    for split, count in (("train", n), ("t10k", n // 4)):
        write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte.gz"), images[:count])
        write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte.gz"), labels[:count])
    return labels


def _script_command(script, args, nproc=1, env=None):
    if nproc == 1:
        cmd = [sys.executable, script, *map(str, args)]
    else:  # `--` keeps torchrun's own parser away from our flags (it rejects --run as ambiguous)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "--", script, *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    return cmd, full_env


def run_script(script, args, nproc=1, check=True, timeout=600, env=None):
    """Run a stage script as a user would: `python script ...`, or torchrun with nproc ranks."""
    cmd, full_env = _script_command(script, args, nproc, env)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# the tiny 2-rank run of the fault and operator tests (tests/test_faults.py, tests/test_operator.py)
TINY = ["--model", "DiT-T/8", "--global-batch-size", "16", "--lr", "1e-3", "--warmup-steps", "0", "--lr-decay", "none",
        "--cep", "--corrupt", "0.1"]
STEPS = ["--max-steps", "30", "--ckpt-every", "6", "--log-every", "3"]


def load_last(run_dir, name="last.pt"):
    return torch.load(os.path.join(run_dir, "ckpt", name), map_location="cpu", weights_only=True)


def same_state(a, b, where="checkpoint"):
    """Assert two nested checkpoint values (dicts, lists, tensors, numbers, RNG states) are equal, exactly."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (where, sorted(a), sorted(b))
        for k in a:
            same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, (where, a, b)


def assert_same_run(a_dir, b_dir):
    """Two runs ended in the same place: last.pt's model, EMA, optimizer, loss scaler, step and every
    rank's RNG state, bit for bit, and the same log (step, loss, grad norm)."""
    a, b = load_last(a_dir), load_last(b_dir)
    for part in ("step", "model", "ema", "opt", "scaler", "rng", "loss_acc"):
        same_state(a[part], b[part], part)
    strip = lambda d: [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, open(os.path.join(d, "log.jsonl")))]  # noqa: E731
    assert strip(a_dir) == strip(b_dir)


def worker_pids(parent):
    """{rank: pid} of torchrun's workers (children of `parent`)."""
    from models.runs import child_pids
    found = {}
    for pid in child_pids(parent):
        try:
            env = dict(kv.split("=", 1) for kv in open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = pid
    return found


def wait_for(path, proc, timeout=300):
    """Wait until a running script (a Popen) has written `path`, e.g. a checkpoint to kill it after."""
    deadline = time.time() + timeout
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert os.path.exists(path), f"{path} never appeared"


def run_scripts_at_once(calls, timeout=600):
    """[(script, args)] run side by side (one process each, unchecked), for the many short refusals of
    the bad-input tests: their cost is Python and torch start-up, which overlaps. The finished
    processes (CompletedProcess), in order."""
    started = []
    for script, args in calls:
        cmd, full_env = _script_command(script, args, env={"OMP_NUM_THREADS": "1"})
        started.append((cmd, subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env)))
    done = []
    for cmd, proc in started:
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return done


def tree_snapshot(root):
    """{relative path: sha1} of every file under root (to prove nothing was written)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha1(fh.read()).hexdigest()
    return out


def make_tiny_clip(folder, seed=0, max_positions=32):
    """A randomly initialised tiny CLIPModel (text + vision towers) with a byte-level BPE tokenizer
    of a few words and an image processor, saved like a hub folder, for offline tests."""
    import json

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    merges = ["p h", "ph o", "pho t", "phot o</w>", "o f</w>", "b a", "ba g</w>"]
    tokens = letters + [c + "</w>" for c in letters] + [m.replace(" ", "") for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")).save_pretrained(folder)
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=max_positions, bos_token_id=vocab["<|startoftext|>"],
                                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
                        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2), projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


def make_tiny_bert(folder):
    """A randomly initialised tiny BertModel (dropout 0.1, as bert-base) and its WordPiece vocabulary."""
    from transformers import BertConfig, BertModel
    folder = Path(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "##s", "shirt", "t", "-"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    model = BertModel(cfg).eval()
    model.save_pretrained(folder)
    return model, {w: i for i, w in enumerate(words)}


# ---- a stand-in for clean-fid's Inception TorchScript (inception-2015-12-05.pt), tiny and random

def tf_resize_299(img, offset: float):
    """The TorchScript Inception's own input path: TF-style bilinear resize to 299, then scaling."""
    n, c, h, w = img.shape
    theta = torch.eye(2, 3)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
    grid = F.affine_grid(theta.unsqueeze(0).repeat(n, 1, 1), [n, c, 299, 299], align_corners=False)
    x = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return (x - offset) / offset


def softmax_head(f, weight, bias, no_output_bias: bool):
    """The TorchScript Inception's output: softmax of pool3 · Wᵀ (+ b unless no_output_bias)."""
    logits = f @ weight.t()
    if not no_output_bias:
        logits = logits + bias
    return torch.softmax(logits, dim=1)


class Conv(torch.nn.Module):  # the converted network's blocks: conv (+ folded batch norm) + ReLU
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, k, stride, padding=k // 2 if stride == 1 else 0)

    def forward(self, x):
        return torch.relu(self.conv(x))


class Mixed(torch.nn.Module):  # an Inception block: its 1x1 branch `conv` and a 3x3 tower
    def __init__(self, cin: int):
        super().__init__()
        self.conv, self.tower = Conv(cin, 12, 1), Conv(cin, 4, 3)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x)], 1)


class Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = Conv(3, 8, 11, stride=75)  # 299 -> 4 x 4, so sFID has 4·4·7 = 112 dims
        self.mixed_6 = Mixed(8)
        self.conv_1 = Conv(16, 20, 1)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.conv_1(self.mixed_6(self.conv(x))))


class StandIn(torch.nn.Module):
    """clean-fid's inception-2015-12-05.pt signature and layout (layers.mixed_6.conv), tiny."""

    def __init__(self, offset: float = 128.0):
        super().__init__()
        self.layers, self.output, self.offset = Layers(), torch.nn.Linear(20, 30), offset

    def forward(self, img, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False):
        f = self.layers(tf_resize_299(img.float(), self.offset)).reshape(-1, 20)
        if return_features:
            return f
        return softmax_head(f, self.output.weight, self.output.bias, no_output_bias)


def save_stand_in_inception(path, seed=0):
    torch.manual_seed(seed)
    torch.jit.script(StandIn()).save(str(path))


SD15_DIFFUSERS_CONFIG = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json (the keys that shape it)
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)


def make_tiny_sd_pipeline(folder):
    """A diffusers-format Stable Diffusion folder with tiny random parts of SD 1.x's layout: unet/
    (UNet2DConditionModel, 16x16x4 latents), text_encoder/ + tokenizer/ (CLIP, width 32), vae/ (KL,
    2x down: 32 px images), scheduler/, model_index.json. Returns the diffusers U-Net."""
    import json

    import diffusers
    folder = Path(folder)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**dict(SD15_DIFFUSERS_CONFIG, sample_size=16, block_out_channels=[32, 64, 64, 64],
                                                 cross_attention_dim=32))
    with torch.no_grad():
        for p in unet.parameters():  # no zero-initialised layer left
            p.add_(0.02 * torch.randn_like(p))
    unet.save_pretrained(folder / "unet")
    make_tiny_clip(folder / "text_encoder")
    make_tiny_clip(folder / "tokenizer")
    diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                            latent_channels=4).save_pretrained(folder / "vae")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(
        _class_name="PNDMScheduler", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        num_train_timesteps=1000, prediction_type="epsilon")))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return unet


# ---- tiny released-pipeline stand-ins (sample.py --pretrained): diffusers' own classes, random weights

def redraw(module, std=0.05, seed=0):
    """Every parameter re-drawn from N(0, std²): no zero-initialised layer left (a real test of the mapping)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def tiny_unet(context_dim, seed=1):
    """A UNet2DConditionModel of LDM-4's kind (3-channel 8x8 latents, cross-attention on the second level)."""
    import diffusers
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                                          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                          up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2, cross_attention_dim=context_dim)
    redraw(unet, 0.05, seed)
    for name, module in unet.named_modules():  # a condition strong enough for guidance to show
        if name.endswith("attn2") or name == "conv_out":
            redraw(module, 0.6, seed)
    return unet


def tiny_vq(seed=2):
    """A VQModel of 16 px images, 8x8x3 latents, 256 codes spread over the range of the sampled latents
    divided by the config's scaling_factor (diffusers' default 0.18215)."""
    import diffusers
    torch.manual_seed(seed)
    vq = diffusers.VQModel(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                           layers_per_block=1, norm_num_groups=8, latent_channels=3, num_vq_embeddings=256, vq_embed_dim=3).eval()
    redraw(vq.quantize, 40.0, seed)
    return vq


def tiny_kl(latent_channels):
    """An AutoencoderKL of 16 px images (8x8 latents)."""
    import diffusers
    torch.manual_seed(5)
    return diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                   layers_per_block=1, norm_num_groups=8, latent_channels=latent_channels).eval()


def make_tiny_dit_pipeline(folder):
    """A DiTPipeline (DiTTransformer2DModel on 8x8x4 latents, 1000 classes + null, learned sigma; KL
    autoencoder of 16 px images; DDIM scheduler as facebook/DiT-XL-2-256's) saved into `folder`."""
    import diffusers
    torch.manual_seed(0)
    dit = redraw(diffusers.DiTTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
                                                 attention_head_dim=16, num_attention_heads=2, num_embeds_ada_norm=1000), 0.1)
    with torch.no_grad():  # one timestep / class embedder, shared by every block (as converted official checkpoints)
        for block in dit.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(dit.transformer_blocks[0].norm1.emb.state_dict())
    vae = tiny_kl(4)
    scheduler = diffusers.DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)
    pipe = diffusers.DiTPipeline(transformer=dit, vae=vae, scheduler=scheduler)
    pipe.save_pretrained(folder)
    return pipe


def make_tiny_ldm_class_pipeline(folder):
    """The authors' LDMClassToImagePipeline layout (their diffusers fork; see models/pretrained.py):
    unet/, vqvae/, class_embedder/ (a ClassEmbedder: CompVis' nn.Embedding of 10 classes + null,
    width 16), scheduler/ (CompVis' DDIM: scaled-linear 0.0015 -> 0.0195, steps_offset 1, ᾱ_0 at the
    end) and a hand-written model_index.json. Returns dict(unet, vqvae, embedding, scheduler)."""
    import json

    import diffusers
    from diffusers.configuration_utils import ConfigMixin, register_to_config

    class ClassEmbedder(diffusers.ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, embed_dim=16, n_classes=11, key="class"):
            super().__init__()
            self.embedding = torch.nn.Embedding(n_classes, embed_dim)

    folder = Path(folder)
    unet, vq = tiny_unet(16), tiny_vq()
    embedder = redraw(ClassEmbedder(16, 11), 1.0, seed=3)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, clip_sample=False,
                                        set_alpha_to_one=False, steps_offset=1)
    for name, part in (("unet", unet), ("vqvae", vq), ("class_embedder", embedder), ("scheduler", scheduler)):
        part.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "LDMClassToImagePipeline", "_diffusers_version": "0.21.0.dev0", "class_embedder": ["diffusers", "ClassEmbedder"],
        "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"], "vqvae": ["diffusers", "VQModel"]}))
    return dict(unet=unet, vqvae=vq, embedding=embedder.embedding, scheduler=scheduler)


def make_tiny_ldm_text_pipeline(folder, bert_class="LDMBertModel"):
    """An LDMTextToImagePipeline: LDMBert (width 32, 2 layers) or a transformers BertModel of that size
    (bert_class="BertModel", the CC3M releases' likely form) + BERT tokenizer, the tiny U-Net, a KL
    "vqvae" and the scheduler of CompVis/ldm-text2im-large-256 (DDIM, scaled-linear 0.00085 -> 0.012,
    steps_offset 1). The class pipeline tests the VQ decoder, whose quantisation would hide guidance here."""
    import diffusers
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from transformers import BertConfig, BertModel, BertTokenizer
    folder = Path(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "##s", "shirt"]
    (folder / "vocab").mkdir(parents=True, exist_ok=True)
    (folder / "vocab" / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(4)
    if bert_class == "BertModel":  # bert-base's layout, shrunk; 512 positions as bert-base-uncased
        bert = redraw(BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, max_position_embeddings=512)), 1.0, seed=4)
    else:
        bert = redraw(LDMBertModel(LDMBertConfig(vocab_size=len(words), max_position_embeddings=77, encoder_layers=2,
                                                 encoder_ffn_dim=64, encoder_attention_heads=2, head_dim=16, d_model=32)), 1.0, seed=4)
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                        set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.LDMTextToImagePipeline(vqvae=tiny_kl(3), bert=bert, tokenizer=BertTokenizer(str(folder / "vocab" / "vocab.txt")),
                                            unet=tiny_unet(32), scheduler=scheduler)
    pipe.save_pretrained(folder)
    return pipe


TINY_DINOV2 = ("vit_small_patch14_dinov2", {"embed_dim": 32, "depth": 2, "num_heads": 2})  # DINOv2's ViT, shrunk


def tiny_dinov2(folder):
    """A random DINOv2-family ViT at 224 pixels, saved as timm's hub files (config.json + model.safetensors)."""
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = timm.create_model(TINY_DINOV2[0], pretrained=False, img_size=224, **TINY_DINOV2[1]).eval()
    with torch.no_grad():  # DINOv2's LayerScale starts at 1e-5: at 1 the blocks, hence the CLS token, see the image
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(1.0)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": TINY_DINOV2[0], "model_args": TINY_DINOV2[1], "num_classes": 0}))
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    return model


# ---- references shared by the two halves of a test topic (test_dit.py / test_dit_text.py,
#      test_unet.py / test_unet_configs.py, test_corrupt.py / test_datasets.py)

def randomize_zero_init(model, seed=0, std=0.05):
    """Give the adaLN-Zero layers (modulations, final linear) random non-zero weights so the
    model's output depends non-trivially on x, t, y."""
    g = torch.Generator().manual_seed(seed)
    layers = [b.adaLN_modulation[-1] for b in model.blocks]
    layers += [model.final_layer.adaLN_modulation[-1], model.final_layer.linear]
    with torch.no_grad():
        for lin in layers:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * std)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * std)
    return model


def diffusers_unet(config, meta=False):
    """diffusers' UNet2DConditionModel with the architecture of our UNet(**config) in 'crossattn' or
    text mode: an independent implementation of the same network."""
    diffusers = pytest.importorskip("diffusers")
    mult, mc = config["channel_mult"], config["model_channels"]
    widths = tuple(m * mc for m in mult)
    attn = [2 ** level in config["attention_resolutions"] for level in range(len(mult))]
    if config.get("num_head_channels"):
        heads = tuple(w // config["num_head_channels"] for w in widths)
    else:
        heads = tuple(config.get("num_heads", 1) for _ in widths)
    out = config["in_channels"] * (2 if config.get("learn_sigma") else 1)
    kw = dict(sample_size=config["input_size"], in_channels=config["in_channels"], out_channels=out,
              down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
              up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
              block_out_channels=widths, layers_per_block=config["num_res_blocks"],
              cross_attention_dim=config["context_dim"], attention_head_dim=heads,  # (diffusers: = number of heads)
              transformer_layers_per_block=config.get("transformer_depth", 1),
              norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1)
    if meta:
        with torch.device("meta"):
            return diffusers.UNet2DConditionModel(**kw)
    return diffusers.UNet2DConditionModel(**kw)


def round_half_up(eta, n):
    """Independent reference for corrupt_count: round(η·n) with halves rounded up, in exact
    rational arithmetic on the decimal value of η as written (not on its binary float)."""
    x = Fraction(str(eta)) * n
    assert x >= 0
    return int(x + Fraction(1, 2))  # int() truncates toward 0, i.e. floor for x >= 0
