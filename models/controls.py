"""
Spatial controls for finetune.py / sample.py / evaluate.py: a vectorised PyTorch port of OpenCV's
Canny detector (to turn images into edge-map conditions), an edge F1 score, segmentation colour maps
read from a folder, the per-dataset control-map cache, and ControlData (a dataset with its controls).
The F1 is a control-fidelity metric: the agreement between the edge map a sample was asked to follow
and the Canny map of the image that was generated.
"""
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.common import UsageError
from models.data import IMAGE_EXTENSIONS, FashionMNIST, SubsetData, _key

TG22 = 13573  # round(tan(22.5 deg) * 2**15), OpenCV's fixed-point constant (CANNY_SHIFT = 15)


def _dilate(x, r):
    """Binary dilation of a bool (N, C, H, W) tensor by a (2r+1) x (2r+1) square (outside counts as False)."""
    H, W = x.shape[-2:]
    p = F.pad(x, (r, r, r, r))
    rows = p[:, :, :H]
    for i in range(1, 2 * r + 1):  # separable: OR over the vertical shifts, then over the horizontal ones
        rows = rows | p[:, :, i:i + H]
    out = rows[..., :W]
    for j in range(1, 2 * r + 1):
        out = out | rows[..., j:j + W]
    return out


def _sobel(x):
    """OpenCV's 3x3 Sobel dx, dy (int32) with BORDER_REPLICATE, on an integer (N, C, H, W) tensor."""
    H, W = x.shape[-2:]
    rows = torch.arange(-1, H + 1, device=x.device).clamp(0, H - 1)
    cols = torch.arange(-1, W + 1, device=x.device).clamp(0, W - 1)
    p = x.int()[:, :, rows][:, :, :, cols]  # replicate-padded by one pixel, (N, C, H+2, W+2)
    s = p[:, :, :-2] + 2 * p[:, :, 1:-1] + p[:, :, 2:]  # vertical smoothing [1, 2, 1]
    t = p[..., :-2] + 2 * p[..., 1:-1] + p[..., 2:]  # horizontal smoothing [1, 2, 1]
    return s[..., 2:] - s[..., :-2], t[:, :, 2:] - t[:, :, :-2]


