"""
Datasets shared by the stages. Each returns (image in [-1, 1], example index) from __getitem__ and
keeps its conditions beside the data (`labels`, and `captions` for text datasets), so the training
loop can swap in corrupted conditions without touching the data path.
"""
import gzip
import os
import re

import numpy as np
import torch
from PIL import Image

from torch.utils.data import DataLoader, DistributedSampler

from models.common import UsageError, derived_seed
from models.faults import BadImage, MarkBad, collate_marking_bad

FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # Debian: apt-get install dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_GROUPS = [["T-shirt/top", "Pullover", "Coat", "Shirt"], ["Sandal", "Sneaker", "Ankle boot"]]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DATASETS = ("fashion-mnist", "imagefolder", "fashion-mnist-captions", "captions")
# the embedded text default: Fashion-MNIST with captions from a few templates per class
FASHION_MNIST_NAMES = ["a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal", "a shirt",
                       "a sneaker", "a bag", "an ankle boot"]
CAPTION_TEMPLATES = ["a photo of {}", "a black and white photo of {}", "a small picture of {}",
                     "{} on a dark background", "a low-resolution photo of {}"]



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


class FashionMNISTCaptions(FashionMNIST):
    """Fashion-MNIST whose condition is a caption: example i of class k reads
    CAPTION_TEMPLATES[i mod 5] filled with the class name. `labels` stay for evaluation."""

    def __init__(self, data_path=None, split="train", download_root=None):
        super().__init__(data_path, split, download_root)
        self.captions = [CAPTION_TEMPLATES[i % len(CAPTION_TEMPLATES)].format(FASHION_MNIST_NAMES[k])
                         for i, k in enumerate(self.labels.tolist())]


def load_image(path, image_size, flip=False):
    """An RGB file -> float (3, S, S) in [-1, 1], ADM centre crop, optional horizontal flip. A file
    PIL cannot decode (truncated, not an image, gone) raises BadImage, one line naming it."""
    try:
        with Image.open(path) as img:
            arr = center_crop_arr(img.convert("RGB"), image_size)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImage(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    if flip:
        arr = arr[:, ::-1]
    return torch.from_numpy(arr.transpose(2, 0, 1).copy()).float() / 127.5 - 1.0


def _key(key):
    """A sampler key: an index, or (index, flip) from train.py, which draws the training flips
    itself (deterministically per epoch) so that they do not depend on the number of ranks."""
    return key if isinstance(key, (tuple, list)) else (key, False)


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
        i, flip = _key(key)
        return load_image(self.paths[i], self.image_size, flip), i


class CaptionImages(torch.utils.data.Dataset):
    """(image, caption) pairs as people have them for CC3M:
    - a TSV file of `path<TAB>caption` lines, or a CSV file with a header naming a path column
      (filepath / path / image / file) and a caption column (caption / text); relative paths are
      relative to the file;
    - img2dataset's "files" output folder: each image beside a .txt file holding its caption."""

    def __init__(self, source, image_size=256, skip_missing=False):
        if source is None or not os.path.exists(source):
            raise UsageError(f"--data-path {source} does not exist")
        self.source = os.path.abspath(source)
        pairs = self._read_table(source) if os.path.isfile(source) else self._read_img2dataset(source)
        missing = [p for p, _ in pairs if not os.path.isfile(p)]
        if missing and not skip_missing:
            raise UsageError(f"{len(missing)} image(s) listed in {source} do not exist, e.g. {missing[0]} (--skip-bad-files leaves them out)")
        if missing:  # --skip-bad-files
            print(f"--skip-bad-files: left out {len(missing)} listed image(s) that do not exist, e.g. {missing[0]}", flush=True)
            pairs = [(p, c) for p, c in pairs if os.path.isfile(p)]
        if not pairs:
            raise UsageError(f"no (image, caption) pairs in {source}")
        self.paths, self.captions = [p for p, _ in pairs], [c for _, c in pairs]
        self.labels, self.classes = None, None
        self.image_size, self.channels = image_size, 3

    @staticmethod
    def _read_table(path):
        import csv
        base = os.path.dirname(os.path.abspath(path))
        with open(path, newline="", encoding="utf-8") as f:
            if path.lower().endswith(".csv"):
                rows = list(csv.DictReader(f))
                if not rows:
                    return []
                cols = {c.lower(): c for c in rows[0]}
                pcol = next((cols[c] for c in ("filepath", "path", "image", "file") if c in cols), None)
                ccol = next((cols[c] for c in ("caption", "text") if c in cols), None)
                if pcol is None or ccol is None:
                    raise UsageError(f"{path}: the header needs a path column (filepath/path/image/file) and a caption column (caption/text)")
                pairs = [(r[pcol], r[ccol]) for r in rows]
                empty = [n for n, (p, _) in enumerate(pairs, 2) if not (p or "").strip()]
                if empty:
                    raise UsageError(f"{path}:{empty[0]}: no image path in the {pcol} column")
            else:
                pairs = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        if "\t" not in line:
                            raise UsageError(f"{path}:{n}: expected `path<TAB>caption`")
                        p, c = line.rstrip("\n").split("\t", 1)
                        if not p.strip():
                            raise UsageError(f"{path}:{n}: no image path before the tab")
                        pairs.append((p, c))
        return [(p if os.path.isabs(p) else os.path.join(base, p), c.strip()) for p, c in pairs]

    @staticmethod
    def _read_img2dataset(folder):
        pairs = []
        for dirpath, _, files in sorted(os.walk(folder)):
            for f in sorted(files):
                stem, ext = os.path.splitext(f)
                if ext.lower() in IMAGE_EXTENSIONS and os.path.exists(os.path.join(dirpath, stem + ".txt")):
                    with open(os.path.join(dirpath, stem + ".txt"), encoding="utf-8") as fh:
                        pairs.append((os.path.join(dirpath, f), fh.read().strip()))
        return pairs

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, key):
        i, flip = _key(key)
        return load_image(self.paths[i], self.image_size, flip), i


