"""Opening stores for reading and writing them atomically.

Design (DuckDB allows one writer process per file, and a writer excludes readers):

* Readers open the store **read-only**; they never block each other.
* A precompute never writes the live file. :class:`StoreWriter` copies the current store (if any) to a hidden
  temporary file beside it, writes the new run there, checkpoints, fsyncs and then ``os.replace``\\ s it over
  the live path. The rename is atomic on POSIX: a reader sees either the old file or the new one, never a
  half-written run; readers that already hold the old file keep reading it (their open inode stays valid).
* ``kill -9`` at any point leaves the live file untouched. The next writer either deletes the orphaned temporary
  file and starts its run afresh, or, with ``resume=True`` (``precompute --resume``), reopens it and goes on: the
  temporary file records each finished unit of work (a step, or one layer of a step) in a progress table, made
  durable with a DuckDB ``CHECKPOINT`` as each unit finishes, and is refused in one sentence when its options differ
  or the live store was replaced since it was copied. The progress table is dropped at commit. A lock file
  (``flock``) keeps two writers apart.
* A store path that is a symlink is resolved first: the writer writes beside the real file, swaps the real file and
  locks the real file's lock, so writers through the link and through the real path exclude each other.

Stores are files people share, so a store is untrusted input (docs/design.md, README "Security"):

* Reader connections (:func:`open_store`) attach the store into a private in-memory database and then turn DuckDB's
  external access off and lock the configuration: nothing run on them — a view, a macro or a query — can read or list
  local files (``read_text``, ``read_csv``, ``read_parquet``, ``read_json``, ``glob``), ``COPY`` out, ``ATTACH``
  another file, or install / load an extension, and the setting cannot be turned back on.
* circuitscope never writes views or macros, so a store holding any is refused with one sentence before anything
  reads from it: also before a :class:`StoreWriter` copies it (the writer's connection needs file access, so a
  hostile view must never run there).
* Whatever fails while opening or reading a store (a damaged block, a missing table, a non-integer schema version,
  a name the file system refuses) is one :class:`~backend.errors.StoreError` sentence saying what to do.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import duckdb

from backend.errors import StoreError, literal

if TYPE_CHECKING:
    import pandas as pd
from backend.store import saves, schema
from backend.store.files import is_duckdb_file, views_and_macros

log = logging.getLogger("circuitscope.store")

# Run on every reader connection after the store is attached, in this order: extensions can neither be installed nor
# auto-loaded (an extension is code from disk), no file outside the attached store can be read, written or listed, and
# the configuration is locked so that no statement (e.g. in a view) can switch any of this back on.
READER_LOCKDOWN: tuple[str, ...] = (
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET enable_external_access = false",
    "SET lock_configuration = true",
)
# Fewer bytes than NAME_MAX (255 on Linux) for the store's file name, so that the writer's temporary file
# (".NAME.<run id>.tmp.wal") and lock file (".NAME.lock") fit too.
_TEMP_NAME_EXTRA = len(".") + len(".20260101T000000-abcdef.tmp.wal")
BUILD_COMMAND = "python -m backend precompute --model smollm2-135m --store {path}"


def _hint(path: Path) -> str:
    # The command is a code span built by literal(): a path holding backticks or markdown stays literal text too.
    return f"build one with {literal(BUILD_COMMAND.format(path=path), 400)} (or `make demo`)"


def _describe_os_error(exc: OSError) -> str:
    """``[Errno 13] Permission denied: '/x'`` -> ``permission denied`` (the path is already in the sentence)."""
    return (exc.strerror or type(exc).__name__).lower()


def _duckdb_message(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def real_path(path: str | Path) -> Path:
    """``path`` with every symlink resolved (the file a writer must replace and lock), or StoreError for a symlink
    loop or a name the file system refuses."""
    path = Path(path)
    try:
        # strict=False: a store that does not exist yet is fine. A symlink loop raises RuntimeError on Python 3.11
        # and OSError(ELOOP) on later versions.
        return path.resolve()
    except RuntimeError:
        raise StoreError(f"The store path {literal(path)} is a symlink loop: point it at a real .duckdb file, or "
                         "choose another path.") from None
    except OSError as exc:
        raise StoreError(f"The store path {literal(path)} cannot be used ({_describe_os_error(exc)}): choose "
                         "another path.") from None


def check_schema(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    """Return the store's schema version, raising StoreError if it is not a circuitscope store we can read."""
    shown = literal(path)
    # First, before any table is read: circuitscope never writes views or macros, so a store holding some is not one
    # of ours and may try to read local files through them.
    n_views, n_macros = views_and_macros(con)
    if n_views or n_macros:
        raise StoreError(f"{shown} holds views or macros ({n_views} view(s), {n_macros} macro(s)), which circuitscope "
                         "never writes: it is not a circuitscope store and was not read; open only stores you built "
                         f"or trust, or {_hint(path)}.")
    db = con.execute("SELECT current_database()").fetchall()[0][0]
    tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = ?",
                                        [db]).fetchall()}
    if "meta" not in tables:
        raise StoreError(f"{shown} is a DuckDB file but not a circuitscope store (no meta table): {_hint(path)}.")
    rows = con.execute("SELECT CAST(value AS VARCHAR) FROM meta WHERE CAST(key AS VARCHAR) = 'schema_version'"
                       ).fetchall()
    if not rows or rows[0][0] is None:
        raise StoreError(f"{shown} has a meta table but no schema version, so it was not written by circuitscope (or "
                         f"its writer was stopped before the first run): delete it and {_hint(path)}.")
    raw = str(rows[0][0]).strip()
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9):
        raise StoreError(f"{shown} records schema version {literal(raw, 40)}, which is not a whole number, so it was "
                         f"not written by circuitscope: delete it and {_hint(path)}.")
    version = int(raw)
    if version > schema.SCHEMA_VERSION:
        raise StoreError(
            f"{shown} was written by a newer circuitscope (store schema v{version}, this version reads up to "
            f"v{schema.SCHEMA_VERSION}): update circuitscope (`git pull && make setup`) or open another store."
        )
    missing = sorted(schema.CORE_TABLES - tables)
    if missing:
        raise StoreError(f"{shown} is missing table(s) {', '.join(missing)} that every circuitscope store has "
                         f"(damaged or not written by circuitscope): delete it and {_hint(path)}.")
    return version


