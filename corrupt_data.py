"""
Stage 1: load a paired dataset and corrupt a ratio η of its conditions (Chen et al. 2024, App. B.1).

    python corrupt_data.py --dataset fashion-mnist --corrupt 0.025 --seed 0 --out-dir out

writes out/data/fashion-mnist/corrupt_symmetric_eta0.025_seed0.json: which examples changed, their
original and new labels, the realised ratio and the seed, and a one-line summary. train.py imports
the same functions, so the labels it trains on are exactly the ones in the manifest.

Corruption
- symmetric (default): exactly round(η·N) examples, chosen uniformly without replacement, each
  flipped to another class drawn from the class prior restricted to the other K-1 classes.
- asymmetric: only examples of classes that belong to a group are eligible; round(η·N_eligible) of
  them are flipped to another class of the same group, drawn from the prior restricted to it (the
  paper: ImageNet classes shared with CIFAR-100). Fashion-MNIST ships tops / footwear groups;
  ImageFolder data takes --groups FILE (one group per line, class folder names separated by
  commas or spaces, '#' starts a comment).
Both are a pure function of (labels, seed, η): the same on any number of ranks, and nested: one
random priority order and one candidate new label per example are drawn from the seed, and η only
decides how long a prefix of that order is flipped, so the set at η=0.025 is a subset of the set at
η=0.05 (with the same new labels).
"""
import argparse
import gzip
import os
import sys

import numpy as np
import torch
from PIL import Image

from models.common import UsageError, atomic_write_json, run_main

FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # Debian: apt-get install dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_GROUPS = [["T-shirt/top", "Pullover", "Coat", "Shirt"], ["Sandal", "Sneaker", "Ankle boot"]]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DATASETS = ("fashion-mnist", "imagefolder")
CORRUPT_TYPES = ("symmetric", "asymmetric")


# ---------------------------------------------------------------------------------------------
# datasets: __getitem__ returns (image in [-1, 1], example index); labels live in `.labels` so
# the training loop can swap in corrupted (or re-drawn) labels without touching the data path


def read_idx(path):
    """An IDX file (optionally gzipped) as a numpy array (LeCun's MNIST format)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(directory, stem):
    for name in (stem, stem + ".gz"):
        for sub in ("", "raw", "FashionMNIST/raw"):
            path = os.path.join(directory, sub, name)
            if os.path.isfile(path):
                return path
    return None


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST held in memory as uint8, 28x28 zero-padded to 32x32 (1 channel)."""

    def __init__(self, data_path=None, split="train", download_root=None):
        prefix = "train" if split == "train" else "t10k"
        directory = data_path or (FASHION_MNIST_SYSTEM_DIR if os.path.isdir(FASHION_MNIST_SYSTEM_DIR) else None)
        if directory is not None:
            if not os.path.isdir(directory):
                raise UsageError(f"--data-path {directory} does not exist")
            img_file, lbl_file = _find_idx(directory, f"{prefix}-images-idx3-ubyte"), _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
            if img_file is None or lbl_file is None:
                raise UsageError(f"no Fashion-MNIST IDX files ({prefix}-images-idx3-ubyte[.gz]) in {directory}")
            images, labels = read_idx(img_file), read_idx(lbl_file)
        else:  # no local copy: torchvision downloads it (needs a network)
            import torchvision
            try:
                ds = torchvision.datasets.FashionMNIST(download_root or "data", train=(split == "train"), download=True)
            except Exception as e:  # noqa: BLE001  (any network failure)
                raise UsageError(f"Fashion-MNIST not found locally ({FASHION_MNIST_SYSTEM_DIR}) and download failed: {e}")
            images, labels = ds.data.numpy(), ds.targets.numpy()
            directory = ds.raw_folder
        if images.ndim != 3 or len(images) != len(labels):
            raise UsageError(f"malformed Fashion-MNIST files in {directory}")
        self.source = os.path.abspath(directory)
        self.images = torch.nn.functional.pad(torch.from_numpy(images.copy()), (2, 2, 2, 2)).unsqueeze(1)
        self.labels = labels.astype(np.int64)
        self.classes = list(FASHION_MNIST_CLASSES)
        self.image_size, self.channels = 32, 1

    def __len__(self):
        return len(self.labels)

    def get_batch(self, indices):
        """Vectorised gather of many examples: float (B, 1, 32, 32) in [-1, 1]."""
        return self.images[indices].float() / 127.5 - 1.0

    def __getitem__(self, i):
        return self.get_batch(torch.tensor([i]))[0], i


