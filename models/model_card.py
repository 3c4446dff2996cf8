"""
The model card (README.md) that export.py writes into a pipeline folder: Hub metadata with the run's training
setting (which models/pretrained.py reads back), how to load the folder, the run's facts (model, steps,
corruption manifest, CEP, first stage), the train.py command that reproduces it and the metrics evaluate.py
wrote for it.
"""
import argparse
import hashlib
import json
import os
import shlex

from models.build import apply_recipe
from models.data import FASHION_MNIST_CLASSES

LATENT_FACTOR = 8  # LDMTextToImagePipeline sizes its latents height // 8 x width // 8


def class_names(run_config, manifest, num_classes):
    if manifest and len(manifest.get("classes") or []) == num_classes:
        return list(manifest["classes"])
    if str(run_config.get("dataset", "")).startswith("fashion-mnist") and num_classes == len(FASHION_MNIST_CLASSES):
        return list(FASHION_MNIST_CLASSES)
    return [str(i) for i in range(num_classes)]


def find_manifest(run_dir, run_config):
    """(path, parsed, sha256) of the corruption manifest train.py wrote beside the run, or Nones."""
    eta, seed = run_config.get("corrupt", 0), run_config.get("seed")
    name = f"corrupt_{run_config.get('corrupt_type')}_eta{eta:g}_seed{seed}.json"
    data = os.path.join(os.path.dirname(os.path.abspath(run_dir)), "data")
    found = sorted(os.path.join(data, d, name) for d in (os.listdir(data) if os.path.isdir(data) else [])
                   if os.path.isfile(os.path.join(data, d, name)))
    if len(found) != 1:
        return None, None, None
    with open(found[0], "rb") as f:
        raw = f.read()
    return found[0], json.loads(raw), hashlib.sha256(raw).hexdigest()


def reproduce_command(run_config, parser):
    """train.py with every flag the run's config.json records away from the defaults of train.py's parser."""
    parts = ["python", "train.py"]
    family = parser.parse_args([])
    vars(family).update({k: run_config[k] for k in ("model", "dataset", "vae", "text_encoder") if k in run_config})
    recipe = apply_recipe(family)  # the model family's recipe: what the flags left unset became
    for action in parser._actions:
        if action.dest not in run_config or not action.option_strings:
            continue
        if run_config[action.dest] == recipe.get(action.dest, action.default):
            continue
        value, flag = run_config[action.dest], next(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._StoreTrueAction):
            parts.append(flag)
        elif isinstance(action, argparse.BooleanOptionalAction):
            parts.append(flag if value else f"--no-{flag[2:]}")
        elif value is not None:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def evaluated_sets(run_dir):
    """[(tag, metrics.json)] of the run's evaluated sample sets at the checkpoint's step."""
    root = os.path.join(run_dir, "samples")
    sets = []
    for tag in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, tag, "metrics.json")
        if os.path.isfile(path):
            with open(path) as f:
                sets.append((tag, json.load(f)))
    return sets


def training_setting(run_config):
    keys = ("corrupt", "corrupt_type", "cep", "cep_type", "cep_gamma")
    return {k: run_config[k] for k in keys if k in run_config and (k.startswith("corrupt") or run_config.get("cep"))}


def card_snippet(pipeline, name, model, scheduler):
    """The model card's lines that load and sample the folder."""
    if pipeline == "DiTPipeline":
        return ["```python", "import torch", "from diffusers import DiTPipeline", "",
                f'pipe = DiTPipeline.from_pretrained("{name}")',
                "images = pipe(class_labels=[0, 1], guidance_scale=3.0, num_inference_steps=20,",
                "              generator=torch.manual_seed(0)).images", "```"]
    if pipeline == "LDMTextToImagePipeline":
        side = LATENT_FACTOR * model["input_size"]  # the pipeline sizes its latents height // 8
        return ["```python", "import torch", "from diffusers import LDMTextToImagePipeline", "",
                f'pipe = LDMTextToImagePipeline.from_pretrained("{name}")',
                f'images = pipe(["a photo of a shirt"], height={side}, width={side}, guidance_scale=3.0,',
                "             num_inference_steps=20, generator=torch.manual_seed(0)).images", "```",
                "", f"(`height` and `width` are {LATENT_FACTOR} x the latent side, as the pipeline divides them by "
                f"{LATENT_FACTOR}; the images come out at the first stage's size.)"]
    return ["diffusers has no class-conditional LDM pipeline: this folder has the layout of the authors' "
            "`LDMClassToImagePipeline` (from their diffusers fork). `python sample.py --pretrained "
            f"{name}` samples it, and each part loads with diffusers:", "",
            "```python", f"from diffusers import AutoencoderKL, {scheduler}, UNet2DConditionModel", "",
            f'unet = UNet2DConditionModel.from_pretrained("{name}", subfolder="unet")',
            f'vqvae = AutoencoderKL.from_pretrained("{name}", subfolder="vqvae")',
            f'scheduler = {scheduler}.from_pretrained("{name}", subfolder="scheduler")', "```", "",
            "The class embedding `class_embedder/` row y is the U-Net's one cross-attention token "
            "(`encoder_hidden_states` of shape (N, 1, width)); its last row is the null class."]