def canny(images, low=100.0, high=200.0):
    """cv2.Canny(img, low, high) (apertureSize=3, L2gradient=False) on a uint8 (N, C, H, W) tensor, C = 1 or 3.
    Returns a uint8 (N, 1, H, W) tensor of 0 / 255, equal to OpenCV's output pixel for pixel. All integer
    arithmetic, as in OpenCV, so there are no floating-point ties."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"canny wants a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
    low, high = sorted((low, high))  # OpenCV swaps the thresholds if low > high, then floors them
    low, high = math.floor(low), math.floor(high)
    dx, dy = _sobel(images)
    mag = dx.abs() + dy.abs()  # L1 magnitude
    if mag.shape[1] > 1:  # colour: per pixel, the channel with the largest magnitude (the first on ties) wins
        idx = mag.argmax(1, keepdim=True)
        mag, dx, dy = mag.gather(1, idx), dx.gather(1, idx), dy.gather(1, idx)
    m = F.pad(mag, (1, 1, 1, 1))  # magnitudes outside the image count as 0
    c = m[:, :, 1:-1, 1:-1]

    def nb(di, dj):  # the neighbour at row offset di, column offset dj
        return m[:, :, 1 + di:m.shape[2] - 1 + di, 1 + dj:m.shape[3] - 1 + dj]

    # non-maximum suppression in four direction bins: |dy| / |dx| against tan(22.5) and tan(67.5) in fixed point.
    # Like OpenCV, strict against the left / upper neighbour and >= against the right / lower one, but strict
    # on both sides for the diagonals; the diagonal is the one along the gradient, picked by the sign of dx * dy
    xs, ys = dx.abs(), dy.abs() << 15
    tg22x = xs * TG22
    tg67x = tg22x + (xs << 16)
    s_neg = (dx < 0) != (dy < 0)  # OpenCV: s = (dx ^ dy) < 0 ? -1 : 1
    horizontal = (c > nb(0, -1)) & (c >= nb(0, 1))
    vertical = (c > nb(-1, 0)) & (c >= nb(1, 0))
    diagonal = torch.where(s_neg, (c > nb(-1, 1)) & (c > nb(1, -1)),  # up-right / down-left
                           (c > nb(-1, -1)) & (c > nb(1, 1)))  # up-left / down-right
    keep = torch.where(ys < tg22x, horizontal, torch.where(ys > tg67x, vertical, diagonal))
    weak = keep & (mag > low)  # the candidates

    # hysteresis: grow the strong pixels through the weak ones with 8-connectivity until nothing changes,
    # iterating only over the images that are still changing
    edges = weak & (mag > high)
    active = torch.arange(len(edges), device=edges.device)
    while len(active):
        e = edges[active]
        grown = _dilate(e, 1) & weak[active]
        edges[active] = grown
        active = active[(grown != e).flatten(1).any(1)]
    return edges.to(torch.uint8) * 255


def edge_f1(pred, target, tolerance=1):
    """Per-image F1 (N,) between edge maps (N, 1, H, W) (bool or uint8 0 / 255): a predicted (target) edge pixel
    counts as correct (recalled) if the other map has an edge pixel within Chebyshev distance `tolerance`.
    Both maps empty gives 1, exactly one empty gives 0."""
    pred, target = pred != 0, target != 0
    n_pred, n_target = pred.sum((1, 2, 3)), target.sum((1, 2, 3))
    precision = (pred & _dilate(target, tolerance)).sum((1, 2, 3)) / n_pred.clamp(min=1)
    recall = (target & _dilate(pred, tolerance)).sum((1, 2, 3)) / n_target.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)  # 0 when precision + recall = 0
    return torch.where((n_pred == 0) & (n_target == 0), 1.0, f1)


# ------------------------------------------------------------------ control maps of a dataset

def load_seg_map(path, image_size):
    """A segmentation colour map (SAM output rendered as colours) -> uint8 (3, S, S): the short side
    resized with nearest neighbours (no blended colours), then the central square (as the images)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = image_size / min(img.size)
        img = img.resize(tuple(max(image_size, round(x * scale)) for x in img.size), resample=Image.NEAREST)
        arr = np.asarray(img)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size].transpose(2, 0, 1)


def seg_map_paths(dataset, control_path, split):
    """Where the segmentation map of each example lives: a folder mirroring the image folder (same
    relative path, any image extension), or <control_path>/<split>/<index:05d>.png for Fashion-MNIST."""
    if control_path is None or not os.path.isdir(control_path):
        raise UsageError(f"--control seg needs --control-path, a folder of segmentation maps ({control_path} is not a folder)")
    base = dataset
    while isinstance(base, SubsetData):
        base = base.base
    if isinstance(base, FashionMNIST):
        stems = [os.path.join(control_path, split, f"{i:05d}") for i in range(len(base))]
    elif hasattr(base, "paths"):
        root = base.source if os.path.isdir(base.source) else os.path.dirname(base.source)
        stems = [os.path.join(control_path, os.path.splitext(os.path.relpath(p, root))[0]) for p in base.paths]
    else:
        raise UsageError("segmentation maps need an image dataset (fashion-mnist, imagefolder, captions)")
    found = {}
    for directory in {os.path.dirname(s) for s in stems}:
        for f in os.listdir(directory) if os.path.isdir(directory) else []:
            stem, ext = os.path.splitext(f)
            if ext.lower() in IMAGE_EXTENSIONS:
                found[os.path.join(directory, stem)] = os.path.join(directory, f)
    paths = [found.get(s) for s in stems]
    missing = [s for s, p in zip(stems, paths) if p is None]
    if missing:
        raise UsageError(f"{len(missing)} of {len(stems)} images have no segmentation map in {control_path}, e.g. {missing[0]}.png")
    return paths


