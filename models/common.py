"""Small helpers shared by the stage scripts: atomic writes, the one-line error convention, the
torchrun process group, the GPU's measured matmul rate and per-image sampling noise."""
import contextlib
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr and exit status 2, nothing written."""


class NothingToDo(Exception):
    """What was asked is already on disk (e.g. the same finished run): said once, and exit status 0."""


REQUEUE_EXIT = 75  # sysexits.h EX_TEMPFAIL, "try again later": a preempted run, to requeue (docs/runs.md#requeue)
LAUNCHED = "SLIGHT_CORRUPTION_LAUNCHED"  # set by --nproc-per-node's launcher, which maps a stop to REQUEUE_EXIT itself


class Requeue(Exception):
    """The run stopped early on request (a signal, --time-limit) after writing ckpt/last.pt and
    status.json "stopped": said once, and exit status REQUEUE_EXIT. Under torchrun or the launcher a
    rank exits 0 instead: torchrun would restart a failed group (--max-restarts) and report 1 anyway,
    and the launcher reads the stop from status.json."""


def run_main(main):
    """Call main(); turn a UsageError into one 'error: ...' line (printed once, by rank 0) and exit 2,
    NothingToDo into its message and exit 0 (so torchrun ends quietly too), Requeue into its message
    and REQUEUE_EXIT."""
    try:
        main()
    except Requeue as e:
        if os.environ.get("RANK", "0") == "0":
            print(e, flush=True)
        sys.exit(0 if os.environ.get(LAUNCHED) or "TORCHELASTIC_RUN_ID" in os.environ else REQUEUE_EXIT)
    except UsageError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NothingToDo as e:
        if os.environ.get("RANK", "0") == "0":
            print(e, flush=True)
        sys.exit(0)


UMASK = os.umask(0o022)  # read the process's umask (the only way is to set it) ...
os.umask(UMASK)  # ... and put it back


def _atomic_write(path, write_fn):
    """Write to a temp file in the same directory, fsync, then rename over `path`: a reader (or a
    crash) sees either the old file or the complete new one, never a partial write."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-" + os.path.basename(path))
    try:
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600: give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path, text):
    _atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


def atomic_write_npy(path, array):
    _atomic_write(path, lambda f: np.save(f, array))


def atomic_torch_save(path, obj):
    _atomic_write(path, lambda f: torch.save(obj, f))