def _lock_down(con: duckdb.DuckDBPyConnection) -> None:
    for statement in READER_LOCKDOWN:
        con.execute(statement)


def open_store(path: str | Path) -> duckdb.DuckDBPyConnection:
    """Open a store read-only, or raise StoreError with one sentence saying what is wrong and what to do.

    The connection cannot touch the file system beyond the store (see the module docstring), and a store holding views
    or macros is refused before any of its data is read.
    """
    path = Path(path)
    shown = literal(path)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as exc:  # e.g. a name longer than the file system allows (ENAMETOOLONG)
        raise StoreError(f"The store path {shown} cannot be used ({_describe_os_error(exc)}): choose another "
                         "store.") from None
    if not exists:
        if path.is_symlink():  # a dangling link or a symlink loop (exists() is False for both)
            real_path(path)  # raises the symlink-loop sentence
            raise StoreError(f"{shown} is a symlink to a missing file: fix the link or {_hint(path)}.")
        raise StoreError(f"No store at {shown}: {_hint(path)}.")
    if is_dir:
        raise StoreError(f"{shown} is a directory, not a store file: pass the .duckdb file inside it.")
    if not is_duckdb_file(path):
        raise StoreError(f"{shown} is not a readable circuitscope store (corrupt or not a DuckDB file): delete it and "
                         f"{_hint(path)}.")
    con = duckdb.connect(":memory:")
    try:
        # ATTACH into a private in-memory database instead of duckdb.connect(path): DuckDB caches database
        # instances per path within a process, so a plain connect would keep returning the pre-swap file to a
        # long-lived app process while any old connection is still open. The lockdown comes after the ATTACH (which
        # itself needs file access) and before anything reads from the store.
        escaped = str(path).replace("'", "''")
        con.execute(f"ATTACH '{escaped}' AS store (READ_ONLY)")
        con.execute("USE store")
        aliases = saves.attach(con, real_path(path))  # the committed saves beside the store, also read-only
        _lock_down(con)
    except StoreError:
        con.close()
        raise
    except duckdb.Error as exc:
        con.close()
        raise StoreError(f"{shown} could not be opened ({literal(_duckdb_message(exc))}): if it is corrupt, delete it "
                         f"and {_hint(path)}.") from None
    try:
        version = check_schema(con, path)
        saves.union_views(con, _current_tables(con, version), aliases)
    except StoreError:
        con.close()
        raise
    except duckdb.Error as exc:
        con.close()
        raise StoreError(f"{shown} could not be read ({literal(_duckdb_message(exc))}): delete it and "
                         f"{_hint(path)}.") from None
    return con


