"""Tests for models/dit.py: every test compares numbers against an independent reference
(closed form, float64 re-implementation, or torch.utils.flop_counter), not only shapes."""
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models.dit import DIT_CONFIGS, Attention, DiT, TimestepEmbedder, build_dit, sincos_pos_embed_2d
from tests.helpers import randomize_zero_init

torch.set_num_threads(2)


def small_dit(**kw):
    cfg = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4,
               num_classes=10, class_dropout=0.1, learn_sigma=True)
    cfg.update(kw)
    return DiT(**cfg)


def random_inputs(model, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, model.num_classes + 1, (n,), generator=g)  # includes the null class
    delta = torch.randn(n, model.hidden_size, generator=g)
    return x, t, y, delta


# ---------------------------------------------------------------------------------------------
# 1. adaLN-Zero
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["DiT-T/2", "DiT-T/4", "DiT-T/8"])
def test_output_exactly_zero_at_init(name):
    torch.manual_seed(0)
    model = build_dit(name, input_size=16, in_channels=4, num_classes=10, class_dropout=0.1)
    x, t, y, delta = random_inputs(model, n=2)
    with torch.no_grad():
        for out in (model(x, t, y), model(x, t, y, cond_noise=delta), model(x, t.float() + 0.5, y)):
            assert out.shape == (2, 8, 16, 16)
            assert torch.equal(out, torch.zeros_like(out))
        # sanity: the test can fail, i.e. once the zero-init is undone the output is not zero
        randomize_zero_init(model)
        assert model(x, t, y).abs().max() > 1e-3


def test_blocks_are_identity_at_init():
    torch.manual_seed(0)
    model = small_dit(depth=3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 32, generator=g) * 3
    c = torch.randn(2, 32, generator=g) * 3
    with torch.no_grad():
        for block in model.blocks:
            assert torch.equal(block(x, c), x)
        randomize_zero_init(model)
        assert (model.blocks[0](x, c) - x).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# 2. parameter counts
