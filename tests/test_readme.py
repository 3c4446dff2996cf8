"""Every ```bash block of README.md, run in order in one folder as a user would, with only the size
flags made tiny: a model of the same recipe family at its smallest (DiT-XL/2 -> DiT-S/8; LDM-4 ->
UNet-T with LDM-4's recipe given as flags), 2 steps, batches and sample sets of 4, synthetic data
in place of ImageNet / CC3M / COCO / Fashion-MNIST, and tiny random stand-ins for the downloaded
networks (diffusers-format KL and VQ autoencoders, BERT, CLIP, the Inception TorchScript). A
recipe that no longer runs as written fails here.

Slow (a few minutes on 2 cores): `python -m pytest -m slow tests/test_readme.py`; CI runs it after
the suite."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.build import FINETUNE_RECIPES, TRAINING_RECIPES  # noqa: E402
from tests.helpers import REPO, make_fake_fmnist, make_tiny_bert, make_tiny_clip, make_tiny_sd_pipeline, save_stand_in_inception  # noqa: E402

SCRIPTS = ("corrupt_data.py", "train.py", "finetune.py", "sample.py", "evaluate.py", "study.py")
SKIPPED = ("pip install", "apt-get", "python -m pytest", "python -m models.gmm")  # installs; the suite; 2 min of theory


def readme_blocks(text):
    """The ```bash blocks of the README as (lane, logical command lines). Blocks of one lane use only
    the runs of that lane: the embedded dataset's (before "## Training recipes"), DiT-XL/2's, and the
    LDM-4 ones with the downstream adaptation, so lanes run side by side, each in its own folder."""
    blocks = []
    for match in re.finditer(r"```bash\n(.*?)```", text, flags=re.S):
        lines = match.group(1).replace("\\\n", " ").splitlines()
        heading = text[:match.start()].rsplit("\n### ", 1)[-1].split("\n", 1)[0]
        lane = ("embedded" if text.rfind("\n## Training recipes", 0, match.start()) < 0
                else "dit" if "DiT-XL/2" in heading else "ldm")
        blocks.append((lane, [re.sub(r"\s+#.*$", "", line).strip() for line in lines
                              if line.strip() and not line.strip().startswith("#")]))
    return blocks


def recipe_flags(recipe):
    """A recipe (minus its sizes) as flags, for a tiny model standing in for one of another family."""
    flags = {k: v for k, v in recipe.items() if k not in ("global_batch_size", "max_steps", "ckpt_every")}
    out = []
    for key, value in flags.items():
        name = "--" + key.replace("_", "-")
        out.append((name if value else f"--no-{name[2:]}") if isinstance(value, bool) else f"{name} {value}")
    return " ".join(out)


def tiny(line, fx):
    """One README command with its size flags made tiny (None: not run here)."""
    if any(s in line for s in SKIPPED):
        return None
    script = next((s for s in SCRIPTS if re.search(rf"(^|\s){re.escape(s)}(\s|$)", line)), None)
    if script is None:
        return line  # a shell command (printf, mkdir, ...)
    original = line
    subs = [(r"--nproc_per_node=\d+", "--nproc_per_node=1"),
            (r"--data-path /data/imagenet/train", f"--data-path {fx['folder']}"),
            (r"--data-path /data/cc3m/train\.tsv", f"--data-path {fx['tsv']}"),
            (r"--data-path /data/in100/blip_captions\.tsv", f"--data-path {fx['tsv']}"),
            (r"--control-path /data/in100/sam", f"--control-path {fx['sam']}"),
            (r"--image-size (256|512)", "--image-size 32"),
            (r"runwayml/stable-diffusion-v1-5", str(fx["sd"])),  # --init and --vae <it>/vae: a tiny pipeline
            (r"--vae stabilityai/sd-vae-ft-ema", f"--vae {fx['kl']}"),
            (r"--vae CompVis/ldm-super-resolution-4x-openimages/vqvae", f"--vae {fx['vq']}"),
            (r"--model DiT-XL/2", "--model DiT-S/8"),
            (r"--model LDM-4", "--model UNet-T " + recipe_flags(TRAINING_RECIPES["LDM"])),
            (r"--text-encoder bert:bert-base-uncased", f"--text-encoder bert:{fx['bert']}"),
            (r"--clip openai/clip-vit-base-patch16", f"--clip {fx['clip']}"),
            (r"--inception \S+", f"--inception {fx['inception']}"),
            (r"--ref VIRTUAL_imagenet256_labeled\.npz", f"--ref {fx['adm_ref']}"),
            (r"--ref /data/coco/val2014", f"--ref {fx['ref_folder']}"),
            (r"--prompts coco_captions\.txt", f"--prompts {fx['prompts']}"),
            (r"--classes in100\.txt", f"--classes {fx['in100']}"),
            (r"--num-samples \d+", "--num-samples 4"), (r"--batch-size \d+", "--batch-size 4"),
            (r"--val-size \d+", "--val-size 4"), (r"--max-steps \d+", ""), (r"--global-batch-size \d+", ""),
            (r"--ckpt-every \d+", ""), (r"--log-every \d+", "")]
    subs += [(r"--nproc-per-node \d+", "--nproc-per-node 1"), (r"--groups cifar100_groups\.txt", f"--groups {fx['groups']}")]
    for pattern, replacement in subs:
        line = re.sub(pattern, replacement, line)
    if script == "study.py" and "--list" not in line and "--report-only" not in line:  # 2 steps, 4 samples, 1 sample step
        line += (" --max-steps 2 --num-samples 4 --sample-steps 1 --cfg-scales 1,2 --fixed-cfg 2 --sample-args '--batch-size 4'"
                 " --train-args '--global-batch-size 4 --ckpt-every 100 --log-every 1'" + ("" if "--only" in line else " --only clean_seed0"))
    if script in ("train.py", "finetune.py") and "--resume" not in line:
        line += " --max-steps 2 --global-batch-size 4 --ckpt-every 100 --log-every 1"  # one checkpoint, at the end
        if script == "finetune.py" and "--val-size" not in line:
            line += " --val-size 4"
        if script == "finetune.py" and "/data/" in original:  # adapting LDM-4 / DiT-XL/2 (UNet-T / DiT-S/8 here)
            line += " " + recipe_flags(FINETUNE_RECIPES["stock"])
    fmnist = "--dataset" not in line or "fashion-mnist" in line
    if script in ("train.py", "corrupt_data.py", "study.py") and fmnist and "--data-path" not in line and "--resume" not in line:
        line += f" --data-path {fx['fmnist']}"  # a 256-image Fashion-MNIST
    return line


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    import diffusers
    from PIL import Image
    root = tmp_path_factory.mktemp("readme-data")
    rng = np.random.default_rng(0)
    fx = {"fmnist": root / "fmnist", "folder": root / "imagenet", "tsv": root / "cc3m" / "train.tsv", "kl": root / "kl",
          "vq": root / "vq", "bert": root / "bert", "clip": root / "clip", "inception": root / "inception.pt",
          "adm_ref": root / "VIRTUAL_imagenet256_labeled.npz", "ref_folder": root / "coco", "prompts": root / "prompts.txt",
          "in100": root / "in100.txt", "sam": root / "sam", "groups": root / "groups.txt", "sd": root / "sd"}
    make_fake_fmnist(fx["fmnist"], n=256)
    classes = ["n01440764", "n01443537", "n01484850"]
    for k, name in enumerate(classes):  # an ImageNet-like folder: 3 classes x 8 images of 40x48 (cropped to 32)
        (fx["folder"] / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(fx["folder"] / name / f"{name}_{i}.JPEG")
    fx["in100"].write_text("\n".join(classes[:2]) + "\n")
    fx["groups"].write_text(" ".join(classes[:2]) + "\n")
    (root / "cc3m").mkdir()
    rows = []
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(root / "cc3m" / f"{i}.jpg")
        rows.append(f"{i}.jpg\ta photo of a {['cat', 'dog', 'shirt', 'bag'][i % 4]} number {i}")
    fx["tsv"].write_text("\n".join(rows) + "\n")
    fx["sam"].mkdir()  # segmentation colour maps mirroring the captioned images: 4 flat regions each
    for i in range(16):
        colours = rng.integers(0, 255, (2, 2, 3), dtype=np.uint8)
        Image.fromarray(np.kron(colours, np.ones((18, 18, 1), dtype=np.uint8))).save(fx["sam"] / f"{i}.png")
    fx["ref_folder"].mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(fx["ref_folder"] / f"{i}.png")
    fx["prompts"].write_text("a photo of a cat\na photo of a dog\n")
    np.savez(fx["adm_ref"], arr_0=rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8))
    blocks = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8)
    torch.manual_seed(0)
    diffusers.AutoencoderKL(**blocks, latent_channels=4).save_pretrained(fx["kl"])
    diffusers.VQModel(**blocks, latent_channels=3, num_vq_embeddings=32, vq_embed_dim=3).save_pretrained(fx["vq"])
    make_tiny_bert(fx["bert"])
    make_tiny_clip(fx["clip"])
    save_stand_in_inception(fx["inception"])
    make_tiny_sd_pipeline(fx["sd"])
    return fx


def test_tiny_rewrites_only_sizes():
    fx = {k: f"<{k}>" for k in ("fmnist", "folder", "tsv", "kl", "vq", "bert", "clip", "inception", "adm_ref", "ref_folder",
                                "prompts", "in100", "sam", "groups", "sd")}
    line = tiny("torchrun --standalone --nproc_per_node=8 train.py --dataset imagefolder --data-path /data/imagenet/train "
                "--image-size 256 --vae stabilityai/sd-vae-ft-ema --model DiT-XL/2 --corrupt 0.025 --max-steps 400000 --run-name x", fx)
    assert line == ("torchrun --standalone --nproc_per_node=1 train.py --dataset imagefolder --data-path <folder> --image-size 32 "
                    "--vae <kl> --model DiT-S/8 --corrupt 0.025  --run-name x --max-steps 2 --global-batch-size 4 --ckpt-every 100 --log-every 1")
    assert tiny("python train.py --corrupt 0.025 --cep", fx).endswith("--data-path <fmnist>")
    ldm = tiny("python train.py --model LDM-4 --dataset imagefolder --data-path /data/imagenet/train", fx)
    assert ("--model UNet-T --schedule scaled_linear --beta-start 0.0015 --beta-end 0.0195 --no-learn-sigma --lr 0.0001 "
            "--warmup-steps 0 --lr-decay none --weight-decay 0.01 --grad-clip 0.0 --ema-decay 0.0 --no-ema-warmup --class-dropout 0.1") in ldm
    ft = tiny("python finetune.py --init out/x --dataset imagefolder --data-path /data/imagenet/train", fx)
    assert ft.endswith("--lr 5e-06 --warmup-steps 0 --lr-decay none --weight-decay 0.01 --grad-clip 1.0 --ema-decay 0.0 --no-ema-warmup --class-dropout 0.0")
    assert tiny("pip install -r requirements.txt", fx) is None and tiny("printf 'a' > b.txt", fx) == "printf 'a' > b.txt"


def run_lane(blocks, folder, fx):
    """Run a lane's blocks in order in `folder` (the scripts linked beside it, as in a clone); returns
    the number of commands run."""
    folder.mkdir()
    for script in SCRIPTS:
        os.symlink(REPO / script, folder / script)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    ran = 0
    for n, block in enumerate(blocks):
        commands = [c for c in (tiny(line, fx) for line in block) if c]
        if not commands:
            continue
        script = "set -euo pipefail\n" + "\n".join(f"echo '+ {c}'\n{c}" for c in commands) + "\n"
        proc = subprocess.run(["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"README block {n} of {folder.name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        ran += len(commands)
    return ran


@pytest.mark.slow
def test_every_readme_command_runs(fixtures, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    blocks = readme_blocks((REPO / "README.md").read_text())
    lanes = {lane: [b for name, b in blocks if name == lane] for lane in ("ldm", "embedded", "dit")}
    assert len(lanes["embedded"]) >= 5 and len(lanes["dit"]) == 1 and len(lanes["ldm"]) >= 2
    with ThreadPoolExecutor(2) as pool:  # on two cores: LDM-4's lane beside the other two
        futures = [pool.submit(run_lane, lanes[lane], tmp_path / lane, fixtures) for lane in lanes]
        ran = sum(f.result() for f in futures)
    assert ran >= 45, ran
    metrics = {lane: list((tmp_path / lane).glob("out/*/samples/*/metrics.json")) for lane in lanes}
    assert len(metrics["embedded"]) >= 4 and len(metrics["dit"]) == 1 + 5 and len(metrics["ldm"]) >= 4, metrics  # dit: + the study's run
    for lane, results in (("embedded", "fashion-mnist"), ("dit", "imagefolder")):  # the study's report in each lane
        assert "| clean | " in (tmp_path / lane / "results" / results / "README.md").read_text()
