"""finetune.py and models/adapters.py: zero-init equality with the base, frozen base weights,
resume, the class-table resize, controls (Canny cache, segmentation folders), sample.py --control,
evaluate.py's control fidelity, and the bad-input errors."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.adapters import Adapted, resize_class_table  # noqa: E402
from models.build import build_model  # noqa: E402
from models.controls import canny, control_maps  # noqa: E402
from models.data import load_dataset  # noqa: E402
from models.text import build_text_encoder  # noqa: E402
from tests.helpers import make_fake_fmnist, run_script, tree_snapshot  # noqa: E402

CAPTIONS = ["a photo of a bag", "a sandal", "a dress on a dark background"]


def perturbed(model, seed=0):
    """A base whose zero-initialised layers are not zero (a pre-trained model's are not)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def base_model(name, text=False, in_channels=1, input_size=32):
    torch.manual_seed(0)
    config = dict(input_size=input_size, in_channels=in_channels, num_classes=10, class_dropout=0.1, learn_sigma=True)
    if text:
        encoder = build_text_encoder("scratch", captions=CAPTIONS, max_length=8)
        return perturbed(build_model(name, text_encoder=encoder, **config)).eval()
    return perturbed(build_model(name, **config)).eval()


def inputs(model, text, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    if text:
        tok = model.tokenize([CAPTIONS[i % 3] for i in range(n)])
        cond = (tok["input_ids"], tok["attention_mask"])
        delta = 0.1 * torch.randn(n, tok["input_ids"].shape[1], model.cond_dim, generator=g)
    else:
        cond = (torch.randint(0, 11, (n,), generator=g),)
        delta = 0.1 * torch.randn(n, model.cond_dim, generator=g)
    return x, t, cond, delta


CASES = [("DiT-T/4", "controlnet", False, 1), ("DiT-T/4", "t2i-adapter", False, 1), ("UNet-T", "controlnet", False, 1),
         ("UNet-T", "t2i-adapter", False, 1), ("DiT-T/4", "controlnet", True, 1), ("UNet-T", "t2i-adapter", True, 1),
         ("DiT-T/4", "controlnet", False, 4), ("UNet-T", "controlnet", False, 4)]


@pytest.mark.parametrize("name, method, text, factor", CASES)
def test_adapted_model_equals_base_at_init_and_then_follows_the_control(name, method, text, factor):
    """Zero-initialised joins: exactly the base's output at step 0 (with CEP δ too) for random
    inputs and controls; after a few adapter steps the output depends on the control, and the base
    is untouched. factor 4: control images at 4x the model's grid (a latent model's)."""
    base = base_model(name, text)
    model = Adapted(base, method, "canny", 1, 32 * factor)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    x, t, cond, delta = inputs(model, text)
    control = (torch.rand(4, 1, 32 * factor, 32 * factor) < 0.2).float()
    with torch.no_grad():
        assert torch.equal(model(x, t, *cond, cond_noise=delta, control=control), base(x, t, *cond, cond_noise=delta))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    assert all(not p.requires_grad for p in base.parameters()) and all(p.requires_grad for p in model.adapter.parameters())
    for _ in range(3):  # teach it anything that needs the control: output ~ control's mean
        out = model(x, t, *cond, control=control)
        loss = (out - control.mean((1, 2, 3)).view(-1, 1, 1, 1)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        a, b = model(x, t, *cond, control=control), model(x, t, *cond, control=torch.zeros_like(control))
        assert (a - base(x, t, *cond)).abs().max() > 1e-4 and (a - b).abs().max() > 1e-6
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_adapter_options_and_errors():
    dit, unet = base_model("DiT-T/4"), base_model("UNet-T")
    assert len(Adapted(dit, "controlnet", "canny", 1, 32).adapter.blocks) == len(dit.blocks) // 2
    assert len(Adapted(dit, "controlnet", "canny", 1, 32, num_blocks=2).adapter.blocks) == 2
    assert len(dit.blocks) == 6 and Adapted(dit, "t2i-adapter", "canny", 1, 32, num_blocks=2).adapter.targets == [0, 2]
    assert Adapted(dit, "t2i-adapter", "canny", 1, 32).adapter.targets == [0, 1, 2]
    assert Adapted(unet, "t2i-adapter", "seg", 3, 32).adapter.targets == unet.level_ends == [1, 3]
    with pytest.raises(ValueError, match="copies"):
        Adapted(dit, "controlnet", "canny", 1, 32, num_blocks=len(dit.blocks))
    with pytest.raises(ValueError, match="power of 2"):
        Adapted(unet, "controlnet", "canny", 1, 48)
    with pytest.raises(ValueError, match="DiT option"):
        Adapted(unet, "controlnet", "canny", 1, 32, num_blocks=2)
    with pytest.raises(ValueError, match="control="):
        Adapted(unet, "controlnet", "canny", 1, 32)(*inputs(unet, False)[:2], torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("name", ["DiT-T/4", "UNet-T"])
def test_resize_class_table_keeps_everything_but_the_classes(name):
    model = base_model(name)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    resize_class_table(model, 3, torch.Generator().manual_seed(0))
    table = model.y_embedder.embedding_table.weight
    assert table.shape[0] == 4 and model.num_classes == 3
    assert torch.equal(table[3], old["y_embedder.embedding_table.weight"][10])  # the null row carries over
    for k, v in model.state_dict().items():
        if "y_embedder" not in k:
            assert torch.equal(v, old[k]), k
    x, t, _, _ = inputs(model, False)
    assert torch.isfinite(model(x, t, torch.tensor([0, 1, 2, 3]))).all()


def test_control_cache_is_the_canny_of_the_images(tmp_path):
    make_fake_fmnist(tmp_path / "data", n=64)
    ds = load_dataset("fashion-mnist", str(tmp_path / "data"), split="test")
    maps = control_maps("canny", ds, str(tmp_path / "c.npy"), low=50, high=120)
    assert maps.shape == (16, 1, 32, 32) and maps.max() == 255
    assert np.array_equal(np.asarray(maps), canny(ds.images, 50, 120).numpy())
    assert (tmp_path / "c.npy").exists() and not list(tmp_path.glob("*.tmp*"))


# ------------------------------------------------------------------------------ the scripts end to end

@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A DiT and a U-Net pre-trained for a few steps on a fake Fashion-MNIST."""
    root = tmp_path_factory.mktemp("ft")
    make_fake_fmnist(root / "data", n=256)
    out = root / "out"
    for run, model in (("dit", "DiT-T/8"), ("unet", "UNet-T")):
        run_script("train.py", ["--data-path", root / "data", "--out-dir", out, "--run", run, "--model", model,
                                "--global-batch-size", "16", "--lr", "1e-3", "--max-steps", "4", "--log-every", "2"])
    return root, out


FT = ["--global-batch-size", "8", "--max-steps", "4", "--log-every", "2", "--val-size", "12", "--lr", "1e-3"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow  # CI time (~40 s): CI's end-to-end finetune is tests/test_latents.py::test_finetune_controlnet_on_latents
@pytest.mark.parametrize("base, method", [("dit", "controlnet"), ("unet", "t2i-adapter")])
def test_finetune_trains_only_the_adapter_then_samples_and_evaluates(pretrained, base, method):
    root, out = pretrained
    run = f"{base}-{method}"
    run_script("finetune.py", ["--init", out / base, "--method", method, "--control", "canny", "--out-dir", out,
                               "--run", run, "--cep", *FT])
    init, ckpt = load(out / base / "ckpt" / "last.pt"), load(out / run / "ckpt" / "last.pt")
    assert ckpt["model_config"]["adapter"]["method"] == method and ckpt["config"]["cep"]
    for k, v in init["ema"].items():  # the base is the pre-trained EMA, bit for bit, in both weight sets
        assert torch.equal(ckpt["model"]["base." + k], v) and torch.equal(ckpt["ema"]["base." + k], v), k
    adapter = [k for k in ckpt["model"] if k.startswith("adapter.")]
    assert adapter and any(not torch.equal(ckpt["model"][k], ckpt["ema"][k]) or ckpt["model"][k].abs().sum() > 0 for k in adapter)
    zero_joins = [k for k in adapter if ("zero" in k or "outs" in k) and k.endswith("weight")]
    assert zero_joins and all(ckpt["model"][k].abs().max() > 0 for k in zero_joins)  # they have moved off zero
    controls = out / run / "controls"
    meta = json.loads((controls / "control.json").read_text())
    assert meta["control"] == "canny" and len(meta["rows"]) == 12 and len(list(controls.glob("*/*.png"))) == 12
    ref = np.load(controls / "reference.npz")
    assert ref["arr_0"].shape == (12, 32, 32, 1)
    # the held-out maps are the Canny maps of the held-out images
    first = sorted(controls.glob("*/*.png"))[0]
    row = int(first.stem)
    assert np.array_equal(np.asarray(Image.open(first)), canny(load_dataset("fashion-mnist", str(root / "data"), split="test").images[row:row + 1])[0, 0].numpy())
    run_script("sample.py", ["--run", out / run, "--control", controls, "--num-samples", "12", "--batch-size", "6",
                             "--steps", "3", "--tag", "s"])
    samples = out / run / "samples" / "s"
    got = np.load(samples / "controls.npz")
    labels = np.load(samples / "samples.npz")["arr_1"]
    assert np.array_equal(labels, got["arr_1"]) and np.array_equal(np.sort(labels), np.sort(ref["arr_1"]))  # each control's class
    k = len(set(labels.tolist()))
    assert len(set(labels[:k].tolist())) == k  # classes interleaved: a prefix is class-balanced
    run_script("evaluate.py", ["--samples", samples, "--ref", controls / "reference.npz"])
    metrics = json.loads((samples / "metrics.json").read_text())["metrics"]
    assert 0 <= metrics["control_f1"] <= 1 and np.isfinite(metrics["fid_fmnist"])


@pytest.mark.slow  # the default suite's time (README); run with -m slow
def test_control_f1_scores_the_requested_edges(pretrained, tmp_path):
    """evaluate.py's control fidelity on hand-made samples: images whose own Canny maps are the
    controls score 1; the same images against shuffled controls score lower."""
    root, out = pretrained
    images = load_dataset("fashion-mnist", str(root / "data"), split="test").images[:12]
    edges = canny(images)
    for name, controls in (("same", edges), ("shuffled", edges.roll(1, 0))):
        folder = tmp_path / name
        folder.mkdir()
        np.savez(folder / "samples.npz", arr_0=images.permute(0, 2, 3, 1).numpy(), arr_1=np.zeros(12, dtype=np.int64))
        np.savez(folder / "controls.npz", arr_0=controls.permute(0, 2, 3, 1).numpy())
        config = {"model_config": {"adapter": {"control": "canny"}}, "run_config": {"dataset": "fashion-mnist", "data_path": str(root / "data")}}
        (folder / "sample_config.json").write_text(json.dumps(config))
        run_script("evaluate.py", ["--samples", folder, "--out-dir", out, "--ref", folder / "samples.npz"])
    same = json.loads((tmp_path / "same" / "metrics.json").read_text())["metrics"]["control_f1"]
    shuffled = json.loads((tmp_path / "shuffled" / "metrics.json").read_text())["metrics"]["control_f1"]
    assert same == 1.0 and shuffled < 0.9
    chance = json.loads((tmp_path / "same" / "metrics.json").read_text())["metrics"]["control_f1_chance"]
    assert chance == pytest.approx(shuffled, abs=1e-6)  # images vs the next one's control: the shuffled case


@pytest.mark.slow  # train.py's exact resume is in the default suite; ~50 s
def test_finetune_resume_is_exact(pretrained):
    root, out = pretrained
    args = ["--init", out / "dit", "--method", "t2i-adapter", "--control", "canny", "--out-dir", out, "--cep",
            "--cep-type", "gaussian", "--global-batch-size", "8", "--log-every", "1", "--val-size", "12", "--lr", "1e-3"]
    run_script("finetune.py", [*args, "--run", "straight", "--max-steps", "4"])
    run_script("finetune.py", [*args, "--run", "halves", "--max-steps", "2"])
    run_script("finetune.py", ["--resume", "--run", "halves", "--out-dir", out, "--max-steps", "4"])
    a, b = load(out / "straight" / "ckpt" / "last.pt"), load(out / "halves" / "ckpt" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]) and torch.equal(a["ema"][k], b["ema"][k]), k
    log = lambda r: [json.loads(line)["loss"] for line in (out / r / "log.jsonl").read_text().splitlines()]  # noqa: E731
    assert log("straight") == log("halves")


@pytest.mark.slow  # the default suite's time (README); run with -m slow
def test_two_ranks_match_one(pretrained):
    """train.py's DDP loop under finetune.py: the global batch is split over 2 gloo ranks, the
    control cache is built by rank 0 only, and the adapter ends where the 1-rank run ends."""
    root, out = pretrained
    args = ["--init", out / "unet", "--method", "controlnet", "--control", "canny", "--canny-low", "60", "--out-dir", out,
            "--cep", "--global-batch-size", "8", "--log-every", "2", "--val-size", "12", "--lr", "1e-3", "--max-steps", "3"]
    run_script("finetune.py", [*args, "--run", "one"])
    run_script("finetune.py", [*args, "--run", "two"], nproc=2)
    a, b = load(out / "one" / "ckpt" / "last.pt"), load(out / "two" / "ckpt" / "last.pt")
    assert max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]) < 1e-4
    assert all(a["model"][k].abs().max() > 0 for k in a["model"] if k.startswith("adapter.zero") and k.endswith("weight"))


@pytest.mark.slow  # the default suite's time (README); run with -m slow
def test_text_model_controlnet_samples_each_control_with_its_caption(tmp_path):
    make_fake_fmnist(tmp_path / "data", n=128)
    out = tmp_path / "out"
    run_script("train.py", ["--dataset", "fashion-mnist-captions", "--data-path", tmp_path / "data", "--out-dir", out,
                            "--run", "text", "--global-batch-size", "8", "--max-steps", "2", "--log-every", "1"])
    run_script("finetune.py", ["--init", out / "text", "--method", "controlnet", "--control", "canny", "--out-dir", out,
                               "--run", "tcn", "--cep", *FT, "--val-size", "6"])
    meta = json.loads((out / "tcn" / "controls" / "control.json").read_text())
    run_script("sample.py", ["--run", out / "tcn", "--control", out / "tcn" / "controls", "--num-samples", "6",
                             "--steps", "2", "--tag", "s"])
    prompts = (out / "tcn" / "samples" / "s" / "prompts.txt").read_text().splitlines()
    files = sorted((out / "tcn" / "controls").glob("*/*.png"), key=lambda p: (int(p.parent.name), p.name))
    rank = {p: sum(q.parent == p.parent for q in files[:i]) for i, p in enumerate(files)}
    files.sort(key=lambda p: (rank[p], int(p.parent.name)))  # classes interleaved
    caption_of = dict(zip(meta["rows"], meta["captions"]))
    assert prompts == [caption_of[int(p.stem)] for p in files]
    got = np.load(out / "tcn" / "samples" / "s" / "controls.npz")["arr_0"][..., 0]
    assert all(np.array_equal(g, np.asarray(Image.open(p))) for g, p in zip(got, files))


@pytest.mark.slow  # CI time (issue 31): its stage runs end to end in faster tests
def test_full_finetune_on_a_new_class_set(pretrained, tmp_path):
    root, out = pretrained
    classes = tmp_path / "shoes.txt"
    classes.write_text("Sandal\nSneaker\n9\n")
    run_script("finetune.py", ["--init", out / "unet", "--method", "full", "--classes", classes, "--out-dir", out,
                               "--run", "full", *FT, "--val-size", "6"])
    init, ckpt = load(out / "unet" / "ckpt" / "last.pt"), load(out / "full" / "ckpt" / "last.pt")
    assert ckpt["model_config"]["num_classes"] == 3 and "adapter" not in ckpt["model_config"]
    assert ckpt["model"]["y_embedder.embedding_table.weight"].shape[0] == 4
    changed = [k for k, v in init["ema"].items() if "y_embedder" not in k and not torch.equal(ckpt["model"][k], v)]
    assert len(changed) > len(init["ema"]) // 2  # everything trains
    ref = np.load(out / "full" / "controls" / "reference.npz")
    assert set(ref["arr_1"].tolist()) <= {0, 1, 2}  # held-out images, labelled in the new class set
    run_script("sample.py", ["--run", out / "full", "--num-samples", "6", "--steps", "2", "--tag", "s"])
    assert set(np.load(out / "full" / "samples" / "s" / "samples.npz")["arr_1"].tolist()) == {0, 1, 2}
    run_script("evaluate.py", ["--samples", out / "full" / "samples" / "s", "--ref", out / "full" / "controls" / "reference.npz"])


def make_seg_folder(root, data_dir, count):
    """Fake SAM output for the fake test split: each image's bright bar painted in a colour."""
    images = load_dataset("fashion-mnist", str(data_dir), split="test").images
    folder = root / "seg" / "test"
    folder.mkdir(parents=True)
    for i in range(count):
        arr = np.zeros((28, 28, 3), dtype=np.uint8)
        arr[images[i, 0, 2:30, 2:30].numpy() > 128] = (200, 40, 90)
        Image.fromarray(arr).save(folder / f"{i:05d}.png")
    return root / "seg"


@pytest.mark.slow  # the default suite's time (README); run with -m slow
def test_segmentation_controls_and_bad_input(pretrained, tmp_path):
    root, out = pretrained
    seg = make_seg_folder(tmp_path, root / "data", 64)
    run_script("finetune.py", ["--init", out / "dit", "--method", "controlnet", "--control", "seg", "--control-path", seg,
                               "--out-dir", out, "--run", "seg", *FT])
    ckpt = load(out / "seg" / "ckpt" / "last.pt")
    assert ckpt["model_config"]["adapter"]["control_channels"] == 3
    png = sorted((out / "seg" / "controls").glob("*/*.png"))[0]
    want = np.asarray(Image.open(seg / "test" / f"{int(png.stem):05d}.png").resize((32, 32), Image.NEAREST))
    assert np.array_equal(np.asarray(Image.open(png)), want)  # 28 -> 32 by nearest neighbours: no blended colours
    before = tree_snapshot(out)
    (seg / "test" / "00007.png").unlink()
    bad = [
        (["--init", out / "dit", "--method", "controlnet", "--control", "seg", "--control-path", seg, "--run", "x"], "no segmentation map"),
        (["--init", out / "dit", "--model", "UNet-T", "--method", "controlnet", "--control", "canny"], "holds a model with --model DiT-T/8"),
        (["--init", out / "seg", "--method", "controlnet", "--control", "canny"], "already an adapted model"),
        (["--init", root / "data" / "train-labels-idx1-ubyte.gz", "--method", "full"], "not a checkpoint"),
        (["--init", out / "nothing", "--method", "full"], "no checkpoint"),
        (["--init", out / "dit", "--method", "controlnet"], "needs --control"),
        (["--init", out / "dit", "--method", "full", "--control", "canny"], "no control input"),
        (["--init", out / "dit", "--method", "controlnet", "--control", "canny", "--corrupt", "1.5"], "--corrupt must be in"),
        (["--init", out / "dit", "--method", "controlnet", "--control", "canny", "--run", "seg"], "already holds a run"),
        (["--method", "controlnet", "--control", "canny"], "pass --init"),
    ]
    for args, message in bad:
        proc = run_script("finetune.py", [*args, "--out-dir", out, *FT], check=False)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, (args, proc.stderr)
    # sampling: controls of another kind, or none, or for a model that was not adapted
    canny_dir = tmp_path / "edges"
    (canny_dir / "0").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(canny_dir / "0" / "a.png")
    (canny_dir / "control.json").write_text(json.dumps({"control": "canny"}))
    for args, message in (([ "--run", out / "seg", "--control", canny_dir], "adapted to seg control"),
                          (["--run", out / "seg"], "pass --control"),
                          (["--run", out / "dit", "--control", canny_dir], "not an adapted model")):
        proc = run_script("sample.py", [*args, "--num-samples", "2", "--steps", "2"], check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    assert tree_snapshot(out) == before  # nothing written or lost


@pytest.mark.slow  # the default suite's time (README); run with -m slow
def test_init_without_null_class_needs_no_label_dropout(pretrained):
    root, out = pretrained
    run_script("train.py", ["--data-path", root / "data", "--out-dir", out, "--run", "nodrop", "--model", "DiT-T/8",
                            "--class-dropout", "0", "--global-batch-size", "16", "--max-steps", "1"])
    proc = run_script("finetune.py", ["--init", out / "nodrop", "--method", "t2i-adapter", "--control", "canny",
                                      "--out-dir", out, "--run", "nd", *FT], check=False)
    assert proc.returncode == 2 and "pass --class-dropout 0" in proc.stderr and not (out / "nd").exists()
    run_script("finetune.py", ["--init", out / "nodrop", "--method", "t2i-adapter", "--control", "canny", "--class-dropout", "0",
                               "--out-dir", out, "--run", "nd", *FT])
    run_script("sample.py", ["--run", out / "nd", "--control", out / "nd" / "controls", "--cfg-scale", "1",
                             "--num-samples", "2", "--steps", "2"])


@pytest.mark.slow  # the default suite's time (README); run with -m slow
def test_imagefolder_subset_with_canny_and_seg_controls(tmp_path):
    """The IN-100 path in miniature: an ImageFolder, a class-list file picking 2 of its 3 class
    folders (labels keep the pre-trained ids), images decoded by DataLoader workers with their
    controls (random flips flip both), Canny and mirrored segmentation folders."""
    rng = np.random.default_rng(0)
    data, seg = tmp_path / "imgs", tmp_path / "seg"
    for k, name in enumerate(["n001", "n002", "n003"]):
        (data / name).mkdir(parents=True)
        (seg / name).mkdir(parents=True)
        for i in range(12):
            arr = rng.integers(0, 40, (40, 48, 3)).astype(np.uint8)
            arr[8 + 6 * k: 20 + 6 * k, 10:38] = 200
            Image.fromarray(arr).save(data / name / f"img{i}.jpg" if i % 2 else data / name / f"img{i}.png")
            Image.fromarray(np.where(arr > 100, 255, 0).astype(np.uint8)).save(seg / name / f"img{i}.png")
    out = tmp_path / "out"
    common = ["--dataset", "imagefolder", "--data-path", data, "--image-size", "32", "--out-dir", out,
              "--global-batch-size", "8", "--log-every", "1", "--num-workers", "2"]
    run_script("train.py", [*common, "--run", "base", "--model", "DiT-T/8", "--max-steps", "2"])
    (tmp_path / "in2.txt").write_text("n001\nn003\n")
    for control in ("canny", "seg"):
        run_script("finetune.py", [*common, "--init", out / "base", "--method", "controlnet", "--control", control,
                                   "--control-path", seg, "--classes", tmp_path / "in2.txt", "--val-size", "4",
                                   "--max-steps", "3", "--run", control])
        ref = np.load(out / control / "controls" / "reference.npz")
        assert ref["arr_0"].shape == (4, 32, 32, 3) and set(ref["arr_1"].tolist()) <= {0, 2}  # IN-1K-style ids kept
        maps = sorted((out / control / "controls").glob("*/*.png"))
        assert {p.parent.name for p in maps} <= {"0", "2"} and len(maps) == 4
        first = np.asarray(Image.open(maps[0]))
        assert first.shape == ((32, 32) if control == "canny" else (32, 32, 3)) and set(np.unique(first)) <= {0, 255}
        run_script("sample.py", ["--run", out / control, "--control", out / control / "controls", "--num-samples", "4",
                                 "--steps", "2", "--tag", "s"])
        assert np.load(out / control / "samples" / "s" / "samples.npz")["arr_0"].shape == (4, 32, 32, 3)
    (tmp_path / "bad.txt").write_text("n001\nn999\n")
    proc = run_script("finetune.py", [*common, "--init", out / "base", "--method", "controlnet", "--control", "canny",
                                      "--classes", tmp_path / "bad.txt", "--run", "bad"], check=False)
    assert proc.returncode == 2 and "unknown class(es), e.g. 'n999'" in proc.stderr


@pytest.mark.slow  # the default suite's time (README); run with -m slow
def test_corrupt_data_prebuilds_the_control_cache_finetune_reads(tmp_path):
    make_fake_fmnist(tmp_path / "data", n=64)
    out = tmp_path / "out"
    seg = tmp_path / "seg"
    proc = run_script("corrupt_data.py", ["--data-path", tmp_path / "data", "--out-dir", out, "--control", "seg",
                                          "--control-path", seg], check=False)
    assert proc.returncode == 2 and "segmentation" in proc.stderr and not out.exists()
    run_script("corrupt_data.py", ["--data-path", tmp_path / "data", "--out-dir", out, "--control", "canny", "--canny-low", "30"])
    cache = out / "data" / "fashion-mnist" / "control-canny30-200-32.npy"
    ds = load_dataset("fashion-mnist", str(tmp_path / "data"))
    assert np.array_equal(np.load(cache), canny(ds.images, 30, 200).numpy())
    np.save(cache, np.zeros((64, 1, 32, 32), dtype=np.uint8))  # finetune.py must read this cache, not recompute it
    run_script("train.py", ["--data-path", tmp_path / "data", "--out-dir", out, "--run", "b", "--model", "DiT-T/8",
                            "--global-batch-size", "8", "--max-steps", "1"])
    run_script("finetune.py", ["--init", out / "b", "--split", "train", "--method", "controlnet", "--control", "canny",
                               "--canny-low", "30", "--out-dir", out, "--run", "c", *FT])
    assert all(np.asarray(Image.open(p)).max() == 0 for p in (out / "c" / "controls").glob("*/*.png"))


def test_control_data_flips_the_map_with_the_image(tmp_path):
    """ControlData gives ((image, control), index); a flipped example (a file dataset's (i, True)
    key, or get_batch's flips for in-memory data) gets the mirrored control map."""
    from models.controls import ControlData
    from models.data import ImageFolderData, SubsetData
    rng = np.random.default_rng(1)
    for k in range(2):
        (tmp_path / "imgs" / f"c{k}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)).save(tmp_path / "imgs" / f"c{k}" / f"{i}.png")
    folder = ImageFolderData(str(tmp_path / "imgs"), 32)
    maps = np.arange(6 * 32 * 32, dtype=np.int64).reshape(6, 1, 32, 32).astype(np.uint8)
    data = ControlData(SubsetData(folder, [1, 4, 5]), maps, [1, 4, 5])
    (x, c), i = data[(1, True)]
    assert i == 1 and torch.equal(x, folder[(4, True)][0]) and torch.equal(c, torch.from_numpy(maps[4]).flip(-1).float() / 255)
    (x, c), _ = data[2]
    assert torch.equal(x, folder[5][0]) and torch.equal(c, torch.from_numpy(maps[5]).float() / 255)
    make_fake_fmnist(tmp_path / "data", n=32)
    fm = load_dataset("fashion-mnist", str(tmp_path / "data"))
    x, c = ControlData(fm, maps.repeat(6, 0)[:32]).get_batch(torch.tensor([3, 7]), torch.tensor([True, False]))
    assert torch.equal(x, fm.get_batch(torch.tensor([3, 7])))  # Fashion-MNIST is never flipped: nor are its maps
    assert torch.equal(c, torch.from_numpy(maps.repeat(6, 0)[[3, 7]]).float() / 255)
