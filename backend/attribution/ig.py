"""Integrated gradients over components (and SAE features) along the straight path from the clean to the corrupt
activation.

``score(c) = mean_α ∂m/∂c |_(c_clean + α(c_corrupt − c_clean)) · (c_corrupt − c_clean)``, averaged over examples:
the noising orientation of :mod:`backend.attribution.components`, i.e. the negative of docs/methods.md §3's
corrupt → clean path. **Per layer:** all components of one kind at one layer move along the path together (one
site at a time; everything else keeps its clean value), so completeness holds per layer: the sum of a layer's
scores → the exact effect of patching the whole layer as ``steps`` grows. The α are the midpoints
``(j + ½)/steps`` (the midpoint rule's error falls as 1/steps² for a smooth metric, against 1/steps for the
endpoint rule), batched into the batch dimension (with the other sites of the same layer). Cost per site: ``steps``
forward + backward passes of the batch from the site's layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from backend.attribution.components import Scores, Site, build_sites
from backend.attribution.passes import capture, copies_per_pass, forward_from, readout
from backend.errors import InputError
from backend.progress import track

if TYPE_CHECKING:
    import torch

    from backend.inputs.tasks import TaskBatch

DEFAULT_STEPS = 8
MAX_TOKENS = 512  # tokens per forward + backward pass (activations for the backward dominate memory)


def integrated_gradients(model: Any, batch: "TaskBatch", kinds: Sequence[str], steps: int = DEFAULT_STEPS,
                         per_position_heads: bool = False, dictionaries: Mapping[int, Any] | None = None,
                         max_tokens: int = MAX_TOKENS) -> Scores:
    """IG scores of every component, per layer (see the module docstring), with a progress bar."""
    import torch

    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"The number of integrated-gradient steps must be a positive whole number, not {steps!r}.")
    sites = build_sites(model, kinds, per_position_heads, dictionaries)
    n, seq = batch.clean.shape
    _, clean, starts = capture(model, batch.clean, sites, resid=True)
    _, corrupt, _ = capture(model, batch.corrupt, sites)
    k_max = copies_per_pass(n, seq, max_tokens)
    positions, scored = readout(batch)
    alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps

    # A pass holds up to k_max copies of the batch, each one (site, α) of one layer: the sites of a layer share
    # passes (fewer, larger passes run faster per token on a busy CPU; see patching.py). Copies are independent
    # rows, so the gradient of the summed metric gives each copy its own gradient.
    per_site: dict[str, torch.Tensor] = {}
    by_layer: dict[int, list[tuple[Site, float]]] = {}
    for site in sites:
        delta = corrupt[site.label] - clean[site.label]
        per_site[site.label] = torch.zeros(site.reduce(delta[:1]).shape[1:], dtype=torch.float64)
        if bool((delta != 0).any()):  # an unchanged site scores 0 exactly
            by_layer.setdefault(site.layer, []).extend((site, float(a)) for a in alphas)
    jobs = [(layer, items[i : i + k_max]) for layer, items in sorted(by_layer.items())
            for i in range(0, len(items), k_max)]

    def splice_hook(site: Site, path: torch.Tensor, rows: torch.Tensor) -> Any:
        def splice(act: torch.Tensor, hook: Any) -> torch.Tensor:
            a = site.extract(act)
            new = a.clone()  # not detached: other sites' copies keep their gradient path through this point
            new[rows] = path  # this site's copies follow the path; the other copies pass through unchanged
            return site.insert(act, a, new)

        return site.hook, splice

    for layer, items in track(jobs, total=len(jobs), desc="Integrated gradients", unit="pass"):
        k = len(items)
        paths: list[tuple[Site, torch.Tensor]] = []
        hooks = []
        for site in {s.label: s for s, _ in items}.values():  # this pass's sites, in forward order
            copies = [j for j, (s, _) in enumerate(items) if s is site]
            a0, delta = clean[site.label], corrupt[site.label] - clean[site.label]
            alpha = torch.tensor([items[j][1] for j in copies], dtype=a0.dtype).view(-1, *([1] * a0.dim()))
            path = (a0[None] + alpha * delta[None]).reshape(len(copies) * n, *a0.shape[1:]).requires_grad_(True)
            rows = (torch.tensor(copies)[:, None] * n + torch.arange(n)[None]).reshape(-1)
            paths.append((site, path))
            hooks.append(splice_hook(site, path, rows))
        batch_rows = scored.select(torch.arange(n).repeat(k))
        start = starts[layer].repeat(k, *([1] * (starts[layer].dim() - 1)))
        with torch.enable_grad():
            logits = forward_from(model, start, layer, hooks, positions)
            total = batch_rows.metric_per_example(logits).sum() / (steps * n)  # mean over α and examples
            grads = torch.autograd.grad(total, [path for _, path in paths])
        for (site, path), grad in zip(paths, grads):
            delta = corrupt[site.label] - clean[site.label]
            m = grad.shape[0] // n
            contrib = site.reduce(grad * delta.repeat(m, *([1] * (delta.dim() - 1))))
            per_site[site.label] += contrib.sum(0).double()
    return Scores.from_sites(sites, per_site, per_position_heads)
