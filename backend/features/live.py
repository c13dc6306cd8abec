"""Live, per-prompt analysis with attention-output SAEs (Kissane et al. 2024): which features fire on each token,
and where they come from.

* :func:`analyze_prompt` — one forward pass (TransformerLens hooks on ``hook_z``, ``hook_pattern`` and ``hook_v`` of
  every layer that has an SAE, stopping after the last of them), each layer's z encoded by its SAE, and per token
  the top-N features with their activations.
* :func:`dfa_by_head` — direct feature attribution by head (docs/methods.md §1): the feature's pre-activation
  ``W_enc[:, i]·(x − b_dec) + b_enc`` split into one term per head slice of x.
* :func:`dfa_by_source` — the same split further by source position, with ``x_h[d] = Σ_s A_h[d, s] v_h[s]``
  (in TransformerLens ``z`` is exactly ``pattern @ v``; ``b_O`` is added only after ``W_O``, so it never enters z).

BOS (position 0) is an attention-sink outlier the SAEs are not trained on: it is kept in every per-token result so
pages can show it, but it is never scored (no features, NaN activations).

Sign conventions: a head's DFA includes its share of the ``−W_enc·b_dec`` term (when the SAE subtracts b_dec from
its input), so ``Σ_h dfa_by_head = preactivation − b_enc``. By source, that b_dec share is reported separately
(it belongs to no source position): ``Σ_s by_source[h, s] + bdec[h] = dfa_by_head[h]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from backend.dictionaries.attention_sae import encode_z, flatten_z
from backend.features import dfa
from backend.model.hooks import hook_name

if TYPE_CHECKING:  # heavy imports stay lazy: pages that only read the store must start fast
    import torch
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

DEFAULT_TOP_N = 5
BOS_POS = 0  # attention-sink position: shown, never scored

# Caches hold [1, ...] tensors (batch of one) under TransformerLens hook names: an ActivationCache or a plain dict.
Cache = Mapping[str, "torch.Tensor"]


@dataclass
class LayerFeatures:
    """Top features of one layer's SAE at every position of a prompt (position 0, BOS, is never scored).

    ``features`` / ``acts`` are [n_pos, top_n], best first; slots with no firing feature hold -1 / NaN.
    ``l0`` is the number of active features per position (NaN at BOS).
    """

    layer: int
    features: np.ndarray
    acts: np.ndarray
    l0: np.ndarray


@dataclass
class PromptFeatures:
    """What :func:`analyze_prompt` returns: per layer the top features per token, plus the activations needed to
    attribute any (position, feature) pair afterwards (``cache``: hook name -> [1, ...] CPU tensor)."""

    token_ids: list[int]
    layers: dict[int, LayerFeatures]
    cache: dict[str, Any] = field(repr=False)

    @property
    def n_pos(self) -> int:
        return len(self.token_ids)

    def table(self) -> pd.DataFrame:
        """Long form, one row per (layer, pos, rank) that has a firing feature: layer, pos, rank, feature, act."""
        rows = []
        for layer, lf in sorted(self.layers.items()):
            pos, rank = np.nonzero(lf.features >= 0)
            rows.append(pd.DataFrame({
                "layer": layer, "pos": pos, "rank": rank,
                "feature": lf.features[pos, rank], "act": lf.acts[pos, rank],
            }))
        if not rows:
            return pd.DataFrame({"layer": [], "pos": [], "rank": [], "feature": [], "act": []})
        return pd.concat(rows, ignore_index=True)


@dataclass
class HeadDFA:
    """Feature ``feature``'s pre-activation at (layer, pos) split by head.

    ``contributions[h] = W_enc[slice_h, i]·(s·x_h − b_dec[slice_h])`` (b_dec only if the SAE subtracts it; s is
    the SAE's run-time input scale, 1 unless it normalises inputs; every term, b_enc included, times ‖W_dec[i]‖ for
    TopK SAEs with ``rescale_acts_by_decoder_norm``); ``bdec[h]`` is the b_dec part of that term (0 when not
    applied). ``preactivation = Σ contributions + b_enc`` is what the SAE's activation function receives.
    """

    contributions: np.ndarray
    bdec: np.ndarray
    b_enc: float
    preactivation: float


@dataclass
class SourceDFA:
    """Feature ``feature``'s pre-activation at (layer, pos) split by head and source position.

    ``by_head_source[h, s] = s_in · W_enc[slice_h, i]·A_h[pos, s]·v_h[s]`` for s ≤ pos (later sources are causally
    masked: 0). ``bdec[h]`` is head h's share of ``−W_enc·b_dec``. ``by_source = by_head_source.sum(0)``.
    """

    by_head_source: np.ndarray
    bdec: np.ndarray
    b_enc: float
    preactivation: float

    @property
    def by_source(self) -> np.ndarray:
        return self.by_head_source.sum(axis=0)

    @property
    def bdec_total(self) -> float:
        return float(self.bdec.sum())


# --------------------------------------------------------------------------------------------------------------
# SAE input conventions (the SAE's own fields decide; see sae_lens.SAE.process_sae_in)


def encode(sae: "SAE", z: "torch.Tensor") -> "torch.Tensor":
    """Feature activations ``[..., d_sae]`` of z ``[..., n_heads, d_head]`` (sae-lens does the math, via
    :func:`backend.dictionaries.attention_sae.encode_z`, which also handles hook_z-reshaping SAEs)."""
    return encode_z(sae, z)


def _check_shapes(sae: "SAE", z: "torch.Tensor") -> None:
    d_in = z.shape[-2] * z.shape[-1]
    if int(sae.cfg.d_in) != d_in:
        raise ValueError(f"The SAE reads {sae.cfg.d_in} inputs but this layer's z has {d_in} (= heads × d_head): "
                         "it was trained for another model or hook.")


# --------------------------------------------------------------------------------------------------------------
# The forward pass


def run_cache(model: "HookedTransformer", token_ids: Sequence[int], layers: Sequence[int]) -> dict[str, Any]:
    """One forward pass up to the last of ``layers``, caching z, pattern and v of each (hook names from
    backend.model.hooks); returns hook name -> [1, ...] CPU tensor."""
    import torch

    names = {hook_name(kind, layer) for layer in layers for kind in ("z", "pattern", "v")}
    tokens = torch.tensor([list(token_ids)], dtype=torch.long)
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names,
                                        stop_at_layer=max(layers) + 1)
    return {name: cache[name].detach().clone() for name in names}


def top_features(acts: "torch.Tensor", top_n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``acts`` [n_pos, d_sae]: the ``top_n`` largest *positive* activations (features, values; -1/NaN
    fill where fewer fire) and the number of active features. Row 0 (BOS) is left unscored."""
    import torch

    n_pos = acts.shape[0]
    k = min(top_n, acts.shape[-1])
    vals, idx = torch.topk(acts, k, dim=-1)
    fired = vals > 0
    features = torch.where(fired, idx, torch.full_like(idx, -1)).cpu().numpy().astype(np.int64)
    values = torch.where(fired, vals, torch.full_like(vals, float("nan"))).cpu().numpy().astype(np.float64)
    l0 = (acts > 0).sum(dim=-1).cpu().numpy().astype(np.float64)
    if n_pos:
        features[BOS_POS] = -1
        values[BOS_POS] = np.nan
        l0[BOS_POS] = np.nan
    return features, values, l0


