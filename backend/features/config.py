"""Typed settings of the feature-dashboard steps (``features`` and ``transcoder_features``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureConfig:
    """Attention-SAE features are scored on every corpus context; transcoder features on the first
    ``transcoder_contexts`` (None: all): every MLP layer at L0 ~30 nonzeros per token is ~10x the attention SAEs' rows
    per token. ``transcoder_contexts`` <= the transcoder training contexts lets the step reuse their MLP inputs (no
    forward pass). Stored logit effects cost one [d_sae, d_model] @ [d_model, d_vocab] product per layer."""

    transcoder_contexts: int | None = 64
    transcoder_logits: bool = True
