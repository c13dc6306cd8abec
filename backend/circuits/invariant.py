"""The input-invariant view of a transcoder feature (Dunefsky et al. 2024, docs/methods.md §2).

Between transcoder features at one position, an edge factorises into the source's activation (input-dependent)
× ``W_dec[j] · W_enc[:, i]`` (input-invariant) × the frozen norm's 1/scale. The invariant factor alone says which
features a feature can read from and write to on ANY prompt: its top upstream features (every earlier layer's
decoder rows against its encoder column) and its top downstream features (its decoder row against every later
layer's encoder columns). Plain matrix products over the weights; no prompt needed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def invariant_neighbours(transcoders: dict[int, Any], layer: int, feature: int, k: int = 10,
                         centre: bool = False) -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """(upstream, downstream) tables of the ``k`` largest |invariant| connections of transcoder feature
    ``feature`` at ``layer``: columns layer, feature, invariant. ``centre``: subtract the mean of the encoder
    column (LayerNorm models, whose norm centres its input)."""
    import torch

    if layer not in transcoders:
        raise KeyError(f"no transcoder at layer {layer}")
    tc = transcoders[layer]
    if not 0 <= feature < tc.cfg.d_sae:
        raise KeyError(f"feature {feature} is outside layer {layer}'s transcoder (0..{tc.cfg.d_sae - 1})")

    def enc(t: Any) -> "torch.Tensor":
        w = t.W_enc.detach()
        return w - w.mean(0, keepdim=True) if centre else w

    col = enc(tc)[:, feature]
    row = tc.W_dec.detach()[feature]
    ups, downs = [], []
    with torch.no_grad():
        for l, other in sorted(transcoders.items()):
            if l < layer:
                ups.append((l, other.W_dec.detach() @ col))
            elif l > layer:
                downs.append((l, row @ enc(other)))
    return _top(ups, k), _top(downs, k)


def _top(parts: list[tuple[int, Any]], k: int) -> "pd.DataFrame":
    import pandas as pd
    import torch

    if not parts:
        return pd.DataFrame({"layer": pd.Series(dtype="int64"), "feature": pd.Series(dtype="int64"),
                             "invariant": pd.Series(dtype="float64")})
    layers = torch.cat([torch.full((len(v),), l) for l, v in parts])
    feats = torch.cat([torch.arange(len(v)) for _, v in parts])
    vals = torch.cat([v for _, v in parts])
    top = torch.argsort(-vals.abs(), stable=True)[:k]
    return pd.DataFrame({"layer": layers[top].cpu().numpy(), "feature": feats[top].cpu().numpy(),
                         "invariant": vals[top].double().cpu().numpy()})
