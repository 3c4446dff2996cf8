"""
Stage 4: score generated images, and compare evaluated runs.

    python evaluate.py --samples out/<run>/samples/<tag>           # writes <tag>/metrics.json, prints a table
    python evaluate.py --samples x.npz --ref VIRTUAL_imagenet256_labeled.npz --features inception --inception inception-2015-12-05.pt
    python evaluate.py --samples out/in1k/samples/<tag> --clip openai/clip-vit-base-patch16 --train-data /data/imagenet/train
    python evaluate.py --compare out                                # out/comparison.md + plots over η and guidance

Feature networks (--features)
- fmnist (offline default for the embedded dataset): a small CNN trained on the clean Fashion-MNIST
  training set (models/classifier.py). For the real training set its weights ship with the repository
  (models/weights/), so every machine scores with the same features: retrained, float rounding makes
  another network on another CPU or thread count (test accuracy 0.8924-0.8940), which moves
  memorisation and precision by ~0.02 on the same samples. Other training sets (a subset, the tests'
  fake data) train theirs once, cached in <cache-dir>/classifier/. Metrics carry the suffix _fmnist and
  are not comparable with Inception numbers. Its logits give IS and the condition accuracy.
  Beside it, label-free: the 128-d bottleneck of a convolutional autoencoder trained on the same images
  without labels (models/autoencoder.py, shipped and cached alike), which keeps the within-class variation the
  classifier discards: FID, precision / recall, density / coverage, their floor and the training-set metrics (_ae).
- inception: the StyleGAN2-ADA TorchScript Inception-v3 that clean-fid downloads
  (inception-2015-12-05.pt; --inception PATH): pool3 for FID / KID / precision-recall / TopP&R,
  softmax without output bias for IS, mixed_6/conv[..., :7] for sFID (as the ADM evaluator).
- clip: the --clip model's image embeddings for everything (suffix _clip).
- dinov2: FD-DINOv2 (Stein et al. 2023; EDM2 reports it), the Fréchet distance in DINOv2 ViT-L/14 features
  (timm's vit_large_patch14_dinov2.lvd142m, --dinov2 for another name or a local folder) as fd_dinov2, with
  dgm-eval's preprocessing (bicubic resize to 224, ImageNet mean / std) and its CLS token; the other
  metrics in that space carry the suffix _dinov2.
Against the reference set (--ref: the dataset's test split by default, a folder, or an .npz with
arr_0 uint8 NHWC images and/or ADM's precomputed mu / sigma / mu_s / sigma_s): FID, sFID, KID,
IS (10 splits), precision / recall (k = 3), density / coverage (k = 5), TopP&R precision / recall
/ F1. Against the training set (the run's, or --train-data): top-1 % RMD, mean top-5 L2 distance,
memorisation ratio (nearest training image closer than --mem-threshold on L2-normalised features;
0.12 is the paper's value for CLIP) and mean within-class distance; with --clip in CLIP space.
Runs on VQ latents (their --vae is a VQModel): vq_entropy, the entropy in bits of the codebook
indices the sampled latents were quantised to (codes.npy, recorded by sample.py; all images and
positions), with vq_perplexity = 2^H and vq_code_usage, the share of codes used. Folders of an older
sample.py have no codes.npy: their images are re-encoded instead, with a note (encode∘decode is not
the identity, so those codes differ).
Reference and training features are streamed by a DataLoader into a float16 cache under
<cache-dir>/features/ (models/features.py), so a second evaluation against the same sets only reads;
<cache-dir> is $SLIGHT_CORRUPTION_CACHE, else $XDG_CACHE_HOME/slight-corruption, else ~/.cache/slight-corruption.
Samples of a Canny-adapted model (finetune.py, sample.py --control): control_f1 and control_f1_chance.
"""
import argparse
import functools
import json
import os

import numpy as np
import torch
from PIL import Image

