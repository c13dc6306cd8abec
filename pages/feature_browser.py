"""Feature Browser: SAE features of the residual stream / MLPs with their top activations and logit effects.

Placeholder until the SAE-training precompute lands: says what is missing and how to get it.
"""

from __future__ import annotations

from backend import ui


def body(ctx: ui.PageContext) -> None:
    """Say what the feature browser needs and what the store holds of it."""
    counts = ctx.summary["counts"]
    dicts = ctx.summary["dictionaries"]
    ui.show_missing(
        ctx,
        missing="SAE features",
        arrives_with="the SAE-training precompute (residual-stream and MLP dictionaries with feature statistics)",
        have={"dictionaries": len(dicts), "features": counts.get("features", 0),
              "feature activations": counts.get("feature_activations", 0)},
        extra="The browser will list each dictionary's features with density, top activating contexts from the "
              "store's corpus and the output tokens each feature promotes; links will take `dict` and `feature` "
              "query parameters.",
    )


ui.run_page("Feature Browser", body)
