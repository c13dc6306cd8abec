"""Exports of an attribution graph: SVG / PNG images, GraphML, Graphviz DOT and Neuronpedia graph JSON.

:data:`FORMATS` maps a format name to an :class:`ExportFormat` (extension, MIME type, ``Graph -> bytes``);
:func:`export` and :func:`export_to_file` are what the page's download buttons and the CLI use.

**Images** are the plotly figure of :mod:`.figure` rendered by kaleido 1.x, which drives Debian's chromium
(``make browser``). Starting chromium takes seconds, so one kaleido browser is started on first use and reused for
every later image (:func:`close_renderer` stops it; it is also stopped at exit).

**Neuronpedia JSON** (:func:`to_neuronpedia_json`) follows circuit-tracer's ``circuit_tracer/frontend/
graph_models.py`` (the pydantic ``Metadata`` / ``QParams`` / ``Node`` / ``Link`` models) and
``circuit_tracer/utils/create_graph_files.py`` (how a pruned graph becomes that JSON), checked against Neuronpedia's
upload schema ``apps/webapp/app/api/graph/graph-schema.json`` and its ``formatCLTGraphData``; see the function's
docstring for how our node kinds map onto it.
"""

from __future__ import annotations

import asyncio
import atexit
import hashlib
import json
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from backend.errors import CircuitscopeError, InputError

from .figure import KIND_STYLE, figure, visible_text
from .graph import Graph, to_networkx
from .layout import layout

if TYPE_CHECKING:
    import plotly.graph_objects as go

CHROMIUM = "/usr/bin/chromium"  # Debian's package (``make browser``); kaleido would otherwise try to download one
START_TIMEOUT_S = 120.0  # chromium's cold start is ~5 s idle, much more on a loaded 2-core machine
RENDER_TIMEOUT_S = 120.0
BROWSER_MISSING = ("Static image export needs the chromium browser, which is not installed: run `make browser` "
                   "(or `apt-get install chromium`) and try again.")


# ---------------------------------------------------------------------------------------------------- images