def center_crop_arr(pil_image, image_size):
    """ADM / DiT preprocessing: halve with a box filter while the short side is >= 2x the target,
    resize the short side to image_size with bicubic, then take the central square."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


class ImageFolderData(torch.utils.data.Dataset):
    """ImageNet-style folder: one sub-folder per class (sorted names = class ids), RGB images,
    center crop + resize to image_size (random horizontal flips come from train.py)."""

    def __init__(self, root, image_size=256):
        if root is None or not os.path.isdir(root):
            raise UsageError(f"--data-path {root} is not a directory of class sub-folders")
        self.source = os.path.abspath(root)
        self.classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        self.paths, labels = [], []
        for k, name in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, name))):
                for f in sorted(files):
                    if f.lower().endswith(IMAGE_EXTENSIONS):
                        self.paths.append(os.path.join(dirpath, f))
                        labels.append(k)
        if len(self.classes) < 2 or not self.paths:
            raise UsageError(f"{root} needs at least two class sub-folders holding images")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.image_size, self.channels = image_size, 3

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        """key: an index, or (index, flip) from train.py, which draws the training flips itself
        (deterministically per epoch) so that they do not depend on the number of ranks."""
        i, flip = key if isinstance(key, (tuple, list)) else (key, False)
        with Image.open(self.paths[i]) as img:
            arr = center_crop_arr(img.convert("RGB"), self.image_size)
        if flip:
            arr = arr[:, ::-1]
        return torch.from_numpy(arr.transpose(2, 0, 1).copy()).float() / 127.5 - 1.0, i


def load_dataset(name, data_path=None, image_size=None, split="train", download_root=None):
    if name == "fashion-mnist":
        if image_size not in (None, 32):
            raise UsageError("fashion-mnist is 28x28 padded to 32x32: --image-size must be 32")
        return FashionMNIST(data_path, split, download_root)
    if name == "imagefolder":
        return ImageFolderData(data_path, image_size or 256)
    raise UsageError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}")


def dataset_key(name, dataset):
    """Folder name under <out-dir>/data/ for this dataset."""
    return name if name == "fashion-mnist" else f"{name}-{os.path.basename(dataset.source.rstrip('/'))}"


# ---------------------------------------------------------------------------------------------
# corruption


def corrupt_count(eta, n):
    """round(η·n), halves rounded up (not Python's banker's rounding)."""
    return int(np.floor(eta * n + 0.5))


def load_groups(path, classes):
    """Class groups for asymmetric corruption as lists of class ids."""
    if path is None:
        if classes == FASHION_MNIST_CLASSES:
            groups = FASHION_MNIST_GROUPS
        else:
            raise UsageError("--corrupt-type asymmetric on this dataset needs --groups FILE")
    else:
        if not os.path.isfile(path):
            raise UsageError(f"--groups file {path} does not exist")
        with open(path) as f:
            lines = [line.split("#")[0].replace(",", " ").split() for line in f]
        groups = [g for g in lines if g]
    index = {name: k for k, name in enumerate(classes)}
    seen, out = set(), []
    for g in groups:
        unknown = [c for c in g if c not in index]
        if unknown:
            raise UsageError(f"--groups names classes that are not in the dataset: {', '.join(unknown)}")
        if len(set(g)) < 2:
            raise UsageError(f"a corruption group needs at least two classes: {g}")
        if seen & set(g):
            raise UsageError(f"classes appear in more than one group: {', '.join(sorted(seen & set(g)))}")
        seen |= set(g)
        out.append(sorted(index[c] for c in g))
    return out


def corrupt_labels(labels, num_classes, eta, seed, kind="symmetric", groups=None):
    """Return (new_labels, corrupted_indices). `seed` may be an int or a sequence (e.g.
    [seed, epoch] for --corrupt-resample). See the module docstring for the procedure."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    rng = np.random.default_rng(seed)
    prior = np.bincount(labels, minlength=num_classes) / n
    # allowed[y, k]: may an example of class y be flipped to class k?
    allowed = np.zeros((num_classes, num_classes), dtype=bool)
    if kind == "symmetric":
        allowed[:] = True
    elif kind == "asymmetric":
        for g in groups:
            allowed[np.ix_(g, g)] = True
    else:
        raise UsageError(f"unknown --corrupt-type '{kind}'; choose one of {CORRUPT_TYPES}")
    np.fill_diagonal(allowed, False)
    eligible = np.flatnonzero((allowed & (prior > 0)).any(axis=1)[labels])  # has somewhere to go
    order = rng.permutation(eligible)  # corruption priority: a prefix of it is flipped (nesting)
    u = rng.random(n)                  # one candidate draw per example, whatever η is
    chosen = np.sort(order[:corrupt_count(eta, len(eligible))])
    new_labels = labels.copy()
    for y in np.unique(labels[chosen]):
        rows = chosen[labels[chosen] == y]
        cdf = np.cumsum(prior * allowed[y])  # class prior restricted to the allowed classes (never y)
        new_labels[rows] = np.searchsorted(cdf, u[rows] * cdf[-1], side="right")
    return new_labels, chosen


