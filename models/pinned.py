"""Running a grid's pinned code: a git worktree of the commit its protocol fixed, and each run's
provenance (the commit, and the CPU and builds of every segment that ran; float results are
bit-identical only on the same CPU type and build)."""
import json
import os
import platform
import subprocess
import time

import torch

from models.common import UsageError, atomic_write_json


def pinned_worktree(commit, repo, root=None):
    """The git worktree of `commit` at <root>/<commit[:7]> (root: <repo>/.pinned), made on first use;
    refused if its checkout is at another commit or has changes."""
    path = os.path.join(root or os.path.join(repo, ".pinned"), commit[:7])

    def git(*cmd, cwd=repo):
        return subprocess.run(["git", "-C", cwd, *cmd], capture_output=True, text=True)
    if not os.path.isdir(path):
        git("worktree", "prune")
        made = git("worktree", "add", "--detach", path, commit)
        if made.returncode != 0:
            raise UsageError(f"cannot make a git worktree of the pinned commit {commit[:7]} at {path} ({made.stderr.strip().splitlines()[-1:]}): "
                             "the converged grid runs its pinned code, which needs a git clone of the repository with its history")
    head, changes = git("rev-parse", "HEAD", cwd=path).stdout.strip(), git("status", "--porcelain", "--untracked-files=no", cwd=path).stdout
    if head != commit or changes.strip():
        raise UsageError(f"{path} is not a clean checkout of {commit[:7]} (HEAD {head[:7] or '?'}{', changed files' if changes.strip() else ''}): "
                         "remove it (git worktree remove --force) and rerun, study.py makes it again")
    return path


def machine():
    """The CPU and builds a run segment executed on."""
    cpu, flags = platform.processor() or platform.machine(), set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        cpu, flags = info.get("model name", cpu), set(info.get("flags", "").split())
    return {"cpu": cpu, "avx512": "avx512f" in flags, "torch": torch.__version__, "python": platform.python_version()}


def record_provenance(out_dir, run, commit, what, from_step):
    """Append one segment (what ran, from which training step, on which machine) to the run's
    provenance file, <out_dir>/<run>.provenance.json beside the run's folder (train.py owns the
    folder); study.py copies it with the run's small files as provenance.json."""
    path = os.path.join(out_dir, f"{run}.provenance.json")
    prov = {"commit": commit, "segments": []}
    if os.path.exists(path):
        with open(path) as f:
            prov = json.load(f)
    prov["segments"].append({"what": what, "from_step": from_step, **machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_json(path, prov)