def derived_seed(*keys):
    """A well-mixed 64-bit seed from integers (e.g. seed, step). Torch's CPU generator keeps only
    the low 32 bits of a seed, so `(seed << 32) + step` would silently ignore the seed there."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])


class ImageNoise:
    """N(0, I) noise for a batch of images, each from its own stream: image i of `idx` draws from
    PCG64 seeded by SeedSequence([seed, i]) (128-bit state that keeps every bit of seed and i), so its
    noise depends on (seed, i) and on how many draws came before, never on the batch it sits in (nor
    the rank, world size or batch size). Each call returns the next float32 draw, (len(idx), *shape),
    on `device`. (Torch's CPU generator keeps only 32 bits of a seed: at 50 K images some pairs would
    share their noise.) The random bits are the same on every machine; the float32 log/cos/sin may
    differ in the last bit between CPU instruction sets (numpy's SIMD dispatch)."""

    def __init__(self, seed, idx, shape, device="cpu"):
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.gens = [np.random.PCG64(np.random.SeedSequence([int(seed), int(i)])) for i in idx]
        self.shape, self.device = tuple(shape), device

    def __call__(self):
        n, B = math.prod(self.shape), len(self.gens)
        m = (n + 1) // 2  # Box-Muller pairs per image; one 64-bit word (two 32-bit uniforms) per pair
        z = np.empty((B, 2, m), np.float32)  # image b's noise: m values r cos θ, then m values r sin θ
        rows = max(1, 2 ** 16 // m)  # images per block: each work array stays in cache (256 KB)
        for s in range(0, B, rows):
            words = np.stack([g.random_raw(m) for g in self.gens[s: s + rows]])
            box_muller(words.astype("<u8", copy=False).view("<u4"), z[s: s + rows])
        z = np.ascontiguousarray(z.reshape(B, 2 * m)[:, :n])  # odd n: drop the last sine
        return torch.from_numpy(z).view(B, *self.shape).to(self.device)


def box_muller(bits, out):
    """Box & Muller (1958): u, v uniform ⇒ r = √(−2 log u), θ = 2πv give independent N(0, 1) r cos θ
    and r sin θ. bits (B, 2m) uint32 (u from the first m, v from the last m) -> out (B, 2, m) float32.
    Elementwise on contiguous arrays, so every value is computed alike wherever it sits in the batch."""
    m = bits.shape[1] // 2
    r = bits[:, :m].astype(np.float32)
    r += 0.5
    r *= 2 ** -32  # u = (k + ½) / 2³² in (0, 1]: |z| ≤ 6.8
    np.log(r, out=r)
    r *= -2
    np.sqrt(r, out=r)
    theta = bits[:, m:].astype(np.float32)
    theta *= 2 * math.pi * 2 ** -32  # θ in [0, 2π]
    cos = np.cos(theta)
    np.sin(theta, out=theta)
    np.multiply(r, cos, out=out[:, 0])
    np.multiply(r, theta, out=out[:, 1])


def setup_distributed(device_flag):
    """torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; plain `python train.py` is one rank."""
    use_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    if device_flag not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {device_flag}")
    if use_cuda and not torch.cuda.is_available():
        raise UsageError("--device cuda but no GPU is visible")
    rank, world, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None, **restart_safe_store(rank, world))
    return rank, world, device


@contextlib.contextmanager
def one_thread():
    """Run a block with one intra-op thread, then restore the count: tiny linear algebra does not
    spin threaded BLAS on shared CPUs, and the float rounding (so trained weights) is the same
    whatever the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def end_distributed(barrier=False):
    """Leave the process group; barrier=True (a normal end) first waits for every rank, so that no
    rank tears its connections down while another still uses them."""
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def restart_safe_store(rank, world):
    """Under torchrun the ranks meet in the agent's store, which outlives a restart
    (--max-restarts): the dead attempt's keys are still there, and a restarted gloo group connects
    to the dead ranks' addresses (torch 2.14). Each attempt gets its own key prefix instead."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}  # plain env:// rendezvous (srun, or a launcher without an agent store)
    import datetime
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=datetime.timedelta(minutes=30))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"/slight-corruption/attempt_{attempt}", store), "rank": rank, "world_size": world}


def measure_matmul_tflops(device, dtype=torch.bfloat16, n=None, iters=None):
    """Dense matmul rate of this device in `dtype`, measured: n x n products, 8192 on a GPU, 1024 on a
    CPU (a few seconds at most). The second MFU denominator, beside the datasheet's (on a CPU the only one)."""
    cuda = device.type == "cuda"
    n, iters = n or (8192 if cuda else 1024), iters or (20 if cuda else 10)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    if cuda:
        torch.cuda.synchronize(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - t0) / 1e12


# the datasheet dense peaks (TFLOP/s, no structured sparsity) of the tensor cores: bf16 (fp16 is the
# same) and TF32, which fp32 training uses on CUDA (train.py sets allow_tf32). NVIDIA's datasheets.
DATASHEET_TFLOPS = {"H100 SXM": {"bf16": 989.4, "tf32": 494.7}, "H100 PCIe": {"bf16": 756.5, "tf32": 378.0},
                    "H100 NVL": {"bf16": 835.5, "tf32": 417.5}, "H200 SXM": {"bf16": 989.4, "tf32": 494.7},
                    "H200 NVL": {"bf16": 835.5, "tf32": 417.5}, "A100": {"bf16": 312.0, "tf32": 156.0},
                    "L40S": {"bf16": 362.05, "tf32": 183.0}}