def model_card(run_dir, out, ckpt, ckpt_path, pipeline, scheduler, weights, dtype, notes, vae_note, parser):
    """README.md of the folder out: Hub metadata (the training setting as JSON, which models/pretrained.py reads)
    and the run's facts. scheduler: the diffusers class name; weights: ema or model; parser: train.py's."""
    run, model = ckpt.get("config") or {}, ckpt["model_config"]
    manifest_path, manifest, digest = find_manifest(run_dir, run)
    fmnist = str(run.get("dataset", "")).startswith("fashion-mnist")
    corruption = f"η = {run.get('corrupt', 0):g}, {run.get('corrupt_type')}; manifest "
    if manifest:
        where = os.path.relpath(manifest_path, os.path.dirname(os.path.abspath(run_dir)))
        changed = f"{manifest.get('num_corrupted')} of {manifest.get('num_examples')} changed"
        corruption += f"`{where}` sha256 {digest}, {changed}"
    else:
        corruption += "not found beside the run"
    cep = "none"
    if run.get("cep"):
        cep = f"CEP-{'U' if run.get('cep_type') == 'uniform' else 'G'} γ {run.get('cep_gamma', 1):g}"
    name = os.path.basename(os.path.normpath(out))
    text = "text_encoder" in model
    if text:
        encoder = model["text_encoder"]
        condition = f"captions through {encoder['spec']} (frozen, {encoder['max_length']} tokens)"
    else:
        condition = f"{model['num_classes']} classes"
    lines = ["---", "library_name: diffusers",
             f"pipeline_tag: {'text-to-image' if text else 'unconditional-image-generation'}",
             f"tags: [diffusers, {pipeline}, {'text-to-image' if text else 'class-conditional'}, diffusion, "
             "slight-corruption]",
             *(["datasets: [zalando-datasets/fashion_mnist]"] if fmnist else []),
             f"training_setting: {json.dumps(training_setting(run))}", "---", "",
             f"# {os.path.basename(os.path.normpath(run_dir))}", "",
             f"A {'text' if text else 'class'}-conditional {model['name']} from the reference implementation of "
             "*Slight Corruption in Pre-training Data Makes Better Diffusion Models* (Chen et al., NeurIPS 2024), "
             "exported by `export.py`.", "", *card_snippet(pipeline, name, model, scheduler), "", "| | |", "|---|---|",
             f"| model | {model['name']}, {model['input_size']} px latent side, channels {model['in_channels']}, "
             f"{condition}, learned σ: {model.get('learn_sigma', True)} |",
             f"| training | {ckpt.get('step')} steps of global batch {run.get('global_batch_size')} "
             f"(`{os.path.basename(ckpt_path)}`), {weights} weights, exported in {dtype} |",
             f"| dataset | {run.get('dataset')}{' at ' + run['data_path'] if run.get('data_path') else ''} |",
             f"| corruption | {corruption} |", f"| CEP | {cep} |", f"| first stage | {vae_note} |",
             f"| scheduler | {scheduler} (the run's β) |", "",
             "Reproduce the run:", "", "```bash", reproduce_command(run, parser), "```", ""]
    sets = evaluated_sets(run_dir)
    if sets:
        lines += ["Metrics that `evaluate.py` wrote for this run (the real images' floor in brackets):", "",
                  "| sample set | step | sampler | guidance | images | features (reference images) | metrics |",
                  "|---|---|---|---|---|---|---|"]
        for tag, m in sets:
            sc, floor = m.get("sample_config", {}), m.get("floor", {})
            values = ", ".join(f"{k} {v:.4g}" + (f" ({floor[k]:.4g})" if k in floor else "")
                               for k, v in m.get("metrics", {}).items() if isinstance(v, (int, float)))
            lines.append(f"| {tag} | {sc.get('step')} | {sc.get('sampler')} {sc.get('steps')} | {sc.get('cfg_scale')} "
                         f"| {m.get('num_samples')} | {m.get('features')} ({m.get('num_reference')}) | {values} |")
        lines.append("")
    if notes:
        lines += [f"What {pipeline} does differently:", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)
