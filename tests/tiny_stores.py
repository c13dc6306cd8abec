"""The small test store, built one way for every user: the ``tiny_store`` fixture (tests/conftest.py), the
real-browser tests (tests/e2e) and the concurrency benchmark (benchmarks/e2e_bench.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TEST_MODEL = "tiny-llama"  # random 2-layer Llama-like model: loads offline, no download
TEST_STORE_NAME = "test.duckdb"


def build_tiny_store(path: Path, model: Any = None) -> Path:
    """Run the real precompute (demo preset, 8 contexts) on ``tiny-llama`` into ``path``; returns ``path``.

    ``model`` may pass an already-loaded tiny-llama so the caller's process loads it only once.
    """
    from backend.pipeline.run import precompute

    precompute(TEST_MODEL, path, preset="demo", n_contexts=8, model=model)
    return path
