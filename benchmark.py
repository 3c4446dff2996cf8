"""
Speed of a denoiser on this device, on synthetic inputs: steady-state training steps (forward,
backward, AdamW, EMA: train.py's step) and guided sampling steps (classifier-free guidance in one
batched forward, sample.py's); img/s, FLOPs per image, achieved TFLOP/s, MFU against the device's
datasheet dense peak ("n/a" on a CPU) and against the matmul peak measured at start-up in the same
precision, and peak memory.

    python benchmark.py --model DiT-T/4                                         # Fashion-MNIST size, 32x32x1
    python benchmark.py --model DiT-S/2 --in-channels 4 --batch-size 16         # a latent model, 32x32x4
    python benchmark.py --model DiT-XL/2 --in-channels 4 --batch-size 64 --precision bf16 --compile    # one H100 / H200

FLOPs are the model's flops_per_forward() (matmuls, 2 per multiply-add; checked against
torch.utils.flop_counter and the DiT paper's figures in tests/test_speed.py): 3x per image for a
training step, 2x per image and step for guided sampling.
"""
import argparse
import contextlib
import copy
import itertools
import resource
import time

import torch

from models.build import MODEL_NAMES, build_model
from models.cep import cep_noise
from models.common import UsageError, compile_for_inference, datasheet_peak_tflops, measure_matmul_tflops, run_main, step_generator, update_ema
from models.diffusion import DEFAULT_DIFFUSION, SAMPLE_BATCH, GaussianDiffusion, Sampler, classifier_free_guidance

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def get_parser():
    p = argparse.ArgumentParser(description="Training and guided-sampling throughput, TFLOP/s and MFU of a denoiser.")
    a = p.add_argument
    a("--model", default="DiT-T/4", help=f"one of {', '.join(MODEL_NAMES)}")
    a("--input-size", type=int, default=32, help="image or latent side")
    a("--in-channels", type=int, default=1, help="1 (Fashion-MNIST), 3 (pixels) or 4 (SD latents)")
    a("--num-classes", type=int, default=10)
    a("--batch-size", type=int, default=64, help="training batch")
    a("--sample-batch-size", type=int, default=None, help="sampling batch (default: sample.py's)")
    a("--sample-steps", type=int, default=20, help="DPM-Solver++ steps per image")
    a("--cfg-scale", type=float, default=3.0)
    a("--precision", default=None, choices=tuple(DTYPES), help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--iters", type=int, default=10, help="timed training steps (after --warmup)")
    a("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator, caches)")
    a("--mode", default="both", choices=("train", "sample", "both"))
    a("--baseline", action="store_true", help="also time sampling as sample.py did before its speed-ups (batch 64, eager, "
      "fp32) in the same run, and print the speed-up")
    a("--ranks", type=int, default=1, help="data-parallel ranks: train.py draws the step's randomness for the global batch "
      "(--batch-size x --ranks) on every rank; its cost is timed against the step")
    a("--device", default="auto", help="auto | cpu | cuda")
    a("--peak-tflops", type=float, default=None, help="the GPU's dense peak in --precision where it is not in the datasheet table")
    return p


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux: the process's peak RSS


def timed(fn, iters, warmup, device):
    """Seconds per call of fn, after warmup calls (wall clock between device synchronisations)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def report(what, images_per_s, flops_per_image, peak_tflops, matmul_tflops, device):
    """One result line: img/s, FLOPs per image, TFLOP/s, MFU against the datasheet peak ("n/a" on a CPU
    or an unlisted GPU) and against the measured matmul peak, and the peak memory."""
    tflops = images_per_s * flops_per_image / 1e12
    mfu = tflops / peak_tflops if peak_tflops else None
    print(f"{what:8s} {images_per_s:10.1f} img/s  {flops_per_image / 1e9:10.3f} GFLOP/img  {tflops:8.3f} TFLOP/s  MFU "
          + (f"{mfu:6.1%}" if mfu is not None else f"n/a ({device.type.upper() if device.type == 'cpu' else 'no datasheet peak'})")
          + f"  MFU vs matmul {tflops / matmul_tflops:6.1%}  peak memory {peak_memory_gb(device):.2f} GiB", flush=True)
    return dict(img_per_s=images_per_s, tflops=tflops, mfu=mfu, mfu_matmul=tflops / matmul_tflops)


def main():
    args = get_parser().parse_args()
    if args.model not in MODEL_NAMES:
        raise UsageError(f"unknown --model '{args.model}'; choose one of: {', '.join(MODEL_NAMES)}")
    for flag in ("input_size", "in_channels", "num_classes", "batch_size", "sample_steps", "iters", "ranks"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        model = build_model(args.model, input_size=args.input_size, in_channels=args.in_channels, num_classes=args.num_classes,
                            class_dropout=0.1, learn_sigma=False).to(device)
    except ValueError as e:
        raise UsageError(f"--model {args.model}: {str(e).splitlines()[0]}")
    peak = measure_matmul_tflops(device, DTYPES[precision])
    sheet = args.peak_tflops or datasheet_peak_tflops(device, precision)
    flops = model.flops_per_forward()
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, {flops / 1e9:.3f} GFLOP per forward "
          f"({args.input_size}x{args.input_size}x{args.in_channels}), {device.type} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"{precision}{', compiled' if args.compile else ''}; measured {precision} matmul peak {peak:.3f} TFLOP/s, datasheet peak "
          + (f"{sheet:g} TFLOP/s" if sheet else "n/a"), flush=True)
    net = torch.compile(model) if args.compile else model
    autocast = torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")
    diffusion = GaussianDiffusion.from_config(DEFAULT_DIFFUSION, learn_sigma=False)
    results = {}
    shape = (args.in_channels, args.input_size, args.input_size)
    if args.mode in ("train", "both"):
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=device.type == "cuda")
        B = args.batch_size
        x, y = torch.randn(B, *shape, device=device), torch.randint(0, args.num_classes, (B,), device=device)

        def train_step():  # train.py's step: noise, loss, backward, clip, AdamW, EMA
            t = torch.randint(0, diffusion.num_timesteps, (B,), device=device)
            with autocast:
                loss = diffusion.training_losses(lambda xt, tt: net(xt, tt, y), x, t, torch.randn_like(x))["loss"].mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_ema(ema, model, 0.9999)
        seconds = timed(train_step, args.iters, args.warmup, device)
        results["train"] = report("train", B / seconds, 3 * flops, sheet, peak, device)

        steps = itertools.count(1)

        def random_draws():  # train.py's draws for the global batch (t, noise, dropout, CEP delta), every rank
            G, g = B * args.ranks, step_generator(0, next(steps), device)
            torch.randint(0, diffusion.num_timesteps, (G,), generator=g, device=device)
            torch.randn((G, *shape), generator=g, device=device)
            torch.rand(G, generator=g, device=device)
            cep_noise(G, model.cond_dim, 1.0, "uniform", generator=g, device=device)
        draw_seconds = timed(random_draws, args.iters, args.warmup, device)
        results["draws_fraction"] = draw_seconds / seconds
        print(f"random draws for the global batch of {B * args.ranks}: {draw_seconds * 1e3:.3f} ms per step, "
              f"{100 * draw_seconds / seconds:.4f}% of the training step", flush=True)
    if args.mode in ("sample", "both"):
        model.eval()
        sampler = Sampler(diffusion, "dpm-solver++", args.sample_steps)
        per_image = (2 if args.cfg_scale != 1 else 1) * flops * args.sample_steps

        def sampling_speed(network, B, cast):  # sample.py's loop body: one batch of guided DPM-Solver++
            x, y = torch.randn(B, *shape, device=device), torch.arange(B, device=device) % args.num_classes
            guided = classifier_free_guidance(network, y, args.num_classes, args.cfg_scale)

            def sample_batch():
                with torch.no_grad(), cast:
                    sampler.sample(guided, x)
            return B / timed(sample_batch, max(1, args.iters // 5), 1, device)
        if args.baseline:  # its MFU against the fp32 peak
            fp32_peak = peak if precision == "fp32" else measure_matmul_tflops(device, torch.float32)
            results["baseline"] = report("baseline", sampling_speed(model, 64, contextlib.nullcontext()), per_image,
                                         args.peak_tflops or datasheet_peak_tflops(device, "fp32"), fp32_peak, device)
        sample_net = compile_for_inference(copy.deepcopy(model)) if args.compile else model  # sample.py --compile
        results["sample"] = report("sample", sampling_speed(sample_net, args.sample_batch_size or SAMPLE_BATCH, autocast), per_image,
                                   sheet, peak, device)
        if args.baseline:
            print(f"sampling speed-up over the baseline: {results['sample']['img_per_s'] / results['baseline']['img_per_s']:.2f}x")
    return results


if __name__ == "__main__":
    run_main(main)
