"""Pruning an attribution graph by influence on its target, and its strongest paths (pure functions).

**Influence** (circuit-tracer's definition, docs/methods.md §4): ``Â = |A|`` with each row (a target node's incoming
edges) divided by its sum, so row ``t`` says what fraction of ``t``'s direct inputs each source is. A node's
influence on the target is the sum over all paths of the products of these fractions:
``influence = e_target · (Â + Â² + …) = e_target · Â (I − Â)⁻¹``; the target's own influence is 1. Written by
hand with one linear solve (networkx has no matrix path sums; the graph is a DAG so ``I − Â`` is invertible).

**Pruning** (:func:`prune`):

1. nodes: rank every non-target node by influence; keep the shortest prefix of that ranking whose influence
   adds up to ``node_threshold`` of the total (and at most ``max_nodes``); the target is always kept;
2. edges: score each edge by ``Â[t, u] × influence(t)`` (with ``influence(target) = 1``), the share of the
   target's explanation flowing through it; keep the shortest prefix of the ranking of ALL the graph's edges
   whose score adds up to ``edge_threshold`` of the total, among edges whose two ends are kept;
3. drop nodes with no kept path to the target.

The pruned graph's own graph scores (:func:`graph_scores`, defined in :mod:`backend.circuits.quality`) are recorded under
``metadata["pruning"]["scores"]``, beside the scores of the graph as built (``metadata["scores"]``).

Every ranking is computed once on the full graph, so a larger threshold keeps a superset: pruning is monotone
in both thresholds (tests/circuits/test_circuits.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from backend.circuits.graph import Graph

if TYPE_CHECKING:
    import networkx as nx
    import numpy as np
    import pandas as pd
    import torch


def adjacency(graph: Graph) -> tuple[list[str], "torch.Tensor"]:
    """Node ids (in ``graph.nodes`` order) and the dense matrix ``A[t, u]`` of edge weights (rows: targets)."""
    import torch

    ids = graph.nodes["node_id"].tolist()
    A = torch.zeros(len(ids), len(ids), dtype=torch.float64)
    e = graph.edges
    if len(e):
        t, s = _positions(ids, e)
        A.index_put_((t, s), torch.tensor(e["weight"].to_numpy(dtype="float64")), accumulate=True)
    return ids, A


def _positions(ids: list[str], edges: "pd.DataFrame") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Row indices in ``ids`` of each edge's target and source (vectorised: graphs have ~10^5 edges)."""
    import pandas as pd
    import torch

    index = pd.Index(ids)
    t, s = index.get_indexer(edges["target"]), index.get_indexer(edges["source"])
    if (t < 0).any() or (s < 0).any():
        raise ValueError("an edge names a node that is not in the graph's nodes")
    return torch.as_tensor(t, dtype=torch.long), torch.as_tensor(s, dtype=torch.long)


def normalized_adjacency(A: "torch.Tensor") -> "torch.Tensor":
    """``|A|`` with each row divided by its sum (rows that sum to 0 stay 0)."""
    a = A.abs()
    return a / a.sum(1, keepdim=True).clamp_min(1e-30)


def influence(graph: Graph) -> "pd.Series":
    """Influence of every node on the target (see the module docstring), indexed by node id."""
    import pandas as pd
    import torch

    ids, A = adjacency(graph)
    An = normalized_adjacency(A)
    t = ids.index(graph.target_id)
    e = torch.zeros(len(ids), dtype=torch.float64)
    e[t] = 1.0
    # x (I − Â) = e Â  <=>  (I − Â)ᵀ xᵀ = (e Â)ᵀ
    x = torch.linalg.solve((torch.eye(len(ids), dtype=torch.float64) - An).T, An.T @ e)
    x[t] = 1.0
    return pd.Series(x.cpu().numpy(), index=ids, name="influence")


def with_influence(graph: Graph) -> Graph:
    """A copy of ``graph`` whose ``influence`` column is filled in."""
    inf = influence(graph)
    nodes = graph.nodes.copy()
    nodes["influence"] = nodes["node_id"].map(inf).astype(float)
    return Graph(nodes=nodes, edges=graph.edges.copy(), metadata=dict(graph.metadata))


