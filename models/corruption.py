"""
Condition corruption (Chen et al. 2024, App. B.1): class labels (flips) or captions (swaps between
examples; or user-supplied rewrites). corrupt_data.py writes the manifest of what changed; train.py
and finetune.py call the same functions, so they train on exactly the conditions in the manifest.

Labels
- symmetric (default): exactly round(η·N) examples, chosen uniformly without replacement, each
  flipped to another class drawn from the class prior restricted to the other K-1 classes.
- asymmetric: only examples of classes that belong to a group are eligible; round(η·N_eligible) of
  them are flipped to another class of the same group, drawn from the prior restricted to it (the
  paper: ImageNet classes shared with CIFAR-100). Fashion-MNIST ships tops / footwear groups;
  ImageFolder data takes --groups FILE (one group per line, class folder names separated by
  commas or spaces, '#' starts a comment).
Captions
- swap (default): random pairs of examples exchange captions (never for an identical string).
- rewrite: the paper's LLM rewrites, read from a user file.
round(η·N) rounds the decimal ratio the user typed, halves up: η = 0.145 of 100 corrupts 15.
Every corruption is a pure function of (conditions, seed, η): the same on any number of ranks, and
nested: one random priority order (and one candidate new label per example) is drawn from the
seed, and η only decides how long a prefix of that order is used, so the set at η=0.025 is a
subset of the set at η=0.05 (with the same new labels).
"""
import json
import os
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
import torch

from models.common import UsageError
from models.data import FASHION_MNIST_CLASSES, FASHION_MNIST_GROUPS

CORRUPT_TYPES = ("symmetric", "asymmetric", "swap", "rewrite")  # labels: the first two; captions: the last two


def corrupt_count(eta, n):
    """round(η·n) of the decimal ratio as typed (η's shortest repr), halves rounded up. In binary
    floats 0.145 * 100 = 14.499999999999998, so floor(η·n + 0.5) would corrupt 14, not 15."""
    return int((Decimal(repr(float(eta))) * int(n)).to_integral_value(rounding=ROUND_HALF_UP))


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


def caption_swap_pairs(captions, seed):
    """The pairs caption corruption swaps, best first: examples in a seeded random order, each
    paired with the earliest still-unpaired example whose caption is a different string. η only
    decides how many pairs (a prefix) are used, which makes the corrupted sets nested."""
    order = np.random.default_rng(seed).permutation(len(captions))
    pairs, waiting = [], []  # waiting: unpaired examples (only grows while captions repeat)
    for i in order.tolist():
        j = next((pos for pos, w in enumerate(waiting) if captions[w] != captions[i]), None)
        if j is None:
            waiting.append(i)
        else:
            pairs.append((waiting.pop(j), i))
    return pairs


