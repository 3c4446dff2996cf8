"""
Stage 1: load a paired dataset and corrupt a ratio η of its conditions (Chen et al. 2024, App. B.1):
class labels (flips) or captions (swaps between examples; or user-supplied rewrites).

    python corrupt_data.py --dataset fashion-mnist --corrupt 0.025 --seed 0 --out-dir out

writes out/data/fashion-mnist/corrupt_symmetric_eta0.025_seed0.json: which examples changed, their
original and new labels, the realised ratio and the seed, and a one-line summary. train.py imports
the same functions, so the labels it trains on are exactly the ones in the manifest.

The corruption itself (symmetric / asymmetric label flips, caption swaps and rewrites, exact
counts, nesting over η) lives in models/corruption.py, which train.py and finetune.py call too.
With --vae it also pre-extracts the autoencoder latents train.py --vae reads; with --control, the
control maps finetune.py reads.
"""
import argparse
import os

import numpy as np
import torch
from tqdm import tqdm

from models.common import UsageError, atomic_write_json, run_main
from models.controls import control_cache_path, control_maps, seg_map_paths
from models.corruption import CORRUPT_TYPES, prepare_corruption
from models.data import DATASETS, dataset_key, latent_dir, load_dataset
from models.runs import check_writable
from models.vae import AutoencoderKL, encode_images, open_vae


def extract_latents(dataset, vae, vae_spec, out, batch_size=32, shard_size=50000, num_workers=4):
    """Encode every image and its horizontal flip once with the frozen autoencoder into shards of
    (rows, 2 flips, stats, C, h, w) float16; stats = (mean, logvar) for KL, (h,) for VQ. Shards are
    written atomically and skipped when present, so an interrupted extraction resumes."""
    kl, device = isinstance(vae, AutoencoderKL), next(vae.parameters()).device
    shards = [f"shard_{s:05d}.npy" for s in range(-(-len(dataset) // shard_size))]
    shape = None
    for s, name in enumerate(shards):
        path = os.path.join(out, name)
        rows = range(s * shard_size, min((s + 1) * shard_size, len(dataset)))
        if os.path.exists(path):
            shape = list(np.load(path, mmap_mode="r").shape[3:])
            continue
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, rows), batch_size=batch_size,
                                             num_workers=num_workers if not hasattr(dataset, "get_batch") else 0)
        parts = []
        for x, _ in tqdm(loader, desc=f"{name} ({len(shards)} shards)"):
            if x.shape[1] == 1 and vae.config["in_channels"] == 3:
                x = x.expand(-1, 3, -1, -1)  # grayscale data through an RGB autoencoder
            both = []
            for img in (x, x.flip(-1)):  # the image and its horizontal flip
                mean, logvar = encode_images(vae, img.to(device))
                both.append(torch.stack([mean, logvar] if kl else [mean], dim=1))
            parts.append(torch.stack(both, dim=1).half().cpu().numpy())
        arr = np.concatenate(parts)
        shape = list(arr.shape[3:])
        os.makedirs(out, exist_ok=True)
        tmp = path + ".tmp.npy"
        np.save(tmp, arr)
        os.replace(tmp, path)
    index = {"num_examples": len(dataset), "shard_size": shard_size, "shards": shards, "stats": 2 if kl else 1,
             "shape": shape, "kind": "AutoencoderKL" if kl else "VQModel", "vae": vae_spec,
             "scaling_factor": vae.scaling_factor, "image_size": dataset.image_size, "source": dataset.source}
    atomic_write_json(os.path.join(out, "index.json"), index)
    return index


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist", choices=DATASETS)
    p.add_argument("--data-path", default=None, help="dataset folder (default: Debian's copy of Fashion-MNIST, else download)")
    p.add_argument("--image-size", type=int, default=None, help="imagefolder: crop size (default 256)")
    p.add_argument("--corrupt", type=float, default=0.0, help="ratio η of conditions to corrupt, in [0, 1)")
    p.add_argument("--corrupt-type", default=None, choices=CORRUPT_TYPES, help="default: symmetric (labels), swap (captions)")
    p.add_argument("--groups", default=None, help="asymmetric: file of class groups (one per line)")
    p.add_argument("--rewrites", default=None, help="rewrite: file of `index<TAB>rewritten caption` lines")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="out")
    p.add_argument("--vae", default=None, help="pre-extract latents with this autoencoder (diffusers folder or hub id)")
    p.add_argument("--vae-batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=50000, help="images per latent shard")
    p.add_argument("--control", default=None, choices=("canny", "seg"), help="pre-compute finetune.py's control maps of the dataset")
    p.add_argument("--control-path", default=None, help="--control seg: folder of segmentation maps mirroring the image folder")
    p.add_argument("--canny-low", type=float, default=100.0, help="Canny thresholds (OpenCV's; the paper: 100 / 200)")
    p.add_argument("--canny-high", type=float, default=200.0)
    p.add_argument("--num-workers", type=int, default=4, help="image decoding workers (latents, control maps)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    if not 0 <= args.corrupt < 1:
        raise UsageError(f"--corrupt must be in [0, 1), got {args.corrupt}")
    check_writable(args.out_dir, "--out-dir")
    dataset = load_dataset(args.dataset, args.data_path, args.image_size, download_root=os.path.join(args.out_dir, "data", "downloads"))
    key = dataset_key(args.dataset, dataset)
    device = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    vae = open_vae(args.vae, device) if args.vae else None  # checked before anything is written
    if args.control == "seg":
        seg_map_paths(dataset, args.control_path, "train")  # every image has its map
    _, manifest, path = prepare_corruption(dataset, key, args.out_dir, args.corrupt, args.seed, args.corrupt_type, args.groups, args.rewrites)
    atomic_write_json(path, manifest)
    print(manifest["summary"])
    print(f"manifest: {path}")
    if vae is not None:
        out = latent_dir(args.out_dir, key, args.vae, dataset.image_size)
        index = extract_latents(dataset, vae, args.vae, out, args.vae_batch_size, args.shard_size, args.num_workers)
        print(f"latents: {out} ({index['num_examples']} images x 2 flips, {index['kind']}, shape {index['shape']})")
    if args.control:  # the cache finetune.py --control reads (the training split)
        cache = control_cache_path(args.out_dir, key, args.control, dataset.image_size, args.canny_low, args.canny_high, args.control_path)
        maps = control_maps(args.control, dataset, cache, args.control_path, "train", args.canny_low, args.canny_high, args.num_workers)
        print(f"control maps: {cache} ({maps.shape[0]} x {maps.shape[1]} x {maps.shape[2]} x {maps.shape[3]})")


if __name__ == "__main__":
    run_main(main)
