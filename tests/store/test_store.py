"""Store atomicity and robustness: readers never see half a run, kill -9 loses nothing, bad files say so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from backend.errors import StoreError
from backend.store import schema
from backend.store.access import StoreWriter, fingerprint, open_store

ROOT = Path(__file__).resolve().parents[2]


def _write_run(path: Path, model: str, fail: bool = False) -> str:
    with StoreWriter(path, kind="test", model=model) as w:
        w.insert_df("models", pd.DataFrame({"model": [model], "n_layers": [2], "run_id": [w.run_id]}))
        if fail:
            raise RuntimeError("boom")
        return w.run_id


def _models(path: Path) -> list[str]:
    con = open_store(path)
    try:
        return [r[0] for r in con.execute("SELECT model FROM models ORDER BY model").fetchall()]
    finally:
        con.close()


def test_runs_accumulate_and_are_marked_complete(tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    a = _write_run(store, "a")
    b = _write_run(store, "b")
    con = open_store(store)
    rows = con.execute("SELECT run_id, status FROM runs ORDER BY started_at").fetchall()
    con.close()
    assert rows == [(a, "complete"), (b, "complete")]
    assert _models(store) == ["a", "b"]


def test_failed_run_leaves_store_unchanged_and_no_temp_files(tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    _write_run(store, "a")
    before = store.read_bytes()
    with pytest.raises(RuntimeError):
        _write_run(store, "b", fail=True)
    assert store.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_reader_keeps_serving_while_a_writer_writes_and_sees_the_new_run_after(tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    _write_run(store, "a")
    reader = open_store(store)
    fp_before = fingerprint(store)
    with StoreWriter(store, kind="test", model="b") as w:
        w.insert_df("models", pd.DataFrame({"model": ["b"], "run_id": [w.run_id]}))
        # Mid-write: an existing reader and a brand-new reader both work and see only complete runs.
        assert reader.execute("SELECT count(*) FROM models").fetchall()[0][0] == 1
        assert _models(store) == ["a"]
    assert reader.execute("SELECT count(*) FROM models").fetchall()[0][0] == 1  # old snapshot stays valid
    assert _models(store) == ["a", "b"]  # a new connection sees the swapped-in file
    assert fingerprint(store) != fp_before
    reader.close()


def test_second_writer_is_refused_while_one_is_writing(tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    with StoreWriter(store, kind="test", model="a"):
        with pytest.raises(StoreError, match="Another precompute is writing"):
            with StoreWriter(store, kind="test", model="b"):
                pass


_SLOW_WRITER = textwrap.dedent(
    """
    import sys, time
    import pandas as pd
    from backend.store.access import StoreWriter
    with StoreWriter(sys.argv[1], kind="test", model="killed") as w:
        w.insert_df("models", pd.DataFrame({"model": ["killed"], "run_id": [w.run_id]}))
        print("writing", flush=True)
        time.sleep(60)
    """
)


def test_kill_9_mid_run_loses_nothing_and_rerun_works(tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    _write_run(store, "a")
    before = store.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(store)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the run is really in flight
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert store.read_bytes() == before and _models(store) == ["a"]
    _write_run(store, "b")  # the orphaned temp file is cleaned up and the new run lands
    assert _models(store) == ["a", "b"]
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_missing_store_message(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="No store at .*precompute"):
        open_store(tmp_path / "nope.duckdb")


@pytest.mark.parametrize("content", [b"", b"not a database at all" * 50, b"\x00" * 8 + b"DUCK" + b"\x00" * 5000])
def test_corrupt_store_message(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.duckdb"
    bad.write_bytes(content)
    with pytest.raises(StoreError) as info:
        open_store(bad)
    assert "\n" not in str(info.value) and "bad.duckdb" in str(info.value)


def test_truncated_store_message(tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    _write_run(store, "a")
    data = store.read_bytes()
    store.write_bytes(data[: len(data) // 3])
    with pytest.raises(StoreError):
        con = open_store(store)
        con.execute("SELECT * FROM models").fetchall()  # some truncations only show on read


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    _write_run(store, "a")
    con = duckdb.connect(str(store))
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(schema.SCHEMA_VERSION + 1)])
    con.close()
    with pytest.raises(StoreError, match="newer circuitscope"):
        open_store(store)
    with pytest.raises(StoreError, match="newer circuitscope"):
        _write_run(store, "b")  # and a writer will not build on top of it


def test_plain_duckdb_file_is_not_a_store(tmp_path: Path) -> None:
    other = tmp_path / "other.duckdb"
    con = duckdb.connect(str(other))
    con.execute("CREATE TABLE t (x INTEGER)")
    con.close()
    with pytest.raises(StoreError, match="not a circuitscope store"):
        open_store(other)


def test_schema_creates_every_documented_table(tmp_path: Path) -> None:
    store = tmp_path / "s.duckdb"
    _write_run(store, "a")
    con = open_store(store)
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    con.close()
    assert schema.EXPECTED_TABLES <= tables
    for name in schema.EXPECTED_TABLES:
        assert name in (schema.__doc__ or ""), f"table {name} is not documented in backend/schema.py"


def test_v1_store_is_upgraded_when_written(tmp_path: Path) -> None:
    """A store written by schema v1 (no v2 tables, attribution_runs without comparison_id) keeps its data and
    gains the v2 tables and column the next time a precompute writes to it."""
    store = tmp_path / "s.duckdb"
    _write_run(store, "a")
    con = duckdb.connect(str(store))
    v2_tables = ["head_scores", "induction_prefix", "induction_classes", "head_features", "head_polysemanticity",
                 "attribution_comparisons"]
    for table in v2_tables:
        con.execute(f"DROP TABLE {table}")
    con.execute("DROP INDEX IF EXISTS idx_attr_runs_cmp")
    con.execute("ALTER TABLE attribution_runs DROP COLUMN comparison_id")
    con.execute("INSERT INTO attribution_runs VALUES ('x', 'ioi', 'atp', 'a', '{}', 1.0, 2.0, 0.0, 'r')")
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.close()
    assert _models(store) == ["a"]  # a v1 store stays readable
    _write_run(store, "b")
    con = open_store(store)
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        assert set(v2_tables) <= tables
        rows = con.execute("SELECT attr_id, comparison_id FROM attribution_runs").fetchall()
        assert rows == [("x", None)]
        version = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()[0][0]
        assert int(version) == schema.SCHEMA_VERSION
    finally:
        con.close()
    assert _models(store) == ["a", "b"]


def test_v2_store_gains_the_v3_graph_columns_and_tables_when_written(tmp_path: Path) -> None:
    """A v2 store (graph tables with their v1 columns and a row, no replacement_evals) keeps its rows and gains the
    v3 columns (NULL for old rows) and table the next time a precompute writes to it."""
    store = tmp_path / "s.duckdb"
    _write_run(store, "a")
    con = duckdb.connect(str(store))
    con.execute("DROP TABLE replacement_evals")
    con.execute("DROP INDEX idx_graph_nodes")
    con.execute("DROP INDEX idx_graph_edges")
    for table, columns in (("graphs", ["metadata", "source", "title"]),
                           ("graph_nodes", ["dict_id", "value", "bias", "is_target", "attribution"]),
                           ("graph_edges", ["source_factor", "norm_factor"])):
        for column in columns:
            con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    con.execute("CREATE INDEX idx_graph_nodes ON graph_nodes (graph_id)")  # v2 had these indexes
    con.execute("CREATE INDEX idx_graph_edges ON graph_edges (graph_id)")
    con.execute("INSERT INTO graph_edges VALUES ('g', 'a', 'b', 1.5, NULL)")
    con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    con.close()
    assert _models(store) == ["a"]  # a v2 store stays readable
    _write_run(store, "b")
    con = open_store(store)
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        assert "replacement_evals" in tables
        cols = [r[0] for r in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = "
                                          "'graph_edges' ORDER BY ordinal_position").fetchall()]
        assert cols == ["graph_id", "source", "target", "weight", "invariant", "source_factor", "norm_factor"]
        assert con.execute("SELECT * FROM graph_edges").fetchall() == [("g", "a", "b", 1.5, None, None, None)]
        node_cols = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns WHERE "
                                               "table_name = 'graph_nodes'").fetchall()}
        assert {"dict_id", "value", "bias", "is_target", "attribution"} <= node_cols
        version = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()[0][0]
        assert int(version) == schema.SCHEMA_VERSION == 5

        assert "graph_views" in tables
    finally:
        con.close()


def test_an_older_store_reads_as_current_without_being_written(tmp_path: Path) -> None:
    """A v2 store (no replacement_evals table, no v3/v4 columns) is read through temporary views and tables that add
    what later versions added, as NULL or empty: every query runs, and the file is not touched."""
    from backend.store import queries

    store = tmp_path / "s.duckdb"
    _write_run(store, "a")
    con = duckdb.connect(str(store))
    con.execute("DROP TABLE replacement_evals")
    for version in (4, 3):
        for table, column in schema.ADDED_COLUMNS[version]:
            if table == "replacement_evals":
                continue
            con.execute(f"DROP INDEX IF EXISTS idx_{table}")
            con.execute("DROP INDEX IF EXISTS idx_graph_nodes")
            con.execute("DROP INDEX IF EXISTS idx_graph_edges")
            con.execute(f"ALTER TABLE {table} DROP COLUMN {column.split()[0]}")
    con.execute("INSERT INTO dictionaries (dict_id, model, kind, layer, fve) VALUES ('d', 'a', 'transcoder', 0, 0.5)")
    con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    con.close()
    before = store.read_bytes()
    con = open_store(store)
    try:
        quality = queries.transcoder_quality(con, "a")
        assert len(quality) == 1 and quality["fve"].iloc[0] == 0.5 and pd.isna(quality["baseline_fve"].iloc[0])
        assert queries.mlp_replacement_evals(con, "a").empty  # the table did not exist in v2
        assert con.execute("SELECT count(*) FROM graph_edges WHERE norm_factor IS NULL").fetchall() == [(0,)]
        assert "replacement_evals" not in queries.table_counts(con)  # counts list the store's own tables only
    finally:
        con.close()
    assert store.read_bytes() == before


def _blocks(path: Path) -> tuple[int, int]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute("SELECT free_blocks, total_blocks FROM pragma_database_size()").fetchall()[0]
    finally:
        con.close()


def test_a_run_that_rewrites_rows_leaves_no_free_space_behind(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    n = 400_000
    rows = pd.DataFrame({"dict_id": "d", "feature": range(n), "corpus_id": "c", "context_id": 1, "pos": 1,
                         "act": [float(i) for i in range(n)]})
    with StoreWriter(path, kind="test", model="m") as w:
        w.insert_df("feature_activations", rows)
    with StoreWriter(path, kind="test", model="m") as w:  # rewrite most rows, as a rerun of a step does
        w.con.execute("DELETE FROM feature_activations WHERE feature >= 1000")
        w.insert_df("feature_activations", rows.iloc[1000:200_000].assign(act=-1.0))
    free, total = _blocks(path)
    assert free <= 0.1 * total, (free, total)
    con = open_store(path)
    try:
        assert con.execute("SELECT count(*), sum(act < 0) FROM feature_activations").fetchall() == [(200_000, 199_000)]
    finally:
        con.close()
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]
