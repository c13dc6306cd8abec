"""Typed settings of the ``graphs`` precompute step."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GraphConfig:
    """Attribution graphs stored for the Circuit Graph page: (prompt, answer, wrong answer or None); answer None = the
    model's top prediction. ``max_nodes``: feature nodes kept per graph (embeddings and error nodes are always kept)."""

    prompts: tuple[tuple[str, str | None, str | None], ...] = (
        ("The capital of France is", None, None),
        ("When Mary and John went to the store, John gave a drink to", " Mary", " John"),
    )
    max_nodes: int = 400