def load_dataset(name, data_path=None, image_size=None, split="train", download_root=None, skip_missing=False):
    if name == "fashion-mnist":
        if image_size not in (None, 32):
            raise UsageError("fashion-mnist is 28x28 padded to 32x32: --image-size must be 32")
        return FashionMNIST(data_path, split, download_root)
    if name == "fashion-mnist-captions":
        if image_size not in (None, 32):
            raise UsageError("fashion-mnist-captions is 28x28 padded to 32x32: --image-size must be 32")
        return FashionMNISTCaptions(data_path, split, download_root)
    if name == "imagefolder":
        return ImageFolderData(data_path, image_size or 256)
    if name == "captions":
        return CaptionImages(data_path, image_size or 256, skip_missing)
    raise UsageError(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}")


def dataset_key(name, dataset):
    """Folder name under <out-dir>/data/ for this dataset."""
    return name if name.startswith("fashion-mnist") else f"{name}-{os.path.basename(dataset.source.rstrip('/'))}"


class LatentDataset(torch.utils.data.Dataset):
    """Pre-extracted first-stage latents (corrupt_data.py --vae): shards of shape
    (rows, 2 flips, stats, C, h, w) float16, stats = (mean, logvar) for a KL autoencoder or (h,) for
    a VQ one. Conditions (labels / captions) come from the image dataset they were extracted from."""

    def __init__(self, latent_dir, base):
        index_path = os.path.join(latent_dir, "index.json")
        if not os.path.isfile(index_path):
            raise UsageError(f"no latents in {latent_dir}: run corrupt_data.py with the same --dataset, --image-size and --vae first")
        import json
        with open(index_path) as f:
            self.index = json.load(f)
        if self.index["num_examples"] != len(base):
            raise UsageError(f"{latent_dir} holds latents of {self.index['num_examples']} images, the dataset has {len(base)}")
        self.shards, rows = [], 0
        for name in self.index["shards"]:
            path = os.path.join(latent_dir, name)
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:  # missing, truncated, not an .npy
                raise UsageError(f"latent shard {path} is unreadable ({type(e).__name__}: {e}); "
                                 "extract the latents again (corrupt_data.py --vae)") from None
            want = (min(self.index["shard_size"], len(base) - rows), 2, self.index["stats"], *self.index["shape"])
            if arr.shape != want:
                raise UsageError(f"latent shard {name} has shape {arr.shape}, expected {want}")
            self.shards.append(arr)
            rows += arr.shape[0]
        self.source, self.labels, self.classes = base.source, base.labels, base.classes
        self.captions = getattr(base, "captions", None)
        self.channels, self.image_size = self.index["shape"][0], self.index["shape"][1]
        self.random_flip = True

    def __len__(self):
        return self.index["num_examples"]

    def get_batch(self, indices, flips=None):
        """(B, stats, C, h, w) float32 for example indices (and which of the two flips to use)."""
        size = self.index["shard_size"]
        idx = indices.cpu().numpy()
        flips = np.zeros(len(idx), dtype=np.int64) if flips is None else flips.cpu().numpy().astype(np.int64)
        out = np.empty((len(idx), self.index["stats"], *self.index["shape"]), dtype=np.float32)
        for s in np.unique(idx // size):
            rows = np.flatnonzero(idx // size == s)
            out[rows] = self.shards[s][idx[rows] - s * size, flips[rows]]
        return torch.from_numpy(out)

    def __getitem__(self, i):
        return self.get_batch(torch.tensor([i]))[0], i


def latent_dir(out_dir, key, vae_spec, image_size):
    """Where corrupt_data.py --vae stores, and train.py finds, the latents of a dataset."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(os.path.normpath(vae_spec)) if os.path.exists(vae_spec) else vae_spec)
    return os.path.join(out_dir, "data", key, f"latents-{name}-{image_size}")


# ------------------------------------------------------------------------ downstream data (finetune.py)

def read_class_list(path, classes):
    """A class-list file (one class per line: a folder name such as n01440764, a Fashion-MNIST class
    name, or a class index; IN-100 is such a list over IN-1K) -> sorted-unique class indices."""
    if not os.path.isfile(path):
        raise UsageError(f"--classes {path} does not exist")
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    lookup = {name: k for k, name in enumerate(classes)}
    picked = [lookup[n] if n in lookup else int(n) if n.isdigit() and int(n) < len(classes) else None for n in names]
    unknown = [n for n, k in zip(names, picked) if k is None]
    if unknown or not picked:
        raise UsageError(f"--classes {path}: " + (f"{len(unknown)} unknown class(es), e.g. '{unknown[0]}'" if unknown else "no classes"))
    return sorted(set(picked))


class SubsetData(torch.utils.data.Dataset):
    """Examples `indices` of a dataset; with relabel, labels become positions in `class_ids` (a new
    class set: --method full), else they keep the base's class ids (controls on a base's classes)."""

    def __init__(self, base, indices, class_ids=None):
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        self.source, self.image_size, self.channels = base.source, base.image_size, base.channels
        self.random_flip = getattr(base, "random_flip", False)
        if hasattr(base, "index"):  # latents: the autoencoder's scaling factor
            self.index = base.index
        self.captions = [base.captions[i] for i in self.indices] if getattr(base, "captions", None) is not None else None
        self.labels, self.classes = None, base.classes
        if base.labels is not None:
            self.labels = base.labels[self.indices]
            if class_ids is not None:
                remap = np.full(len(base.classes), -1, dtype=np.int64)
                remap[class_ids] = np.arange(len(class_ids))
                self.labels, self.classes = remap[self.labels], [base.classes[k] for k in class_ids]
        if hasattr(base, "get_batch"):
            self.get_batch = lambda idx, *flips: base.get_batch(torch.from_numpy(self.indices[idx.cpu().numpy()]), *flips)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, key):
        i, flip = _key(key)
        j = int(self.indices[i])
        return self.base[(j, flip) if flip else j][0], i


def batches(dataset, global_batch, rank, world, seed, start_step, num_workers, device):
    """Yield (images, example indices, epoch, bad) of this rank's share of each global batch, from
    start_step on. Rank r takes positions r, r+W, r+2W, ... of DistributedSampler's permutation,
    so the union over ranks of batch s is the same for every world size. bad: [(row, message)] of
    the image files that could not be decoded (zeros in their rows; models/faults.py)."""
    local_batch = global_batch // world
    steps_per_epoch = len(dataset) // global_batch
    step = start_step
    while True:
        epoch, offset = divmod(step, steps_per_epoch)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))[offset * local_batch: steps_per_epoch * local_batch]
        # horizontal flips (ImageFolder data and latents) fixed by (seed, epoch): resume and world size don't change them
        flips = torch.rand(len(dataset), generator=torch.Generator().manual_seed(derived_seed(seed, epoch, 1))) < 0.5
        if hasattr(dataset, "get_batch"):  # in-memory / memory-mapped data: vectorised gather, no workers
            def gathered(order=order, flips=flips):
                for chunk in order.split(local_batch):
                    yield dataset.get_batch(chunk, flips[chunk]) if getattr(dataset, "random_flip", False) else dataset.get_batch(chunk), chunk
            for x, chunk in (prefetched(gathered()) if device.type == "cuda" else gathered()):
                yield to_device(x, device), chunk.to(device, non_blocking=True), epoch, []
        else:  # files: workers decode
            keys = [(i, bool(flips[i])) for i in order.tolist()]
            loader = DataLoader(MarkBad(dataset), batch_size=local_batch, sampler=keys, num_workers=num_workers,
                                collate_fn=collate_marking_bad, pin_memory=device.type == "cuda", drop_last=True,
                                persistent_workers=False)
            for x, idx, bad in loader:
                yield to_device(x, device), idx.to(device), epoch, bad
        step += steps_per_epoch - offset


def prefetched(batches, depth=2, pin=True):
    """A batch iterator run `depth` batches ahead in a thread, each batch in pinned memory: the GPU
    computes the step while the next batch is gathered (e.g. from latent memory maps) and copied."""
    import queue
    import threading

    def pinned(x):
        if isinstance(x, (tuple, list)):
            return tuple(pinned(v) for v in x)
        return x.pin_memory() if pin else x
    ready, done = queue.Queue(depth), object()

    def work():
        try:
            for item in batches:
                ready.put(pinned(item))
        except BaseException as e:  # noqa: BLE001  (re-raised in the training loop)
            ready.put(e)
        ready.put(done)
    threading.Thread(target=work, daemon=True).start()
    while (item := ready.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def to_device(x, device):
    """A batch, or (batch, control images) from finetune.py's ControlData."""
    if isinstance(x, (tuple, list)):
        return tuple(v.to(device, non_blocking=True) for v in x)
    return x.to(device, non_blocking=True)
