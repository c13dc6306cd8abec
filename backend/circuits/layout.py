"""A layered layout of an attribution graph: x = token position, y = depth in the model.

Rows from bottom to top: the embeddings, then for each layer its attention nodes (``head`` / ``attn_feature`` /
``attn_error``) and above them its MLP nodes (``transcoder`` / ``mlp_error``), and the logit target on top — the
order in which the residual stream is written. Nodes that share a (row, position) cell are spread horizontally
inside the cell (spacing up to :data:`MAX_SPACING` per unit of column width), the most important (largest
|influence|, else |activation|) first. A token's column is as wide
as its most crowded cell needs (at least one unit, at most :data:`MAX_COLUMN`): graphs put most nodes at the last
positions, which equal-width columns squeezed into a sliver while the early columns stayed empty.

This is hand-written rather than built on networkx: ``nx.multipartite_layout`` places nodes by one ``subset`` key
only (one column per subset) and has no notion of a second, token-position axis, so a layer x position grid is
simpler to compute directly. The result is deterministic (ties are broken by node id). The Circuit Graph's browser
component (``backend/ui/components/circuit_graph/graph.js``, ``layoutShown``) lays out the nodes it shows the same
way, with these constants.
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
MAX_COLUMN = 8.0  # widest token column, in units of a one-token column


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


def _cells(graph: "Graph") -> dict[tuple[int, int], list[tuple[float, str]]]:
    """Nodes by (row, position) cell, most important first (ties by id)."""
    n = n_layers(graph)
    use_influence = has_influence(graph)
    cells: dict[tuple[int, int], list[tuple[float, str]]] = {}
    for row in graph.nodes.to_dict("records"):
        y = row_of(str(row["kind"]), int(row["layer"]) if finite(row["layer"]) else 0, n)
        x = int(row["pos"]) if finite(row["pos"]) else 0
        cells.setdefault((y, x), []).append((importance(row, use_influence), str(row["node_id"])))
    for members in cells.values():
        members.sort(key=lambda m: (-m[0], m[1]))
    return cells


def columns(graph: "Graph", n_pos: int | None = None) -> list[tuple[float, float]]:
    """``(centre, width)`` of each token column 0..n_pos-1 (default: up to the last position with a node): a column
    is wide enough to space its most crowded cell's nodes :data:`MAX_SPACING` apart, within [1, MAX_COLUMN]."""
    return _columns(_cells(graph), n_pos)


def _columns(cells: dict[tuple[int, int], list[tuple[float, str]]], n_pos: int | None) -> list[tuple[float, float]]:
    crowd: dict[int, int] = {}
    for (_, x), members in cells.items():
        crowd[x] = max(crowd.get(x, 0), len(members))
    n_pos = max([n_pos or 0] + [x + 1 for x in crowd])
    out, left = [], -0.5
    for x in range(n_pos):
        width = min(MAX_COLUMN, max(1.0, (crowd.get(x, 1) - 1) * MAX_SPACING / CELL_WIDTH))
        out.append((left + width / 2, width))
        left += width
    return out


def used_rows(graph: "Graph") -> list[int]:
    """The rows (:func:`row_of`) that hold at least one node, bottom to top: drawings collapse the others, so a
    graph whose features sit in a few layers is not a tower of empty attention and MLP rows."""
    return sorted({y for y, _ in _cells(graph)})


def layout(graph: "Graph") -> dict[str, tuple[float, float]]:
    """Positions ``{node_id: (x, y)}``: x is inside the token position's column (:func:`columns`), spread over the
    cell, y the index of the node's row among :func:`used_rows` (empty rows collapsed). Deterministic: equal inputs
    give equal outputs."""
    cells = _cells(graph)
    cols = _columns(cells, None)
    compact = {y: i for i, y in enumerate(sorted({y for y, _ in cells}))}
    positions: dict[str, tuple[float, float]] = {}
    for (y, x), members in cells.items():
        centre, width = cols[x]
        k = len(members)
        # spacing scales with the column: a wide column's sparse cells spread out instead of clumping in its middle
        spacing = min(CELL_WIDTH * width / (k - 1), MAX_SPACING * width) if k > 1 else 0.0
        for i, (_, nid) in enumerate(members):
            positions[nid] = (centre + (i - (k - 1) / 2) * spacing, float(compact[y]))
    return positions
