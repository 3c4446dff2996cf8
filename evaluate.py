"""
Stage 4: score generated images, and compare evaluated runs.

    python evaluate.py --samples out/demo/samples/<tag>            # writes <tag>/metrics.json, prints a table
    python evaluate.py --samples x.npz --ref ref.npz --features inception --inception /path/inception-2015-12-05.pt
    python evaluate.py --compare out                                # out/comparison.md + plots over η and guidance

Feature networks
- fmnist (offline default for the embedded dataset): a small CNN trained once on the clean
  Fashion-MNIST training set, cached in <out-dir>/classifier/; metrics carry the suffix _fmnist
  and are not comparable with Inception numbers. Its logits give IS and the condition accuracy
  (share of samples classified as the class they were generated for).
- inception: the StyleGAN2-ADA TorchScript Inception-v3 that clean-fid downloads
  (inception-2015-12-05.pt; --inception PATH, else clean-fid's cache/download): pool3 features
  (resized to 299 inside the network, as the ADM evaluator) for FID / KID / precision-recall, and
  its softmax without output bias for IS.
Against the reference set (--ref; default the dataset's test split): FID, KID, IS (10 splits),
precision / recall (k = 3), density / coverage (k = 5). Against the training set (the paper's
diversity and memorisation metrics): top-1 % RMD, mean top-5 L2 distance, memorisation ratio
(nearest training image closer than --mem-threshold on L2-normalised features; 0.12 is the
paper's value for CLIP features) and mean within-class pairwise distance.
Samples of a Canny-adapted model (finetune.py, sample.py --control): control_f1, the F1 of the edge
pixels of each image's Canny map against its requested map, within --edge-tolerance pixels, and
control_f1_chance, the same against the next image's control (what ignoring the control scores).
"""
import argparse
import glob
import json
import os

import numpy as np
import torch
from PIL import Image

from models.data import FASHION_MNIST_CLASSES, load_dataset, read_class_list
from models import metrics as M
from models.classifier import features_and_logits, load_or_train_classifier
from models.controls import canny, edge_f1
from models.common import UsageError, atomic_write_json, atomic_write_text, run_main

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def get_parser():
    p = argparse.ArgumentParser(description="FID / IS / precision-recall and the paper's diversity metrics.")
    a = p.add_argument
    a("--samples", default=None, help="a sample.py folder, a folder of images, or an .npz (arr_0 uint8 NHWC, arr_1 labels)")
    a("--ref", default=None, help="reference images: fashion-mnist (test split; default), a folder, an .npz")
    a("--features", default="auto", choices=("auto", "fmnist", "inception"))
    a("--inception", default=None, help="path of inception-2015-12-05.pt (default: clean-fid's cache, else download)")
    a("--data-path", default=None, help="Fashion-MNIST IDX folder (default: Debian's copy)")
    a("--out-dir", default=None, help="where the classifier is cached (default: the run's out-dir)")
    a("--mem-threshold", type=float, default=0.12)
    a("--clip", default=None, help="CLIP model (folder or hub id, e.g. openai/clip-vit-base-patch16) for the *_clip diversity metrics")
    a("--compare", default=None, metavar="OUT_DIR", help="tabulate and plot every evaluated run under OUT_DIR")
    a("--edge-tolerance", type=int, default=1, help="control fidelity: pixels an edge may be off (Canny controls)")
    a("--device", default="auto")
    return p


# ---------------------------------------------------------------------------------------------
# inputs


def read_image_folder(folder):
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS) and f != "grid.png")
    if not files:
        raise UsageError(f"no images in {folder}")
    arrays = [np.asarray(Image.open(os.path.join(folder, f))) for f in files]
    if len({a.shape for a in arrays}) != 1:
        raise UsageError(f"images in {folder} have different sizes")
    images = np.stack(arrays)
    return images[..., None] if images.ndim == 3 else images


def load_samples(path):
    """-> (uint8 NHWC images, labels or None, folder for metrics.json, sample_config or None)."""
    if path is None or not os.path.exists(path):
        raise UsageError(f"--samples {path} does not exist")
    folder = os.path.dirname(os.path.abspath(path)) if path.endswith(".npz") else path
    config = None
    if os.path.exists(os.path.join(folder, "sample_config.json")):
        with open(os.path.join(folder, "sample_config.json")) as f:
            config = json.load(f)
    npz = path if path.endswith(".npz") else os.path.join(folder, "samples.npz")
    if os.path.exists(npz):
        with np.load(npz) as data:
            images = data["arr_0"]
            labels = data["arr_1"] if "arr_1" in data else None
    else:
        images = read_image_folder(os.path.join(folder, "images") if os.path.isdir(os.path.join(folder, "images")) else folder)
        labels = None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UsageError(f"{path}: expected uint8 images N x H x W x C, got {images.dtype} {images.shape}")
    return images, labels, folder, config


