"""backend.feature_analysis on the tiny test models: DFA by head and by source position checked against sae-lens's
own pre-activation (``hook_sae_acts_pre``) and against TransformerLens forward passes with patched attention, on a
GQA model (tiny-llama: 4 query heads, 2 KV heads) and a non-GQA one (tiny-gpt2); top features by brute force."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from backend.features import live as fa
from backend.inputs.prompts import encode_prompt
from backend.model.hooks import hook_name

PROMPT = "When Mary and John went to the store, John gave a drink to Mary because"


@pytest.fixture(scope="module")
def tiny_gpt2() -> Any:
    from backend.model.registry import load_model

    return load_model("tiny-gpt2")


@pytest.fixture(params=["tiny-llama", "tiny-gpt2"])
def model(request: pytest.FixtureRequest, tiny_model: Any, tiny_gpt2: Any) -> Any:
    return tiny_model if request.param == "tiny-llama" else tiny_gpt2


def _sae(d_in: int, d_sae: int = 96, k: int = 8, seed: int = 0, **cfg: Any) -> Any:
    """Engineer A's random TopK SAE (features fire on real activations) with nonzero biases added, so the b_dec and
    b_enc terms are exercised; ``cfg`` overrides sae-lens config fields (input conventions)."""
    from sae_lens import TopKSAE, TopKSAEConfig

    from backend.dictionaries.attention_sae import make_random_sae

    base = make_random_sae(d_in, d_sae, k, seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, **cfg))
    sae.load_state_dict(base.state_dict())
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=gen))
        sae.b_enc.copy_(0.05 * torch.randn(d_sae, generator=gen))
        if cfg.get("rescale_acts_by_decoder_norm"):
            sae.W_dec.mul_(0.5 + torch.rand(d_sae, 1, generator=gen))  # decoder norms away from 1
    return sae.eval()


def _d_in(model: Any) -> int:
    return model.cfg.n_heads * model.cfg.d_head


def _ids(model: Any) -> list[int]:
    return encode_prompt(model, PROMPT).ids


def _sae_preact(sae: Any, x: torch.Tensor) -> torch.Tensor:
    """sae-lens's own pre-activation (before the TopK), read from its hook point: the independent reference."""
    with torch.no_grad():
        _, cache = sae.run_with_cache(x)
    return cache["hook_sae_acts_pre"]


