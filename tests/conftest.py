"""Session set-up: evaluate.py's shared classifier / feature cache goes to a temporary folder (never
the user's ~/.cache), shared by every test of the session (the fake datasets are identical, so the
feature classifier is trained once)."""
import os
import tempfile


def pytest_configure(config):
    os.environ.setdefault("SLIGHT_CORRUPTION_CACHE", tempfile.mkdtemp(prefix="slight-corruption-cache-"))
