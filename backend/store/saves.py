"""Small writes that cost what they write: saved graphs, comparisons and annotations as files beside the store.

A precompute run copies the whole store and swaps the copy in (:class:`backend.store.access.StoreWriter`): right for a
run that writes hundreds of MB, far too much for one graph. A **save** instead writes a small DuckDB file of its own
into the store's saves directory (``.NAME.saves/`` beside ``NAME.duckdb``) and then appends its name to that
directory's ``manifest.json``, under a lock held only for that append:

* two saves at once both succeed — each writes its own file, the second waits a moment for the lock;
* a save is visible only once listed: a ``kill -9`` leaves at most an unlisted file, which is never read and is
  removed by the next save;
* readers attach the store, then every listed save file (read-only), and see each table that saves write as the union
  of them, a newer file's rows replacing older rows with the same key (:data:`SAVE_TABLES`);
* every precompute run folds the listed saves into the store it swaps in and empties the manifest (under the same
  lock, so no save can be lost between the copy and the swap), and ``python -m backend compact`` does just that.

Written by hand: DuckDB allows one writing process per file, and the app's readers are other processes.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import duckdb

from backend.errors import StoreError, literal
from backend.store import schema
from backend.store.files import is_duckdb_file, views_and_macros

if TYPE_CHECKING:
    import pandas as pd

# The tables a save may write, each with the key whose rows a newer file replaces.
SAVE_TABLES: dict[str, str] = {
    "runs": "run_id",
    "models": "model",
    "vocab": "model",
    "graphs": "graph_id",
    "graph_nodes": "graph_id",
    "graph_edges": "graph_id",
    "graph_views": "graph_id",
    "attribution_comparisons": "comparison_id",
    "attribution_runs": "comparison_id",
    "attributions": "attr_id",
    "user_labels": "label_key",
}
# Tables read back in the order their rows were written (``ORDER BY rowid``; one graph's rows live in one source): a
# view over them carries each source table's rowid as a column of that name, which a view has not otherwise.
ORDERED_TABLES = frozenset({"graph_nodes", "graph_edges"})
MANIFEST = "manifest.json"
LOCK_WAIT_S = 60.0  # a save waits this long for another save's (or a precompute's fold's) manifest update
CONSOLIDATE_AT = 8  # with this many saves listed, the next save merges them into one file (readers attach fewer)


def saves_dir(real: Path) -> Path:
    """The saves directory of the store whose real path is ``real``."""
    return real.parent / f".{real.name}.saves"


def listed(real: Path) -> list[Path]:
    """The committed save files of the store at ``real``, oldest first (empty when it has none)."""
    try:
        data = json.loads((saves_dir(real) / MANIFEST).read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise StoreError(f"The saves list of {literal(real)} is unreadable ({type(exc).__name__}): delete "
                         f"{literal(saves_dir(real) / MANIFEST)} to drop the saved graphs and comparisons, or restore "
                         "it.") from None
    names = data.get("saves", []) if isinstance(data, dict) else []
    return [saves_dir(real) / str(name) for name in names if isinstance(name, str) and "/" not in name]


def manifest_stamp(real: Path) -> tuple[int, int]:
    """(mtime_ns, size) of the manifest, (0, 0) without one: part of a store version's cache key."""
    try:
        st = (saves_dir(real) / MANIFEST).stat()
    except OSError:
        return 0, 0
    return st.st_mtime_ns, st.st_size


