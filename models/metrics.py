"""
Evaluation metrics of the paper (Chen et al. 2024, Sec. 5 / App. C): FID, IS, KID, precision/recall,
density/coverage, top-1 % RMD, top-k L2 distance to the training set, memorisation ratio,
intra-class distance and condition accuracy. The networks that give the features (Inception pool3,
CLIP ViT-B/16, ...) are evaluate.py's business: everything here takes feature or logit arrays
(numpy or torch) and computes its statistics in float64.

Pairwise distances are computed block by block (at most `batch` × 8·`batch` entries at a time) as
‖x‖² + ‖y‖² − 2 x·y in float64, so 10 k × 10 k sets of 2 048-d features never build an N × N matrix.
Torch tensors stay on their device (pass CUDA tensors to run the k-NN metrics on a GPU). Comparisons
are made on squared distances, which keeps ties exact (a point at exactly the radius counts as
inside for `<=`, outside for `<`).
"""
import math

import warnings

import numpy as np
import torch
from scipy import linalg
from scipy.special import logsumexp


def _np64(x):
    """float64 numpy copy of an array or tensor."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _t64(x):
    """float64 torch tensor, 2-D; tensors keep their device."""
    x = x.detach().double() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, np.float64))
    return x.reshape(len(x), -1)


# ----------------------------------------------------------------------------------------------- FID
def feature_stats(feats):
    """Mean and covariance (float64, rows are samples) of a feature set: the Gaussian of FID."""
    f = _np64(feats).reshape(len(feats), -1)
    return f.mean(0), np.cov(f, rowvar=False)


class GaussianStats:
    """Streaming float64 moments of feature rows, fed batch by batch (bounded memory):
    - mean and covariance (1/(N−1), as np.cov): the Gaussian of FID / sFID;
    - per-class sums and counts for integer labels in [0, num_classes): the class Gaussians of RMD
      (class means and ONE shared within-class scatter Σ_k Σ_{y_i=k} (x_i − μ_k)(x_i − μ_k)^T
      = S − Σ_k s_k s_k^T / n_k, with S = Σ x x^T and s_k the class sums).
    Rows are centred on the first batch's mean before accumulating, so S − s sᵀ/N does not cancel
    catastrophically when the mean is large against the spread."""

    def __init__(self, dim, num_classes=0):
        self.n, self.shift = 0, None
        self.sum, self.scatter = np.zeros(dim), np.zeros((dim, dim))
        self.class_sums, self.class_counts = np.zeros((num_classes, dim)), np.zeros(num_classes, np.int64)

    def update(self, x, y=None):
        x = _np64(x).reshape(len(x), -1)
        if self.shift is None:
            self.shift = x.mean(0)
        x = x - self.shift
        self.n += len(x)
        self.sum += x.sum(0)
        self.scatter += x.T @ x
        if y is not None:
            y = torch.as_tensor(np.asarray(y, np.int64).ravel())
            self.class_sums += torch.zeros(self.class_sums.shape, dtype=torch.float64).index_add_(0, y, torch.from_numpy(x)).numpy()
            self.class_counts += np.bincount(y.numpy(), minlength=len(self.class_counts))
        return self

    def mean_cov(self):
        """(μ, Σ) with Σ = (S − s sᵀ/N) / (N − 1): FID's Gaussian (what feature_stats gives)."""
        if self.n < 2:
            raise ValueError("a covariance needs at least 2 samples")
        return self.shift + self.sum / self.n, (self.scatter - np.outer(self.sum, self.sum) / self.n) / (self.n - 1)

    def class_gaussians(self):
        """-> (class ids with samples, their means, shared within-class covariance (1/N), global mean,
        global covariance (1/N)): the Gaussians of RMD."""
        ids = np.flatnonzero(self.class_counts)
        sums, counts = self.class_sums[ids], self.class_counts[ids]
        within = self.scatter - (sums.T / counts) @ sums
        total = self.scatter - np.outer(self.sum, self.sum) / self.n
        return ids, self.shift + sums / counts[:, None], within / self.n, self.shift + self.sum / self.n, total / self.n

    def state(self):
        """Arrays to save (np.savez) and restore with from_state."""
        return {"n": np.int64(self.n), "shift": self.shift, "sum": self.sum, "scatter": self.scatter,
                "class_sums": self.class_sums, "class_counts": self.class_counts}

    @classmethod
    def from_state(cls, s):
        g = cls(len(s["sum"]), len(s["class_counts"]))
        g.n, g.shift, g.sum, g.scatter = int(s["n"]), np.asarray(s["shift"]), np.asarray(s["sum"]), np.asarray(s["scatter"])
        g.class_sums, g.class_counts = np.asarray(s["class_sums"]), np.asarray(s["class_counts"])
        return g


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2) (Heusel et al. 2017):
        ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½).
    If sqrtm is not finite (singular product), retry with eps·I added to both covariances. A complex
    square root (round-off around zero eigenvalues) is accepted only when its imaginary diagonal is
    at most 1e-3 in magnitude; its real part is then used."""
    mu1, mu2 = np.atleast_1d(_np64(mu1)), np.atleast_1d(_np64(mu2))
    sigma1, sigma2 = np.atleast_2d(_np64(sigma1)), np.atleast_2d(_np64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: {mu1.shape} {sigma1.shape} vs {mu2.shape} {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product (fewer samples than dims) is handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = eps * np.eye(len(mu1))
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise ValueError(f"sqrtm has an imaginary component of {imag:.3g} on its diagonal")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(f1, f2):
    """FID between two feature sets (Gaussians fitted by `feature_stats`)."""
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


# ----------------------------------------------------------------------------------------- KID, IS
def kernel_inception_distance(f1, f2, num_subsets=100, max_subset_size=1000, seed=0):
    """KID (Bińkowski et al. 2018): unbiased MMD² with the kernel k(x, y) = (x·y / d + 1)³, over
    `num_subsets` random subsets of m = min(N1, N2, max_subset_size) points drawn without
    replacement from each set (numpy generator seeded by `seed`). Returns (mean, std) over subsets.
    Either set may be a memmap: only the subsets are read (rows in sorted order; MMD² is invariant
    to the order within a subset)."""
    x_all, y_all = f1, f2
    d = x_all.shape[1]
    m = min(len(x_all), len(y_all), max_subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 samples per set")
    rng = np.random.default_rng(seed)
    mmds = []
    for _ in range(num_subsets):
        x = _np64(x_all[np.sort(rng.choice(len(x_all), m, replace=False))])
        y = _np64(y_all[np.sort(rng.choice(len(y_all), m, replace=False))])
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        mmds.append(within - 2 * kxy.sum() / m ** 2)
    return float(np.mean(mmds)), float(np.std(mmds))


def inception_score(logits, splits=10):
    """IS (Salimans et al. 2016) = exp(E_x KL(p(y|x) ‖ p(y))), p(y) the mean of p(y|x) over a split.
    Computed in float64 from log-softmax(logits); the samples are cut in order into `splits`
    contiguous splits (as the ADM evaluator does). Returns (mean, std) over splits."""
    logits = _np64(logits)
    n = len(logits)
    if n < splits:
        raise ValueError(f"{n} samples cannot be cut into {splits} splits")
    logp = logits - logsumexp(logits, axis=1, keepdims=True)
    scores = []
    for s in range(splits):
        part = logp[s * n // splits:(s + 1) * n // splits]
        log_py = logsumexp(part, axis=0) - math.log(len(part))
        kl = (np.exp(part) * (part - log_py)).sum(1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------- k-NN machinery
ROWS = 16384  # rows of a (memory-mapped) feature array turned into float64 at a time


def _device(*arrays):
    """The device of the first torch tensor among `arrays` (CPU for numpy arrays and memmaps)."""
    return next((a.device for a in arrays if isinstance(a, torch.Tensor)), torch.device("cpu"))


def _unit_rows(x):
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _chunks(a, device, rows=ROWS, unit=False):
    """Yield (start, float64 tensor on `device`) over row chunks of an array, memmap or tensor: only
    `rows` rows are ever converted at once, so a float16 feature file on disk is never loaded whole.
    unit: L2-normalise each row."""
    for s in range(0, len(a), rows):
        x = _t64(a[s:s + rows]).to(device)
        yield s, _unit_rows(x) if unit else x


def _sq_dist_blocks(x, y, batch):
    """Yield (i, j, D) with D[a, b] = ‖x[i + a] − y[j + b]‖², blocks of ≤ batch × 8·batch."""
    xx, yy = (x * x).sum(1), (y * y).sum(1)
    cols = 8 * batch
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        for j in range(0, len(y), cols):
            d2 = xx[i:i + batch, None] + yy[None, j:j + cols] - 2 * xb @ y[j:j + cols].T
            yield i, j, d2.clamp_min_(0)


def _pair_blocks(x, y, batch, rows=ROWS, unit=False):
    """Yield (i, j, D) over all of x × y (global offsets), chunk by chunk: both sets may be memmaps."""
    device = _device(x, y)
    for i0, xc in _chunks(x, device, rows, unit):
        for j0, yc in _chunks(y, device, rows, unit):
            for i, j, d2 in _sq_dist_blocks(xc, yc, batch):
                yield i0 + i, j0 + j, d2


def _mask_self(d2, i, j):
    """Set the entries pairing a point with itself (same set, global row i + a == column j + b) to inf."""
    rows = torch.arange(d2.shape[0], device=d2.device)
    cols = rows + i - j
    ok = (cols >= 0) & (cols < d2.shape[1])
    d2[rows[ok], cols[ok]] = math.inf
    return d2


def _knn_sq(x, y, k, batch, exclude_self=False, rows=ROWS, unit=False):
    """(len(x), k) squared distances from each x to its k nearest y, ascending. With exclude_self
    (x is y) a point is not its own neighbour; exact duplicates still are. x and y may be memmaps:
    they are read `rows` rows at a time (unit: rows L2-normalised first)."""
    if len(y) - int(exclude_self) < k:
        raise ValueError(f"need more than {k} reference points, got {len(y)}")
    best = torch.full((len(x), k), math.inf, dtype=torch.float64, device=_device(x, y))
    for i, j, d2 in _pair_blocks(x, y, batch, rows, unit):
        if exclude_self:
            _mask_self(d2, i, j)
        r = slice(i, i + d2.shape[0])
        best[r] = torch.cat([best[r], d2], 1).topk(k, dim=1, largest=False).values
    return best


# ------------------------------------------------------------------------------ manifold metrics
def precision_recall(real, fake, k=3, batch=1024, rows=ROWS):
    """Improved precision and recall (Kynkäänniemi et al. 2019). Each point's radius is the distance
    to its k-th nearest neighbour in its own set (itself excluded). precision = share of fake points
    within (<=) the radius of at least one real point; recall = share of real points within the
    radius of at least one fake point. Either set may be a memmap (read in chunks of `rows`)."""
    r2_real = _knn_sq(real, real, k, batch, exclude_self=True, rows=rows)[:, -1]
    r2_fake = _knn_sq(fake, fake, k, batch, exclude_self=True, rows=rows)[:, -1]
    fake_in = torch.zeros(len(fake), dtype=torch.bool, device=r2_fake.device)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=r2_real.device)
    for i, j, d2 in _pair_blocks(fake, real, batch, rows):
        fake_in[i:i + d2.shape[0]] |= (d2 <= r2_real[None, j:j + d2.shape[1]]).any(1)
        real_in[j:j + d2.shape[1]] |= (d2 <= r2_fake[i:i + d2.shape[0], None]).any(0)
    return fake_in.double().mean().item(), real_in.double().mean().item()


def density_coverage(real, fake, k=5, batch=1024, rows=ROWS):
    """Density and coverage (Naeem et al. 2020), balls B(X_i, r_i) around real points with r_i the
    k-th nearest-neighbour distance among the real points (itself excluded), strict `<`:
        density  = 1/(kM) Σ_j Σ_i 1[Y_j ∈ B(X_i, r_i)]   (can exceed 1)
        coverage = 1/N Σ_i 1[min_j ‖X_i − Y_j‖ < r_i]."""
    r2 = _knn_sq(real, real, k, batch, exclude_self=True, rows=rows)[:, -1]
    count = 0
    nearest = torch.full((len(real),), math.inf, dtype=torch.float64, device=r2.device)
    for i, j, d2 in _pair_blocks(fake, real, batch, rows):
        cols = slice(j, j + d2.shape[1])
        count += (d2 < r2[None, cols]).sum().item()
        nearest[cols] = torch.minimum(nearest[cols], d2.min(0).values)
    return count / (k * len(fake)), (nearest < r2).double().mean().item()


# ------------------------------------------------------------------- RMD, memorisation, diversity
def _whitener(cov, rcond):
    """W with ‖W^T v‖² = v^T Σ⁺ v: eigenvectors / √eigenvalue, eigenvalues ≤ rcond·λ_max dropped."""
    w, v = np.linalg.eigh(cov)
    keep = w > rcond * w.max()
    return v[:, keep] / np.sqrt(w[keep])


def rmd(train_feats, train_labels, feats, labels, rcond=1e-10, chunk=65536):
    """Relative Mahalanobis distance (Ren et al. 2021), per sample, at the sample's own label k:
        RMD(x, k) = MD_k(x) − MD_0(x),  MD_k(x) = (x − μ_k)^T Σ⁻¹ (x − μ_k),
        MD_0(x) = (x − μ_0)^T Σ_0⁻¹ (x − μ_0),
    with class means μ_k and ONE shared (pooled within-class, 1/N) covariance Σ fitted on the
    training features, and N(μ_0, Σ_0) fitted on all training features. The training statistics
    are accumulated `chunk` rows at a time (GaussianStats; train_feats may be a memmap)."""
    classes, y = np.unique(np.asarray(train_labels), return_inverse=True)
    y = y.ravel()
    stats = GaussianStats(train_feats.shape[1], len(classes))
    for s in range(0, len(train_feats), chunk):
        stats.update(train_feats[s:s + chunk], y[s:s + chunk])
    labels = np.asarray(labels).ravel()
    k = np.searchsorted(classes, labels).clip(0, len(classes) - 1)
    if not (classes[k] == labels).all():
        raise ValueError(f"labels without training samples: {np.setdiff1d(labels, classes)[:10]}")
    return rmd_from_stats(stats, feats, k, rcond)


def rmd_from_stats(stats, feats, labels, rcond=1e-10):
    """RMD (see `rmd`) from the training set's GaussianStats (class ids = labels). Features can be
    rank-deficient (fewer samples than dims, features on a sphere), so Σ⁻¹ is the pseudo-inverse
    from eigh with eigenvalues ≤ rcond·λ_max dropped: distances are measured inside the span of the
    training data."""
    ids, means, cov, mu0, cov0 = stats.class_gaussians()
    labels = np.asarray(labels).ravel()
    pos = np.searchsorted(ids, labels).clip(0, max(len(ids) - 1, 0))
    if len(ids) == 0 or not (ids[pos] == labels).all():
        raise ValueError(f"labels without training samples: {np.setdiff1d(labels, ids)[:10]}")
    w, w0 = _whitener(cov, rcond), _whitener(cov0, rcond)
    f = _np64(feats)
    return (((f - means[pos]) @ w) ** 2).sum(1) - (((f - mu0) @ w0) ** 2).sum(1)


def top_fraction_mean(values, fraction=0.01):
    """Mean of the largest ceil(fraction·N) values (the paper's "top-1 % RMD")."""
    v = _np64(values).ravel()
    n = min(len(v), max(1, math.ceil(round(fraction * len(v), 9))))  # round: 0.07·100 = 7.000…1
    return float(np.sort(v)[-n:].mean())


def topk_l2(train_feats, feats, k=5, batch=1024, unit=False, rows=ROWS):
    """Mean over samples of the mean L2 distance to their k nearest training features (the paper's
    "average top-5 L2 distance", CLIP ViT-B/16 features). train_feats may be a memmap (read `rows`
    rows at a time); unit: L2-normalise every feature first."""
    d = _knn_sq(feats, train_feats, k, batch, rows=rows, unit=unit).sqrt()
    return d.mean().item()


def memorization_ratio(train_feats, feats, threshold, batch=1024, unit=False, rows=ROWS):
    """Share of samples whose nearest training feature is at L2 distance < threshold (the paper:
    0.12 on CLIP ViT-B/16 features). Memory as topk_l2."""
    d = _knn_sq(feats, train_feats, 1, batch, rows=rows, unit=unit)[:, 0].sqrt()
    return (d < threshold).double().mean().item()


def intra_class_distance(feats, labels, batch=1024):
    """Mean over classes of the mean L2 distance between distinct samples of the class (i ≠ j):
    diversity within a class. Classes with fewer than two samples are skipped."""
    f, labels = _t64(feats), np.asarray(labels).ravel()
    means = []
    for c in np.unique(labels):
        x = f[torch.as_tensor(np.flatnonzero(labels == c), device=f.device)]
        if len(x) < 2:
            continue
        total = sum(_mask_self(d2, i, j).sqrt().nan_to_num(posinf=0.0).sum().item()
                    for i, j, d2 in _sq_dist_blocks(x, x, batch))
        means.append(total / (len(x) * (len(x) - 1)))
    if not means:
        raise ValueError("no class has two samples")
    return float(np.mean(means))


def condition_accuracy(logits, labels):
    """Share of samples whose argmax class equals the label they were generated for."""
    pred = _np64(logits).argmax(1)
    return float((pred == np.asarray(labels).ravel()).mean())


# ----------------------------------------------------------------------------------------- TopP&R
def _cosine_kde(points, data, h, weights, batch):
    """(len(points), W) cosine-kernel density estimates at `points` of `data` weighted by each column of
    `weights`: p̂_w(x) = (1/n) Σ_i w_i cos(π‖x − X_i‖/2h)·1[‖x − X_i‖ ≤ h], blocks of the kernel matrix
    only. The factor (π/4h)^d is left out: it cancels against a band computed with the same h."""
    out = torch.zeros(len(points), weights.shape[1], dtype=torch.float64, device=weights.device)
    for i, j, d2 in _sq_dist_blocks(points, data, batch):
        u2 = d2 / (h * h)
        kern = torch.where(u2 <= 1, torch.cos(0.5 * math.pi * u2.clamp_max(1).sqrt()), torch.zeros_like(u2))
        out[i:i + len(d2)] += kern @ weights[j:j + d2.shape[1]]
    return out / len(data)


def _balloon_bandwidth(x, k, batch):
    """The authors' bandwidth: for each of the first n − k points, the distance to its k-th nearest
    neighbour among the points AFTER it (upper triangle of the distance matrix, so it depends on the
    order of the rows); h = the ⌊(n − k)/2⌋-th smallest of these n − k radii (a lower median)."""
    n = len(x)
    best = torch.full((n - k, k), math.inf, dtype=torch.float64, device=x.device)
    for i, j, d2 in _sq_dist_blocks(x[:n - k], x, batch):
        rows = torch.arange(i, i + len(d2), device=x.device)[:, None]
        d2 = d2.masked_fill(torch.arange(j, j + d2.shape[1], device=x.device)[None] <= rows, math.inf)
        best[i:i + len(d2)] = torch.cat([best[i:i + len(d2)], d2], 1).topk(k, dim=1, largest=False).values
    return best[:, -1].sort().values[max((n - k) // 2 - 1, 0)].sqrt().item()


def _kde_support(x, h, alpha, num_boot, rng, batch):
    """KDE p̂ at the points themselves (each counts in its own density) and the confidence band
    c_α = (1 − α) quantile (linear interpolation) over `num_boot` bootstrap resamples (n draws with
    replacement, rng.randint, as the package's np.random.choice) of sup_i |p̂*(X_i) − p̂(X_i)|; a
    resample is a reweighting by its counts, so all come out of one pass over the kernel matrix."""
    n = len(x)
    draws = rng.randint(n, size=(num_boot, n)) + n * np.arange(num_boot)[:, None]
    counts = np.bincount(draws.ravel(), minlength=num_boot * n).reshape(num_boot, n).T
    weights = torch.cat([torch.ones(n, 1, dtype=torch.float64), torch.from_numpy(counts.astype(np.float64))], 1)
    dens = _cosine_kde(x, x, h, weights.to(x.device), batch)
    sups = (dens[:, 1:] - dens[:, :1]).abs().max(0).values.cpu().numpy()
    return dens[:, 0], float(np.quantile(sups, 1 - alpha))


def top_pr(real, fake, alpha=0.1, k=None, num_boot=10, proj_dim=32, max_points=10000, seed=0, batch=1024):
    """TopP&R (Kim et al., NeurIPS 2023, Sec. 3) as the authors' package top-pr 0.2.1 (compute_top_pr)
    computes it. Each set gets its own cosine-kernel KDE p̂_h(x) = (1/n) Σ_i K(‖x − X_i‖/h), with the
    package's bandwidth (`_balloon_bandwidth`, k = 5·dim) and bootstrap confidence band c_α
    (`_kde_support`); its significant support is supp̂(P) = p̂⁻¹(c_X, ∞), likewise supp̂(Q). Then
        TopP = Σ_j 1[Y_j ∈ supp̂(P) ∩ supp̂(Q)] / Σ_j 1[Y_j ∈ supp̂(Q)]
        TopR = Σ_i 1[X_i ∈ supp̂(Q) ∩ supp̂(P)] / Σ_i 1[X_i ∈ supp̂(P)]
    (NaN over an empty support) and F1 = 2PR / (P + R), 0 unless P, R > 1e-4. Features of more than
    `proj_dim` dims are first mapped by a Gaussian random projection (Xavier-normal as the package's;
    its scale cancels). The package draws its own projection (torch seed 99) and bootstraps
    (np.random seeded 42); ours come from np.random.RandomState(seed) in the package's order, so with
    ≤ `proj_dim` dims the bootstraps are the package's after np.random.seed(seed). Beyond the package:
    float64 (it rounds to float32), at most `max_points` points per set (seeded subsets, read row by
    row from memmaps), NaN where a set has ≤ k points and the same estimator at ≤ 3 dims (it fails
    on both). Returns (precision, recall, F1)."""
    rng = np.random.RandomState(seed)
    sets = []
    for a in (real, fake):
        rows = np.sort(rng.choice(len(a), max_points, replace=False)) if len(a) > max_points else slice(None)
        sets.append(_t64(a[rows]))
    x, y = sets[0], sets[1].to(sets[0].device)
    if proj_dim and x.shape[1] > proj_dim:
        std = math.sqrt(2 / (x.shape[1] + proj_dim))
        proj = torch.from_numpy(rng.standard_normal((x.shape[1], proj_dim)) * std).to(x.device)
        x, y = x @ proj, y @ proj
    k = k or 5 * x.shape[1]
    if min(len(x), len(y)) <= k:  # the package fails here (no point has k others after it)
        return math.nan, math.nan, math.nan
    hx, hy = _balloon_bandwidth(x, k, batch), _balloon_bandwidth(y, k, batch)
    (px, cx), (py, cy) = (_kde_support(x, hx, alpha, num_boot, rng, batch),  # real resamples first
                          _kde_support(y, hy, alpha, num_boot, rng, batch))
    one = lambda t: torch.ones(len(t), 1, dtype=torch.float64, device=t.device)  # noqa: E731
    y_in_p = _cosine_kde(y, x, hx, one(x), batch)[:, 0] > cx  # fake points inside the real support
    x_in_q = _cosine_kde(x, y, hy, one(y), batch)[:, 0] > cy  # real points inside the fake support
    p, r = y_in_p[py > cy].double().mean().item(), x_in_q[px > cx].double().mean().item()
    return p, r, (2 * p * r / (p + r) if p > 1e-4 and r > 1e-4 else 0.0)


# ------------------------------------------------------------------------------ VQ codebook usage
def codebook_usage(counts):
    """Usage of a VQ codebook from the counts of each code over all images and positions:
    entropy H = −Σ p_k log2 p_k in bits, perplexity 2^H (the effective number of codes) and the
    share of the K codes used at least once."""
    c = _np64(counts).ravel()
    if c.sum() <= 0:
        raise ValueError("no codes counted")
    p = c[c > 0] / c.sum()
    h = float(-(p * np.log2(p)).sum())
    return h, float(2.0 ** h), float((c > 0).mean())
