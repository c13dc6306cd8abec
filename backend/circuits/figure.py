"""The plotly figure of an attribution graph (layered layout from :mod:`.layout`).

Edges are line traces coloured by sign (positive blue, negative red), binned by |weight| relative to the
largest |weight| so that a graph with thousands of edges still draws with a handful of traces (width and opacity
grow with the bin). Nodes are one scatter trace per kind (its own symbol and colour, one legend entry), sized by
|influence| (|activation| before influence is computed); each marker's ``customdata`` is its node id so a page
can map a click back to a node.

Token text is untrusted: plotly renders a few HTML-like tags (``<b>``, ``<a href>``, ``<br>``, ...) in hover, tick
and title text and decodes entities, so every string we put there goes through :func:`escape_text`.
"""

from __future__ import annotations

import html
import math
import unicodedata
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from .graph import NODE_KINDS, finite
from .layout import columns, has_influence, layout, n_layers, row_labels, used_rows

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from .graph import Graph

KIND_STYLE: dict[str, dict[str, str]] = {
    "embedding": {"symbol": "square", "color": "#2ca02c", "name": "embedding"},
    "transcoder": {"symbol": "circle", "color": "#ff7f0e", "name": "transcoder feature"},
    "mlp_error": {"symbol": "diamond", "color": "#8c8c8c", "name": "MLP error"},
    "head": {"symbol": "triangle-up", "color": "#9467bd", "name": "attention head"},
    "attn_feature": {"symbol": "hexagon", "color": "#17becf", "name": "attention feature"},
    "attn_error": {"symbol": "diamond-tall", "color": "#bcbd22", "name": "attention error"},
    "logit": {"symbol": "star", "color": "#e377c2", "name": "target logit"},
}
POSITIVE_RGB = "31, 119, 180"  # blue
NEGATIVE_RGB = "214, 39, 40"  # red
# Edge bins by |weight| / max |weight|: (upper bound, line width, opacity). Few bins -> few traces.
EDGE_BINS: tuple[tuple[float, float, float], ...] = ((0.1, 0.6, 0.25), (0.3, 1.4, 0.45), (0.6, 2.6, 0.65),
                                                     (math.inf, 4.0, 0.85))
FADE = 0.15  # opacity factor for what is not highlighted
MIN_SIZE, MAX_SIZE = 7.0, 26.0


def visible_text(text: Any) -> str:
    """``text`` with newlines, tabs and other control or invisible format characters (RTL overrides, zero-width
    spaces) shown as visible marks, so a token cannot reorder or hide the text around it. No HTML escaping."""
    out = []
    for ch in str(text):
        if ch == "\n":
            out.append("↵")
        elif ch == "\t":
            out.append("⇥")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\u200d":
            out.append(ch)  # zero-width joiner: part of emoji sequences, harmless
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            out.append(f"⟨U+{ord(ch):04X}⟩")
        else:
            out.append(ch)
    return "".join(out)


def escape_text(text: Any) -> str:
    """``text`` made safe and visible for plotly hover, tick and title text.

    ``&``, ``<`` and ``>`` become entities (plotly decodes entities for display, but never re-parses them as tags,
    so ``<img src=x onerror=alert(1)>`` shows as text and stays inert). Quotes are left alone: plotly decodes only a
    few named entities and would show ``&quot;`` literally. Invisible characters are made visible
    (:func:`visible_text`).
    """
    return html.escape(visible_text(text), quote=False)


def escape_multiline(text: Any) -> str:
    """Like :func:`escape_text` but newlines become plotly line breaks (``<br>``) instead of marks."""
    return "<br>".join(escape_text(line) for line in str(text).split("\n"))