@contextmanager
def manifest_lock(real: Path, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold the store's saves lock (blocking, up to ``wait_s``): manifest updates and folds take it."""
    directory = saves_dir(real)
    directory.mkdir(parents=True, exist_ok=True)
    fh = open(directory / "lock", "w")
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreError(f"Another writer has held {literal(real)} for over {wait_s:.0f} s: try the save "
                                     "again in a moment.") from None
                time.sleep(0.05)
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _write_manifest(real: Path, files: list[Path]) -> None:
    """Atomically replace the manifest (write, fsync, rename, fsync the directory); the caller holds the lock."""
    directory = saves_dir(real)
    tmp = directory / f".{MANIFEST}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps({"saves": [f.name for f in files]}))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, directory / MANIFEST)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_file(real: Path) -> tuple[Path, duckdb.DuckDBPyConnection]:
    """A fresh save file with the whole schema (so that readers can union it with any table), being written."""
    directory = saves_dir(real)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.part.duckdb"
    con = duckdb.connect(str(path))
    for stmt in schema.DDL:
        con.execute(stmt)
    con.execute("INSERT INTO meta VALUES ('schema_version', ?), ('writer', 'circuitscope'), ('kind', 'save')",
                [str(schema.SCHEMA_VERSION)])
    return path, con


class SaveWriter:
    """One save being written: ``con`` is its own file's connection (write only the :data:`SAVE_TABLES`);
    ``run_id`` identifies it in ``runs``."""

    def __init__(self, con: duckdb.DuckDBPyConnection, run_id: str) -> None:
        self.con = con
        self.run_id = run_id

    def insert_df(self, table: str, df: "pd.DataFrame") -> None:
        """Append a pandas DataFrame whose columns are a subset of ``table``'s, matched by name."""
        if table not in SAVE_TABLES:
            raise ValueError(f"a save cannot write table {table!r}: saves write {sorted(SAVE_TABLES)}")
        self.con.register("_save_df", df)
        cols = ", ".join(f'"{c}"' for c in df.columns)
        self.con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _save_df")
        self.con.unregister("_save_df")


@contextmanager
def write_save(real: Path, store_path: str | Path, kind: str, model: str, params: dict[str, Any] | None = None
               ) -> Iterator[SaveWriter]:
    """Write one save of the store whose real path is ``real`` (already checked to be a readable store; use
    :func:`backend.store.access.saving`); it is listed (visible) only when the block ends without an exception."""
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    started = datetime.now(timezone.utc)
    try:
        path, con = _new_file(real)
    except (OSError, duckdb.IOException) as exc:
        raise StoreError(f"Cannot save into {literal(store_path)} ({literal(str(exc).splitlines()[0][:80])}): check "
                         "that its directory is writable.") from None
    try:
        con.execute("INSERT INTO runs VALUES (?, ?, ?, '', ?, 'running', ?, NULL, NULL, NULL)",
                    [run_id, kind, model, json.dumps(params or {}), started])
        yield SaveWriter(con, run_id)
        finished = datetime.now(timezone.utc)
        con.execute("UPDATE runs SET status = 'complete', finished_at = ?, seconds = ? WHERE run_id = ?",
                    [finished, (finished - started).total_seconds(), run_id])
        con.execute("CHECKPOINT")
        con.close()
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())
        final = path.with_name(path.name.replace(".part.duckdb", ".duckdb"))
        with manifest_lock(real):
            os.replace(path, final)
            files = [f for f in listed(real) if f.exists()] + [final]
            if len(files) >= CONSOLIDATE_AT:
                files = [_consolidate(real, files)]
            _write_manifest(real, files)
            _remove_unlisted(real, files)
    except BaseException as exc:
        try:
            con.close()
        except duckdb.Error:
            pass
        for p in (path, path.with_name(path.name + ".wal")):
            p.unlink(missing_ok=True)
        if isinstance(exc, (OSError, duckdb.IOException)):
            # A full disk or a read-only directory while the save was written: the store and its listed saves are as
            # they were.
            raise StoreError(f"Saving into {literal(store_path)} failed ({literal(str(exc).splitlines()[0][:80])}); "
                             "the store is unchanged: free some disk space or check the directory, and save again."
                             ) from None
        raise


def _consolidate(real: Path, files: list[Path]) -> Path:
    """Merge listed save files into one new file (newer rows replacing older ones by key); the caller holds the lock
    and lists the result instead of ``files``."""
    path, con = _new_file(real)
    try:
        for i, f in enumerate(files):
            alias = f"s{i}"
            con.execute(f"ATTACH '{_quote(f)}' AS {alias} (READ_ONLY)")
            _merge_from(con, alias)
            con.execute(f"DETACH {alias}")
        con.execute("CHECKPOINT")
    finally:
        con.close()
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
    final = path.with_name(path.name.replace(".part.duckdb", ".duckdb"))
    os.replace(path, final)
    return final


def _merge_from(con: duckdb.DuckDBPyConnection, alias: str) -> None:
    """Copy every save table of the attached ``alias`` into ``con``'s database, replacing rows with the same key."""
    for table, key in SAVE_TABLES.items():
        con.execute(f'DELETE FROM "{table}" WHERE "{key}" IN (SELECT "{key}" FROM {alias}.main."{table}")')
        con.execute(f'INSERT INTO "{table}" BY NAME SELECT * FROM {alias}.main."{table}"')


