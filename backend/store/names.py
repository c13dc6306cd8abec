"""Store names from links and pickers -> files: the one place that decides which file a name may open.

A store name comes from the URL or a picker and is untrusted: it must resolve to a ``*.duckdb`` file inside the stores
directory (:func:`backend.paths.stores_dir`), never an arbitrary path.
"""

from __future__ import annotations

import os
from pathlib import Path

from backend.errors import StoreError, literal
from backend.paths import stores_dir

# Environment overrides, read at call time (not import time) so tests and servers can point the app elsewhere.
STORE_ENV = "CIRCUITSCOPE_STORE"  # store file name opened when the URL names none (default: demo.duckdb)


DEFAULT_STORE_NAME = "demo.duckdb"
# A store name is one file name (at most NAME_MAX = 255 bytes on Linux) or a short path below the stores directory.
MAX_NAME_BYTES = 255


def default_store_name() -> str:
    """Store opened when the URL names none: ``$CIRCUITSCOPE_STORE`` or the demo store."""
    return os.environ.get(STORE_ENV) or DEFAULT_STORE_NAME


def list_stores(directory: Path | None = None) -> list[str]:
    """Names (relative to the stores directory) of every ``*.duckdb`` store there, the default one first."""
    directory = directory or stores_dir()
    if not directory.is_dir():
        return []
    # Hidden files are a writer's temporaries (backend.store.StoreWriter): never offer them.
    names = sorted(p.name for p in directory.glob("*.duckdb") if p.is_file() and not p.name.startswith("."))
    default = default_store_name()
    return sorted(names, key=lambda n: n != default)


def resolve_store(name: str, directory: Path | None = None) -> Path:
    """Map a store name from the URL or the picker to a file INSIDE the stores directory, or raise StoreError.

    The name is untrusted (anyone can edit a link): absolute paths, ``..`` and symlinks that leave the directory
    are refused, so a link can never make the server open an arbitrary file.
    """
    directory = (directory or stores_dir()).resolve()
    name = name.strip()
    if not name:
        raise StoreError("No store was named: choose one in the sidebar.")
    shown = literal(name, 60)
    # Checked before the name reaches the file system, which would refuse it with ValueError (a NUL byte) or
    # OSError (ENAMETOOLONG) instead of a sentence.
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise StoreError(f"The store name {shown} contains control characters (a NUL byte or a line break), which no "
                         "store file name has: choose a store in the sidebar.")
    if len(os.fsencode(name)) > MAX_NAME_BYTES:
        raise StoreError(f"The store name {shown} is {len(name):,} characters long, longer than any file name can be: "
                         "choose a store in the sidebar.")
    candidate = Path(name)
    if not candidate.is_absolute():
        candidate = directory / candidate
    try:
        resolved = candidate.resolve()
    except (RuntimeError, OSError):  # a symlink loop (RuntimeError on Python 3.11, OSError ELOOP later)
        raise StoreError(f"The store {shown} is a symlink loop, not a store file: choose a store in the sidebar, or "
                         f"replace the link in {literal(directory)}.") from None
    if not resolved.is_relative_to(directory) or resolved == directory:
        raise StoreError(
            f"The store {shown} is outside the stores directory {literal(directory)}: "
            "only stores in that directory can be opened; choose one in the sidebar."
        )
    if resolved.suffix != ".duckdb":
        raise StoreError(f"The store {shown} is not a .duckdb file: choose a store in the sidebar.")
    return resolved
