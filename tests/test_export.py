"""export.py against diffusers itself: a tiny latent run exported as a DiTPipeline folder is loaded
with DiTPipeline.from_pretrained, as a user loads it, and sampled by diffusers' own pipeline call from
sample.py's initial latents; a class U-Net's LDMClassToImagePipeline folder is sampled by diffusers'
UNet2DConditionModel, AutoencoderKL and scheduler in the loop the authors' pipeline runs, and a CLIP
text U-Net by LDMTextToImagePipeline itself; the official .pt comes back through the repo's
official-DiT loader; the identity first stage of a pixel run decodes as the identity in diffusers'
AutoencoderKL."""
import hashlib
import json
import re
import shutil
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from models.common import ImageNoise
from models.dit import dit_from_checkpoint
from tests.helpers import REPO, make_fake_fmnist, make_tiny_clip, run_script, run_scripts_at_once
from tests.test_latents import save_vae

diffusers = pytest.importorskip("diffusers")
N, STEPS = 4, 5
README = REPO / "README.md"


@pytest.fixture(scope="module")
def lat(tmp_path_factory):
    """A 3-step latent DiT-T/2 run (tiny random VAE, f = 2) with diffusers' timestep frequencies, η 10 %, CEP-G."""
    root = tmp_path_factory.mktemp("export")
    make_fake_fmnist(root / "data", n=120)
    save_vae(root / "vae")
    run_script("corrupt_data.py", ["--data-path", root / "data", "--corrupt", "0.1", "--vae", root / "vae", "--out-dir", root / "out",
                                   "--vae-batch-size", "40"])
    run_script("train.py", ["--data-path", root / "data", "--vae", root / "vae", "--out-dir", root / "out", "--run", "lat",
                            "--model", "DiT-T/2", "--global-batch-size", "16", "--max-steps", "3", "--warmup-steps", "0", "--lr", "0.03", "--log-every", "1",
                            "--corrupt", "0.1", "--cep", "--cep-type", "gaussian", "--timestep-freqs", "diffusers"])
    return root, root / "out" / "lat"


def sampled(folder, tag):
    return {s: np.load(folder / "samples" / f"{tag}_cfg{s}" / "samples.npz")["arr_0"] for s in (1, 4)}


def diffusers_images(folder, scale):
    """DiTPipeline.from_pretrained(folder)(...) from the latents sample.py draws first for images 0..N-1 (classes 0..N-1)."""
    pipe = diffusers.DiTPipeline.from_pretrained(folder)
    latents = ImageNoise(0, range(N), (4, 16, 16))()
    with mock.patch("diffusers.pipelines.dit.pipeline_dit.randn_tensor", return_value=latents.clone()):
        images = pipe(class_labels=list(range(N)), guidance_scale=float(scale), num_inference_steps=STEPS, output_type="np").images
    return np.round(images * 255).astype(np.int16), pipe


def assert_close_images(ours, ref, what):
    diff = np.abs(ours.astype(np.int16) - ref)
    assert ours.shape == ref.shape and ref.std() > 20, what
    assert (diff <= 2).mean() >= 0.999 and diff.max() <= 3, (what, diff.max(), (diff > 2).mean())