def fold_into(con: duckdb.DuckDBPyConnection, real: Path) -> list[Path]:
    """Merge every listed save of the store at ``real`` into the database of ``con`` (a precompute's copy about to be
    swapped in); the caller holds :func:`manifest_lock` and, after the swap, calls :func:`forget`. Returns the files
    folded."""
    files = [f for f in listed(real) if f.exists()]
    for i, f in enumerate(files):
        alias = f"fold{i}"
        con.execute(f"ATTACH '{_quote(f)}' AS {alias} (READ_ONLY)")
        _merge_from(con, alias)
        con.execute(f"DETACH {alias}")
    return files


def forget(real: Path, files: list[Path]) -> None:
    """After a fold was swapped in: list no saves, and delete the folded files."""
    if not files and not (saves_dir(real) / MANIFEST).exists():
        return
    _write_manifest(real, [])
    _remove_unlisted(real, [])


def _remove_unlisted(real: Path, keep: list[Path]) -> None:
    """Delete save files that are not listed: folded or consolidated ones, and those a killed save left (``.part``,
    older than a minute so that a save being written right now is never touched)."""
    keep_names = {f.name for f in keep}
    now = time.time()
    for p in saves_dir(real).glob("*.duckdb*"):
        if p.name in keep_names or p.name.removesuffix(".wal") in keep_names:
            continue
        if ".part." in p.name and now - p.stat().st_mtime < 60:
            continue
        p.unlink(missing_ok=True)


def _quote(path: Path) -> str:
    return str(path).replace("'", "''")


def attach(con: duckdb.DuckDBPyConnection, real: Path) -> list[str]:
    """Attach the listed saves of the store at ``real`` read-only to a reader connection (before its lockdown) and
    return their aliases, oldest first. A listed file that is not a DuckDB file, holds views or macros, or was written
    by a newer schema is refused with one sentence."""
    aliases = []
    for i, f in enumerate(listed(real)):
        alias = f"save{i}"
        if not is_duckdb_file(f):
            raise StoreError(f"The saved file {literal(f.name)} of {literal(real)} is missing or damaged: delete "
                             f"{literal(saves_dir(real) / MANIFEST)} to drop the saves, or run `python -m backend "
                             "compact` after restoring it.")
        con.execute(f"ATTACH '{_quote(f)}' AS {alias} (READ_ONLY)")
        con.execute(f"USE {alias}")
        try:
            n_views, n_macros = views_and_macros(con)
            version = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
        finally:
            con.execute("USE store")
        if n_views or n_macros:
            raise StoreError(f"The saved file {literal(f.name)} of {literal(real)} holds views or macros, which "
                             "circuitscope never writes: it was not read; delete it and its line in the manifest.")
        if not version or not str(version[0][0]).isdigit() or int(version[0][0]) > schema.SCHEMA_VERSION:
            raise StoreError(f"The saved file {literal(f.name)} of {literal(real)} was written by another version of "
                             "circuitscope: update circuitscope, or delete the saves.")
        aliases.append(alias)
    return aliases


def select_list(table: str, extra: str = "") -> str:
    """The select list of a view over one source of ``table``: every column, the source's rowid for
    :data:`ORDERED_TABLES`, then ``extra``."""
    return ", ".join(["*"] + (["rowid AS rowid"] if table in ORDERED_TABLES else []) + ([extra] if extra else []))


def union_views(con: duckdb.DuckDBPyConnection, bases: dict[str, str], aliases: list[str]) -> None:
    """Temporary views that show each save table as the store's rows (``bases[table]``: a SELECT over the store,
    adding columns an older store lacks) plus the saves', a newer source's rows replacing older rows with the same
    key."""
    if not aliases:
        return
    for table, key in SAVE_TABLES.items():
        sources = [bases[table]] + [f'SELECT {select_list(table)} FROM {a}.main."{table}"' for a in aliases]
        parts = []
        for i, src in enumerate(sources):
            newer = [f'SELECT "{key}" FROM {a}.main."{table}"' for a in aliases[i:]]
            if newer:
                keys = " UNION ".join(f'{n} WHERE "{key}" IS NOT NULL' for n in newer)
                parts.append(f'SELECT * FROM ({src}) WHERE "{key}" IS NULL OR "{key}" NOT IN ({keys})')
            else:
                parts.append(f"SELECT * FROM ({src})")
        con.execute(f'CREATE OR REPLACE TEMP VIEW "{table}" AS ' + " UNION ALL BY NAME ".join(parts))
