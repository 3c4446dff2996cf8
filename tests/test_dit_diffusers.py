"""diffusers DiTTransformer2DModel -> our DiT: the converted weights load strictly and reproduce
diffusers' forward pass; and the conventions where the two implementations differ are pinned down."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DiTTransformer2DModel  # noqa: E402

from models.dit import DiT, TimestepEmbedder  # noqa: E402
from models.from_diffusers import dit_state_dict_from_diffusers  # noqa: E402

torch.set_num_threads(2)

TINY = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, num_embeds_ada_norm=10)


def tiny_diffusers(seed=0, tie_embedders=True, std=0.1, **kw):
    """A tiny diffusers DiT with every parameter re-drawn from N(0, std²) (nothing zero, unlike its
    adaLN-Zero-free default init). With `tie_embedders`, every block's timestep/class embedder is a
    copy of block 0's, as in diffusers checkpoints converted from the official DiT."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**dict(TINY, **kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
        if tie_embedders:
            for block in model.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model.eval()


def our_dit(**kw):
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
               class_dropout=0.1, learn_sigma=True, t_freq_shift=1)
    return DiT(**dict(cfg, **kw)).eval()


def inputs(n=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    t = torch.tensor([0, 17, 500, 999][:n])
    y = torch.tensor([3, 10, 0, 9][:n])  # 10 = the null class
    return x, t, y


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_converted_diffusers_dit_matches_forward():
    ref_model = tiny_diffusers(norm_eps=1e-6)
    sd = dit_state_dict_from_diffusers(ref_model.state_dict(), sample_size=8)
    ours = our_dit()
    ours.load_state_dict(sd, strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        ref = ref_model(x, timestep=t, class_labels=y).sample
        out = ours(x, t, y)
        assert out.shape == ref.shape == (4, 8, 8, 8)
        assert ref.abs().max() > 1e-2 and ref.std() > 1e-2  # a non-trivial output
        assert rel_err(out, ref) <= 1e-5
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
        # every sample depends on its own label and timestep (so y and t were really mapped)
        assert rel_err(ours(x, t, y.roll(1)), ref) > 1e-2 and rel_err(ours(x, t.roll(1), y), ref) > 1e-2
        # float timesteps too
        tf = t.float() + 0.37
        assert rel_err(ours(x, tf, y), ref_model(x, timestep=tf, class_labels=y).sample) <= 1e-5


def test_converted_keys_and_values():
    ref_model = tiny_diffusers()
    dsd = ref_model.state_dict()
    sd = dit_state_dict_from_diffusers(dsd, sample_size=8)
    assert set(sd) == set(our_dit().state_dict())
    b = "transformer_blocks.1."
    qkv = sd["blocks.1.attn.qkv.weight"]
    assert torch.equal(qkv[:32], dsd[b + "attn1.to_q.weight"]) and torch.equal(qkv[64:], dsd[b + "attn1.to_v.weight"])
    assert torch.equal(sd["t_embedder.mlp.2.bias"], dsd[b + "norm1.emb.timestep_embedder.linear_2.bias"])
    assert torch.equal(sd["final_layer.adaLN_modulation.1.weight"], dsd["proj_out_1.weight"])
    # diffusers' (non-persistent) pos_embed buffer equals the one we rebuild
    assert (sd["pos_embed"] - ref_model.pos_embed.pos_embed).abs().max() < 1e-6


def test_untied_embedders_and_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match="shares one embedder"):
        dit_state_dict_from_diffusers(tiny_diffusers(tie_embedders=False).state_dict(), sample_size=8)
    with pytest.raises(ValueError, match="no counterpart"):  # affine LayerNorms have no place in our DiT
        dit_state_dict_from_diffusers(tiny_diffusers(norm_elementwise_affine=True).state_dict(), sample_size=8)
    with pytest.raises(RuntimeError):  # a wrong grid size is caught by the strict load
        our_dit().load_state_dict(dit_state_dict_from_diffusers(tiny_diffusers().state_dict(), sample_size=16))


def test_timestep_frequency_discrepancy():
    """diffusers' DiT: Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1), i.e. [cos, sin] as
    in the official DiT but frequencies 10000^(-i/127) instead of 10000^(-i/128): equal to ours only
    with freq_shift=1; with the official convention (the default) the forward pass differs."""
    from diffusers.models.embeddings import Timesteps
    t = torch.tensor([0.0, 1.0, 17.0, 500.0, 999.0])
    theirs = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)(t)
    assert torch.allclose(TimestepEmbedder.timestep_embedding(t, 256, freq_shift=1), theirs, atol=1e-6, rtol=0)
    assert (TimestepEmbedder.timestep_embedding(t, 256) - theirs).abs().max() > 0.1
    official = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(t)
    assert torch.allclose(TimestepEmbedder.timestep_embedding(t, 256), official, atol=1e-6, rtol=0)

    ref_model = tiny_diffusers(norm_eps=1e-6)
    ours = our_dit(t_freq_shift=0)
    ours.load_state_dict(dit_state_dict_from_diffusers(ref_model.state_dict(), sample_size=8))
    x, t, y = inputs()
    with torch.no_grad():
        assert rel_err(ours(x, t, y), ref_model(x, timestep=t, class_labels=y).sample) > 1e-3