def dataset_split(name, data_path, split, image_size=None):
    """Clean images (uint8 NHWC) and labels of a dataset split."""
    ds = load_dataset(name, data_path, image_size, split=split)
    if hasattr(ds, "images"):
        return ds.images.permute(0, 2, 3, 1).numpy(), ds.labels
    return np.stack([((ds[i][0] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy() for i in range(len(ds))]), ds.labels


def load_reference(ref, data_path):
    if ref in (None, "fashion-mnist"):
        return dataset_split("fashion-mnist", data_path, "test")[0]
    if not os.path.exists(ref):
        raise UsageError(f"--ref {ref} does not exist")
    if ref.endswith(".npz"):
        with np.load(ref) as data:
            return data["arr_0"]
    return read_image_folder(ref)


# ---------------------------------------------------------------------------------------------
# feature networks


def inception_network(path, device):
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
    return torch.jit.load(path, map_location=device).eval()


@torch.no_grad()
def inception_features_and_logits(net, images, device, batch_size=100):
    """uint8 NHWC -> pool3 features (N, 2048) and log-probabilities over its 1008 classes."""
    feats, logp = [], []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[start: start + batch_size])).permute(0, 3, 1, 2).float().to(device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        feats.append(net(x, return_features=True).double().cpu())
        logp.append(net(x, no_output_bias=True).double().clamp_min(1e-30).log().cpu())
    return torch.cat(feats).numpy(), torch.cat(logp).numpy()


def clip_network(spec, device):
    """CLIP (the paper: ViT-B/16, hub id openai/clip-vit-base-patch16) with its image preprocessing
    and tokenizer, from a local folder or the hub."""
    try:
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer
        model = CLIPModel.from_pretrained(spec).to(device).eval()
        return model, CLIPImageProcessor.from_pretrained(spec), CLIPTokenizer.from_pretrained(spec)
    except Exception as e:  # noqa: BLE001  (offline, missing folder, not a CLIP model)
        raise UsageError(f"cannot load a CLIP model from {spec}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def _unit(x):
    return x / x.norm(dim=1, keepdim=True)


@torch.no_grad()
def clip_image_features(clip, images, device, batch_size=100):
    """uint8 NHWC -> L2-normalised CLIP image embeddings (float64)."""
    model, processor, _ = clip
    out = []
    for start in range(0, len(images), batch_size):
        batch = [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB") for a in images[start: start + batch_size]]
        pixels = processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
        out.append(_unit(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).double()).cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def clip_text_features(clip, texts, device, batch_size=100):
    """Captions -> L2-normalised CLIP text embeddings (float64), 77-token truncation."""
    model, _, tokenizer = clip
    out = []
    for start in range(0, len(texts), batch_size):
        tok = tokenizer(texts[start: start + batch_size], padding=True, truncation=True,
                        max_length=min(77, model.config.text_config.max_position_embeddings), return_tensors="pt").to(device)
        pooled = model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).pooler_output
        out.append(_unit(model.text_projection(pooled).double()).cpu())
    return torch.cat(out).numpy()


def clip_score(image_feats, text_feats):
    """CLIP score (Hessel et al. 2021, as torchmetrics): mean of max(100 cos(image, caption), 0)."""
    return float(np.maximum(100 * (image_feats * text_feats).sum(axis=1), 0).mean())


# ---------------------------------------------------------------------------------------------


def diversity_metrics(gen_feats, labels, train_feats, train_labels, suffix, mem_threshold):
    """The paper's diversity / memorisation metrics against the training set."""
    unit = lambda f: f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)  # noqa: E731
    m = {"top5_l2" + suffix: M.topk_l2(unit(train_feats), unit(gen_feats), k=5),
         "memorization" + suffix: M.memorization_ratio(unit(train_feats), unit(gen_feats), mem_threshold)}
    if labels is not None:
        m["rmd_top1" + suffix] = M.top_fraction_mean(M.rmd(train_feats, train_labels, gen_feats, labels), 0.01)
        if np.bincount(labels).max() >= 2:  # defined once some class has two samples
            m["intra_class_l2" + suffix] = M.intra_class_distance(gen_feats, labels)
    return m


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
    got = canny(torch.from_numpy(images).permute(0, 3, 1, 2), run_config.get("canny_low", 100.0), run_config.get("canny_high", 200.0))
    return float(edge_f1(got, wanted, tolerance).mean()), float(edge_f1(got, wanted.roll(1, 0), tolerance).mean())


def compute_metrics(gen_feats, gen_logits, labels, ref_feats, train_feats, train_labels, suffix, mem_threshold):
    m = {}
    m["fid" + suffix] = M.fid_from_features(gen_feats, ref_feats)
    m["kid" + suffix], _ = M.kernel_inception_distance(gen_feats, ref_feats)
    m["is" + suffix], m["is_std" + suffix] = M.inception_score(gen_logits, splits=min(10, len(gen_logits)))
    m["precision" + suffix], m["recall" + suffix] = M.precision_recall(ref_feats, gen_feats, k=3)
    m["density" + suffix], m["coverage" + suffix] = M.density_coverage(ref_feats, gen_feats, k=5)
    if train_feats is not None:
        m.update(diversity_metrics(gen_feats, labels, train_feats, train_labels, suffix, mem_threshold))
    return {k: float(v) for k, v in m.items()}


def evaluate(args):
    images, labels, folder, config = load_samples(args.samples)
    if labels is not None and (labels < 0).any():  # prompts without a known class
        labels = None
    run_config = (config or {}).get("run_config", {})
    dataset = run_config.get("dataset", "fashion-mnist" if images.shape[1:] == (32, 32, 1) else None)
    fmnist = dataset is not None and dataset.startswith("fashion-mnist")  # labels or captions: the same images
    features = args.features if args.features != "auto" else ("fmnist" if fmnist else "inception")
    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    clip = clip_network(args.clip, device) if args.clip else None  # fail early, before the slow part
    if clip and dataset is None:
        raise UsageError("--clip needs samples written by sample.py (their run names the training set)")
    out = {"samples": os.path.abspath(args.samples), "num_samples": int(len(images)), "features": features}
    data_path = args.data_path or run_config.get("data_path")
    if features == "fmnist":
        out_dir = args.out_dir or (os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(folder)))) if config else "out")
        classifier, test_acc = load_or_train_classifier(os.path.join(out_dir, "classifier", "fashion-mnist.pt"),
                                                        lambda split: dataset_split("fashion-mnist", data_path, split))
        ref = load_reference(args.ref, data_path)
        train_x, train_y = dataset_split("fashion-mnist", data_path, "train")
        if images.shape[1:] != train_x.shape[1:] or ref.shape[1:] != train_x.shape[1:]:
            raise UsageError(f"the fmnist classifier takes 32x32x1 images, got samples {images.shape[1:]}, ref {ref.shape[1:]}")
        gen_feats, gen_logits = features_and_logits(classifier, images)
        ref_feats, _ = features_and_logits(classifier, ref)
        train_feats, _ = features_and_logits(classifier, train_x)
        out["classifier_test_accuracy"] = test_acc
        suffix, train_labels = "_fmnist", train_y
    else:
        net = inception_network(args.inception, device)
        if args.ref is None and not fmnist:
            raise UsageError("--features inception needs --ref (a folder or .npz of real images)")
        gen_feats, gen_logits = inception_features_and_logits(net, images, device)
        ref_feats, _ = inception_features_and_logits(net, load_reference(args.ref, data_path), device)
        train_feats = train_labels = None
        suffix = ""
    out["num_reference"] = int(len(ref_feats))
    metrics = compute_metrics(gen_feats, gen_logits, labels, ref_feats, train_feats, train_labels, suffix, args.mem_threshold)
    if labels is not None and features == "fmnist":
        metrics["accuracy"] = M.condition_accuracy(gen_logits, fmnist_class_ids(labels, run_config))
    prompts_file = os.path.join(folder, "prompts.txt")
    if clip and os.path.exists(prompts_file):  # text models: agreement of each image with its caption
        with open(prompts_file, encoding="utf-8") as f:
            prompts = f.read().splitlines()[: len(images)]
        metrics["clip_score"] = clip_score(clip_image_features(clip, images, device), clip_text_features(clip, prompts, device))
    if clip and labels is not None:  # the paper's feature space for RMD, top-5 L2 and memorisation
        train_x, train_y = dataset_split(dataset, data_path, "train", run_config.get("image_size"))
        metrics.update({k: float(v) for k, v in diversity_metrics(
            clip_image_features(clip, images, device), labels, clip_image_features(clip, train_x, device), train_y,
            "_clip", args.mem_threshold).items()})
    if clip:
        out["clip"] = args.clip
    adapter = ((config or {}).get("model_config") or {}).get("adapter")
    if adapter and adapter["control"] == "canny" and os.path.exists(os.path.join(folder, "controls.npz")):
        metrics["control_f1"], metrics["control_f1_chance"] = control_fidelity(
            images, os.path.join(folder, "controls.npz"), run_config, args.edge_tolerance)
    out["metrics"] = metrics
    out["sample_config"] = config
    atomic_write_json(os.path.join(folder, "metrics.json"), out)
    print(f"{len(images)} samples vs {len(ref_feats)} reference images, {features} features")
    for k, v in metrics.items():
        print(f"  {k:24s} {v:10.4f}")
    print(f"-> {os.path.join(folder, 'metrics.json')}")


