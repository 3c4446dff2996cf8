"""sample.py --pretrained on the three kinds of released pipeline, saved locally with tiny random
diffusers parts (tests/helpers.py): DiTPipeline, the authors' LDMClassToImagePipeline layout, and
LDMTextToImagePipeline. Its images equal diffusers' own pipeline run from the same initial latents
with the same scheduler (DDIM from the saved config, DPM-Solver++ swapped in by from_config as the
authors' scripts do), at guidance 1 and 3, up to the last uint8 level; 1 and 2 ranks give the same
bytes; LDMBert equals diffusers' LDMBertModel; bad pipelines are refused in one line."""
import json
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
diffusers = pytest.importorskip("diffusers")
import sample  # noqa: E402
from models.common import ImageNoise, UsageError  # noqa: E402
from models.pretrained import load_pretrained, scheduler_grid  # noqa: E402
from tests.helpers import (REPO, make_tiny_dit_pipeline, make_tiny_ldm_class_pipeline, make_tiny_ldm_text_pipeline,  # noqa: E402
                           run_script)

torch.set_num_threads(2)
N, STEPS, SEED, PROMPTS = 4, 4, 5, ["a photo of a cat", "a dog"]
SCALES = (1.0, 3.0)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return dict(root=root, dit=(root / "dit", make_tiny_dit_pipeline(root / "dit")),
                cls=(root / "cls", make_tiny_ldm_class_pipeline(root / "cls")),
                txt=(root / "txt", make_tiny_ldm_text_pipeline(root / "txt")),
                bert=(root / "bert", make_tiny_ldm_text_pipeline(root / "bert", "BertModel")))


def run_sample(folder, out, *flags):
    """sample.py in this process (one rank): the images of each guidance scale, uint8 N x H x W x C."""
    argv = ["sample.py", "--pretrained", str(folder), "--out-dir", str(out), "--num-samples", str(N), "--steps", str(STEPS),
            "--seed", str(SEED), "--batch-size", "2", "--cfg-scale", ",".join(f"{s:g}" for s in SCALES), *map(str, flags)]
    with mock.patch.object(sys, "argv", argv):
        sample.main()
    kind = flags[flags.index("--sampler") + 1]
    return {s: np.load(out / folder.name / "samples" / f"{kind}{STEPS}_cfg{s:g}_n{N}_seed{SEED}" / "samples.npz")["arr_0"] for s in SCALES}


def initial_latents(shape):
    return ImageNoise(SEED, range(N), shape)()  # what sample.py draws first for images 0..N-1


def swapped(folder, kind):
    """`Scheduler.from_config(pipeline.scheduler.config)` of a pipeline loaded from disk, as the authors' scripts do
    (a config read from JSON passes every key it holds, timestep_spacing included)."""
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return (diffusers.DDIMScheduler if kind == "ddim" else diffusers.DPMSolverMultistepScheduler).from_config(config)


def dit_reference(folder, pipe, kind, scale):
    pipe.scheduler = swapped(folder, kind)
    latents = initial_latents((4, 8, 8))
    with mock.patch("diffusers.pipelines.dit.pipeline_dit.randn_tensor", return_value=latents.clone()):
        return pipe(class_labels=list(range(N)), guidance_scale=scale, num_inference_steps=STEPS, output_type="np").images


def text_reference(folder, pipe, kind, scale):
    pipe.scheduler = swapped(folder, kind)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(N)]
    return pipe(prompts, height=64, width=64, num_inference_steps=STEPS, guidance_scale=scale, eta=0.0,
                latents=initial_latents((3, 8, 8)), output_type="np").images


