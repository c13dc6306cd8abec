"""The attribution graph: a plain object (two tables + metadata), as in circuit-tracer's ``Graph``.

Everything else about circuits is a pure function of a :class:`Graph`: building (:mod:`.build`), pruning and
path finding (:mod:`.prune`), graph scores and conservation (:mod:`.quality`), the per-head split of edges
(:mod:`.split`), the faithfulness check (:mod:`.faithfulness`), storing (:mod:`.storage`), the layered layout and
plotly figure (:mod:`.layout`, :mod:`.figure`) and the export formats (:mod:`.export`).

**Nodes** (one row of :attr:`Graph.nodes` each; ``node_id`` is unique and stable for a given prompt):

==============  =============================  =========================================================
kind            node_id                        what it is (``feature`` column)
==============  =============================  =========================================================
embedding       ``E_{pos}``                    the token embedding at ``pos`` (token id)
transcoder      ``T{layer}_{pos}_{feature}``   an active transcoder feature of MLP ``layer`` (feature id)
mlp_error       ``M{layer}_{pos}``             MLP output minus its transcoder's prediction (NULL)
attn_feature    ``A{layer}_{pos}_{feature}``   an attention-SAE feature (layers with an SAE; feature id)
attn_error      ``AE{layer}_{pos}``            attention output minus the attention SAE's reconstruction
logit           ``L_{token}``                  the target: a demeaned logit or a logit difference (answer id)
head            ``H{layer}.{head}_{pos}``      graphs built before attention became a pass-through only
==============  =============================  =========================================================

Graphs built now have no ``head`` nodes (``metadata["attention"] == "pass-through"``): attention in layers
without an attention SAE is part of the edges, and :mod:`.split` says which heads carry an edge. Graphs stored
earlier keep their head nodes; every reader of graphs (pages, exports, pruning) still handles them.

``layer`` is the block index (embedding: -1, logit: ``n_layers``); ``pos`` the token position. Columns:
``activation`` (a feature's activation; for vector-valued nodes — errors, embeddings — the norm of what they
write), ``value`` (what the node's incoming edges from every candidate add up to together with ``bias``: a
feature's pre-activation, the target's metric), ``attribution`` (the node's total effect on the target:
activation × ∂metric/∂activation summed over all paths), ``influence`` (on the target, from
:func:`backend.circuits.prune.influence`; NaN until computed), ``label`` (a short human label), ``dict_id`` (the
dictionary a feature belongs to) and ``is_target``.

**Edges** (:attr:`Graph.edges`): ``source`` -> ``target`` with ``weight`` = the direct effect of the source on
the target's ``value`` in the frozen linearised replacement model, through every attention / skip path (see
:mod:`.replacement`). For same-position transcoder -> transcoder edges, ``source_factor x invariant x
norm_factor`` is the edge's residual-stream part: the input-dependent source activation, the input-invariant
decoder.encoder product (Dunefsky et al. 2024) and the frozen norm's 1/scale; those three columns are NaN for
other edges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import networkx as nx
    import pandas as pd

# "head" only in graphs stored before attention became a pass-through (still read, drawn and exported)
NODE_KINDS: tuple[str, ...] = ("embedding", "transcoder", "mlp_error", "head", "attn_feature", "attn_error", "logit")
FEATURE_KINDS: frozenset[str] = frozenset({"transcoder", "attn_feature"})  # nodes that have a feature dashboard
ERROR_KINDS: frozenset[str] = frozenset({"mlp_error", "attn_error"})
NODE_COLUMNS: tuple[str, ...] = ("node_id", "kind", "layer", "pos", "feature", "activation", "value", "bias",
                                 "attribution", "influence", "label", "dict_id", "is_target")
EDGE_COLUMNS: tuple[str, ...] = ("source", "target", "weight", "source_factor", "invariant", "norm_factor")


def node_id(kind: str, layer: int = -1, pos: int = 0, index: int | None = None) -> str:
    """The node id of a node (see the table in the module docstring); ``index`` is the feature / head / token."""
    if kind == "embedding":
        return f"E_{pos}"
    if kind == "transcoder":
        return f"T{layer}_{pos}_{index}"
    if kind == "mlp_error":
        return f"M{layer}_{pos}"
    if kind == "head":
        return f"H{layer}.{index}_{pos}"
    if kind == "attn_feature":
        return f"A{layer}_{pos}_{index}"
    if kind == "attn_error":
        return f"AE{layer}_{pos}"
    if kind == "logit":
        return "L_diff" if index is None else f"L_{index}"
    raise ValueError(f"unknown node kind {kind!r}; known: {', '.join(NODE_KINDS)}")


@dataclass
class Graph:
    """An attribution graph for one prompt and one target.

    ``nodes``: a DataFrame with :data:`NODE_COLUMNS`; ``edges``: a DataFrame with :data:`EDGE_COLUMNS`
    (node ids); ``metadata``: JSON-able facts — ``model``, ``prompt``, ``tokens`` (token strings), ``token_ids``,
    ``target`` (``{"kind": "logit" | "logit_diff", "token_id", "token", "wrong_id", "wrong", "value",
    "demeaned"}``), ``method``, ``attention`` (``"pass-through"``; absent in graphs with head nodes),
    ``dictionaries`` (dict ids by kind), ``params`` (build parameters), ``n_layers``, ``conservation`` and
    ``scores`` (:mod:`.quality`), and after pruning ``pruning`` (thresholds, what was kept, the pruned scores).
    """

    nodes: "pd.DataFrame"
    edges: "pd.DataFrame"
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def target_id(self) -> str:
        """The node id of the target (logit) node."""
        ids = self.nodes.loc[self.nodes["is_target"].astype(bool), "node_id"]
        if len(ids) != 1:
            raise ValueError(f"a graph has exactly one target node; this one has {len(ids)}")
        return str(ids.iloc[0])

    @property
    def tokens(self) -> list[str]:
        """The prompt's token strings (BOS included)."""
        return list(self.metadata.get("tokens", []))

    def node(self, node_id: str) -> dict[str, Any]:
        """One node's row as a dict (KeyError if absent)."""
        rows = self.nodes[self.nodes["node_id"] == node_id]
        if rows.empty:
            raise KeyError(node_id)
        return rows.iloc[0].to_dict()

    def subgraph(self, node_ids: "set[str] | list[str]", edges: "pd.DataFrame | None" = None) -> "Graph":
        """The graph restricted to ``node_ids`` (and to ``edges`` if given, else every edge between them)."""
        keep = set(node_ids)
        nodes = self.nodes[self.nodes["node_id"].isin(keep)].reset_index(drop=True)
        source = self.edges if edges is None else edges
        kept_edges = source[source["source"].isin(keep) & source["target"].isin(keep)].reset_index(drop=True)
        return Graph(nodes=nodes, edges=kept_edges, metadata=dict(self.metadata))


