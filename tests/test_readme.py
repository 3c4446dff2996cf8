"""Every ```bash block of README.md and of the docs/ pages, run in order in one folder as a user
would, with only the size flags made tiny: a model of the same recipe family at its smallest
(DiT-XL/2 -> DiT-S/8; LDM-4 -> UNet-T with LDM-4's recipe given as flags), 2 steps, batches and
sample sets of 4, synthetic data in place of ImageNet / CC3M / COCO / Fashion-MNIST, and tiny random
stand-ins for the downloaded networks (diffusers-format KL and VQ autoencoders, BERT, CLIP, the
Inception TorchScript). A recipe that no longer runs as written fails here; so does a link of the
README or docs/ to a file or heading that is not there.

`sbatch` lines run their job script (docs/jobs/) under tests/fake_slurm's stand-in scheduler.

Slow (a few minutes on 2 cores): `python -m pytest -m slow tests/test_readme.py`. CI does not run
it (.ci/run runs the default suite); run it before a change to the README or docs/ lands."""
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
from tests.helpers import (REPO, make_fake_fmnist, make_tiny_bert, make_tiny_clip, make_tiny_dit_pipeline,  # noqa: E402
                           make_tiny_ldm_class_pipeline, make_tiny_ldm_text_pipeline, make_tiny_sd_pipeline, save_stand_in_inception,
                           tiny_dinov2)

SCRIPTS = ("corrupt_data.py", "train.py", "finetune.py", "sample.py", "evaluate.py", "study.py", "export.py")
SKIPPED = ("pip install", "apt-get", "python -m pytest", "python -m models.gmm")  # installs; the suite; 2 min of theory


# The pages the walk runs, in the order a reader meets them: the README, then docs/ in the order in
# which their commands ran when they were all in the README (a page may use the runs of the pages
# before it). Each page's lane: "paper" pages go to DiT-XL/2's lane under a heading that names it
# and to the LDM-4 lane otherwise; so does the README's section of the paper's runs.
PAGES = (("README.md", "embedded"), ("docs/corruption.md", "embedded"), ("docs/models.md", "embedded"),
         ("docs/cep.md", "embedded"), ("docs/runs.md", "embedded"), ("docs/sampling-and-metrics.md", "embedded"),
         ("docs/performance.md", "embedded"), ("docs/adaptation.md", "embedded"), ("docs/study.md", "embedded"),
         ("docs/recipes.md", "paper"))
PAPER_SECTION = "## The paper's runs"  # the README's paper-scale commands


def page_blocks(text, lane):
    """The ```bash blocks of one page as (lane, logical command lines). Blocks of one lane use only
    the runs of that lane: the embedded dataset's, DiT-XL/2's, and the LDM-4 ones with the
    downstream adaptation and LCM, so lanes run side by side, each in its own folder."""
    blocks, heading, section, body = [], "", "", None  # body: the lines of the open ``` block
    for line in text.splitlines(keepends=True):
        if body is None and line.startswith("```"):
            body, bash = [], line.strip() == "```bash"
        elif body is not None and line.startswith("```"):
            if bash:
                where = "paper" if lane == "paper" or section == PAPER_SECTION else lane
                where = ("dit" if "DiT-XL/2" in heading else "ldm") if where == "paper" else where
                lines = "".join(body).replace("\\\n", " ").splitlines()
                blocks.append((where, [re.sub(r"\s+#.*$", "", ln).strip() for ln in lines
                                       if ln.strip() and not ln.strip().startswith("#")]))
            body = None
        elif body is not None:
            body.append(line)
        elif re.match(r"#{1,6} ", line):  # a heading, outside code blocks
            heading = line.strip()
            section = heading if heading.startswith("## ") else section
    assert body is None, "a ``` block is not closed"
    return blocks


