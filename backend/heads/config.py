"""Typed settings of the induction-head step (head polysemanticity has fixed rules, see its module)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InductionConfig:
    """Probe sizes: sequences per probe condition, copy length of the repeated random tokens, longest matching prefix
    K, tokens per prefix/competition sequence, heads classified (the top ones by induction score)."""

    sequences: int = 32
    repeat_len: int = 24
    max_prefix: int = 6
    seq_len: int = 40
    candidates: int = 16
