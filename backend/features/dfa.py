"""Direct feature attribution (DFA) for attention-output SAEs: the one place its arithmetic lives (docs/methods.md §1).

The SAE encoder is linear in the concatenated ``z`` (head-major: head h is the slice ``[h*d_head:(h+1)*d_head]``),
so feature i's pre-activation splits exactly into per-head terms::

    pre_i = r_i · ( Σ_h W_enc[slice_h, i] · (s·x_h − b_dec[slice_h]) + b_enc[i] )

where ``s`` is the SAE's per-token input scale (1, or √d_in/‖x‖ for ``constant_norm_rescale``), the ``b_dec`` term is
present only if ``cfg.apply_b_dec_to_input``, and ``r_i`` is ‖W_dec[i]‖ for TopK SAEs trained with
``rescale_acts_by_decoder_norm`` (else 1) — exactly what sae-lens' ``encode`` feeds its activation function.
Input normalisations that mix the heads (layer_norm, whitening) make a per-head split meaningless and are refused.

Written by hand: neither sae-lens nor TransformerLens decomposes an SAE encoder by input slice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_CHUNK = 8192  # (token, feature) pairs per chunk: bounds memory at CHUNK x d_in floats


def input_scale(sae: Any, x: "torch.Tensor") -> "torch.Tensor":
    """The per-token factor ``[..., 1]`` sae-lens multiplies the flat input by before subtracting b_dec."""
    import torch

    norm = getattr(sae.cfg, "normalize_activations", "none")
    if norm in ("none", "expected_average_only_in"):  # sae-lens applies no run-time transform for these
        return torch.ones(x.shape[:-1] + (1,), dtype=x.dtype)
    if norm == "constant_norm_rescale":
        return (sae.cfg.d_in ** 0.5) / x.norm(dim=-1, keepdim=True)
    raise ValueError(f"DFA needs an SAE whose input transform is per-token linear; this one uses {norm!r}.")


def decoder_scale(sae: Any, features: "torch.Tensor") -> "torch.Tensor":
    """``r_i`` for each requested feature: ‖W_dec[i]‖ with ``rescale_acts_by_decoder_norm``, else 1."""
    import torch

    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        return sae.W_dec.detach()[features].norm(dim=-1)
    return torch.ones(features.shape, dtype=torch.float32)


def bdec_in(sae: Any) -> "torch.Tensor":
    """b_dec as subtracted from the input (zeros when ``apply_b_dec_to_input`` is False)."""
    return sae.b_dec.detach() * float(bool(sae.cfg.apply_b_dec_to_input))


def head_terms(sae: Any, x: "torch.Tensor", features: "torch.Tensor", n_heads: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Per-head DFA terms at ``m`` (token, feature) pairs: ``x`` flat hook_z ``[m, d_in]``, ``features`` ``[m]``.

    Returns ``(contributions, bdec_share)``, each ``[m, n_heads]``: ``contributions`` includes each head's b_dec
    share (also returned apart); a row of ``contributions`` sums to the pre-activation minus ``r_i · b_enc[i]``.
    """
    import torch

    m, d_in = x.shape
    d_head = d_in // n_heads
    b_dec = bdec_in(sae)
    contributions = torch.empty(m, n_heads, dtype=torch.float32)
    bdec_share = torch.empty(m, n_heads, dtype=torch.float32)
    with torch.no_grad():
        for s in range(0, m, _CHUNK):
            xs = x[s : s + _CHUNK].float()
            fs = features[s : s + _CHUNK]
            w = sae.W_enc.detach()[:, fs].T  # [chunk, d_in]: each pair's encoder column
            r = decoder_scale(sae, fs)[:, None]
            x_part = (w * (input_scale(sae, xs) * xs)).reshape(-1, n_heads, d_head).sum(-1)
            b_part = -(w * b_dec).reshape(-1, n_heads, d_head).sum(-1)
            bdec_share[s : s + _CHUNK] = r * b_part
            contributions[s : s + _CHUNK] = r * (x_part + b_part)
    return contributions, bdec_share
