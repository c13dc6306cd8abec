"""How far to trust a graph: the conservation check, and text for the graph scores (pure functions).

**Graph scores** (circuit-tracer's ``compute_graph_scores``, :func:`backend.circuits.prune.graph_scores`;
docs/methods.md §4). With ``Â`` the adjacency with
absolute weights and each row (a node's incoming edges) divided by its sum, and ``w`` the target's indicator, the
influence of every node on the target is ``I = w (Â + Â² + …)``. Then

* **replacement score** = ``I(embeddings) / (I(embeddings) + I(errors))``: the share of the end-to-end influence
  from the tokens to the target that does not run into an error node (1: the features explain everything);
* **completeness score** = ``Σ_n (1 − Σ_{e ∈ errors} Â[n, e]) (I_n + w_n) / Σ_n (I_n + w_n)``: the share of each
  node's input that does not come from error nodes, averaged with the node's influence (and the target itself)
  as weights — partial credit for nodes mostly explained by features;
* **error share** = ``I(errors) / Σ_{n ≠ target} I_n``: the share of all influence that error nodes hold.

Computed on whatever graph is given: the graph as built, or a pruned view (its nodes' inputs then count only
what is left). Written by hand, with one linear solve (a DAG's ``I − Â`` is invertible); the test checks it
against a power series in numpy on a hand-made graph.

**Conservation** (:func:`conservation`): in the frozen system the target's value is exactly the sum of its direct
edges from *every* candidate node plus a constant (BOS, biases, ``b_dec``, …). Reported by node kind (features,
errors, embeddings, constant), with two **cancellation ratios**: ``Σ|direct edges| / |Σ direct edges|`` and
``Σ|total attribution of the inputs| / |target|`` (inputs: embeddings and error nodes). Ratios near 1 mean the
parts add up; ratios of 10 or more mean large contributions cancel, and any single edge or attribution is a
small difference of large numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from backend.circuits.graph import ERROR_KINDS

if TYPE_CHECKING:
    import torch

    from backend.circuits.replacement import Candidates

CANCELLATION_WARN = 10.0  # a ratio above this is called out on the page and in the CLI


def conservation(c: "Candidates", attribution: "torch.Tensor", to_target: "torch.Tensor") -> dict[str, Any]:
    """The target's value split into its direct edges from every candidate by kind plus the constant, the same
    for total attributions of the inputs, and the two cancellation ratios (see the module docstring)."""
    import torch

    value = float(c.value[c.target])
    groups = {"features": ("transcoder", "attn_feature"), "errors": ERROR_KINDS, "embeddings": ("embedding",)}
    mask = {g: torch.tensor([k in kinds for k in c.kind]) for g, kinds in groups.items()}
    direct = {g: float(to_target[m].sum()) for g, m in mask.items()}
    direct["constant"] = value - sum(direct.values())
    edges_sum = float(sum(direct[g] for g in groups))
    edges_abs = float(to_target[mask["features"] | mask["errors"] | mask["embeddings"]].abs().sum())
    inputs = mask["errors"] | mask["embeddings"]
    total = {"errors": float(attribution[mask["errors"]].sum()),
             "embeddings": float(attribution[mask["embeddings"]].sum())}
    total["constant"] = value - total["errors"] - total["embeddings"]
    return {
        "target": value,
        "direct": direct,
        "total_attribution": total,
        "direct_cancellation": edges_abs / abs(edges_sum) if edges_sum != 0 else float("inf"),
        "input_cancellation": float(attribution[inputs].abs().sum()) / abs(value) if value != 0 else float("inf"),
    }


def cancellation_note(cons: dict[str, Any] | None) -> str | None:
    """One sentence when cancellation dominates the graph (either ratio above :data:`CANCELLATION_WARN`), else
    None."""
    if not cons:
        return None
    worst = max(float(cons.get("direct_cancellation", 0.0)), float(cons.get("input_cancellation", 0.0)))
    if worst <= CANCELLATION_WARN:
        return None
    return (f"Cancellation dominates this graph: contributions {worst:.0f}× larger than the target cancel each "
            "other, so single edges and attributions are small differences of large numbers.")


def describe(cons: dict[str, Any] | None, scores: dict[str, float] | None) -> list[str]:
    """Plain-text lines for the CLI: the conservation split, the cancellation ratios and the graph scores."""
    lines = []
    if cons:
        d = cons["direct"]
        lines.append(f"target {cons['target']:.3f} = features {d['features']:+.3f} + errors {d['errors']:+.3f} + "
                     f"embeddings {d['embeddings']:+.3f} + constant {d['constant']:+.3f} (direct edges)")
        lines.append(f"cancellation: sum|direct edges|/|their sum| {cons['direct_cancellation']:.2f}, "
                     f"sum|total attribution of inputs|/|target| {cons['input_cancellation']:.2f}")
        note = cancellation_note(cons)
        if note:
            lines.append(note)
    if scores:
        lines.append(f"replacement score {scores['replacement']:.3f}, completeness score "
                     f"{scores['completeness']:.3f}, error share of influence {scores['error_share']:.3f}")
    return lines
