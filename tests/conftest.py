"""Session set-up: evaluate.py's shared classifier / feature cache goes to a temporary folder (never
the user's ~/.cache), shared by every test of the session (the fake datasets are identical, so the
feature classifier is trained once)."""
import os
import tempfile

import pytest


def pytest_configure(config):
    os.environ.setdefault("SLIGHT_CORRUPTION_CACHE", tempfile.mkdtemp(prefix="slight-corruption-cache-"))


@pytest.fixture(scope="session")
def fake_fmnist(tmp_path_factory):
    """A 256-image synthetic Fashion-MNIST in IDX files (tests/helpers.make_fake_fmnist), shared by the session."""
    from tests.helpers import make_fake_fmnist
    folder = tmp_path_factory.mktemp("fake-fmnist")
    make_fake_fmnist(folder, n=256)
    return folder


@pytest.fixture(scope="session")
def straight(fake_fmnist, tmp_path_factory):
    """The uninterrupted 2-rank run (tests/helpers.TINY, STEPS) every interrupted one must end equal to
    (tests/test_faults.py, tests/test_operator.py)."""
    from tests.helpers import STEPS, TINY, run_script
    out = tmp_path_factory.mktemp("straight")
    run_script("train.py", [*TINY, *STEPS, "--data-path", fake_fmnist, "--out-dir", out, "--run", "r"], nproc=2)
    return out / "r"
