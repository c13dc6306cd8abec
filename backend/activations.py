"""Collecting per-token activations from corpus contexts through TransformerLens hooks.

One forward pass per batch captures ``hook_z`` of several layers at once (``stop_at_layer`` skips the layers
after the last one asked for). Position 0 (BOS) is dropped: its activations are attention-sink outliers
whose norm is far above every other token's, so they are excluded from SAE training, from evaluation
denominators and from per-feature statistics (see :mod:`backend.dictionaries`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Sequence

from backend.hooks import hook_name
from backend.progress import track

if TYPE_CHECKING:
    import torch


def flatten_heads(z: "torch.Tensor") -> "torch.Tensor":
    """``[..., n_heads, d_head] -> [..., n_heads * d_head]``, head-major (head h is ``[h*d_head:(h+1)*d_head]``)."""
    return z.reshape(*z.shape[:-2], z.shape[-2] * z.shape[-1])


def collect_z(
    model: Any,
    tokens: "torch.Tensor",
    layers: Sequence[int],
    batch_size: int = 16,
    desc: str = "Collecting hook_z",
) -> dict[int, "torch.Tensor"]:
    """Run ``tokens`` ([n, n_ctx], BOS at position 0) through ``model`` and return, per layer, the flattened
    ``hook_z`` of every non-BOS token: ``{layer: float32 tensor [n * (n_ctx - 1), n_heads * d_head]}``.

    Rows are ordered context-major (context i, positions 1..n_ctx-1), so row ``i * (n_ctx - 1) + (p - 1)`` is
    context ``i``, position ``p``.
    """
    import torch

    layers = sorted(set(int(x) for x in layers))
    if not layers:
        return {}
    n, n_ctx = tokens.shape
    d_z = model.cfg.n_heads * model.cfg.d_head
    out = {layer: torch.empty(n * (n_ctx - 1), d_z, dtype=torch.float32) for layer in layers}
    starts = range(0, n, batch_size)
    for start in track(starts, total=len(starts), desc=desc, unit="batch"):
        batch = tokens[start : start + batch_size]
        rows = slice(start * (n_ctx - 1), (start + len(batch)) * (n_ctx - 1))
        for layer, z in z_batch(model, batch, layers).items():
            out[layer][rows] = flatten_heads(z).reshape(-1, d_z).float()
    return out


def z_batch(model: Any, batch: "torch.Tensor", layers: Sequence[int]) -> dict[int, "torch.Tensor"]:
    """One no-grad forward pass of ``batch`` ([b, n_ctx], BOS at 0) capturing ``hook_z`` of every layer in
    ``layers``: ``{layer: z [b, n_ctx - 1, n_heads, d_head]}`` with the BOS position dropped (attention-sink
    outlier, never trained on or scored). ``stop_at_layer`` skips the blocks above the highest layer."""
    import torch

    names = {hook_name("z", int(layer)): int(layer) for layer in layers}
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=list(names), stop_at_layer=max(names.values()) + 1)
    return {layer: cache[name][:, 1:] for name, layer in names.items()}


def shuffled_batches(
    acts: "torch.Tensor",
    batch_size: int,
    seed: int = 0,
    epochs: int | None = None,
) -> Iterator["torch.Tensor"]:
    """Yield shuffled ``[batch_size, d_in]`` float32 batches from an in-memory activation matrix, reshuffling
    each pass over the data (``epochs=None``: forever, as sae-lens' ``SAETrainer`` expects of a data provider).

    Every batch is full-sized: the trainer counts samples by ``train_batch_size_samples``.
    """
    import torch

    n = acts.shape[0]
    if n < batch_size:
        raise ValueError(f"need at least {batch_size} activations for one batch, got {n}")
    gen = torch.Generator().manual_seed(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1, batch_size):
            yield acts[perm[start : start + batch_size]]
        epoch += 1
