"""Tests for models/vae.py: the hand-written first stages against diffusers' AutoencoderKL / VQModel.

Each reference model is built by diffusers from a tiny SD-shaped config with random weights (norm
affines and biases perturbed so none is trivially 1 or 0), saved with `save_pretrained`, loaded back
with `load_vae`, and compared output by output on random, non-square inputs."""
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import pytest
import torch
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")

from models.vae import (AutoencoderKL, VQModel, decode_latents, diffusion_latents, encode_images,  # noqa: E402
                        load_vae)

TOL = 1e-5


def assert_rel_close(actual, expected, tol=TOL):
    err = (actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)
    assert actual.shape == expected.shape and err <= tol, f"relative error {float(err):.3g} > {tol}"


def randomise(model, seed):
    """Perturb every 1-d parameter (norm weights/biases, biases) so nothing is exactly 1 or 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    assert all(p.abs().sum() > 0 for p in model.parameters())
    return model.eval()


def tiny_blocks(widths):
    return dict(block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * len(widths),
                up_block_types=("UpDecoderBlock2D",) * len(widths))


# ---------------------------------------------------------------------------------------------------
# AutoencoderKL


@pytest.mark.parametrize("widths,layers", [((32, 64), 1), ((32, 64, 64), 2)])
def test_kl_matches_diffusers(tmp_path, widths, layers):
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**tiny_blocks(widths), layers_per_block=layers, norm_num_groups=8,
                                  latent_channels=4, sample_size=32)
    randomise(ref, 1)
    with torch.no_grad():  # two logvar channels far out of range, so that the clamp to [-30, 20] matters
        ref.quant_conv.bias[4] += 60.0
        ref.quant_conv.bias[5] -= 60.0
    ref.save_pretrained(tmp_path)
    vae = load_vae(tmp_path)
    assert isinstance(vae, AutoencoderKL) and not vae.training and vae.scaling_factor == 0.18215

    x = torch.rand(2, 3, 32, 24) * 2 - 1  # H != W catches a transposed attention reshape
    with torch.no_grad():
        posterior = ref.encode(x).latent_dist
        mean, logvar = vae.encode(x)
        assert_rel_close(mean, posterior.mean)
        assert_rel_close(logvar, posterior.logvar)
        assert logvar.max() == 20.0 and logvar.min() == -30.0
        f = 2 ** (len(widths) - 1)
        assert mean.shape == (2, 4, 32 // f, 24 // f)

        z = torch.randn(2, 4, 32 // f, 24 // f)
        assert_rel_close(vae.decode(z), ref.decode(z).sample)
        assert_rel_close(vae.decode(mean), ref.decode(posterior.mean).sample)

        # the same posterior draw as diffusers for the same generator state
        sample = vae.sample_latent(mean, logvar, torch.Generator().manual_seed(3))
        assert_rel_close(sample, posterior.sample(torch.Generator().manual_seed(3)))

        # helpers: unscaled moments in, scaled latents to the diffusion model, unscaled again to decode
        m, lv = encode_images(vae, x)
        assert torch.equal(m, mean) and torch.equal(lv, logvar)
        assert torch.equal(diffusion_latents(vae, m), 0.18215 * m)
        assert_rel_close(decode_latents(vae, 0.18215 * z), ref.decode(z).sample)


def test_kl_loads_bin_and_legacy_attention_names(tmp_path):
    torch.manual_seed(0)
    ref = randomise(diffusers.AutoencoderKL(**tiny_blocks((32, 64)), layers_per_block=1, norm_num_groups=8), 1)
    ref.save_pretrained(tmp_path / "bin", safe_serialization=False)
    ref.save_pretrained(tmp_path / "legacy")
    weights = tmp_path / "legacy" / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in load_file(weights).items():
        for new, legacy in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        state[k] = v
    assert any(".query." in k for k in state)
    save_file(state, weights)

    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(x).latent_dist.mean
        for folder in ("bin", "legacy"):
            assert_rel_close(load_vae(tmp_path / folder).encode(x)[0], expected)


# ---------------------------------------------------------------------------------------------------
# VQModel


@pytest.mark.parametrize("embed_dim", [3, 4])
def test_vq_matches_diffusers(tmp_path, embed_dim):
    torch.manual_seed(0)
    ref = diffusers.VQModel(**tiny_blocks((32, 64)), layers_per_block=1, latent_channels=3, num_vq_embeddings=64,
                            vq_embed_dim=embed_dim, norm_num_groups=8, sample_size=32)
    randomise(ref, 1)
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    with torch.no_grad():  # a codebook of jittered latent vectors, so that many entries are used
        h_ref = ref.encode(x).latents
        flat = h_ref.permute(0, 2, 3, 1).reshape(-1, embed_dim)
        codes = flat[torch.randperm(len(flat))[:64]]
        ref.quantize.embedding.weight.copy_(codes + 0.05 * h_ref.std() * torch.randn_like(codes))
    ref.save_pretrained(tmp_path)
    vae = load_vae(tmp_path)
    assert isinstance(vae, VQModel) and vae.scaling_factor == 1.0

    with torch.no_grad():
        h = vae.encode(x)
        assert h.shape == (2, embed_dim, 16, 12)
        assert_rel_close(h, h_ref)

        # quantize: the nearest entry by brute force (ties within rounding allowed), and diffusers' choice
        z_q, indices = vae.quantize(h_ref)
        codebook = ref.quantize.embedding.weight
        flat = h_ref.permute(0, 2, 3, 1).reshape(-1, embed_dim)
        dist = ((flat[:, None, :] - codebook[None]) ** 2).sum(-1)
        ours = dist.gather(1, indices.reshape(-1, 1)).squeeze(1)
        assert indices.shape == (2, 16, 12) and len(indices.unique()) > 32
        assert torch.all(ours <= dist.min(1).values + 1e-5)
        assert (indices.reshape(-1) == dist.argmin(1)).float().mean() > 0.99
        assert torch.equal(indices.reshape(-1), ref.quantize(h_ref)[2][2].reshape(-1))
        assert_rel_close(z_q, codebook[indices].permute(0, 3, 1, 2))

        # decode quantises by default (diffusers and LDM); force_not_quantize decodes h itself
        quantised = vae.decode(h_ref)
        assert_rel_close(quantised, ref.decode(h_ref).sample)
        raw = vae.decode(h_ref, force_not_quantize=True)
        assert_rel_close(raw, ref.decode(h_ref, force_not_quantize=True).sample)
        assert (quantised - raw).abs().max() > 1e-2

        # helpers: h is what LDM-4 trains on, unscaled
        h2, logvar = encode_images(vae, x)
        assert logvar is None and torch.equal(h2, h) and torch.equal(diffusion_latents(vae, h2), h2)
        assert_rel_close(decode_latents(vae, h_ref), ref.decode(h_ref).sample)

    # straight-through estimator (van den Oord et al. 2017): the gradient of z_q w.r.t. h is the identity
    h = h_ref.clone().requires_grad_(True)
    (vae.quantize(h)[0] * torch.arange(h.numel()).view_as(h)).sum().backward()
    assert torch.equal(h.grad, torch.arange(h.numel()).view_as(h).float())


# ---------------------------------------------------------------------------------------------------
# Errors


def write_config(folder, **config):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such VAE folder"):
        load_vae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_vae(write_config(tmp_path / "kl", _class_name="AutoencoderKL"))
    with pytest.raises(ValueError, match="unsupported autoencoder class 'UNet2DModel'"):
        load_vae(write_config(tmp_path / "unet", _class_name="UNet2DModel"))
    with pytest.raises(ValueError, match="not the requested VQModel"):
        load_vae(tmp_path / "kl", kind="VQModel")
    with pytest.raises(ValueError, match="unsupported autoencoder class None"):
        load_vae(write_config(tmp_path / "anonymous"))

    # configs whose options change the maths: refused, not silently mis-built
    with pytest.raises(ValueError, match="norm_type='spatial'"):
        VQModel({"norm_type": "spatial"})
    with pytest.raises(ValueError, match="lookup_from_codebook"):
        VQModel({"lookup_from_codebook": True})
    with pytest.raises(ValueError, match="shift_factor"):
        AutoencoderKL({"shift_factor": 0.1159})
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        AutoencoderKL({"down_block_types": ["AttnDownEncoderBlock2D"] * 4})
    with pytest.raises(ValueError, match="unsupported config key"):
        AutoencoderKL({"temporal_compression_ratio": 4})

    # weights that do not fit the config
    torch.manual_seed(0)
    diffusers.AutoencoderKL(**tiny_blocks((32, 64)), norm_num_groups=8).save_pretrained(tmp_path / "tiny")
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    (tmp_path / "tiny" / "config.json").write_text(json.dumps({**config, "latent_channels": 8}))
    with pytest.raises(ValueError, match="does not match its config"):
        load_vae(tmp_path / "tiny")

    # a hub id with the hub unreachable
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="could not be fetched from the Hugging Face Hub"):
        load_vae("no-such-user-0/no-such-vae-0")
    # owner/name/subfolder: the subfolder of a hub pipeline (e.g. an LDM pipeline's vqvae)
    import models.vae as vae_module
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(config))
    fetched = []
    monkeypatch.setattr(vae_module, "_download", lambda repo, sub: fetched.append((repo, sub)) or str(tmp_path / "tiny"))
    assert isinstance(load_vae("some-org/some-ldm/vqvae"), AutoencoderKL) and fetched == [("some-org/some-ldm", "vqvae")]
    with pytest.raises(FileNotFoundError, match="no such VAE folder"):
        load_vae("a/b/c/d")


# ---------------------------------------------------------------------------------------------------
# The real configs (meta device: shapes only, no memory)

SD_VAE_CONFIG = {  # stabilityai/sd-vae-ft-ema/config.json (DiT-XL/2's first stage)
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "norm_num_groups": 32, "out_channels": 3, "sample_size": 256, "up_block_types": ["UpDecoderBlock2D"] * 4}
LDM_VQ_F4_CONFIG = {  # LDM-4's vq-f4 in diffusers' keys
    "_class_name": "VQModel", "act_fn": "silu", "block_out_channels": [128, 256, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 3, "in_channels": 3, "latent_channels": 3, "layers_per_block": 2,
    "norm_num_groups": 32, "num_vq_embeddings": 8192, "out_channels": 3, "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 3, "vq_embed_dim": 3}


def shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("ours,theirs,config,count", [
    (AutoencoderKL, diffusers.AutoencoderKL, SD_VAE_CONFIG, 83_653_863),
    (VQModel, diffusers.VQModel, LDM_VQ_F4_CONFIG, 55_322_782)])
def test_real_configs_match_diffusers(ours, theirs, config, count):
    with torch.device("meta"):
        default, from_config = ours(), ours(config)
        ref = theirs(**{k: v for k, v in config.items() if not k.startswith("_")})
    assert shapes(default) == shapes(from_config) == shapes(ref)
    assert sum(p.numel() for p in default.parameters()) == sum(p.numel() for p in ref.parameters()) == count
