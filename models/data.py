"""
Datasets shared by the stages. Each returns (image in [-1, 1], example index) from __getitem__ and
keeps its conditions beside the data (`labels`, and `captions` for text datasets), so the training
loop can swap in corrupted conditions without touching the data path.
"""
import gzip
import os

import numpy as np
import torch
from PIL import Image

from models.common import UsageError

FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # Debian: apt-get install dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_GROUPS = [["T-shirt/top", "Pullover", "Coat", "Shirt"], ["Sandal", "Sneaker", "Ankle boot"]]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DATASETS = ("fashion-mnist", "imagefolder")



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
