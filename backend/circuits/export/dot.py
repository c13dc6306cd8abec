"""Graphviz DOT export through pydot, with positions pinned (``pos="x,y!"``) so ``neato -n2`` draws the layered
layout.
"""

from __future__ import annotations

import math
from typing import Any

from backend.circuits.export.graphml import xml_safe
from backend.circuits.export.neuronpedia import finite_number
from backend.circuits.figure import KIND_STYLE, visible_text
from backend.circuits.graph import Graph
from backend.circuits.layout import layout

NODE_PITCH = 120.0  # points between the centres of two nodes sharing a cell


COLUMN_GAP = 40.0  # points between token columns


ROW_PITCH = 70.0  # points per row


CAPTION_CHARS = 40  # longer captions are cut in DOT labels (the tooltip keeps the whole text)


_DOT_SHAPE = {"embedding": "box", "transcoder": "ellipse", "mlp_error": "diamond", "head": "triangle",
              "attn_feature": "hexagon", "attn_error": "diamond", "logit": "doubleoctagon"}


def dot_quote(text: str) -> str:
    """``text`` as a double-quoted DOT string that Graphviz shows literally: backslashes are doubled (Graphviz
    would read ``\\n``, ``\\l``, ``\\N`` ... as escapes), quotes escaped, newlines turned into ``\\n`` line breaks.

    Needed because pydot quotes values without escaping backslashes (``back\\slash\\`` would end the string
    early) and passes ``<...>`` through unquoted as an HTML-like label; a value that is already double-quoted is
    left alone by pydot."""
    # Control characters first (Graphviz's SVG output could not hold them), then DOT escapes.
    body = (xml_safe(str(text)).replace("\\", "\\\\").replace('"', '\\"').replace("\r\n", "\\n")
            .replace("\n", "\\n").replace("\r", "\\n"))
    return f'"{body}"'


def dot_unquote(text: str) -> str:
    """The inverse of :func:`dot_quote` (for reading a DOT attribute back)."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            out.append({"n": "\n", '"': '"', "\\": "\\"}.get(nxt, "\\" + nxt))
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def node_caption(row: dict[str, Any], tokens: list[str]) -> str:
    """A short caption of a node for DOT labels: its label (token text for embeddings), else its id; invisible
    characters made visible (:func:`backend.circuits.figure.visible_text`: an RTL override would flip it)."""
    label = row.get("label")
    text = str(row["node_id"])
    if row.get("kind") == "embedding" and 0 <= int(row["pos"]) < len(tokens):
        text = tokens[int(row["pos"])]
    elif isinstance(label, str) and label:
        text = label
    return visible_text(text)


def dot_positions(graph: Graph) -> dict[str, tuple[float, float]]:
    """Node positions in points for DOT: :func:`.layout.layout`'s rows and in-cell order, but cells spread by a
    fixed pitch and each token column as wide as its most crowded cell, so captions do not overlap."""
    pos = layout(graph)
    cells: dict[tuple[int, float], list[str]] = {}
    for nid, (x, y) in pos.items():
        cells.setdefault((int(round(x)), y), []).append(nid)
    n_cols = max((c for c, _ in cells), default=-1) + 1
    widest = [max([len(m) for (c, _), m in cells.items() if c == col] + [1]) for col in range(n_cols)]
    starts = [sum(w * NODE_PITCH + COLUMN_GAP for w in widest[:col]) for col in range(n_cols)]
    out: dict[str, tuple[float, float]] = {}
    for (col, y), members in cells.items():
        members.sort(key=lambda nid: pos[nid][0])  # layout's order inside the cell
        centre = starts[col] + widest[col] * NODE_PITCH / 2
        for i, nid in enumerate(members):
            out[nid] = (centre + (i - (len(members) - 1) / 2) * NODE_PITCH, y * ROW_PITCH)
    return out


def to_dot(graph: Graph) -> str:
    """Graphviz DOT of the graph (via ``networkx.nx_pydot.to_pydot``) with the layered layout pinned:
    ``neato -n2 -Tsvg graph.dot`` (or ``-n``) draws it as :mod:`.layout` does (:func:`dot_positions`).

    Node attributes: ``label`` (caption, cut at :data:`CAPTION_CHARS`, and id), ``tooltip``, ``shape`` /
    ``fillcolor`` by kind, ``pos="x,y!"`` in points, and data attributes ``kind``, ``block`` (the layer; Graphviz
    reserves ``layer``), ``ctx_idx``, ``feature``, ``activation``, ``influence``. Edges: ``color`` by sign,
    ``penwidth`` by |weight|, and the weight as ``attribution`` (Graphviz's ``weight`` must be a non-negative
    layout weight). Every string value is quoted by :func:`dot_quote`."""
    import networkx as nx

    pos = dot_positions(graph)
    tokens = graph.tokens
    g = nx.DiGraph()
    g.graph["graph"] = {"outputorder": "edgesfirst", "splines": "line", "bgcolor": "white"}
    g.graph["node"] = {"style": "filled", "fontsize": "9", "fontname": "Helvetica", "margin": "0.04,0.02"}
    for row in graph.nodes.to_dict("records"):
        nid = str(row["node_id"])
        x, y = pos[nid]
        caption = node_caption(row, tokens)
        short = caption if len(caption) <= CAPTION_CHARS else caption[: CAPTION_CHARS - 1] + "…"
        attrs = {
            "label": dot_quote(f"{short}\n{nid}" if caption != nid else nid),
            "tooltip": dot_quote(f"{nid} ({row['kind']}): {caption}"),
            "shape": _DOT_SHAPE.get(str(row["kind"]), "ellipse"),
            "fillcolor": dot_quote(KIND_STYLE.get(str(row["kind"]), {}).get("color", "#cccccc")),
            "pos": dot_quote(f"{x:.1f},{y:.1f}!"),
            "kind": dot_quote(str(row["kind"])),
            "block": str(int(row["layer"])),
            "ctx_idx": str(int(row["pos"])),
        }
        for key in ("feature", "activation", "influence"):
            value = finite_number(row.get(key))
            if value is not None:
                attrs[key] = dot_quote(f"{value:.6g}")
        g.add_node(nid, **attrs)
    weights = [abs(float(w)) for w in graph.edges["weight"] if math.isfinite(float(w))]
    wmax = max(weights) if weights else 1.0
    for s, t, w in zip(graph.edges["source"], graph.edges["target"], graph.edges["weight"]):
        w = float(w)
        if not math.isfinite(w):
            continue
        g.add_edge(str(s), str(t), color=dot_quote("#1f77b4" if w >= 0 else "#d62728"),
                   penwidth=f"{0.3 + 3.7 * abs(w) / (wmax or 1.0):.3f}", attribution=dot_quote(f"{w:.6g}"),
                   tooltip=dot_quote(f"{s} -> {t}: {w:+.4g}"))
    return nx.nx_pydot.to_pydot(g).to_string()
