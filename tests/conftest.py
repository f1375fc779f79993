"""Every test runs with LDOT_HOME in a temporary directory and no reachable network."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the ldot CLI does: before torch loads
# pytest-xdist's workers inherit COLUMNS=80 / LINES=24, which rich would freeze into the consoles at import:
# every process sees the terminal as a plain `pytest` run does (tests that need a width pass COLUMNS).
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)

import pytest  # noqa: E402
from huggingface_hub import constants as hub_constants  # noqa: E402
from ldot_testing import closed_port_url, tiny_bi_encoder, write_vocab  # noqa: E402

os.environ.setdefault("LDOT_NO_PROGRESS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("LDOT_AUTO_SERVER", "0")  # module-scoped fixtures too (ldot_home sets it per test)


@pytest.fixture(autouse=True)
def ldot_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("ldot_home")
    monkeypatch.setenv("LDOT_HOME", str(home))
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_cache = str(tmp_path_factory.mktemp("hf_hub_cache"))  # never the user's: for this process ...
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", hub_cache)
    monkeypatch.setenv("HF_HUB_CACHE", hub_cache)  # ... and the processes it starts
    monkeypatch.setenv("LDOT_NO_PROGRESS", "1")
    monkeypatch.setenv("LDOT_AUTO_SERVER", "0")  # no background servers, but where a test starts them
    return home


@pytest.fixture(scope="session")
def vocab_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vocab")
    write_vocab(directory)
    return directory


@pytest.fixture(scope="session")
def _tiny_model():
    return tiny_bi_encoder(seed=0)


@pytest.fixture
def tiny_model(_tiny_model):
    """A tiny random bi-encoder (deep-copied per test)."""
    import copy

    return copy.deepcopy(_tiny_model)


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread avoids OpenMP contention (10x faster here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer(vocab_dir):
    """The tiny WordPiece tokenizer of `vocab_dir`."""
    from models.nn.tokenizer import Tokenizer

    return Tokenizer.from_path(vocab_dir / "vocab.txt")
