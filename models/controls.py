"""
Edge-map controls: a vectorised PyTorch port of OpenCV's Canny detector (to turn images into edge-map
conditions) and an edge F1 score. The F1 is a control-fidelity metric: the agreement between the edge
map a sample was asked to follow and the Canny map of the image that was generated.
"""
import math

import torch
import torch.nn.functional as F

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
