"""The operator's commands as docs/runs.md gives them, interrupted and run again (issue 44): each
SLURM job script of docs/jobs/ under a stand-in for the scheduler (tests/fake_slurm: srun and
scontrol), torchrun killed while a checkpoint is half written, then SIGTERM'd in the resumed run,
and finetune.py's job. Each ends bit-identical to the uninterrupted 2-rank run (model, EMA,
optimizer, scaler, every rank's RNG, log), with the exit statuses and status.json states the docs
give. The launcher's SIGTERM and rerun is tests/test_faults.py's."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers import REPO, STEPS, TINY, assert_same_run, load_last, run_script, wait_for  # noqa: E402
from tests.test_ranks import kill_all  # noqa: E402
from models import runs  # noqa: E402
from models.common import REQUEUE_EXIT  # noqa: E402

JOBS = REPO / "docs" / "jobs"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Scheduler:
    """A stand-in for SLURM on this machine. It starts a job script as sbatch does (the batch shell,
    in a session of its own, with the job's variables, srun and scontrol on its PATH), sends the
    signal the scripts ask for (#SBATCH --signal=B:USR1: USR1 to the batch shell) once the run has
    written a given file, and counts the job's `scontrol requeue` requests."""

    def __init__(self, tmp_path, nodes=1, gpus_per_node=2, env=None):
        self.requeues = tmp_path / "requeues"
        self.env = {**ENV, "PATH": f"{REPO / 'tests' / 'fake_slurm'}:{Path(sys.executable).parent}:{os.environ['PATH']}",
                    "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": f"node[1-{nodes}]", "SLURM_NNODES": str(nodes),
                    "SLURM_GPUS_ON_NODE": str(gpus_per_node), "FAKE_SLURM_REQUEUES": str(self.requeues),
                    "MASTER_PORT": str(free_port()), **(env or {})}

    def requests(self):
        return len(self.requeues.read_text().split()) if self.requeues.exists() else 0

    def start(self, script, args, signal_after=None):
        """One start of the job script: (exit status, output, whether it asked to be requeued)."""
        before = self.requests()
        proc = subprocess.Popen(["bash", str(script), *map(str, args)], cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        if signal_after is not None:
            wait_for(signal_after, proc)
            os.kill(proc.pid, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=600)
        return proc.returncode, out, self.requests() > before


def state(run_dir):
    return runs.read_status(run_dir)["state"]


@pytest.mark.parametrize("script, nodes, gpus", [
    ("one_node.sh", 1, 2),
    pytest.param("one_node_torchrun.sh", 1, 2, marks=pytest.mark.slow),  # ~40 s each: one job script runs in CI
    pytest.param("multi_node.sh", 2, 1, marks=pytest.mark.slow)])
def test_job_script_requeues_on_a_stop_and_on_nothing_else(fake_fmnist, straight, tmp_path, script, nodes, gpus):
    slurm, run = Scheduler(tmp_path, nodes, gpus), tmp_path / "out" / "r"
    job = [tmp_path / "out", "r", *TINY, *STEPS, "--data-path", fake_fmnist]
    # 1. the signal (the time limit is near, or the job is preempted): the run stops, the job asks to be requeued
    code, out, requeued = slurm.start(JOBS / script, job, signal_after=run / "ckpt" / "0000006.pt")
    step = load_last(run)["step"]
    assert requeued and state(run) == "stopped" and 6 <= step < 30, out[-3000:]
    assert code == (REQUEUE_EXIT if script == "one_node.sh" else 0), out[-3000:]  # torchrun's ranks exit 0 on a stop
    assert f"r: stopped (exit {code})" in out
    # 2. a start that fails before the run starts (here: flags that disagree with the run's) leaves status.json
    #    as it was, which this start did not write: no requeue
    code, out, requeued = slurm.start(JOBS / script, [*job, "--lr", "5e-4"])
    assert code != 0 and not requeued and state(run) == "stopped", out[-3000:]
    # 3. the requeued job: the same script again continues to the end, and asks for nothing
    code, out, requeued = slurm.start(JOBS / script, job)
    assert code == 0 and not requeued and state(run) == "finished", out[-3000:]
    assert f"resuming at step {step}" in out
    assert_same_run(straight, run)
    # 4. submitted once more: nothing to train, exit 0, no requeue, the run as it was
    code, out, requeued = slurm.start(JOBS / script, job)
    assert code == 0 and not requeued and state(run) == "finished" and "resuming at step 30" in out, out[-3000:]
    assert_same_run(straight, run)


@pytest.mark.slow  # ~60 s
def test_torchrun_killed_mid_checkpoint_then_sigterm_in_the_resumed_run(fake_fmnist, straight, tmp_path):
    """torchrun ... --resume: kill -9 of everything while the step-12 checkpoint is half written (the
    run resumes from step 6: the half-written file is never read); then, in the resumed run, SIGTERM
    to torchrun (the second interruption): status.json "stopped"; the same command again ends equal
    to the uninterrupted run."""
    run, marker = tmp_path / "r", tmp_path / "stalled"
    args = ["--", "train.py", "--resume", *TINY, *STEPS, "--data-path", str(fake_fmnist), "--out-dir", str(tmp_path), "--run-name", "r"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # checkpoints: 0000006.pt (write 1), last.pt (2), 0000012.pt (3: hangs half written)
    stalled = [*torchrun, "--", "tests/fault_injection.py", "stall", "3", "0", *args[1:]]
    proc = subprocess.Popen(stalled, cwd=REPO, env={**ENV, "STALL_MARKER": str(marker)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(marker, proc)
    kill_all(proc, str(tmp_path))
    assert state(run) == "running" and load_last(run)["step"] == 6  # a crash: nothing says "stopped"
    assert any(name.startswith(".tmp-0000012.pt") for name in os.listdir(run / "ckpt"))  # the half-written file
    proc = subprocess.Popen([*torchrun, *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(run / "ckpt" / "0000012.pt", proc)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it to the ranks
    out, _ = proc.communicate(timeout=300)
    assert "resuming at step 6" in out and state(run) == "stopped", out[-3000:]
    step = runs.read_status(run)["step"]
    assert 12 <= step < 30 and load_last(run)["step"] == step
    rerun = subprocess.run([*torchrun, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and f"resuming at step {step}" in rerun.stdout, rerun.stderr[-3000:]
    assert state(run) == "finished"
    assert_same_run(straight, run)


@pytest.mark.slow  # ~50 s
def test_finetune_job_requeues_and_ends_identical(fake_fmnist, straight, tmp_path):
    """finetune.py under the one-node job script (STAGE=finetune.py), signalled and requeued, against
    the same fine-tuning uninterrupted."""
    ft = ["--init", straight, "--method", "controlnet", "--control", "canny", "--global-batch-size", "8", "--max-steps", "16",
          "--ckpt-every", "4", "--log-every", "2", "--val-size", "12", "--lr", "1e-3", "--data-path", fake_fmnist]
    run_script("finetune.py", [*ft, "--out-dir", tmp_path / "straight", "--run-name", "r"], nproc=2)
    slurm, run = Scheduler(tmp_path, env={"STAGE": "finetune.py"}), tmp_path / "out" / "r"
    code, out, requeued = slurm.start(JOBS / "one_node.sh", [tmp_path / "out", "r", *ft], signal_after=run / "ckpt" / "0000004.pt")
    assert code == REQUEUE_EXIT and requeued and state(run) == "stopped", out[-3000:]
    code, out, requeued = slurm.start(JOBS / "one_node.sh", [tmp_path / "out", "r", *ft])
    assert code == 0 and not requeued and state(run) == "finished" and "resuming at step" in out, out[-3000:]
    assert_same_run(tmp_path / "straight" / "r", run)


def test_docs_show_each_job_script_as_the_file_the_tests_run():
    """docs/runs.md shows every script of docs/jobs/ in full, each under its path, byte for byte."""
    import re
    text = (REPO / "docs" / "runs.md").read_text()
    shown = dict(re.findall(r"^`(docs/jobs/[\w.]+)`, .*?^```sh\n(.*?)^```", text, flags=re.S | re.M))
    assert sorted(shown) == sorted(f"docs/jobs/{p.name}" for p in JOBS.glob("*.sh")) and len(shown) == 4
    for path, body in shown.items():
        assert body == (REPO / path).read_text(), path


def test_resume_restores_only_the_run_s_own_flags(fake_fmnist, tmp_path):
    """The launcher's check mode (and any value a caller sets) survives --resume: resolve_run takes
    back the flags config.json holds, and nothing else, whatever the parser's defaults."""
    import train
    run_script("train.py", [*TINY, "--max-steps", "2", "--data-path", fake_fmnist, "--out-dir", tmp_path, "--run-name", "r"])
    parser = train.get_parser()
    argv = ["train.py", "--resume", "--out-dir", str(tmp_path), "--run-name", "r", "--max-steps", "4"]
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    old, sys.argv = sys.argv, argv
    try:
        args = parser.parse_args(argv[1:])
        args.dry_run, args.nproc_per_node = True, 2  # what the launcher's check sets
        run_dir, ckpt = train.resolve_run(args, parser)
    finally:
        sys.argv = old
    assert (args.dry_run, args.nproc_per_node, args.max_steps) == (True, 2, 4) and ckpt["step"] == 2
    assert all(getattr(args, k) == v for k, v in saved.items() if k != "max_steps")