class _Renderer:
    """One kaleido browser on its own event-loop thread, reused for every image.

    Not kaleido's own ``start_sync_server``: its worker thread dies silently when the browser fails to start and
    the next ``calc_fig_sync`` then waits forever on its queue; here every call has a timeout and a failure resets
    the renderer so the next call starts a fresh browser.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._kaleido: Any = None
        self._atexit = False

    def _start(self) -> None:
        import kaleido

        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="circuitscope-kaleido", daemon=True)
        thread.start()

        async def open_browser() -> Any:
            # mathjax=False: the default loads MathJax from a CDN, which cannot work offline.
            k = kaleido.Kaleido(n=1, path=CHROMIUM, mathjax=False, timeout=RENDER_TIMEOUT_S)
            await k.open()
            return k

        self._loop, self._thread = loop, thread
        try:
            self._kaleido = asyncio.run_coroutine_threadsafe(open_browser(), loop).result(timeout=START_TIMEOUT_S)
        except BaseException:
            self._shutdown()
            raise
        if not self._atexit:
            atexit.register(self.close)
            self._atexit = True

    def render(self, fig: "go.Figure | dict[str, Any]", opts: dict[str, Any]) -> bytes:
        """The image bytes of ``fig`` (``opts``: kaleido's format / width / height / scale)."""
        _require_browser()
        from choreographer.errors import ChromeNotFoundError

        with self._lock:
            try:
                if self._kaleido is None:
                    self._start()
                assert self._loop is not None
                future = asyncio.run_coroutine_threadsafe(self._kaleido.calc_fig(fig, opts=opts), self._loop)
                return future.result(timeout=RENDER_TIMEOUT_S + 5)
            except ChromeNotFoundError as exc:
                self._shutdown()
                raise CircuitscopeError(BROWSER_MISSING) from exc
            except BaseException:
                self._shutdown()  # a broken browser is not reused
                raise

    def close(self) -> None:
        """Stop the browser (a later :meth:`render` starts a new one)."""
        with self._lock:
            self._shutdown()

    def _shutdown(self) -> None:
        loop, kaleido_, thread = self._loop, self._kaleido, self._thread
        self._loop, self._kaleido, self._thread = None, None, None
        if loop is None:
            return
        if kaleido_ is not None:
            try:
                asyncio.run_coroutine_threadsafe(kaleido_.close(), loop).result(timeout=30)
            except Exception:  # noqa: BLE001 - best effort: the process may already be gone
                pass
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
        if not loop.is_running():
            loop.close()


_RENDERER = _Renderer()


def _require_browser() -> None:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        raise CircuitscopeError(BROWSER_MISSING)


def render_figure(fig: "go.Figure", fmt: str = "svg", width: int | None = None, height: int | None = None,
                  scale: float = 1.0) -> bytes:
    """Any plotly figure as ``fmt`` ("svg", "png", "pdf", ...) bytes, through the shared kaleido browser.

    Width and height default to the figure's layout size. Raises :class:`CircuitscopeError` (one sentence: run
    ``make browser``) when chromium is missing.
    """
    opts: dict[str, Any] = {"format": fmt, "scale": scale}
    w = width or fig.layout.width
    h = height or fig.layout.height
    if w:
        opts["width"] = int(w)
    if h:
        opts["height"] = int(h)
    return _RENDERER.render(fig, opts)


def close_renderer() -> None:
    """Stop the shared chromium used for images (it restarts on the next image)."""
    _RENDERER.close()


def to_svg(graph: Graph, width: int | None = None, height: int | None = None, **figure_kwargs: Any) -> str:
    """The graph's figure (:func:`backend.circuits.figure.figure`; ``figure_kwargs`` go there) as SVG text."""
    return render_figure(figure(graph, **figure_kwargs), "svg", width, height).decode("utf-8")


def to_png(graph: Graph, width: int | None = None, height: int | None = None, scale: float = 2,
           **figure_kwargs: Any) -> bytes:
    """The graph's figure as PNG bytes; ``scale`` multiplies the pixel size (2 = sharp on high-DPI screens)."""
    return render_figure(figure(graph, **figure_kwargs), "png", width, height, scale)


# --------------------------------------------------------------------------------------------------- GraphML

_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_safe(text: str) -> str:
    """``text`` without characters XML 1.0 cannot hold (control characters other than tab/newline/CR): each
    becomes its Python escape (``\\x1b``) so nothing is lost silently."""
    return _XML_INVALID.sub(lambda m: m.group(0).encode("unicode_escape", "backslashreplace").decode("ascii"), text)


def to_graphml(graph: Graph) -> str:
    """GraphML of :func:`backend.circuits.graph.to_networkx` plus layout positions ``x`` / ``y`` per node (and the
    prompt's tokens as a JSON string graph attribute ``tokens_json``). Readable by ``networkx.read_graphml``,
    Gephi, yEd and Cytoscape."""
    import networkx as nx

    g = to_networkx(graph)
    for nid, (x, y) in layout(graph).items():
        g.nodes[nid]["x"], g.nodes[nid]["y"] = float(x), float(y)
    g.graph["tokens_json"] = json.dumps(graph.tokens, ensure_ascii=False)
    _clean_attributes(g)
    return "\n".join(nx.generate_graphml(g, encoding="utf-8", prettyprint=True)) + "\n"


def _clean_attributes(g: Any) -> None:
    """Only GraphML-writable values (str / int / float / bool), strings XML-safe; others (e.g. pandas NA) dropped."""

    def clean(attrs: dict[str, Any]) -> None:
        for key in list(attrs):
            value = attrs[key]
            if isinstance(value, str):
                attrs[key] = xml_safe(value)
            elif isinstance(value, bool) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                if isinstance(value, float) and not math.isfinite(value):
                    del attrs[key]
            else:
                item = getattr(value, "item", None)
                try:
                    plain = item() if callable(item) else None
                except (TypeError, ValueError):
                    plain = None
                if isinstance(plain, (str, int, float, bool)):
                    attrs[key] = plain
                else:
                    del attrs[key]

    clean(g.graph)
    for _, attrs in g.nodes(data=True):
        clean(attrs)
    for _, _, attrs in g.edges(data=True):
        clean(attrs)


# ------------------------------------------------------------------------------------------------------- DOT

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
            value = _number(row.get(key))
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


# ------------------------------------------------------------------------------------------- Neuronpedia JSON

NEURONPEDIA_FEATURE_TYPES: frozenset[str] = frozenset(
    {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit", "lorsa", "lorsa error"})
_NUMBER = (int, float)
_OPTIONAL_NUMBER = (int, float, type(None))
# Required keys and their JSON types per level: the union of Neuronpedia's graph-schema.json ``required`` lists
# and circuit-tracer's pydantic models (graph_models.py), which require all of QParams and transcoder_list.
NEURONPEDIA_REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "graph": {"metadata": dict, "qParams": dict, "nodes": list, "links": list},
    "metadata": {"slug": str, "scan": str, "transcoder_list": list, "prompt_tokens": list, "prompt": str},
    "qParams": {"pinnedIds": list, "supernodes": list, "linkType": str, "clickedId": str, "sg_pos": str},
    "nodes": {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str, "jsNodeId": str,
              "clerp": str, "token_prob": _NUMBER, "is_target_logit": bool, "run_idx": int, "reverse_ctx_idx": int,
              "influence": _OPTIONAL_NUMBER, "activation": _OPTIONAL_NUMBER},
    "links": {"source": str, "target": str, "weight": _NUMBER},
}


def validate_neuronpedia(doc: Any) -> list[str]:
    """Problems of ``doc`` against :data:`NEURONPEDIA_REQUIRED` (missing keys, wrong JSON types, unknown
    ``feature_type``, links to absent nodes, not exactly one target logit); an empty list means valid."""
    problems: list[str] = []

    def check(obj: Any, level: str, where: str) -> None:
        if not isinstance(obj, dict):
            problems.append(f"{where} is not an object")
            return
        for key, types in NEURONPEDIA_REQUIRED[level].items():
            if key not in obj:
                problems.append(f"{where} lacks {key!r}")
            elif not _json_type_ok(obj[key], types):
                problems.append(f"{where}.{key} has type {type(obj[key]).__name__}")

    check(doc, "graph", "graph")
    if problems:
        return problems
    check(doc["metadata"], "metadata", "metadata")
    check(doc["qParams"], "qParams", "qParams")
    for i, node in enumerate(doc["nodes"]):
        check(node, "nodes", f"nodes[{i}]")
        if isinstance(node, dict) and node.get("feature_type") not in NEURONPEDIA_FEATURE_TYPES:
            problems.append(f"nodes[{i}].feature_type {node.get('feature_type')!r} is not a Neuronpedia type")
    for i, link in enumerate(doc["links"]):
        check(link, "links", f"links[{i}]")
    ids = [n.get("node_id") for n in doc["nodes"] if isinstance(n, dict)]
    if len(set(ids)) != len(ids):
        problems.append("node ids are not unique")
    known = set(ids)
    dangling = sum(1 for link in doc["links"] if isinstance(link, dict)
                   and (link.get("source") not in known or link.get("target") not in known))
    if dangling:
        problems.append(f"{dangling} links name a node that is not in nodes")
    targets = sum(1 for n in doc["nodes"] if isinstance(n, dict) and n.get("is_target_logit") is True)
    if targets != 1:
        problems.append(f"{targets} nodes have is_target_logit (need exactly 1)")
    return problems


def _json_type_ok(value: Any, types: type | tuple[type, ...]) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):
        return bool in types  # bool is an int in Python but not in JSON
    if isinstance(value, float) and not math.isfinite(value):
        return False  # NaN / Infinity are not JSON
    return isinstance(value, types)


def cantor(x: int, y: int) -> int:
    """The Cantor pairing of two non-negative ints: circuit-tracer's ``feature`` for a (layer, feature index)."""
    return (x + y) * (x + y + 1) // 2 + y


def process_token(token: str) -> str:
    """A token as circuit-tracer writes it into ``prompt_tokens`` (newline, tab and CR made visible)."""
    return token.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def neuronpedia_node_id(row: dict[str, Any], token_ids: list[int], n_layers_: int) -> tuple[str, str]:
    """``(node_id, jsNodeId)`` of a node row in the Neuronpedia JSON (see :func:`to_neuronpedia_json`)."""
    kind, layer, pos = str(row["kind"]), int(row["layer"]), int(row["pos"])
    index = _int(row.get("feature"))
    if kind == "embedding":
        tok = token_ids[pos] if 0 <= pos < len(token_ids) else (index if index is not None else -1)
        return f"E_{tok}_{pos}", f"E_{tok}-{pos}"
    if kind == "transcoder":
        return f"{layer}_{index}_{pos}", f"{layer}_{index}-0"
    if kind == "mlp_error":
        return f"{layer}_-1_{pos}", f"{layer}_-1-{pos}"
    if kind == "attn_feature":
        return f"{layer}_lor_{index}_{pos}", f"{layer}_lor_{index}-{pos}"
    if kind == "head":
        return f"{layer}_head_{index}_{pos}", f"{layer}_head_{index}-{pos}"
    if kind == "attn_error":
        return f"{layer}_error_attn_{pos}", f"{layer}_error_attn-{pos}"
    if kind == "logit":
        return f"{n_layers_ + 1}_{index}_{pos}", f"L_{index}-{pos}"
    raise ValueError(f"unknown node kind {kind!r}")


def to_neuronpedia_json(graph: Graph, slug: str | None = None) -> dict[str, Any]:
    """The graph as circuit-tracer / Neuronpedia attribution-graph JSON (``{metadata, qParams, nodes, links}``).

    Field names and types copy circuit-tracer's ``frontend/graph_models.py`` (``layer`` is a string, ``feature``
    an int, ``influence`` / ``activation`` may be null) and ``utils/create_graph_files.py``; the required keys are
    :data:`NEURONPEDIA_REQUIRED`. Node ids follow circuit-tracer's constructors where it has the node kind:

    ==============  ========================  ======================  ====================  ======================
    our kind        feature_type              node_id                 jsNodeId              feature
    ==============  ========================  ======================  ====================  ======================
    transcoder      cross layer transcoder    ``{l}_{f}_{p}``         ``{l}_{f}-0``         cantor(l, f)
    mlp_error       mlp reconstruction error  ``{l}_-1_{p}``          ``{l}_-1-{p}``        -1
    embedding       embedding                 ``E_{tok}_{p}``         ``E_{tok}-{p}``       p
    logit           logit                     ``{n+1}_{tok}_{p}``     ``L_{tok}-{p}``       tok
    attn_feature    lorsa                     ``{l}_lor_{f}_{p}``     ``{l}_lor_{f}-{p}``   cantor(l, f)
    head            lorsa                     ``{l}_head_{h}_{p}``    ``{l}_head_{h}-{p}``  cantor(l, h)
    attn_error      lorsa error               ``{l}_error_attn_{p}``  ...``-{p}``           -1
    ==============  ========================  ======================  ====================  ======================

    circuit-tracer has no attention nodes. Neuronpedia's viewer also accepts ``"lorsa"`` (sparse attention
    features: each one is a low-rank attention head) and ``"lorsa error"`` (the attention-side error), as written by
    OpenMOSS's exporter, so attention-SAE features and whole heads are ``lorsa`` and attention errors ``lorsa
    error`` (its viewer treats any type containing "error" as an error node). A head and an attention feature with
    the same index in one layer share Neuronpedia's hover ``featureId`` (cantor(l, i)); their node ids differ.

    ``influence`` is circuit-tracer's *cumulative* score (nodes sorted by decreasing influence; each gets the
    running share of the total, so the most influential node has the smallest value and Neuronpedia's pruning
    slider keeps nodes with ``influence <= threshold``); null when the graph has no influence yet, and for the
    logit (as in circuit-tracer). ``activation`` is given for features and heads, null for embeddings, errors and
    the logit (as in circuit-tracer). The logit's ``clerp`` is ``Output "<token>" (p=<prob>)`` (the viewer parses
    both parts); a logit difference reads ``Output "<token>" − "<wrong>" (p=...)``. Extra keys per node
    (``circuitscope_id``, ``kind``) keep our ids; the viewer ignores unknown keys.
    """
    meta = graph.metadata
    n = int(meta.get("n_layers", 0)) or _infer_layers(graph)
    token_ids = [int(t) for t in meta.get("token_ids", [])]
    tokens = [process_token(str(t)) for t in graph.tokens]
    target = meta.get("target") or {}
    prob = _number(target.get("prob"))
    prob = 0.0 if prob is None else prob
    cumulative = _cumulative_influence(graph)
    ids: dict[str, str] = {}
    nodes: list[dict[str, Any]] = []
    for row in graph.nodes.to_dict("records"):
        kind, layer, pos = str(row["kind"]), int(row["layer"]), int(row["pos"])
        node_id, js_id = neuronpedia_node_id(row, token_ids, n)
        ids[str(row["node_id"])] = node_id
        index = _int(row.get("feature"))
        label = row.get("label") if isinstance(row.get("label"), str) else ""
        node: dict[str, Any] = {
            "node_id": node_id, "feature": 0, "layer": str(layer), "ctx_idx": pos, "feature_type": "",
            "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": js_id,
            "clerp": label, "influence": cumulative.get(str(row["node_id"])),
            "activation": _number(row.get("activation")), "circuitscope_id": str(row["node_id"]), "kind": kind,
        }
        if kind == "transcoder":
            node.update(feature=cantor(layer, index or 0), feature_type="cross layer transcoder")
        elif kind in ("attn_feature", "head"):
            node.update(feature=cantor(layer, index or 0), feature_type="lorsa")
        elif kind in ("mlp_error", "attn_error"):
            node.update(feature=-1, activation=None,
                        feature_type="mlp reconstruction error" if kind == "mlp_error" else "lorsa error")
        elif kind == "embedding":
            node.update(feature=pos, layer="E", activation=None, feature_type="embedding")
        elif kind == "logit":
            token = process_token(str(target.get("token", "")))
            shown = f'"{token}"'
            if target.get("kind") == "logit_diff" and target.get("wrong") is not None:
                shown += f' − "{process_token(str(target["wrong"]))}"'
            node.update(feature=index if index is not None else int(target.get("token_id", 0)),
                        layer=str(n + 1), feature_type="logit", activation=None, influence=None,
                        token_prob=prob, is_target_logit=bool(row.get("is_target")),
                        clerp=f"Output {shown} (p={prob:.3f})")
        nodes.append(node)
    links = [{"source": ids[str(s)], "target": ids[str(t)], "weight": float(w)}
             for s, t, w in zip(graph.edges["source"], graph.edges["target"], graph.edges["weight"])
             if str(s) in ids and str(t) in ids and math.isfinite(float(w))]
    pruning = meta.get("pruning") or {}
    metadata: dict[str, Any] = {
        "slug": slug or default_slug(graph),
        "scan": str(meta.get("model", "")),
        "transcoder_list": [str(d) for d in _dictionary_ids(graph)],
        "prompt_tokens": tokens,
        "prompt": str(meta.get("prompt", "")),
        "schema_version": 1,  # features are cantor(layer, index), as Neuronpedia expects for schema 1
        "info": {"generator": {"name": "circuitscope", "url": ""},
                 "description": f"{meta.get('method', '')} attribution graph of {meta.get('model', '')}"},
        "generation_settings": _jsonable({"method": meta.get("method"), **(meta.get("params") or {})}),
        "pruning_settings": _jsonable(pruning),
    }
    if _number(pruning.get("node_threshold")) is not None:
        metadata["node_threshold"] = float(pruning["node_threshold"])
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}


