"""What a viewer of a graph chose to see, as one value: thresholds, pins, hides, supernodes, labels, the selected node,
error nodes shown or not, and an in-graph search — with its link form, its checks and the view it selects.

:class:`ViewState` travels three ways: in the page's link (:func:`from_params` / :func:`to_params`; every value is
bounded and a malformed or over-long one is refused with a sentence), to and from the browser's graph component
(:meth:`ViewState.to_dict` / :func:`from_dict`) and into the store beside the graph (``graph_views``,
:mod:`backend.circuits.storage`). :func:`apply_view` is the server's copy of the filter the browser runs on every
slider move (``backend/ui/components/circuit_graph/graph.js`` mirrors it line for line): both start from the same
:class:`backend.circuits.prune.Ranking`, so the drawn graph and the graph the page scores, checks and exports agree.

The browser is sent only the edges in the prefix reaching :data:`EDGE_MAX` of the edge ranking (a graph as built has
~10^5 edges, most of them negligible), so the edge threshold goes up to :data:`EDGE_MAX`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Mapping

from backend.circuits.graph import ERROR_KINDS, Graph
from backend.errors import InputError, literal

if TYPE_CHECKING:
    import numpy as np

    from backend.circuits.prune import Ranking

EDGE_MAX = 0.99  # the largest edge threshold: edges ranked beyond it are neither sent to the browser nor drawn
DEFAULT_NODE_THRESHOLD = 0.8
DEFAULT_EDGE_THRESHOLD = 0.98
NODE_ID = re.compile(r"[A-Za-z0-9_.\-]{1,48}")  # every id graph.node_id writes, and nothing that could be markup
MAX_IDS = 100  # pinned or hidden nodes in one view
MAX_SUPERNODES = 20
MAX_MEMBERS = 60  # nodes in one supernode
MAX_LABELS = 100
MAX_LABEL_CHARS = 120
MAX_NAME_CHARS = 60
MAX_SEARCH_CHARS = 100
MAX_PARAM_CHARS = 8_000  # one link parameter; the bounds above keep every valid view below it
# Link parameters of a view (the page adds prompt / answer / wrong / graph / store / model itself).
PARAMS: dict[str, str] = {"node_threshold": "nt", "edge_threshold": "et", "pinned": "pin", "hidden": "hide",
                          "supernodes": "sn", "labels": "lbl", "selected": "node", "show_errors": "err",
                          "search": "q"}


@dataclass(frozen=True)
class ViewState:
    """One view of a graph. ``supernodes``: ``(name, member ids)`` pairs; ``labels``: ``(node id, text)`` pairs (a
    label given by a person; it replaces the node's automatic label wherever the node is drawn or exported)."""

    node_threshold: float = DEFAULT_NODE_THRESHOLD
    edge_threshold: float = DEFAULT_EDGE_THRESHOLD
    pinned: tuple[str, ...] = ()
    hidden: tuple[str, ...] = ()
    supernodes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    selected: str | None = None
    show_errors: bool = True
    search: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (supernodes in Neuronpedia's form: a list of lists, name first, then member ids)."""
        d = asdict(self)
        d["supernodes"] = [[name, *members] for name, members in self.supernodes]
        d["labels"] = dict(self.labels)
        d["pinned"], d["hidden"] = list(self.pinned), list(self.hidden)
        return d

    def label_map(self) -> dict[str, str]:
        """Labels by node id."""
        return dict(self.labels)


def _fail(what: str, why: str) -> InputError:
    return InputError(f"The view's {what} {why}: it was left out.")


def _threshold(value: Any, what: str, top: float) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise _fail(what, f"{literal(value, 40)} is not a number between 0 and {top:g}") from None
    if not math.isfinite(f) or not 0.0 <= f <= top:
        raise _fail(what, f"{literal(value, 40)} is not a number between 0 and {top:g}")
    return round(f, 4)


def _ids(values: Any, what: str, known: set[str] | None, limit: int = MAX_IDS) -> tuple[str, ...]:
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise _fail(what, "is not a list of node ids")
    if len(values) > limit:
        raise _fail(what, f"names {len(values)} nodes (at most {limit})")
    bad = [v for v in values if not NODE_ID.fullmatch(v)]
    if bad:
        raise _fail(what, f"holds {literal(bad[0], 50)}, which is not a node id")
    unknown = [v for v in values if known is not None and v not in known]
    if unknown:
        raise _fail(what, f"names {literal(unknown[0], 50)}, which this graph does not have")
    return tuple(dict.fromkeys(values))


def _text(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise _fail(what, "is not text")
    if len(value) > limit:
        raise _fail(what, f"is {len(value)} characters long (at most {limit})")
    return re.sub(r"[\x00-\x1f\x7f]", " ", value)


def _supernodes(values: Any, known: set[str] | None) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not isinstance(values, list) or len(values) > MAX_SUPERNODES:
        raise _fail("supernodes", f"are not a list of at most {MAX_SUPERNODES} [name, node id, ...] lists")
    out: dict[str, tuple[str, ...]] = {}
    for item in values:
        if not isinstance(item, list) or len(item) < 2 or not isinstance(item[0], str):
            raise _fail("supernodes", "hold an entry that is not a [name, node id, ...] list")
        name = _text(item[0], "supernode name", MAX_NAME_CHARS).strip()
        if not name:
            raise _fail("supernodes", "hold a supernode without a name")
        out[name] = _ids(item[1:], f"supernode {literal(name, 40)}", known, MAX_MEMBERS)
    return tuple(out.items())


def _labels(values: Any, known: set[str] | None) -> tuple[tuple[str, str], ...]:
    if not isinstance(values, dict) or len(values) > MAX_LABELS:
        raise _fail("labels", f"are not a map of at most {MAX_LABELS} node ids to text")
    ids = _ids(list(values), "labels", known, MAX_LABELS)
    return tuple((i, _text(values[i], f"label of {i}", MAX_LABEL_CHARS).strip()) for i in ids
                 if str(values[i]).strip())


def from_dict(data: Mapping[str, Any], known: set[str] | None = None) -> tuple[ViewState, list[str]]:
    """A :class:`ViewState` from a dict (the browser component's value, a stored view, an imported JSON's view) and
    the sentences saying which values were refused (each refused value falls back to its default). ``known``: the
    graph's node ids, when every id must be one of them."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    readers = {
        "node_threshold": lambda v: _threshold(v, "node threshold", 1.0),
        "edge_threshold": lambda v: _threshold(v, "edge threshold", EDGE_MAX),
        "pinned": lambda v: _ids(v, "pinned nodes", known),
        "hidden": lambda v: _ids(v, "hidden nodes", known),
        "supernodes": lambda v: _supernodes(v, known),
        "labels": lambda v: _labels(v, known),
        "selected": lambda v: None if v in (None, "") else _ids([v], "selected node", known)[0],
        "show_errors": lambda v: v if isinstance(v, bool) else bool(_fail("error-node switch", "is not true or false")),
        "search": lambda v: _text(v, "search", MAX_SEARCH_CHARS),
    }
    for name, read in readers.items():
        if name not in data:
            continue
        try:
            values[name] = read(data[name])
        except InputError as exc:
            problems.append(str(exc))
    return ViewState(**values), problems


def from_params(params: Mapping[str, str], known: set[str] | None = None) -> tuple[ViewState, list[str]]:
    """A :class:`ViewState` from link parameters (:data:`PARAMS`), and the sentences saying which were refused."""
    data: dict[str, Any] = {}
    problems: list[str] = []
    for name, key in PARAMS.items():
        raw = params.get(key)
        if raw is None:
            continue
        if len(raw) > MAX_PARAM_CHARS:
            problems.append(f"The link's {key!r} value is {len(raw):,} characters long (at most {MAX_PARAM_CHARS:,}): "
                            "it was left out.")
            continue
        if name in ("pinned", "hidden"):
            data[name] = [v for v in raw.split(",") if v]
        elif name in ("supernodes", "labels"):
            try:
                data[name] = json.loads(raw)
            except ValueError:
                problems.append(f"The link's {key!r} value is not valid JSON: it was left out.")
        elif name == "show_errors":
            data[name] = raw != "0"
        else:
            data[name] = raw
    state, more = from_dict(data, known)
    return state, problems + more


def to_params(state: ViewState) -> dict[str, str | None]:
    """The link parameters of ``state`` (None for a value at its default, so the link stays short)."""
    default = ViewState()
    compact = {"separators": (",", ":"), "ensure_ascii": False}
    return {
        "nt": None if state.node_threshold == default.node_threshold else f"{state.node_threshold:g}",
        "et": None if state.edge_threshold == default.edge_threshold else f"{state.edge_threshold:g}",
        "pin": ",".join(state.pinned) or None,
        "hide": ",".join(state.hidden) or None,
        "sn": json.dumps([[n, *m] for n, m in state.supernodes], **compact) if state.supernodes else None,
        "lbl": json.dumps(dict(state.labels), **compact) if state.labels else None,
        "node": state.selected,
        "err": None if state.show_errors else "0",
        "q": state.search or None,
    }


def sent_edges(ranked: "Ranking") -> "np.ndarray":
    """Which edges of ``ranked.graph`` the browser gets: the prefix of the edge ranking reaching :data:`EDGE_MAX`."""
    from backend.circuits.prune import in_prefix

    return in_prefix(ranked.edge_start, EDGE_MAX)


def apply_view(ranked: "Ranking", state: ViewState) -> Graph:
    """The graph a view shows: the pruned graph at the view's thresholds (:func:`backend.circuits.prune.select`),
    plus the pinned nodes and their edges among :func:`sent_edges`, minus the hidden nodes (and every error node when
    ``show_errors`` is off); the target always stays. ``metadata["pruning"]`` records the view."""
    import pandas as pd

    from backend.circuits.prune import graph_scores, select

    full = ranked.graph
    target = full.target_id
    reach, kept_edges = select(ranked, state.node_threshold, min(state.edge_threshold, EDGE_MAX))
    hidden = set(state.hidden)
    if not state.show_errors:
        hidden |= set(full.nodes.loc[full.nodes["kind"].isin(ERROR_KINDS), "node_id"])
    hidden.discard(target)
    keep = (reach | set(state.pinned)) - hidden
    sent = full.edges[sent_edges(ranked)]
    pinned = set(state.pinned)
    extra = sent[sent["source"].isin(pinned) | sent["target"].isin(pinned)]
    edges = pd.concat([kept_edges, extra]).drop_duplicates(["source", "target"])
    view = full.subgraph(keep, edges)
    labels = state.label_map()
    if labels:
        view.nodes["label"] = [labels.get(n, lab) for n, lab in zip(view.nodes["node_id"], view.nodes["label"])]
    view.metadata["pruning"] = {
        "node_threshold": state.node_threshold, "edge_threshold": state.edge_threshold, "max_nodes": None,
        "nodes_before": len(full.nodes), "edges_before": len(full.edges), "nodes_after": len(view.nodes),
        "edges_after": len(view.edges), "pinned": list(state.pinned), "hidden": sorted(hidden),
        "scores": graph_scores(view)}
    view.metadata["view"] = state.to_dict()
    return view


def payload(ranked: "Ranking", hover: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The graph as the browser component needs it: per node its id, kind, label (plain text; the component escapes
    it for plotly and writes it into the page as text), layout row (:func:`backend.circuits.layout.row_of`) and token
    position (the browser lays out the nodes it shows as :func:`backend.circuits.layout.layout` does, with that
    module's constants), size value, ranking start and hover text (escaped here: plotly reads hover text as HTML); the sent edges as node
    indices, weight and ranking start; the row names and tokens (escaped)."""
    from backend.circuits.figure import KIND_STYLE, escape_multiline, escape_text, node_hover
    from backend.circuits.layout import CELL_WIDTH, MAX_COLUMN, MAX_SPACING, has_influence, n_layers, row_labels, row_of

    full = ranked.graph
    hover = hover or {}
    tokens = full.tokens
    n = n_layers(full)
    records = full.nodes.to_dict("records")
    index = {str(r["node_id"]): i for i, r in enumerate(records)}
    size_column = "influence" if has_influence(full) else "activation"
    nodes = {"id": [], "kind": [], "label": [], "row": [], "start": [], "size": [], "hover": [], "pos": []}
    for r, start in zip(records, ranked.node_start):
        nid = str(r["node_id"])
        value = r.get(size_column)
        nodes["id"].append(nid)
        nodes["kind"].append(str(r["kind"]))
        nodes["label"].append(str(r["label"]) if isinstance(r.get("label"), str) and r["label"] else nid)
        nodes["row"].append(row_of(str(r["kind"]), int(r["layer"]), n))
        nodes["start"].append(float(start))
        nodes["size"].append(abs(float(value)) if value is not None and math.isfinite(float(value)) else 0.0)
        nodes["hover"].append(escape_multiline(hover[nid]) if nid in hover else node_hover(r, tokens))
        nodes["pos"].append(int(r["pos"]))
    sent = sent_edges(ranked)
    e = full.edges[sent]
    edges = {"s": [index[str(s)] for s in e["source"]], "t": [index[str(t)] for t in e["target"]],
             "w": [float(f"{float(w):.4g}") for w in e["weight"]],
             "start": [float(s) for s in ranked.edge_start[sent]]}
    return {
        "nodes": nodes, "edges": edges, "target": index[full.target_id],
        "rows": row_labels(n),
        "tokens": [f"{escape_text(t)}<br>{i}" for i, t in enumerate(tokens)],
        "layout": {"cellWidth": CELL_WIDTH, "maxSpacing": MAX_SPACING, "maxColumn": MAX_COLUMN},
        "kinds": {k: {"symbol": v["symbol"], "color": v["color"], "name": v["name"]} for k, v in KIND_STYLE.items()},
        "errorKinds": sorted(ERROR_KINDS),
        "edgeMax": EDGE_MAX,
    }
