"""Collecting per-token activations from corpus contexts through TransformerLens hooks.

One forward pass per batch captures several activation sites at once, each named ``(hook kind, layer)`` as in
:mod:`backend.model.hooks` (``hook_z`` for attention SAEs, the MLP's input and output for transcoders); ``stop_at_layer``
skips the layers after the last one asked for. Position 0 (BOS) is dropped: its activations are attention-sink outliers
whose norm is far above every other token's, so they are excluded from SAE training, from evaluation
denominators and from per-feature statistics (see :mod:`backend.dictionaries.attention_sae`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from backend.model.hooks import hook_name
from backend.progress import track

if TYPE_CHECKING:
    import torch


def flatten_heads(z: "torch.Tensor") -> "torch.Tensor":
    """``[..., n_heads, d_head] -> [..., n_heads * d_head]``, head-major (head h is ``[h*d_head:(h+1)*d_head]``)."""
    return z.reshape(*z.shape[:-2], z.shape[-2] * z.shape[-1])


Act = tuple[str, int]  # (hook kind of backend.model.hooks, layer): one activation site


class _AllCaptured(Exception):
    """Raised by the last capture hook of :func:`capture_batch`: nothing after it in the forward pass is needed."""


def capture_batch(model: Any, batch: "torch.Tensor", acts: Sequence[Act]) -> dict[Act, "torch.Tensor"]:
    """One no-grad forward pass of ``batch`` ([b, n_ctx], BOS at 0) capturing every activation site in ``acts``:
    ``{(kind, layer): tensor [b, n_ctx - 1, ...]}`` with the BOS position dropped (attention-sink outlier, never
    trained on or scored). The pass stops as soon as the last site is captured: ``stop_at_layer`` skips the blocks
    above the highest layer, and the rest of that block (for hook_z: the attention output and the MLP, about three
    quarters of a block) is cut short by the last capture hook."""
    import torch

    names = {hook_name(kind, int(layer)): (kind, int(layer)) for kind, layer in acts}
    out: dict[Act, "torch.Tensor"] = {}

    def capture(value: "torch.Tensor", hook: Any) -> None:
        out[names[hook.name]] = value[:, 1:].detach()
        if len(out) == len(names):
            raise _AllCaptured  # TransformerLens removes the hooks on the way out (run_with_hooks resets them)

    with torch.no_grad():
        try:
            model.run_with_hooks(batch, fwd_hooks=[(name, capture) for name in names],
                                 stop_at_layer=max(layer for _, layer in names.values()) + 1)
        except _AllCaptured:
            pass
    return out


class Precollector:
    """Copies activation sites into context-major row matrices from forward passes that some code runs anyway.

    ``wants`` maps each site ``(kind, layer)`` to how many leading contexts it is wanted for; :meth:`hooks` gives the
    TransformerLens hooks for one batch of contexts ``[start, start + b)`` (BOS dropped, hook_z's heads flattened);
    :meth:`result` returns ``{site: float32 [n_contexts * (n_ctx - 1), d]}`` (:func:`collect`'s layout). The corpus
    step uses it to gather, during its scoring pass, what the dictionary steps would otherwise run the model again for.
    """

    def __init__(self, wants: Mapping[Act, int], n_ctx: int) -> None:
        self.wants = {(kind, int(layer)): int(n) for (kind, layer), n in wants.items() if n > 0}
        self.n_ctx = n_ctx
        self.out: dict[Act, "torch.Tensor"] = {}

    def hooks(self, start: int, b: int) -> list[tuple[str, Any]]:
        """Forward hooks copying the rows of contexts ``start .. start + b - 1`` that some site still wants."""
        import torch

        rows_per = self.n_ctx - 1
        fwd = []
        for act, n_want in self.wants.items():
            take = min(b, n_want - start)
            if take <= 0:
                continue

            def copy(value: "torch.Tensor", hook: Any, act: Act = act, take: int = take, n_want: int = n_want) -> None:
                v = value[:take, 1:]
                flat = (flatten_heads(v) if act[0] == "z" else v).reshape(take * rows_per, -1)
                if act not in self.out:  # allocate once the width is known
                    self.out[act] = torch.empty(n_want * rows_per, flat.shape[-1], dtype=torch.float32)
                self.out[act][start * rows_per : (start + take) * rows_per] = flat.float()

            fwd.append((hook_name(*act), copy))
        return fwd

    def result(self) -> dict[Act, "torch.Tensor"]:
        """The collected matrices (complete once every wanted context has been run)."""
        return self.out


class ResidualCarry:
    """The residual stream entering block :attr:`layer` at every position of one set of contexts, kept by one
    :func:`collect` pass so that the next pass over the same contexts starts there instead of at the embeddings.

    Steps that collect layer groups one after another (their activations do not fit in memory at once) would
    otherwise rerun every earlier block for each group: with ten groups of three layers that is 5.5 full forward
    passes instead of one. The carried stream is ``[n, n_ctx, d_model]`` in the model's dtype and on its device
    (600 MB in float32 for 2048 contexts of 128 tokens on SmolLM2). A pass with :attr:`keep` false (the last group)
    still starts from the carried stream but keeps nothing: no pass follows to use it."""

    def __init__(self) -> None:
        self.layer = 0
        self.resid: "torch.Tensor | None" = None
        self.keep = True


def collect(
    model: Any,
    tokens: "torch.Tensor",
    acts: Sequence[Act],
    batch_size: int = 16,
    desc: str = "Collecting activations",
    carry: ResidualCarry | None = None,
) -> dict[Act, "torch.Tensor"]:
    """Run ``tokens`` ([n, n_ctx], BOS at position 0) through ``model`` in batches and return every activation
    site's value at every non-BOS token: ``{(kind, layer): float32 tensor [n * (n_ctx - 1), d]}`` (hook_z's heads
    flattened head-major, see :func:`flatten_heads`).

    Rows are ordered context-major (context i, positions 1..n_ctx-1), so row ``i * (n_ctx - 1) + (p - 1)`` is
    context ``i``, position ``p``.

    ``carry`` (the same object for successive calls over the same ``tokens`` with ever higher sites): the pass
    starts from its residual stream when that enters a block at or below every site, and leaves in it the stream
    after the last block it ran (or, if ``carry.keep`` is false, nothing).
    """
    import torch

    if not acts:
        return {}
    n, n_ctx = tokens.shape
    pre = Precollector({(kind, int(layer)): n for kind, layer in acts}, n_ctx)
    stop = max(int(layer) for _, layer in acts) + 1
    first = min(int(layer) for _, layer in acts)
    resume = carry is not None and carry.resid is not None and 0 < carry.layer <= first
    carried = None
    starts = range(0, n, batch_size)
    with torch.no_grad():
        for start in track(starts, total=len(starts), desc=desc, unit="batch"):
            rows = slice(start, start + batch_size)
            batch = tokens[rows]
            hooks = pre.hooks(start, len(batch))
            if resume:
                out = model.run_with_hooks(carry.resid[rows], fwd_hooks=hooks, start_at_layer=carry.layer,
                                           stop_at_layer=stop)
            else:
                out = model.run_with_hooks(batch, fwd_hooks=hooks, stop_at_layer=stop)
            if carry is not None and carry.keep:  # stop_at_layer returns the stream after the last block run
                if carried is None:
                    carried = torch.empty((n, *out.shape[1:]), dtype=out.dtype, device=out.device)
                carried[rows] = out
    if carry is not None:
        carry.layer, carry.resid = (stop, carried) if carry.keep else (0, None)
    return pre.result()


def collect_z(
    model: Any,
    tokens: "torch.Tensor",
    layers: Sequence[int],
    batch_size: int = 16,
    desc: str = "Collecting hook_z",
    carry: ResidualCarry | None = None,
) -> dict[int, "torch.Tensor"]:
    """:func:`collect` of ``hook_z`` at ``layers``: ``{layer: float32 tensor [n * (n_ctx - 1), n_heads * d_head]}``
    (attention-SAE inputs)."""
    got = collect(model, tokens, [("z", l) for l in layers], batch_size, desc, carry)
    return {layer: z for (_, layer), z in got.items()}


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


def layer_groups(layers: Sequence[int], bytes_per_layer: int, budget_bytes: int) -> list[list[int]]:
    """Split ``layers`` (sorted) into groups whose activations (``bytes_per_layer`` each) fit in ``budget_bytes``, so
    one forward pass collects a whole group; a layer larger than the budget gets a group of its own."""
    per_group = max(1, budget_bytes // max(bytes_per_layer, 1))
    ordered = sorted(layers)
    return [ordered[i : i + per_group] for i in range(0, len(ordered), per_group)]