from models import metrics as M
from models import report
from models.autoencoder import SHIPPED_AUTOENCODERS, load_or_train_autoencoder
from models.classifier import SHIPPED_CLASSIFIERS, load_or_train_classifier
from models.common import UsageError, atomic_write_json, run_main
from models.controls import canny, edge_f1
from models.data import FASHION_MNIST_CLASSES, load_dataset, read_class_list
from models.features import (DINOV2, AutoencoderNet, ClipNet, DinoNet, FileImages, FmnistNet, InceptionNet, NpzStream, cached,
                             dataset_images, default_cache_dir, extract, folder_files, npz_member, source_identity)
from models.runs import check_writable

ADM_STATS = {"feat": ("mu", "sigma"), "spatial": ("mu_s", "sigma_s")}  # keys of precomputed reference statistics


def get_parser():
    p = argparse.ArgumentParser(description="FID / sFID / IS / precision-recall / TopP&R and the paper's diversity metrics.")
    a = p.add_argument
    a("--samples", default=None, help="a sample.py folder, a folder of images, or an .npz (arr_0 uint8 NHWC, arr_1 labels)")
    a("--ref", default=None, help="reference images: fashion-mnist (test split; default), a folder, an .npz (arr_0 and/or mu, sigma, mu_s, sigma_s)")
    a("--features", default="auto", choices=("auto", "fmnist", "inception", "clip", "dinov2"))
    a("--inception", default=None, help="path of inception-2015-12-05.pt (default: clean-fid's cache, else download)")
    a("--dinov2", default=None, metavar="MODEL", help=f"--features dinov2: a timm model name with pretrained weights (default {DINOV2}, "
      "downloaded, or from the Hugging Face cache) or a folder of its hub files (config.json naming the architecture, model.safetensors)")
    a("--data-path", default=None, help="Fashion-MNIST IDX folder (default: the run's, else Debian's copy)")
    a("--train-data", default=None, help="training set of the diversity metrics: an ImageFolder (class sub-folders); default: the run's")
    a("--image-size", type=int, default=None, help="centre-crop size of --train-data images (default: the samples' size)")
    a("--cache-dir", "--out-dir", dest="cache_dir", default=None,
      help=f"where the feature classifier and the feature cache live, shared by every run (default: {default_cache_dir()})")
    a("--mem-threshold", type=float, default=0.12)
    a("--clip", default=None, help="CLIP model (folder or hub id, e.g. openai/clip-vit-base-patch16) for the *_clip diversity metrics")
    a("--compare", default=None, metavar="OUT_DIR", help="tabulate and plot every evaluated run under OUT_DIR")
    a("--edge-tolerance", type=int, default=1, help="control fidelity: pixels an edge may be off (Canny controls)")
    a("--batch-size", type=int, default=100, help="images per forward pass of the feature network")
    a("--num-workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers decoding image files")
    a("--device", default="auto")
    return p


# ---------------------------------------------------------------------------------------------
# inputs


def read_image_folder(folder):
    arrays = [np.asarray(Image.open(f)) for f in folder_files(folder)]
    if len({a.shape for a in arrays}) != 1:
        raise UsageError(f"images in {folder} have different sizes")
    images = np.stack(arrays)
    return images[..., None] if images.ndim == 3 else images


def load_samples(path):
    """-> (uint8 NHWC images (a memmap for an uncompressed .npz), labels or None, folder for
    metrics.json, sample_config or None)."""
    if path is None or not os.path.exists(path):
        raise UsageError(f"--samples {path} does not exist")
    folder = os.path.dirname(os.path.abspath(path)) if path.endswith(".npz") else path
    config = None
    if os.path.exists(os.path.join(folder, "sample_config.json")):
        with open(os.path.join(folder, "sample_config.json")) as f:
            config = json.load(f)
    npz = path if path.endswith(".npz") else os.path.join(folder, "samples.npz")
    labels = None
    if os.path.exists(npz):
        images = npz_member(npz, "arr_0")
        if images is None:
            raise UsageError(f"{npz} has no arr_0")
        if isinstance(images, NpzStream):  # compressed: read it whole
            images = np.load(npz)["arr_0"]
        labels = npz_member(npz, "arr_1")
        labels = None if labels is None else np.asarray(np.load(npz)["arr_1"])
    else:
        images = read_image_folder(os.path.join(folder, "images") if os.path.isdir(os.path.join(folder, "images")) else folder)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UsageError(f"{path}: expected uint8 images N x H x W x C, got {images.dtype} {images.shape}")
    return images, labels, folder, config


