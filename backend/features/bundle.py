"""Graph bundles: an attribution graph's Neuronpedia / circuit-tracer JSON plus one dashboard file per feature node, in
the feature format of Anthropic's attribution-graph frontend that circuit-tracer's and Neuronpedia's viewers read.

A feature file (:func:`feature_detail`) holds what that frontend's ``AnthropicFeatureDetail`` has — ``index``,
``top_logits`` / ``bottom_logits`` (token strings, strongest first), ``act_min`` / ``act_max`` (its colour scale) and
``examples_quantiles`` (``[{quantile_name, examples: [{tokens, tokens_acts_list, train_token_ind,
is_repeated_datapoint}]}]``, top activations first) — plus circuitscope's figures: the logit values, the activation
range and histogram, the activation frequency (density over scored tokens), the dense / outlier flags and the label.

Layout of a bundle (:func:`bundle_files`; a directory or a ``.zip``, :func:`write_bundle`)::

    graph-metadata.json                 {"graphs": [{slug, scan, prompt, prompt_tokens, title_prefix}]}
    <slug>.json                         the graph; metadata.feature_details points at the feature files
    features/<dict>/<index>.json        one per feature node (<dict>: the dict_id with / as __)
    features/viewer/<cantor>.json       the same files of transcoder nodes, named by the node's ``feature`` number

The viewers fetch ``<feature_json_base_url>/<node feature>.json``, where a node's ``feature`` is cantor(layer, index);
attention-SAE features share those numbers with same-layer transcoder features, so only transcoder features (what
circuit-tracer draws) have a viewer copy, and every node carries ``feature_json``, the path of its own file. With
circuit-tracer installed, ``circuit_tracer.frontend.local_server.serve(data_dir=BUNDLE, features_dir=BUNDLE /
"features")`` serves a bundle.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from backend.circuits.export.neuronpedia import cantor, process_token, to_neuronpedia_json
from backend.errors import InputError, literal
from backend.features import queries as q
from backend.features.labels import feature_label

if TYPE_CHECKING:
    import duckdb

    from backend.circuits.graph import Graph

FEATURE_KINDS = ("transcoder", "attn_feature")  # graph node kinds that are dictionary features
VIEWER_DIR = "features/viewer"
TOP_EXAMPLES = 10
N_INTERVALS = 5
PER_INTERVAL = 5
N_LOGITS = 10


def dict_dir(dict_id: str) -> str:
    """The directory name of a dictionary's feature files (its dict_id with ``/`` as ``__``, other unsafe
    characters as ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(dict_id).replace("/", "__")).strip(".") or "dictionary"


def _examples(df: Any) -> list[dict[str, Any]]:
    out = []
    for _, row in df.iterrows():
        positions = [int(p) for p in row["positions"]]
        acts = [float(a) if np.isfinite(a) else 0.0 for a in row["acts"]]  # BOS is not scored: 0 in JSON
        out.append({"tokens": [process_token(str(t)) for t in row["tokens"]], "tokens_acts_list": acts,
                    "train_token_ind": positions.index(int(row["pos"])), "is_repeated_datapoint": False,
                    "context_id": int(row["context_id"]), "pos": int(row["pos"]), "act": float(row["act"])})
    return out


def feature_detail(con: "duckdb.DuckDBPyConnection", dict_id: str, feature: int) -> dict[str, Any]:
    """One feature's dashboard in the Anthropic / circuit-tracer feature format (module docstring); InputError for
    a feature the store does not have."""
    s = q.feature_summary(con, dict_id, int(feature))
    if s is None:
        raise InputError(f"This store has no feature {int(feature)} in dictionary {literal(dict_id)}.")
    layer = int(s["layer"])
    logits = q.feature_logits(con, dict_id, int(feature))
    hist = q.feature_histogram(con, dict_id, int(feature))
    flags = q.feature_flags(con, dict_id, int(feature))
    label = feature_label(con, dict_id, int(feature))
    quantiles: list[dict[str, Any]] = []
    if s["n_active"]:
        quantiles.append({"quantile_name": "Top activations",
                          "examples": _examples(q.feature_top_examples(con, dict_id, int(feature), TOP_EXAMPLES))})
        quant = q.feature_quantile_examples(con, dict_id, int(feature), N_INTERVALS, PER_INTERVAL)
        vmax = float(s["max_act"])
        for interval, part in quant.groupby("interval", sort=False):
            lo, hi = int(interval) / N_INTERVALS * vmax, (int(interval) + 1) / N_INTERVALS * vmax
            quantiles.append({"quantile_name": f"Interval {int(interval) + 1} of {N_INTERVALS} ({lo:.3g} – {hi:.3g})",
                              "examples": _examples(part)})

    def tokens(kind: str) -> tuple[list[str], list[float]]:
        part = logits[logits["kind"] == kind].sort_values("rank").head(N_LOGITS)
        return [process_token(str(t)) for t in part["token_str"]], [float(v) for v in part["value"]]

    top, top_values = tokens("promoted")
    bottom, bottom_values = tokens("suppressed")
    finite = lambda v: float(v) if v is not None and np.isfinite(v) else None  # noqa: E731
    return {
        "index": cantor(layer, int(feature)), "dict_id": dict_id, "layer": layer, "feature": int(feature),
        "kind": str(s["kind"]), "label": label["label"], "label_is_automatic": label["automatic"],
        "top_logits": top, "bottom_logits": bottom, "top_logits_values": top_values,
        "bottom_logits_values": bottom_values,
        "act_min": 0.0, "act_max": finite(s["max_act"]) or 0.0,
        "activation_range": {"min": finite(hist["lo"].min()) if len(hist) else None, "max": finite(s["max_act"])},
        "activation_frequency": finite(s["density"]), "n_active": int(s["n_active"] or 0),
        "scored_tokens": int(s["scored_tokens"]) if s["scored_tokens"] is not None else None,
        "mean_act": finite(s["mean_act"]),
        "histogram": {"lo": [float(v) for v in hist["lo"]], "hi": [float(v) for v in hist["hi"]],
                      "count": [int(v) for v in hist["count"]]},
        "dense": flags["dense"], "outlier": flags["outlier"], "second_act": finite(flags["second"]),
        "examples_quantiles": quantiles,
    }


