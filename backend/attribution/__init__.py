"""Attribution methods behind one interface: (model, TaskBatch, component kinds) -> :class:`components.Scores`.

Every method follows the sign convention of :mod:`backend.attribution.components` (noising: score(c) estimates
m(clean with c ← corrupt) − m(clean)). The registry :data:`METHODS` names each method, says what it costs and loads
its module lazily, so importing this package (e.g. from a page that only reads the store) imports no torch.

=========  =====================================================  ==============================================
name       what                                                   cost
=========  =====================================================  ==============================================
patching   activation patching, exact (ground truth)              one forward pass per component (batched)
atp        attribution patching: gradient · (corrupt − clean)     2 forward + 1 backward
atpstar    AtP*: AtP + exact softmax for q/k changes + GradDrop   2 forward + (n_layers + 1) backward
relp       RelP: LRP coefficients · (corrupt − clean)             2 forward + 1 backward
ig         integrated gradients, per layer, ``steps`` α values    steps forward + backward per (kind, layer)
=========  =====================================================  ==============================================
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

GROUND_TRUTH = "patching"


@dataclass(frozen=True)
class MethodSpec:
    """One attribution method: where its function lives (loaded on first use), what it is and what it costs."""

    name: str
    target: str  # "module:function", imported lazily
    description: str
    cost: str  # in forward / backward passes
    options: tuple[str, ...] = ()  # method-specific keyword arguments it accepts (besides the shared ones)

    def load(self) -> Callable[..., Any]:
        """The method's function; ImportError if its module is not there (RelP may arrive separately)."""
        module, fn = self.target.split(":")
        return getattr(importlib.import_module(module), fn)

    @property
    def available(self) -> bool:
        """Whether the method's module can be imported here."""
        try:
            self.load()
        except (ImportError, AttributeError):
            return False
        return True


METHODS: dict[str, MethodSpec] = {
    "patching": MethodSpec("patching", "backend.attribution.patching:activation_patching",
                           "activation patching: the corrupt activation patched into the clean run (exact)",
                           "1 forward pass per component (batched, from the component's layer)",
                           ("max_tokens",)),
    "atp": MethodSpec("atp", "backend.attribution.atp:atp",
                      "attribution patching: gradient at the clean run × (corrupt − clean)",
                      "2 forward + 1 backward"),
    "atpstar": MethodSpec("atpstar", "backend.attribution.atpstar:atp_star",
                          "AtP* (Kramár et al. 2024): AtP with the attention softmax recomputed exactly for changed "
                          "queries / keys (QK fix) and GradDrop magnitudes",
                          "2 forward + (n_layers + 1) backward", ("qk_fix", "grad_drop")),
    "relp": MethodSpec("relp", "backend.attribution.relp:relp",
                       "RelP: LRP propagation coefficients × (corrupt − clean)",
                       "2 forward + 1 backward", ("rules",)),
    "ig": MethodSpec("ig", "backend.attribution.ig:integrated_gradients",
                     "integrated gradients along clean → corrupt, per layer (midpoint rule)",
                     "steps forward + backward per (kind, layer)", ("steps", "max_tokens")),
}


def available_methods() -> list[str]:
    """Names of the methods whose code is present, in registry order."""
    return [name for name, spec in METHODS.items() if spec.available]
