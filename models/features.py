"""
Feature extraction for evaluate.py, streamed and cached on disk.

Image sources yield uint8 NHWC batches without ever holding a whole set: arrays and memory-mapped
.npz members (np.savez stores members uncompressed, so `arr_0` maps straight from the file; a
compressed member is read sequentially), and image files decoded by DataLoader workers.

Feature networks map such a batch to named float32 outputs ("kinds"):
    feat     the feature space of FID / precision-recall / k-NN metrics
    logits   log-probabilities for IS (generated images only)
    spatial  sFID's features: ADM takes Inception's `mixed_6/conv` output (17 x 17 x 192, NHWC),
             keeps the first 7 channels and flattens in H, W, C order (2 023 dims)

Cache layout (reference and training sets), one folder per (dataset, network):
    <cache-dir>/features/<dataset name>-<sha1 of its identity>/<network name>-<sha1 of its weights>/
        feat.npy          float16 (N, D), read back as a memmap, in chunks
        stats_<kind>.npz  GaussianStats in float64, accumulated from the float32 outputs (FID / sFID
                          mean and covariance; per-class sums and scatter of the training set: RMD)
        meta.json         written last: the cache is complete iff meta.json exists
Every file is written to a temporary name and renamed, so a killed run never leaves a file that
reads as complete. A different network (other weights, other preprocessing) gets another folder.
"""
import hashlib
import json
import os
import struct
import time
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.common import UsageError, atomic_write_json
from models.data import center_crop_arr
from models.metrics import GaussianStats

def default_cache_dir():
    """evaluate.py's classifier and feature cache, shared by all runs of all out-dirs."""
    return os.environ.get("SLIGHT_CORRUPTION_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "slight-corruption")


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SFID_CHANNELS = 7  # ADM: mixed_6/conv[..., :7]


# ---------------------------------------------------------------------------------- image sources
class FileImages(torch.utils.data.Dataset):
    """Image files -> uint8 HWC tensors: ADM's centre crop to image_size (RGB), or as stored."""

    def __init__(self, paths, image_size=None):
        self.paths, self.image_size = list(paths), image_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            arr = center_crop_arr(img.convert("RGB"), self.image_size) if self.image_size else np.asarray(img)
        return torch.from_numpy(np.ascontiguousarray(arr if arr.ndim == 3 else arr[..., None]))


class NpzStream:
    """A compressed .npz member read front to back in batches (no random access needed)."""

    def __init__(self, path, key):
        self.path, self.key = path, key
        with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
            self.shape, self.dtype = _npy_header(f)[:2]

    def __len__(self):
        return self.shape[0]

    def batches(self, batch_size):
        row = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as zf, zf.open(self.key + ".npy") as f:
            _npy_header(f)
            for s in range(0, len(self), batch_size):
                n = min(batch_size, len(self) - s)
                yield torch.from_numpy(np.frombuffer(f.read(n * row), self.dtype).reshape(n, *self.shape[1:]).copy())


def _npy_header(f):
    version = np.lib.format.read_magic(f)
    shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
    if fortran:
        raise UsageError("Fortran-ordered arrays in .npz files are not supported")
    return shape, dtype, f.tell()


def npz_member(path, key):
    """Member `key` of an .npz without loading it: a read-only memmap when stored uncompressed
    (np.savez), else an NpzStream. None when absent."""
    with zipfile.ZipFile(path) as zf:
        if key + ".npy" not in zf.namelist():
            return None
        info = zf.getinfo(key + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return NpzStream(path, key)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])  # the local file header
        f.seek(info.header_offset + 30 + name_len + extra_len)
        shape, dtype, _ = _npy_header(f)
        offset = f.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def folder_files(folder):
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS) and f != "grid.png")
    if not files:
        raise UsageError(f"no images in {folder}")
    return [os.path.join(folder, f) for f in files]


def dataset_images(ds):
    """A models.data dataset as an image source: its uint8 tensor (Fashion-MNIST) or its files."""
    if hasattr(ds, "images"):
        return ds.images.permute(0, 2, 3, 1).numpy()
    if hasattr(ds, "paths"):
        return FileImages(ds.paths, ds.image_size)
    raise UsageError(f"cannot stream the images of a {type(ds).__name__}")