@torch.no_grad()
def class_reference(folder, parts, kind, scale):
    """The authors' class pipeline as assumed (models/pretrained.py): LDMTextToImagePipeline's loop with
    the class embedding as the one context token, class 10 (the last row) as the null class."""
    scheduler = swapped(folder, kind)
    scheduler.set_timesteps(STEPS)
    labels = torch.arange(N) % 10
    cond, null = parts["embedding"](labels)[:, None], parts["embedding"](torch.full((N,), 10))[:, None]
    x = initial_latents((3, 8, 8)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp, ctx = (x, cond) if scale == 1 else (torch.cat([x, x]), torch.cat([null, cond]))
        eps = parts["unet"](scheduler.scale_model_input(inp, t), t, encoder_hidden_states=ctx).sample
        if scale != 1:
            uncond, conditional = eps.chunk(2)
            eps = uncond + scale * (conditional - uncond)
        x = scheduler.step(eps, t, x).prev_sample
    image = parts["vqvae"].decode(x / parts["vqvae"].config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def assert_same_images(ours, ref, what):
    ref = np.round(ref * 255).astype(np.int16)  # the uint8 that diffusers' numpy_to_pil writes
    diff = np.abs(ours.astype(np.int16) - ref)
    assert ours.shape == ref.shape and ref.std() > 20, what  # non-trivial images
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (what, diff.max(), (diff > 0).mean())


@pytest.mark.parametrize("name", ["dit", "cls", "txt", "bert"])
def test_matches_the_diffusers_pipeline(pipes, tmp_path, name):
    """bert: the text pipeline with a transformers BertModel as its `bert`, run with no attention mask
    over 77 tokens and the empty caption as the null condition, as diffusers' pipeline runs it."""
    folder, pipe = pipes[name]
    reference = {"dit": dit_reference, "cls": class_reference, "txt": text_reference, "bert": text_reference}[name]
    prompts = ["--prompts", pipes["root"] / "prompts.txt"] if name in ("txt", "bert") else []
    for kind in ("ddim", "dpm-solver++"):
        ours = run_sample(folder, tmp_path / kind, "--sampler", kind, *prompts)
        for scale in SCALES:
            assert_same_images(ours[scale], reference(folder, pipe, kind, scale), (name, kind, scale))
        assert np.abs(ours[1.0].astype(int) - ours[3.0]).mean() > 0.1  # guidance changes the images (bert: 0.24)
    if name == "bert":  # the mask matters: a masked BertModel gives other embeddings, so the match above reads no mask
        from models.text import IdsOnly
        tok = pipe.tokenizer(["a dog"], padding="max_length", max_length=77, return_tensors="pt")
        with torch.no_grad():
            masked = pipe.bert.eval()(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
            assert (masked - IdsOnly(pipe.bert)(tok.input_ids)).abs().max() > 1e-3
    saved = tmp_path / "ddim" / folder.name / "samples" / f"ddim{STEPS}_cfg3_n{N}_seed{SEED}" / "sample_config.json"
    config = json.loads(saved.read_text())
    assert config["run_config"]["pretrained"] == str(folder) and config["checkpoint"] == str(folder.resolve())
    assert config["scheduler"]["grid"][0] == ([750, 500, 250, 0] if name == "dit" else [751, 501, 251, 1])  # DDIM 'leading'


def test_two_ranks_give_the_same_bytes(pipes, tmp_path):
    """1 rank (this process) and 2 gloo ranks (torchrun): byte-identical PNGs and samples.npz."""
    folder = pipes["cls"][0]
    flags = ["--pretrained", folder, "--num-samples", N, "--steps", STEPS, "--seed", SEED, "--batch-size", 2, "--cfg-scale", 3, "--sampler", "ddim"]
    run_script("sample.py", [*flags, "--out-dir", tmp_path / "one"])
    run_script("sample.py", [*flags, "--out-dir", tmp_path / "two"], nproc=2)
    one, two = (tmp_path / w / folder.name / "samples" / f"ddim{STEPS}_cfg3_n{N}_seed{SEED}" for w in ("one", "two"))
    files = sorted(p.name for p in (one / "images").iterdir())
    assert len(files) == N and files == sorted(p.name for p in (two / "images").iterdir())
    for f in [*(Path("images") / f for f in files), "samples.npz"]:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f


def test_ldmbert_equals_diffusers():
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    from models.text import LDMBert
    torch.manual_seed(0)
    cfg = dict(vocab_size=30, max_position_embeddings=77, encoder_layers=2, encoder_ffn_dim=48, encoder_attention_heads=3,
               head_dim=8, d_model=20)  # heads x head_dim (24) != width (20)
    ref = LDMBertModel(LDMBertConfig(**cfg)).eval()
    ours = LDMBert(*(cfg[k] for k in ("vocab_size", "max_position_embeddings", "d_model", "encoder_layers", "encoder_attention_heads",
                                      "head_dim", "encoder_ffn_dim")))
    ours.load_state_dict({k[len("model."):]: v for k, v in ref.state_dict().items() if k.startswith("model.")}, strict=True)
    ids = torch.randint(0, 30, (3, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(ids)[0], ours(ids)
    assert want.std() > 0.1 and torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_scheduler_grids_are_diffusers():
    """The grid of every spacing, with and without steps_offset, is the one diffusers' schedulers set."""
    for spacing in ("leading", "linspace", "trailing"):
        for offset in (0, 1):
            cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing=spacing, steps_offset=offset,
                       set_alpha_to_one=False, clip_sample=False)
            for kind, cls in (("ddim", diffusers.DDIMScheduler), ("dpm-solver++", diffusers.DPMSolverMultistepScheduler),
                              ("ddpm", diffusers.DDPMScheduler)):
                for steps in (7, 25, 50):
                    ref = cls.from_config(cfg)
                    ref.set_timesteps(steps)
                    plan = scheduler_grid(cfg, kind, steps)
                    assert plan["grid"][0] == ref.timesteps.tolist(), (spacing, offset, kind, steps)
                    if kind == "ddim":  # DDIM steps to t - T // n; ᾱ_0 at the end (set_alpha_to_one False)
                        assert plan["grid"][1] == [t - 1000 // steps for t in plan["grid"][0]]
                        assert plan["grid"][2] == pytest.approx(float(ref.final_alpha_cumprod))
    plan = scheduler_grid(dict(clip_sample=True, variance_type="learned_range"), "ddpm", 10)
    assert plan["clip"] and plan["learned_variance"] and plan["diffusion"]["schedule"] == "linear"
    assert scheduler_grid({"clip_sample": True}, "dpm-solver++", 10)["clip"] is False  # DPM-Solver has no clip_sample
    for cfg, kind, key in ((dict(prediction_type="v_prediction"), "ddim", "prediction_type"), ({}, "lcm", "--sampler lcm"),
                           ({"use_karras_sigmas": True}, "dpm-solver++", "use_karras_sigmas"),
                           (dict(beta_schedule="squaredcos_cap_v2"), "ddim", "beta_schedule")):
        with pytest.raises(ValueError, match=key):
            scheduler_grid(cfg, kind, 10)


def edited(src, dst, path, change):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / path).read_text())
    change(cfg)
    (dst / path).write_text(json.dumps(cfg))
    return dst


def test_bad_pipelines_are_refused_in_one_line(pipes, tmp_path, monkeypatch):
    cls, dit = pipes["cls"][0], pipes["dit"][0]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [
        (tmp_path, "no model_index.json"),
        ("nobody/no-such-pipeline", "could not be fetched"),
        (edited(cls, tmp_path / "sd", "model_index.json", lambda c: c.update(_class_name="StableDiffusionPipeline")),
         "'StableDiffusionPipeline' is not supported"),
        (edited(cls, tmp_path / "noemb", "model_index.json", lambda c: c.pop("class_embedder")), "lacks a ClassEmbedder"),
        (edited(cls, tmp_path / "extra", "model_index.json", lambda c: c.update(text_encoder=["transformers", "CLIPTextModel"])),
         "component 'text_encoder' (CLIPTextModel) not understood"),
        (edited(cls, tmp_path / "unetkey", "unet/config.json", lambda c: c.update(class_embed_type="timestep")),
         "unet: config class_embed_type='timestep' is not supported"),
        (edited(cls, tmp_path / "unetnew", "unet/config.json", lambda c: c.update(new_feature=1)), "unet: config key 'new_feature' not understood"),
        (edited(cls, tmp_path / "embkey", "class_embedder/config.json", lambda c: c.update(n_dims=2)),
         "class_embedder: config key 'n_dims' not understood"),
        (edited(dit, tmp_path / "ditkey", "transformer/config.json", lambda c: c.update(norm_type="ada_norm_single")),
         "transformer: config norm_type"),
        (edited(cls, tmp_path / "vqkey", "vqvae/config.json", lambda c: c.update(norm_type="spatial")), "vqvae: VQModel: config norm_type"),
    ]
    shutil.rmtree(tmp_path / "noemb" / "class_embedder")
    for spec, message in cases:
        with pytest.raises(UsageError) as e:
            load_pretrained(str(spec))
        assert message in str(e.value) and "\n" not in str(e.value), (spec, str(e.value))
    for flags, message in (([], "lacks"), (["--sampler", "lcm"], "--sampler lcm is not one"), (["--run", "out/x"], "takes none of"),
                           (["--prompts", pipes["root"] / "prompts.txt"], "--prompts is for text models")):
        folder = tmp_path / "noemb" if message == "lacks" else cls
        argv = ["sample.py", "--pretrained", str(folder), "--out-dir", str(tmp_path / "out"), *map(str, flags)]
        with mock.patch.object(sys, "argv", argv), pytest.raises(UsageError, match=message):
            sample.main()
    with mock.patch.object(sys, "argv", ["sample.py", "--pretrained", str(pipes["txt"][0]), "--out-dir", str(tmp_path / "out")]), \
            pytest.raises(UsageError, match="needs --prompts"):
        sample.main()
    assert not (tmp_path / "out").exists()


def test_legacy_transformer2d_layout_loads(pipes, tmp_path):
    """facebook/DiT-XL-2-256's layout: a Transformer2DModel with its extra keys at their DiT values."""
    folder = edited(pipes["dit"][0], tmp_path / "legacy", "transformer/config.json", lambda c: c.update(
        _class_name="Transformer2DModel", cross_attention_dim=None, num_vector_embeds=None, use_linear_projection=False,
        only_cross_attention=False, double_self_attention=False, attention_type="default", caption_channels=None, interpolation_scale=None))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "transformer": ["diffusers", "Transformer2DModel"]}))
    model, _, ckpt, _ = load_pretrained(str(folder))
    assert ckpt["model_config"]["name"] == "DiTPipeline:Transformer2DModel" and model.num_classes == 1000 and model.learn_sigma