# ---------------------------------------------------------------------------------------------
def analytic_param_count(depth, D, p, C=4, input_size=32, num_classes=1000, cfg_row=True, learn_sigma=True,
                         mlp_ratio=4.0, freq=256):
    H = int(D * mlp_ratio)
    T = (input_size // p) ** 2
    out_c = 2 * C if learn_sigma else C
    block = (3 * D * D + 3 * D) + (D * D + D) + (D * H + H) + (H * D + D) + (D * 6 * D + 6 * D)
    embed = (C * p * p * D + D) + T * D + (freq * D + D) + (D * D + D) + (num_classes + int(cfg_row)) * D
    final = (D * p * p * out_c + p * p * out_c) + (D * 2 * D + 2 * D)
    return depth * block + embed + final


def meta_model(name, **kw):
    args = dict(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True, class_dropout=0.1)
    args.update(kw)
    with torch.device("meta"):
        return build_dit(name, **args)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_dit_xl2_param_count_matches_official():
    model = meta_model("DiT-XL/2")
    assert n_params(model) == 675_129_632  # what facebookresearch/DiT prints for DiT-XL/2 (256 px)
    assert analytic_param_count(28, 1152, 2) == 675_129_632


@pytest.mark.parametrize("name,paper_m", [("DiT-S/2", 33.0), ("DiT-B/2", 130.0), ("DiT-L/2", 458.0),
                                          ("DiT-XL/2", 675.0)])
def test_param_counts_vs_paper_table(name, paper_m):
    model = meta_model(name)
    depth, D, _ = (len(model.blocks), model.hidden_size, None)
    n = n_params(model)
    assert n == analytic_param_count(depth, D, 2)
    assert abs(n / 1e6 - paper_m) / paper_m < 0.01


@pytest.mark.parametrize("kw", [dict(class_dropout=0.0), dict(learn_sigma=False), dict(input_size=64, in_channels=3)])
def test_param_count_variants(kw):
    model = meta_model("DiT-B/4", **kw)
    a = dict(C=kw.get("in_channels", 4), input_size=kw.get("input_size", 32),
             cfg_row=kw.get("class_dropout", 0.1) > 0, learn_sigma=kw.get("learn_sigma", True))
    assert n_params(model) == analytic_param_count(12, 768, 4, **a)


# ---------------------------------------------------------------------------------------------
# 3. state-dict layout
# ---------------------------------------------------------------------------------------------
def official_keys_and_shapes(depth, D, p, C, out_c, T, n_emb, H):
    sd = {
        "pos_embed": (1, T, D),
        "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (n_emb, D),
        "final_layer.linear.weight": (p * p * out_c, D), "final_layer.linear.bias": (p * p * out_c,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "mlp.fc1.weight": (H, D), b + "mlp.fc1.bias": (H,),
            b + "mlp.fc2.weight": (D, H), b + "mlp.fc2.bias": (D,),
            b + "adaLN_modulation.1.weight": (6 * D, D), b + "adaLN_modulation.1.bias": (6 * D,),
        })
    return sd


@pytest.mark.parametrize("class_dropout", [0.1, 0.0])
def test_state_dict_matches_official_layout(class_dropout):
    model = small_dit(depth=3, class_dropout=class_dropout)
    sd = model.state_dict()
    n_emb = 11 if class_dropout > 0 else 10
    expected = official_keys_and_shapes(3, 32, 2, 3, 6, 16, n_emb, 128)
    assert set(sd) == set(expected)
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any("norm" in k for k in sd)  # LayerNorms carry no affine parameters


def test_official_style_checkpoint_loads_strictly():
    """A state dict built from the official key list (random values) loads with strict=True and
    its values land where expected (e.g. the null-class row of the embedding table)."""
    model = small_dit(depth=2)
    expected = official_keys_and_shapes(2, 32, 2, 3, 6, 16, 11, 128)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) for k, s in expected.items()}
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.y_embedder.embedding_table.weight[10], sd["y_embedder.embedding_table.weight"][10])
    assert torch.equal(model.blocks[1].adaLN_modulation[1].weight, sd["blocks.1.adaLN_modulation.1.weight"])


# ---------------------------------------------------------------------------------------------
# 4. attention
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,heads", [(32, 4), (48, 3), (16, 1)])
def test_attention_vs_float64_reference(dim, heads):
    torch.manual_seed(0)
    attn = Attention(dim, heads)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lin in (attn.qkv, attn.proj):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / math.sqrt(dim))
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.1)
    B, T = 2, 9
    x = torch.randn(B, T, dim, generator=g)
    out = attn(x).detach().double()

    # reference: per head, explicit softmax(Q K^T / sqrt(dh)) V in float64
    xd = x.double()
    Wqkv, bqkv = attn.qkv.weight.double(), attn.qkv.bias.double()
    Wo, bo = attn.proj.weight.double(), attn.proj.bias.double()
    dh = dim // heads
    q, k, v = (xd @ Wqkv[i * dim:(i + 1) * dim].T + bqkv[i * dim:(i + 1) * dim] for i in range(3))
    heads_out = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        s = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(dh)
        a = torch.exp(s - s.max(dim=-1, keepdim=True).values)
        a = a / a.sum(dim=-1, keepdim=True)
        heads_out.append(a @ v[..., sl])
    ref = torch.cat(heads_out, dim=-1) @ Wo.T + bo
    assert (out - ref).abs().max() < 1e-5
    # the reference is not trivially close to e.g. a uniform-attention result
    assert (ref - (v.mean(dim=1, keepdim=True) @ Wo.T + bo)).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------