def dataset_split(name, data_path, split, image_size=None):
    """Clean images (uint8 NHWC) and labels of a small in-memory split (the classifier's training)."""
    ds = load_dataset(name, data_path, image_size, split=split)
    return ds.images.permute(0, 2, 3, 1).numpy(), ds.labels


def image_shape(source):
    """H x W x C of a source's images (reads one file at most)."""
    return tuple(source[0].shape) if isinstance(source, FileImages) else tuple(source.shape[1:])


def load_reference(ref, data_path):
    """-> (cache name, image source or None, {kind: (mu, sigma)} precomputed in an ADM .npz)."""
    if ref in (None, "fashion-mnist"):
        return "fashion-mnist-test", dataset_images(load_dataset("fashion-mnist", data_path, split="test")), {}
    if not os.path.exists(ref):
        raise UsageError(f"--ref {ref} does not exist")
    name = "ref-" + os.path.basename(os.path.normpath(ref))
    if not ref.endswith(".npz"):
        return name, FileImages(folder_files(ref)), {}
    pre = {}
    with np.load(ref) as data:
        for kind, (mu, sigma) in ADM_STATS.items():
            if mu in data and sigma in data:
                pre[kind] = (data[mu].astype(np.float64), data[sigma].astype(np.float64))
    images = npz_member(ref, "arr_0")
    if images is None and not pre:
        raise UsageError(f"--ref {ref} holds neither arr_0 images nor mu/sigma statistics")
    return name, images, pre


def training_set(args, run_config, dataset, data_path, image_size):
    """-> (cache name, image source, labels) of the training set the diversity metrics compare with."""
    if args.train_data:
        ds = load_dataset("imagefolder", args.train_data, args.image_size or image_size)
        return f"train-{os.path.basename(os.path.normpath(args.train_data))}", dataset_images(ds), ds.labels
    if dataset is None:
        raise UsageError("the training-set metrics need samples written by sample.py (their run names the training set) or --train-data")
    if not data_path and not dataset.startswith("fashion-mnist"):
        raise UsageError(f"the run's training set ({dataset}) has no data path: pass --train-data PATH")
    ds = load_dataset(dataset, data_path, run_config.get("image_size"), split="train")
    return f"{dataset}-train", dataset_images(ds), ds.labels


def inception_path(path):
    if path is None:
        path = "/tmp/inception-2015-12-05.pt"  # where clean-fid caches it on Linux
        if not os.path.exists(path):
            try:
                from cleanfid.downloads_helper import check_download_url
                path = check_download_url(local_folder="/tmp", url="https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt")
            except Exception as e:  # noqa: BLE001  (offline, or clean-fid missing)
                raise UsageError(f"Inception weights not available ({type(e).__name__}); pass --inception PATH or use --features fmnist")
    if not os.path.exists(path):
        raise UsageError(f"--inception {path} does not exist")
    return path


def open_vq(config, device):
    """The run's autoencoder when it is a VQ model (LDM-4), else None."""
    spec = (config or {}).get("vae")
    if not spec:
        return None
    from models.vae import VQModel, load_vae
    try:
        vae = load_vae(spec)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"the run's --vae {spec}: {str(e).splitlines()[0]}")
    return vae.to(device) if isinstance(vae, VQModel) else None