def test_head_dfa_matches_sae_lens_preactivation(model: Any) -> None:
    sae = _sae(_d_in(model))
    ids = _ids(model)
    cache = fa.run_cache(model, ids, [1])
    z = cache[hook_name("z", 1)][0]
    x = fa.flatten_z(z)
    ref = _sae_preact(sae, x)  # [pos, d_sae]
    n_heads, d_head = model.cfg.n_heads, model.cfg.d_head
    checked = 0
    for pos in (1, len(ids) // 2, len(ids) - 1):
        for feature in (0, 7, 95):
            dfa = fa.dfa_by_head(model, sae, cache, 1, pos, feature)
            assert dfa.contributions.shape == (n_heads,)
            assert dfa.preactivation == pytest.approx(float(ref[pos, feature]), abs=1e-4)
            b_enc = float(sae.b_enc.detach()[feature])
            assert dfa.contributions.sum() == pytest.approx(float(ref[pos, feature]) - b_enc, abs=1e-4)
            # Each head's term, independently: setting head h's slice of x to b_dec removes exactly its term.
            for h in range(n_heads):
                knocked = x[pos].clone()
                sl = slice(h * d_head, (h + 1) * d_head)
                knocked[sl] = sae.b_dec.detach()[sl]
                drop = float(ref[pos, feature] - _sae_preact(sae, knocked[None])[0, feature])
                assert dfa.contributions[h] == pytest.approx(drop, abs=1e-4)
                checked += 1
            # b_dec part: the term a head contributes when its z is zero.
            zero_head = -(sae.W_enc.detach()[:, feature] * sae.b_dec.detach()).reshape(n_heads, d_head).sum(-1)
            np.testing.assert_allclose(dfa.bdec, zero_head.numpy(), atol=1e-5)
    assert checked == 3 * 3 * n_heads


@pytest.mark.parametrize("cfg", [{"apply_b_dec_to_input": False}, {"normalize_activations": "constant_norm_rescale"},
                                 {"rescale_acts_by_decoder_norm": True}])
def test_head_dfa_follows_the_saes_input_conventions(tiny_model: Any, cfg: dict[str, Any]) -> None:
    from backend.dictionaries.attention_sae import preactivation

    sae = _sae(_d_in(tiny_model), **cfg)
    ids = _ids(tiny_model)
    cache = fa.run_cache(tiny_model, ids, [0])
    x = fa.flatten_z(cache[hook_name("z", 0)][0])
    ref = preactivation(sae, x)  # what the activation function receives
    acts = fa.encode(sae, cache[hook_name("z", 0)][0])  # sae-lens's own encode
    for feature in [3, 50, *torch.nonzero(acts[5]).flatten().tolist()[:3]]:
        head = fa.dfa_by_head(tiny_model, sae, cache, 0, 5, feature)
        src = fa.dfa_by_source(tiny_model, sae, cache, 0, 5, feature)
        assert head.preactivation == pytest.approx(float(ref[5, feature]), abs=1e-4)
        if acts[5, feature] > 0:  # a firing TopK feature's activation is its pre-activation
            assert head.preactivation == pytest.approx(float(acts[5, feature]), abs=1e-4)
        np.testing.assert_allclose(src.by_head_source.sum(1) + src.bdec, head.contributions, atol=1e-4)
        if not cfg.get("apply_b_dec_to_input", True):
            assert not head.bdec.any()


def test_source_dfa_sums_to_head_dfa_for_every_head(model: Any) -> None:
    sae = _sae(_d_in(model), seed=1)
    ids = _ids(model)
    cache = fa.run_cache(model, ids, [0, 1])
    for layer in (0, 1):
        for pos in (1, 4, len(ids) - 1):
            for feature in (2, 40):
                head = fa.dfa_by_head(model, sae, cache, layer, pos, feature)
                src = fa.dfa_by_source(model, sae, cache, layer, pos, feature)
                assert src.by_head_source.shape == (model.cfg.n_heads, len(ids))
                assert not src.by_head_source[:, pos + 1:].any()  # causal: later tokens contribute nothing
                np.testing.assert_allclose(src.by_head_source.sum(1) + src.bdec, head.contributions, atol=1e-4)
                assert src.by_source.sum() + src.bdec_total == pytest.approx(head.contributions.sum(), abs=1e-4)
                assert src.preactivation == pytest.approx(head.preactivation, abs=1e-4)


def test_source_dfa_matches_a_forward_pass_attending_only_to_that_source(model: Any) -> None:
    """Independent check of the per-source term (and of the GQA head -> KV-group mapping): rerun the model with the
    destination row of every head's pattern keeping only source s; TransformerLens then computes
    z_h = A_h[d, s] v_h[s] itself, and sae-lens's pre-activation minus b_enc and the b_dec share is source s's term."""
    sae = _sae(_d_in(model), seed=2)
    ids = _ids(model)
    layer, pos, feature = 1, len(ids) - 2, 11
    cache = fa.run_cache(model, ids, [layer])
    src = fa.dfa_by_source(model, sae, cache, layer, pos, feature)
    for s in (0, 3, pos):
        def keep_only(pattern: torch.Tensor, hook: Any, s: int = s) -> torch.Tensor:
            out = pattern.clone()
            keep = out[:, :, pos, s].clone()
            out[:, :, pos, :] = 0
            out[:, :, pos, s] = keep
            return out

        captured: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            model.run_with_hooks(
                torch.tensor([ids]), stop_at_layer=layer + 1,
                fwd_hooks=[(hook_name("pattern", layer), keep_only),
                           (hook_name("z", layer), lambda z, hook: captured.setdefault("z", z.clone()))])
        x = fa.flatten_z(captured["z"][0, pos])
        term = float(_sae_preact(sae, x[None])[0, feature]) - float(sae.b_enc.detach()[feature]) - src.bdec_total
        assert src.by_source[s] == pytest.approx(term, abs=1e-4)


def test_analyze_prompt_top_features_are_the_largest_activations(model: Any) -> None:
    saes = {0: _sae(_d_in(model), seed=3), 1: _sae(_d_in(model), d_sae=64, k=4, seed=4)}
    ids = _ids(model)
    res = fa.analyze_prompt(model, saes, ids, top_n=5)
    assert sorted(res.layers) == [0, 1] and res.n_pos == len(ids)
    _, full = model.run_with_cache(torch.tensor([ids]))
    for layer, sae in saes.items():
        lf = res.layers[layer]
        acts = sae.encode(fa.flatten_z(full[hook_name("z", layer)][0])).detach().numpy()
        assert (lf.features[0] == -1).all() and np.isnan(lf.acts[0]).all() and np.isnan(lf.l0[0])  # BOS unscored
        for pos in range(1, len(ids)):
            row = acts[pos]
            fired = np.flatnonzero(row > 0)
            want = fired[np.argsort(-row[fired], kind="stable")][:5]
            got = lf.features[pos][lf.features[pos] >= 0]
            assert len(got) == min(5, len(fired))
            np.testing.assert_allclose(np.sort(row[got])[::-1], row[want], rtol=1e-5)  # ties may swap ids
            np.testing.assert_allclose(lf.acts[pos][: len(got)], row[got], rtol=1e-5)
            assert lf.l0[pos] == len(fired)
            assert lf.l0[pos] <= sae.cfg.k
        np.testing.assert_allclose(fa.feature_activations(sae, res.cache, layer, int(lf.features[1, 0]))[1:],
                                   acts[1:, int(lf.features[1, 0])], rtol=1e-5)
    table = res.table()
    assert set(table.columns) >= {"layer", "pos", "rank", "feature", "act"}
    assert (table["pos"] > 0).all() and (table["act"] > 0).all()


def test_bad_position_or_feature_is_one_clear_sentence(tiny_model: Any) -> None:
    sae = _sae(_d_in(tiny_model))
    ids = _ids(tiny_model)
    cache = fa.run_cache(tiny_model, ids, [0])
    with pytest.raises(ValueError, match="outside the prompt"):
        fa.dfa_by_head(tiny_model, sae, cache, 0, len(ids), 0)
    with pytest.raises(ValueError, match="does not exist"):
        fa.dfa_by_source(tiny_model, sae, cache, 0, 1, 96)
    with pytest.raises(ValueError, match="trained for another model"):
        fa.analyze_prompt(tiny_model, {0: _sae(32)}, ids)


@pytest.mark.slow
def test_dfa_identities_on_the_real_model() -> None:
    """SmolLM2-135M (9 query heads sharing 3 KV heads, d_head 64): the same identities at a real 576-wide hook_z,
    on a 64-token prompt with three 2304-feature SAEs (its cost is measured by `make bench`, not here)."""
    from backend.dictionaries.attention_sae import make_random_sae
    from backend.model.registry import load_model

    model = load_model("smollm2-135m")
    assert model.cfg.n_key_value_heads == 3 and model.cfg.n_heads == 9
    saes = {layer: make_random_sae(576, 2304, 32, seed=layer) for layer in (8, 15, 22)}
    ids = encode_prompt(model, PROMPT * 6).ids[:64]
    fa.analyze_prompt(model, saes, ids[:8])  # warm-up (first-call allocations)
    res = fa.analyze_prompt(model, saes, ids)
    x = fa.flatten_z(res.cache[hook_name("z", 15)][0])
    ref = _sae_preact(saes[15], x)
    for pos in (1, 40, 63):
        feature = int(res.layers[15].features[pos, 0])
        head = fa.dfa_by_head(model, saes[15], res.cache, 15, pos, feature)
        src = fa.dfa_by_source(model, saes[15], res.cache, 15, pos, feature)
        assert head.preactivation == pytest.approx(float(ref[pos, feature]), abs=1e-3)
        assert head.preactivation == pytest.approx(float(res.layers[15].acts[pos, 0]), abs=1e-3)  # TopK: act = pre
        np.testing.assert_allclose(src.by_head_source.sum(1) + src.bdec, head.contributions, atol=1e-3)
