"""Circuit Graph: attribution graphs (features, errors, attention and logit nodes) for a prompt.

Placeholder until the transcoder / attribution-graph precompute lands: says what is missing and how to get it.
"""

from __future__ import annotations

from backend import ui


def body(ctx: ui.PageContext) -> None:
    """Say what the view needs and what the store holds of it."""
    counts = ctx.summary["counts"]
    dicts = ctx.summary["dictionaries"]
    transcoders = dicts[dicts["kind"].fillna("").str.contains("transcoder")]
    ui.show_missing(
        ctx,
        missing="attribution graphs",
        arrives_with="the transcoder and attribution-graph precompute",
        have={"transcoders": len(transcoders), "graphs": counts.get("graphs", 0),
              "graph nodes": counts.get("graph_nodes", 0), "graph edges": counts.get("graph_edges", 0)},
        extra="The view will draw a pruned attribution graph for a prompt, from input tokens through transcoder "
              "features to the predicted token, with the edge weights that survive pruning.",
    )


ui.run_page("Circuit Graph", body)
