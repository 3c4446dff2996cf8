"""Tests for the named U-Net configs of models/unet.py: LDM-4 / SD 1.5 parameter counts, SD 1.x weights from diffusers."""
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import pytest
import torch

from models.unet import UNET_CONFIGS, UNet, build_unet
from tests.helpers import SD15_DIFFUSERS_CONFIG, diffusers_unet

torch.set_num_threads(2)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# parameter counts of LDM-4 and the small configs
# ---------------------------------------------------------------------------------------------
def test_ldm4_param_count():
    """LDM-4 = CompVis' cin256-v2.yaml. The LDM paper (Rombach et al. 2022, Table 3, class-conditional
    ImageNet 256) lists LDM-4 with 400M parameters; Chen et al. 2024 reuse that model. The exact count
    of the U-Net (400,920,579) is checked against diffusers' independent implementation of the same
    config; the 1001 x 512 class table (LDM's ClassEmbedder, here y_embedder) adds 512,512."""
    with torch.device("meta"):
        model = build_unet("LDM-4")
    table = model.y_embedder.embedding_table
    assert (table.num_embeddings, table.embedding_dim) == (1001, 512)
    n_unet = n_params(model) - table.weight.numel()
    assert n_unet == 400_920_579
    assert 396e6 < n_params(model) < 404e6  # the paper's 400M (rounded) within 1 %
    if os.environ.get("CI"):
        import diffusers  # noqa: F401  (must be installed in CI)
    assert n_params(diffusers_unet(UNET_CONFIGS["LDM-4"], meta=True)) == n_unet
    # the LDM-4 layout: attention on the 32x32, 16x16 and 8x8 maps (down-factors 2, 4, 8), not on 64x64
    assert len(model.input_blocks[1]) == 1 and len(model.input_blocks[4]) == 2
    assert len(model.output_blocks[-1]) == 1 and len(model.output_blocks[0]) == 2


def test_small_configs_build_and_unknown_name_lists_choices():
    for name in UNET_CONFIGS:
        with torch.device("meta"):
            model = build_unet(name)
        assert model.num_classes == UNET_CONFIGS[name]["num_classes"]
    assert 0.5e6 < n_params(build_unet("UNet-T")) < n_params(build_unet("UNet-S")) < 20e6
    m = build_unet("UNet-T", class_cond="add", learn_sigma=True, num_classes=5, class_dropout=0.0)
    assert (m.out_channels, m.y_embedder.embedding_table.weight.shape) == (2, (5, 128))
    with pytest.raises(ValueError, match="LDM-4, UNet-T, UNet-S"):
        build_unet("UNet-XL")


# ---------------------------------------------------------------------------------------------
# Stable Diffusion 1.x layout and diffusers weights (the LCM teacher of finetune.py)
# ---------------------------------------------------------------------------------------------


def test_sd15_layout_parameter_count():
    """The SD 1.x configuration, from its own entry and from diffusers' config.json, has Stable
    Diffusion 1.5's 859,520,964 U-Net parameters (counted without weights, on the meta device)."""
    from models.from_diffusers import unet_config_from_diffusers
    derived = unet_config_from_diffusers(SD15_DIFFUSERS_CONFIG)
    assert {k: v for k, v in derived.items() if k not in ("learn_sigma", "guidance_dim")} == UNET_CONFIGS["SD-1.5"]
    with torch.device("meta"):
        assert n_params(build_unet("SD-1.5")) == n_params(UNet(**derived)) == 859_520_964


@pytest.mark.parametrize("cond_proj", [0, 16])
def test_sd_layout_loads_diffusers_weights_and_matches_diffusers(cond_proj):
    """A tiny random UNet2DConditionModel of SD 1.x's layout (3 cross-attention levels and a plain
    one, 2 layers per block, 8 heads; with cond_proj: an LCM student's guidance embedding): its state
    dict converted by unet_state_dict_from_diffusers loads strictly and gives diffusers' output."""
    if os.environ.get("CI"):
        import diffusers  # noqa: F401  (must be installed in CI)
    diffusers = pytest.importorskip("diffusers")
    from models.from_diffusers import unet_config_from_diffusers, unet_state_dict_from_diffusers
    config = dict(SD15_DIFFUSERS_CONFIG, sample_size=16, block_out_channels=[32, 64, 64, 64], cross_attention_dim=24,
                  time_cond_proj_dim=cond_proj or None)
    torch.manual_seed(0)
    reference = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in reference.parameters():  # no zero-initialised layer left: every path counts
            p.add_(0.05 * torch.randn_like(p))
    ours = UNet(**unet_config_from_diffusers(config)).eval()
    ours.load_state_dict(unet_state_dict_from_diffusers(reference.state_dict()), strict=True)
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, 24, generator=g)
    t, w = torch.tensor([3, 870]), torch.tensor([1.5, 7.0])
    kw = {}
    if cond_proj:  # diffusers' LCM pipeline embeds w itself; ours takes w
        kw["timestep_cond"] = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=cond_proj)
    with torch.no_grad():
        theirs = reference(x, t, encoder_hidden_states=context, **kw).sample
        mine = ours(x, t, context=context, guidance=w if cond_proj else None)
    assert theirs.abs().max() > 1e-2
    assert (mine - theirs).abs().max() < 1e-4 * max(1.0, theirs.abs().max().item())


@pytest.mark.parametrize("name", ["UNet-T", "UNet-S"])
def test_export_layout_is_the_inverse_and_matches_diffusers(name):
    """export.py's direction: a class U-Net (crossattn) as a UNet2DConditionModel. The config and state
    dict from unet_config_to_diffusers / unet_state_dict_to_diffusers load strictly into diffusers' model,
    which then gives our output with the class row as its one context token, and converting back gives
    the same state dict key for key (UNet-S: 3 levels, 2 resnets a level, heads of fixed width)."""
    diffusers = pytest.importorskip("diffusers")
    from models.from_diffusers import unet_config_to_diffusers, unet_state_dict_from_diffusers, unet_state_dict_to_diffusers
    torch.manual_seed(0)
    ours = build_unet(name, learn_sigma=False).eval()
    with torch.no_grad():
        for p in ours.parameters():  # no zero-initialised layer left: every path counts
            p.add_(0.05 * torch.randn_like(p))
    config = unet_config_to_diffusers({"name": name, "learn_sigma": False, "class_cond": "crossattn"})
    state = {k: v for k, v in ours.state_dict().items() if not k.startswith("y_embedder.")}
    converted = unet_state_dict_to_diffusers(state, config["layers_per_block"])
    theirs = diffusers.UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    theirs.load_state_dict(converted, strict=True)
    back = unet_state_dict_from_diffusers(converted, config["layers_per_block"])
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 1, 32, 32, generator=g), torch.tensor([3, 500, 999]), torch.tensor([0, 4, 9])
    with torch.no_grad():
        mine = ours(x, t, y)
        reference = theirs(x, t, encoder_hidden_states=ours.y_embedder.embedding_table(y)[:, None]).sample
    assert reference.abs().max() > 1e-2 and (mine - reference).abs().max() < 1e-5
    with pytest.raises(ValueError, match="only a cross-attention U-Net"):
        unet_config_to_diffusers({"name": name, "class_cond": "add"})