def count_eligible(labels, kind, groups):
    """How many examples corrupt_labels may flip: all (symmetric), those of grouped classes that
    have a non-empty other class in their group (asymmetric)."""
    if kind == "symmetric":
        return len(labels)
    present = set(np.unique(labels).tolist())
    ok = [k for g in groups for k in g if any(j in present for j in g if j != k)]
    return int(np.isin(labels, ok).sum())


def manifest_path(out_dir, key, kind, eta, seed):
    return os.path.join(out_dir, "data", key, f"corrupt_{kind}_eta{eta:g}_seed{seed}.json")


def build_manifest(key, dataset, eta, seed, kind, groups, new_labels, chosen):
    n_eligible = count_eligible(dataset.labels, kind, groups)
    summary = (f"{key}: {len(chosen)} of {len(dataset)} labels changed ({len(chosen) / len(dataset):.4%} of all, "
               f"target η={eta:g} of {n_eligible} eligible), {kind}, seed {seed}")
    return {
        "summary": summary, "dataset": key, "source": dataset.source, "num_examples": len(dataset),
        "num_classes": len(dataset.classes), "classes": dataset.classes, "corrupt": eta, "corrupt_type": kind,
        "groups": groups, "seed": seed, "num_eligible": n_eligible, "num_corrupted": int(len(chosen)),
        "realised_ratio": len(chosen) / len(dataset),
        "indices": chosen.tolist(), "original_labels": dataset.labels[chosen].tolist(),
        "new_labels": new_labels[chosen].tolist(),
    }


def prepare_corruption(dataset, key, out_dir, eta, seed, kind="symmetric", groups_file=None):
    """Corrupt the dataset's labels; returns (new_labels, manifest dict, manifest path). Nothing is
    written here: the caller writes the manifest once all input has been checked."""
    if not 0 <= eta < 1:
        raise UsageError(f"--corrupt must be in [0, 1), got {eta}")
    groups = load_groups(groups_file, dataset.classes) if kind == "asymmetric" else None
    new_labels, chosen = corrupt_labels(dataset.labels, len(dataset.classes), eta, seed, kind, groups)
    manifest = build_manifest(key, dataset, eta, seed, kind, groups, new_labels, chosen)
    path = manifest_path(out_dir, key, kind, eta, seed)
    if os.path.exists(path):
        import json
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            raise UsageError(f"{path} exists but is not a readable manifest; move it away")
        if not isinstance(old, dict) or old.get("indices") != manifest["indices"] or old.get("new_labels") != manifest["new_labels"] or old.get("source") != manifest["source"]:
            raise UsageError(f"{path} holds a different corruption (another dataset copy?); use another --out-dir")
    return new_labels, manifest, path


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", choices=DATASETS)
    p.add_argument("--data-path", default=None, help="dataset folder (default: Debian's copy of Fashion-MNIST, else download)")
    p.add_argument("--image-size", type=int, default=None, help="imagefolder: crop size (default 256)")
    p.add_argument("--corrupt", type=float, default=0.0, help="ratio η of conditions to corrupt, in [0, 1)")
    p.add_argument("--corrupt-type", default="symmetric", choices=CORRUPT_TYPES)
    p.add_argument("--groups", default=None, help="asymmetric: file of class groups (one per line)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="out")
    args = p.parse_args()
    if not 0 <= args.corrupt < 1:
        raise UsageError(f"--corrupt must be in [0, 1), got {args.corrupt}")
    dataset = load_dataset(args.dataset, args.data_path, args.image_size, download_root=os.path.join(args.out_dir, "data", "downloads"))
    key = dataset_key(args.dataset, dataset)
    _, manifest, path = prepare_corruption(dataset, key, args.out_dir, args.corrupt, args.seed, args.corrupt_type, args.groups)
    atomic_write_json(path, manifest)
    print(manifest["summary"])
    print(f"manifest: {path}")


if __name__ == "__main__":
    run_main(main)