def corrupt_captions(captions, eta, seed):
    """Swap captions between random pairs until exactly round(η·N) examples carry another
    example's caption (never an identical string); with an odd count the last pair is half a swap
    (its first example takes its partner's caption). Returns (new_captions, chosen, donors)."""
    m = corrupt_count(eta, len(captions))
    pairs = caption_swap_pairs(captions, seed)
    if 2 * len(pairs) < m:
        raise UsageError(f"only {2 * len(pairs)} captions can be swapped for a different string; η·N = {m}")
    new, donor = list(captions), {}
    for a, b in pairs[: m // 2]:
        new[a], new[b], donor[a], donor[b] = captions[b], captions[a], b, a
    if m % 2:
        a, b = pairs[m // 2]
        new[a], donor[a] = captions[b], b
    chosen = np.array(sorted(donor), dtype=np.int64)
    return new, chosen, np.array([donor[i] for i in chosen.tolist()], dtype=np.int64)


def rewrite_captions(captions, eta, seed, rewrites_file):
    """The paper's LLM-rewrite corruption from a user file of `index<TAB>rewritten caption` lines:
    round(η·N) examples, taken in a seeded random order among those with a different rewrite."""
    if rewrites_file is None or not os.path.isfile(rewrites_file):
        raise UsageError(f"--corrupt-type rewrite needs --rewrites FILE (index<TAB>caption lines); got {rewrites_file}")
    rewrites = {}
    with open(rewrites_file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                idx, _, text = line.rstrip("\n").partition("\t")
                if not idx.strip().isdigit() or not int(idx) < len(captions):
                    raise UsageError(f"{rewrites_file}:{n}: expected `index<TAB>caption` with index < {len(captions)}")
                rewrites[int(idx)] = text.strip()
    order = [i for i in np.random.default_rng(seed).permutation(len(captions)).tolist() if rewrites.get(i, captions[i]) != captions[i]]
    m = corrupt_count(eta, len(captions))
    if len(order) < m:
        raise UsageError(f"{rewrites_file} rewrites only {len(order)} captions; η·N = {m}")
    chosen = np.array(sorted(order[:m]), dtype=np.int64)
    new = list(captions)
    for i in chosen.tolist():
        new[i] = rewrites[i]
    return new, chosen, np.full(len(chosen), -1, dtype=np.int64)


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


def build_caption_manifest(key, dataset, eta, seed, kind, new_captions, chosen, donors):
    summary = (f"{key}: {len(chosen)} of {len(dataset)} captions changed ({len(chosen) / len(dataset):.4%}, "
               f"target η={eta:g}), {kind}, seed {seed}")
    return {
        "summary": summary, "dataset": key, "source": dataset.source, "num_examples": len(dataset), "corrupt": eta,
        "corrupt_type": kind, "groups": None, "seed": seed, "num_corrupted": int(len(chosen)),
        "realised_ratio": len(chosen) / len(dataset), "indices": chosen.tolist(), "donors": donors.tolist(),
        "original_captions": [dataset.captions[i] for i in chosen.tolist()],
        "new_captions": [new_captions[i] for i in chosen.tolist()],
    }


def is_text_dataset(dataset):
    return getattr(dataset, "captions", None) is not None


def prepare_corruption(dataset, key, out_dir, eta, seed, kind=None, groups_file=None, rewrites_file=None):
    """Corrupt the dataset's conditions (labels, or captions for text datasets); returns
    (new conditions, manifest dict, manifest path). Nothing is written here: the caller writes the
    manifest once all input has been checked. kind=None: symmetric for labels, swap for captions."""
    if not 0 <= eta < 1:
        raise UsageError(f"--corrupt must be in [0, 1), got {eta}")
    text = is_text_dataset(dataset)
    kind = kind or ("swap" if text else "symmetric")
    if text != (kind in ("swap", "rewrite")):
        raise UsageError(f"--corrupt-type {kind} does not apply to {'captions' if text else 'class labels'}"
                         f" (use {'swap or rewrite' if text else 'symmetric or asymmetric'})")
    if text:
        corrupt = rewrite_captions(dataset.captions, eta, seed, rewrites_file) if kind == "rewrite" else corrupt_captions(dataset.captions, eta, seed)
        new_conditions, chosen, donors = corrupt
        manifest = build_caption_manifest(key, dataset, eta, seed, kind, new_conditions, chosen, donors)
    else:
        groups = load_groups(groups_file, dataset.classes) if kind == "asymmetric" else None
        new_conditions, chosen = corrupt_labels(dataset.labels, len(dataset.classes), eta, seed, kind, groups)
        manifest = build_manifest(key, dataset, eta, seed, kind, groups, new_conditions, chosen)
    path = manifest_path(out_dir, key, kind, eta, seed)
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            raise UsageError(f"{path} exists but is not a readable manifest; move it away")
        same = isinstance(old, dict) and all(old.get(k) == manifest.get(k) for k in ("indices", "new_labels", "new_captions", "source"))
        if not same:
            raise UsageError(f"{path} holds a different corruption (another dataset copy?); use another --out-dir")
    return new_conditions, manifest, path


def resampled_conditions(dataset, eta, seed, manifest, epoch, device):
    """train.py --corrupt-resample: a fresh corrupted set each epoch (never the base seed's draw):
    captions (a list) or labels (a tensor on `device`)."""
    seed = [seed, 0xC0FFEE, epoch]
    if is_text_dataset(dataset):
        return corrupt_captions(dataset.captions, eta, seed)[0]
    labels, _ = corrupt_labels(dataset.labels, len(dataset.classes), eta, seed, manifest["corrupt_type"], manifest["groups"])
    return torch.from_numpy(labels).to(device)