def test_dit_takes_the_config_s_norm_eps(pipes, tmp_path):
    """The pre-MLP LayerNorm's eps comes from the transformer's config.norm_eps (diffusers' default
    1e-5 when the config leaves it out), into the model and the model_config a sample set records."""
    for eps, folder in ((1e-5, pipes["dit"][0]), (1e-6, edited(pipes["dit"][0], tmp_path / "eps", "transformer/config.json",
                                                                 lambda c: c.update(norm_eps=1e-6)))):
        model, _, ckpt, _ = load_pretrained(str(folder))
        assert ckpt["model_config"]["mlp_norm_eps"] == eps and {b.norm2.eps for b in model.blocks} == {eps}


def test_trained_betas_are_the_schedule(pipes, tmp_path):
    """A scheduler config with trained_betas (as the CC3M releases' appear to hold): the listed β are
    the schedule, as diffusers' schedulers take them (ignoring beta_schedule / start / end), for DDIM
    and DPM-Solver++. The same pipeline with its named schedule gives other images: the list is read."""
    import diffusers
    betas = np.linspace(0.02, 0.17, 1000) ** 2  # β from 4e-4 to 0.029, not the named 1e-4 -> 0.02
    folder = edited(pipes["dit"][0], tmp_path / "trained", "scheduler/scheduler_config.json",
                    lambda c: c.update(trained_betas=betas.tolist()))
    pipe = diffusers.DiTPipeline.from_pretrained(folder)
    ours = {kind: run_sample(folder, tmp_path / kind, "--sampler", kind) for kind in ("ddim", "dpm-solver++")}
    named = run_sample(pipes["dit"][0], tmp_path / "ddim-named", "--sampler", "ddim")
    for scale in SCALES:
        for kind in ours:
            assert_same_images(ours[kind][scale], dit_reference(folder, pipe, kind, scale), (kind, scale))
        changed = (ours["ddim"][scale].astype(int) != named[scale]).mean()  # the diffusers match: < 1 % of pixels
        assert changed > 0.2, (scale, changed)
    saved = json.loads((tmp_path / "ddim" / "trained" / "samples" / f"ddim{STEPS}_cfg3_n{N}_seed{SEED}" / "sample_config.json").read_text())
    assert (saved["diffusion"]["schedule"], saved["diffusion"]["betas"]) == ("trained", betas.tolist())
    with pytest.raises(ValueError, match="trained_betas holds 999 values"):
        scheduler_grid({"trained_betas": betas[:999].tolist()}, "ddim", 4)