def gpu_model(device_name):
    """DATASHEET_TFLOPS's key for a CUDA device name (torch.cuda.get_device_name), or None: e.g.
    'NVIDIA H100 80GB HBM3' is an H100 SXM, 'NVIDIA H100 PCIe' a PCIe card, 'NVIDIA H200' an SXM."""
    name = device_name.upper()
    for chip in ("H100", "H200"):
        if chip in name:
            return f"{chip} PCIe" if "PCIE" in name else f"{chip} NVL" if "NVL" in name else f"{chip} SXM"
    return next((key for key in ("A100", "L40S") if key in name), None)


MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # a run's --precision


def datasheet_peak_tflops(device, precision):
    """The dense peak of this device for a run in `precision` (fp32 -> TF32), or None (a CPU, a GPU
    not in DATASHEET_TFLOPS: give --peak-tflops)."""
    if device.type != "cuda":
        return None
    model = gpu_model(torch.cuda.get_device_name(device))
    return DATASHEET_TFLOPS[model]["tf32" if precision == "fp32" else "bf16"] if model else None


def compile_for_inference(model):
    """torch.compile for sampling: the weights are frozen constants (inductor's freezing folds them
    and pre-packs them for oneDNN on a CPU); with bf16 autocast this samples DiT-T/4 about 2x faster
    than eager fp32 on 2 CPU cores (benchmark.py --baseline)."""
    import torch._inductor.config
    torch._inductor.config.freezing = True
    return torch.compile(model.requires_grad_(False))


# ---- the EMA of the weights

@torch.no_grad()
def update_ema(ema, model, decay):
    ema_params = [p for p in ema.parameters() if p.dtype.is_floating_point]
    params = [p for p in model.parameters() if p.dtype.is_floating_point]
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)  # ema = decay * ema + (1 - decay) * param


def total_grad_norm(params):
    """The L2 norm of the parameters' gradients, as clip_grad_norm_ computes it, without rescaling them
    (torch < 2.6 has no get_total_norm: the clip at an infinite norm, which scales by exactly 1)."""
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm([p.grad for p in params])
    return torch.nn.utils.clip_grad_norm_(params, float("inf"))


def ema_decay_at(step, decay, warmup):
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


# ---- the learning rate

def learning_rate(step, args):
    """The lr of step `step` (0-based): linear warm-up over warmup_steps, then constant or cosine to 0 at max_steps."""
    warm = min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else 1.0
    if args.lr_decay == "cosine":
        progress = max(0, step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
        return args.lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * warm


# ---- training randomness: one generator per step for the global batch; each rank's own global RNG

def step_generator(seed, step, device):
    """The generator for everything random in one optimisation step, same on every rank."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, step))


def seed_rank(seed, rank, step=0):
    """Each rank's global RNG from (seed, rank, step): different dropout masks on every rank."""
    torch.manual_seed(derived_seed(seed, rank, step, 0x52414E4B))


def rng_states(device, world):
    """Every rank's RNG state, gathered (a list indexed by rank, the same on every rank)."""
    mine = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if world == 1:
        return [mine]
    states = [None] * world
    dist.all_gather_object(states, mine)
    return states


def restore_rng(saved, rank, world, seed, step, device):
    """This rank's own saved RNG state; a checkpoint of another world size (or of the old single-
    state format on several ranks) reseeds from (seed, rank, step) instead. True if restored."""
    states = saved if isinstance(saved, list) else [saved]  # older checkpoints: rank 0's state only
    if len(states) != world:
        seed_rank(seed, rank, step)
        return False
    torch.set_rng_state(states[rank]["torch"])
    if device.type == "cuda" and "cuda" in states[rank]:
        torch.cuda.set_rng_state(states[rank]["cuda"], device)
    return True
