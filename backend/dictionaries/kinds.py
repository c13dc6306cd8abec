"""The kinds of sparse dictionary a store holds (the ``dictionaries.kind`` column) and what each one reads.

One place for these facts, shared by the dictionary modules, the feature precompute and the pages; importing it is
cheap (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass

ATTN_SAE = "attn_sae"  # attention-output SAE on hook_z, all heads concatenated (Kissane et al. 2024)
TRANSCODER = "transcoder"  # MLP transcoder: reads the MLP's normalised input, predicts its output (Dunefsky et al. 2024)


@dataclass(frozen=True)
class FeatureKind:
    """How one kind of dictionary is read and shown."""

    hook: str  # backend.model.hooks kind of the dictionary's input
    per_head: bool  # the input is hook_z [..., n_heads, d_head]: DFA by head applies
    title: str  # what a feature of this kind is, for pages


KINDS: dict[str, FeatureKind] = {
    ATTN_SAE: FeatureKind(hook="z", per_head=True, title="attention output"),
    TRANSCODER: FeatureKind(hook="mlp_in", per_head=False, title="MLP transcoder"),
}