def test_release_labels_say_what_each_model_was_trained_with(pipes, tmp_path):
    """Sets sampled from folders named like the authors' releases are labelled by what the release
    says (its id), each its own row of evaluate.py --compare; an id of another form is 'setting
    unknown', never 'clean'."""
    from models.pretrained import release_setting
    from models.report import read_rows, setting_label
    assert release_setting("DiffusionNoise/ldm_cc3m_random_noise_7.5") == dict(corrupt=0.075, corrupt_type="swap",
                                                                                release_setting="from the id")
    label = lambda spec: setting_label({"pretrained": spec, **release_setting(spec)})  # noqa: E731
    assert label("DiffusionNoise/ldm_in1k_clean_condnoise_gaussian") == "pretrained ldm_in1k_clean_condnoise_gaussian: CEP-G γ 1"
    assert label("/x/facebook-DiT-XL-2-256") == "pretrained facebook-DiT-XL-2-256: setting unknown"
    out = tmp_path / "out"
    for name in ("dit-xl-2_imagenet_clean", "dit-xl-2_imagenet_random_noise_5"):
        shutil.copytree(pipes["dit"][0], tmp_path / name)
        run_sample(tmp_path / name, out, "--sampler", "ddim")
        for folder in (out / name / "samples").iterdir():  # a stand-in for evaluate.py's metrics (not under test here)
            config = json.loads((folder / "sample_config.json").read_text())
            (folder / "metrics.json").write_text(json.dumps({"metrics": {"fid": 1.0}, "num_samples": N, "sample_config": config}))
    settings = sorted({r["setting"] for r in read_rows(str(out))})
    assert settings == ["pretrained dit-xl-2_imagenet_clean: clean", "pretrained dit-xl-2_imagenet_random_noise_5: η 5 %"]
    proc = subprocess.run([sys.executable, "evaluate.py", "--compare", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (out / "comparison.md").read_text()
    assert all(s in table for s in settings), table


def test_authors_preset_samples_as_their_scripts_do(pipes, tmp_path):
    """--preset authors: DPM-Solver++ at guidance 2.25 in fp16, each image a JPEG of quality 100
    without chroma subsampling, and samples.npz holds the decoded JPEG pixels (what evaluate.py
    scores); a flag given with the preset wins (--steps here). The same set saved as PNG differs by
    the JPEG loss alone: a little on most images, not at all in shape."""
    from PIL import Image, JpegImagePlugin
    folder = pipes["dit"][0]
    common = ["sample.py", "--pretrained", str(folder), "--out-dir", str(tmp_path), "--num-samples", str(N), "--steps", "3",
              "--batch-size", "2", "--preset", "authors"]
    for extra in ([], ["--image-format", "png"]):
        with mock.patch.object(sys, "argv", common + extra):
            sample.main()
    jpeg_set = tmp_path / folder.name / "samples" / f"dpm-solver++3_cfg2.25_n{N}_seed0_fp16_jpeg"
    png_set = tmp_path / folder.name / "samples" / f"dpm-solver++3_cfg2.25_n{N}_seed0_fp16"
    config = json.loads((jpeg_set / "sample_config.json").read_text())
    assert (config["sampler"], config["steps"], config["cfg_scale"], config["precision"], config["image_format"]) == (
        "dpm-solver++", 3, 2.25, "fp16", "jpeg")
    files = sorted((jpeg_set / "images").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.jpg" for i in range(N)]
    arrays = np.load(jpeg_set / "samples.npz")["arr_0"]
    for f, arr in zip(files, arrays):
        with Image.open(f) as im:
            assert im.format == "JPEG" and JpegImagePlugin.get_sampling(im) == 0 and np.array_equal(np.asarray(im), arr)
    lossless = np.load(png_set / "samples.npz")["arr_0"]
    diff = np.abs(arrays.astype(int) - lossless)
    assert 0 < diff.mean() < 2 and diff.max() < 40, (diff.mean(), diff.max())
