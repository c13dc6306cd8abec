"""Saves (backend.store.saves): small writes beside the store that never copy it, are visible only once listed, survive
concurrency and kill -9, and are folded into the store by the next precompute run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from backend.errors import StoreError
from backend.store import saves
from backend.store import access
from backend.store.access import StoreWriter, fingerprint, open_store, reading

ROOT = Path(__file__).resolve().parents[2]


def _store(path: Path) -> Path:
    with StoreWriter(path, kind="test", model="m") as w:
        w.insert_df("graphs", pd.DataFrame({"graph_id": ["g-main", "g-shared"], "title": ["main", "old title"]}))
        w.insert_df("graph_nodes", pd.DataFrame({"graph_id": ["g-main", "g-shared"], "node_id": ["a", "old"]}))
    return path


def _save_graph(path: Path, graph_id: str, title: str, nodes: list[str]) -> str:
    with access.saving(path, kind="graph", model="m") as w:
        w.insert_df("graphs", pd.DataFrame({"graph_id": [graph_id], "title": [title], "run_id": [w.run_id]}))
        w.insert_df("graph_nodes", pd.DataFrame({"graph_id": graph_id, "node_id": nodes}))
        return w.run_id


def _titles(path: Path) -> dict[str, str]:
    with reading(path) as con:
        return dict(con.execute("SELECT graph_id, title FROM graphs").fetchall())


def test_a_save_is_visible_at_once_and_never_rewrites_the_store(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.duckdb")
    before, stamp = store.read_bytes(), fingerprint(store).key
    _save_graph(store, "g-new", "new", ["x", "y"])
    assert store.read_bytes() == before  # the store file itself is untouched
    assert fingerprint(store).key != stamp  # but a cache keyed on the store sees a new version
    assert _titles(store) == {"g-main": "main", "g-shared": "old title", "g-new": "new"}
    with reading(store) as con:
        assert con.execute("SELECT count(*) FROM graph_nodes WHERE graph_id = 'g-new'").fetchall() == [(2,)]
        assert con.execute("SELECT kind, status FROM runs WHERE kind = 'graph'").fetchall() == [("graph", "complete")]


def test_a_newer_save_replaces_rows_with_the_same_key(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.duckdb")
    _save_graph(store, "g-shared", "newer title", ["n1", "n2", "n3"])
    _save_graph(store, "g-shared", "newest title", ["n4"])
    assert _titles(store)["g-shared"] == "newest title"
    with reading(store) as con:
        nodes = [r[0] for r in con.execute("SELECT node_id FROM graph_nodes WHERE graph_id = 'g-shared'").fetchall()]
    assert nodes == ["n4"]


def test_two_saves_at_once_both_land(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.duckdb")
    errors: list[BaseException] = []

    def save(i: int) -> None:
        try:
            _save_graph(store, f"g-{i}", f"t{i}", [f"n{i}"])
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
            errors.append(exc)

    with saves.manifest_lock(store.resolve()):  # both saves have to wait for the lock, then both succeed
        threads = [threading.Thread(target=save, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.5)
    for t in threads:
        t.join()
    assert not errors
    assert {"g-0", "g-1"} <= set(_titles(store))


def test_kill_9_mid_save_leaves_nothing_visible_and_the_next_save_cleans_up(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.duckdb")
    script = textwrap.dedent(f"""
        import sys, time, pandas as pd
        sys.path.insert(0, {str(ROOT)!r})
        from backend.store import access
        with access.saving({str(store)!r}, kind="graph", model="m") as w:
            w.insert_df("graphs", pd.DataFrame({{"graph_id": ["g-killed"], "title": ["killed"]}}))
            print("writing", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert "g-killed" not in _titles(store)
    part = [p for p in saves.saves_dir(store.resolve()).glob("*.part.duckdb*")]
    assert part  # the killed save's file is there, unlisted
    old = time.time() - 3600
    for p in part:
        os.utime(p, (old, old))  # as if it had been left an hour ago
    _save_graph(store, "g-next", "next", ["n"])
    assert not list(saves.saves_dir(store.resolve()).glob("*.part.duckdb*"))
    assert "g-next" in _titles(store) and "g-killed" not in _titles(store)


def test_a_precompute_run_folds_the_saves_into_the_store(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.duckdb")
    _save_graph(store, "g-new", "new", ["x"])
    _save_graph(store, "g-shared", "saved title", ["s"])
    with StoreWriter(store, kind="test", model="m") as w:
        w.insert_df("models", pd.DataFrame({"model": ["m2"], "run_id": [w.run_id]}))
    assert saves.listed(store.resolve()) == []
    assert not list(saves.saves_dir(store.resolve()).glob("*.duckdb"))
    assert _titles(store) == {"g-main": "main", "g-shared": "saved title", "g-new": "new"}
    # The store file alone now holds everything (what `compact` is for before sharing a store).
    import duckdb

    con = duckdb.connect(str(store), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM graphs").fetchall() == [(3,)]
    finally:
        con.close()


def test_many_saves_are_consolidated_into_one_file(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.duckdb")
    for i in range(saves.CONSOLIDATE_AT + 1):
        _save_graph(store, f"g-{i}", f"t{i}", [f"n{i}"])
    assert len(saves.listed(store.resolve())) < saves.CONSOLIDATE_AT
    assert {f"g-{i}" for i in range(saves.CONSOLIDATE_AT + 1)} <= set(_titles(store))


def test_a_hostile_listed_save_is_refused(tmp_path: Path) -> None:
    import duckdb

    store = _store(tmp_path / "s.duckdb")
    _save_graph(store, "g-new", "new", ["x"])
    f = saves.listed(store.resolve())[0]
    con = duckdb.connect(str(f))
    con.execute("CREATE VIEW graphs_v AS SELECT * FROM read_text('/etc/hostname')")
    con.close()
    with pytest.raises(StoreError, match="views or macros"):
        open_store(store)


def test_a_damaged_manifest_is_one_sentence(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.duckdb")
    _save_graph(store, "g-new", "new", ["x"])
    (saves.saves_dir(store.resolve()) / saves.MANIFEST).write_text("{not json")
    with pytest.raises(StoreError) as err:
        open_store(store)
    assert "\n" not in str(err.value) and "manifest" in str(err.value)
    (saves.saves_dir(store.resolve()) / saves.MANIFEST).write_text(json.dumps({"saves": ["missing.duckdb"]}))
    with pytest.raises(StoreError, match="missing or damaged"):
        open_store(store)


def test_a_save_cannot_create_a_store_or_write_other_tables(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="No store"):
        _save_graph(tmp_path / "missing.duckdb", "g", "t", ["n"])
    store = _store(tmp_path / "s.duckdb")
    with pytest.raises(ValueError, match="cannot write table"):
        with access.saving(store, kind="x", model="m") as w:
            w.insert_df("dictionaries", pd.DataFrame({"dict_id": ["d"]}))
    assert saves.listed(store.resolve()) == []  # the failed save was not listed


def test_compact_cli_folds_saves_and_refuses_a_missing_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from backend.cli import main

    store = _store(tmp_path / "s.duckdb")
    _save_graph(store, "g-new", "new", ["x"])
    _save_graph(store, "g-other", "other", ["y"])
    assert main(["compact", str(store)]) == 0
    assert "2 save files folded" in capsys.readouterr().out
    assert saves.listed(store.resolve()) == []
    import duckdb

    con = duckdb.connect(str(store), read_only=True)  # the store file alone, without its saves directory
    try:
        got = dict(con.execute("SELECT graph_id, title FROM graphs").fetchall())
    finally:
        con.close()
    assert got == {"g-main": "main", "g-shared": "old title", "g-new": "new", "g-other": "other"}
    assert main(["compact", str(tmp_path / "missing.duckdb")]) == 2
    assert "There is no store at" in capsys.readouterr().err


def test_graph_rows_read_back_in_the_order_they_were_written(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.duckdb")
    order = ["n9", "n1", "n5", "n3"]  # not sorted: the order a graph was built in
    _save_graph(store, "g-new", "new", order)
    with reading(store) as con:
        got = [r[0] for r in con.execute("SELECT node_id FROM graph_nodes WHERE graph_id = 'g-new' ORDER BY rowid")
               .fetchall()]
        main = con.execute("SELECT node_id FROM graph_nodes WHERE graph_id = 'g-main' ORDER BY rowid").fetchall()
    assert got == order and main == [("a",)]
