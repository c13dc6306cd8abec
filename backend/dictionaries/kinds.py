"""The kinds of sparse dictionary a store holds (the ``dictionaries.kind`` column) and what each one reads.

One place for these facts, shared by the feature precompute (:mod:`backend.features`) and the pages; importing
it is cheap (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass

from backend.dictionaries import attention_sae as dictionaries
from backend.dictionaries import transcoder as transcoders


@dataclass(frozen=True)
class FeatureKind:
    """How one kind of dictionary is read and shown."""

    hook: str  # backend.hooks kind of the dictionary's input
    per_head: bool  # the input is hook_z [..., n_heads, d_head]: DFA by head applies
    title: str  # what a feature of this kind is, for pages


KINDS: dict[str, FeatureKind] = {
    dictionaries.KIND: FeatureKind(hook="z", per_head=True, title="attention output"),  # Kissane et al. 2024
    transcoders.KIND: FeatureKind(hook="mlp_in", per_head=False, title="MLP transcoder"),  # Dunefsky et al. 2024
}
