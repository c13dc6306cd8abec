"""Direct logit effects of dictionary features: what one unit of a feature promotes and suppresses at the output.

The feature's residual direction is ``Σ_h W_dec[i, slice_h] @ W_O[h]`` (the block-diagonal W_O) for an attention SAE and
``W_dec[i]`` itself for a transcoder (it writes the MLP output); the final norm is treated as a constant scale —
RMSNorm multiplies by ``ln_final.w``, LayerNorm centres the vector and multiplies by its weight (the "Pre" variants,
with weights folded into W_U, only centre / do nothing) — and then ``W_U`` (no ``b_U``: it is the same for every
feature). Values are in logits per unit of activation (``docs/methods.md`` §1).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from backend.dictionaries.kinds import ATTN_SAE, KINDS

N_LOGITS = 10  # promoted and suppressed output tokens stored per feature
# Bytes of effects computed per product: on 2 CPU cores one block of a whole 2304-feature dictionary (453 MB) is
# faster than 256-feature slices; the budget bounds memory for wider dictionaries or vocabularies.
EFFECT_BYTES = 512 * 2**20



@torch.no_grad()
def final_norm_as_scale(model: Any, v: torch.Tensor) -> torch.Tensor:
    """Apply the final norm to residual directions ``v`` [..., d_model] with its input scale treated as constant."""
    kind = model.cfg.normalization_type
    if kind in ("LN", "LNPre"):
        v = v - v.mean(-1, keepdim=True)
    if kind in ("LN", "RMS"):
        v = v * model.ln_final.w
    return v


@torch.no_grad()
def residual_directions(model: Any, sae: Any, layer: int, features: torch.Tensor, kind: str = ATTN_SAE) -> torch.Tensor:
    """What one unit of each of ``features`` writes into the residual stream ``[n, d_model]``: the decoder rows
    through each head's W_O for an attention SAE, the decoder rows themselves for a transcoder."""
    if not KINDS[kind].per_head:
        return sae.W_dec[features]
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    w_dec = sae.W_dec[features].reshape(len(features), n_heads, d_head)
    return torch.einsum("fhd,hdm->fm", w_dec, model.blocks[layer].attn.W_O)


@torch.no_grad()
def feature_logit_effects(model: Any, sae: Any, layer: int, features: torch.Tensor | None = None,
                          kind: str = ATTN_SAE) -> torch.Tensor:
    """Direct logit effect ``[n_features, d_vocab]`` of one unit of each feature (all features by default)."""
    feats = torch.arange(sae.W_dec.shape[0]) if features is None else features
    return final_norm_as_scale(model, residual_directions(model, sae, layer, feats, kind)) @ model.W_U


@torch.no_grad()
def top_logits(model: Any, sae: Any, layer: int, k: int = N_LOGITS, kind: str = ATTN_SAE,
               features: Sequence[int] | None = None, max_bytes: int = EFFECT_BYTES) -> pd.DataFrame:
    """Top-k promoted and suppressed tokens of every feature (or of ``features``): columns feature, kind, rank
    (1 = strongest), token_id, value. Computed in blocks of features whose ``[n, d_vocab]`` effects take at most
    ``max_bytes`` (at least one feature per block)."""
    every = torch.arange(sae.W_dec.shape[0]) if features is None else torch.tensor(list(features), dtype=torch.long)
    chunk = max(1, max_bytes // (model.cfg.d_vocab * model.W_U.element_size()))
    frames = []
    for s in range(0, len(every), chunk):
        feats = every[s : s + chunk]
        eff = feature_logit_effects(model, sae, layer, feats, kind)
        for direction, largest in (("promoted", True), ("suppressed", False)):
            top = eff.topk(k, dim=-1, largest=largest)
            frames.append(pd.DataFrame({
                "feature": np.repeat(feats.cpu().numpy(), k).astype(np.int32),
                "kind": direction,
                "rank": np.tile(np.arange(1, k + 1), len(feats)).astype(np.int16),
                "token_id": top.indices.reshape(-1).cpu().numpy().astype(np.int32),
                "value": top.values.reshape(-1).cpu().numpy().astype(np.float32),
            }))
    return pd.concat(frames, ignore_index=True)
