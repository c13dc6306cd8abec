"""Integrated gradients over components (and SAE features) along the straight path from the clean to the corrupt
activation.

``score(c) = mean_α ∂m/∂c |_(c_clean + α(c_corrupt − c_clean)) · (c_corrupt − c_clean)``, averaged over examples:
the noising orientation of :mod:`backend.attribution.components`, i.e. the negative of docs/methods.md §3's
corrupt → clean path. **Per layer:** all components of one kind at one layer move along the path together (one
site at a time; everything else keeps its clean value), so completeness holds per layer: the sum of a layer's
scores → the exact effect of patching the whole layer as ``steps`` grows.

**Quadrature.** The α and their weights are the ``steps``-point Gauss–Legendre rule on [0, 1]: exact when the
gradient along the path is a polynomial of degree ≤ 2·steps − 1 (the midpoint rule, its 1-point case, only for
degree 1). So 2 steps already integrate a cubic path exactly, where the midpoint rule needed many more for the same
error: IG reaches its accuracy with fewer passes, which is what makes it cheaper than activation patching
(``make bench`` reports the ratio).

**Cost.** Per site ``steps`` forward + backward passes of the batch from the site's layer, batched: one pass holds
many (site, α) copies of the batch — every kind of one layer, and every α — up to ``max_tokens`` tokens, and starts
at that layer from the clean residual stream. The backward pass asks only for the activations' gradients
(``torch.autograd.grad``), so no weight gradient is computed.
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
MAX_TOKENS = 2048  # tokens per forward + backward pass: few large passes (see patching.py); ~1 GB of activations


def gauss_legendre(steps: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Nodes and weights of the ``steps``-point Gauss–Legendre rule on [0, 1] (weights sum to 1)."""
    import numpy as np
    import torch

    x, w = np.polynomial.legendre.leggauss(int(steps))
    return torch.tensor((x + 1) / 2, dtype=torch.float64), torch.tensor(w / 2, dtype=torch.float64)


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
    alphas, weights = gauss_legendre(steps)

    # A pass holds up to k_max copies of the batch, each one (site, α) of one layer: the sites of a layer share
    # passes (fewer, larger passes run faster per token on a busy CPU; see patching.py). Copies are independent
    # rows, so the gradient of the summed metric gives each copy its own gradient.
    per_site: dict[str, torch.Tensor] = {}
    by_layer: dict[int, list[tuple[Site, float, float]]] = {}
    for site in sites:
        delta = corrupt[site.label] - clean[site.label]
        per_site[site.label] = torch.zeros(site.reduce(delta).shape, dtype=torch.float64)  # [n, *shape]
        if bool((delta != 0).any()):  # an unchanged site scores 0 exactly
            by_layer.setdefault(site.layer, []).extend((site, float(a), float(w)) for a, w in zip(alphas, weights))
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
        for site in {s.label: s for s, _, _ in items}.values():  # this pass's sites, in forward order
            copies = [j for j, (s, _, _) in enumerate(items) if s is site]
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
            # Each copy's metric weighted by its α's quadrature weight: the gradient of the weighted sum gives each
            # copy (independent rows) its weighted gradient, and summing a site's copies integrates over α.
            w = torch.tensor([item[2] for item in items], dtype=logits.dtype).repeat_interleave(n)
            total = (batch_rows.metric_per_example(logits) * w).sum()
            grads = torch.autograd.grad(total, [path for _, path in paths])
        for (site, path), grad in zip(paths, grads):
            delta = corrupt[site.label] - clean[site.label]
            m = grad.shape[0] // n
            contrib = site.reduce(grad * delta.repeat(m, *([1] * (delta.dim() - 1))))
            per_site[site.label] += contrib.reshape(m, n, *contrib.shape[1:]).sum(0).double()
    return Scores.from_sites(sites, per_site, per_position_heads)
