"""Reading a Neuronpedia / circuit-tracer attribution-graph JSON back into a :class:`~backend.circuits.graph.Graph` and
its view (pins, supernodes, labels): what circuitscope exports (:mod:`.neuronpedia`) and what circuit-tracer's
``create_graph_files`` / Neuronpedia write (``metadata``, ``qParams``, ``nodes``, ``links``).

Node ids are rebuilt from each node's ``feature_type``, ``layer``, ``ctx_idx`` and its ``node_id`` (circuit-tracer:
``{layer}_{feature}_{pos}`` for transcoder features, ``E_{token}_{pos}`` for embeddings), or from the
``circuitscope_id`` our own export adds. A graph has one target: the node with ``is_target_logit`` (else the most
probable logit); other logit nodes and their links are left out (circuit-tracer writes one per top logit). The file is
untrusted: its size, node and link counts are bounded, every field is type-checked, and every failure is one sentence.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from backend.circuits.graph import NODE_COLUMNS, Graph, node_id
from backend.errors import InputError, literal

MAX_BYTES = 64 * 1024 * 1024
MAX_NODES = 50_000
MAX_LINKS = 2_000_000
MAX_TEXT = 200  # a node's clerp / a token kept as a label
_OURS = re.compile(r"^(E_\d{1,5}|T\d{1,4}_\d{1,5}_\d{1,7}|M\d{1,4}_\d{1,5}|A\d{1,4}_\d{1,5}_\d{1,7}|AE\d{1,4}_\d{1,5}|"
                   r"H\d{1,4}\.\d{1,4}_\d{1,5}|L_(?:\d{1,7}|diff))$")
_KINDS = {"cross layer transcoder": "transcoder", "transcoder": "transcoder", "mlp reconstruction error": "mlp_error",
          "embedding": "embedding", "logit": "logit", "lorsa": "attn_feature", "lorsa error": "attn_error"}


def _bad(why: str) -> InputError:
    return InputError(f"This graph JSON cannot be imported: {why}.")


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _bad(f"{where} is not a whole number")
    try:
        f = float(value)
    except ValueError:
        raise _bad(f"{where} ({literal(value, 30)}) is not a whole number") from None
    if not math.isfinite(f) or f != int(f) or abs(f) > 10**9:
        raise _bad(f"{where} ({literal(value, 30)}) is not a whole number")
    return int(f)


def _num(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return float("nan")
    return float(value) if math.isfinite(float(value)) else float("nan")


def _text(value: Any) -> str:
    return str(value)[:MAX_TEXT] if isinstance(value, str) else ""


def parse_json(data: bytes | str) -> dict[str, Any]:
    """The JSON document in ``data`` (bounded in size; InputError with one sentence otherwise)."""
    if len(data) > MAX_BYTES:
        raise _bad(f"it is {len(data) / 1e6:.0f} MB (at most {MAX_BYTES // 2**20} MB)")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise _bad(f"it is not valid JSON ({literal(str(exc), 80)})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list) or not isinstance(doc.get("links"), list):
        raise _bad("it has no 'nodes' and 'links' lists (a Neuronpedia / circuit-tracer graph has both)")
    return doc


def _our_node(node: dict[str, Any], i: int) -> tuple[str, str, int, int, int | None]:
    """(our id, kind, layer, pos, feature index) of one JSON node."""
    where = f"nodes[{i}]"
    ftype = node.get("feature_type")
    if ftype not in _KINDS:
        raise _bad(f"{where} has feature_type {literal(ftype, 40)}, which circuitscope does not know")
    kind = _KINDS[ftype]
    pos = _int(node.get("ctx_idx"), f"{where}.ctx_idx")
    ours = node.get("circuitscope_id")
    nid = str(node.get("node_id", ""))
    parts = nid.split("_")
    if kind == "embedding":
        token = _int(parts[1], f"{where}.node_id") if len(parts) == 3 and parts[0] == "E" else None
        return node_id("embedding", pos=pos), kind, -1, pos, token
    layer = _int(node.get("layer"), f"{where}.layer")
    if kind == "logit":
        return "", kind, layer, pos, _int(node.get("feature"), f"{where}.feature")
    if kind in ("mlp_error", "attn_error"):
        return node_id(kind, layer, pos), kind, layer, pos, None
    if kind == "attn_feature" and len(parts) == 4 and parts[1] == "head":  # a whole head (graphs with head nodes)
        index = _int(parts[2], f"{where}.node_id")
        return node_id("head", layer, pos, index), "head", layer, pos, index
    if isinstance(ours, str) and _OURS.fullmatch(ours) and ours[0] in "TA" and not ours.startswith("AE"):
        index = _int(ours.rsplit("_", 1)[1], f"{where}.circuitscope_id")
    elif kind == "transcoder" and len(parts) == 3:
        index = _int(parts[1], f"{where}.node_id")
    elif kind == "attn_feature" and len(parts) == 4 and parts[1] == "lor":
        index = _int(parts[2], f"{where}.node_id")
    else:
        raise _bad(f"{where} has node_id {literal(nid, 40)}, which names no feature index")
    return node_id(kind, layer, pos, index), kind, layer, pos, index


def graph_from_json(doc: dict[str, Any], model: str | None = None) -> tuple[Graph, dict[str, Any]]:
    """The graph and its view (``{"pinned", "supernodes", "labels", "selected"}`` in our ids, to be checked with
    :func:`backend.circuits.view.from_dict`) of a parsed Neuronpedia / circuit-tracer JSON (:func:`parse_json`).
    ``model``: the model name to record (default: the JSON's ``metadata.scan``)."""
    import pandas as pd

    nodes_in, links_in = doc["nodes"], doc["links"]
    if len(nodes_in) > MAX_NODES or len(links_in) > MAX_LINKS:
        raise _bad(f"it has {len(nodes_in):,} nodes and {len(links_in):,} links (at most {MAX_NODES:,} and "
                   f"{MAX_LINKS:,})")
    meta_in = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    q = doc.get("qParams") if isinstance(doc.get("qParams"), dict) else {}
    logits = [(i, n) for i, n in enumerate(nodes_in) if isinstance(n, dict) and n.get("feature_type") == "logit"]
    if not logits:
        raise _bad("it has no logit node to be the target")
    flagged = [(i, n) for i, n in logits if n.get("is_target_logit") is True]
    target_i = (flagged or sorted(logits, key=lambda p: -_num(p[1].get("token_prob")) if not math.isnan(
        _num(p[1].get("token_prob"))) else 0.0))[0][0]
    rows, ours_of = [], {}
    token_ids: dict[int, int] = {}
    n_layers = 0
    for i, node in enumerate(nodes_in):
        if not isinstance(node, dict):
            raise _bad(f"nodes[{i}] is not an object")
        if node.get("feature_type") == "logit" and i != target_i:
            continue
        ours, kind, layer, pos, index = _our_node(node, i)
        if kind == "logit":
            n_layers = max(n_layers, layer - 1)
            ours = node_id("logit", index=index)
        if kind == "embedding" and index is not None:
            token_ids[pos] = index
        if kind != "embedding" and kind != "logit":
            n_layers = max(n_layers, layer + 1)
        raw_id = node.get("node_id")
        if not isinstance(raw_id, str) or raw_id in ours_of:
            raise _bad(f"nodes[{i}].node_id is missing or repeated")
        if ours in ours_of.values():
            raise _bad(f"two nodes map to the same node {literal(ours)}")
        ours_of[raw_id] = ours
        clerp = _text(node.get("clerp"))
        rows.append({"node_id": ours, "kind": kind, "layer": layer if kind != "embedding" else -1, "pos": pos,
                     "feature": index, "activation": _num(node.get("activation")), "value": float("nan"),
                     "bias": float("nan"), "attribution": float("nan"), "influence": float("nan"),
                     "label": clerp or ours, "dict_id": None, "is_target": i == target_i,
                     "_user": node.get("circuitscope_user_label") is True})
    for row in rows:
        if row["kind"] == "logit":
            row["layer"] = n_layers
    sources, targets, weights = [], [], []
    for j, link in enumerate(links_in):
        if not isinstance(link, dict):
            raise _bad(f"links[{j}] is not an object")
        s, t = link.get("source"), link.get("target")
        if s not in ours_of or t not in ours_of:
            if any(isinstance(v, str) and v in {str(n.get("node_id")) for _, n in logits} for v in (s, t)):
                continue  # a link of a logit that is not the target
            raise _bad(f"links[{j}] names a node that is not in nodes")
        w = _num(link.get("weight"))
        if math.isnan(w):
            raise _bad(f"links[{j}].weight is not a finite number")
        sources.append(ours_of[s])
        targets.append(ours_of[t])
        weights.append(w)
    nodes = pd.DataFrame(rows)
    user = set(nodes.loc[nodes["_user"], "node_id"])
    nodes = nodes[list(NODE_COLUMNS)]
    nodes["feature"] = nodes["feature"].astype("Int64")
    edges = pd.DataFrame({"source": sources, "target": targets, "weight": weights, "source_factor": float("nan"),
                          "invariant": float("nan"), "norm_factor": float("nan")})
    edges = edges.groupby(["source", "target"], as_index=False, sort=False).agg(
        weight=("weight", "sum"), source_factor=("source_factor", "first"), invariant=("invariant", "first"),
        norm_factor=("norm_factor", "first"))
    tokens = [_text(t) for t in meta_in.get("prompt_tokens", [])] if isinstance(meta_in.get("prompt_tokens"),
                                                                                list) else []
    target = nodes_in[target_i]
    clerp = _text(target.get("clerp"))
    m = re.match(r'^Output "(.*)" \(p=', clerp)
    metadata: dict[str, Any] = {
        "model": model or _text(meta_in.get("scan")) or "imported",
        "prompt": _text(meta_in.get("prompt")) if isinstance(meta_in.get("prompt"), str) else "".join(tokens),
        "tokens": tokens, "token_ids": [token_ids.get(p, -1) for p in range(len(tokens))],
        "target": {"kind": "logit", "token_id": _int(target.get("feature"), "the target's feature"),
                   "token": m.group(1) if m else clerp, "value": float("nan"),
                   "prob": _num(target.get("token_prob"))},
        "method": "imported", "attention": "pass-through", "n_layers": n_layers,
        "params": {"slug": _text(meta_in.get("slug"))}, "dictionaries": {},
    }
    graph = Graph(nodes=nodes, edges=edges, metadata=metadata)
    supernodes = []
    for sn in q.get("supernodes", []) if isinstance(q.get("supernodes"), list) else []:
        if isinstance(sn, list) and len(sn) >= 2 and isinstance(sn[0], str):
            supernodes.append([sn[0], *[ours_of[x] for x in sn[1:] if isinstance(x, str) and x in ours_of]])
    pinned = [ours_of[x] for x in q.get("pinnedIds", []) if isinstance(x, str) and x in ours_of] \
        if isinstance(q.get("pinnedIds"), list) else []
    labels = {nid: lab for nid, lab in zip(graph.nodes["node_id"], graph.nodes["label"]) if nid in user}
    view = {"pinned": pinned, "supernodes": [sn for sn in supernodes if len(sn) > 1], "labels": labels}
    if isinstance(q.get("clickedId"), str) and q["clickedId"] in ours_of:
        view["selected"] = ours_of[q["clickedId"]]
    return graph, view


def import_graph(store: Any, data: bytes | str, model: str | None = None) -> tuple[str, list[str]]:
    """Import a Neuronpedia / circuit-tracer JSON into the store at ``store`` (a save beside it) with its view; returns
    the graph id and sentences about view values that were left out."""
    from backend.circuits.storage import save_graph
    from backend.circuits.view import from_dict

    graph, view = graph_from_json(parse_json(data), model)
    state, problems = from_dict(view, set(graph.nodes["node_id"]))
    gid = save_graph(store, graph, source="import", view=state.to_dict())
    return gid, problems
