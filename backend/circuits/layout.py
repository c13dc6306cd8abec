"""A layered layout of an attribution graph: x = token position, y = depth in the model.

Rows from bottom to top: the embeddings, then for each layer its attention nodes (``head`` / ``attn_feature`` /
``attn_error``) and above them its MLP nodes (``transcoder`` / ``mlp_error``), and the logit target on top — the
order in which the residual stream is written. Nodes that share a (row, position) cell are spread horizontally
inside the cell, the most important (largest |influence|, else |activation|) first.

This is hand-written rather than built on networkx: ``nx.multipartite_layout`` places nodes by one ``subset`` key
only (one column per subset) and has no notion of a second, token-position axis, so a layer x position grid is
simpler to compute directly. The result is deterministic (ties are broken by node id).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .graph import finite

if TYPE_CHECKING:
    from .graph import Graph

ATTN_KINDS: frozenset[str] = frozenset({"head", "attn_feature", "attn_error"})
MLP_KINDS: frozenset[str] = frozenset({"transcoder", "mlp_error"})
CELL_WIDTH = 0.8  # fraction of one token column that the nodes of a cell may spread over
MAX_SPACING = 0.2  # a few nodes in a cell stay close together around the column centre


def n_layers(graph: "Graph") -> int:
    """The number of layers of the graph's model: ``metadata["n_layers"]``, else inferred from the nodes."""
    value = graph.metadata.get("n_layers")
    if value is not None:
        return int(value)
    # A logit node's layer is n_layers (graph.py); without one, one more than the deepest block.
    layers = [int(layer) + (0 if kind == "logit" else 1)
              for kind, layer in zip(graph.nodes["kind"], graph.nodes["layer"])
              if kind != "embedding" and finite(layer)]
    return max(layers) if layers else 0


def row_of(kind: str, layer: int, n_layers_: int) -> int:
    """The row (y) of a node: 0 for embeddings, ``2*layer + 1`` for attention, ``2*layer + 2`` for MLP nodes and
    ``2*n_layers + 1`` for logits."""
    if kind == "embedding":
        return 0
    if kind == "logit":
        return 2 * n_layers_ + 1
    if kind in ATTN_KINDS:
        return 2 * int(layer) + 1
    if kind in MLP_KINDS:
        return 2 * int(layer) + 2
    raise ValueError(f"unknown node kind {kind!r}")


def row_labels(n_layers_: int) -> list[str]:
    """Labels of the rows, bottom to top: ``emb``, ``L0 attn``, ``L0 mlp``, ..., ``logit``."""
    labels = ["emb"]
    for layer in range(n_layers_):
        labels += [f"L{layer} attn", f"L{layer} mlp"]
    return labels + ["logit"]


def importance(row: dict[str, Any], use_influence: bool) -> float:
    """|influence| (or |activation| when the graph has no influence yet) of a node row; 0 when missing."""
    value = row.get("influence") if use_influence else row.get("activation")
    return abs(float(value)) if finite(value) else 0.0


def has_influence(graph: "Graph") -> bool:
    """Whether any node has a finite influence (else sizes and orders fall back to |activation|)."""
    return any(finite(v) for v in graph.nodes["influence"])


def layout(graph: "Graph") -> dict[str, tuple[float, float]]:
    """Positions ``{node_id: (x, y)}``: x is the token position (plus an offset inside the cell), y the row
    (see :func:`row_of`). Deterministic: equal inputs give equal outputs."""
    n = n_layers(graph)
    use_influence = has_influence(graph)
    cells: dict[tuple[int, int], list[tuple[float, str]]] = {}
    for row in graph.nodes.to_dict("records"):
        y = row_of(str(row["kind"]), int(row["layer"]) if finite(row["layer"]) else 0, n)
        x = int(row["pos"]) if finite(row["pos"]) else 0
        cells.setdefault((y, x), []).append((importance(row, use_influence), str(row["node_id"])))
    positions: dict[str, tuple[float, float]] = {}
    for (y, x), members in cells.items():
        members.sort(key=lambda m: (-m[0], m[1]))  # most important first (left), ties by id
        k = len(members)
        spacing = min(CELL_WIDTH / (k - 1), MAX_SPACING) if k > 1 else 0.0
        for i, (_, nid) in enumerate(members):
            positions[nid] = (x + (i - (k - 1) / 2) * spacing, float(y))
    return positions