# ---------------------------------------------------------------------------------------------
# metrics


def clip_score(image_feats, text_feats):
    """CLIP score (Hessel et al. 2021, as torchmetrics): mean of max(100 cos(image, caption), 0)."""
    return float(np.maximum(100 * (image_feats * text_feats).sum(axis=1), 0).mean())


def reference_metrics(gen, gen_stats, ref_feats, ref_stats, pre, suffix, notes, full=True, fd="fid"):
    """FID (named `fd`: fd_dinov2) / sFID from the Gaussians (precomputed ones from an ADM .npz first,
    as its evaluator does), the k-NN metrics and, when `full`, KID and TopP&R against the reference
    features (a memmap) when there are reference images."""
    m = {}
    for kind, name in (("feat", fd), ("spatial", "sfid")):
        ref_gauss = pre.get(kind) or (ref_stats[kind].mean_cov() if kind in ref_stats else None)
        if kind in gen_stats and ref_gauss is not None:
            m[name + suffix] = M.frechet_distance(*gen_stats[kind].mean_cov(), *ref_gauss)
    if pre:
        notes.append(f"reference statistics precomputed in the .npz: {', '.join(ADM_STATS[k][0] for k in pre)}")
    if ref_feats is None:
        notes.append("the reference holds statistics only: KID, precision/recall, density/coverage and TopP&R skipped")
        return m
    if full:
        m["kid" + suffix], _ = M.kernel_inception_distance(gen, ref_feats)
    # k-NN radii exclude the point itself: k = 3 needs 4 points in each set, k = 5 six reference points
    if min(len(gen), len(ref_feats)) > 3:
        m["precision" + suffix], m["recall" + suffix] = M.precision_recall(ref_feats, gen, k=3)
    if len(ref_feats) > 5:
        m["density" + suffix], m["coverage" + suffix] = M.density_coverage(ref_feats, gen, k=5)
    if min(len(gen), len(ref_feats)) <= 5:
        notes.append(f"{len(gen)} samples, {len(ref_feats)} reference images: too few for some k-NN metrics (skipped)")
    toppr_k = 5 * min(gen.shape[1], 32)  # TopP&R's bandwidth is a k-NN radius, k = 5 x the (projected) dims
    if full and min(len(gen), len(ref_feats)) > toppr_k:
        m["toppr_precision" + suffix], m["toppr_recall" + suffix], m["toppr_f1" + suffix] = M.top_pr(ref_feats, gen)
    elif full:
        notes.append(f"TopP&R needs more than {toppr_k} images in each set: skipped")
    return m


def space_metrics(spaces, refs, images, pre, notes, kw, labels=None):
    """The reference-set metrics of `images` in each feature space of `spaces` ([(net, suffix,
    full)]; refs: {net name: (reference features, stats)}), with IS from a net's logits and the
    condition accuracy when `labels` are given (Fashion-MNIST class ids). -> (metrics, {net name:
    features of the images})."""
    m, feats = {}, {}
    for net, suffix, full in spaces:
        out, stats = extract(net, images, keep=("feat", "logits"), stats=("feat", "spatial"), **kw)
        feats[net.name] = out["feat"]
        m.update(reference_metrics(out["feat"], stats, *refs[net.name], pre, suffix, notes, full, getattr(net, "frechet", "fid")))
        if "logits" in out:
            m["is" + suffix], _ = M.inception_score(out["logits"], splits=min(10, len(out["logits"])))
            if labels is not None:
                m["accuracy"] = M.condition_accuracy(out["logits"], labels)
    return m, feats


