"""Opening stores for reading and writing them atomically.

Design (DuckDB allows one writer process per file, and a writer excludes readers):

* Readers open the store **read-only**; they never block each other.
* A precompute never writes the live file. :class:`StoreWriter` copies the current store (if any) to a hidden
  temporary file beside it, writes the new run there, checkpoints, fsyncs and then ``os.replace``\\ s it over
  the live path. The rename is atomic on POSIX: a reader sees either the old file or the new one, never a
  half-written run; readers that already hold the old file keep reading it (their open inode stays valid).
* ``kill -9`` at any point leaves the live file untouched; the next writer deletes the orphaned temporary
  file and starts the run again ("restart cleanly"). A lock file (``flock``) keeps two writers apart.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import duckdb

from backend.errors import StoreError

if TYPE_CHECKING:
    import pandas as pd
from backend.store import schema

BUILD_HINT = "build one with `python -m backend precompute --model smollm2-135m --store {path}` (or `make demo`)"


def _hint(path: Path) -> str:
    return BUILD_HINT.format(path=path)


def _is_duckdb_file(path: Path) -> bool:
    # DuckDB files carry the magic "DUCK" at byte 8; checking it first turns "not a store" into a clear message
    # without asking DuckDB to parse arbitrary bytes.
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return False
    return len(head) >= 12 and head[8:12] == b"DUCK"


def check_schema(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    """Return the store's schema version, raising StoreError if it is not a circuitscope store we can read."""
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    if "meta" not in tables:
        raise StoreError(f"{path} is a DuckDB file but not a circuitscope store (no meta table): {_hint(path)}.")
    rows = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
    version = int(rows[0][0]) if rows else 0
    if version > schema.SCHEMA_VERSION:
        raise StoreError(
            f"{path} was written by a newer circuitscope (store schema v{version}, this version reads up to "
            f"v{schema.SCHEMA_VERSION}): update circuitscope (`git pull && make setup`) or open another store."
        )
    return version


def open_store(path: str | Path) -> duckdb.DuckDBPyConnection:
    """Open a store read-only, or raise StoreError with one sentence saying what is wrong and what to do."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"No store at {path}: {_hint(path)}.")
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not a store file: pass the .duckdb file inside it.")
    if not _is_duckdb_file(path):
        raise StoreError(f"{path} is not a readable circuitscope store (corrupt or not a DuckDB file): delete it and {_hint(path)}.")
    con = duckdb.connect(":memory:")
    try:
        # ATTACH into a private in-memory database instead of duckdb.connect(path): DuckDB caches database
        # instances per path within a process, so a plain connect would keep returning the pre-swap file to a
        # long-lived app process while any old connection is still open.
        escaped = str(path).replace("'", "''")
        con.execute(f"ATTACH '{escaped}' AS store (READ_ONLY)")
        con.execute("USE store")
    except duckdb.Error as exc:
        con.close()
        msg = str(exc).splitlines()[0][:200]
        raise StoreError(f"{path} could not be opened ({msg}): if it is corrupt, delete it and {_hint(path)}.") from None
    try:
        version = check_schema(con, path)
        _read_older_version(con, version)
    except StoreError:
        con.close()
        raise
    except duckdb.Error as exc:
        con.close()
        raise StoreError(f"{path} could not be read ({str(exc).splitlines()[0][:200]}): delete it and {_hint(path)}.") from None
    return con


def _read_older_version(con: duckdb.DuckDBPyConnection, version: int) -> None:
    """Let a reader query a store written by an older schema version as if it were current: temporary views add the
    columns later versions added (as NULL) and empty temporary tables stand in for tables it does not have yet. They
    live in this connection only (the store stays read-only) and shadow the store's own names."""
    if version >= schema.SCHEMA_VERSION:
        return
    rows = con.execute("SELECT table_name, column_name FROM information_schema.columns "
                       "WHERE table_catalog = current_database()").fetchall()
    columns: dict[str, set[str]] = {}
    for table, column in rows:
        columns.setdefault(table, set()).add(column)
    for stmt in schema.DDL:
        table = stmt.split("EXISTS ", 1)[1].split(" ", 1)[0].strip()
        if table not in columns:
            con.execute(stmt.replace("CREATE TABLE IF NOT EXISTS", "CREATE TEMP TABLE IF NOT EXISTS", 1))
    added: dict[str, list[str]] = {}
    for v in range(version + 1, schema.SCHEMA_VERSION + 1):
        for table, column in schema.ADDED_COLUMNS.get(v, []):
            name, sql_type = column.split(" ", 1)
            if table in columns and name not in columns[table]:
                added.setdefault(table, []).append(f"NULL::{sql_type} AS {name}")
    db = con.execute("SELECT current_database()").fetchall()[0][0]
    for table, extra in added.items():
        con.execute(f'CREATE TEMP VIEW "{table}" AS SELECT *, {", ".join(extra)} FROM "{db}".main."{table}"')


@dataclass
class StoreFingerprint:
    """Identifies one version of a store file: changes whenever a writer swaps a new file in."""

    path: str
    inode: int
    mtime_ns: int
    size: int