def graph_scores(graph: Graph) -> dict[str, float]:
    """circuit-tracer's graph scores of ``graph`` (``compute_graph_scores``; :mod:`backend.circuits.quality`
    defines them): ``{"replacement", "completeness", "error_share"}``, NaN where a denominator is 0 (e.g. a graph
    with neither embeddings nor errors reaching the target)."""
    import torch

    from backend.circuits.graph import ERROR_KINDS

    ids, A = adjacency(graph)
    if not ids:
        return {"replacement": float("nan"), "completeness": float("nan"), "error_share": float("nan")}
    An = normalized_adjacency(A)
    n = len(ids)
    w = torch.zeros(n, dtype=torch.float64)
    w[ids.index(graph.target_id)] = 1.0
    # I = w Â (I − Â)⁻¹  <=>  (I − Â)ᵀ Iᵀ = (w Â)ᵀ
    infl = torch.linalg.solve((torch.eye(n, dtype=torch.float64) - An).T, An.T @ w)
    kinds = graph.nodes["kind"].tolist()
    is_err = torch.tensor([k in ERROR_KINDS for k in kinds])
    is_emb = torch.tensor([k == "embedding" for k in kinds])
    i_err, i_emb = float(infl[is_err].sum()), float(infl[is_emb].sum())
    non_error = 1.0 - An[:, is_err].sum(1)
    weight = infl + w
    total = float(weight.sum())
    others = float(infl.sum() - infl[w > 0].sum())
    return {
        "replacement": i_emb / (i_emb + i_err) if i_emb + i_err > 0 else float("nan"),
        "completeness": float((non_error * weight).sum()) / total if total > 0 else float("nan"),
        "error_share": i_err / others if others > 0 else float("nan"),
    }


@dataclass
class Ranking:
    """Every ranking pruning needs, computed once per graph (so a page can filter at any thresholds without the
    model or a linear solve, and a browser can do the same from :attr:`node_start` / :attr:`edge_start`).

    ``graph``: the graph with ``influence`` filled in. ``node_start[i]``: for node ``i`` (``graph.nodes`` order), the
    share of the total (non-negative) influence held by the nodes ranked before it, −1 for the first ranked node and
    2 when there is no positive influence at all; the target gets −1 (always kept). ``edge_start``: the same for
    edges (``graph.edges`` order), ranked by their share of the target's explanation. A node (edge) is in the
    shortest prefix reaching threshold ``t`` exactly when ``t >= 1`` or its start is below ``t``
    (:func:`in_prefix`); ``node_rank`` is the node's place in its ranking (the target: −1).
    """

    graph: Graph
    node_start: "np.ndarray"
    node_rank: "np.ndarray"
    edge_start: "np.ndarray"


def _starts(scores: "torch.Tensor") -> tuple["np.ndarray", "np.ndarray"]:
    """(start, rank) per element of ``scores`` (any order): the share of the total held by the elements ranked
    before it (descending, stable), −1 for the first, 2 for all when the total is not positive."""
    import numpy as np
    import torch

    s = scores.clamp_min(0)
    order = torch.argsort(-s, stable=True)
    total = float(s.sum())
    start = np.full(len(s), 2.0)
    rank = np.empty(len(s), dtype=np.int64)
    rank[order.numpy()] = np.arange(len(s))
    if total > 0 and len(s):
        before = (torch.cumsum(s[order], 0) - s[order]) / total
        start[order.numpy()] = before.numpy()
        start[int(order[0])] = -1.0
    return start, rank


def in_prefix(start: "np.ndarray", threshold: float) -> "np.ndarray":
    """Which elements are in the shortest prefix of their ranking whose scores reach ``threshold`` of the total."""
    import numpy as np

    return np.ones(len(start), dtype=bool) if threshold >= 1 else np.asarray(start) < threshold


def ranking(graph: Graph) -> Ranking:
    """The :class:`Ranking` of ``graph`` (one influence solve)."""
    import numpy as np
    import torch

    full = with_influence(graph)
    ids, A = adjacency(full)
    t = ids.index(full.target_id)
    inf = torch.tensor(full.nodes["influence"].to_numpy(dtype="float64"))
    others = np.array([i for i in range(len(ids)) if i != t], dtype=np.int64)
    node_start, node_rank = np.full(len(ids), -1.0), np.full(len(ids), -1, dtype=np.int64)
    node_start[others], node_rank[others] = _starts(inf[torch.as_tensor(others)])
    An = normalized_adjacency(A)
    edges = full.edges.reset_index(drop=True)
    full.edges = edges
    if len(edges):
        tt, ss = _positions(ids, edges)
        weight = inf.clone()
        weight[t] = 1.0
        edge_start, _ = _starts(An[tt, ss] * weight[tt].clamp_min(0))
    else:
        edge_start = np.zeros(0)
    return Ranking(full, node_start, node_rank, edge_start)