def image_batches(source, batch_size, num_workers):
    """uint8 NHWC torch batches of a source, in order."""
    if isinstance(source, NpzStream):
        return source.batches(batch_size)
    if isinstance(source, FileImages):
        return torch.utils.data.DataLoader(source, batch_size=batch_size, num_workers=num_workers)
    return (torch.from_numpy(np.array(source[s:s + batch_size])) for s in range(0, len(source), batch_size))  # a copy: memmaps are read-only


# ------------------------------------------------------------------------------------- identities
def source_identity(source):
    """What makes a set of images this set: file paths, sizes and mtimes (and the crop size), the
    bytes of an in-memory array, or the .npz file (path, size, mtime)."""
    h = hashlib.sha1()
    if isinstance(source, FileImages):
        h.update(f"crop={source.image_size}".encode())
        for p in source.paths:
            st = os.stat(p)
            h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    elif isinstance(source, (NpzStream, np.memmap)):
        path = os.path.abspath(source.path if isinstance(source, NpzStream) else source.filename)
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{source.shape}".encode())
    else:
        h.update(str(source.shape).encode())
        h.update(np.ascontiguousarray(source).data)
    return h.hexdigest()


def module_digest(module, extra=""):
    """sha1 of a network's weights (every state_dict tensor, in order) and of `extra` (preprocessing)."""
    h = hashlib.sha1(extra.encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------------- feature networks
def spatial_features(fmap, channels=SFID_CHANNELS):
    """(N, C, H, W) feature map -> (N, H·W·channels): the first `channels` channels, flattened in
    H, W, C order (ADM flattens the NHWC TensorFlow tensor [..., :7])."""
    return fmap[:, :channels].permute(0, 2, 3, 1).reshape(len(fmap), -1)


class FmnistNet:
    """The Fashion-MNIST classifier (models/classifier.py): feat = its 128-d penultimate layer;
    spatial = its last feature map (conv3 after ReLU, 64 x 8 x 8), first 7 channels, HWC order
    (448 dims): an sFID analogue, reported as sfid_fmnist."""
    name = "fmnist"

    def __init__(self, model):
        self.model = model.eval()
        self.digest = module_digest(model)

    @torch.no_grad()
    def __call__(self, x):
        m = self.model
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
        h = F.max_pool2d(F.relu(m.conv1(x)), 2)
        h = F.max_pool2d(F.relu(m.conv2(h)), 2)
        fmap = F.relu(m.conv3(h))
        feat = F.relu(m.fc(F.max_pool2d(fmap, 2).flatten(1)))  # = model.features(x)
        return {"feat": feat, "logits": torch.log_softmax(m.head(feat).double(), 1).float(), "spatial": spatial_features(fmap)}


class AutoencoderNet:
    """The label-free Fashion-MNIST encoder (models/autoencoder.py): feat = its 128-d bottleneck,
    which keeps the within-class variation the classifier's features discard (the *_ae metrics)."""
    name = "ae"

    def __init__(self, encoder):
        self.encoder = encoder.eval()
        self.digest = module_digest(encoder)

    @torch.no_grad()
    def __call__(self, x):
        return {"feat": self.encoder(x.permute(0, 3, 1, 2).float() / 127.5 - 1)}


def inception_input(x):
    """What the StyleGAN2-ADA TorchScript does before its layers: TF-compatible bilinear resize to
    299 x 299 (affine_grid with the half-pixel offset, border padding), then (x − 128) / 128."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
    grid = F.affine_grid(theta.unsqueeze(0).repeat(n, 1, 1), [n, c, 299, 299], align_corners=False)
    return (F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False) - 128) / 128


def inception_pool_and_spatial(net, x):
    """Run the TorchScript Inception's `layers` block by block (TorchScript modules take no forward
    hooks): the output of layers.mixed_6.conv (TF name mixed_6/conv) and the final pool3 features."""
    h = inception_input(x)
    spatial = None
    for name, block in net.layers.named_children():
        if name == "mixed_6":
            spatial = block.conv(h)
        h = block(h)
    return h.reshape(len(h), -1), spatial


class InceptionNet:
    """clean-fid's / StyleGAN2-ADA's Inception-v3 (inception-2015-12-05.pt): feat = pool3 (2048),
    logits = log softmax without the output bias (IS), spatial = mixed_6/conv[..., :7] (sFID).
    The spatial path re-runs the network's blocks after our copy of its input resize; every batch
    checks that this path reproduces the network's own pool3 features, else sFID is dropped with a
    note (a network without a `layers.mixed_6.conv` block has no sFID either)."""
    name = "inception"

    def __init__(self, path, device):
        self.net = torch.jit.load(path, map_location=device).eval()
        self.device = device
        self.digest = module_digest(self.net)
        children = dict(self.net.layers.named_children()) if hasattr(self.net, "layers") else {}
        self.note = None if "mixed_6" in children and hasattr(children["mixed_6"], "conv") else \
            "sFID skipped: the Inception network has no layers.mixed_6.conv block"

    @torch.no_grad()
    def __call__(self, x):
        x = x.permute(0, 3, 1, 2).float().to(self.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        feat = self.net(x, return_features=True)
        out = {"feat": feat.float().cpu(), "logits": self.net(x, no_output_bias=True).double().clamp_min(1e-30).log().float().cpu()}
        if self.note is None:
            pool, fmap = inception_pool_and_spatial(self.net, x)
            if fmap is None or pool.shape != feat.shape or not torch.allclose(pool, feat, rtol=1e-3, atol=1e-3):
                self.note = "sFID skipped: running the Inception blocks one by one does not reproduce its pool3 features"
            else:
                out["spatial"] = spatial_features(fmap).float().cpu()
        return out


DINOV2 = "vit_large_patch14_dinov2.lvd142m"  # timm's name of DINOv2 ViT-L/14 (Oquab et al. 2023), FD-DINOv2's network
DINOV2_SIZE = 224  # dgm-eval's input size (the network was trained up to 518)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def dinov2_input(x, size=DINOV2_SIZE):
    """uint8 NHWC -> DINOv2's input as Stein et al.'s dgm-eval makes it (dgm_eval/models/dinov2.py:
    torchvision Resize((224, 224), bicubic) on the PIL image, ToTensor, Normalize(ImageNet mean, std)):
    each image as RGB (grey replicated, as its loaders' convert('RGB')), PIL's bicubic resize of the
    uint8 image, / 255, ImageNet mean / std. On square images this is timm's own eval transform at that
    size (Resize of the shorter side + CenterCrop, crop_pct 1.0; tests/test_dinov2.py); a non-square
    image dgm-eval squeezes and timm crops: we follow dgm-eval."""
    rgb = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB") for a in x.numpy()]
    t = torch.from_numpy(np.stack([np.asarray(im.resize((size, size), Image.BICUBIC)) for im in rgb])).permute(0, 3, 1, 2).float() / 255
    return (t - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def load_dinov2(spec, size=DINOV2_SIZE):
    """timm's DINOv2 ViT for size x size inputs (timm resamples the 37 x 37 position embedding of the
    518-pixel checkpoint once, antialiased bicubic; the torch.hub model dgm-eval loads interpolates it at
    run time, so features agree closely, not bit for bit). spec: a timm model name with pretrained
    weights (downloaded by timm, or from the Hugging Face cache offline), or a folder in timm's hub
    layout: config.json naming the "architecture" (+ optional "model_args") and model.safetensors or
    pytorch_model.bin (e.g. the files of hf.co/timm/vit_large_patch14_dinov2.lvd142m)."""
    try:
        import timm
    except ImportError:
        raise UsageError("--features dinov2 needs timm (pip install -r requirements.txt)")
    name, kw = spec, {}
    if os.path.exists(spec):
        config = os.path.join(spec, "config.json")
        weights = [os.path.join(spec, w) for w in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(os.path.join(spec, w))]
        if not os.path.isfile(config) or not weights:
            raise UsageError(f"--dinov2 {spec}: expected a folder with config.json and model.safetensors (or pytorch_model.bin)")
        with open(config) as f:
            config = json.load(f)
        if "architecture" not in config:
            raise UsageError(f"--dinov2 {spec}: config.json names no \"architecture\"")
        name, kw = config["architecture"], dict(config.get("model_args") or {}, pretrained_cfg_overlay={"file": weights[0]})
    try:
        model = timm.create_model(name, pretrained=True, **{**kw, "img_size": size, "num_classes": 0})
    except Exception as e:  # noqa: BLE001  (offline, unknown name, weights of another shape)
        raise UsageError(f"cannot load DINOv2 weights {spec} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "offline, pass --dinov2 FOLDER (timm's hub files) or use --features fmnist")
    if getattr(model, "global_pool", None) != "token":
        raise UsageError(f"--dinov2 {spec}: the feature is the CLS token; this model pools '{getattr(model, 'global_pool', None)}'")
    return model.eval()


class DinoNet:
    """DINOv2 features for FD-DINOv2 (Stein et al., NeurIPS 2023, "Exposing flaws of generative model
    evaluation metrics"; EDM2 reports it): feat = the CLS token after the final norm (1024-d for ViT-L),
    what dgm-eval takes (the hub model's forward with an identity head); input as `dinov2_input`.
    Its Fréchet distance is reported as fd_dinov2, the field's name, beside the other metrics (_dinov2)."""
    name = "dinov2"
    frechet = "fd"

    def __init__(self, spec, device, size=DINOV2_SIZE):
        self.model, self.device, self.size = load_dinov2(spec, size).to(device), device, size
        self.digest = module_digest(self.model, f"dgm-eval: PIL bicubic {size}, ImageNet mean/std, CLS token")

    @torch.no_grad()
    def __call__(self, x):
        tokens = self.model.forward_features(dinov2_input(x, self.size).to(self.device))
        return {"feat": self.model.forward_head(tokens, pre_logits=True).float().cpu()}


class ClipNet:
    """CLIP image embeddings, L2-normalised (the paper's space for RMD / top-5 L2 / memorisation;
    with --features clip also for FID and the rest, suffix _clip). The image processor (resize,
    centre crop, normalisation) runs on whole uint8 batches."""
    name = "clip"

    def __init__(self, spec, device):
        try:
            from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()  # stderr stays for errors
            self.model = CLIPModel.from_pretrained(spec).to(device).eval()
            self.processor = CLIPImageProcessor.from_pretrained(spec)
            self.tokenizer = CLIPTokenizer.from_pretrained(spec)
        except Exception as e:  # noqa: BLE001  (offline, missing folder, not a CLIP model)
            raise UsageError(f"cannot load a CLIP model from {spec}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        self.device = device
        self.digest = module_digest(self.model, json.dumps(self.processor.to_dict(), sort_keys=True, default=str))

    @torch.no_grad()
    def __call__(self, x):
        x = x.permute(0, 3, 1, 2)
        pixels = self.processor(images=x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x, return_tensors="pt")["pixel_values"]
        emb = self.model.visual_projection(self.model.vision_model(pixel_values=pixels.to(self.device)).pooler_output)
        return {"feat": F.normalize(emb.double(), dim=1).float().cpu()}

    @torch.no_grad()
    def text_features(self, texts, batch_size=100):
        """Captions -> L2-normalised CLIP text embeddings (float64), 77-token truncation."""
        out = []
        for s in range(0, len(texts), batch_size):
            tok = self.tokenizer(texts[s:s + batch_size], padding=True, truncation=True, return_tensors="pt",
                                 max_length=min(77, self.model.config.text_config.max_position_embeddings)).to(self.device)
            pooled = self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
            out.append(F.normalize(self.model.text_projection(pooled).double(), dim=1).cpu())
        return torch.cat(out).numpy()


# ---------------------------------------------------------------------------- extraction and cache
@torch.no_grad()
def extract(net, source, keep=("feat",), stats=("feat",), labels=None, folder=None, batch_size=100, num_workers=0, desc=None):
    """Stream `source` through `net` once. keep: kinds returned as (N, D) arrays, float16 .npy files
    in `folder` under temporary names (see `cached`) or float32 in memory when folder is None;
    stats: kinds whose GaussianStats (float64, from the float32 outputs) are accumulated, with
    per-class sums when `labels` are given. Returns ({kind: array}, {kind: GaussianStats})."""
    from tqdm import tqdm
    n, arrays, gauss, start = len(source), {}, {}, 0
    num_classes = int(np.max(labels)) + 1 if labels is not None and len(labels) else 0
    for x in tqdm(image_batches(source, batch_size, num_workers), total=-(-n // batch_size), desc=desc, disable=None, leave=False):
        out = net(x)
        for kind in (k for k in keep if k in out):
            if kind not in arrays:
                shape = (n, out[kind].shape[1])
                arrays[kind] = np.empty(shape, np.float32) if folder is None else \
                    np.lib.format.open_memmap(os.path.join(folder, f".tmp-{os.getpid()}-{kind}.npy"), "w+", np.float16, shape)
            arrays[kind][start:start + len(x)] = out[kind].numpy()
        for kind in stats:
            if kind in out:
                gauss.setdefault(kind, GaussianStats(out[kind].shape[1], num_classes))
                gauss[kind].update(out[kind], None if labels is None else labels[start:start + len(x)])
        start += len(x)
    if start != n:
        raise UsageError(f"expected {n} images, read {start}")
    return arrays, {k: g for k, g in gauss.items() if g.n == n}  # a kind the network dropped midway is no statistic


def cached(net, source, root, name, keep=("feat",), stats=("feat",), labels=None, log=print, **kw):
    """`extract` with an on-disk cache under root/features/ (layout in the module docstring).
    Returns ({kind: float16 memmap}, {kind: GaussianStats}, info) with info = {"cache": "hit" or
    "miss", "seconds": time spent getting the features}."""
    t0 = time.perf_counter()
    folder = os.path.join(root, "features", f"{name}-{source_identity(source)[:16]}", f"{net.name}-{net.digest[:16]}")
    meta_path = os.path.join(folder, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta["num_images"] == len(source) and set(keep) <= set(meta["keep"]) and set(stats) <= set(meta["requested_stats"]):
            arrays = {k: np.load(os.path.join(folder, f"{k}.npy"), mmap_mode="r") for k in keep}
            gauss = {}
            for k in meta["stats"]:
                with np.load(os.path.join(folder, f"stats_{k}.npz")) as s:
                    gauss[k] = GaussianStats.from_state(s)
            return arrays, gauss, {"cache": "hit", "seconds": time.perf_counter() - t0, "folder": folder}
        os.remove(meta_path)  # incomplete for this request: invalidate, then rebuild
    os.makedirs(folder, exist_ok=True)
    log(f"extracting {net.name} features of {len(source)} images ({name}) -> {folder}")
    arrays, gauss = extract(net, source, keep, stats, labels, folder, **kw)
    for kind, arr in arrays.items():
        arr.flush()
        tmp = arr.filename
        del arr
        os.replace(tmp, os.path.join(folder, f"{kind}.npy"))
    for kind, g in gauss.items():
        tmp = os.path.join(folder, f".tmp-{os.getpid()}-stats_{kind}.npz")
        np.savez(tmp, **g.state())
        os.replace(tmp, os.path.join(folder, f"stats_{kind}.npz"))
    atomic_write_json(meta_path, {"num_images": len(source), "keep": list(keep), "requested_stats": list(stats),
                                  "stats": list(gauss), "network": net.name, "network_digest": net.digest, "dataset": name})
    arrays = {k: np.load(os.path.join(folder, f"{k}.npy"), mmap_mode="r") for k in keep}
    return arrays, gauss, {"cache": "miss", "seconds": time.perf_counter() - t0, "folder": folder}
