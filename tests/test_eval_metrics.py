"""evaluate.py's sFID (Inception mixed_6/conv through a stand-in TorchScript network), ADM reference
statistics, and the VQ codebook entropy, each against a computation written here from the
definitions (float64 eigh Fréchet distance, explicit codebook argmin, scipy's entropy)."""
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from tests.helpers import REPO, StandIn, make_tiny_clip, run_script, tf_resize_299

sys.path.insert(0, str(REPO))


def psd_sqrt(s):
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_reference(a, b):
    """FID of two float64 feature sets: ‖Δμ‖² + Tr Σa + Tr Σb − 2 Tr (Σa^½ Σb Σa^½)^½ (eigh only)."""
    mu_a, mu_b, sa, sb = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    r = psd_sqrt(sa)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r @ sb @ r), 0, None)).sum()
    return ((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * cross


def reference_spatial(net, images):
    """mixed_6/conv of uint8 NHWC images, first 7 channels, flattened in H, W, C order (ADM)."""
    with torch.no_grad():
        x = tf_resize_299(torch.from_numpy(images).permute(0, 3, 1, 2).float(), 128.0)
        fmap = net.layers.mixed_6.conv(net.layers.conv(x)).numpy().astype(np.float64)
    return np.ascontiguousarray(fmap[:, :7].transpose(0, 2, 3, 1)).reshape(len(images), -1)


@pytest.fixture
def inception(tmp_path):
    torch.manual_seed(0)
    net = StandIn()
    torch.jit.script(net).save(str(tmp_path / "inception.pt"))
    torch.jit.script(StandIn(offset=127.5)).save(str(tmp_path / "other.pt"))  # preprocessing we do not reproduce
    rng = np.random.default_rng(0)
    gen = rng.integers(0, 256, (150, 16, 16, 3), dtype=np.uint8)
    ref = np.clip(rng.normal(150, 40, (160, 16, 16, 3)), 0, 255).astype(np.uint8)
    np.savez(tmp_path / "gen.npz", arr_0=gen)
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    return net.eval(), gen, ref


@pytest.mark.slow  # CI time (issue 31): its stage runs end to end in faster tests
def test_sfid_takes_mixed_6_conv_first_7_channels_hwc(inception, tmp_path):
    net, gen, ref = inception
    from models.features import InceptionNet
    got = InceptionNet(str(tmp_path / "inception.pt"), torch.device("cpu"))(torch.from_numpy(gen[:20]))
    assert got["spatial"].shape == (20, 4 * 4 * 7)
    np.testing.assert_allclose(got["spatial"].numpy(), reference_spatial(net, gen[:20]), rtol=1e-5, atol=1e-6)
    args = ["--samples", tmp_path / "gen.npz", "--ref", tmp_path / "ref.npz", "--features", "inception", "--out-dir", tmp_path / "out"]
    run_script("evaluate.py", [*args, "--inception", tmp_path / "inception.pt"])
    m = json.loads((tmp_path / "metrics.json").read_text())
    want = frechet_reference(reference_spatial(net, gen), reference_spatial(net, ref))
    assert m["metrics"]["sfid"] == pytest.approx(want, rel=1e-4) and want > 0
    # a network whose blocks, run one by one after our resize, do not give its own pool3: no sFID
    run_script("evaluate.py", [*args, "--inception", tmp_path / "other.pt"])
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert "sfid" not in m["metrics"] and "fid" in m["metrics"] and any("sFID skipped" in n for n in m["notes"])


@pytest.mark.slow  # ~35 s
def test_adm_reference_statistics(inception, tmp_path):
    """An ADM reference batch with precomputed mu/sigma (pool3) and mu_s/sigma_s (spatial): FID and
    sFID use them (with images present too, as ADM's evaluator); with statistics only, the
    image-based metrics are skipped with a note."""
    net, gen, ref = inception
    def pool(a):
        with torch.no_grad():
            return net(torch.from_numpy(a).permute(0, 3, 1, 2).float(), return_features=True).double().numpy()
    other = np.ascontiguousarray(ref[::-1][:100] // 2)  # statistics of other images than arr_0: proves which ones are used
    stats = {"mu": pool(other).mean(0), "sigma": np.cov(pool(other), rowvar=False),
             "mu_s": reference_spatial(net, other).mean(0), "sigma_s": np.cov(reference_spatial(net, other), rowvar=False)}
    np.savez(tmp_path / "stats_only.npz", **stats)
    np.savez(tmp_path / "both.npz", arr_0=ref, **stats)
    want_fid = frechet_reference(pool(gen), pool(other))
    want_sfid = frechet_reference(reference_spatial(net, gen), reference_spatial(net, other))
    for ref_file, has_images in (("stats_only.npz", False), ("both.npz", True)):
        run_script("evaluate.py", ["--samples", tmp_path / "gen.npz", "--ref", tmp_path / ref_file, "--features", "inception",
                                   "--inception", tmp_path / "inception.pt", "--out-dir", tmp_path / "out"])
        m = json.loads((tmp_path / "metrics.json").read_text())
        assert m["metrics"]["fid"] == pytest.approx(want_fid, rel=1e-4)
        assert m["metrics"]["sfid"] == pytest.approx(want_sfid, rel=1e-4)
        assert ("precision" in m["metrics"]) == has_images and ("toppr_f1" in m["metrics"]) == has_images
        assert any("statistics only" in n for n in m["notes"]) != has_images
    make_tiny_clip(tmp_path / "clip")
    proc = run_script("evaluate.py", ["--samples", tmp_path / "gen.npz", "--ref", tmp_path / "stats_only.npz", "--features", "clip",
                                      "--clip", tmp_path / "clip", "--out-dir", tmp_path / "out"], check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and proc.stderr.strip().count("\n") == 0


def tiny_vq(folder, seed=0):
    from safetensors.torch import save_file

    from models.vae import VQModel
    config = dict(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                  layers_per_block=1, norm_num_groups=4, latent_channels=3, num_vq_embeddings=32, vq_embed_dim=3, sample_size=16)
    torch.manual_seed(seed)
    vae = VQModel(config)
    with torch.no_grad():
        vae.quantize.embedding.weight.normal_(0, 0.3)  # codes spread over the latents' range
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "VQModel", **config}))
    save_file(vae.state_dict(), str(folder / "diffusion_pytorch_model.safetensors"))
    return vae.eval()


def test_vq_codebook_entropy_counts_the_sampled_codes(tmp_path, monkeypatch):
    """sample.py records the codes of the latents it quantises (codes.npy); evaluate.py's entropy is
    that of those codes, here recomputed from the same latents by an explicit float64 argmin. The
    old path, re-encoding the decoded PNGs, gives other codes: it is the fallback for folders
    without codes.npy, with a note."""
    import sample
    from models.build import build_model
    vae = tiny_vq(tmp_path / "vq")
    torch.manual_seed(1)  # a random class-conditional DiT on the VQ's 3 x 8 x 8 latents
    config = dict(name="DiT-T/4", input_size=8, in_channels=3, num_classes=4, class_dropout=0.1, learn_sigma=True)
    model = build_model(**config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    run = tmp_path / "run"  # samples go to <run>/samples/<tag>
    (run / "ckpt").mkdir(parents=True)
    torch.save({"model_config": config, "ema": model.state_dict(), "config": {"vae": str(tmp_path / "vq"), "dataset": "imagefolder"},
                "step": 0}, run / "ckpt" / "model.pt")
    latents = []  # what sample.py hands the decoder
    def spy(vae_, z, **kw):
        latents.append(z.clone())
        return decode_latents(vae_, z, **kw)
    from models.vae import decode_latents
    monkeypatch.setattr(sample, "decode_latents", spy)
    flags = ["--ckpt", run / "ckpt" / "model.pt", "--num-samples", "30", "--batch-size", "16", "--sampler", "ddim", "--steps", "4",
             "--cfg-scale", "1", "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", ["sample.py", *map(str, flags), "--tag", "s"])
    sample.main()
    sdir = run / "samples" / "s"
    run_script("sample.py", [*flags, "--tag", "two"], nproc=2)  # batch 1 on rank 1: its codes file, merged by rank 0
    assert (run / "samples" / "two" / "codes.npy").read_bytes() == (sdir / "codes.npy").read_bytes()
    assert sorted(p.name for p in (sdir / "codes").iterdir()) == ["000000.npy", "000016.npy"]
    shutil.rmtree(run / "samples" / "two")  # one sample folder for --compare
    # direct: nearest codebook entry of every sampled latent position by explicit float64 distances
    h = torch.cat(latents).permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
    codebook = vae.quantize.embedding.weight.detach().double().numpy()
    codes = ((h[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(1)
    recorded = np.load(sdir / "codes.npy")
    assert recorded.shape == (30, 8, 8) and recorded.dtype == np.uint8 and (recorded.reshape(-1) == codes).all()
    counts = np.bincount(codes, minlength=32)
    assert (counts > 0).sum() > 2  # a non-trivial histogram
    # the old path: the decoded PNGs re-encoded and quantised (float64 argmin as above)
    images = np.load(sdir / "samples.npz")["arr_0"]
    with torch.no_grad():
        h = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1).permute(0, 2, 3, 1).reshape(-1, 3).double().numpy()
    reencoded = np.bincount(((h[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(1), minlength=32)
    assert abs(entropy(reencoded, base=2) - entropy(counts, base=2)) > 0.05  # encode∘decode is not the identity
    np.savez(sdir / "samples.npz", arr_0=images)  # unlabelled: no training-set metrics needed
    make_tiny_clip(tmp_path / "clip")
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8))
    args = ["--samples", sdir, "--ref", tmp_path / "ref.npz", "--features", "clip", "--clip", tmp_path / "clip", "--out-dir", tmp_path / "out"]
    for want, fallback in ((counts, False), (reencoded, True)):
        if fallback:  # a folder of an older sample.py
            (sdir / "codes.npy").unlink()
        run_script("evaluate.py", args)
        out = json.loads((sdir / "metrics.json").read_text())
        m = out["metrics"]
        assert m["vq_entropy"] == pytest.approx(entropy(want, base=2), rel=1e-9)
        assert m["vq_perplexity"] == pytest.approx(2 ** entropy(want, base=2), rel=1e-9)
        assert m["vq_code_usage"] == pytest.approx((want > 0).mean())
        assert any("re-encoded (no codes.npy" in n for n in out["notes"]) == fallback
    run_script("evaluate.py", ["--compare", tmp_path])  # the new metrics reach the comparison table
    header = (tmp_path / "comparison.md").read_text().splitlines()[0]
    for name in ("vq_entropy", "fid_clip", "kid_clip"):  # 40 images: too few for TopP&R (k = 5 x 16 dims)
        assert f" {name} " in header, name