def diversity_metrics(gen, labels, train_feats, train_stats, suffix, mem_threshold):
    """The paper's diversity / memorisation metrics against the training set, read from its feature
    cache in chunks (k-NN) and from its streamed class Gaussians (RMD)."""
    m = {"top5_l2" + suffix: M.topk_l2(train_feats, gen, k=5, unit=True),
         "memorization" + suffix: M.memorization_ratio(train_feats, gen, mem_threshold, unit=True)}
    if labels is not None:
        m["rmd_top1" + suffix] = M.top_fraction_mean(M.rmd_from_stats(train_stats, gen, labels), 0.01)
        if np.bincount(labels).max() >= 2:  # defined once some class has two samples
            m["intra_class_l2" + suffix] = M.intra_class_distance(gen, labels)
    return m


def floor_metrics(spaces, refs, data_path, n, kw):
    """The reference-set metrics of real images: as many Fashion-MNIST training images as there are
    samples (a fixed random subset, seed 0) against the same reference, in every feature space. The
    best a model can score with this many images, e.g. fid_fmnist's floor, which is not 0 at finite n
    (its bias ~ 1/n)."""
    ds = load_dataset("fashion-mnist", data_path)
    rows = np.sort(np.random.default_rng(0).permutation(len(ds))[:min(n, len(ds))])
    floor, _ = space_metrics(spaces, refs, dataset_images(ds)[rows], {}, [], kw, labels=ds.labels[rows])
    return {k: float(v) for k, v in floor.items()}


def fmnist_class_ids(labels, run_config):
    """Labels of a model fine-tuned on a new class set (finetune.py --method full --classes FILE)
    are positions in that list: map them back to Fashion-MNIST's ids for the classifier."""
    if run_config.get("method") != "full" or not run_config.get("classes"):
        return labels
    if not os.path.isfile(run_config["classes"]):
        raise UsageError(f"the run was fine-tuned on the classes in {run_config['classes']}, which no longer exists")
    return np.asarray(read_class_list(run_config["classes"], FASHION_MNIST_CLASSES))[labels]


def control_fidelity(images, controls_npz, run_config, tolerance):
    """Beyond the paper: how well the images follow their Canny control. The Canny map of each
    generated image (the run's thresholds) against the requested one: mean F1 of edge pixels
    matched within `tolerance` pixels (models/controls.py); and the chance level: the same score
    against the control of the next image (another object), which an image that ignores its
    control gets as well. Returns (F1, chance F1)."""
    with np.load(controls_npz) as data:
        wanted = torch.from_numpy(data["arr_0"][: len(images)]).permute(0, 3, 1, 2)
    got = canny(torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2), run_config.get("canny_low", 100.0), run_config.get("canny_high", 200.0))
    return float(edge_f1(got, wanted, tolerance).mean()), float(edge_f1(got, wanted.roll(1, 0), tolerance).mean())


@torch.no_grad()
def vq_codebook_metrics(vae, images, batch_size, folder, notes):
    """Entropy (bits), perplexity and share used of the VQ codebook over the generated images: the
    codes sample.py recorded at quantisation (<folder>/codes.npy), else those of the images re-encoded."""
    from models.vae import vq_code_indices
    counts = torch.zeros(vae.quantize.embedding.num_embeddings, dtype=torch.int64)
    codes = np.load(os.path.join(folder, "codes.npy"), mmap_mode="r") if os.path.exists(os.path.join(folder, "codes.npy")) else None
    if codes is not None and len(codes) == len(images):
        for s in range(0, len(codes), batch_size):
            counts += torch.bincount(torch.from_numpy(codes[s:s + batch_size].astype(np.int64)).flatten(), minlength=len(counts))
    else:
        notes.append(f"VQ codebook metrics of the images re-encoded ({'codes.npy holds other images' if codes is not None else 'no codes.npy'}, "
                     "an older sample.py): not the sampled codes, as encode∘decode is not the identity")
        for s in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).permute(0, 3, 1, 2).float() / 127.5 - 1
            counts += torch.bincount(vq_code_indices(vae, x).flatten().cpu(), minlength=len(counts))
    h, ppl, used = M.codebook_usage(counts.numpy())
    return {"vq_entropy": h, "vq_perplexity": ppl, "vq_code_usage": used}