def walk_blocks():
    """Every page's blocks in walk order, as (page, lane, command lines)."""
    return [(page, lane, lines) for page, default in PAGES
            for lane, lines in page_blocks((REPO / page).read_text(), default)]


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
    script = "train.py" if line.startswith("sbatch ") else next(  # a job script runs train.py
        (s for s in SCRIPTS if re.search(rf"(^|\s){re.escape(s)}(\s|$)", line)), None)
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
            (r"--pretrained DiffusionNoise/", f"--pretrained {fx['released']}/"),  # the authors' pipelines, saved tiny
            (r"--vae stabilityai/sd-vae-ft-ema", f"--vae {fx['kl']}"),
            (r"--vae CompVis/ldm-super-resolution-4x-openimages/vqvae", f"--vae {fx['vq']}"),
            (r"--model DiT-XL/2", "--model DiT-S/8"),
            (r"--model LDM-4", "--model UNet-T " + recipe_flags(TRAINING_RECIPES["LDM"])),
            (r"--text-encoder bert:bert-base-uncased", f"--text-encoder bert:{fx['bert']}"),
            (r"--clip openai/clip-vit-base-patch16", f"--clip {fx['clip']}"),
            (r"--inception \S+", f"--inception {fx['inception']}"), (r"--features dinov2", f"--features dinov2 --dinov2 {fx['dinov2']}"),
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
    if script == "study.py" and "--report-only" in line and "--grid converged" in line:
        line += " --max-steps 4 --num-samples 4 --sample-steps 1 --cfg-scales 1,2 --fixed-cfg 2"  # the report of the tiny runs below
    if script == "study.py" and "--list" not in line and "--report-only" not in line:  # 2 steps, 4 samples, 1 sample step
        steps = 4 if "--grid converged" in line else 2  # the converged grid's learning curve samples max_steps/4 and /2
        if "--grid converged" in line:  # a lane is no git clone: this checkout's scripts, not the pinned worktree's
            line += " --code checkout"  # (the pinned path runs end to end in tests/test_study.py, slow)
        line += (f" --max-steps {steps} --num-samples 4 --sample-steps 1 --cfg-scales 1,2 --fixed-cfg 2 --sample-args '--batch-size 4'"
                 f" --train-args '--global-batch-size 4 --ckpt-every {steps // 4 if steps == 4 else 100} --log-every 1'"
                 + ("" if "--only" in line else " --only clean_seed0"))  # (the converged curve reads checkpoints 1 and 2)
    if script in ("train.py", "finetune.py"):  # (--resume too: it starts a run that is not there yet)
        line += " --max-steps 2 --global-batch-size 4 --ckpt-every 100 --log-every 1"  # one checkpoint, at the end
        if script == "finetune.py" and "--val-size" not in line:
            line += " --val-size 4"
        if script == "finetune.py" and "/data/" in original:  # adapting LDM-4 / DiT-XL/2 (UNet-T / DiT-S/8 here)
            line += " " + recipe_flags(FINETUNE_RECIPES["stock"])
    fmnist = "--dataset" not in line or "fashion-mnist" in line
    if script in ("train.py", "corrupt_data.py", "study.py") and fmnist and "--data-path" not in line:
        line += f" --data-path {fx['fmnist']}"  # a 256-image Fashion-MNIST
    return line


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    import diffusers
    from PIL import Image
    root = tmp_path_factory.mktemp("readme-data")
    rng = np.random.default_rng(0)
    fx = {"fmnist": root / "fmnist", "folder": root / "imagenet", "tsv": root / "cc3m" / "train.tsv", "kl": root / "kl",
          "vq": root / "vq", "dinov2": root / "dinov2", "bert": root / "bert", "clip": root / "clip", "inception": root / "inception.pt",
          "adm_ref": root / "VIRTUAL_imagenet256_labeled.npz", "ref_folder": root / "coco", "prompts": root / "prompts.txt",
          "in100": root / "in100.txt", "sam": root / "sam", "groups": root / "groups.txt", "sd": root / "sd", "released": root / "released"}
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
    tiny_dinov2(fx["dinov2"])
    make_tiny_sd_pipeline(fx["sd"])
    for make, name in ((make_tiny_dit_pipeline, "dit-xl-2_imagenet_clean"), (make_tiny_ldm_class_pipeline, "ldm_in1k_clean_condnoise_uniform"),
                       (make_tiny_ldm_text_pipeline, "ldm_cc3m_clean")):
        make(fx["released"] / name)
    return fx


def test_tiny_rewrites_only_sizes():
    fx = {k: f"<{k}>" for k in ("fmnist", "folder", "tsv", "kl", "vq", "bert", "clip", "inception", "adm_ref", "ref_folder",
                                "prompts", "in100", "sam", "groups", "sd", "released", "dinov2")}
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
    assert tiny("sample.py --pretrained DiffusionNoise/ldm_cc3m_clean --num-samples 5000", fx) == \
        "sample.py --pretrained <released>/ldm_cc3m_clean --num-samples 4"
    assert tiny("sbatch docs/jobs/one_node.sh out r --corrupt 0.025", fx) == \
        "sbatch docs/jobs/one_node.sh out r --corrupt 0.025 --max-steps 2 --global-batch-size 4 --ckpt-every 100 --log-every 1 --data-path <fmnist>"
    assert tiny("pip install -r requirements.txt", fx) is None and tiny("printf 'a' > b.txt", fx) == "printf 'a' > b.txt"