def analyze_prompt(model: "HookedTransformer", saes: Mapping[int, "SAE"], token_ids: Sequence[int],
                   top_n: int = DEFAULT_TOP_N) -> PromptFeatures:
    """Run ``token_ids`` (BOS first) once and return, for every layer in ``saes``, the top ``top_n`` features of
    each token by activation (BOS shown but not scored), with the cache needed by :func:`dfa_by_head` /
    :func:`dfa_by_source`."""
    ids = [int(t) for t in token_ids]
    if not saes or not ids:
        return PromptFeatures(token_ids=ids, layers={}, cache={})
    cache = run_cache(model, ids, list(saes))
    layers: dict[int, LayerFeatures] = {}
    for layer, sae in sorted(saes.items()):
        z = cache[hook_name("z", layer)][0]  # [pos, head, d_head]
        _check_shapes(sae, z)
        feats, vals, l0 = top_features(encode(sae, z), top_n)
        layers[layer] = LayerFeatures(layer=layer, features=feats, acts=vals, l0=l0)
    return PromptFeatures(token_ids=ids, layers=layers, cache=cache)


def feature_activations(sae: "SAE", cache: Cache, layer: int, feature: int) -> np.ndarray:
    """Activation of one feature at every position of the cached prompt (NaN at BOS, which is not scored)."""
    z = cache[hook_name("z", layer)][0]
    _check_feature(sae, feature)
    out = encode(sae, z)[:, feature].cpu().numpy().astype(np.float64)
    if len(out):
        out[BOS_POS] = np.nan
    return out