# 5. positional embedding
# ---------------------------------------------------------------------------------------------
def reference_pos_embed(D, G):
    """Token k = (row i, col j) = (k // G, k % G). Channels [0, D/2): column j; [D/2, D): row i;
    within each half, [sin(pos w_0..w_{D/4-1}), cos(pos w_0..)] with w_m = 10000^(-m / (D/4))."""
    quarter = D // 4
    out = np.zeros((G * G, D), dtype=np.float64)
    for k in range(G * G):
        i, j = divmod(k, G)
        for m in range(quarter):
            w = 10000.0 ** (-m / quarter)
            out[k, m] = math.sin(j * w)
            out[k, quarter + m] = math.cos(j * w)
            out[k, 2 * quarter + m] = math.sin(i * w)
            out[k, 3 * quarter + m] = math.cos(i * w)
    return out


@pytest.mark.parametrize("D,G", [(16, 4), (64, 8), (384, 16)])
def test_sincos_pos_embed_vs_reference(D, G):
    pe = sincos_pos_embed_2d(D, G)
    assert pe.dtype == np.float64 and pe.shape == (G * G, D)
    np.testing.assert_allclose(pe, reference_pos_embed(D, G), rtol=0, atol=1e-12)


def test_model_pos_embed_is_frozen_and_correct():
    model = small_dit()
    assert not model.pos_embed.requires_grad
    assert all(p is not model.pos_embed for p in model.parameters() if p.requires_grad)
    np.testing.assert_allclose(model.pos_embed[0].detach().double().numpy(), reference_pos_embed(32, 4), atol=1e-6)
    randomize_zero_init(model)
    x, t, y, _ = random_inputs(model)
    model(x, t, y).square().sum().backward()
    assert model.pos_embed.grad is None
    assert model.x_embedder.proj.weight.grad is not None


# ---------------------------------------------------------------------------------------------
# 6. timestep embedding
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [256, 64, 7])
def test_timestep_embedding_closed_form(dim):
    t = torch.tensor([0, 1, 2.5, 17, 250, 999], dtype=torch.float32)
    emb = TimestepEmbedder.timestep_embedding(t, dim).double().numpy()
    half = dim // 2
    f = np.exp(-math.log(10000.0) * np.arange(half) / half)
    args = t.double().numpy()[:, None] * f[None]
    ref = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    if dim % 2:
        ref = np.concatenate([ref, np.zeros((len(t), 1))], axis=1)
    assert emb.shape == ref.shape
    # float32 argument t*f has relative error ~1e-7, i.e. absolute ~1e-4 at t = 999
    np.testing.assert_allclose(emb, ref, rtol=0, atol=3e-4)
    np.testing.assert_allclose(emb[:4], ref[:4], rtol=0, atol=1e-5)


def test_timestep_embedder_forward_is_mlp_of_embedding():
    te = TimestepEmbedder(24)
    t = torch.tensor([3.0, 500.0])
    e = torch.cat([torch.cos(t[:, None] * torch.exp(-math.log(10000.0) * torch.arange(128) / 128)),
                   torch.sin(t[:, None] * torch.exp(-math.log(10000.0) * torch.arange(128) / 128))], 1).double()
    W0, b0 = te.mlp[0].weight.double(), te.mlp[0].bias.double()
    W2, b2 = te.mlp[2].weight.double(), te.mlp[2].bias.double()
    h = e @ W0.T + b0
    ref = (h * torch.sigmoid(h)) @ W2.T + b2
    assert (te(t).double() - ref).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# 7. patchify / unpatchify
