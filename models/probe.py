"""Has a class-conditional model learned its condition? On held-out images noised to a few
timesteps, compare the ε-prediction error with the true label, a wrong label and the null label,
and the rms difference between the conditional and unconditional predictions (what classifier-free
guidance amplifies: if it is ~0, every guidance scale gives the same images).

    python -m models.probe --ckpt out/<run>/ckpt/last.pt [--no-ema] [--num-images 256]

Prints one line per timestep; --json FILE also writes the numbers. Fashion-MNIST runs only (the
held-out images are its test split)."""
import argparse
import os

import torch

from models.build import model_from_checkpoint
from models.common import UsageError, atomic_write_json, run_main
from models.data import load_dataset
from models.diffusion import GaussianDiffusion

TIMESTEPS = (999, 700, 500, 300, 100)


@torch.no_grad()
def probe(model, diffusion, images, labels, timesteps=TIMESTEPS, seed=0):
    """{t: {"mse_true", "mse_wrong", "mse_null", "rms_cond_minus_uncond"}} on the given images.
    The wrong label of each image is another class drawn uniformly; noise and labels are fixed by seed."""
    g = torch.Generator().manual_seed(seed)
    K = model.num_classes
    wrong = (labels + torch.randint(1, K, labels.shape, generator=g)) % K
    null = torch.full_like(labels, K)
    out = {}
    for tv in timesteps:
        t = torch.full((len(images),), tv, dtype=torch.long)
        noise = torch.randn(images.shape, generator=g)
        x_t = diffusion.q_sample(images, t, noise)
        eps = {name: model(x_t, t, y)[:, :images.shape[1]] for name, y in (("true", labels), ("wrong", wrong), ("null", null))}
        out[tv] = {f"mse_{k}": float(((v - noise) ** 2).mean()) for k, v in eps.items()}
        out[tv]["rms_cond_minus_uncond"] = float(((eps["true"] - eps["null"]) ** 2).mean().sqrt())
    return out


def main():
    p = argparse.ArgumentParser(description="Does a class-conditional model use its label? ε errors with true / wrong / null labels.")
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint of a Fashion-MNIST run")
    p.add_argument("--no-ema", action="store_true", help="probe the raw weights instead of the EMA")
    p.add_argument("--num-images", type=int, default=256, help="held-out test images (the first of a fixed permutation)")
    p.add_argument("--data-path", default=None, help="Fashion-MNIST IDX folder (default: the run's, else Debian's copy)")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    args = p.parse_args()
    if not os.path.isfile(args.ckpt):
        raise UsageError(f"--ckpt {args.ckpt} does not exist")
    if args.num_images <= 0:
        raise UsageError(f"--num-images must be positive, got {args.num_images}")
    try:
        ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
        model = model_from_checkpoint(ckpt, use_ema=not args.no_ema)
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"cannot load a model from {args.ckpt}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    config = ckpt.get("config") or {}
    if config.get("dataset") != "fashion-mnist" or not getattr(model, "num_classes", 0) or config.get("vae"):
        raise UsageError("the probe takes a class-conditional pixel-space Fashion-MNIST run")
    if model.y_embedder.embedding_table.num_embeddings == model.num_classes:
        raise UsageError("the model was trained without label dropout: it has no null class to compare with")
    test = load_dataset("fashion-mnist", args.data_path or config.get("data_path"), split="test")
    rows = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:args.num_images]
    diffusion = GaussianDiffusion.from_config(ckpt.get("diffusion"), learn_sigma=model.learn_sigma)
    result = probe(model, diffusion, test.get_batch(rows), torch.as_tensor(test.labels)[rows])
    print(f"{args.ckpt} (step {ckpt.get('step')}, {'raw' if args.no_ema else 'EMA'} weights, {len(rows)} test images)")
    for t, r in result.items():
        print(f"t={t:4d}  ε mse: true {r['mse_true']:.4f}  wrong {r['mse_wrong']:.4f}  null {r['mse_null']:.4f}   "
              f"rms(cond - uncond) {r['rms_cond_minus_uncond']:.4f}")
    if args.json:
        atomic_write_json(args.json, {"ckpt": os.path.abspath(args.ckpt), "step": ckpt.get("step"), "ema": not args.no_ema,
                                      "num_images": len(rows), "timesteps": {str(t): r for t, r in result.items()}})


if __name__ == "__main__":
    run_main(main)
