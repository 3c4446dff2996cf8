"""--grad-accum N splits each rank's share of the global batch into N micro-batches: the same update
as the unsplit batch (to 1e-12 in float64), the same random draws, the same loss, EMA and log."""
import argparse
import contextlib
import copy
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from models.build import build_model  # noqa: E402
from models.common import step_generator, update_ema  # noqa: E402
from models.diffusion import GaussianDiffusion  # noqa: E402
from models.text import build_text_encoder  # noqa: E402
from tests.helpers import load_last, run_script  # noqa: E402

CAPTIONS = ["a red shirt", "a blue shoe", "a small bag", "a long dress", "an old coat", "a white sneaker"]


def one_step(model_name, text, grad_accum, bad=(), grad_clip=1.0):
    """One optimisation step of train.py's loop on a float64 model: its inputs, loss, gradient, AdamW
    update and EMA. Returns (inputs, loss, gradients, weights, EMA weights)."""
    args = train.get_parser().parse_args(["--model", model_name, "--cep", "--cep-type", "gaussian", "--input-perturbation", "0.1",
                                          "--grad-accum", str(grad_accum), "--grad-clip", str(grad_clip), "--class-dropout", "0.3",
                                          "--ema-decay", "0.9", "--no-ema-warmup"])
    train.check_args(args)
    size = 16
    torch.manual_seed(0)
    if text:
        encoder = build_text_encoder("scratch", CAPTIONS, 8)
        model = build_model(name=model_name, input_size=size, in_channels=1, num_classes=0, class_dropout=args.class_dropout,
                            learn_sigma=args.learn_sigma, text_encoder=encoder, text_mode="crossattn")
        conditions = np.array(CAPTIONS * 4, dtype=object)
    else:
        model = build_model(name=model_name, input_size=size, in_channels=1, num_classes=10, class_dropout=args.class_dropout,
                            learn_sigma=args.learn_sigma)
        conditions = torch.arange(24) % 10
    model = model.double()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    diffusion = GaussianDiffusion.from_config(train.diffusion_config(args), learn_sigma=args.learn_sigma)
    B, share = 12, slice(0, None, 1)
    x = torch.randn(B, 1, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    idx = torch.arange(3, 3 + B)
    data = argparse.Namespace(dataset=None)
    g = step_generator(args.seed, 7, torch.device("cpu"))
    inp = train.step_inputs(args, diffusion, model, data, x, idx, conditions, g, B, share, None)
    inp.x, inp.noise = inp.x.double(), inp.noise.double()
    inp.xi = inp.xi.double()
    inp.delta = inp.delta.double() if inp.delta is not None else None
    model.train()
    loss = train.forward_backward(args, None, 7, model, None, diffusion, inp, list(bad), contextlib.nullcontext(),
                                  scaler, g, B, share)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    train.optimizer_step(args, 7, model, opt, scaler)
    update_ema(ema, model, 0.9)
    return inp, loss, grads, {k: v.clone() for k, v in model.state_dict().items()}, ema.state_dict()


def close(a, b, tol=1e-12):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=tol), (k, (a[k] - b[k]).abs().max().item())


@pytest.mark.parametrize("model_name,text", [("DiT-T/8", False), ("DiT-T/8", True)])
def test_micro_batches_give_the_unsplit_update(model_name, text, monkeypatch):
    """3 micro-batches, and 4 with unreadable rows, against the whole share: the same draws (noise, t, dropout, CEP δ, ξ, one set
    for the step), the same loss, gradients, AdamW update and EMA, to 1e-12 in float64; the rows of
    unreadable files are left out of the loss, so the micro-batches hold unequal numbers of kept rows."""
    for bad, n in (((), 3), ([(2, "bad"), (3, "bad"), (5, "bad")], 4)):
        inp1, loss1, g1, w1, e1 = one_step(model_name, text, 1, bad)
        inp, loss, g, w, e = one_step(model_name, text, n, bad)
        for k in ("x", "t", "noise", "xi", "delta"):
            assert torch.equal(getattr(inp, k), getattr(inp1, k)), k  # one draw for the step, whatever the split
        assert all(torch.equal(a, b) for a, b in zip(inp.cond, inp1.cond))
        assert abs(loss.item() - loss1.item()) < 1e-12
        close(g, g1)
        close(w, w1)
        close(e, e1)

    # the check can fail: each micro-batch's own mean over N (the usual shortcut) weighs the kept rows
    # unequally when unreadable rows fall unevenly
    monkeypatch.setattr(train, "share_of_loss", lambda per, keep, total: (per * keep).sum() / keep.sum() / 4)
    _, _, g_wrong, _, _ = one_step(model_name, text, 4, bad)
    with pytest.raises(AssertionError):
        close(g_wrong, g1)


def test_no_clip_at_zero_gives_the_clip_free_update():
    """--grad-clip 0 takes the norm without rescaling: the update equals a clip far above the norm."""
    _, _, g0, w0, _ = one_step("DiT-T/8", False, 2, grad_clip=0)
    _, _, g1, w1, _ = one_step("DiT-T/8", False, 2, grad_clip=1e9)
    close(g0, g1, 0)
    close(w0, w1, 0)


def test_command_line_split_is_the_same_run(fake_fmnist, tmp_path):
    """The acceptance command: --global-batch-size 64 --grad-accum 4 (1 rank) and --grad-accum 2 on
    2 ranks (DDP skipping the all-reduce but on the last micro-batch) against --global-batch-size 64
    alone, within float32 rounding; config.json and the start-up line give the split."""
    common = ["--data-path", fake_fmnist, "--out-dir", tmp_path, "--model", "DiT-T/8", "--global-batch-size", "64",
              "--max-steps", "4", "--log-every", "2", "--ckpt-every", "4", "--cep"]
    run_script("train.py", [*common, "--run", "whole"])
    split = run_script("train.py", [*common, "--run", "split", "--grad-accum", "4"])
    assert "global batch 64 = 16 per micro-batch x 1 rank(s) x 4 (--grad-accum)" in split.stdout
    run_script("train.py", [*common, "--run", "ranks", "--grad-accum", "2"], nproc=2)
    whole = load_last(tmp_path / "whole")
    logs = {r: [json.loads(ln)["loss"] for ln in open(tmp_path / r / "log.jsonl")] for r in ("whole", "split", "ranks")}
    for run, ranks, micro in (("split", 1, 16), ("ranks", 2, 16)):
        config = json.loads((tmp_path / run / "config.json").read_text())
        assert config["batch"] == dict(global_batch=64, ranks=ranks, grad_accum=64 // ranks // micro, micro_batch_per_rank=micro)
        other = load_last(tmp_path / run)
        for part in ("model", "ema"):
            for k, v in whole[part].items():
                assert torch.allclose(other[part][k], v, rtol=1e-4, atol=1e-6), (run, part, k)
        assert logs[run] == pytest.approx(logs["whole"], rel=1e-5)


def test_bad_grad_accum_is_one_line():
    """A split that does not divide the batch is refused (--grad-accum with LCM distillation: in
    tests/test_lcm.py's refusals)."""
    proc = run_script("train.py", ["--global-batch-size", "64", "--grad-accum", "3", "--dry-run"], check=False)
    assert proc.returncode == 2 and "is not divisible by 1 ranks x --grad-accum 3" in proc.stderr
