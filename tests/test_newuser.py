"""The path a new user walks: train.py's printed next steps run as printed, resuming from a numbered
checkpoint, files that keep the umask, config.json's effective values, and every bad input of that
walk as one `error:` line with exit status 2."""
import json
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import REPO, make_fake_fmnist, run_script, tree_snapshot  # noqa: E402

TINY = ["--model", "DiT-T/8", "--global-batch-size", "16", "--lr", "1e-3", "--warmup-steps", "0", "--lr-decay", "none"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fmnist")
    make_fake_fmnist(d, n=256)
    return d


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A tiny run trained under umask 027 with numbered checkpoints at 2 and 4 (last.pt at 5)."""
    out = tmp_path_factory.mktemp("out")
    cmd = [sys.executable, "train.py", *TINY, "--data-path", str(data), "--out-dir", str(out), "--max-steps", "5", "--ckpt-every", "2"]
    proc = subprocess.run(["bash", "-c", "umask 027 && " + shlex.join(cmd)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = [p for p in out.iterdir() if p.is_dir() and p.name != "data"]
    return out, run_dir, proc.stdout


def one_error_line(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_printed_next_steps_run_as_printed(trained, tmp_path):
    """train.py ends with the sample and evaluate commands of its own run; they work exactly as
    printed (only --num-samples made small)."""
    out, run_dir, stdout = trained
    commands = stdout.split("\nnext:\n", 1)[1].strip().splitlines()
    assert [c.split()[:2] for c in commands] == [["python", "sample.py"], ["python", "evaluate.py"]]
    assert f"--run {run_dir}" in commands[0] and str(run_dir / "samples" / "quick_cfg3") in commands[1]
    for cmd in commands:
        argv = shlex.split(cmd.replace("--num-samples 1000", "--num-samples 20"))
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (cmd, proc.stderr[-3000:])
    metrics = json.loads((run_dir / "samples" / "quick_cfg3" / "metrics.json").read_text())
    assert metrics["num_samples"] == 20 and 0 <= metrics["metrics"]["accuracy"] <= 1


def test_files_keep_the_umask_and_config_has_effective_values(trained):
    out, run_dir, _ = trained
    for path in (run_dir / "config.json", run_dir / "ckpt" / "last.pt", run_dir / "ckpt" / "0000002.pt", run_dir / "log.jsonl"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, (path, oct(path.stat().st_mode))
    config = json.loads((run_dir / "config.json").read_text())
    assert config["corrupt_type"] == "symmetric" and config["precision"] == "fp32"  # not null: the values used


@pytest.mark.slow  # CI time, ~15 s
def test_damaged_last_continues_from_the_newest_intact_checkpoint_exactly(trained, data, tmp_path):
    out, run_dir, _ = trained
    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    last = damaged / "ckpt" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    # --resume names the damaged file and continues from step 4: the same weights as the undamaged run's step 5
    proc = run_script("train.py", ["--out-dir", tmp_path, "--run-name", "damaged", "--resume"])
    assert f"{last} is unreadable; continuing from {damaged / 'ckpt' / '0000004.pt'}" in proc.stdout
    a = torch.load(run_dir / "ckpt" / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["step"] == b["step"] == 5
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # --resume-from a chosen checkpoint: the same again
    run_script("train.py", ["--resume-from", damaged / "ckpt" / "0000004.pt"])
    assert all(torch.equal(a["model"][k], v) for k, v in torch.load(last, weights_only=True)["model"].items())
    # no readable checkpoint at all: refused, nothing written
    for path in (damaged / "ckpt").iterdir():
        path.write_bytes(b"not a checkpoint")
    before = tree_snapshot(damaged)
    proc = run_script("train.py", ["--out-dir", tmp_path, "--run-name", "damaged", "--resume"], check=False)
    one_error_line(proc, "no checkpoint of", "is readable (3 damaged file(s) in ckpt/)")
    assert tree_snapshot(damaged) == before
    # a checkpoint of another run, or a file outside a ckpt/ folder
    proc = run_script("train.py", ["--resume-from", damaged / "ckpt" / "0000004.pt", "--out-dir", tmp_path, "--run-name", "x"], check=False)
    one_error_line(proc, "--resume-from", "not to --run x")
    proc = run_script("train.py", ["--resume-from", damaged / "config.json"], check=False)
    one_error_line(proc, "--resume-from", "ckpt/ folder")


@pytest.mark.parametrize("script, args, needles", [
    ("train.py", ["--out-dir", "{file}/out"], ["--out-dir", "is not a directory"]),
    # the README's 2-rank command after the run exists: checked before torchrun starts, so no torchrun failure report
    ("train.py", ["--nproc-per-node", "2", *TINY, "--out-dir", "{out}"], ["already holds a run; pass --resume"]),
    ("train.py", ["--nproc-per-node", "2", *TINY, "--out-dir", "{out}", "--global-batch-size", "15", "--run-name", "odd"],
     ["--global-batch-size 15 is not divisible by 2 ranks"]),
    ("corrupt_data.py", ["--corrupt", "0.1", "--out-dir", "{file}/out"], ["--out-dir"]),
    ("sample.py", ["--run", "{run}", "--num-samples", "0"], ["--num-samples must be positive, got 0"]),
    ("sample.py", ["--run", "{run}", "--batch-size", "-1"], ["--batch-size must be positive, got -1"]),
    ("sample.py", ["--run", "{run}", "--cfg-scale", "0.5"], ["--cfg-scale must be >= 1"]),
    ("sample.py", ["--run", "{run}", "--ddim-eta", "-1"], ["--ddim-eta must be >= 0, got -1"]),
    ("evaluate.py", ["--samples", "{run}/samples/quick_cfg3", "--cache-dir", "{file}/cache"], ["--cache-dir"]),
])
def test_bad_input_is_one_line_with_exit_2(trained, data, tmp_path, script, args, needles):
    out, run_dir, _ = trained
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    full = [a.format(file=blocker, run=run_dir, out=out) for a in args]
    if script in ("train.py", "corrupt_data.py"):
        full += ["--data-path", str(data)]
    before = tree_snapshot(out)
    one_error_line(run_script(script, full, check=False), *needles)
    assert tree_snapshot(out) == before


def test_sample_rerun_names_the_setting_that_differs(trained):
    out, run_dir, _ = trained
    common = ["--run", run_dir, "--num-samples", "4", "--steps", "2", "--tag", "rerun"]
    run_script("sample.py", common)
    one_error_line(run_script("sample.py", [*common, "--clip-denoised"], check=False), "clip_denoised False (now True)")


@pytest.mark.slow  # CI time (issue 31): its stage runs end to end in faster tests
def test_nproc_per_node_starts_the_ranks_with_torchrun(data, tmp_path):
    """python train.py --nproc-per-node 2 = torchrun --standalone --nproc_per_node=2 train.py: the same
    run (same weights, since the run does not depend on the number of ranks), two ranks."""
    common = [*TINY, "--data-path", data, "--out-dir", tmp_path, "--max-steps", "2"]
    proc = run_script("train.py", [*common, "--nproc-per-node", "2", "--run-name", "launched"])
    assert "2 rank(s) on cpu" in proc.stdout and "nproc_per_node" not in json.loads((tmp_path / "launched" / "config.json").read_text())
    run_script("train.py", [*common, "--run-name", "direct"], nproc=2)
    a, b = (torch.load(tmp_path / r / "ckpt" / "last.pt", weights_only=True)["model"] for r in ("launched", "direct"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # CI time, ~10 s: the one-process rerun is in CI
def test_rerunning_a_finished_run_is_not_an_error_under_torchrun_either(trained, data):
    """The developers' promise `torchrun train.py --corrupt 0.025 --cep`, run again after the run
    finished: 'done already' and the next commands, exit 0, nothing written, no torchrun failure
    report. The same command for a longer run, or with another setting, still refuses."""
    out, run_dir, _ = trained
    same = [*TINY, "--data-path", data, "--out-dir", out, "--max-steps", "5"]
    before = tree_snapshot(out)
    for nproc in (1, 2):
        proc = run_script("train.py", same, nproc=nproc)
        assert proc.stdout.count("done already:") == 1 and f"python sample.py --run {run_dir}" in proc.stdout, proc.stdout
        assert "ChildFailedError" not in proc.stderr, proc.stderr
    assert tree_snapshot(out) == before
    one_error_line(run_script("train.py", [*same[:-1], "6"], check=False), "already holds a run; pass --resume")
    one_error_line(run_script("train.py", [*same, "--lr", "2e-3"], check=False), "already holds a run; pass --resume")
