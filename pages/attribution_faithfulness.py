"""Attribution Faithfulness: cheap attributions (attribution patching, ...) scored against activation patching.

Placeholder until the attribution precompute lands: says what is missing and how to get it.
"""

from __future__ import annotations

from backend import ui


def body(ctx: ui.PageContext) -> None:
    """Say what the view needs and what the store holds of it."""
    counts = ctx.summary["counts"]
    ui.show_missing(
        ctx,
        missing="attribution scores",
        arrives_with="the attribution precompute (attribution patching and activation patching on the built-in tasks)",
        have={"attribution runs": counts.get("attribution_runs", 0), "attribution scores": counts.get("attributions", 0)},
        extra="The view will compare each cheap attribution method with activation patching, component by "
              "component, for every built-in task in the store.",
    )


ui.run_page("Attribution Faithfulness", body)