def encode_input(sae: "SAE", kind: str, x: "torch.Tensor") -> "torch.Tensor":
    """Feature activations ``[..., d_sae]`` of a dictionary's inputs ``x`` (hook_z ``[..., n_heads, d_head]`` for an
    attention SAE, the MLP's normalised input for a transcoder; ``kind`` is a key of
    :data:`backend.dictionaries.kinds.KINDS`), by sae-lens' own encode."""
    from backend.dictionaries.kinds import KINDS

    if KINDS[kind].per_head:
        return encode_z(sae, x)
    from backend.dictionaries.transcoder import encode as encode_mlp_in

    return encode_mlp_in(sae, x)


def feature_on_tokens(model: "HookedTransformer", sae: "SAE", kind: str, layer: int, feature: int,
                      token_ids: Sequence[int]) -> np.ndarray:
    """One feature's activation at every token of ``token_ids`` (BOS first), for any dictionary kind: one forward
    pass to the dictionary's layer (its input captured by a TransformerLens hook) and sae-lens' encode. NaN at BOS,
    which is not scored."""
    import torch

    from backend.dictionaries.kinds import KINDS
    from backend.model.activations import capture_batch

    _check_feature(sae, feature)
    site = (KINDS[kind].hook, int(layer))
    x = capture_batch(model, torch.tensor([list(token_ids)], dtype=torch.long), [site])[site]  # BOS dropped
    with torch.inference_mode():
        acts = encode_input(sae, kind, x.float())[0, :, int(feature)].cpu().numpy().astype(np.float64)
    return np.concatenate([[np.nan], acts])


def _check_feature(sae: "SAE", feature: int) -> None:
    if not 0 <= int(feature) < int(sae.cfg.d_sae):
        raise ValueError(f"Feature {feature} does not exist: this dictionary has features 0–{int(sae.cfg.d_sae) - 1}.")


def _check_pos(cache: Cache, layer: int, pos: int) -> int:
    n = cache[hook_name("z", layer)].shape[1]
    if not 0 <= int(pos) < n:
        raise ValueError(f"Position {pos} is outside the prompt (positions 0–{n - 1}).")
    return int(pos)


# --------------------------------------------------------------------------------------------------------------
# Direct feature attribution (hand-written: sae-lens and TransformerLens have no DFA; docs/methods.md §1)


def dfa_by_head(model: "HookedTransformer", sae: "SAE", cache: Cache, layer: int, pos: int, feature: int) -> HeadDFA:
    """Each head's contribution to feature ``feature``'s pre-activation at (layer, pos).

    ``cache`` comes from :func:`run_cache` (or :attr:`PromptFeatures.cache`) for the same ``model``; the shapes are
    read from it, so ``model`` is only part of the signature shared with :func:`dfa_by_source`.

    ``contributions[h] = W_enc[slice_h, i]·(s·x_h − b_dec[slice_h])``; they sum to ``preactivation − b_enc``.
    """
    import torch

    pos = _check_pos(cache, layer, pos)
    _check_feature(sae, feature)
    z = cache[hook_name("z", layer)][0, pos]  # [n_heads, d_head]
    _check_shapes(sae, z)
    n_heads = int(z.shape[0])
    contributions, bdec = (t[0] for t in dfa.head_terms(sae, flatten_z(z)[None], torch.tensor([feature]), n_heads))
    b_enc = float(dfa.decoder_scale(sae, torch.tensor([feature]))[0]) * float(sae.b_enc.detach()[feature])
    return HeadDFA(contributions=contributions.cpu().numpy().astype(np.float64), bdec=bdec.cpu().numpy().astype(np.float64),
                   b_enc=b_enc, preactivation=float(contributions.sum()) + b_enc)