# ---------------------------------------------------------------------------------------------
def patchify(img, p):
    """(N, C, H, W) -> (N, T, p*p*C) with token order row-major over patches and channel order
    (p_row, p_col, c), the layout of the official DiT's unpatchify."""
    N, C, H, W = img.shape
    h, w = H // p, W // p
    x = img.reshape(N, C, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(N, h * w, p * p * C)


@pytest.mark.parametrize("p,learn_sigma", [(2, True), (4, False), (1, True)])
def test_unpatchify_inverts_patchify(p, learn_sigma):
    model = small_dit(patch_size=p, learn_sigma=learn_sigma)
    C = model.out_channels
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, C, 8, 8, generator=g)
    tokens = patchify(img, p)
    assert torch.equal(model.unpatchify(tokens), img)
    # explicit index check of the layout: token (r, s), entry (i*p + j)*C + c -> pixel (r*p+i, s*p+j)
    h = 8 // p
    k = torch.randn(2, h * h, p * p * C, generator=g)
    out = model.unpatchify(k)
    for r, s, i, j, c in [(0, 0, 0, 0, 0), (h - 1, 0, p - 1, 0, C - 1), (0, h - 1, 0, p - 1, 1), (1 % h, 0, 0, p - 1, 2)]:
        assert out[1, c, r * p + i, s * p + j] == k[1, r * h + s, (i * p + j) * C + c]


def test_patch_embed_token_order_matches_pos_embed_order():
    """Token k of x_embedder is the patch at (row k // G, col k % G): a linear map of the
    float64 patch vector computed with the test's own patchify."""
    model = small_dit(patch_size=2)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 8, 8, generator=g)
    W = model.x_embedder.proj.weight.double()  # (D, C, p, p)
    Wflat = W.permute(0, 2, 3, 1).reshape(32, -1)  # (D, p*p*C) in (i, j, c) order
    ref = patchify(img.double(), 2) @ Wflat.T + model.x_embedder.proj.bias.double()
    assert (model.x_embedder(img).double() - ref).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------
# 8. FLOPs
# ---------------------------------------------------------------------------------------------
def counted_flops(model, batch=1):
    x, t, y, _ = random_inputs(model, n=batch)
    # On CPU, F.scaled_dot_product_attention dispatches to aten._scaled_dot_product_flash_attention_for_cpu,
    # which FlopCounterMode has no formula for (it would count 0). The MATH backend decomposes
    # attention into two bmm's, which FlopCounterMode does count.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(x, t, y)
    return fc.get_total_flops() / batch


@pytest.mark.parametrize("kw", [dict(input_size=32, patch_size=2, hidden_size=64, depth=2, num_heads=4),
                                dict(input_size=16, patch_size=4, hidden_size=48, depth=3, num_heads=3,
                                     learn_sigma=False, mlp_ratio=2.0)])
def test_flops_per_forward_matches_flop_counter(kw):
    model = small_dit(**kw)
    ref = counted_flops(model, batch=2)
    est = model.flops_per_forward()
    assert abs(est - ref) / ref < 0.02
    # the comparison is sensitive to the attention term: dropping it would fail by far more than 2 %
    D, T = model.hidden_size, model.pos_embed.shape[1]
    attn_term = len(model.blocks) * 4 * T * T * D
    assert attn_term / ref > 0.05


def test_flops_dit_s4_batch1():
    model = build_dit("DiT-S/4", input_size=32, in_channels=4, num_classes=10)
    ref = counted_flops(model, batch=1)
    assert abs(model.flops_per_forward() - ref) / ref < 0.02


# ---------------------------------------------------------------------------------------------
# 9. CEP
# ---------------------------------------------------------------------------------------------
def test_cep_equals_shifted_class_embedding():
    torch.manual_seed(0)
    model = randomize_zero_init(small_dit(depth=2), std=0.1).eval()
    x, t, y, delta = random_inputs(model, n=4)
    delta = delta * 0.5
    with torch.no_grad():
        out_cep = model(x, t, y, cond_noise=delta)
        # (a) the same delta injected with a forward hook on y_embedder
        h = model.y_embedder.register_forward_hook(lambda mod, inp, out: out + delta)
        try:
            out_hook = model(x, t, y)
        finally:
            h.remove()
        assert torch.allclose(out_cep, out_hook, atol=1e-6, rtol=0)

        # (b) manual forward in float64 with c = t_emb + (y_emb + delta)
        md = small_dit(depth=2).double()
        md.load_state_dict(model.state_dict())
        xd = md.x_embedder(x.double()) + md.pos_embed
        temb = md.t_embedder.mlp(TimestepEmbedder.timestep_embedding(t, 256).double())
        c = temb + md.y_embedder.embedding_table.weight[y] + delta.double()
        for blk in md.blocks:
            xd = blk(xd, c)
        ref = md.unpatchify(md.final_layer(xd, c))
        assert (out_cep.double() - ref).abs().max() < 1e-5

        # None == zeros exactly; and a non-zero delta actually changes the output
        out_none, out_zero = model(x, t, y), model(x, t, y, cond_noise=torch.zeros_like(delta))
        assert torch.equal(out_none, out_zero)
        assert (out_cep - out_none).abs().max() > 1e-3