def empty_edges() -> "pd.DataFrame":
    """An edges table with no rows and the right columns."""
    import pandas as pd

    return pd.DataFrame({c: pd.Series(dtype="object" if c in ("source", "target") else "float64")
                         for c in EDGE_COLUMNS})


def to_networkx(graph: Graph) -> "nx.DiGraph":
    """A networkx ``DiGraph`` of ``graph``: node attributes are the node columns (NaN/None dropped, so that the
    graph serialises to GraphML), edge attributes ``weight`` and the finite factor columns."""
    import math

    import networkx as nx

    g = nx.DiGraph()
    g.graph.update({k: v for k, v in graph.metadata.items() if isinstance(v, (str, int, float, bool))})
    for row in graph.nodes.to_dict("records"):
        attrs = {k: _plain(v) for k, v in row.items() if k != "node_id" and _present(v)}
        g.add_node(row["node_id"], **attrs)
    for row in graph.edges.to_dict("records"):
        attrs = {k: float(v) for k, v in row.items()
                 if k not in ("source", "target") and v is not None and not math.isnan(float(v))}
        g.add_edge(row["source"], row["target"], **attrs)
    return g


def finite(value: Any) -> bool:
    """True for a finite number (or numeric string); False for None, NaN, ±inf and non-numbers."""
    import math

    if value is None:
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _present(value: Any) -> bool:
    if value is None:
        return False
    try:
        import math

        return not (isinstance(value, float) and math.isnan(value))
    except TypeError:
        return True


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars (networkx writers need plain types)."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value


def has_head_nodes(graph: Graph) -> bool:
    """Whether ``graph`` was built with attention heads as nodes (stored before attention became a pass-through)."""
    return graph.metadata.get("attention") != "pass-through" and bool((graph.nodes["kind"] == "head").any())