def _v_per_query_head(v: "torch.Tensor", n_heads: int) -> "torch.Tensor":
    """[src, n_kv_heads, d_head] -> [src, n_heads, d_head]: query head h reads KV group h // (n_heads / n_kv), the
    grouping TransformerLens's GroupedQueryAttention uses (repeat_interleave on the head axis)."""
    import torch

    n_kv = int(v.shape[1])
    if n_kv == n_heads:
        return v
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} key/value heads evenly.")
    return torch.repeat_interleave(v, n_heads // n_kv, dim=1)


def dfa_by_source(model: "HookedTransformer", sae: "SAE", cache: Cache, layer: int, pos: int,
                  feature: int) -> SourceDFA:
    """Contribution of every (head, source position) to feature ``feature``'s pre-activation at (layer, pos):
    ``s_in · W_enc[slice_h, i]·A_h[pos, src]·v_h[src]``, with the b_dec share per head kept apart, so that
    ``by_head_source.sum(1) + bdec`` equals :func:`dfa_by_head`'s contributions."""
    import torch

    pos = _check_pos(cache, layer, pos)
    _check_feature(sae, feature)
    z = cache[hook_name("z", layer)][0, pos]  # [n_heads, d_head]
    _check_shapes(sae, z)
    pattern = cache[hook_name("pattern", layer)][0, :, pos, :]  # [n_heads, src]
    n_heads, d_head = int(z.shape[0]), int(z.shape[1])
    v = _v_per_query_head(cache[hook_name("v", layer)][0], n_heads)  # [src, n_heads, d_head]
    with torch.no_grad():
        scale = float(dfa.input_scale(sae, flatten_z(z)))  # depends on the whole x at pos: constant across sources
        w = sae.W_enc.detach()[:, feature].reshape(n_heads, d_head)
        dec = float(dfa.decoder_scale(sae, torch.tensor([feature]))[0])
        wv = torch.einsum("shd,hd->hs", v, w)  # W_enc slice · v_h[src]
        by_head_source = dec * scale * pattern * wv  # [n_heads, src]
        bdec = -dec * (w * dfa.bdec_in(sae).reshape(n_heads, d_head)).sum(-1)
        b_enc = dec * float(sae.b_enc.detach()[feature])
    total = float(by_head_source.sum() + bdec.sum()) + b_enc
    return SourceDFA(by_head_source=by_head_source.cpu().numpy().astype(np.float64),
                     bdec=bdec.cpu().numpy().astype(np.float64), b_enc=b_enc, preactivation=total)


# --------------------------------------------------------------------------------------------------------------
# MLP transcoders (Dunefsky et al. 2024), live


def analyze_transcoders(model: "HookedTransformer", transcoders: Mapping[int, Any], token_ids: Sequence[int],
                        top_n: int = DEFAULT_TOP_N) -> PromptFeatures:
    """Run ``token_ids`` (BOS first) once up to the last transcoder layer and return, for every layer in
    ``transcoders``, each token's top ``top_n`` transcoder features (the MLP's normalised input, hook ``mlp_in``,
    encoded by the layer's transcoder; BOS shown but not scored) and the cached MLP inputs."""
    import torch

    ids = [int(t) for t in token_ids]
    if not transcoders or not ids:
        return PromptFeatures(token_ids=ids, layers={}, cache={})
    names = {hook_name("mlp_in", layer) for layer in transcoders}
    tokens = torch.tensor([ids], dtype=torch.long)
    with torch.inference_mode():
        _, run = model.run_with_cache(tokens, names_filter=lambda n: n in names, stop_at_layer=max(transcoders) + 1)
    cache = {name: run[name].detach().clone() for name in names}
    layers: dict[int, LayerFeatures] = {}
    for layer, tc in sorted(transcoders.items()):
        feats, vals, l0 = top_features(_encode_mlp_in(tc, cache, layer), top_n)
        layers[layer] = LayerFeatures(layer=layer, features=feats, acts=vals, l0=l0)
    return PromptFeatures(token_ids=ids, layers=layers, cache=cache)


def _encode_mlp_in(tc: Any, cache: Cache, layer: int) -> "torch.Tensor":
    import torch

    x = cache[hook_name("mlp_in", layer)][0]
    with torch.inference_mode():
        return tc.encode(x.to(tc.W_enc.device, tc.W_enc.dtype)).float().cpu()


def transcoder_activations(tc: Any, cache: Cache, layer: int, feature: int) -> np.ndarray:
    """Activation of one transcoder feature at every position of a prompt cached by :func:`analyze_transcoders`
    (NaN at BOS, which is not scored)."""
    _check_feature(tc, feature)
    out = _encode_mlp_in(tc, cache, layer)[:, int(feature)].numpy().astype(np.float64)
    if len(out):
        out[BOS_POS] = np.nan
    return out