def _current_tables(con: duckdb.DuckDBPyConnection, version: int) -> dict[str, str]:
    """Let a reader query a store written by an older schema version as if it were current, and return, per table, a
    SELECT of its rows as the current schema has them (what saves are unioned with). Temporary views add the columns
    later versions added (as NULL) and empty temporary tables stand in for tables it does not have yet; they live in
    this connection only (the store stays read-only) and shadow the store's own names."""
    db = con.execute("SELECT current_database()").fetchall()[0][0]
    names = [stmt.split("EXISTS ", 1)[1].split(" ", 1)[0].strip() for stmt in schema.DDL]
    bases = {name: f'SELECT {saves.select_list(name)} FROM "{db}".main."{name}"' for name in names}
    if version >= schema.SCHEMA_VERSION:
        return bases
    rows = con.execute("SELECT table_name, column_name FROM information_schema.columns "
                       "WHERE table_catalog = current_database()").fetchall()
    columns: dict[str, set[str]] = {}
    for table, column in rows:
        columns.setdefault(table, set()).add(column)
    for table, stmt in zip(names, schema.DDL):
        if table not in columns:
            # An empty stand-in under another name, shown through a view named like the table (a view over the
            # saves may replace that view later).
            stand_in = stmt.replace(f"CREATE TABLE IF NOT EXISTS {table}", f'CREATE TEMP TABLE "_missing_{table}"', 1)
            con.execute(stand_in)
            bases[table] = f'SELECT {saves.select_list(table)} FROM temp.main."_missing_{table}"'
            con.execute(f'CREATE TEMP VIEW "{table}" AS {bases[table]}')
    added: dict[str, list[str]] = {}
    for v in range(version + 1, schema.SCHEMA_VERSION + 1):
        for table, column in schema.ADDED_COLUMNS.get(v, []):
            name, sql_type = column.split(" ", 1)
            if table in columns and name not in columns[table]:
                added.setdefault(table, []).append(f"NULL::{sql_type} AS {name}")
    for table, extra in added.items():
        bases[table] = f'SELECT {saves.select_list(table, ", ".join(extra))} FROM "{db}".main."{table}"'
        con.execute(f'CREATE TEMP VIEW "{table}" AS {bases[table]}')
    return bases


def check_writable(path: str | Path) -> Path:
    """Check, before any work, that a writer could write the store at ``path``; returns its real path.

    One StoreError sentence when the name is too long for the file system, the path is a directory, a symlink loop or
    in a directory that cannot be created or written (read-only, ``/proc``), or the existing file is not a readable
    circuitscope store (which a writer would refuse to build on). Creates the store's directory and its lock file,
    as the writer would.
    """
    real = real_path(path)
    shown = literal(path)
    limit = _name_max(real.parent)
    if len(os.fsencode(real.name)) + _TEMP_NAME_EXTRA > limit:
        raise StoreError(f"The store name {literal(real.name, 60)} is {len(real.name)} characters long; this file "
                         f"system allows {limit - _TEMP_NAME_EXTRA} for a store (the writer adds a suffix for its "
                         "temporary file): choose a shorter name.")
    try:
        if real.is_dir():
            raise StoreError(f"{shown} is a directory, not a store file: pass a .duckdb file path.")
        real.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(_lock_path(real), os.O_WRONLY | os.O_CREAT, 0o644)
        os.close(fd)
    except OSError as exc:
        raise StoreError(f"Cannot write a store at {shown} ({_describe_os_error(exc)}): choose a directory you can "
                         "write to.") from None
    if real.exists():
        open_store(real).close()
    return real


