"""Text-conditional training, sampling and evaluation end to end (the paper's CC3M half, offline)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import make_fake_fmnist, make_tiny_clip, run_script  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("txt")
    make_fake_fmnist(root / "data", n=128)
    return root


def read_log(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow  # the default suite's time (README); run with -m slow
@pytest.mark.parametrize("model", ["UNet-T", "DiT-T/8"])
def test_text_model_two_ranks_match_one_and_sample(data, model):
    """Caption-conditioned training with swapped captions and CEP-G on the caption tokens: 2 gloo
    ranks train the same model as 1 (the token δ is drawn for the global batch), then sample.py
    uses held-out captions with guidance and evaluate.py scores them."""
    out = data / "out"
    tag = model.replace("/", "-")
    common = ["--dataset", "fashion-mnist-captions", "--data-path", data / "data", "--model", model, "--corrupt", "0.05",
              "--cep", "--cep-type", "gaussian", "--max-steps", "3", "--global-batch-size", "8", "--log-every", "1",
              "--out-dir", out, "--caption-length", "12", "--lr", "1e-3"]
    run_script("train.py", [*common, "--run", f"{tag}-1"])
    run_script("train.py", [*common, "--run", f"{tag}-2"], nproc=2)
    one, two = read_log(out / f"{tag}-1"), read_log(out / f"{tag}-2")
    assert all(abs(a["loss"] - b["loss"]) < 1e-4 * a["loss"] for a, b in zip(one, two))
    ck_one = torch.load(out / f"{tag}-1" / "ckpt" / "last.pt", weights_only=True)
    ck_two = torch.load(out / f"{tag}-2" / "ckpt" / "last.pt", weights_only=True)
    assert max((ck_one["model"][k] - ck_two["model"][k]).abs().max().item() for k in ck_one["model"]) < 1e-4
    assert any(k.startswith("text_encoder.") for k in ck_one["model"])  # trained jointly, saved with the model
    assert ck_one["model_config"]["text_encoder"]["kind"] == "scratch"
    manifest = json.loads((out / "data" / "fashion-mnist-captions" / "corrupt_swap_eta0.05_seed0.json").read_text())
    assert manifest["num_corrupted"] == 6
    run_script("sample.py", ["--run", out / f"{tag}-1", "--num-samples", "6", "--batch-size", "6", "--steps", "3",
                             "--cfg-scale", "2", "--tag", "s"])
    sdir = out / f"{tag}-1" / "samples" / "s"
    prompts = (sdir / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 6 and all(p.startswith(("a ", "an ")) for p in prompts)
    assert np.load(sdir / "samples.npz")["arr_1"].min() >= 0  # held-out captions carry their class
    make_tiny_clip(data / f"clip-{tag}")
    run_script("evaluate.py", ["--samples", sdir, "--data-path", data / "data", "--clip", data / f"clip-{tag}"])
    metrics = json.loads((sdir / "metrics.json").read_text())["metrics"]
    assert "accuracy" in metrics and 0 <= metrics["clip_score"] <= 100
    # CLIP score against an independent computation with transformers' own CLIPModel forward
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer
    clip = CLIPModel.from_pretrained(data / f"clip-{tag}").eval()
    images = [Image.fromarray(a[..., 0]).convert("RGB") for a in np.load(sdir / "samples.npz")["arr_0"]]
    inputs = CLIPTokenizer.from_pretrained(data / f"clip-{tag}")(prompts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    inputs["pixel_values"] = CLIPImageProcessor.from_pretrained(data / f"clip-{tag}")(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        o = clip(**inputs)
    cos = (o.image_embeds * o.text_embeds).sum(1) / (o.image_embeds.norm(dim=1) * o.text_embeds.norm(dim=1))
    assert metrics["clip_score"] == pytest.approx(float((100 * cos).clamp(min=0).mean()), rel=1e-4, abs=1e-4)


def test_prompts_file_and_bad_text_input(data, tmp_path):
    out = data / "out2"
    run_script("train.py", ["--dataset", "fashion-mnist-captions", "--data-path", data / "data", "--model", "DiT-T/8",
                            "--max-steps", "1", "--global-batch-size", "8", "--out-dir", out, "--run", "t",
                            "--caption-length", "12"])
    (tmp_path / "p.txt").write_text("a photo of a bag\n\na sneaker on a dark background\n")
    run_script("sample.py", ["--run", out / "t", "--num-samples", "3", "--steps", "2", "--prompts", tmp_path / "p.txt", "--tag", "p"])
    assert (out / "t" / "samples" / "p" / "prompts.txt").read_text().splitlines() == [
        "a photo of a bag", "a sneaker on a dark background", "a photo of a bag"]
    for args in (["--prompts", tmp_path / "none.txt"], ["--class", "1"]):
        proc = run_script("sample.py", ["--run", out / "t", "--num-samples", "2", *args], check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error:") and proc.stderr.strip().count("\n") == 0
    proc = run_script("train.py", ["--dataset", "fashion-mnist-captions", "--data-path", data / "data", "--out-dir", out,
                                   "--run", "bad", "--text-encoder", "clip:" + str(tmp_path / "nothing")], check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and not (out / "bad").exists()


def test_frozen_clip_text_embeddings_are_extracted_once(data, tmp_path):
    """With a frozen encoder (CLIP) train.py extracts the embeddings of every distinct caption once
    (float16 file under <out-dir>/data/) and trains from them; they equal the encoder's output."""
    from models.text import build_text_encoder
    make_tiny_clip(tmp_path / "clip")
    out = tmp_path / "out"
    run_script("train.py", ["--dataset", "fashion-mnist-captions", "--data-path", data / "data", "--model", "DiT-T/8",
                            "--max-steps", "2", "--global-batch-size", "8", "--out-dir", out, "--run", "c", "--cep",
                            "--text-encoder", f"clip:{tmp_path / 'clip'}", "--caption-length", "32", "--corrupt", "0.1"])
    [meta] = list((out / "data" / "fashion-mnist-captions").glob("text-clip-*.json"))
    strings = json.loads(meta.read_text())["strings"]
    emb = np.load(str(meta)[:-5] + ".npy")
    assert "" in strings and len(strings) == emb.shape[0] <= 51
    encoder = build_text_encoder(f"clip:{tmp_path / 'clip'}", max_length=32)
    tok = encoder.tokenize(strings)
    with torch.no_grad():
        ref = encoder(tok["input_ids"], tok["attention_mask"]).numpy()
    assert np.allclose(emb, ref, rtol=2e-3, atol=2e-3)  # float16 storage
    ck = torch.load(out / "c" / "ckpt" / "last.pt", weights_only=True)
    assert ck["model_config"]["text_encoder"]["kind"] == "clip"
