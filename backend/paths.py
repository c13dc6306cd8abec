"""Where the project keeps its files: one place for every directory the code writes to or reads from."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT: Path = Path(__file__).resolve().parent.parent
DATA_DIR: Path = Path(os.environ.get("CIRCUITSCOPE_DATA_DIR", PROJECT_ROOT / "data")).resolve()
# Git-ignored: converted weights, tokenizers, HF caches. Never inside site-packages.
CACHE_DIR: Path = Path(os.environ.get("CIRCUITSCOPE_CACHE_DIR", PROJECT_ROOT / ".cache")).resolve()
CORPUS_DIR: Path = PROJECT_ROOT / "data" / "corpus"
STORES_DIR: Path = DATA_DIR / "stores"
DEMO_STORE: Path = STORES_DIR / "demo.duckdb"


def ensure_dirs() -> None:
    """Create the writable directories (idempotent)."""
    for d in (CACHE_DIR, STORES_DIR):
        d.mkdir(parents=True, exist_ok=True)