def _name_max(directory: Path) -> int:
    # The nearest existing ancestor answers for the file system the store will be on.
    for candidate in (directory, *directory.parents):
        try:
            return int(os.pathconf(candidate, "PC_NAME_MAX"))
        except (OSError, ValueError):
            continue
    return 255


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as ``{"a.b.c": leaf}`` (the options of a run, to name which ones differ)."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _lock_path(real: Path) -> Path:
    return real.parent / f"{_temp_prefix(real)}lock"


@dataclass
class StoreFingerprint:
    """Identifies one version of a store: changes whenever a writer swaps a new file in or a save is listed."""

    path: str
    inode: int
    mtime_ns: int
    size: int
    saves: tuple[int, int] = (0, 0)  # the saves manifest's (mtime_ns, size)

    @property
    def key(self) -> tuple[int, ...]:
        """The fingerprint as a cache key."""
        return (self.inode, self.mtime_ns, self.size, *self.saves)


def fingerprint(path: str | Path) -> StoreFingerprint:
    """Fingerprint of the store now (for cache keys: a swapped-in store gets a new inode, a save a new manifest)."""
    real = real_path(path)
    st = real.stat()
    return StoreFingerprint(str(real), st.st_ino, st.st_mtime_ns, st.st_size, saves.manifest_stamp(real))


# A run's file is copied once more before it is swapped in when more than this share of its blocks is free.
COMPACT_ABOVE = 0.1


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def staging_file(real: Path, run_id: str) -> Path:
    """The staging copy a writer builds run ``run_id`` of the store whose real path is ``real`` in."""
    return real.parent / f"{_temp_prefix(real)}{run_id}.tmp"


def staging_files(path: str | Path) -> list[Path]:
    """The staging copies of unfinished runs beside the store at ``path``, oldest first (run ids start with their UTC
    start time)."""
    real = real_path(path)
    return sorted(p for p in real.parent.glob(f"{_temp_prefix(real)}*.tmp") if p.is_file())


@contextmanager
def holding_flock(lock: Path) -> Iterator[bool]:
    """Hold the ``flock`` on the file ``lock`` for the block without waiting; yields False (holding nothing) when
    another process has it."""
    fh = open(lock, "a")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        fh.close()  # closing releases the lock


def lock_held(lock: Path) -> bool:
    """Whether some process holds the ``flock`` on the file ``lock`` now (False when it cannot even be opened)."""
    try:
        with holding_flock(lock) as mine:
            return not mine
    except OSError:
        return False


def writer_busy(path: str | Path) -> bool:
    """Whether a writer (a precompute, a compact) is writing the store at ``path`` now."""
    return lock_held(_lock_path(real_path(path)))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


READ_ONLY_ENV = "CIRCUITSCOPE_READ_ONLY"
READ_ONLY_MESSAGE = ("This deployment is read-only (CIRCUITSCOPE_READ_ONLY is set): nothing is saved into its stores; "
                     "download what you made, or run circuitscope yourself to save.")