def image_uint8(dataset, indices, batch_size=256, num_workers=0):
    """uint8 (B, C, S, S) images of a dataset (pixels, before any latent encoding); files are
    decoded by num_workers DataLoader workers."""
    to_uint8 = lambda x: ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # noqa: E731
    if hasattr(dataset, "get_batch"):
        return torch.cat([to_uint8(dataset.get_batch(torch.as_tensor(chunk)))
                          for chunk in np.array_split(indices, max(1, -(-len(indices) // batch_size)))])
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, [int(i) for i in indices]),
                                         batch_size=batch_size, num_workers=num_workers)
    return torch.cat([to_uint8(x) for x, _ in loader])


def control_cache_path(out_dir, key, control, image_size, low=100, high=200, control_path=None):
    """Where finetune.py (and corrupt_data.py --control, ahead of time) keep a dataset's control maps."""
    import hashlib
    name = (f"control-canny{low:g}-{high:g}" if control == "canny" else
            "control-seg-" + hashlib.sha1(os.path.abspath(control_path).encode()).hexdigest()[:8])
    return os.path.join(out_dir, "data", key, f"{name}-{image_size}.npy")


def control_maps(kind, images_dataset, cache_path, control_path=None, split="train", low=100, high=200, num_workers=0):
    """The control image of every example, uint8 (N, C, S, S), computed once and kept in
    cache_path (.npy, memory-mapped): Canny edges (1 channel, 0/255, OpenCV's thresholds) of the
    uint8 image, or segmentation colour maps (3 channels) read from control_path (cache_path:
    control_cache_path, which names a segmentation cache after its folder)."""
    if kind == "seg":  # checked every time: a map missing now is an error even with a cache
        paths = seg_map_paths(images_dataset, control_path, split)
    if os.path.exists(cache_path):
        maps = np.load(cache_path, mmap_mode="r")
        if len(maps) == len(images_dataset):
            return maps
    n, size = len(images_dataset), images_dataset.image_size
    channels = 1 if kind == "canny" else 3
    tmp = cache_path + ".tmp.npy"
    os.makedirs(os.path.dirname(cache_path) or ".", exist_ok=True)
    maps = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, channels, size, size))
    for start in range(0, n, 1024):
        rows = np.arange(start, min(start + 1024, n))
        if kind == "canny":
            maps[rows] = canny(image_uint8(images_dataset, rows, num_workers=num_workers), low, high).numpy()
        else:
            maps[rows] = np.stack([load_seg_map(paths[i], size) for i in rows])
    maps.flush()
    del maps
    os.replace(tmp, cache_path)
    return np.load(cache_path, mmap_mode="r")


class ControlData(torch.utils.data.Dataset):
    """A training dataset plus the control image of each example (float in [0, 1], at image
    resolution, also when the training data are latents): get_batch / __getitem__ give
    ((x, control), index); a horizontally flipped example gets its flipped control map."""

    def __init__(self, dataset, maps, rows=None):
        """maps: control maps of the full split (control_maps); rows: the map row of each example."""
        self.dataset, self.maps = dataset, maps
        self.rows = np.arange(len(dataset)) if rows is None else np.asarray(rows)
        for name in ("source", "labels", "classes", "captions", "image_size", "channels", "random_flip", "index"):
            if hasattr(dataset, name):
                setattr(self, name, getattr(dataset, name))
        if hasattr(dataset, "get_batch"):
            self.get_batch = self._get_batch

    def control(self, indices, flips=None):
        c = torch.from_numpy(np.ascontiguousarray(self.maps[self.rows[np.asarray(indices)]])).float() / 255.0
        return c if flips is None else torch.where(torch.as_tensor(flips).view(-1, 1, 1, 1), c.flip(-1), c)

    def _get_batch(self, indices, flips=None):
        if not getattr(self.dataset, "random_flip", False):  # data that are never flipped keep their maps as they are
            flips = None
        x = self.dataset.get_batch(indices, flips) if flips is not None else self.dataset.get_batch(indices)
        return x, self.control(indices.cpu().numpy(), flips.cpu() if flips is not None else None)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        i, flip = _key(key)
        return (self.dataset[(i, flip) if flip else i][0], self.control([i], [flip] if flip else None)[0]), i
