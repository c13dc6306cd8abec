"""The server's pool of open read-only connections (backend/store/readers.py): reused within a store version, fresh
after a new run or a save, as locked down as a fresh connection, and dropped after a failed query."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest

from backend.errors import StoreError
from backend.store import readers
from backend.store.access import StoreWriter, fingerprint


@pytest.fixture(autouse=True)
def _no_pools_left() -> Iterator[None]:
    yield
    readers.close_all()


def _write_run(path: Path, model: str) -> None:
    with StoreWriter(path, kind="test", model=model) as w:
        w.insert_df("models", pd.DataFrame({"model": [model], "n_layers": [2], "run_id": [w.run_id]}))


def _models(path: Path) -> list[str]:
    with readers.pool(path, fingerprint(path).key).connection() as con:
        return [r[0] for r in con.execute("SELECT model FROM models ORDER BY model").fetchall()]


def test_one_version_reuses_its_connection(tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    _write_run(store, "a")
    key = fingerprint(store).key
    with readers.pool(store, key).connection() as first:
        pass
    with readers.pool(store, key).connection() as second:
        assert second is first
        assert second.execute("SELECT count(*) FROM models").fetchall()[0][0] == 1


def test_callers_at_once_get_their_own_connections(tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    _write_run(store, "a")
    pool = readers.pool(store, fingerprint(store).key)
    with pool.connection() as one, pool.connection() as two:
        assert one is not two
        assert one.execute("SELECT 1").fetchall() == two.execute("SELECT 1").fetchall()


def test_a_new_run_gives_a_new_pool_that_sees_it(tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    _write_run(store, "a")
    assert _models(store) == ["a"]
    old = readers.pool(store, fingerprint(store).key)
    with old.connection() as lent:
        _write_run(store, "b")
        assert _models(store) == ["a", "b"]  # the new version's pool opens the swapped-in file
        assert lent.execute("SELECT count(*) FROM models").fetchall()[0][0] == 1  # a lent one keeps its snapshot
    assert old._idle == []  # retired: the old file's connection was closed when it came back


def test_pooled_connections_are_locked_down(tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    _write_run(store, "a")
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    pool = readers.pool(store, fingerprint(store).key)
    with pool.connection() as first:
        first.execute("SELECT count(*) FROM models").fetchall()
    with pytest.raises(StoreError, match="read_text|disabled|Permission"):
        with pool.connection() as again:
            assert again is first  # the reused connection, not a fresh one
            again.execute(f"SELECT * FROM read_text('{secret}')").fetchall()


def test_a_failed_query_closes_its_connection(tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    _write_run(store, "a")
    pool = readers.pool(store, fingerprint(store).key)
    with pytest.raises(StoreError, match="could not be read"):
        with pool.connection() as bad:
            bad.execute("SELECT * FROM no_such_table").fetchall()
    with pool.connection() as con:
        assert con is not bad
    with pytest.raises(Exception):
        bad.execute("SELECT 1")  # closed
