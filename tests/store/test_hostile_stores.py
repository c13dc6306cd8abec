"""Stores are files people share: whatever opens one must not let its contents reach outside it, and a store that is
not what it claims gets one sentence. Hostile stores are built here with plain DuckDB, as an attacker would."""

from __future__ import annotations

import contextlib
import errno
import io
import os
from pathlib import Path
from typing import Callable, Iterator

import duckdb
import pandas as pd
import pytest

from backend.errors import StoreError
from backend.store import access, schema
from backend.store.access import StoreWriter, check_writable, open_store, reading

SECRET = "circuitscope-secret-line-1234"


def _valid_store(path: Path) -> None:
    with StoreWriter(path, kind="test", model="m") as w:
        w.insert_df("models", pd.DataFrame({"model": ["m"], "n_layers": [2], "run_id": [w.run_id]}))


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    """A local file the attacker wants (text), plus the same line as Parquet and JSON for the readers that need
    those formats (``read_parquet`` refuses to create a view over a file that is not Parquet)."""
    path = tmp_path / "secret.txt"
    path.write_text(f"{SECRET}\n")
    con = duckdb.connect()
    con.execute(f"COPY (SELECT '{SECRET}' AS task) TO '{tmp_path / 'secret.parquet'}' (FORMAT parquet)")
    con.close()
    (tmp_path / "secret.json").write_text(f'{{"task": "{SECRET}"}}\n')
    return path


# Each builds, inside a valid store, an object whose use would read the secret file or list a directory.
ATTACKS: dict[str, Callable[[Path], str]] = {
    "read_text view": lambda f: f"CREATE OR REPLACE VIEW task_baselines AS SELECT content AS task FROM read_text('{f}')",
    "read_csv view": lambda f: f"CREATE OR REPLACE VIEW task_baselines AS SELECT * FROM read_csv('{f}', header=false)",
    "read_parquet view": lambda f: (f"CREATE OR REPLACE VIEW task_baselines AS SELECT * FROM "
                                    f"read_parquet('{f.with_suffix('.parquet')}')"),
    "read_json view": lambda f: (f"CREATE OR REPLACE VIEW task_baselines AS SELECT * FROM "
                                 f"read_json('{f.with_suffix('.json')}')"),
    "glob view": lambda f: f"CREATE OR REPLACE VIEW task_baselines AS SELECT file AS task FROM glob('{f.parent}/*')",
    "macro": lambda f: f"CREATE OR REPLACE MACRO secret() AS TABLE SELECT * FROM read_text('{f}')",
    "scalar macro": lambda f: f"CREATE OR REPLACE MACRO m(x) AS (SELECT content FROM read_text('{f}'))",
}
# What reads the planted object (rows cast to text: read_text's timestamp column would need pytz to fetch).
TRIGGERS = {"macro": "SELECT t::VARCHAR FROM secret() t", "scalar macro": "SELECT m(1)"}
READ_VIEW = "SELECT t::VARCHAR FROM task_baselines t"


