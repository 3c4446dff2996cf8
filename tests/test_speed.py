"""Speed, checked where a CPU can check it: benchmark.py's FLOP count and report, and no host
syncs in the training loop between log steps."""
import re
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.build import build_model  # noqa: E402
from tests.helpers import REPO, make_fake_fmnist, run_script  # noqa: E402

TINY = ["--model", "DiT-T/8", "--global-batch-size", "16", "--lr", "1e-3", "--warmup-steps", "0", "--lr-decay", "none"]


@pytest.mark.parametrize("name, size, channels", [("DiT-T/4", 32, 1), ("DiT-S/2", 32, 4), ("DiT-B/4", 16, 3)])
def test_flops_per_forward_matches_flop_counter(name, size, channels):
    """benchmark.py's MFU rests on flops_per_forward(): it must equal what torch's FlopCounterMode
    counts for a real forward (matmuls, the patch-embedding conv, attention via the MATH backend,
    which FlopCounterMode decomposes into counted bmm's) to within 1 %."""
    model = build_model(name, input_size=size, in_channels=channels, num_classes=10, class_dropout=0.1, learn_sigma=True).eval()
    x, t, y = torch.randn(2, channels, size, size), torch.tensor([3, 500]), torch.tensor([1, 10])
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    counted = counter.get_total_flops() / 2
    assert abs(model.flops_per_forward() - counted) / counted < 0.01, (model.flops_per_forward(), counted)


def test_benchmark_reports_throughput_and_mfu():
    proc = run_script("benchmark.py", ["--model", "DiT-T/4", "--batch-size", "8", "--sample-batch-size", "4", "--sample-steps", "2",
                                       "--iters", "2", "--warmup", "1"])
    """FLOPs per image, MFU against the datasheet peak ("n/a (CPU)" here) and against the measured matmul
    peak, and peak memory, for the training step and guided sampling."""
    with torch.device("meta"):
        forward = build_model("DiT-T/4", input_size=32, in_channels=1, num_classes=10, class_dropout=0.1,
                              learn_sigma=False).flops_per_forward()  # benchmark.py's model
    for what, per_image in (("train", 3 * forward), ("sample", 2 * 2 * forward)):  # 2 guided steps of 2 forwards
        m = re.search(rf"^{what}\s+([\d.]+) img/s\s+([\d.]+) GFLOP/img\s+([\d.]+) TFLOP/s\s+MFU n/a \(CPU\)\s+MFU vs matmul\s+"
                      r"([\d.]+)%\s+peak memory ([\d.]+) GiB", proc.stdout, re.M)
        assert m, proc.stdout
        img_s, gflop, mfu, memory = float(m.group(1)), float(m.group(2)), float(m.group(4)), float(m.group(5))
        assert img_s > 0 and gflop == pytest.approx(per_image / 1e9, abs=1e-3) and 0 < mfu < 150 and memory > 0, proc.stdout
    assert "measured fp32 matmul peak" in proc.stdout and "datasheet peak n/a" in proc.stdout
    m = re.search(r"random draws for the global batch of 8: ([\d.]+) ms per step, ([\d.]+)% of the training step", proc.stdout)
    assert m and 0 < float(m.group(2)) < 100, proc.stdout
    bad = run_script("benchmark.py", ["--model", "DiT-Q/3"], check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: unknown --model 'DiT-Q/3'; choose one of: " + bad.stderr.split("choose one of: ")[1].strip()]


@pytest.mark.parametrize("name", ["DiT-T/4", "UNet-T"])
def test_forward_compiles_without_graph_breaks(name):
    """torch.compile captures the whole forward as one graph (a graph break would split the
    compiled step and fall back to Python in between)."""
    import torch._dynamo
    model = build_model(name, input_size=32, in_channels=1, num_classes=10, class_dropout=0.1, learn_sigma=True)
    explained = torch._dynamo.explain(model)(torch.randn(2, 1, 32, 32), torch.tensor([3, 500]), torch.tensor([1, 10]))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.parametrize("name", ["DiT-T/4", "UNet-T"])
def test_grad_checkpoint_gives_the_same_gradients(name):
    """--grad-checkpoint recomputes block activations in the backward: same loss, same gradients."""
    torch.manual_seed(0)
    model = build_model(name, input_size=32, in_channels=1, num_classes=10, class_dropout=0.1, learn_sigma=True)
    with torch.no_grad():  # move the zero-initialised layers, so that every block gets a gradient
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, t, y = torch.randn(4, 1, 32, 32), torch.tensor([3, 500, 999, 10]), torch.tensor([1, 10, 4, 2])
    grads = []
    for flag in (False, True):
        model.grad_checkpoint = flag
        model.zero_grad()
        model(x, t, y).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))
    assert sum(bool(g.abs().sum() > 0) for g in grads[0]) > 0.9 * len(grads[0])  # nearly every parameter moves