def default_slug(graph: Graph) -> str:
    """A stable slug for a graph: the model name and a short hash of prompt and target."""
    meta = graph.metadata
    key = json.dumps([meta.get("model"), meta.get("prompt"), _jsonable(meta.get("target"))], sort_keys=True)
    model = re.sub(r"[^a-z0-9]+", "-", str(meta.get("model", "graph")).lower()).strip("-") or "graph"
    return f"{model}-{hashlib.sha1(key.encode('utf-8')).hexdigest()[:10]}"


def _dictionary_ids(graph: Graph) -> list[str]:
    ids = sorted({str(d) for d in graph.nodes["dict_id"] if isinstance(d, str) and d})
    if ids:
        return ids
    dictionaries = graph.metadata.get("dictionaries") or {}
    return sorted({str(d) for v in dictionaries.values() if isinstance(v, list) for d in v if isinstance(d, str)})


def _cumulative_influence(graph: Graph) -> dict[str, float]:
    """circuit-tracer's cumulative influence score of every non-logit node with a finite influence."""
    pairs = [(abs(float(v)), str(nid)) for nid, kind, v in
             zip(graph.nodes["node_id"], graph.nodes["kind"], graph.nodes["influence"])
             if kind != "logit" and _number(v) is not None]
    total = sum(v for v, _ in pairs)
    if not pairs or total <= 0:
        return {}
    out, running = {}, 0.0
    for v, nid in sorted(pairs, key=lambda p: (-p[0], p[1])):
        running += v
        out[nid] = min(1.0, running / total)
    return out


