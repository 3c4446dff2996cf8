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
import json
import os

import numpy as np

from models.common import UsageError, atomic_write_json, run_main
from models.data import DATASETS, FASHION_MNIST_CLASSES, FASHION_MNIST_GROUPS, dataset_key, load_dataset

CORRUPT_TYPES = ("symmetric", "asymmetric")


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