def _feature_nodes(graph: "Graph") -> list[tuple[str, int, str]]:
    """(dict_id, feature, kind) of every distinct feature node of ``graph``."""
    seen: dict[tuple[str, int], str] = {}
    for kind, d, f in zip(graph.nodes["kind"], graph.nodes["dict_id"], graph.nodes["feature"]):
        if kind in FEATURE_KINDS and isinstance(d, str) and d and f is not None and f == f:
            seen.setdefault((d, int(f)), str(kind))
    return [(d, f, k) for (d, f), k in seen.items()]


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, allow_nan=False, indent=1).encode("utf-8")


def bundle_files(con: "duckdb.DuckDBPyConnection", graph: "Graph") -> dict[str, bytes]:
    """The files of ``graph``'s bundle (module docstring), by relative path; the graph as given (prune it first to
    bundle what a page shows)."""
    doc = to_neuronpedia_json(graph)
    meta = doc["metadata"]
    slug = re.sub(r"[^A-Za-z0-9._-]", "-", str(meta["slug"])) or "graph"
    meta["slug"] = slug
    files: dict[str, bytes] = {}
    paths: dict[tuple[str, int], str] = {}
    for dict_id, feature, kind in _feature_nodes(graph):
        detail = feature_detail(con, dict_id, feature)
        path = f"features/{dict_dir(dict_id)}/{feature}.json"
        data = _dumps(detail)
        files[path] = data
        paths[(dict_id, feature)] = path
        if kind == "transcoder":
            files[f"{VIEWER_DIR}/{detail['index']}.json"] = data
    by_id = {str(r["node_id"]): r for r in graph.nodes.to_dict("records")}
    for node in doc["nodes"]:
        row = by_id.get(str(node.get("circuitscope_id")))
        if row is not None and row["kind"] in FEATURE_KINDS and isinstance(row["dict_id"], str):
            node["feature_json"] = paths.get((row["dict_id"], int(row["feature"])))
    meta["feature_details"] = {
        "feature_json_base_url": "/" + VIEWER_DIR,
        "circuitscope_feature_dirs": {d: f"features/{dict_dir(d)}" for d in sorted({k[0] for k in paths})}}
    files[f"{slug}.json"] = _dumps(doc)
    files["graph-metadata.json"] = _dumps({"graphs": [{
        "slug": slug, "scan": meta["scan"], "prompt": meta["prompt"], "prompt_tokens": meta["prompt_tokens"],
        "title_prefix": ""}]})
    return files


def bundle_zip(con: "duckdb.DuckDBPyConnection", graph: "Graph") -> bytes:
    """The bundle as one zip archive (the page's download)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path, data in bundle_files(con, graph).items():
            zf.writestr(path, data)
    return buf.getvalue()


def write_bundle(con: "duckdb.DuckDBPyConnection", graph: "Graph", target: str | Path) -> Path:
    """Write ``graph``'s bundle to ``target``: a ``.zip`` file, or else a directory (created; an existing one must be
    empty). Its parent directory must exist. Returns ``target``."""
    target = Path(target)
    if not target.parent.is_dir():
        raise InputError(f"Cannot write {literal(target)}: the directory {literal(target.parent)} does not exist.")
    if target.suffix.lower() == ".zip":
        if target.is_dir():
            raise InputError(f"Cannot write {literal(target)}: it is a directory; give a file name.")
        target.write_bytes(bundle_zip(con, graph))
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InputError(f"Cannot write the bundle into {literal(target)}: give a new or empty directory, or a .zip "
                         "file name.")
    for path, data in bundle_files(con, graph).items():
        out = target / path
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
    return target
