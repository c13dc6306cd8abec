"""Which attention heads carry an edge: the exact per-head split of a graph's edges, on demand.

Attention in layers without an attention SAE is not a node but part of every edge (:mod:`.replacement`). Each
path from a source ``u`` to a target ``t`` either stays at one position without any attention (the *residual*
part, only when ``u`` and ``t`` share a position) or has exactly one *last* attention hop ``(layer, head)`` before
it reaches ``t``'s position; grouping paths by that hop splits the edge exactly, so the parts add up to the edge.
For an attention-SAE feature the last hop is its own read of ``hook_z``, so its incoming edges split over the
heads of its own layer (DFA by head).

The split needs the model and the prompt's frozen system again (a graph stores edges, not paths), so it is
computed when asked — for one edge, or for a node's strongest incoming edges (the Circuit Graph page's node panel,
the CLI's ``--heads``) — by :func:`backend.circuits.replacement.head_split`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from backend.circuits.graph import Graph, has_head_nodes
from backend.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

    from backend.circuits.replacement import Frozen

RESIDUAL = "residual"  # the ``carrier`` of the attention-free part of an edge
SPLIT_COLUMNS: tuple[str, ...] = ("source", "target", "edge", "carrier", "layer", "head", "weight")


def refreeze(model: Any, graph: Graph, transcoders: dict[int, Any], attn_saes: dict[int, Any]) -> "Frozen":
    """The frozen system ``graph`` was built from: its prompt and target, with the dictionaries of the layers it
    used (``metadata["dictionaries"]``). InputError for graphs with head nodes (built before attention became a
    pass-through: their edges do not contain the attention paths)."""
    import torch

    from backend.circuits.replacement import Target, freeze

    if has_head_nodes(graph) or graph.metadata.get("attention") != "pass-through":
        raise InputError("This graph was built with attention heads as nodes, before edges carried attention: "
                         "rebuild it to see which heads carry its edges.")
    m = graph.metadata
    used = m.get("dictionaries") or {}
    tcs = {l: transcoders[l] for l in used.get("transcoder_layers", []) if l in transcoders}
    saes = {l: attn_saes[l] for l in used.get("attn_sae_layers", []) if l in attn_saes}
    missing = sorted(set(used.get("transcoder_layers", [])) - set(tcs)) + sorted(
        set(used.get("attn_sae_layers", [])) - set(saes))
    if missing:
        raise InputError(f"The dictionaries this graph was built with are not loaded for layer(s) {missing}: load "
                         "the store it was built from.")
    t = m["target"]
    target = Target(int(t["token_id"]), None if t.get("wrong_id") is None else int(t["wrong_id"]))
    return freeze(model, torch.tensor([int(i) for i in m["token_ids"]]), target, tcs, saes)


def split_edges(fz: "Frozen", graph: Graph, target_id: str, source_ids: Sequence[str]) -> "pd.DataFrame":
    """The per-head split of the edges ``source_ids -> target_id`` of ``graph`` (built from ``fz``), long format
    (:data:`SPLIT_COLUMNS`): one row per (source, carrier) with a nonzero part, where ``carrier`` is
    ``"L{layer}.H{head}"`` or ``"residual"``; ``edge`` is the graph's stored weight (the parts add up to it)."""
    import pandas as pd
    import torch

    from backend.circuits.replacement import head_split, node_ids

    index = {nid: i for i, nid in enumerate(node_ids(fz.cand))}
    unknown = [n for n in [target_id, *source_ids] if n not in index]
    if unknown:
        raise InputError(f"Node(s) {', '.join(unknown)} are not in this prompt's replacement model: the graph does "
                         "not match the loaded model or dictionaries.")
    if fz.cand.kind[index[target_id]] not in ("transcoder", "attn_feature", "logit"):
        raise InputError(f"{target_id} is an input node (an embedding or error): it has no incoming edges.")
    weights = {(s, t): float(w) for s, t, w in zip(graph.edges["source"], graph.edges["target"], graph.edges["weight"])}
    rows = []
    if source_ids:
        with torch.no_grad():
            heads, residual = head_split(fz, [index[s] for s in source_ids], index[target_id])
        for k, source in enumerate(source_ids):
            edge = weights.get((source, target_id), 0.0)
            if float(residual[k]) != 0.0:
                rows.append((source, target_id, edge, RESIDUAL, -1, -1, float(residual[k])))
            for layer, head in torch.nonzero(heads[k], as_tuple=False).tolist():
                rows.append((source, target_id, edge, f"L{layer}.H{head}", layer, head, float(heads[k, layer, head])))
    return pd.DataFrame(rows, columns=list(SPLIT_COLUMNS))


def incoming_heads(model: Any, graph: Graph, transcoders: dict[int, Any], attn_saes: dict[int, Any],
                   node: str, k: int = 8, fz: "Frozen | None" = None) -> "pd.DataFrame":
    """The ``k`` strongest incoming edges of ``node`` (by |weight|, in ``graph``) split by the heads that carry
    them (:func:`split_edges`). ``fz``: the graph's frozen system if already built (:func:`refreeze`)."""
    e = graph.edges[graph.edges["target"] == node]
    e = e.reindex(e["weight"].abs().sort_values(ascending=False).index).head(int(k))
    fz = fz if fz is not None else refreeze(model, graph, transcoders, attn_saes)
    return split_edges(fz, graph, node, e["source"].tolist())


def summarise(split: "pd.DataFrame", labels: dict[str, str] | None = None, top: int = 3) -> "pd.DataFrame":
    """One row per edge: source (label), edge weight, and its ``top`` largest parts as text
    (``"L3.H5 +0.41 (62%)"``, shares of the sum of |parts|) — the node panel's table."""
    import pandas as pd

    labels = labels or {}
    rows = []
    for (source, edge), part in split.groupby(["source", "edge"], sort=False):
        mag = part["weight"].abs()
        total = float(mag.sum()) or 1.0
        best = part.assign(mag=mag).sort_values("mag", ascending=False).head(int(top))
        carried = ", ".join(f"{r.carrier} {r.weight:+.3g} ({abs(r.weight) / total:.0%})" for r in best.itertuples())
        rows.append({"source": labels.get(source, source), "source_id": source, "weight": float(edge),
                     "carried by": carried})
    return pd.DataFrame(rows, columns=["source", "source_id", "weight", "carried by"])