# ---------------------------------------------------------------------------------------------
# comparison across runs: the paper's main figure in miniature


def cep_label(rc):
    if not rc.get("cep"):
        return "IP %g" % rc["input_perturbation"] if rc.get("input_perturbation") else "no CEP"
    return f"CEP-{'U' if rc.get('cep_type', 'uniform') == 'uniform' else 'G'} γ={rc.get('cep_gamma', 1):g}" + (" fixed" if rc.get("cep_fixed") else "")


def compare(out_dir):
    rows = []
    for path in sorted(glob.glob(os.path.join(out_dir, "*", "samples", "*", "metrics.json"))):
        with open(path) as f:
            m = json.load(f)
        sc = m.get("sample_config") or {}
        rc = sc.get("run_config", {})
        rows.append({"run": path.split(os.sep)[-4], "tag": path.split(os.sep)[-2], "eta": rc.get("corrupt", 0.0),
                     "cep": cep_label(rc), "model": rc.get("model", "?"), "step": sc.get("step"),
                     "sampler": f"{sc.get('sampler', '?')}-{sc.get('steps', '?')}", "cfg": sc.get("cfg_scale"), **m["metrics"]})
    if not rows:
        raise UsageError(f"no evaluated samples (metrics.json) under {out_dir}/*/samples/")
    names = [k for k in rows[0] if k not in ("run", "tag", "eta", "cep", "model", "step", "sampler", "cfg") and not k.startswith("is_std")]
    header = ["run", "η", "CEP", "model", "step", "sampler", "cfg"] + names
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(rows, key=lambda r: (r["cep"], r["eta"], r["cfg"] or 0)):
        vals = [r["run"], f"{r['eta']:g}", r["cep"], r["model"], str(r["step"]), r["sampler"], f"{r['cfg']:g}"]
        lines.append("| " + " | ".join(vals + [f"{r.get(k, float('nan')):.4g}" for k in names]) + " |")
    atomic_write_text(os.path.join(out_dir, "comparison.md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_comparison(rows, names, out_dir)


def plot_comparison(rows, names, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    settings = sorted({(r["cep"], r["cfg"]) for r in rows})
    cols = min(4, len(names))
    fig, axes = plt.subplots(-(-len(names) // cols), cols, figsize=(4 * cols, 3.2 * -(-len(names) // cols)), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for cep, cfg in settings:
            pts = sorted((r["eta"], r[name]) for r in rows if (r["cep"], r["cfg"]) == (cep, cfg) and name in r)
            ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{cep}, cfg {cfg:g}")
        ax.set_xlabel("corruption η (%)")
        ax.set_title(name)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "comparison_eta.png"), dpi=100)
    fid = next((n for n in names if n.startswith("fid")), None)
    is_ = next((n for n in names if n.startswith("is")), None)
    if fid and is_:  # FID vs IS over guidance scales, one curve per run and sampler (the paper's figures)
        fig, ax = plt.subplots(figsize=(5, 4))
        for run, sampler in sorted({(r["run"], r["sampler"]) for r in rows}):
            pts = sorted((r["cfg"], r[is_], r[fid]) for r in rows if (r["run"], r["sampler"]) == (run, sampler))
            ax.plot([p[1] for p in pts], [p[2] for p in pts], "o-", label=f"{run} ({sampler})")
            for cfg, x, y in pts:
                ax.annotate(f"{cfg:g}", (x, y), fontsize=7)
        ax.set_xlabel(is_)
        ax.set_ylabel(fid)
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "comparison_fid_is.png"), dpi=100)
    plt.close("all")
    print(f"-> {os.path.join(out_dir, 'comparison.md')}, comparison_eta.png, comparison_fid_is.png")


def main():
    args = get_parser().parse_args()
    if args.compare:
        if not os.path.isdir(args.compare):
            raise UsageError(f"--compare {args.compare} is not a directory")
        return compare(args.compare)
    if args.samples is None:
        raise UsageError("pass --samples <dir|npz> or --compare <out-dir>")
    evaluate(args)


if __name__ == "__main__":
    run_main(main)