def _hostile(tmp_path: Path, secret_file: Path, attack: str) -> Path:
    path = tmp_path / "hostile.duckdb"
    _valid_store(path)
    con = duckdb.connect(str(path))
    if "view" in attack:
        con.execute("DROP TABLE task_baselines")
    con.execute(ATTACKS[attack](secret_file))
    con.close()
    return path


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_the_attack_works_on_an_unprotected_connection(tmp_path: Path, secret_file: Path, attack: str) -> None:
    """The hostile stores below are real attacks: opened the way circuitscope did before (plain ATTACH, file access
    on), reading the planted object returns the secret file (or the directory listing)."""
    path = _hostile(tmp_path, secret_file, attack)
    con = duckdb.connect(":memory:")
    con.execute(f"ATTACH '{path}' AS store (READ_ONLY)")
    con.execute("USE store")
    rows = con.execute(TRIGGERS.get(attack, READ_VIEW)).fetchall()
    con.close()
    assert SECRET in str(rows) or "secret.txt" in str(rows)


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_store_with_views_or_macros_is_refused_with_one_sentence(tmp_path: Path, secret_file: Path,
                                                                    attack: str) -> None:
    path = _hostile(tmp_path, secret_file, attack)
    with pytest.raises(StoreError) as err:
        open_store(path)
    message = str(err.value)
    assert "\n" not in message and SECRET not in message and "views or macros" in message


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_even_without_the_views_check_a_reader_cannot_read_the_file(tmp_path: Path, secret_file: Path, attack: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: with the views-and-macros refusal switched off, the reader connection's lockdown alone still
    stops every planted object from reading a local file, and reading() turns the failure into one sentence."""
    path = _hostile(tmp_path, secret_file, attack)
    monkeypatch.setattr(access, "views_and_macros", lambda con: (0, 0))
    with pytest.raises(StoreError) as err:
        with reading(path) as con:
            con.execute(TRIGGERS.get(attack, READ_VIEW)).fetchall()
    assert SECRET not in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_writer_never_builds_on_a_hostile_store(tmp_path: Path, secret_file: Path, attack: str) -> None:
    path = _hostile(tmp_path, secret_file, attack)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="views or macros"):
        with StoreWriter(path, kind="test", model="m"):
            pass
    assert path.read_bytes() == before
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def _run_cli(args: list[str]) -> tuple[int, str, str]:
    from backend.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(args)
    return status, out.getvalue(), err.getvalue()


def test_the_info_command_does_not_print_a_local_file(tmp_path: Path, secret_file: Path) -> None:
    path = _hostile(tmp_path, secret_file, "read_text view")
    status, out, err = _run_cli(["info", str(path)])
    assert status == 2 and SECRET not in out + err
    assert err.startswith("error: ") and err.count("\n") == 1 and "views or macros" in err


STATEMENTS = [
    "SELECT content FROM read_text('{f}')",
    "SELECT * FROM read_csv('{f}')",
    "SELECT * FROM read_parquet('{d}/secret.parquet')",
    "SELECT * FROM read_json('{d}/secret.json')",
    "SELECT * FROM glob('{d}/*')",
    "COPY (SELECT 1) TO '{d}/out.csv'",
    "ATTACH '{d}/other.duckdb' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SET lock_configuration = false",
]


@pytest.mark.parametrize("statement", STATEMENTS)
def test_a_reader_connection_cannot_touch_the_file_system(tmp_path: Path, secret_file: Path, statement: str) -> None:
    """Even SQL run directly on a reader connection (what every page and the CLI read through) stays inside the
    store: file functions, COPY, ATTACH, extensions and turning access back on all fail."""
    path = tmp_path / "s.duckdb"
    _valid_store(path)
    sql = statement.format(f=secret_file, d=tmp_path)
    if not statement.startswith(("INSTALL", "LOAD", "SET")):  # those need no proof: they change no file
        plain = duckdb.connect(":memory:")  # the same statement works on an unprotected connection
        plain.execute(sql).fetchall()
        plain.close()
        for made in ("out.csv", "other.duckdb"):
            (tmp_path / made).unlink(missing_ok=True)
    with reading(path) as con:
        with pytest.raises(duckdb.Error):
            con.execute(sql).fetchall()
        assert con.execute("SELECT count(*) FROM models").fetchall() == [(1,)]  # the store itself still reads
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "other.duckdb").exists()


# ---------------------------------------------------------------------------------------------------------------
# Stores that are not what they claim


def _raw(path: Path, statements: list[str]) -> Path:
    con = duckdb.connect(str(path))
    for s in statements:
        con.execute(s)
    con.close()
    return path


META = "CREATE TABLE meta (key VARCHAR, value VARCHAR)"


@pytest.mark.parametrize("statements, needle", [
    ([META], "no schema version"),
    ([META, "INSERT INTO meta VALUES ('schema_version', NULL)"], "no schema version"),
    ([META, "INSERT INTO meta VALUES ('schema_version', 'three')"], "schema version `three`"),
    ([META, "INSERT INTO meta VALUES ('schema_version', '²')"], "not a whole number"),
    ([META, "INSERT INTO meta VALUES ('schema_version', '-1')"], "not a whole number"),
    ([META, "INSERT INTO meta VALUES ('schema_version', '99999999999999999999999')"], "not a whole number"),
    ([META, f"INSERT INTO meta VALUES ('schema_version', '{schema.SCHEMA_VERSION}')"], "missing table(s)"),
    (["CREATE TABLE meta (key VARCHAR, value INTEGER)", "INSERT INTO meta VALUES ('schema_version', 1)"],
     "missing table(s)"),
])
def test_meta_only_and_bad_version_stores_get_one_sentence(tmp_path: Path, statements: list[str], needle: str) -> None:
    path = _raw(tmp_path / "odd.duckdb", statements)
    with pytest.raises(StoreError) as err:
        open_store(path)
    assert needle in str(err.value) and "\n" not in str(err.value)
    status, _, stderr = _run_cli(["info", str(path)])  # the CLI: one error line, status 2
    assert status == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1 and needle in stderr


def test_a_store_missing_one_core_table_names_it(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    _valid_store(path)
    _raw(path, ["DROP TABLE corpora"])
    with pytest.raises(StoreError, match=r"missing table\(s\) corpora"):
        open_store(path)


def _damaged_copies(tmp_path: Path) -> Iterator[Path]:
    """Copies of a valid store (with a 100k-row vocab table spanning many blocks) with one 256 KiB window of the file
    damaged, window by window: the header stays intact, so some copies open and only fail once a query reaches the
    damaged block."""
    path = tmp_path / "rot.duckdb"
    with StoreWriter(path, kind="test", model="m") as w:
        w.insert_df("models", pd.DataFrame({"model": ["m"], "n_layers": [2], "run_id": [w.run_id]}))
        w.con.execute("INSERT INTO vocab SELECT 'm', i, 'token ' || i FROM range(100000) t(i)")
    data = path.read_bytes()
    window = 256 * 1024
    for start in range(3 * 4096, len(data), window):  # the first three blocks are the file's headers
        damaged = bytearray(data)
        for i in range(start + 100, min(len(data), start + window), 4001):
            damaged[i] ^= 0xFF
        copy = tmp_path / f"rot-{start}.duckdb"
        copy.write_bytes(bytes(damaged))
        yield copy


def _opens(path: Path) -> bool:
    try:
        open_store(path).close()
        return True
    except StoreError:
        return False


def _read_all(con: duckdb.DuckDBPyConnection) -> int:
    return len(con.execute("SELECT * FROM vocab").fetchall()) + len(con.execute("SELECT * FROM models").fetchall())


def test_a_store_that_rots_mid_query_gets_one_sentence(tmp_path: Path) -> None:
    """Bit rot met in the middle of a query (not while opening) is one StoreError sentence from reading()."""
    mid_query = []
    for copy in _damaged_copies(tmp_path):
        if not _opens(copy):
            continue
        con = open_store(copy)
        try:
            _read_all(con)
        except duckdb.Error:
            mid_query.append(copy)
        finally:
            con.close()
    assert mid_query, "no damaged copy opened and then failed mid-query: the test needs another layout"
    for copy in mid_query:
        with pytest.raises(StoreError) as err:
            with reading(copy) as con:
                _read_all(con)
        message = str(err.value)
        assert "\n" not in message and "could not be read" in message and "delete it" in message


def read_everything(con: duckdb.DuckDBPyConnection) -> int:
    """A store query function as the pages pass them to StoreRef.query (module-level: its name is the cache key)."""
    return _read_all(con)


def test_the_ui_cached_queries_turn_rot_into_one_sentence(tmp_path: Path) -> None:
    from backend.ui.cache import StoreRef

    copy = next(c for c in _damaged_copies(tmp_path) if _opens(c) and not _reads(c))
    st = copy.stat()
    ref = StoreRef(name=copy.name, path=copy, key=(st.st_ino, st.st_mtime_ns, st.st_size))
    with pytest.raises(StoreError, match="could not be read"):
        ref.query(read_everything)


def _reads(path: Path) -> bool:
    try:
        with reading(path) as con:
            _read_all(con)
        return True
    except StoreError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# Symlinks


def test_a_writer_through_a_symlink_writes_the_real_store_and_shares_its_lock(tmp_path: Path) -> None:
    real = tmp_path / "real" / "s.duckdb"
    real.parent.mkdir()
    _valid_store(real)
    link = tmp_path / "link.duckdb"
    link.symlink_to(real)
    with StoreWriter(link, kind="test", model="m2") as w:
        w.insert_df("models", pd.DataFrame({"model": ["m2"], "n_layers": [2], "run_id": [w.run_id]}))
        with pytest.raises(StoreError, match="Another"):  # the same lock through the real path
            with StoreWriter(real, kind="test", model="m3"):
                pass
    assert link.is_symlink() and os.readlink(link) == str(real)
    with reading(real) as con:
        assert sorted(r[0] for r in con.execute("SELECT model FROM models").fetchall()) == ["m", "m2"]
    assert not any(p.name.endswith(".tmp") for p in (tmp_path, real.parent) for p in p.iterdir())


def test_a_symlink_loop_is_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "a.duckdb").symlink_to(tmp_path / "b.duckdb")
    (tmp_path / "b.duckdb").symlink_to(tmp_path / "a.duckdb")
    for call in (lambda: open_store(tmp_path / "a.duckdb"), lambda: StoreWriter(tmp_path / "a.duckdb", "test", "m"),
                 lambda: check_writable(tmp_path / "a.duckdb")):
        with pytest.raises(StoreError, match="symlink loop"):
            call()


# ---------------------------------------------------------------------------------------------------------------
# The file system refuses a write


@pytest.mark.parametrize("where", ["copy", "commit"])
def test_a_full_disk_leaves_the_live_store_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  where: str) -> None:
    """ENOSPC while the live store is copied, or while the finished run is made durable: one sentence saying to free
    space, the live file byte for byte as before, no temporary file left behind."""
    path = tmp_path / "s.duckdb"
    _valid_store(path)
    before = path.read_bytes()

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "copy":
        monkeypatch.setattr(StoreWriter, "_copy_live_to_tmp", full)
    else:
        monkeypatch.setattr(access.os, "fsync", full)
    with pytest.raises(StoreError) as err:
        with StoreWriter(path, kind="test", model="m2") as w:
            w.insert_df("models", pd.DataFrame({"model": ["m2"], "n_layers": [2], "run_id": [w.run_id]}))
    monkeypatch.undo()
    message = str(err.value)
    assert "free some disk space" in message and "unchanged" in message and "\n" not in message
    assert path.read_bytes() == before
    assert not any(p.name.endswith((".tmp", ".tmp.wal")) for p in tmp_path.iterdir())
    with reading(path) as con:
        assert [r[0] for r in con.execute("SELECT model FROM models").fetchall()] == ["m"]
