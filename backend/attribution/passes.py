"""Forward passes shared by the attribution methods: capturing the scored tensors, and running the model from a layer.

Patching and IG change one site at layer l, so nothing below layer l changes: they restart the forward pass at
layer l from the clean run's cached ``hook_resid_pre`` (TransformerLens' ``start_at_layer``), which skips about
half the model on average. Every site hook lives inside block l (resid_pre, hook_z, mlp_out), so it still fires.
They also unembed only the positions the metric reads (:func:`readout`): the last one for a logit or probability
difference, the scored second copy for induction. On SmolLM2 the unembedding (576 × 49152) costs as much as six
layers per position, so this saves about a third of a patching pass from mid-depth on IOI.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

from backend.attribution.components import Site
from backend.model.hooks import hook_name

if TYPE_CHECKING:
    import torch

    from backend.inputs.tasks import TaskBatch

Hook = tuple[Any, Callable[..., Any]]


def capture(model: Any, tokens: "torch.Tensor", sites: Sequence[Site], resid: bool = False
            ) -> tuple["torch.Tensor", dict[str, "torch.Tensor"], dict[int, "torch.Tensor"]]:
    """One no-grad forward of ``tokens``: ``(logits, {site.label: scored tensor}, {layer: resid_pre})``.

    The resid_pre dict (inputs for :func:`forward_from`) is filled only when ``resid`` is true.
    """
    import torch

    names = {s.hook for s in sites}
    if resid:
        names |= {hook_name("resid_pre", layer) for layer in {s.layer for s in sites}}
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=sorted(names))
        scored = {s.label: s.extract(cache[s.hook]) for s in sites}
    starts = {layer: cache[hook_name("resid_pre", layer)] for layer in {s.layer for s in sites}} if resid else {}
    return logits, scored, starts


def readout(batch: "TaskBatch") -> tuple["torch.Tensor", "TaskBatch"]:
    """The positions the metric reads, and a batch whose metric takes logits of only those positions."""
    import torch

    if batch.metric_name == "mean_logprob":
        assert batch.targets is not None
        cols = (batch.targets >= 0).any(0).nonzero().squeeze(1)
        return cols, replace(batch, targets=batch.targets[:, cols])
    return torch.tensor([batch.seq_len - 1]), batch  # logit_diff / prob_diff read the last position


def forward_from(model: Any, resid_pre: "torch.Tensor", layer: int, hooks: Sequence[Hook],
                 positions: "torch.Tensor | None" = None) -> "torch.Tensor":
    """Logits ``[rows, len(positions), vocab]`` of the model run from block ``layer`` on ``resid_pre``
    ([rows, pos, d_model]) with ``hooks``; only ``positions`` are unembedded (default: all)."""
    from transformer_lens.utilities import apply_softcap

    with model.hooks(fwd_hooks=list(hooks)):
        resid = model(resid_pre, start_at_layer=layer, stop_at_layer=model.cfg.n_layers)
        if positions is not None:
            resid = resid[:, positions]
        # TransformerLens' own final norm and unembedding modules, as in HookedTransformer.forward
        if model.cfg.normalization_type is not None:
            resid = model.ln_final(resid)
        return apply_softcap(model.unembed(resid), model.cfg.output_logits_soft_cap)


def copies_per_pass(n: int, seq: int, max_tokens: int) -> int:
    """How many copies of an ``n``-example batch fit into one forward pass of at most ``max_tokens`` tokens (>= 1)."""
    return max(1, int(max_tokens) // max(1, n * seq))
