"""Head Polysemanticity: attention-SAE (hook_z) features grouped by the head they live in.

Placeholder until the head-polysemanticity precompute lands: says what is missing and how to get it.
"""

from __future__ import annotations

from backend import ui


def body(ctx: ui.PageContext) -> None:
    """Say what the view needs and what the store holds of it."""
    dicts = ctx.summary["dictionaries"]
    z = dicts[dicts["hook_name"].fillna("").str.endswith("hook_z")]
    ui.show_missing(
        ctx,
        missing="attention-SAE dictionaries",
        arrives_with="the head-polysemanticity precompute (features grouped by their dominant head)",
        have={"attention-SAE dictionaries": len(z), "features": ctx.summary["counts"].get("features", 0) if len(z) else 0},
        extra="The view will show, per attention head, how many features it hosts and how different their top "
              "activating contexts are — a measure of how polysemantic the head is.",
    )


ui.run_page("Head Polysemanticity", body)