def node_hover(row: Mapping[str, Any], tokens: Sequence[str]) -> str:
    """Default hover text of a node row (escaped): label, id, kind, layer, position and token, numbers."""
    pos = int(row["pos"]) if finite(row.get("pos")) else None
    token = tokens[pos] if pos is not None and 0 <= pos < len(tokens) else ""
    label = row.get("label")
    kind_name = KIND_STYLE.get(str(row["kind"]), {}).get("name", row["kind"])
    lines = [f"<b>{escape_text(label)}</b>" if isinstance(label, str) and label else "",
             f"{escape_text(row['node_id'])} · {escape_text(kind_name)}",
             f"layer {row['layer']} · pos {pos} “{escape_text(token)}”"]
    numbers = [f"{name} {float(row[name]):.4g}" for name in ("activation", "attribution", "influence")
               if finite(row.get(name))]
    lines.append(" · ".join(numbers))
    return "<br>".join(line for line in lines if line)


def figure(graph: "Graph", positions: Mapping[str, tuple[float, float]] | None = None,
           highlight_nodes: Iterable[str] = (), highlight_edges: Iterable[tuple[str, str]] = (),
           hover: Mapping[str, str] | None = None, title: str | None = None) -> "go.Figure":
    """The plotly figure of ``graph``.

    ``positions`` defaults to :func:`backend.circuits.layout.layout`. When ``highlight_nodes`` or
    ``highlight_edges`` (``(source, target)`` pairs) are given, those nodes and the ends of those edges are drawn
    emphasised, and so are those edges (or, when only nodes are given, the edges between two of them); everything
    else is faded. ``hover``
    maps node ids to replacement hover text; it is plain text (escaped; newlines become line breaks).
    """
    import plotly.graph_objects as go

    pos = dict(positions) if positions is not None else layout(graph)
    hl_edges = {(str(s), str(t)) for s, t in highlight_edges}
    hl_nodes = {str(n) for n in highlight_nodes} | {n for e in hl_edges for n in e}
    emphasis = bool(hl_nodes or hl_edges)
    tokens = graph.tokens
    fig = go.Figure()
    for trace in _edge_traces(graph, pos, hl_nodes, hl_edges, emphasis):
        fig.add_trace(trace)
    for trace in _node_traces(graph, pos, hl_nodes, emphasis, hover or {}, tokens):
        fig.add_trace(trace)

    names = row_labels(n_layers(graph))
    rows = [names[y] for y in used_rows(graph)]
    cols = columns(graph, len(tokens))
    n_pos = len(cols)
    ticktext = [f"{escape_text(tokens[i]) if i < len(tokens) else ''}<br>{i}" for i in range(n_pos)]
    span = sum(w for _, w in cols)
    fig.update_layout(
        title=dict(text=escape_text(title)) if title else None,
        template="plotly_white",
        showlegend=True,
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="left", x=0),
        hovermode="closest",
        clickmode="event+select",
        width=max(640, 160 + 110 * span),
        height=max(360, 140 + 40 * len(rows)),
        margin=dict(l=70, r=20, t=80 if title else 50, b=70),
        xaxis=dict(tickmode="array", tickvals=[c for c, _ in cols], ticktext=ticktext, range=[-0.6, span - 0.4],
                   showgrid=True, zeroline=False, title=None),
        yaxis=dict(tickmode="array", tickvals=list(range(len(rows))), ticktext=rows, range=[-0.6, len(rows) - 0.4],
                   showgrid=True, zeroline=False, title=None),
    )
    return fig