def test_cep_per_row_only_affects_that_row():
    model = randomize_zero_init(small_dit(depth=2), std=0.1).eval()
    x, t, y, delta = random_inputs(model, n=3)
    delta[1] = 0
    with torch.no_grad():
        a, b = model(x, t, y), model(x, t, y, cond_noise=delta)
    assert torch.allclose(a[1], b[1], atol=1e-6, rtol=0)
    assert (a[0] - b[0]).abs().max() > 1e-3 and (a[2] - b[2]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# 10. learn_sigma
# ---------------------------------------------------------------------------------------------
def test_learn_sigma_output_channels_and_layout():
    torch.manual_seed(0)
    m_ls = randomize_zero_init(small_dit(learn_sigma=True))
    m_no = small_dit(learn_sigma=False)
    assert m_ls.out_channels == 6 and m_no.out_channels == 3
    # copy every weight; the eps channels of the final linear are rows with (row % 2C) < C
    sd = m_ls.state_dict()
    rows = torch.tensor([r for r in range(2 * 2 * 6) if r % 6 < 3])
    sd["final_layer.linear.weight"] = sd["final_layer.linear.weight"][rows]
    sd["final_layer.linear.bias"] = sd["final_layer.linear.bias"][rows]
    m_no.load_state_dict(sd)
    x, t, y, _ = random_inputs(m_ls)
    with torch.no_grad():
        o_ls, o_no = m_ls(x, t, y), m_no(x, t, y)
    assert o_ls.shape == (3, 6, 8, 8) and o_no.shape == (3, 3, 8, 8)
    assert torch.allclose(o_ls[:, :3], o_no, atol=1e-6, rtol=0)
    assert o_no.abs().max() > 1e-3


def test_build_dit_configs_and_unknown_name():
    for name, (d, h, n) in {"DiT-S/2": (12, 384, 6), "DiT-B/4": (12, 768, 12), "DiT-L/8": (24, 1024, 16),
                            "DiT-XL/2": (28, 1152, 16)}.items():
        cfg = DIT_CONFIGS[name]
        assert (cfg["depth"], cfg["hidden_size"], cfg["num_heads"], cfg["patch_size"]) == (d, h, n, int(name[-1]))
    with pytest.raises(ValueError):
        build_dit("DiT-XXL/2")


def test_official_state_dict_round_trip():
    """A bare state dict laid out like the official DiT checkpoints rebuilds the same model."""
    from models.dit import build_dit, config_from_state_dict, dit_from_checkpoint
    torch.manual_seed(0)
    model = build_dit("DiT-S/4", input_size=16, in_channels=3, num_classes=7, learn_sigma=True)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    sd = model.state_dict()
    config = config_from_state_dict(sd)
    assert config == dict(name="DiT-S/4", input_size=16, in_channels=3, num_classes=7, class_dropout=0.1, learn_sigma=True)
    rebuilt = dit_from_checkpoint(sd)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([5, 500]), torch.tensor([1, 7])
    assert torch.equal(rebuilt(x, t, y), model.eval()(x, t, y))
    with pytest.raises(ValueError):
        dit_from_checkpoint({"foo": torch.zeros(1)})
