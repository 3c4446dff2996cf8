"""Tests for the text conditioning of models/dit.py (pooled, cross-attention) against float64 re-implementations."""
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.dit import DiT, TimestepEmbedder, build_dit
from tests.helpers import randomize_zero_init

torch.set_num_threads(2)

TEXT_DIM = 24
MODES = ["pooled", "crossattn"]


def text_dit(mode, **kw):
    cfg = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4, num_classes=0,
               text_dim=TEXT_DIM, text_mode=mode, learn_sigma=True)
    cfg.update(kw)
    return DiT(**cfg)


def randomize_all(model, seed=0, std=0.1):
    """Every trainable parameter re-drawn from N(0, std²): nothing zero-initialised remains."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def text_inputs(model, lengths=(7, 3, 1), L=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    x = torch.randn(n, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    context = torch.randn(n, L, TEXT_DIM, generator=g)
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()
    delta = torch.randn(n, TEXT_DIM, generator=g) * 0.5
    return x, t, context, mask, delta


@pytest.mark.parametrize("mode", MODES)
def test_text_output_exactly_zero_at_init(mode):
    torch.manual_seed(0)
    model = text_dit(mode)
    x, t, ctx, mask, delta = text_inputs(model)
    with torch.no_grad():
        for out in (model(x, t, context=ctx, context_mask=mask), model(x, t, cond_noise=delta, context=ctx),
                    model(x, t.float() + 0.5, context=ctx, context_mask=mask)):
            assert out.shape == (3, 6, 8, 8)
            assert torch.equal(out, torch.zeros_like(out))
        randomize_zero_init(model)
        assert model(x, t, context=ctx, context_mask=mask).abs().max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_text_blocks_are_identity_at_init(mode):
    torch.manual_seed(0)
    model = text_dit(mode, depth=3)
    assert all((b.cross_attn is not None) == (mode == "crossattn") for b in model.blocks)
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(2, 16, 32, generator=g) * 3, torch.randn(2, 32, generator=g) * 3
    tokens, mask = torch.randn(2, 5, 32, generator=g) * 3, torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    with torch.no_grad():
        for block in model.blocks:
            assert torch.equal(block(x, c, tokens, mask), x)
        if mode == "crossattn":  # the cross-attention branch alone is what keeps it so: undo only its zero init
            nn.init.normal_(model.blocks[0].cross_attn.proj.weight, std=0.1)
            assert (model.blocks[0](x, c, tokens, mask) - x).abs().max() > 1e-3
        randomize_zero_init(model)
        assert (model.blocks[0](x, c, tokens, mask) - x).abs().max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_padding_tokens_do_not_affect_output(mode):
    model = randomize_all(text_dit(mode))
    x, t, ctx, mask, delta = text_inputs(model)
    junk = ctx.clone()
    junk[mask == 0] = torch.randn(int((mask == 0).sum()), TEXT_DIM) * 1e3
    delta3 = delta[:, None].expand(-1, 7, -1).clone()
    delta3_junk = delta3.clone()
    delta3_junk[mask == 0] = 1e3
    with torch.no_grad():
        ref = model(x, t, context=ctx, context_mask=mask)
        assert torch.equal(model(x, t, context=junk, context_mask=mask), ref)
        assert torch.equal(model(x, t, context=junk, context_mask=mask, cond_noise=delta3_junk),
                           model(x, t, context=ctx, context_mask=mask, cond_noise=delta3))
        # a caption padded to L = 7 gives the output of the same caption unpadded
        for i, n in enumerate((7, 3, 1)):
            alone = model(x[i:i + 1], t[i:i + 1], context=ctx[i:i + 1, :n])
            assert torch.allclose(alone, ref[i:i + 1], atol=1e-5, rtol=0)
        # sanity: a valid token does matter
        changed = ctx.clone()
        changed[1, 2] += 1.0
        assert (model(x, t, context=changed, context_mask=mask)[1] - ref[1]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_text_cond_noise(mode):
    model = randomize_all(text_dit(mode))
    assert model.cond_dim == TEXT_DIM and model.num_classes == 0 and model.y_embedder is None
    x, t, ctx, mask, delta = text_inputs(model)
    with torch.no_grad():
        out_none = model(x, t, context=ctx, context_mask=mask)
        assert torch.equal(out_none, model(x, t, context=ctx, context_mask=mask, cond_noise=torch.zeros_like(delta)))
        out_cep = model(x, t, context=ctx, context_mask=mask, cond_noise=delta)
        assert (out_cep - out_none).abs().max() > 1e-3
        # CEP on text = every valid token embedding shifted by δ (a (N, d) δ is shared by the tokens)
        shifted = ctx + delta[:, None] * mask[..., None]
        assert torch.allclose(out_cep, model(x, t, context=shifted, context_mask=mask), atol=1e-6, rtol=0)
        per_token = torch.randn(3, 7, TEXT_DIM) * 0.5
        assert torch.allclose(model(x, t, context=ctx, context_mask=mask, cond_noise=per_token),
                              model(x, t, context=ctx + per_token, context_mask=mask), atol=1e-6, rtol=0)
        # a row with δ = 0 is untouched
        delta[1] = 0
        assert torch.allclose(model(x, t, context=ctx, context_mask=mask, cond_noise=delta)[1], out_none[1],
                              atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_different_captions_give_different_outputs(mode):
    model = randomize_all(text_dit(mode))
    x, t, ctx, mask, _ = text_inputs(model)
    other = torch.randn(ctx.shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = model(x, t, context=ctx, context_mask=mask), model(x, t, context=other, context_mask=mask)
    assert ((a - b).flatten(1).abs().amax(1) > 1e-3).all()


@pytest.mark.parametrize("mode", MODES)
def test_gradient_reaches_every_parameter(mode):
    model = randomize_all(text_dit(mode)).train()
    x, t, ctx, mask, delta = text_inputs(model)
    model(x, t, context=ctx, context_mask=mask, cond_noise=delta).square().sum().backward()
    for name, p in model.named_parameters():
        if name == "pos_embed":
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().max() > 0, name


def test_pooled_condition_is_masked_mean_projection():
    """pooled mode: c = t_emb + W (masked mean of the caption tokens) + b, recomputed here in float64."""
    model = randomize_all(text_dit("pooled"))
    x, t, ctx, mask, _ = text_inputs(model)
    md = text_dit("pooled").double()
    md.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = model(x, t, context=ctx, context_mask=mask).double()
        m = mask.double()[..., None]
        pooled = (ctx.double() * m).sum(1) / m.sum(1)
        c = md.t_embedder.mlp(TimestepEmbedder.timestep_embedding(t, 256).double()) + md.text_pool(pooled)
        h = md.x_embedder(x.double()) + md.pos_embed
        for blk in md.blocks:
            h = blk(h, c)
        ref = md.unpatchify(md.final_layer(h, c))
    assert (out - ref).abs().max() < 1e-5 and ref.abs().max() > 1e-2


def test_cross_attention_vs_float64_reference():
    from models.dit import CrossAttention
    torch.manual_seed(0)
    D, H, T, L = 32, 4, 6, 5
    ca = CrossAttention(D, H)
    nn.init.normal_(ca.proj.weight, std=0.2)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(3, T, D, generator=g), torch.randn(3, L, D, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]).bool()
    with torch.no_grad():
        out = ca(x, ctx, mask).double()
        q = x.double() @ ca.q.weight.double().T + ca.q.bias.double()
        kv = ctx.double() @ ca.kv.weight.double().T + ca.kv.bias.double()
        k, v = kv[..., :D], kv[..., D:]
        dh = D // H
        heads = []
        for h in range(H):
            sl = slice(h * dh, (h + 1) * dh)
            s = (q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(dh)).masked_fill(~mask[:, None], -math.inf)
            heads.append(torch.softmax(s, -1).nan_to_num(0.0) @ v[..., sl])
        ref = torch.cat(heads, -1) @ ca.proj.weight.double().T + ca.proj.bias.double()
        ref[2] = 0  # a caption without any token contributes nothing
    assert (out - ref).abs().max() < 1e-5 and ref.abs().max() > 1e-2
    assert torch.equal(out[2], torch.zeros_like(out[2]))


def text_counted_flops(model, L, batch=2):
    x, t, ctx, mask, _ = text_inputs(model, lengths=(L, max(1, L // 2))[:batch], L=L)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(x, t, context=ctx, context_mask=mask)
    return fc.get_total_flops() / batch


@pytest.mark.parametrize("mode,L", [("pooled", 77), ("crossattn", 77), ("crossattn", 20)])
def test_text_flops_per_forward_matches_flop_counter(mode, L):
    model = text_dit(mode, input_size=16, hidden_size=64, num_heads=4)
    ref = text_counted_flops(model, L)
    assert abs(model.flops_per_forward(context_len=L) - ref) / ref < 0.02
    if mode == "crossattn":  # the cross-attention term matters: omitting it fails the 2 % check
        assert abs(text_dit("pooled", input_size=16, hidden_size=64, num_heads=4).flops_per_forward() - ref) / ref > 0.05
        assert model.flops_per_forward() == model.flops_per_forward(context_len=77)


def test_build_dit_text_configs_and_checkpoints():
    from models.dit import config_from_state_dict, dit_from_checkpoint
    for mode in MODES:
        model = build_dit("DiT-T/4", input_size=16, in_channels=4, text_dim=TEXT_DIM, text_mode=mode)
        assert model.num_classes == 0 and model.cond_dim == TEXT_DIM
        keys = set(model.state_dict())
        assert not any(k.startswith("y_embedder") for k in keys) and "text_pool.weight" in keys
        assert ("blocks.0.cross_attn.kv.weight" in keys) == ("context_proj.weight" in keys) == (mode == "crossattn")
        for p in model.parameters():
            nn.init.normal_(p, std=0.05)
        config = dict(name="DiT-T/4", input_size=16, in_channels=4, num_classes=0, text_dim=TEXT_DIM, text_mode=mode,
                      learn_sigma=True)
        assert config_from_state_dict(model.state_dict()) == config
        x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([5, 500]), torch.randn(2, 6, TEXT_DIM)
        for ckpt in (model.state_dict(), {"model_config": config, "ema": model.state_dict()}):
            rebuilt = dit_from_checkpoint(ckpt)
            assert torch.equal(rebuilt(x, t, context=ctx), model.eval()(x, t, context=ctx))
    # class models: unchanged defaults and keys; text and class labels are exclusive
    assert build_dit("DiT-T/4").num_classes == 1000 and build_dit("DiT-T/4").cond_dim == 128
    with pytest.raises(ValueError):
        build_dit("DiT-T/4", text_dim=TEXT_DIM, num_classes=10)
    with pytest.raises(ValueError):
        build_dit("DiT-T/4", text_dim=TEXT_DIM, text_mode="concat")
    with pytest.raises(ValueError):
        build_dit("DiT-T/4", num_classes=0)
    with pytest.raises(ValueError):
        text_dit("pooled")(torch.randn(1, 3, 8, 8), torch.tensor([1]))  # no context