def evaluate(args):
    cache_dir = args.cache_dir or default_cache_dir()  # the classifier and the feature cache
    check_writable(cache_dir, "--cache-dir")
    images, labels, folder, config = load_samples(args.samples)
    if labels is not None and (labels < 0).any():  # prompts without a known class
        labels = None
    run_config = (config or {}).get("run_config", {})
    dataset = run_config.get("dataset", "fashion-mnist" if images.shape[1:] == (32, 32, 1) else None)
    fmnist = dataset is not None and dataset.startswith("fashion-mnist")  # labels or captions: the same images
    features = args.features if args.features != "auto" else ("fmnist" if fmnist else "inception")
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    data_path = args.data_path or run_config.get("data_path")
    if args.ref is None and not fmnist:
        raise UsageError(f"--features {features} needs --ref (a folder or .npz of real images) for samples not of Fashion-MNIST")
    ref_name, ref_source, pre = load_reference(args.ref, data_path)
    if pre and features != "inception":
        raise UsageError(f"--ref {args.ref}: precomputed mu/sigma are Inception statistics; use --features inception")
    clip = ClipNet(args.clip, device) if args.clip else None  # fail early, before the slow part
    if args.dinov2 and features != "dinov2":
        raise UsageError(f"--dinov2 names the network of --features dinov2, not of --features {features}")
    dino = DinoNet(args.dinov2 or DINOV2, device) if features == "dinov2" else None
    if features == "clip" and clip is None:
        raise UsageError("--features clip needs --clip MODEL")
    if args.train_data and not os.path.isdir(args.train_data):
        raise UsageError(f"--train-data {args.train_data} is not a directory of class sub-folders")
    vq = open_vq(config, device)
    kw = dict(batch_size=args.batch_size, num_workers=args.num_workers)
    out = {"samples": os.path.abspath(args.samples), "num_samples": int(len(images)), "features": features}
    notes, timings = [], {}
    if features == "fmnist":
        key = source_identity(dataset_split("fashion-mnist", data_path, "train")[0])[:16]  # trained once per training set
        load_split = functools.partial(dataset_split, "fashion-mnist", data_path)  # split -> (images, labels)
        classifier, out["classifier_test_accuracy"] = load_or_train_classifier(
            os.path.join(cache_dir, "classifier", f"fashion-mnist-{key}.pt"), load_split,
            shipped=os.path.join(SHIPPED_CLASSIFIERS, f"fashion-mnist-{key}.pt"))
        encoder, out["autoencoder_test_mse"] = load_or_train_autoencoder(
            os.path.join(cache_dir, "autoencoder", f"fashion-mnist-{key}.pt"), load_split,
            shipped=os.path.join(SHIPPED_AUTOENCODERS, f"autoencoder-fashion-mnist-{key}.pt"))
        net, suffix = FmnistNet(classifier), "_fmnist"
        shapes = {images.shape[1:]} | ({image_shape(ref_source)} if ref_source is not None else set())
        if shapes != {(32, 32, 1)}:
            raise UsageError(f"the fmnist classifier takes 32x32x1 images, got {sorted(shapes)}")
    elif features == "inception":
        net, suffix = InceptionNet(inception_path(args.inception), device), ""
    else:
        net, suffix = (dino, "_dinov2") if features == "dinov2" else (clip, "_clip")
    # feature spaces of the reference-set metrics: (network, suffix, with KID and TopP&R); with the
    # fmnist classifier also the label-free autoencoder's (FID and the k-NN metrics)
    spaces = [(net, suffix, True)] + ([(AutoencoderNet(encoder), "_ae", False)] if features == "fmnist" else [])
    refs = {}
    for snet, ssuffix, _ in spaces:
        refs[snet.name] = (None, {})
        if ref_source is not None:
            ref_arrays, ref_stats, timings["reference" if snet is net else f"reference{ssuffix}"] = cached(
                snet, ref_source, cache_dir, ref_name, stats=("feat", "spatial"), **kw)
            refs[snet.name] = (ref_arrays["feat"], ref_stats)
    out["num_reference"] = int(len(ref_source)) if ref_source is not None else None
    fmnist_labels = fmnist_class_ids(labels, run_config) if features == "fmnist" and labels is not None else None
    metrics, gen = space_metrics(spaces, refs, images, pre, notes, kw, labels=fmnist_labels)
    if getattr(net, "note", None):
        notes.append(net.note)
    train_nets = ([s[0] for s in spaces] if features == "fmnist" else []) + ([clip] if clip is not None and labels is not None else [])
    for tnet in train_nets:  # the training set: fmnist (and ae) features always, CLIP for class-conditional runs
        if features == "fmnist" and tnet is not clip:
            ds = load_dataset("fashion-mnist", data_path)
            name, source, train_labels = "fashion-mnist-train", dataset_images(ds), ds.labels
        else:
            name, source, train_labels = training_set(args, run_config, dataset, data_path, images.shape[1])
        tf, ts, timings[f"train_{tnet.name}"] = cached(tnet, source, cache_dir, name, labels=train_labels, **kw)
        g = gen[tnet.name] if tnet.name in gen else extract(tnet, images, **kw)[0]["feat"]
        metrics.update(diversity_metrics(g, labels, tf["feat"], ts["feat"], f"_{tnet.name}", args.mem_threshold))
    if features == "fmnist" and ref_source is not None:
        out["floor"] = floor_metrics(spaces, refs, data_path, len(images), kw)
    prompts_file = os.path.join(folder, "prompts.txt")
    if clip and os.path.exists(prompts_file):  # text models: agreement of each image with its caption
        with open(prompts_file, encoding="utf-8") as f:
            prompts = f.read().splitlines()[: len(images)]
        g = gen["clip"] if net is clip else extract(clip, images, **kw)[0]["feat"]
        metrics["clip_score"] = clip_score(g.astype(np.float64), clip.text_features(prompts))
    if clip:
        out["clip"] = args.clip
    if dino:
        out["dinov2"] = args.dinov2 or DINOV2
    if vq is not None:
        metrics.update(vq_codebook_metrics(vq, images, args.batch_size, folder, notes))
    adapter = ((config or {}).get("model_config") or {}).get("adapter")
    if adapter and adapter["control"] == "canny" and os.path.exists(os.path.join(folder, "controls.npz")):
        metrics["control_f1"], metrics["control_f1_chance"] = control_fidelity(
            images, os.path.join(folder, "controls.npz"), run_config, args.edge_tolerance)
    out["metrics"] = {k: float(v) for k, v in metrics.items()}
    out["toppr_version"] = report.TOPPR_VERSION  # the authors' estimator (older files' TopP&R is left out of reports)
    out["notes"], out["timings"] = list(dict.fromkeys(notes)), timings
    out["sample_config"] = config
    report.keep_other_space(os.path.join(folder, "metrics.json"), out)
    atomic_write_json(os.path.join(folder, "metrics.json"), out)
    print(f"{len(images)} samples vs {out['num_reference']} reference images, {features} features")
    for note in notes:
        print(f"  note: {note}")
    floor = out.get("floor", {})
    for k, v in out["metrics"].items():
        print(f"  {k:24s} {v:10.4f}" + (f"   (real images: {floor[k]:.4f})" if k in floor else ""))
    print(f"-> {os.path.join(folder, 'metrics.json')}")


def main():
    args = get_parser().parse_args()
    if args.compare:
        if not os.path.isdir(args.compare):
            raise UsageError(f"--compare {args.compare} is not a directory")
        return report.compare(args.compare)
    if args.samples is None:
        raise UsageError("pass --samples <dir|npz> or --compare <out-dir>")
    evaluate(args)


if __name__ == "__main__":
    run_main(main)
