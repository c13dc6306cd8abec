"""SAE evaluation (backend.dictionary_eval): CE-loss recovered by real splicing, FVE, L0, dead features."""

from __future__ import annotations

import pytest
import torch

from backend.dictionaries.attention_sae import make_random_sae
from backend.dictionaries.eval import evaluate_dictionaries, evaluate_dictionary, reconstruction_stats, split_contexts
from backend.model.activations import collect_z
from backend.model.hooks import hook_name


@pytest.fixture(scope="module")
def tokens(tiny_model):
    from backend.inputs import corpus
    from backend.inputs.prompts import model_bos_id

    docs = corpus.load_documents(corpus.BUILTIN)
    return corpus.tokenize_contexts(docs, tiny_model.tokenizer, n_ctx=32, bos=model_bos_id(tiny_model),
                                    max_contexts=8).tokens


def _standard_sae(w_enc: torch.Tensor, w_dec: torch.Tensor):
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=w_enc.shape[0], d_sae=w_enc.shape[1]))
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def identity_sae(d: int):
    """ReLU(x) − ReLU(−x) = x exactly: W_enc = [I, −I], W_dec = [I; −I], zero biases."""
    eye = torch.eye(d)
    return _standard_sae(torch.cat([eye, -eye], dim=1), torch.cat([eye, -eye], dim=0))


def zero_sae(d: int):
    """Reconstructs nothing: W_dec = 0, b_dec = 0."""
    return _standard_sae(torch.randn(d, 2 * d), torch.zeros(2 * d, d))


def test_identity_sae_recovers_all_and_zero_sae_nothing(tiny_model, tokens):
    m = evaluate_dictionaries(tiny_model, {0: identity_sae(64), 1: zero_sae(64)}, tokens, batch_size=4)
    ident, zero = m[0], m[1]
    for x in (ident, zero):
        assert abs(x.ce_ablated - x.ce_clean) > 1e-3  # ablating a layer changes the loss: the ratio is defined
        assert x.eval_tokens == tokens.shape[0] * 31 and x.ce_tokens == tokens.shape[0] * 31
    assert ident.ce_spliced == pytest.approx(ident.ce_clean, abs=1e-5)
    assert ident.ce_loss_recovered == pytest.approx(1.0, abs=1e-3)
    assert ident.fve == pytest.approx(1.0, abs=1e-6)
    assert ident.l0 == pytest.approx(64, abs=1)  # every coordinate is nonzero, one of its two features fires
    assert zero.ce_spliced == pytest.approx(zero.ce_ablated, abs=1e-5)
    assert zero.ce_loss_recovered == pytest.approx(0.0, abs=1e-3)
    assert zero.delta_ce == pytest.approx(zero.ce_ablated - zero.ce_clean, abs=1e-5)


def test_ce_losses_match_full_forward_splicing(tiny_model, tokens):
    """The shared clean pass + start_at_layer shortcut equals full hooked forward passes computed here."""
    from backend.dictionaries.attention_sae import reconstruct

    sae = make_random_sae(64, 256, k=8, seed=1)
    layer = 1
    got = evaluate_dictionary(tiny_model, sae, layer, tokens, batch_size=3)

    def splice(z, hook):
        out = z.clone()
        flat = reconstruct(sae, z[:, 1:].flatten(-2))  # heads concatenated by hand
        out[:, 1:] = flat.reshape(z[:, 1:].shape)
        return out

    def ablate(z, hook):
        out = z.clone()
        out[:, 1:] = 0
        return out

    with torch.no_grad():
        clean = tiny_model(tokens, return_type="loss").item()
        spliced = tiny_model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(hook_name("z", layer), splice)]).item()
        ablated = tiny_model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(hook_name("z", layer), ablate)]).item()
    assert got.ce_clean == pytest.approx(clean, abs=1e-4)
    assert got.ce_spliced == pytest.approx(spliced, abs=1e-4)
    assert got.ce_ablated == pytest.approx(ablated, abs=1e-4)
    assert got.ce_loss_recovered == pytest.approx((ablated - spliced) / (ablated - clean), rel=1e-3, abs=1e-3)


def test_reconstruction_stats_match_direct_formulas(tiny_model, tokens):
    acts = collect_z(tiny_model, tokens, [0])[0]
    sae = make_random_sae(64, 256, k=8, seed=4)
    stats = reconstruction_stats(sae, acts, batch_size=50)  # several batches
    f = sae.encode(acts).detach()
    x_hat = sae.decode(f).detach()
    a, r = acts.double(), x_hat.double()
    fve = 1 - ((a - r) ** 2).sum() / ((a - a.mean(0)) ** 2).sum()
    assert stats["fve"] == pytest.approx(float(fve), abs=1e-5)
    assert stats["l0"] == pytest.approx(8.0)
    assert torch.equal(stats["fired"], (f > 0).any(0))


def test_dead_fraction_counts_features_never_fired(tiny_model, tokens):
    sae = make_random_sae(64, 256, k=8, seed=4)
    with torch.no_grad():
        sae.b_enc[:100] = -1e4  # these 100 can never win the top-k
    m = evaluate_dictionary(tiny_model, sae, 0, tokens, batch_size=4)
    assert m.dead_fraction >= 100 / 256
    all_fired = torch.ones(256, dtype=torch.bool)
    m2 = evaluate_dictionary(tiny_model, sae, 0, tokens, batch_size=4, train_fired=all_fired)
    assert m2.dead_fraction == 0.0


def test_split_contexts_holds_out_the_last_ones():
    train, held = split_contexts(256, 32)
    assert list(held) == list(range(224, 256)) and list(train) == list(range(224))
    train, held = split_contexts(8, 32)  # capped at a quarter
    assert list(held) == [6, 7] and len(train) == 6


@pytest.mark.slow
def test_identity_and_zero_on_the_real_model():
    """On SmolLM2 (no b_O: zeroed z = zeroed attention output) the identity SAE recovers 1, the zero SAE 0."""
    from backend.inputs import corpus
    from backend.inputs.prompts import model_bos_id
    from backend.model.registry import load_model

    model = load_model("smollm2-135m")
    assert float(model.blocks[8].attn.b_O.detach().abs().max()) == 0.0
    docs = corpus.load_documents(corpus.BUILTIN)
    toks = corpus.tokenize_contexts(docs, model.tokenizer, n_ctx=64, bos=model_bos_id(model), max_contexts=4).tokens
    m = evaluate_dictionaries(model, {8: identity_sae(576), 15: zero_sae(576)}, toks, batch_size=4)
    assert m[8].ce_loss_recovered == pytest.approx(1.0, abs=1e-3) and m[8].fve == pytest.approx(1.0, abs=1e-6)
    assert m[15].ce_loss_recovered == pytest.approx(0.0, abs=1e-3)
    assert m[8].ce_ablated > m[8].ce_clean  # removing a real attention layer hurts