def test_dit_pipeline_round_trip(lat, tmp_path):
    """DPM-Solver++ (the exported scheduler): diffusers' DiTPipeline images equal sample.py --run's within 2
    levels at guidance 1 and 4, and sample.py --pretrained on the export gives the run's images exactly.
    DDIM (--scheduler ddim): diffusers' DDIMScheduler steps t -> t - T/steps, not the run's ADM spacing,
    so DiTPipeline is checked against sample.py --pretrained on that export, which steps the same grid."""
    root, run = lat
    flags = ["--num-samples", N, "--batch-size", N, "--steps", STEPS, "--cfg-scale", "1,4"]
    for calls in ([("sample.py", ["--run", run, "--tag", "direct", *flags]), ("export.py", [run, "--out", tmp_path / "pipe"]),
                   ("export.py", [run, "--out", tmp_path / "ddim", "--scheduler", "ddim", "--bin"])],
                  [("sample.py", ["--pretrained", tmp_path / "pipe", "--out-dir", tmp_path, "--tag", "back", *flags]),
                   ("sample.py", ["--pretrained", tmp_path / "ddim", "--out-dir", tmp_path, "--tag", "back", "--sampler", "ddim", *flags])]):
        procs = run_scripts_at_once(calls)
        assert all(p.returncode == 0 for p in procs), [p.stderr[-1000:] for p in procs]
    assert (tmp_path / "ddim" / "transformer" / "diffusion_pytorch_model.bin").is_file()
    direct, back, ddim = sampled(run, "direct"), sampled(tmp_path / "pipe", "back"), sampled(tmp_path / "ddim", "back")
    for scale in (1, 4):
        assert np.array_equal(back[scale], direct[scale]), scale  # fp32: bit-identical
        ref, pipe = diffusers_images(tmp_path / "pipe", scale)
        assert_close_images(direct[scale], ref, ("dpm-solver++", scale))
        assert_close_images(ddim[scale], diffusers_images(tmp_path / "ddim", scale)[0], ("ddim", scale))
    assert np.abs(direct[1].astype(int) - direct[4]).mean() > 0.5  # guidance changes the images
    assert pipe.labels["Trouser"] == 1 and len(pipe.labels) == 10 and isinstance(pipe.scheduler, diffusers.DPMSolverMultistepScheduler)
    # the README's diffusers snippet, word for word, where its folder is this export
    snippet = README.read_text().split("```python\n")[1].split("```")[0]
    assert 'DiTPipeline.from_pretrained("exported/quick")' in snippet
    shutil.copytree(tmp_path / "pipe", tmp_path / "user" / "exported" / "quick")
    subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path / "user", check=True, capture_output=True, timeout=300)
    expected = pipe(class_labels=[7, 8], guidance_scale=3.0, num_inference_steps=20, generator=torch.manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "user" / "sneaker.png")), np.asarray(expected))
    # the model card: the run's setting (read back as the release's label), its manifest and metrics
    card = (tmp_path / "pipe" / "README.md").read_text()
    manifest = root / "out" / "data" / "fashion-mnist" / "corrupt_symmetric_eta0.1_seed0.json"
    assert hashlib.sha256(manifest.read_bytes()).hexdigest() in card and "| CEP | CEP-G γ 1 |" in card
    command = next(ln for ln in card.splitlines() if ln.startswith("python train.py "))
    for flag in (f"--data-path {root / 'data'}", f"--vae {root / 'vae'}", "--model DiT-T/2", "--corrupt 0.1", "--cep", "--cep-type gaussian",
                 "--timestep-freqs diffusers", "--lr 0.03", "--max-steps 3", "--global-batch-size 16"):
        assert f" {flag} " in command + " ", (flag, command)
    config = json.loads((tmp_path / "pipe" / "samples" / "back_cfg4" / "sample_config.json").read_text())["run_config"]
    assert (config["corrupt"], config["cep_type"], config["release_setting"]) == (0.1, "gaussian", "from the model card")


