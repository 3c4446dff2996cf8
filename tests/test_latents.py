"""Latent pre-extraction (corrupt_data.py --vae), LatentDataset, and train/sample on latents."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.common import UsageError  # noqa: E402
from models.data import FashionMNIST, LatentDataset, latent_dir  # noqa: E402
from models.vae import AutoencoderKL, encode_images, load_vae  # noqa: E402
from tests.helpers import make_fake_fmnist, run_script, tree_snapshot  # noqa: E402

TINY_KL = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "block_out_channels": [16, 32],
           "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8, "sample_size": 32}


def save_vae(folder, config=TINY_KL, seed=0):
    """A diffusers-format folder (config.json + safetensors) of a randomly initialised autoencoder."""
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    vae = AutoencoderKL(dict(config))
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.02 * torch.randn_like(p))  # nothing exactly zero
    os.makedirs(folder, exist_ok=True)
    Path(folder, "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, os.path.join(folder, "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    root = tmp_path_factory.mktemp("lat")
    make_fake_fmnist(root / "data", n=120)
    save_vae(root / "vae")
    run_script("corrupt_data.py", ["--data-path", root / "data", "--corrupt", "0.1", "--vae", root / "vae",
                                   "--out-dir", root / "out", "--shard-size", "50", "--vae-batch-size", "16"])
    return root, Path(latent_dir(str(root / "out"), "fashion-mnist", str(root / "vae"), 32))


def test_latents_equal_direct_encoding_of_image_and_flip(extracted):
    root, ldir = extracted
    index = json.loads((ldir / "index.json").read_text())
    assert index["shards"] == ["shard_00000.npy", "shard_00001.npy", "shard_00002.npy"] and index["stats"] == 2
    base = FashionMNIST(str(root / "data"))
    ds = LatentDataset(str(ldir), base)
    vae = load_vae(root / "vae")
    idx = torch.tensor([0, 49, 50, 119, 77])
    x = base.get_batch(idx).expand(-1, 3, -1, -1)
    for flip in (0, 1):
        mean, logvar = encode_images(vae, x.flip(-1) if flip else x)
        got = ds.get_batch(idx, torch.full((5,), flip))
        # stored as float16: relative error <= 2^-11 of each value
        assert torch.allclose(got[:, 0], mean, rtol=2e-3, atol=1e-3) and torch.allclose(got[:, 1], logvar, rtol=2e-3, atol=1e-3)
    assert not torch.allclose(ds.get_batch(idx, torch.zeros(5)), ds.get_batch(idx, torch.ones(5)))
    assert np.array_equal(ds.labels, base.labels)


def test_extraction_resumes_and_checks_shapes(extracted, tmp_path):
    root, ldir = extracted
    before = (ldir / "shard_00001.npy").read_bytes()
    os.remove(ldir / "shard_00001.npy")
    run_script("corrupt_data.py", ["--data-path", root / "data", "--corrupt", "0.1", "--vae", root / "vae",
                                   "--out-dir", root / "out", "--shard-size", "50"])
    assert (ldir / "shard_00001.npy").read_bytes() == before
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(ldir):
        (bad / name).write_bytes((ldir / name).read_bytes())
    np.save(bad / "shard_00001.npy", np.zeros((50, 2, 2, 4, 8, 8), dtype=np.float16))
    with pytest.raises(UsageError, match="shard_00001.npy has shape"):
        LatentDataset(str(bad), FashionMNIST(str(root / "data")))


def test_bad_vae_path_fails_before_writing(extracted, tmp_path):
    root, _ = extracted
    before = tree_snapshot(root / "out")
    proc = run_script("corrupt_data.py", ["--data-path", root / "data", "--corrupt", "0.2", "--vae", tmp_path / "nope",
                                          "--out-dir", root / "out"], check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --vae") and proc.stderr.strip().count("\n") == 0
    assert tree_snapshot(root / "out") == before
    proc = run_script("train.py", ["--data-path", root / "data", "--vae", tmp_path / "nope", "--out-dir", root / "out",
                                   "--run", "x"], check=False)
    assert proc.returncode == 2 and "no latents" in proc.stderr
    assert tree_snapshot(root / "out") == before


def test_train_and_sample_on_latents(extracted):
    root, _ = extracted
    out = root / "out"
    run_script("train.py", ["--data-path", root / "data", "--vae", root / "vae", "--out-dir", out, "--run", "lat",
                            "--model", "DiT-T/2", "--global-batch-size", "16", "--max-steps", "3", "--log-every", "1", "--cep"])
    ck = torch.load(out / "lat" / "ckpt" / "last.pt", weights_only=True)
    assert ck["model_config"]["in_channels"] == 4 and ck["model_config"]["input_size"] == 16  # two VAE blocks: f = 2
    run_script("sample.py", ["--run", out / "lat", "--num-samples", "4", "--batch-size", "4", "--steps", "3", "--tag", "s"])
    data = np.load(out / "lat" / "samples" / "s" / "samples.npz")
    assert data["arr_0"].shape == (4, 32, 32, 3)  # decoded by the run's autoencoder


def test_finetune_controlnet_on_latents(extracted):
    """finetune.py on a latent model: Canny controls at image resolution (32) reach the 16x16x4
    latent DiT's 8x8 token grid through the hint encoder; sample.py decodes with the run's VAE."""
    root, _ = extracted
    out = root / "out"
    run_script("train.py", ["--data-path", root / "data", "--vae", root / "vae", "--out-dir", out, "--run", "lat-base",
                            "--model", "DiT-T/2", "--global-batch-size", "16", "--max-steps", "2", "--log-every", "1"])
    run_script("finetune.py", ["--init", out / "lat-base", "--split", "train", "--method", "controlnet", "--control", "canny",
                               "--out-dir", out, "--run", "lat-cn", "--global-batch-size", "8", "--max-steps", "2",
                               "--log-every", "1", "--val-size", "8"])
    ck = torch.load(out / "lat-cn" / "ckpt" / "last.pt", weights_only=True)
    assert ck["model_config"]["adapter"]["control_size"] == 32 and ck["model_config"]["in_channels"] == 4
    assert ck["config"]["vae"] == str(root / "vae")  # inherited from the pre-training run
    run_script("sample.py", ["--run", out / "lat-cn", "--control", out / "lat-cn" / "controls", "--num-samples", "4",
                             "--batch-size", "4", "--steps", "2", "--tag", "s"])
    assert np.load(out / "lat-cn" / "samples" / "s" / "samples.npz")["arr_0"].shape == (4, 32, 32, 3)