def read_only() -> bool:
    """Whether saves are refused (``CIRCUITSCOPE_READ_ONLY`` set to anything but empty / ``0`` / ``false``): for
    shared deployments. Read at call time, so pages can say so before anyone tries."""
    return os.environ.get(READ_ONLY_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextmanager
def saving(store_path: str | Path, kind: str, model: str, params: dict[str, Any] | None = None
           ) -> Iterator[saves.SaveWriter]:
    """``with saving(path, kind="graph", model=...) as w: w.insert_df(...)`` — write one save beside the store
    (:mod:`backend.store.saves`); it is visible only when the block ends without an exception. The store must exist:
    saves add to a store, they never create one. Refused with :data:`READ_ONLY_MESSAGE` in read-only mode
    (:func:`read_only`): every write a page, the API or the CLI makes beside a store goes through here."""
    if read_only():
        raise StoreError(READ_ONLY_MESSAGE)
    real = real_path(store_path)
    open_store(real).close()  # one sentence for a missing, corrupt, hostile or newer-schema store
    with saves.write_save(real, store_path, kind, model, params) as writer:
        yield writer


def compact(path: str | Path) -> int:
    """Fold every listed save of the store at ``path`` into the store itself (one copy of the store, as a precompute
    run makes) and return how many save files were folded. Readers keep serving meanwhile; the copy also drops the
    space of deleted rows."""
    real = real_path(path)
    if not real.exists():
        raise StoreError(f"There is no store at {literal(path)}.")
    n = len(saves.listed(real))
    with StoreWriter(path, kind="compact", model=""):
        pass
    return n


class StoreWriter:
    """Context manager that writes one precompute run atomically (see module docstring).

    ``with StoreWriter(path, kind="precompute", model=..., params=...) as w: w.con.execute(...)`` — on normal
    exit the run is marked ``complete`` and swapped in; on an exception the temporary file is discarded and
    the live store is exactly as before.
    """

    def __init__(self, path: str | Path, kind: str, model: str, preset: str = "", params: dict[str, Any] | None = None,
                 resume: bool = False):
        # The real file: writing through a symlink must replace the file it points to (not the link) and take that
        # file's lock, or writers through the link and through the real path would run at once.
        self.link = Path(path)
        self.path = real_path(path)
        self.kind, self.model, self.preset = kind, model, preset
        self.params = params or {}
        self.run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
        self.tmp = staging_file(self.path, self.run_id)
        self._lock_fh: Any = None
        self.con: duckdb.DuckDBPyConnection | None = None
        self._started = datetime.now(timezone.utc)
        self.resume = resume
        self.resumed = False  # set by __enter__ when it reopened an unfinished run
        self.resumed_complete = False  # ... that was already marked complete (stopped while being swapped in)
        self.discarded: list[str] = []  # run ids of unfinished runs a fresh start deleted
        self.kept_unfinished = False  # a unit finished: a failing run keeps its temporary file for --resume

    # -- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> "StoreWriter":
        check_writable(self.path)  # one sentence for a read-only / special directory or a name that is too long
        try:
            self._lock_fh = open(_lock_path(self.path), "w")
        except OSError as exc:
            raise self._failed(exc) from None
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            raise StoreError(f"Another precompute is writing {literal(self.link)}: wait for it to finish, or stop "
                             "it.") from None
        if self.resume:
            try:
                self._reopen_unfinished()
            except BaseException:
                self._keep()  # the unfinished run stays as it was: it can still be resumed with the right options
                raise
            return self
        self.discarded = self._remove_orphans()
        try:
            base = self._base_stamp()
            if self.path.exists():
                # Validate before copying: never build a run on top of a corrupt, newer-schema or hostile file (a
                # view in it would otherwise run on the copying connection, which has file access).
                open_store(self.path).close()
                self._copy_live_to_tmp()
            self.con = duckdb.connect(str(self.tmp))
            self._ensure_schema()
            self.con.execute(schema.PROGRESS_DDL)
            self.con.execute("INSERT OR REPLACE INTO meta VALUES ('resume_base', ?)", [base])
            self.con.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, 'running', ?, NULL, NULL, NULL)",
                [self.run_id, self.kind, self.model, self.preset, json.dumps(self.params), self._started],
            )
        except BaseException as exc:
            self._discard()
            if isinstance(exc, (OSError, duckdb.IOException)):
                raise self._failed(exc) from None
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            if self.kept_unfinished:
                self._keep()  # the finished units survive an exception too (Ctrl-C, out of memory, a full disk)
            else:
                self._discard()
            if isinstance(exc, (OSError, duckdb.IOException)):
                # A full disk or a vanished directory while the run was written: the live store was never touched.
                raise self._failed(exc) from None
            return
        try:
            self.commit()
        except (OSError, duckdb.IOException) as err:
            if self.kept_unfinished:
                self._keep()
            else:
                self._discard()
            raise self._failed(err) from None

    def _failed(self, exc: BaseException) -> StoreError:
        """One sentence for a write that the file system refused (full disk, read-only, ...); the live store is
        unchanged because only the temporary copy was being written."""
        if isinstance(exc, OSError):
            what = _describe_os_error(exc)
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        else:
            what = _duckdb_message(exc)
            full = "space" in what.lower()
        todo = "free some disk space and run it again" if full else "check the directory and run it again"
        return StoreError(f"Writing the store {literal(self.link)} failed ({literal(what, 80)}); the store is "
                          f"unchanged: {todo}.")

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
        # What only a resumed run needs: no committed store holds it.
        self.con.execute(f"DROP TABLE IF EXISTS {schema.PROGRESS_TABLE}")
        self.con.execute("DELETE FROM meta WHERE key = 'resume_base'")
        # Saves listed since this run copied the store are folded into the copy before it replaces the store, under
        # the saves lock so that none can be listed between the fold and the swap (backend.store.saves).
        with saves.manifest_lock(self.path):
            folded = saves.fold_into(self.con, self.path)
            self.con.execute("CHECKPOINT")
            free, total = self.con.execute("SELECT free_blocks, total_blocks FROM pragma_database_size() "
                                           "WHERE database_name = current_database()").fetchall()[0]
            self.con.close()
            self.con = None
            if total and free / total > COMPACT_ABOVE:
                self._compact_tmp()
            with open(self.tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(self.tmp, self.path)  # the real file: a symlink to it stays a symlink
            _fsync_dir(self.path.parent)
            saves.forget(self.path, folded)
        self._release()

    # -- helpers -----------------------------------------------------------------------------------------
    def _compact_tmp(self) -> None:
        # DuckDB does not give the blocks of deleted or rewritten rows back to the file system: a run that replaced
        # dictionaries and features leaves a third or more of the file free. A copy through DuckDB writes only live
        # blocks; it replaces the run's file before the swap, so a kill -9 meanwhile leaves two orphans, no store.
        compacted = self.tmp.with_name(self.tmp.name + ".compact")
        try:
            con = duckdb.connect(str(compacted))
            try:
                con.execute(f"ATTACH '{str(self.tmp).replace(chr(39), chr(39) * 2)}' AS run (READ_ONLY)")
                db = con.execute("SELECT current_database()").fetchall()[0][0]
                con.execute(f'COPY FROM DATABASE run TO "{db}"')
                con.execute("DETACH run")
                con.execute("CHECKPOINT")
            finally:
                con.close()
            os.replace(compacted, self.tmp)
        except BaseException:
            for p in self.path.parent.glob(f"{compacted.name}*"):
                p.unlink(missing_ok=True)
            raise

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

    def _remove_orphans(self, keep: Path | None = None) -> list[str]:
        """Delete what writers killed mid-run left (we hold the lock, so no live writer owns them), except the
        temporary file ``keep`` and its WAL; returns the run ids of the unfinished runs deleted."""
        kept = {keep.name, f"{keep.name}.wal"} if keep is not None else set()
        gone = []
        for p in self.path.parent.glob(f"{_temp_prefix(self.path)}*.tmp*"):
            if p.name in kept:
                continue
            if p.name.endswith(".tmp"):
                gone.append(p.name[len(_temp_prefix(self.path)) : -len(".tmp")])
            p.unlink(missing_ok=True)
        return gone

    def _base_stamp(self) -> str:
        """The live file a run is copied from, as a string (inode, size, modification time; ``none`` when there is
        no store yet): a resumed run must be swapped over that same file, not over one put there meanwhile."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return "none"
        return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"

    def _reopen_unfinished(self) -> None:
        """Reopen the temporary file of the run a killed writer left, if its kind, model, preset and parameters are
        this writer's and the live store is the one it was copied from; one StoreError sentence otherwise."""
        prefix = _temp_prefix(self.path)
        found = staging_files(self.path)
        if not found:
            raise StoreError(f"There is no unfinished run of {literal(self.link)} to resume: run the precompute "
                             "without --resume.")
        tmp = found[-1]  # run ids start with their UTC start time: the latest
        run_id = tmp.name[len(prefix) : -len(".tmp")]
        damaged = (f"The unfinished run {literal(run_id)} of {literal(self.link)} cannot be resumed (its temporary "
                   f"file is damaged): run the precompute without --resume to start afresh.")
        try:
            open_store(tmp).close()  # views, macros, a newer schema: refused before a writable connection opens it
            self.con = duckdb.connect(str(tmp))
            rows = self.con.execute("SELECT kind, model, preset, params, status, started_at FROM runs WHERE run_id = ?",
                                    [run_id]).fetchall()
            base = self.con.execute("SELECT value FROM meta WHERE key = 'resume_base'").fetchall()
        except (StoreError, duckdb.Error):
            raise StoreError(damaged) from None
        if not rows:
            raise StoreError(damaged)
        kind, model, preset, params, status, started = rows[0]
        given = {"kind": self.kind, "model": self.model, "preset name": self.preset,
                 **_flat(json.loads(json.dumps(self.params)))}
        recorded = {"kind": kind, "model": model, "preset name": preset, **_flat(json.loads(params or "{}"))}
        differ = sorted(k for k in given.keys() | recorded.keys() if given.get(k) != recorded.get(k))
        if differ:
            raise StoreError(f"The unfinished run {literal(run_id)} of {literal(self.link)} was started with other "
                             f"options ({', '.join(differ)} differ): give the same options to resume it, or leave out "
                             "--resume to start afresh.")
        if not base or base[0][0] != self._base_stamp():
            raise StoreError(f"The store {literal(self.link)} was replaced after the unfinished run {literal(run_id)} "
                             "started, so that run cannot be swapped in: leave out --resume to start afresh.")
        self._remove_orphans(keep=tmp)
        # Written by an older circuitscope when it was updated between the interruption and this resume: bring the
        # copy to this schema as a new run's copy of an older store is (idempotent otherwise).
        self._ensure_schema()
        self.con.execute(schema.PROGRESS_DDL)
        self.kept_unfinished = True
        self.tmp, self.run_id, self.resumed = tmp, run_id, True
        self.resumed_complete = status == "complete"
        self._started = started.replace(tzinfo=timezone.utc) if started.tzinfo is None else started

    # -- progress of the run (what a resumed run skips) ---------------------------------------------------
    def finished_units(self) -> list[tuple[str, int | None, dict[str, Any], bytes | None]]:
        """The units of work this run finished so far, in the order they finished: ``(step, layer or None, info,
        state blob or None)``."""
        assert self.con is not None
        rows = self.con.execute(f"SELECT step, layer, info, state FROM {schema.PROGRESS_TABLE} WHERE run_id = ? "
                                "ORDER BY finished_at", [self.run_id]).fetchall()
        return [(step, layer, json.loads(info or "{}"), None if state is None else bytes(state))
                for step, layer, info, state in rows]

    def finish_unit(self, step: str, layer: int | None = None, info: dict[str, Any] | None = None,
                    state: bytes | None = None) -> None:
        """Record that ``step`` (``layer`` of it, or all of it when None) finished, and make everything the run wrote
        so far durable (a ``kill -9`` afterwards loses none of it)."""
        assert self.con is not None
        self.con.execute(f"DELETE FROM {schema.PROGRESS_TABLE} WHERE run_id = ? AND step = ? "
                         "AND layer IS NOT DISTINCT FROM ?", [self.run_id, step, layer])
        self.con.execute(f"INSERT INTO {schema.PROGRESS_TABLE} VALUES (?, ?, ?, ?, ?, ?)",
                         [self.run_id, step, layer, datetime.now(timezone.utc), json.dumps(info or {}, default=str),
                          state])
        self.con.execute("CHECKPOINT")
        self.kept_unfinished = True

    def _discard(self) -> None:
        self._close()
        for p in self.path.parent.glob(f"{self.tmp.name}*"):  # the file and its .wal, before the lock is released
            p.unlink(missing_ok=True)
        self._release()

    def _keep(self) -> None:
        """Close the run's connection and release the lock, leaving its temporary file (for ``--resume``)."""
        self._close()
        self._release()

    def _close(self) -> None:
        if self.con is not None:
            try:
                self.con.close()
            except duckdb.Error:
                pass
            self.con = None

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
    """``with reading(path) as con:`` — a read-only connection closed afterwards.

    A DuckDB error escaping the block (a damaged block met mid-query, a table the store lacks) becomes one StoreError
    sentence; the original is logged for developers.
    """
    con = open_store(path)
    try:
        with read_errors(path):
            yield con
    finally:
        con.close()


@contextmanager
def read_errors(path: str | Path) -> Iterator[None]:
    """``with read_errors(path):`` — a DuckDB error raised while reading the store at ``path`` becomes one StoreError
    sentence (the original is logged for developers)."""
    try:
        yield
    except duckdb.Error as exc:
        log.warning("reading %s failed", path, exc_info=exc)
        raise StoreError(f"{literal(path)} could not be read ({literal(_duckdb_message(exc))}): if it is damaged or "
                         f"was built by another program, delete it and {_hint(Path(path))}.") from None