def _infer_layers(graph: Graph) -> int:
    from .layout import n_layers

    return n_layers(graph)


def _jsonable(value: Any) -> Any:
    """``value`` with NaN/inf as null and non-JSON objects as strings (so ``json.dumps(allow_nan=False)`` works)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return _jsonable(item())
        except (TypeError, ValueError):
            pass
    return str(value)


def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _int(value: Any) -> int | None:
    f = _number(value)
    return int(f) if f is not None else None


# --------------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ExportFormat:
    """One export format: ``extension`` (with the dot), ``mime`` type and ``render`` (Graph -> bytes)."""

    name: str
    extension: str
    mime: str
    render: Callable[[Graph], bytes]
    description: str
    needs_browser: bool = False


def _json_bytes(graph: Graph) -> bytes:
    # allow_nan=False: NaN is not JSON and browsers' JSON.parse rejects it.
    return json.dumps(to_neuronpedia_json(graph), ensure_ascii=False, allow_nan=False, indent=1).encode("utf-8")


FORMATS: dict[str, ExportFormat] = {
    "svg": ExportFormat("svg", ".svg", "image/svg+xml", lambda g: to_svg(g).encode("utf-8"),
                        "SVG image of the graph figure", needs_browser=True),
    "png": ExportFormat("png", ".png", "image/png", lambda g: to_png(g), "PNG image of the graph figure",
                        needs_browser=True),
    "graphml": ExportFormat("graphml", ".graphml", "application/graphml+xml",
                            lambda g: to_graphml(g).encode("utf-8"), "GraphML (Gephi, yEd, Cytoscape, networkx)"),
    "dot": ExportFormat("dot", ".dot", "text/vnd.graphviz", lambda g: to_dot(g).encode("utf-8"),
                        "Graphviz DOT with pinned positions (neato -n2)"),
    "json": ExportFormat("json", ".json", "application/json", _json_bytes,
                         "Neuronpedia / circuit-tracer attribution-graph JSON"),
}
_SUFFIXES = {f.extension: f.name for f in FORMATS.values()} | {".gv": "dot", ".xml": "graphml"}


def export(graph: Graph, fmt: str) -> bytes:
    """The graph exported as ``fmt`` (a key of :data:`FORMATS`)."""
    key = str(fmt).lower().lstrip(".")
    if key not in FORMATS:
        raise InputError(f"Unknown export format {fmt!r}: use one of {', '.join(FORMATS)}.")
    return FORMATS[key].render(graph)


def format_for_path(path: str | Path) -> ExportFormat:
    """The export format named by a file's suffix (``.svg``, ``.png``, ``.graphml``, ``.dot`` / ``.gv``,
    ``.json``)."""
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise InputError(f"Cannot tell the export format from the file name {str(path)!r}: end it with one of "
                         f"{', '.join(sorted(_SUFFIXES))}.")
    return FORMATS[_SUFFIXES[suffix]]


def export_to_file(graph: Graph, path: str | Path) -> Path:
    """Write the graph to ``path`` in the format its suffix names; returns the path."""
    target = Path(path)
    data = format_for_path(target).render(graph)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return target