def run_lane(blocks, folder, fx):
    """Run a lane's blocks, (page, command lines), in order in `folder` (the scripts linked beside
    it, as in a clone); returns the number of commands run. A command that ran already in this lane
    (the README's one command per stage or model, repeated on its docs page) is not run again: its
    rerun does nothing by design (`done already`, images on disk, latents extracted); evaluate.py,
    which does score again, is."""
    folder.mkdir()
    for name in (*SCRIPTS, "docs"):  # docs/jobs: the job scripts
        os.symlink(REPO / name, folder / name)
    env = {**os.environ, "PATH": f"{REPO / 'tests' / 'fake_slurm'}:{Path(sys.executable).parent}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    ran, done = 0, set()
    for n, (page, block) in enumerate(blocks):
        commands = [c for c in (tiny(line, fx) for line in block) if c and (" ".join(c.split()) not in done or "evaluate.py" in c)]
        done.update(" ".join(c.split()) for c in commands)
        if not commands:
            continue
        script = "set -euo pipefail\n" + "\n".join(f"echo '+ {c}'\n{c}" for c in commands) + "\n"
        proc = subprocess.run(["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"{page}: block {n} of {folder.name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        ran += len(commands)
    return ran


def test_walk_covers_every_page():
    """Every docs/ page is walked, in a lane that has the runs it uses."""
    assert {page for page, _ in PAGES} == {"README.md"} | {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    blocks = walk_blocks()
    lanes = {(page, lane) for page, lane, _ in blocks}
    assert ("README.md", "embedded") in lanes and ("README.md", "dit") in lanes and ("README.md", "ldm") in lanes
    assert {lane for page, lane in lanes if page == "docs/recipes.md"} == {"dit", "ldm"}
    assert {lane for page, lane in lanes if page not in ("README.md", "docs/recipes.md")} == {"embedded"}
    readme = next(lines for page, _, lines in blocks if page == "README.md")
    assert readme[2].startswith("python train.py --nproc-per-node 2 --corrupt 0.025 --cep")  # the quick start comes first


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # no headings inside code blocks
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        base = slug(heading)
        out.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return out


def test_links_resolve():
    """Relative links of the README and docs/ reach a file and, with #anchor, one of its headings;
    so do links from anywhere else in the repository into the README or docs/."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    others = [p for p in REPO.glob("results/**/*.md") if "runs" not in p.relative_to(REPO).parts]
    broken = []
    for page in pages + others:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if page in others and dest != REPO / "README.md" and REPO / "docs" not in dest.parents:
                continue  # results/ pages link to what their generator writes; only their links here are checked
            if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in anchors(dest)):
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert not broken, broken


@pytest.mark.slow
def test_every_readme_command_runs(fixtures, tmp_path):
    """Every ```bash block of the README and docs/, lane by lane."""
    from concurrent.futures import ThreadPoolExecutor
    blocks = walk_blocks()
    lanes = {lane: [(page, b) for page, name, b in blocks if name == lane] for lane in ("ldm", "embedded", "dit")}
    assert len(lanes["embedded"]) >= 5 and len(lanes["dit"]) == 2 and len(lanes["ldm"]) >= 2  # dit: the README's, the recipe's
    with ThreadPoolExecutor(2) as pool:  # on two cores: LDM-4's lane beside the other two
        futures = [pool.submit(run_lane, lanes[lane], tmp_path / lane, fixtures) for lane in lanes]
        ran = sum(f.result() for f in futures)
    assert ran >= 45, ran
    metrics = {lane: list((tmp_path / lane).glob("out/*/samples/*/metrics.json")) for lane in lanes}
    assert len(metrics["embedded"]) >= 4 and len(metrics["dit"]) == 1 + 5 and len(metrics["ldm"]) >= 4, metrics  # dit: + the study's run
    for lane, results in (("embedded", "fashion-mnist"), ("dit", "imagefolder")):  # the study's report in each lane
        assert "| clean | " in (tmp_path / lane / "results" / results / "README.md").read_text()