def fingerprint(path: str | Path) -> StoreFingerprint:
    """Fingerprint of the store file now (for cache keys: a swapped-in store gets a new inode)."""
    st = Path(path).stat()
    return StoreFingerprint(str(Path(path).resolve()), st.st_ino, st.st_mtime_ns, st.st_size)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StoreWriter:
    """Context manager that writes one precompute run atomically (see module docstring).

    ``with StoreWriter(path, kind="precompute", model=..., params=...) as w: w.con.execute(...)`` — on normal
    exit the run is marked ``complete`` and swapped in; on an exception the temporary file is discarded and
    the live store is exactly as before.
    """

    def __init__(self, path: str | Path, kind: str, model: str, preset: str = "", params: dict[str, Any] | None = None):
        self.path = Path(path)
        self.kind, self.model, self.preset = kind, model, preset
        self.params = params or {}
        self.run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.tmp = self.path.parent / f"{_temp_prefix(self.path)}{self.run_id}.tmp"
        self._lock_fh: Any = None
        self.con: duckdb.DuckDBPyConnection | None = None
        self._started = datetime.now(timezone.utc)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> "StoreWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(self.path.parent / f"{_temp_prefix(self.path)}lock", "w")
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            raise StoreError(f"Another precompute is writing {self.path}: wait for it to finish, or stop it.") from None
        self._remove_orphans()
        try:
            if self.path.exists():
                # Validate before copying: never build a run on top of a corrupt or newer-schema file.
                open_store(self.path).close()
                self._copy_live_to_tmp()
            self.con = duckdb.connect(str(self.tmp))
            self._ensure_schema()
            self.con.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, 'running', ?, NULL, NULL, NULL)",
                [self.run_id, self.kind, self.model, self.preset, json.dumps(self.params), self._started],
            )
        except BaseException:
            self._discard()
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self._discard()
            return
        self.commit()

    def commit(self, summary: dict[str, Any] | None = None) -> None:
        """Mark the run complete, make the temporary file durable and swap it over the live store."""
        assert self.con is not None
        if summary is not None:
            self.summary = summary
        finished = datetime.now(timezone.utc)
        self.con.execute(
            "UPDATE runs SET status = 'complete', finished_at = ?, seconds = ?, summary = ? WHERE run_id = ?",
            [finished, (finished - self._started).total_seconds(), json.dumps(getattr(self, "summary", {})), self.run_id],
        )
        self.con.execute("CHECKPOINT")
        self.con.close()
        self.con = None
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.tmp, self.path)
        _fsync_dir(self.path.parent)
        self._release()

    # -- helpers -----------------------------------------------------------------------------------------
    def _copy_live_to_tmp(self) -> None:
        # ATTACH + COPY FROM DATABASE copies every table through DuckDB itself, so the copy is a consistent
        # snapshot even if a reader has the live file open (a byte copy would be too, but this also compacts).
        con = duckdb.connect(str(self.tmp))
        try:
            escaped = str(self.path).replace("'", "''")
            con.execute(f"ATTACH '{escaped}' AS live (READ_ONLY)")
            db = con.execute("SELECT current_database()").fetchall()[0][0]
            con.execute(f'COPY FROM DATABASE live TO "{db}"')
            con.execute("DETACH live")
            con.execute("CHECKPOINT")
        finally:
            con.close()

    def _ensure_schema(self) -> None:
        assert self.con is not None
        con = self.con
        con.execute(schema.DDL[0])
        rows = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
        version = int(rows[0][0]) if rows else None
        for stmt in schema.DDL[1:]:
            con.execute(stmt)
        if version is not None:
            for v in range(version + 1, schema.SCHEMA_VERSION + 1):
                for stmt in schema.MIGRATIONS.get(v, []):
                    con.execute(stmt)
        for stmt in schema.INDEXES:
            con.execute(stmt)
        con.execute(
            "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?), ('writer', 'circuitscope')",
            [str(schema.SCHEMA_VERSION)],
        )
        if version is None:
            con.execute("INSERT OR REPLACE INTO meta VALUES ('created_at', ?)", [self._started.isoformat()])

    def _remove_orphans(self) -> None:
        # Left by a writer killed mid-run: we hold the lock, so no live writer owns them.
        for p in self.path.parent.glob(f"{_temp_prefix(self.path)}*.tmp*"):
            p.unlink(missing_ok=True)

    def _discard(self) -> None:
        if self.con is not None:
            try:
                self.con.close()
            except duckdb.Error:
                pass
            self.con = None
        for p in self.path.parent.glob(f"{self.tmp.name}*"):  # the file and its .wal
            p.unlink(missing_ok=True)
        self._release()

    def _release(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    # -- writing -----------------------------------------------------------------------------------------
    def insert_df(self, table: str, df: Any) -> None:
        """Append a pandas DataFrame whose columns are a subset of ``table``'s, matched by name."""
        assert self.con is not None
        self.con.register("_df", df)
        cols = ", ".join(f'"{c}"' for c in df.columns)
        self.con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _df")
        self.con.unregister("_df")


def frame(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> "pd.DataFrame":
    """The rows of one SQL query as a pandas DataFrame (every read query of the capabilities goes through here)."""
    return con.execute(sql, params or []).df()


def scalar(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> Any:
    """The first column of the first row of one SQL query (None when it returns no row)."""
    rows = con.execute(sql, params or []).fetchall()
    return rows[0][0] if rows else None


@contextmanager
def reading(path: str | Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """``with reading(path) as con:`` — a read-only connection closed afterwards."""
    con = open_store(path)
    try:
        yield con
    finally:
        con.close()
