"""The Neuronpedia / circuit-tracer attribution-graph JSON.

:func:`to_neuronpedia_json` follows circuit-tracer's ``circuit_tracer/frontend/graph_models.py`` (the pydantic
``Metadata`` / ``QParams`` / ``Node`` / ``Link`` models) and ``circuit_tracer/utils/create_graph_files.py`` (how a
pruned graph becomes that JSON), checked against Neuronpedia's upload schema
``apps/webapp/app/api/graph/graph-schema.json`` and its ``formatCLTGraphData``; see the function's docstring for how
our node kinds map onto it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

from backend.circuits.graph import Graph
from backend.circuits.prune import graph_scores

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
    prob = finite_number(target.get("prob"))
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
            "activation": finite_number(row.get("activation")), "circuitscope_id": str(row["node_id"]), "kind": kind,
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
        "pruning_settings": _jsonable({k: v for k, v in pruning.items() if k != "scores"}),
        # how far to trust the graph (backend.circuits.quality): circuit-tracer's graph scores for the graph as
        # built and for this pruned view, the conservation split with its cancellation ratios, faithfulness
        "graph_scores": _jsonable({
            "as_built": meta.get("scores") or (None if pruning else graph_scores(graph)),
            "pruned": (pruning.get("scores") or graph_scores(graph)) if pruning else None}),
        "conservation": _jsonable(meta.get("conservation")),
        "target_metric": "logit difference" if target.get("kind") == "logit_diff" else
        "logit minus mean logit" if target.get("demeaned") else "logit",
    }
    if meta.get("faithfulness") is not None:
        metadata["faithfulness"] = _jsonable(meta["faithfulness"])
    if finite_number(pruning.get("node_threshold")) is not None:
        metadata["node_threshold"] = float(pruning["node_threshold"])
    view = meta.get("view") or {}
    user_labels = set((view.get("labels") or {}))
    for node in nodes:
        if node["circuitscope_id"] in user_labels:
            node["circuitscope_user_label"] = True
    q_params = {"pinnedIds": [ids[n] for n in view.get("pinned", []) if n in ids],
                "supernodes": [[str(sn[0]), *[ids[n] for n in sn[1:] if n in ids]]
                               for sn in view.get("supernodes", []) if isinstance(sn, list) and sn],
                "linkType": "both", "clickedId": ids.get(str(view.get("selected")), ""), "sg_pos": ""}
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
             if kind != "logit" and finite_number(v) is not None]
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


def finite_number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _int(value: Any) -> int | None:
    f = finite_number(value)
    return int(f) if f is not None else None
