"""Shared pytest fixtures (generic: add your own below).

* ``tiny_model``  — the random 2-layer ``tiny-llama`` test model, loaded once per session.
* ``tiny_store``  — a small store built once per session by the real precompute on ``tiny-llama`` (read-only: copy
  it before changing it).
* ``app_stores_dir`` — a fresh stores directory per test holding a copy of the tiny store as ``test.duckdb``, with
  ``CIRCUITSCOPE_STORES_DIR`` / ``CIRCUITSCOPE_STORE`` pointing the Streamlit app at it (see backend/ui.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator

import pytest
from tiny_stores import TEST_MODEL, TEST_STORE_NAME, build_tiny_store  # shared with tests/e2e and benchmarks


@pytest.fixture(scope="session")
def tiny_model() -> Any:
    """The tiny random Llama-like test model (loads in about a second once transformer_lens is imported)."""
    from backend.model.registry import load_model

    return load_model(TEST_MODEL)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory, tiny_model: Any) -> Path:
    """A store built by ``precompute("tiny-llama", ..., preset="demo", n_contexts=8)``; do not modify it."""
    return build_tiny_store(tmp_path_factory.mktemp("tiny_store") / TEST_STORE_NAME, model=tiny_model)


@pytest.fixture
def app_stores_dir(tmp_path: Path, tiny_store: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A per-test stores directory with ``test.duckdb`` (a copy of ``tiny_store``) that the app opens by default."""
    directory = tmp_path / "stores"
    directory.mkdir()
    shutil.copy(tiny_store, directory / TEST_STORE_NAME)
    monkeypatch.setenv("CIRCUITSCOPE_STORES_DIR", str(directory))
    monkeypatch.setenv("CIRCUITSCOPE_STORE", TEST_STORE_NAME)
    yield directory


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module: with other processes busy on the 2 cores, two threads thrash (measured 5-10x
    slower). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
