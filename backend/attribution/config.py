"""Typed settings of the ``attributions`` precompute step."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttributionConfig:
    """Which comparisons the precompute stores: (task, examples) pairs, the methods (those present run), the component
    kinds ("feature" adds the store's attention SAEs), IG's α steps, the induction task's copy length. Activation
    patching costs one (batched) pass per component, IG ``ig_steps`` forward+backward passes per (kind, layer)."""

    tasks: tuple[tuple[str, int], ...] = (("ioi", 2), ("greater-than", 1), ("induction", 1))
    methods: tuple[str, ...] = ("patching", "atp", "atpstar", "relp", "ig")
    kinds: tuple[str, ...] = ("resid", "mlp", "head")
    ig_steps: int = 2
    induction_length: int = 10