def select(ranked: Ranking, node_threshold: float, edge_threshold: float,
           max_nodes: int | None = None) -> tuple[set[str], "pd.DataFrame"]:
    """The node ids and the edges :func:`prune` keeps at these thresholds (steps 1–3 of the module docstring)."""
    import networkx as nx
    import numpy as np

    full = ranked.graph
    ids = full.nodes["node_id"].to_numpy()
    keep = in_prefix(ranked.node_start, node_threshold)
    if max_nodes is not None:
        keep &= (ranked.node_rank < max(0, int(max_nodes) - 1)) | (ranked.node_rank < 0)
    target = full.target_id
    keep |= ids == target
    kept = set(ids[keep].tolist())
    edges = full.edges
    e_keep = in_prefix(ranked.edge_start, edge_threshold) if len(edges) else np.zeros(0, dtype=bool)
    e_keep &= edges["source"].isin(kept).to_numpy() & edges["target"].isin(kept).to_numpy()
    kept_edges = edges[e_keep]
    g = nx.DiGraph()
    g.add_nodes_from(kept)
    g.add_edges_from(zip(kept_edges["source"], kept_edges["target"]))
    reach = nx.ancestors(g, target) | {target}
    return reach, kept_edges


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98,
          max_nodes: int | None = None, ranked: Ranking | None = None) -> Graph:
    """The pruned graph (see the module docstring), with ``influence`` filled in and the thresholds and counts
    recorded under ``metadata["pruning"]``. ``node_threshold`` / ``edge_threshold`` in [0, 1]; ``ranked``: the
    graph's :func:`ranking`, when the caller already has it."""
    if not (0.0 <= node_threshold <= 1.0 and 0.0 <= edge_threshold <= 1.0):
        raise ValueError("thresholds are fractions between 0 and 1")
    ranked = ranked or ranking(graph)
    full = ranked.graph
    reach, kept_edges = select(ranked, node_threshold, edge_threshold, max_nodes)
    out = full.subgraph(reach, kept_edges)
    out.metadata["pruning"] = {
        "node_threshold": float(node_threshold), "edge_threshold": float(edge_threshold),
        "max_nodes": max_nodes, "nodes_before": len(full.nodes), "edges_before": len(full.edges),
        "nodes_after": len(out.nodes), "edges_after": len(out.edges),
        "scores": graph_scores(out),  # the pruned view's own replacement / completeness scores
    }
    return out


def to_path_graph(graph: Graph) -> "nx.DiGraph":
    """networkx DiGraph whose edge ``cost`` is ``−log`` of the normalised edge weight, so the cheapest path is the
    one whose fractions multiply to the most."""
    import math

    import networkx as nx

    ids, A = adjacency(graph)
    An = normalized_adjacency(A)
    g = nx.DiGraph()
    g.add_nodes_from(ids)
    t_idx, s_idx = (An > 0).nonzero(as_tuple=True)
    for t, s in zip(t_idx.tolist(), s_idx.tolist()):
        g.add_edge(ids[s], ids[t], cost=-math.log(float(An[t, s])), share=float(An[t, s]))
    return g


def strongest_paths(graph: Graph, k: int = 5) -> list[tuple[list[str], float]]:
    """The ``k`` strongest paths from any input node (a node with no incoming edges: embeddings, errors) to the
    target, as ``(node ids, strength)`` with strength = the product of the normalised edge weights along the
    path; by networkx's k-shortest simple paths on ``−log`` weights from a virtual source."""
    import itertools
    import math

    import networkx as nx

    g = to_path_graph(graph)
    source = "__inputs__"
    for n in [n for n in g.nodes if g.in_degree(n) == 0 and n != graph.target_id]:
        g.add_edge(source, n, cost=0.0, share=1.0)
    if source not in g or not nx.has_path(g, source, graph.target_id):
        return []
    paths = itertools.islice(nx.shortest_simple_paths(g, source, graph.target_id, weight="cost"), max(0, int(k)))
    out = []
    for p in paths:
        cost = sum(g.edges[a, b]["cost"] for a, b in zip(p[:-1], p[1:]))
        out.append((p[1:], math.exp(-cost)))
    return out
