"""FD-DINOv2 (evaluate.py --features dinov2) offline, on a timm ViT of the DINOv2 family with random
weights: the preprocessing against timm's own transform, the feature path and its cache, and the
Fréchet distance against a float64 scipy.linalg.sqrtm computation written here."""
import json
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from tests.helpers import REPO, TINY_DINOV2, run_scripts_at_once, tiny_dinov2

sys.path.insert(0, str(REPO))
timm = pytest.importorskip("timm")

ARCH, MODEL_ARGS = TINY_DINOV2


def timm_features(model, images, size=224):
    """CLS token after the final norm of uint8 NHWC images through timm's own eval transform at `size`."""
    cfg = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**{**cfg, "input_size": (3, size, size)})
    x = torch.stack([transform(Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB")) for a in images])
    with torch.no_grad():
        return model.forward_features(x)[:, 0].double().numpy()


def frechet_sqrtm(a, b):
    """‖Δμ‖² + Tr(Σa + Σb − 2 (Σa Σb)^½), float64, scipy.linalg.sqrtm (real part)."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * scipy.linalg.sqrtm(sa @ sb).real))


def images(seed, n, size, channels):
    rng = np.random.default_rng(seed)
    smooth = rng.normal(128, 60, (n, size // 4, size // 4, channels)).repeat(4, 1).repeat(4, 2)  # structure at several scales
    return np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.uint8)


def test_preprocessing_equals_timm_transform():
    """timm's pretrained config evaluates DINOv2 at 518 (Resize of the shorter side, bicubic, +
    CenterCrop, crop_pct 1.0, ImageNet mean / std); dgm-eval resizes to 224 (the size evaluate.py
    uses). At either size timm's transform on square images is our `dinov2_input`; on non-square
    ones we squeeze as dgm-eval's torchvision Resize((224, 224)) does, where timm crops."""
    import torchvision.transforms as T

    from models.features import IMAGENET_MEAN, IMAGENET_STD, dinov2_input
    model = timm.create_model(ARCH, pretrained=False, img_size=224, **MODEL_ARGS)
    cfg = timm.data.resolve_data_config({}, model=model)
    real = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg("vit_large_patch14_dinov2.lvd142m").to_dict())
    for c in (cfg, real):  # the tiny model's and the real ViT-L's: the same recipe
        assert (c["interpolation"], c["crop_pct"], c["mean"], c["std"]) == ("bicubic", 1.0, IMAGENET_MEAN, IMAGENET_STD)
    for batch in (images(0, 3, 32, 3), images(1, 3, 28, 1)):  # RGB, and grey replicated to 3 channels
        for size in (224, cfg["input_size"][-1]):
            transform = timm.data.create_transform(**{**cfg, "input_size": (3, size, size)})
            want = torch.stack([transform(Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).convert("RGB")) for a in batch])
            got = dinov2_input(torch.from_numpy(batch), size)
            assert got.shape == (len(batch), 3, size, size) and got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    wide = images(2, 2, 32, 3)[:, :24]  # 24 x 32
    dgm_eval = T.Compose([T.Resize((224, 224), T.InterpolationMode.BICUBIC), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(dinov2_input(torch.from_numpy(wide)), torch.stack([dgm_eval(Image.fromarray(a)) for a in wide]),
                               rtol=0, atol=1e-6)


def test_feature_path_cache_and_frechet(tmp_path):
    from models.common import UsageError
    from models.features import DinoNet, cached
    from models.metrics import frechet_distance
    model = tiny_dinov2(tmp_path / "dino")
    net = DinoNet(str(tmp_path / "dino"), torch.device("cpu"))
    gen, ref = images(3, 40, 32, 3), images(4, 40, 32, 1) // 2 + 60
    feats = net(torch.from_numpy(gen[:5]))["feat"]
    assert feats.shape == (5, 32) and feats.dtype == torch.float32
    np.testing.assert_allclose(feats.double().numpy(), timm_features(model, gen[:5]), rtol=1e-5, atol=1e-5)
    out = [cached(net, src, str(tmp_path / "cache"), name, batch_size=16, log=lambda *_: None) for name, src in
           (("gen", gen), ("ref", ref), ("gen", gen))]
    assert [o[2]["cache"] for o in out] == ["miss", "miss", "hit"]
    assert out[2][0]["feat"].shape == (40, 32) and np.array_equal(out[2][0]["feat"], out[0][0]["feat"])
    (gs, rs) = (out[2][1]["feat"], out[1][1]["feat"])
    want = frechet_sqrtm(timm_features(model, gen), timm_features(model, ref))
    assert frechet_distance(*gs.mean_cov(), *rs.mean_cov()) == pytest.approx(want, rel=1e-4) and want > 1
    assert gs.mean_cov()[1].dtype == np.float64
    (tmp_path / "empty").mkdir()  # not timm's hub layout
    with pytest.raises(UsageError, match="expected a folder with config.json and model.safetensors"):
        DinoNet(str(tmp_path / "empty"), torch.device("cpu"))


@pytest.mark.slow  # CI time, ~7 s: the DINOv2 features are checked against timm's in CI
def test_evaluate_features_dinov2_end_to_end(tmp_path, monkeypatch):
    """evaluate.py --features dinov2 --dinov2 FOLDER; beside it, run at the same time, weights that
    cannot be had offline and --dinov2 with another feature network: one error line each, nothing written."""
    model = tiny_dinov2(tmp_path / "dino")
    gen, ref = images(5, 36, 20, 1), images(6, 36, 24, 3)  # grey samples against RGB references
    (tmp_path / "refused").mkdir()
    for path in (tmp_path / "gen.npz", tmp_path / "refused" / "gen.npz"):
        np.savez(path, arr_0=gen)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    # scored in Inception space before: those scores stay beside the DINOv2 ones
    (tmp_path / "metrics.json").write_text(json.dumps({"features": "inception", "metrics": {"fid": 5.0, "is": 9.0}}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    args = ["--ref", tmp_path / "ref.npz", "--features", "dinov2", "--out-dir", tmp_path / "out"]
    ok, *refused = run_scripts_at_once(
        [("evaluate.py", ["--samples", tmp_path / "gen.npz", *args, "--dinov2", tmp_path / "dino"])]
        + [("evaluate.py", ["--samples", tmp_path / "refused" / "gen.npz", *args, "--dinov2", spec, *extra])
           for spec, extra in (("vit_small_patch14_dinov2.lvd142m", []), (tmp_path / "dino", ["--features", "inception"]))])
    assert ok.returncode == 0, ok.stderr[-2000:]
    out = json.loads((tmp_path / "metrics.json").read_text())
    m = out["metrics"]
    assert out["features"] == "dinov2" and out["dinov2"] == str(tmp_path / "dino") and out["num_samples"] == 36
    assert m["fd_dinov2"] == pytest.approx(frechet_sqrtm(timm_features(model, gen), timm_features(model, ref)), rel=1e-4)
    assert {"kid_dinov2", "precision_dinov2", "recall_dinov2", "density_dinov2", "coverage_dinov2"} <= set(m)
    assert not {"fid_dinov2", "is_dinov2", "sfid_dinov2"} & set(m)  # no logits, no spatial features
    assert m["fid"] == 5.0 and m["is"] == 9.0 and out["other_features"] == ["inception"]
    for proc, why in zip(refused, ("error: cannot load DINOv2 weights vit_small_patch14_dinov2.lvd142m", "error: --dinov2 names")):
        assert proc.returncode == 2 and proc.stderr.startswith(why) and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not (tmp_path / "refused" / "metrics.json").exists()
