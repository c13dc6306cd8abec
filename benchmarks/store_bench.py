"""Store writes and size: what a save costs next to a precompute-style commit, and where the bytes go.

On a copy of the demo store (``data/stores/demo.duckdb``; the tiny test store when there is none):
* saving one stored graph again (``save_graph``: a file beside the store) vs an empty precompute run (which copies the
  store), medians of three; two saves started at once, both checked to land;
* the store's size per corpus token and its largest tables (DuckDB's own block accounting, ``pragma_storage_info``;
  dictionary weights are blobs outside it, counted apart), and feature_activations' bytes per nonzero activation.

``python -m benchmarks.store_bench`` writes ``benchmarks/results/store-latest.json``.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "stores" / "demo.duckdb"


def _tiny_store(tmp: Path) -> Path:
    from backend.pipeline.run import precompute

    path = tmp / "tiny.duckdb"
    precompute("tiny-llama", path, preset="demo", n_contexts=8)
    return path


def table_bytes(con: Any) -> dict[str, int]:
    """Bytes of every table of the connection's database, counted as DuckDB's storage blocks."""
    block = con.execute("SELECT block_size FROM pragma_database_size()").fetchall()[0][0]
    tables = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE NOT temporary").fetchall()]
    return {t: int(con.execute(f"SELECT count(DISTINCT block_id) FROM pragma_storage_info('{t}') WHERE persistent"
                                ).fetchall()[0][0]) * int(block) for t in tables}


def _sizes(path: Path) -> dict[str, Any]:
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        tokens = con.execute("SELECT coalesce(sum(n_tokens), 0) FROM corpora").fetchall()[0][0]
        free = con.execute("SELECT free_blocks * block_size FROM pragma_database_size()").fetchall()[0][0]
        weights = con.execute("SELECT coalesce(sum(octet_length(data)), 0) FROM dictionary_weights").fetchall()[0][0]
        per_table = table_bytes(con)
        nonzeros = con.execute("SELECT count(*) FROM feature_activations").fetchall()[0][0]
    finally:
        con.close()
    size = path.stat().st_size
    top = dict(sorted(per_table.items(), key=lambda kv: -kv[1])[:6])
    return {"bytes": size, "corpus_tokens": int(tokens), "bytes_per_corpus_token": round(size / max(tokens, 1), 1),
            "dictionary_weights_bytes": int(weights), "free_bytes": int(free), "largest_tables_bytes": top,
            "feature_activations": {"nonzeros": int(nonzeros), "bytes_per_nonzero": round(
                per_table.get("feature_activations", 0) / max(nonzeros, 1), 2)}}


def run(demo: Path = DEMO) -> dict[str, Any]:
    """The store write overhead and size figures (see the module docstring), on a copy of ``demo``."""
    from backend.circuits.storage import list_graphs, read_graph, save_graph
    from backend.store.access import StoreWriter, reading

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        source = demo if demo.exists() else _tiny_store(tmp)
        store = tmp / "copy.duckdb"
        shutil.copyfile(source, store)
        with reading(store) as con:
            graphs = list_graphs(con)
            graph = read_graph(con, graphs["graph_id"].iloc[0]) if len(graphs) else None
        result: dict[str, Any] = {"store": source.name, **_sizes(store)}
        if graph is None:
            result["note"] = "the store has no graph to save again"
            return result
        save_s, commit_s = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            save_graph(store, graph, source="bench")
            save_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with StoreWriter(store, kind="bench", model=""):
                pass
            commit_s.append(time.perf_counter() - t0)
        errors: list[BaseException] = []

        def one() -> None:
            try:
                save_graph(store, graph, source="bench-concurrent")
            except BaseException as exc:  # noqa: BLE001 - recorded: the bench reports whether both landed
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with reading(store) as con:
            # Both saves write the same graph (same id: the newer replaces the older), so count their save runs.
            landed = con.execute("SELECT count(*) FROM runs WHERE kind = 'graph' AND status = 'complete' "
                                 "AND params LIKE '%bench-concurrent%'").fetchall()[0][0]
        result.update({
            "graph_edges": len(graph.edges),
            "save_graph_s_median": round(statistics.median(save_s), 3),
            "empty_precompute_commit_s_median": round(statistics.median(commit_s), 3),
            "commit_over_save": round(statistics.median(commit_s) / statistics.median(save_s), 1),
            "two_saves_at_once_landed": int(landed), "two_saves_errors": [str(e) for e in errors],
        })
    return result


if __name__ == "__main__":
    import argparse
    import json
    from datetime import datetime, timezone

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--demo", type=Path, default=DEMO, help="the store to measure (a copy of it)")
    result = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "store": run(parser.parse_args().demo)}
    (ROOT / "benchmarks" / "results" / "store-latest.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