def test_official_checkpoint_and_precision(lat, tmp_path):
    """--format official: the EMA (or raw) state dict under the official names, which the repo's
    official-DiT loader reads back unchanged; --dtype bf16 stores bf16 values of those weights."""
    _, run = lat
    ckpt = torch.load(run / "ckpt" / "last.pt", weights_only=True)
    procs = run_scripts_at_once([("export.py", [run, "--format", "official", "--out", tmp_path / "ema.pt"]),
                                 ("export.py", [run, "--format", "official", "--out", tmp_path / "raw.pt", "--weights", "model",
                                                "--dtype", "bf16"]),
                                 ("export.py", [run, "--out", tmp_path / "bf16", "--dtype", "bf16"])])
    assert all(p.returncode == 0 for p in procs), [p.stderr[-500:] for p in procs]
    for name, key, dtype in (("ema.pt", "ema", torch.float32), ("raw.pt", "model", torch.bfloat16)):
        saved = torch.load(tmp_path / name, weights_only=True)
        model = dit_from_checkpoint(saved)
        assert saved.keys() == ckpt[key].keys()
        for k, v in model.state_dict().items():
            assert torch.equal(v, ckpt[key][k].to(dtype).float()), (name, k)
    from safetensors.torch import load_file
    weights = load_file(tmp_path / "bf16" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    pipe = diffusers.DiTPipeline.from_pretrained(tmp_path / "bf16", torch_dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and torch.equal(pipe.transformer.proj_out_2.weight,
                                                                     ckpt["ema"]["final_layer.linear.weight"].to(torch.bfloat16))


def test_pixel_run_identity_first_stage_and_refusals(tmp_path, fake_fmnist):
    """A pixel-space run (official timestep frequencies, the default): the export's vae, loaded by
    diffusers' AutoencoderKL, decodes as the identity; the printed note gives ε's change under
    diffusers' frequencies (measured again here). Bad input: one line, exit 2, nothing written."""
    out = tmp_path / "out"
    run_script("train.py", ["--data-path", fake_fmnist, "--out-dir", out, "--run", "px", "--model", "DiT-T/8", "--global-batch-size", "8",
                            "--max-steps", "2", "--log-every", "1", "--warmup-steps", "0"])
    proc = run_script("export.py", [out / "px", "--out", tmp_path / "px"])
    vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "px" / "vae").eval()
    x = torch.rand(2, 1, 32, 32) * 3 - 1.5
    with torch.no_grad():
        assert (vae.decode(x).sample - x).abs().max() < 1e-5 and (vae.encode(x).latent_dist.mean - x).abs().max() < 1e-5
    from export import timestep_error
    ckpt = torch.load(out / "px" / "ckpt" / "last.pt", weights_only=True)
    err = timestep_error(ckpt["model_config"], ckpt["ema"])
    assert 0 < err and f"changes this model's ε by {err:.2%}" in proc.stdout
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep").write_text("x")
    for name, config in (("add", {"class_cond": "add"}), ("bert", {"text_encoder": {"kind": "bert", "max_length": 77}}),
                         ("lcm", {"guidance_dim": 256})):  # U-Net checkpoints as far as export.py reads them
        (out / name / "ckpt").mkdir(parents=True)
        torch.save({"model_config": {"name": "UNet-T", "class_dropout": 0.1, **config}, "ema": {}}, out / name / "ckpt" / "last.pt")
    cases = [([out / "px", "--out", tmp_path / "taken"], "exists: export.py never overwrites"),
             ([out / "none", "--out", tmp_path / "a"], "is not a folder"),
             ([out / "px", "--out", tmp_path / "b", "--ckpt", out / "px" / "ckpt" / "none.pt"], "does not exist"),
             ([out / "add", "--out", tmp_path / "c"], "holds a U-Net with --class-cond add"),
             ([out / "bert", "--out", tmp_path / "c"], "conditioned by a bert text encoder over 77 tokens"),
             ([out / "lcm", "--out", tmp_path / "c"], "holds a UNet-T LCM model"),
             ([out / "add", "--out", tmp_path / "c.pt", "--format", "official"], "--format official is facebookresearch/DiT's"),
             ([out / "px", "--out", tmp_path / "d.pt", "--format", "official", "--bin"], "--bin is for --format diffusers")]
    for (args, message), proc in zip(cases, run_scripts_at_once([("export.py", a) for a, _ in cases])):
        assert proc.returncode == 2 and re.fullmatch(r"error: [^\n]*\n", proc.stderr) and message in proc.stderr, (args, proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "px", "taken"] and (tmp_path / "taken" / "keep").read_text() == "x"
    with pytest.raises(Exception, match="--timestep-freqs diffusers is a DiT option"):
        run_script("train.py", ["--data-path", fake_fmnist, "--out-dir", out, "--model", "UNet-T", "--timestep-freqs", "diffusers"])


@torch.no_grad()
def authors_class_loop(folder, scale, latents):
    """The authors' LDMClassToImagePipeline as models/pretrained.py assumes it, run on the export's parts as
    diffusers loads them: the class row as the one context token, the last row the null class, DPM-Solver++."""
    from safetensors.torch import load_file
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
    vqvae = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vqvae").eval()
    scheduler = diffusers.DPMSolverMultistepScheduler.from_pretrained(folder, subfolder="scheduler")
    table = load_file(folder / "class_embedder" / "diffusion_pytorch_model.safetensors")["embedding.weight"]
    scheduler.set_timesteps(STEPS)
    cond, null = table[torch.arange(N)][:, None], table[-1:].expand(N, -1)[:, None]
    x = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp, ctx = (x, cond) if scale == 1 else (torch.cat([x, x]), torch.cat([null, cond]))
        eps = unet(scheduler.scale_model_input(inp, t), t, encoder_hidden_states=ctx).sample
        if scale != 1:
            uncond, conditional = eps.chunk(2)
            eps = uncond + scale * (conditional - uncond)
        x = scheduler.step(eps, t, x).prev_sample
    image = vqvae.decode(x / vqvae.config.scaling_factor).sample
    return np.round((image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.int16)


def test_ldm_pipelines_round_trip(lat, tmp_path):
    """Latent UNet-T runs on the tiny VAE: a class U-Net (learned σ, dropped in the export; CEP-U) and a
    CLIP text U-Net (swapped captions). diffusers' parts in the authors' class loop above, and
    LDMTextToImagePipeline.from_pretrained, give sample.py --run's images within 2 levels at guidance 1
    and 4; sample.py --pretrained on each export gives them exactly."""
    root, clip, out = lat[0], tmp_path / "clip", lat[0] / "out"
    make_tiny_clip(clip, max_positions=77)
    prompts = ["a photo of a bag", "a shirt"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    run_script("corrupt_data.py", ["--dataset", "fashion-mnist-captions", "--data-path", root / "data", "--corrupt", "0.1",
                                   "--vae", root / "vae", "--out-dir", out, "--vae-batch-size", "40"])
    common = ["--data-path", root / "data", "--vae", root / "vae", "--out-dir", out, "--model", "UNet-T", "--global-batch-size", "8",
              "--max-steps", "2", "--warmup-steps", "0", "--lr", "0.03", "--corrupt", "0.1"]
    procs = run_scripts_at_once([("train.py", [*common, "--run", "ucls", "--cep"]),
                                 ("train.py", [*common, "--run", "utxt", "--dataset", "fashion-mnist-captions", "--text-encoder",
                                               f"clip:{clip}", "--caption-length", "77", "--no-learn-sigma"])])
    assert all(p.returncode == 0 for p in procs), [p.stderr[-1000:] for p in procs]
    for run in (out / "ucls", out / "utxt"):  # a condition strong enough for guidance to show (2 steps barely move attn2)
        ckpt = torch.load(run / "ckpt" / "last.pt", weights_only=True)
        g = torch.Generator().manual_seed(0)
        for key, value in ckpt["ema"].items():
            if "attn2" in key or "proj_out" in key:
                value.copy_(0.3 * torch.randn(value.shape, generator=g))
        torch.save(ckpt, run / "ckpt" / "last.pt")
    flags = ["--num-samples", N, "--batch-size", N, "--steps", STEPS, "--cfg-scale", "1,4"]
    text_flags = ["--prompts", tmp_path / "prompts.txt"]
    for calls in ([("sample.py", ["--run", out / "ucls", "--tag", "direct", *flags]),
                   ("export.py", [out / "ucls", "--out", tmp_path / "cls"]),
                   ("sample.py", ["--run", out / "utxt", "--tag", "direct", *flags, *text_flags]),
                   ("export.py", [out / "utxt", "--out", tmp_path / "txt"])],
                  [("sample.py", ["--pretrained", tmp_path / "cls", "--out-dir", tmp_path, "--tag", "back", *flags]),
                   ("sample.py", ["--pretrained", tmp_path / "txt", "--out-dir", tmp_path, "--tag", "back", *flags, *text_flags])]):
        procs = run_scripts_at_once(calls)
        assert all(p.returncode == 0 for p in procs), [p.stderr[-1000:] for p in procs]
    assert "the learned variance is dropped" in (tmp_path / "cls" / "README.md").read_text()
    index = json.loads((tmp_path / "txt" / "model_index.json").read_text())
    assert index["bert"] == ["transformers", "CLIPTextModel"] and index["_class_name"] == "LDMTextToImagePipeline"
    pipe = diffusers.LDMTextToImagePipeline.from_pretrained(tmp_path / "txt")
    latents = ImageNoise(0, range(N), (4, 16, 16))()  # what sample.py draws first for images 0..N-1
    for name, run in (("cls", out / "ucls"), ("txt", out / "utxt")):
        direct, back = sampled(run, "direct"), sampled(tmp_path / name, "back")
        for scale in (1, 4):
            assert np.array_equal(back[scale], direct[scale]), (name, scale)  # fp32: bit-identical
            if name == "cls":
                ref = authors_class_loop(tmp_path / "cls", scale, latents.clone())
            else:
                images = pipe([prompts[i % 2] for i in range(N)], height=128, width=128, num_inference_steps=STEPS,
                              guidance_scale=float(scale), latents=latents.clone(), output_type="np").images
                ref = np.round(images * 255).astype(np.int16)
            assert_close_images(direct[scale], ref, (name, scale))
        assert np.abs(direct[1].astype(int) - direct[4]).mean() > 5, name  # guidance changes the images