def test_mlp_layernorm_eps_follows_the_config():
    """diffusers' pre-MLP LayerNorm (norm3) uses config.norm_eps, default 1e-5; the official DiT 1e-6,
    our default. Built with mlp_norm_eps = the config's, our DiT gives diffusers' output to float
    rounding; with 1e-6 it is off by ~2.5e-6 relative, 100x more (so this test can fail)."""
    ref_model = tiny_diffusers()  # norm_eps = 1e-5
    assert ref_model.transformer_blocks[0].norm3.eps == 1e-5 and ref_model.transformer_blocks[0].norm1.norm.eps == 1e-6
    x, t, y = inputs()
    errors = {}
    for eps in (1e-5, 1e-6):
        ours = our_dit(mlp_norm_eps=eps)
        ours.load_state_dict(dit_state_dict_from_diffusers(ref_model.state_dict(), sample_size=8))
        with torch.no_grad():
            errors[eps] = rel_err(ours(x, t, y), ref_model(x, timestep=t, class_labels=y).sample)
    assert errors[1e-5] < 1e-7 < 1e-6 < errors[1e-6] < 1e-4, errors


def test_diffusers_drops_labels_in_train_mode_ours_does_not():
    """diffusers' LabelEmbedding replaces labels by the null class with p = 0.1 in train(), and it does
    so independently in every block's own embedder copy (and once more for the final layer), so a
    sample may be conditional in one block and unconditional in the next: not the official DiT's
    label dropout. Our DiT leaves dropout to the caller (train.py): deterministic in either mode."""
    ref_model = tiny_diffusers(norm_eps=1e-6)
    ours = our_dit()
    ours.load_state_dict(dit_state_dict_from_diffusers(ref_model.state_dict(), sample_size=8))
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(64, 4, 8, 8, generator=g), torch.randint(0, 1000, (64,), generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    same = lambda a, b: (a - b).flatten(1).abs().amax(1) <= 1e-5 * b.abs().max()  # noqa: E731
    with torch.no_grad():
        ref_eval = ref_model(x, timestep=t, class_labels=y).sample
        ours_null = ours(x, t, torch.full_like(y, 10))
        torch.manual_seed(0)
        ref_train = ref_model.train()(x, timestep=t, class_labels=y).sample
        ours_train = ours.train()(x, t, y)
    assert rel_err(ours_train, ref_eval) <= 1e-5
    conditional, null = same(ref_train, ref_eval), same(ref_train, ours_null)
    assert 0 < (~conditional).sum() < 64  # some labels were dropped by diffusers ...
    assert (~conditional & ~null).sum() > 0  # ... in some blocks only (a partly-null condition)
