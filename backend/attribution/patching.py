"""Activation patching, the ground truth the estimates are scored against.

Direction: **noising** — each component's corrupt activation is patched into the clean run, and the score is
``m(clean with c ← c_corrupt) − m(clean)`` per example (``Scores.examples``) and averaged over examples (module docstring of
:mod:`backend.attribution.components`). One forward pass per component, batched: a pass holds ``k`` copies of the
clean batch, copy j patching component j (components of every kind at one layer share passes), and starts at that
layer from the clean residual stream (nothing below it changes). Components whose clean and corrupt activations
are identical in every example (e.g. positions before the first token where the prompts differ) are not run: their
effect is 0 by definition.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from backend.attribution.components import Scores, Site, build_sites
from backend.attribution.passes import capture, copies_per_pass, forward_from, readout
from backend.progress import track

if TYPE_CHECKING:
    import torch

    from backend.inputs.tasks import TaskBatch

MAX_TOKENS = 2048  # tokens per forward pass (only the positions the metric reads are unembedded)


def changed_components(site: Site, clean: "torch.Tensor", corrupt: "torch.Tensor") -> "torch.Tensor":
    """Indices ``[k, ndim]`` of the site's components whose activation differs in at least one example."""
    differs = site.reduce((clean != corrupt).to(clean.dtype)).sum(0) > 0
    return differs.nonzero()


def activation_patching(model: Any, batch: "TaskBatch", kinds: Sequence[str], per_position_heads: bool = False,
                        dictionaries: Mapping[int, Any] | None = None, max_tokens: int = MAX_TOKENS) -> Scores:
    """Exact noising effect of every component (see the module docstring), with a progress bar."""
    import torch

    sites = build_sites(model, kinds, per_position_heads, dictionaries)
    n, seq = batch.clean.shape
    clean_logits, clean, starts = capture(model, batch.clean, sites, resid=True)
    _, corrupt, _ = capture(model, batch.corrupt, sites)
    base = batch.metric_per_example(clean_logits)  # [n]
    positions, scored = readout(batch)
    k_max = copies_per_pass(n, seq, max_tokens)

    # A pass holds up to k_max patched copies of the batch, drawn from every site of one layer (resid_pre, heads,
    # features and the MLP of block l all start from resid_pre l): few, large passes. Small passes are much slower
    # per token on a busy 2-core CPU, where every op pays a thread-synchronisation overhead (measured: a pass of
    # 270 tokens cost 3x per token what a pass of 2040 tokens did).
    per_site: dict[str, torch.Tensor] = {}
    by_layer: dict[int, list[tuple[Site, torch.Tensor]]] = {}
    for site in sites:
        a_clean = clean[site.label]
        per_site[site.label] = torch.zeros(site.reduce(a_clean).shape, dtype=torch.float64)  # [n, *shape]
        comps = changed_components(site, a_clean, corrupt[site.label])
        by_layer.setdefault(site.layer, []).extend((site, c) for c in comps)
    jobs = [(layer, items[i : i + k_max]) for layer, items in sorted(by_layer.items())
            for i in range(0, len(items), k_max)]

    def patch_hook(site: Site, masks: torch.Tensor, k: int) -> Any:
        a_corrupt = corrupt[site.label]

        def patch(act: torch.Tensor, hook: Any) -> torch.Tensor:
            a = site.extract(act)
            new = torch.where(masks, a_corrupt[None], a.reshape(k, n, *a.shape[1:])).reshape(a.shape)
            return site.insert(act, a, new)

        return site.hook, patch

    with torch.no_grad():
        for layer, items in track(jobs, total=len(jobs), desc="Activation patching", unit="pass"):
            k = len(items)
            hooks = []
            in_pass = {s.label: s for s, _ in items}  # this pass's sites, in forward order
            for site in in_pass.values():
                copies = [j for j, (s, _) in enumerate(items) if s is site]
                shape = corrupt[site.label].shape[1:]
                masks = torch.zeros((k, *shape), dtype=torch.bool)  # other sites' copies: nothing patched here
                masks[copies] = site.masks(shape, torch.stack([items[j][1] for j in copies]))
                hooks.append(patch_hook(site, masks[:, None], k))
            rows = scored.select(torch.arange(n).repeat(k))  # copy j = rows j*n .. j*n+n-1
            start = starts[layer].repeat(k, *([1] * (starts[layer].dim() - 1)))
            logits = forward_from(model, start, layer, hooks, positions)
            effect = (rows.metric_per_example(logits).view(k, n) - base).double()  # [copy, example]
            for j, (site, comp) in enumerate(items):
                per_site[site.label][(slice(None), *comp.tolist())] = effect[j]
    return Scores.from_sites(sites, per_site, per_position_heads)
