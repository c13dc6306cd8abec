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


def stores_dir() -> Path:
    """The directory stores are listed from and must live in: ``$CIRCUITSCOPE_STORES_DIR`` or ``data/stores``.

    Read at call time (not import time) so a server or a test can point the app elsewhere.
    """
    override = os.environ.get("CIRCUITSCOPE_STORES_DIR")
    return Path(override).resolve() if override else STORES_DIR


def ensure_dirs() -> None:
    """Create the writable directories (idempotent)."""
    for d in (CACHE_DIR, STORES_DIR):
        d.mkdir(parents=True, exist_ok=True)