def test_attention_qualifies_for_the_flash_kernel(monkeypatch):
    """On a GPU, F.scaled_dot_product_attention takes the flash kernel only for fp16 / bf16 inputs
    with a head dimension that is a multiple of 8 and at most 256, no mask, no dropout: check what
    the class DiT passes it under bf16 autocast (here on CPU), and DiT-XL/2's head size."""
    import torch.nn.functional as F
    from models.dit import DIT_SIZES
    seen, original = [], F.scaled_dot_product_attention

    def recording(q, k, v, *a, **kw):
        seen.append((q.dtype, q.shape[-1], q.stride(-1), kw.get("attn_mask"), kw.get("dropout_p", 0.0), a))
        return original(q, k, v, *a, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model = build_model("DiT-S/2", input_size=16, in_channels=4, num_classes=10, class_dropout=0.1, learn_sigma=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 4, 16, 16), torch.tensor([3, 500]), torch.tensor([1, 10]))
    assert len(seen) == 12
    for dtype, head_dim, stride, mask, dropout, extra in seen:
        assert dtype == torch.bfloat16 and head_dim % 8 == 0 and head_dim <= 256 and stride == 1
        assert mask is None and dropout == 0.0 and extra == ()
    depth, hidden, heads = DIT_SIZES["XL"]
    assert hidden // heads == 72  # DiT-XL/2: 72 = 9 x 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fmnist")
    make_fake_fmnist(d, n=256)
    return d


def test_no_host_sync_between_log_steps(data, tmp_path, monkeypatch):
    """Between log steps the loop must never read a tensor back to the host (on a GPU each read
    stalls the pipeline): count .item() / .tolist() / .cpu() / .numpy() / float() / int() / bool()
    called from the repo's code in a 3-step and a 6-step run that log and checkpoint only at their
    end; the extra steps must add no call."""
    import train
    counts = {"n": 0}
    repo = str(REPO)

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(repo) and "site-packages" not in caller and "/tests/" not in caller:
                counts["n"] += 1
            return original(self, *a, **k)
        return wrapper

    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    reads = {}
    for steps in (3, 6):
        monkeypatch.setattr(sys, "argv", ["train.py", *TINY, "--data-path", str(data), "--out-dir", str(tmp_path), "--run-name",
                                          f"s{steps}", "--max-steps", str(steps), "--log-every", str(steps), "--cep",
                                          "--corrupt", "0.1", "--input-perturbation", "0.1"])
        counts["n"] = 0
        train.main()
        reads[steps] = counts["n"]
    assert reads[3] > 0  # the counter sees the reads at the log and checkpoint step
    assert reads[6] == reads[3], reads


def test_prefetched_batches_keep_order_and_errors():
    """The GPU data path's read-ahead thread (models.data.prefetched; pinning needs a GPU, off here)."""
    from models.data import prefetched
    items = [(torch.full((2,), float(i)), torch.tensor([i])) for i in range(7)]
    got = list(prefetched(iter(items), depth=2, pin=False))
    assert [int(c) for _, c in got] == list(range(7)) and all(torch.equal(a[0], b[0]) for a, b in zip(got, items))

    def failing():
        yield items[0]
        raise OSError("disk gone")
    with pytest.raises(OSError, match="disk gone"):
        list(prefetched(failing(), pin=False))


@pytest.mark.parametrize("name, gflops", [("DiT-S/2", 6.06), ("DiT-B/2", 23.01), ("DiT-L/2", 80.71), ("DiT-XL/2", 118.64)])
def test_flops_match_the_dit_paper(name, gflops):
    """The DiT paper's "Gflops" (Peebles & Xie 2023, Table 4) at 256 px (32x32x4 latents) count
    multiply-adds: flops_per_forward() (2 per multiply-add) is twice them, within 1 %, and a training
    step of DiT-XL/2 (forward + backward, 3x) about 712 GFLOP per image."""
    with torch.device("meta"):  # the config alone: no weights are allocated
        model = build_model(name, input_size=32, in_channels=4, num_classes=1000, class_dropout=0.1, learn_sigma=True)
    assert model.flops_per_forward() / 2e9 == pytest.approx(gflops, rel=0.01)
    if name == "DiT-XL/2":
        assert 3 * model.flops_per_forward() / 1e9 == pytest.approx(712, rel=0.01)


def test_datasheet_peaks_by_device_name():
    """MFU's denominator: the datasheet dense peak for the CUDA device name and the run's precision."""
    from models.common import DATASHEET_TFLOPS, gpu_model
    names = {"NVIDIA H100 80GB HBM3": "H100 SXM", "NVIDIA H100 PCIe": "H100 PCIe", "NVIDIA H100 NVL": "H100 NVL",
             "NVIDIA H200": "H200 SXM", "NVIDIA H200 NVL": "H200 NVL", "NVIDIA A100-SXM4-80GB": "A100",
             "NVIDIA A100 80GB PCIe": "A100", "NVIDIA L40S": "L40S", "NVIDIA GeForce RTX 4090": None, "Tesla V100-SXM2-16GB": None}
    assert {n: gpu_model(n) for n in names} == names
    assert DATASHEET_TFLOPS["H100 SXM"]["bf16"] == 989.4 and DATASHEET_TFLOPS["H200 SXM"] == DATASHEET_TFLOPS["H100 SXM"]
