"""Graphs in the store: write one (tables ``graphs``, ``graph_nodes``, ``graph_edges``; schema v3) and read it back.

A graph is stored as built — pruning thresholds are applied when it is viewed — so the page's sliders work on
a stored graph without the model. All reads are SQL on a read-only connection (backend.store).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from backend.circuits.graph import EDGE_COLUMNS, NODE_COLUMNS, Graph
from backend.errors import StoreError
from backend.features.labels import label_nodes

if TYPE_CHECKING:
    from pathlib import Path

    import duckdb
    import pandas as pd


def graph_id_for(graph: Graph) -> str:
    """A short stable id from the model, prompt tokens, target, method and build parameters."""
    m = graph.metadata
    key = json.dumps([m.get("model"), m.get("token_ids"), m.get("target", {}).get("token_id"),
                      m.get("target", {}).get("wrong_id"), m.get("method"), m.get("params"),
                      m.get("dictionaries")], sort_keys=True, default=str)
    return "g-" + hashlib.sha1(key.encode()).hexdigest()[:12]


def default_title(graph: Graph) -> str:
    """``'<prompt end>' → ' Paris'`` style title (plain text; pages escape it)."""
    m = graph.metadata
    prompt = str(m.get("prompt", ""))
    short = prompt if len(prompt) <= 60 else "…" + prompt[-59:]
    t = m.get("target", {})
    target = repr(t.get("token"))
    if t.get("wrong") is not None:
        target += f" vs {t.get('wrong')!r}"
    return f"{short!r} → {target}"


def write_graph(con: "duckdb.DuckDBPyConnection", graph: Graph, run_id: str, source: str = "precompute",
                title: str | None = None) -> str:
    """Write ``graph`` (replacing one with the same id) into a writable store connection; returns its id."""
    import pandas as pd

    gid = graph_id_for(graph)
    delete_graph(con, gid)
    m = graph.metadata
    con.execute(
        "INSERT INTO graphs (graph_id, model, prompt, target, method, params, created_at, run_id, metadata, source, "
        "title) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [gid, m.get("model"), m.get("prompt"), json.dumps(m.get("target")), m.get("method"),
         json.dumps(m.get("params")), datetime.now(timezone.utc), run_id, json.dumps(m, default=str), source,
         title or default_title(graph)],
    )
    nodes = graph.nodes[list(NODE_COLUMNS)].copy()
    nodes.insert(0, "graph_id", gid)
    edges = graph.edges[list(EDGE_COLUMNS)].copy()
    edges.insert(0, "graph_id", gid)
    for table, frame in (("graph_nodes", nodes), ("graph_edges", edges)):
        con.register("_graph_df", pd.DataFrame(frame))
        cols = ", ".join(frame.columns)
        con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _graph_df")
        con.unregister("_graph_df")
    return gid


def delete_graph(con: "duckdb.DuckDBPyConnection", graph_id: str) -> None:
    """Remove one graph from a writable connection."""
    for table in ("graph_edges", "graph_nodes", "graphs"):
        con.execute(f"DELETE FROM {table} WHERE graph_id = ?", [graph_id])


def list_graphs(con: "duckdb.DuckDBPyConnection", model: str | None = None) -> "pd.DataFrame":
    """Stored graphs, newest first: id, title, model, method, source, created_at, node and edge counts."""
    where, args = ("WHERE g.model = ?", [model]) if model else ("", [])
    return con.execute(
        "SELECT g.graph_id, g.title, g.model, g.method, g.source, g.created_at, "
        "(SELECT count(*) FROM graph_nodes n WHERE n.graph_id = g.graph_id) AS n_nodes, "
        "(SELECT count(*) FROM graph_edges e WHERE e.graph_id = g.graph_id) AS n_edges "
        f"FROM graphs g {where} ORDER BY g.created_at DESC, g.graph_id", args).df()


def read_graph(con: "duckdb.DuckDBPyConnection", graph_id: str) -> Graph:
    """The stored graph ``graph_id`` (StoreError with what to do if there is none)."""
    rows = con.execute("SELECT metadata FROM graphs WHERE graph_id = ?", [graph_id]).fetchall()
    if not rows or rows[0][0] is None:
        raise StoreError(f"This store has no graph {graph_id!r}: pick one from the list of stored graphs, or build one.")
    metadata: dict[str, Any] = json.loads(rows[0][0])
    nodes = con.execute(f"SELECT {', '.join(NODE_COLUMNS)} FROM graph_nodes WHERE graph_id = ? ORDER BY rowid",
                        [graph_id]).df()
    edges = con.execute(f"SELECT {', '.join(EDGE_COLUMNS)} FROM graph_edges WHERE graph_id = ? ORDER BY rowid",
                        [graph_id]).df()
    nodes["feature"] = nodes["feature"].astype("Int64")
    nodes["is_target"] = nodes["is_target"].astype(bool)
    nodes = label_nodes(con, nodes)  # the features' current labels (a user's, else the automatic one)
    for c in ("source_factor", "invariant", "norm_factor", "weight"):
        edges[c] = edges[c].astype("float64")
    return Graph(nodes=nodes, edges=edges, metadata=metadata)


def write_view(con: "duckdb.DuckDBPyConnection", graph_id: str, view: dict[str, Any], run_id: str) -> None:
    """Write (replace) the saved view of graph ``graph_id`` (a :meth:`backend.circuits.view.ViewState.to_dict`)."""
    con.execute("DELETE FROM graph_views WHERE graph_id = ?", [graph_id])
    con.execute("INSERT INTO graph_views VALUES (?, ?, ?, ?)",
                [graph_id, json.dumps(view, ensure_ascii=False), datetime.now(timezone.utc), run_id])


def read_view(con: "duckdb.DuckDBPyConnection", graph_id: str) -> dict[str, Any] | None:
    """The saved view of graph ``graph_id`` as a dict (checked by :func:`backend.circuits.view.from_dict` when used),
    or None when it has none."""
    rows = con.execute("SELECT view FROM graph_views WHERE graph_id = ?", [graph_id]).fetchall()
    if not rows or rows[0][0] is None:
        return None
    try:
        data = json.loads(rows[0][0])
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def save_graph(store_path: "str | Path", graph: Graph, source: str, title: str | None = None,
               view: dict[str, Any] | None = None) -> str:
    """Save ``graph`` (and, if given, its ``view``: supernodes, labels, pins, thresholds) into the store at
    ``store_path`` (the CLI's ``--save`` and ``import-graph``, the Circuit Graph page's save button): a small file of
    its own beside the store, visible to readers at once, no copy of the store (:mod:`backend.store.saves`); returns
    its id."""
    from backend.store.access import saving

    model = str(graph.metadata.get("model"))
    with saving(store_path, kind="graph", model=model,
                params={"prompt": graph.metadata.get("prompt"), "source": source}) as writer:
        gid = write_graph(writer.con, graph, writer.run_id, source=source, title=title)
        if view is not None:
            write_view(writer.con, gid, view, writer.run_id)
        return gid


def save_view(store_path: "str | Path", graph_id: str, view: dict[str, Any], model: str) -> None:
    """Save the view of the stored graph ``graph_id`` beside the store (replacing its earlier saved view)."""
    from backend.store.access import saving

    with saving(store_path, kind="graph_view", model=model, params={"graph_id": graph_id}) as writer:
        write_view(writer.con, graph_id, view, writer.run_id)
