"""models.metrics.top_pr against the authors' TopP&R package (Kim et al., NeurIPS 2023; PyPI
`top-pr`, a test-only dependency installed by .ci/run), on 64-d Gaussian feature sets of 1000 points.

The package's randomness is fixed: a Xavier-normal 64 → 32 projection drawn after
torch.manual_seed(99), applied in float32, then bootstraps drawn by np.random.choice after
np.random.seed(42), real set first. Two checks per pair:
- same draws, same numbers: top_pr given the package's projected features and seed=42 (so it
  projects nothing and its RandomState(42) makes the package's resamples) returns the package's
  precision, recall and F1;
- our own projection and resamples (seed 0) agree within the package's own noise."""
import math
import pathlib
import random
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np
import pytest
import torch

from models import metrics

top_pr_package = pytest.importorskip("top_pr")

N, D = 1000, 64

# Standard deviation of the package's (precision, recall, F1) over its randomness, measured on these
# pairs: 12 runs, each on the features times a fresh Gaussian 64 × 32 Xavier-scale matrix (what its
# projection is) after np.random.seed(s) (its bootstrap RNG). top_pr over 30 seeds gave the same
# spread (e.g. same 0.021 / 0.025 / 0.008, shrunk recall 0.024). The precision of `shrunk` is 1.0
# and `disjoint` is 0.0 in every run.
SD = {"same": (0.020, 0.026, 0.008), "shift": (0.035, 0.044, 0.025), "mode_drop": (0.006, 0.034, 0.029),
      "shrunk": (0.0, 0.023, 0.034), "disjoint": (0.0, 0.0, 0.0)}


def pairs():
    """(real, fake) pairs, seeded: the same distribution; every mean shifted by 0.3; real a mixture of
    two modes at ±4 e_1, fake only the +4 e_1 one; half the fake points shrunk to 0.3× the spread;
    fake 50 away in every coordinate."""
    rng = np.random.default_rng(30)
    x, y = rng.standard_normal((N, D)), rng.standard_normal((N, D))
    e1 = np.eye(D)[0]
    modes = np.where(rng.random((N, 1)) < 0.5, -4.0, 4.0) * e1
    shrunk = y * np.where(np.arange(N) < N // 2, 0.3, 1.0)[:, None]
    return {"same": (x, y), "shift": (x, y + 0.3), "mode_drop": (x + modes, y + 4.0 * e1), "shrunk": (x, shrunk),
            "disjoint": (x, y + 50.0)}


def package_projection(a):
    """The package's projection: xavier_normal_ on a (32, D) weight right after torch.manual_seed(99)
    (the same stream as this generator), applied by a float32 bias-free Linear."""
    w = torch.randn(32, D, generator=torch.Generator().manual_seed(99)) * math.sqrt(2 / (D + 32))
    return torch.nn.functional.linear(torch.tensor(a, dtype=torch.float32), w).double().numpy()


@pytest.fixture
def restore_global_rngs():
    """compute_top_pr reseeds random / numpy / torch and sets cudnn flags: put them back afterwards."""
    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    yield
    random.setstate(state[0]), np.random.set_state(state[1]), torch.set_rng_state(state[2])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags


@pytest.mark.parametrize("name", list(SD))
def test_top_pr_agrees_with_the_authors_package(name, restore_global_rngs):
    x, y = pairs()[name]
    r = top_pr_package.compute_top_pr(real_features=x, fake_features=y)
    want = np.array([r["fidelity"], r["diversity"], r["Top_F1"]], dtype=np.float64)
    # the same draws: the same numbers (the package's float32 features, our float64 arithmetic)
    exact = metrics.top_pr(package_projection(x), package_projection(y), seed=42)
    assert exact == pytest.approx(tuple(want), abs=1e-12), (name, exact, want)
    # our own draws: within 4 standard deviations of the difference of two independent runs
    got = np.array(metrics.top_pr(x, y))
    tol = np.maximum(4 * math.sqrt(2) * np.array(SD[name]), 0.01)
    assert (np.abs(got - want) <= tol).all(), (name, got.round(3), want.round(3), tol.round(3))
