"""Attribution patching (AtP; Nanda 2023, Syed et al. 2023) and the gradient-times-delta estimate RelP builds on.

``score(c) = ∂m/∂c|clean · (c_corrupt − c_clean)``, summed over the component's elements and averaged over examples
(the first-order Taylor estimate of the noising effect; sign convention in :mod:`backend.attribution.components`).
Cost: one forward pass on the corrupt prompts and one forward + one backward pass on the clean prompts, for every
component at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from backend.attribution.components import Scores, Site, build_sites
from backend.attribution.passes import Hook, capture

if TYPE_CHECKING:
    import torch

    from backend.inputs.tasks import TaskBatch


def gradient_estimate(model: Any, batch: "TaskBatch", kinds: Sequence[str], fwd_hooks: Sequence[Hook] = (),
                      per_position_heads: bool = False, dictionaries: Mapping[int, Any] | None = None) -> Scores:
    """``grad · (corrupt − clean)`` per component, the gradient taken in a clean pass with ``fwd_hooks`` installed.

    ``fwd_hooks`` (``(hook name or filter, fn)`` TransformerLens hooks, e.g. RelP's rules) are active during the
    clean forward and backward pass only; they may sit on any hook point, the scored ones included, because the
    capture hooks are registered after them and take the activation — and its gradient — of the value that
    actually flows downstream. Permanent hooks on the model stay active throughout.
    """
    import torch

    sites = build_sites(model, kinds, per_position_heads, dictionaries)
    _, corrupt, _ = capture(model, batch.corrupt, sites)
    captured: dict[str, torch.Tensor] = {}
    clean: dict[str, torch.Tensor] = {}

    def capture_hook(site: Site) -> Hook:
        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            if site.kind == "feature":
                f = site.extract(act)
                f_var = f.detach().clone().requires_grad_(True)  # the latents as a node of their own
                captured[site.label], clean[site.label] = f_var, f.detach()
                return site.insert(act, f, f_var)
            if not act.requires_grad:  # frozen weights and no earlier capture: make it a leaf to get its gradient
                act = act.detach().requires_grad_(True)
            captured[site.label], clean[site.label] = act, act.detach()
            return act

        return site.hook, hook

    with torch.enable_grad(), model.hooks(fwd_hooks=[*fwd_hooks, *(capture_hook(s) for s in sites)]):
        logits = model(batch.clean, return_type="logits")
        metric = batch.metric(logits)  # mean over examples: grads carry the 1/n
        # autograd.grad (not .backward): only the activations' gradients, no weight gradients accumulated.
        grads = torch.autograd.grad(metric, [captured[s.label] for s in sites], allow_unused=True)
    per_site = {}
    for site, g in zip(sites, grads):
        delta = corrupt[site.label] - clean[site.label]
        g = torch.zeros_like(delta) if g is None else g.detach()
        # The metric is the batch mean, so each example's gradient carries a factor 1/n: times n, per example.
        per_site[site.label] = site.reduce(g * delta) * len(batch)
    return Scores.from_sites(sites, per_site, per_position_heads)


def atp(model: Any, batch: "TaskBatch", kinds: Sequence[str], per_position_heads: bool = False,
        dictionaries: Mapping[int, Any] | None = None) -> Scores:
    """Attribution patching: :func:`gradient_estimate` with plain gradients (no extra hooks)."""
    return gradient_estimate(model, batch, kinds, (), per_position_heads, dictionaries)
