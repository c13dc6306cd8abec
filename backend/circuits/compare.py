"""Two attribution graphs side by side: which nodes they share, which only one has, whose influence changed most.

Nodes of two prompts cannot be matched by ``node_id``: it holds the token position, and the same feature fires at
different positions in prompts of different lengths (``T12_5_1034`` in one, ``T12_7_1034`` in the other). They are
matched by a position-independent **key** (:func:`node_key`):

================  ==============================  ==========================================================
kind              key                             why
================  ==============================  ==========================================================
transcoder        (kind, layer, feature)          the same dictionary direction, wherever it fires
attn_feature      (kind, layer, feature)          as above, for an attention-SAE feature
embedding         (kind, token id)                the same token's embedding (positions differ)
mlp_error         (kind, layer)                   what the dictionary of that layer misses; per position
attn_error        (kind, layer)                   they would never match, per layer they say whether both
                                                  graphs lean on that layer's error
head              (kind, layer, head)             graphs stored with head nodes
logit             (kind, answer token id)         the target: equal when both explain the same answer
================  ==============================  ==========================================================

Several nodes of one graph can share a key (a feature active at two positions); a key's **influence** in a graph
is the sum of its nodes' influence on that graph's target (:func:`backend.circuits.prune.influence`), so it says
how much of each graph's explanation runs through that unit, whatever the positions. The **change** of a key is
influence in B − influence in A (0 where a graph lacks the key); :attr:`GraphComparison.changed` ranks keys by
``|change|``. Pure functions of two :class:`~backend.circuits.graph.Graph` objects: nothing is run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from backend.circuits.graph import ERROR_KINDS, FEATURE_KINDS, Graph, finite

if TYPE_CHECKING:
    import pandas as pd

Key = tuple[Any, ...]
DEFAULT_TOP = 20
KEY_COLUMNS: tuple[str, ...] = ("key", "kind", "layer", "index", "label", "in_a", "in_b", "influence_a",
                                "influence_b", "change", "nodes_a", "nodes_b")


def node_key(row: Mapping[str, Any]) -> Key:
    """The position-independent key of one node row (see the module docstring's table)."""
    kind = str(row["kind"])
    layer = int(row["layer"]) if finite(row.get("layer")) else -1
    index = int(row["feature"]) if finite(row.get("feature")) else None
    if kind in FEATURE_KINDS or kind == "head":
        return (kind, layer, index)
    if kind in ERROR_KINDS:
        return (kind, layer)
    if kind == "embedding":
        return (kind, index)
    return (kind, index)  # the target logit, by answer token


def key_text(key: Key) -> str:
    """A short readable name of a key: ``transcoder L12 #1034``, ``embedding token 504``, ``mlp_error L3``."""
    kind = key[0]
    if kind in FEATURE_KINDS:
        return f"{kind} L{key[1]} #{key[2]}"
    if kind == "head":
        return f"head L{key[1]}H{key[2]}"
    if kind in ERROR_KINDS:
        return f"{kind} L{key[1]}"
    return f"{kind} token {key[1]}"


def _with_influence(graph: Graph) -> Graph:
    """``graph`` itself when every node has an influence, else a copy with it computed."""
    from backend.circuits.prune import with_influence

    inf = graph.nodes["influence"]
    return graph if len(inf) and inf.notna().all() else with_influence(graph)


def key_table(graph: Graph) -> "pd.DataFrame":
    """One row per key of ``graph``: key, kind, layer, index, a label (the first node's), total influence on the
    target, the number of nodes and their ids."""
    import pandas as pd

    g = _with_influence(graph)
    rows: dict[Key, dict[str, Any]] = {}
    for r in g.nodes.to_dict("records"):
        k = node_key(r)
        row = rows.setdefault(k, {"key": k, "kind": k[0], "layer": int(r["layer"]) if finite(r.get("layer")) else None,
                                  "index": None if k[0] in ERROR_KINDS else k[-1],
                                  "label": r.get("label") if isinstance(r.get("label"), str) else "",
                                  "influence": 0.0, "node_ids": []})
        row["influence"] += float(r["influence"]) if finite(r.get("influence")) else 0.0
        row["node_ids"].append(str(r["node_id"]))
    return pd.DataFrame(list(rows.values()), columns=["key", "kind", "layer", "index", "label", "influence", "node_ids"])


@dataclass
class GraphComparison:
    """Two graphs' keys joined: ``table`` has one row per key of either graph (:data:`KEY_COLUMNS`), sorted by
    ``|change|`` (largest first); the sets say which keys (and node ids) are shared or unique."""

    table: "pd.DataFrame"
    prompt_a: str
    prompt_b: str

    @property
    def shared(self) -> "pd.DataFrame":
        """Keys present in both graphs."""
        return self.table[self.table["in_a"] & self.table["in_b"]]

    @property
    def only_a(self) -> "pd.DataFrame":
        """Keys of graph A only."""
        return self.table[self.table["in_a"] & ~self.table["in_b"]]

    @property
    def only_b(self) -> "pd.DataFrame":
        """Keys of graph B only."""
        return self.table[~self.table["in_a"] & self.table["in_b"]]

    def changed(self, top: int = DEFAULT_TOP) -> "pd.DataFrame":
        """The ``top`` keys whose influence changed most (by ``|influence_b − influence_a|``), targets left out (a
        target's influence on itself is 1 by definition)."""
        return self.table[self.table["kind"] != "logit"].head(int(top))

    def node_sets(self) -> dict[str, set[str]]:
        """Node ids by status: ``shared_a`` / ``shared_b`` (nodes of shared keys in each graph), ``only_a``,
        ``only_b`` — what the page highlights in each figure."""
        def ids(frame: "pd.DataFrame", column: str) -> set[str]:
            return {n for nodes in frame[column] for n in nodes}

        return {"shared_a": ids(self.shared, "nodes_a"), "shared_b": ids(self.shared, "nodes_b"),
                "only_a": ids(self.only_a, "nodes_a"), "only_b": ids(self.only_b, "nodes_b")}

    def counts(self) -> dict[str, int]:
        """Number of keys shared, only in A, only in B."""
        return {"shared": len(self.shared), "only_a": len(self.only_a), "only_b": len(self.only_b)}


def compare_graphs(a: Graph, b: Graph) -> GraphComparison:
    """Join the keys of graphs ``a`` and ``b`` (module docstring): presence, summed influence in each, change."""
    import pandas as pd

    ta, tb = key_table(a), key_table(b)
    merged = ta.merge(tb, on="key", how="outer", suffixes=("_a", "_b"), indicator=True)
    both = merged["_merge"]
    out = pd.DataFrame({
        "key": merged["key"],
        "kind": merged["kind_a"].fillna(merged["kind_b"]),
        "layer": merged["layer_a"].combine_first(merged["layer_b"]),
        "index": merged["index_a"].combine_first(merged["index_b"]),
        "label": [la if isinstance(la, str) and la else (lb if isinstance(lb, str) else "")
                  for la, lb in zip(merged["label_a"], merged["label_b"])],
        "in_a": both.isin(["both", "left_only"]).to_numpy(),
        "in_b": both.isin(["both", "right_only"]).to_numpy(),
        "influence_a": merged["influence_a"].fillna(0.0).astype(float),
        "influence_b": merged["influence_b"].fillna(0.0).astype(float),
        "nodes_a": [n if isinstance(n, list) else [] for n in merged["node_ids_a"]],
        "nodes_b": [n if isinstance(n, list) else [] for n in merged["node_ids_b"]],
    })
    out["change"] = out["influence_b"] - out["influence_a"]
    out["text"] = [key_text(k) for k in out["key"]]
    out = out.reindex(out["change"].abs().sort_values(ascending=False, kind="stable").index).reset_index(drop=True)
    return GraphComparison(table=out[[*KEY_COLUMNS, "text"]], prompt_a=str(a.metadata.get("prompt", "")),
                           prompt_b=str(b.metadata.get("prompt", "")))