def _edge_traces(graph: "Graph", pos: Mapping[str, tuple[float, float]], hl_nodes: set[str],
                 hl_edges: set[tuple[str, str]], emphasis: bool) -> list[Any]:
    """Line traces: one per (emphasised?, sign, width bin) that has edges; weak first so strong draw on top."""
    import plotly.graph_objects as go

    edges = graph.edges
    weights = [float(w) for w in edges["weight"]]
    magnitudes = [abs(w) for w in weights if math.isfinite(w)]
    wmax = max(magnitudes) if magnitudes else 0.0
    groups: dict[tuple[bool, bool, int], tuple[list[float | None], list[float | None]]] = {}
    for s, t, w in zip(edges["source"], edges["target"], weights):
        if s not in pos or t not in pos or not math.isfinite(w) or w == 0 or wmax == 0:
            continue
        rel = abs(w) / wmax
        b = next(i for i, (upper, _, _) in enumerate(EDGE_BINS) if rel <= upper)
        # Given edges (e.g. a path) are emphasised exactly; given only nodes, the edges among them are.
        strong = not emphasis or ((s, t) in hl_edges if hl_edges else (s in hl_nodes and t in hl_nodes))
        xs, ys = groups.setdefault((strong, w > 0, b), ([], []))
        (x0, y0), (x1, y1) = pos[s], pos[t]
        xs += [x0, x1, None]
        ys += [y0, y1, None]
    traces = []
    order = sorted(groups, key=lambda k: (k[0], k[2], k[1]))
    # The legend sample of each sign is its last-drawn (strongest) trace, so the sample line is visible.
    legend_key = {key[1]: key for key in order}  # sign -> its last key
    for strong, positive, b in order:
        xs, ys = groups[(strong, positive, b)]
        _, width, alpha = EDGE_BINS[b]
        if emphasis:
            alpha, width = (min(1.0, alpha + 0.15), width * 1.4) if strong else (alpha * FADE, width)
        rgb = POSITIVE_RGB if positive else NEGATIVE_RGB
        traces.append(go.Scatter(
            x=xs, y=ys, mode="lines", line=dict(color=f"rgba({rgb}, {alpha:.3f})", width=width),
            hoverinfo="skip", name="positive edge" if positive else "negative edge",
            legendgroup="edge+" if positive else "edge-", showlegend=legend_key[positive] == (strong, positive, b),
        ))
    return traces


def _node_traces(graph: "Graph", pos: Mapping[str, tuple[float, float]], hl_nodes: set[str], emphasis: bool,
                 hover: Mapping[str, str], tokens: Sequence[str]) -> list[Any]:
    """One marker trace per node kind present, in :data:`NODE_KINDS` order."""
    import plotly.graph_objects as go

    use_influence = has_influence(graph)
    records = [r for r in graph.nodes.to_dict("records") if r["node_id"] in pos]
    size_of = {}
    sized = [r for r in records if not bool(r.get("is_target"))]
    column = "influence" if use_influence else "activation"
    vmax = max([abs(float(r[column])) for r in sized if finite(r.get(column))] + [0.0])
    for r in records:
        v = abs(float(r[column])) if finite(r.get(column)) else 0.0
        size_of[r["node_id"]] = MAX_SIZE if bool(r.get("is_target")) else (
            MIN_SIZE + (MAX_SIZE - MIN_SIZE) * math.sqrt(v / vmax) if vmax > 0 else MIN_SIZE)
    traces = []
    for kind in NODE_KINDS:
        rows = [r for r in records if r["kind"] == kind]
        if not rows:
            continue
        ids = [str(r["node_id"]) for r in rows]
        on = [not emphasis or i in hl_nodes for i in ids]
        style = KIND_STYLE[kind]
        traces.append(go.Scatter(
            x=[pos[i][0] for i in ids], y=[pos[i][1] for i in ids], mode="markers", name=style["name"],
            legendgroup=kind, customdata=ids,
            hovertext=[escape_multiline(hover[i]) if i in hover else node_hover(r, tokens) for i, r in zip(ids, rows)],
            hoverinfo="text",
            marker=dict(symbol=style["symbol"], color=style["color"], size=[size_of[i] for i in ids],
                        opacity=[1.0 if o else FADE for o in on],
                        line=dict(color=["#111111" if emphasis and o else "#ffffff" for o in on],
                                  width=[2.5 if emphasis and o else 1.0 for o in on])),
        ))
    return traces
