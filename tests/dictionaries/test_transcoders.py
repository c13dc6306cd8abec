"""MLP transcoders (backend.dictionaries.transcoder, .transcoder_training, .eval, .steps) on the tiny random test
model; the training recipe itself is tested on synthetic data in test_transcoder_training.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from backend.dictionaries.storage import load_transcoders
from backend.dictionaries.transcoder import (
    encode,
    make_random_transcoder,
    sink_positions,
    splice_hooks,
    transcode,
    transcoder_dict_id,
)
from backend.dictionaries.transcoder_training import fit_linear, train_transcoder
from backend.errors import InputError, ModelUnavailableError
from backend.model.hooks import hook_name

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokens(tiny_model):
    from backend.inputs import corpus
    from backend.inputs.prompts import model_bos_id

    docs = corpus.load_documents(corpus.BUILTIN)
    return corpus.tokenize_contexts(docs, tiny_model.tokenizer, n_ctx=32, bos=model_bos_id(tiny_model),
                                    max_contexts=40).tokens


def _mlp_io(model, tokens, layer):
    """MLP input / output of ``layer`` at non-BOS positions, read with our own hooks (not the module's)."""
    got = {}

    def keep(act, hook):
        got[hook.name] = act[:, 1:].reshape(-1, act.shape[-1]).clone()

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.ln2.hook_normalized", keep),
                                                (f"blocks.{layer}.hook_mlp_out", keep)])
    return got[f"blocks.{layer}.ln2.hook_normalized"], got[f"blocks.{layer}.hook_mlp_out"]


def _fve(y, y_hat):
    y, y_hat = y.double(), y_hat.double()
    return float(1 - ((y - y_hat) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())


# ------------------------------------------------------------------------------------------------------------
# Construction and helpers


def test_dict_id_and_random_transcoder_fires_on_real_inputs(tiny_model, tokens):
    assert transcoder_dict_id("smollm2-135m", 3, "transcoder", 2304) == "smollm2-135m/L3/mlp/transcoder-2304"
    x, _ = _mlp_io(tiny_model, tokens[:4], 0)
    tc = make_random_transcoder(64, 512, 64, seed=1, l0=12)
    f = encode(tc, x)
    assert f.shape == (x.shape[0], 512) and not f.requires_grad
    l0 = float((f > 0).float().sum(-1).mean())
    assert 6 < l0 < 24  # about l0 = 12 per token on real (RMS-normalised) inputs
    assert (f > 0).any(0).float().mean() > 0.5  # many different features fire
    assert not tc.training and tc.cfg.apply_b_dec_to_input is False and type(tc).__name__ == "Transcoder"


def test_training_beats_the_mean_and_reaches_k(tiny_model, tokens):
    x, y = _mlp_io(tiny_model, tokens[:32], 1)
    x_eval, y_eval = _mlp_io(tiny_model, tokens[32:], 1)
    k = 16
    tc, info = train_transcoder((x, y), 256, k=k, epochs=2, batch_size=128, lr=2e-3, seed=0)
    mse_after = float(((transcode(tc, x_eval) - y_eval) ** 2).mean())
    mse_mean = float(((y_eval - y.mean(0)) ** 2).mean())  # predicting the training mean
    assert mse_after < 0.9 * mse_mean
    l0 = float((encode(tc, x_eval) > 0).float().sum(-1).mean())
    assert 0.5 * k <= l0 <= 1.5 * k
    assert info["steps"] > 0 and info["training_tokens"] == x.shape[0]
    assert torch.allclose(tc.W_dec.norm(dim=1), torch.ones(256), atol=1e-4)  # unit decoder rows
    assert tc.cfg.metadata["training"]["k"] == k
    assert type(tc).__name__ == "JumpReLUSkipTranscoder" and not tc.training


def test_the_skip_path_is_part_of_the_prediction(tiny_model, tokens):
    x, y = _mlp_io(tiny_model, tokens[:32], 0)
    tc, _ = train_transcoder((x, y), 128, k=8, skip=True, seed=0)
    assert float(tc.W_skip.detach().abs().sum()) > 0
    assert torch.allclose(transcode(tc, x), tc.decode(encode(tc, x)) + x @ tc.W_skip.T, atol=1e-4)
    plain, _ = train_transcoder((x, y), 128, k=8, skip=False, seed=0)
    assert type(plain).__name__ == "JumpReLUTranscoder" and not hasattr(plain, "W_skip")


def test_splice_hooks_replace_mlp_out_after_bos(tiny_model, tokens):
    tc = make_random_transcoder(64, 256, 64, seed=2, l0=8)
    batch = tokens[:2]
    seen = {}

    def after(act, hook):
        seen["y"] = act.clone()

    def inp(act, hook):
        seen["x"] = act.clone()

    # Our splice hooks come first on the same hook point, so the later hook sees the spliced value.
    with torch.no_grad():
        tiny_model.run_with_hooks(batch, fwd_hooks=splice_hooks({1: tc}) + [
            (hook_name("mlp_in", 1), inp), (hook_name("mlp_out", 1), after)])
        _, clean = tiny_model.run_with_cache(batch, names_filter=[hook_name("mlp_out", 1)])
    assert torch.allclose(seen["y"][:, 1:], transcode(tc, seen["x"][:, 1:]), atol=1e-5)
    assert torch.equal(seen["y"][:, 0], clean[hook_name("mlp_out", 1)][:, 0])  # BOS untouched


def test_sink_positions_keep_the_real_mlp_output(tiny_model, tokens):
    """BOS and document separators are sinks: splicing leaves the model's own MLP output there."""
    separator = tiny_model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    batch = tokens[:8].clone()
    batch[:, 5] = separator  # a separator in every context, at a known position
    sinks = sink_positions(batch, separator)
    assert sinks[:, 0].all() and sinks[:, 5].all() and int(sinks.sum()) == int((batch == separator).sum()) + 8 - int(
        (batch[:, 0] == separator).sum())
    tc = make_random_transcoder(64, 256, 64, seed=2, l0=8)
    seen = {}

    def after(act, hook):
        seen["y"] = act.clone()

    with torch.no_grad():
        tiny_model.run_with_hooks(batch, fwd_hooks=splice_hooks({1: tc}, sinks) + [(hook_name("mlp_out", 1), after)])
        _, clean = tiny_model.run_with_cache(batch, names_filter=[hook_name("mlp_out", 1)])
    real = clean[hook_name("mlp_out", 1)]
    assert torch.equal(seen["y"][:, 0], real[:, 0]) and torch.equal(seen["y"][:, 5], real[:, 5])
    assert not torch.allclose(seen["y"][:, 6], real[:, 6])  # an ordinary position is replaced


def test_training_rows_drop_sinks_and_massive_rows():
    from backend.dictionaries.steps import training_rows

    tokens = torch.tensor([[1, 7, 0, 8, 9], [1, 4, 4, 0, 5]])  # BOS=1 at position 0, separator id 0
    y = torch.ones(8, 3)
    y[3] *= 60.0  # a massive activation (context 0, position 4): norm 60x the median
    y[5] *= 20.0  # large but ordinary at ratio 50 (context 1, position 2)
    rows, limit = training_rows(tokens, y, separator_id=0, massive_ratio=50.0)
    # rows are positions 1..4 of each context: the separators at (0, 2) and (1, 3) and the massive row are dropped
    assert rows.tolist() == [True, False, True, False, True, True, False, True]
    assert limit == pytest.approx(50.0 * 3 ** 0.5)  # 50 x the median norm (sqrt 3) of the non-sink rows


def test_splicing_keeps_massive_activations_exact(tiny_model, tokens):
    """Positions whose real MLP output norm is above the transcoder's stored limit keep the real output."""
    tc = make_random_transcoder(64, 256, 64, seed=2, l0=8)
    batch = tokens[:4]
    with torch.no_grad():
        _, clean = tiny_model.run_with_cache(batch, names_filter=[hook_name("mlp_out", 1)])
    real = clean[hook_name("mlp_out", 1)]
    norms = real.norm(dim=-1)
    limit = float(norms[:, 1:].median())  # half of the positions count as massive at this limit
    tc.cfg.metadata["massive_norm"] = limit
    seen = {}

    def after(act, hook):
        seen["y"] = act.clone()

    with torch.no_grad():
        tiny_model.run_with_hooks(batch, fwd_hooks=splice_hooks({1: tc}) + [(hook_name("mlp_out", 1), after)])
    big = norms > limit
    assert big[:, 1:].any() and (~big[:, 1:]).any()
    assert torch.equal(seen["y"][big], real[big])
    assert not torch.allclose(seen["y"][~big][4:], real[~big][4:])


def test_splice_hooks_are_differentiable(tiny_model, tokens):
    """The graph builder may backpropagate through the replacement model: the splice must not cut gradients."""
    tc = make_random_transcoder(64, 256, 64, seed=4, l0=8)
    tc.zero_grad()
    loss = tiny_model.run_with_hooks(tokens[:1], return_type="loss", fwd_hooks=splice_hooks({0: tc}))
    loss.backward()
    assert tc.W_enc.grad is not None and float(tc.W_enc.grad.abs().sum()) > 0
    tiny_model.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------------------
# Evaluation against independent computations


def _independent_run(model, tokens, layers, replace=None):
    """Final-position-free log-probs of a run with ``layers``' MLP outputs replaced (``replace``: {layer: x -> y}) or
    zeroed, except at BOS and document-separator positions, with hooks written here: the MLP input is recomputed from
    resid_mid with the RMS normalisation spelled out (tiny-llama is RMS), the sink mask from the token ids."""
    separator = model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    sink = tokens == separator
    sink[:, 0] = True
    state = {}

    def read_resid_mid(layer):
        def hook(r, hook):
            state[layer] = r / (r.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
        return hook

    def make(layer):
        def hook(y, hook):
            new = torch.zeros_like(y) if replace is None else replace[layer](state[layer])
            return torch.where(sink[..., None], y, new)
        return hook

    hooks = []
    for layer in layers:
        hooks += [(f"blocks.{layer}.hook_resid_mid", read_resid_mid(layer)), (f"blocks.{layer}.hook_mlp_out", make(layer))]
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=hooks).log_softmax(-1)[:, :-1]


def _ce(logprobs, tokens):
    return float(-logprobs.gather(-1, tokens[:, 1:, None])[..., 0].double().mean())


def _non_sink_rows(model, tokens):
    separator = model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return (tokens[:, 1:] != separator).reshape(-1)


def test_evaluation_matches_independent_computation(tiny_model, tokens):
    from backend.dictionaries.eval import evaluate_transcoders

    fits, tcs = {}, {}
    for layer in (0, 1):
        x, y = _mlp_io(tiny_model, tokens[:30], layer)
        fits[layer] = fit_linear((x, y))
        tcs[layer], _ = train_transcoder((x, y), 256, k=16, seed=layer, linear=fits[layer])
    held = tokens[30:36].clone()
    held[:3, 10] = tiny_model.tokenizer.convert_tokens_to_ids("<|endoftext|>")  # sinks inside contexts, as in a corpus
    baselines = {layer: fit.predict for layer, fit in fits.items()}
    ev = evaluate_transcoders(tiny_model, tcs, held, batch_size=4, baselines=baselines)  # 2 batches
    with torch.no_grad():
        clean_lp = tiny_model(held).log_softmax(-1)[:, :-1]
    clean = _ce(clean_lp, held)
    rows = _non_sink_rows(tiny_model, held)
    n_pred = held.shape[0] * (held.shape[1] - 1)
    for layer in (0, 1):
        m, base = ev.layers[layer], ev.baselines[layer]
        ex, ey = _mlp_io(tiny_model, held, layer)
        ex, ey = ex[rows], ey[rows]
        assert m.fve == pytest.approx(_fve(ey, tcs[layer](ex).detach()), abs=1e-5)
        assert base.fve == pytest.approx(_fve(ey, fits[layer].predict(ex)), abs=1e-5)
        assert m.l0 == pytest.approx(float((tcs[layer].encode(ex) > 0).float().sum(-1).mean()), abs=1e-4)
        spliced = _ce(_independent_run(tiny_model, held, [layer], tcs), held)
        linear = _ce(_independent_run(tiny_model, held, [layer], baselines), held)
        ablated = _ce(_independent_run(tiny_model, held, [layer]), held)
        assert m.ce_clean == pytest.approx(clean, abs=1e-4)
        assert m.ce_spliced == pytest.approx(spliced, abs=1e-4)
        assert base.ce_spliced == pytest.approx(linear, abs=1e-4)
        assert m.ce_ablated == pytest.approx(ablated, abs=1e-4)
        assert abs(ablated - clean) > 1e-3  # the ratio is defined
        assert m.ce_loss_recovered == pytest.approx((ablated - spliced) / (ablated - clean), rel=1e-3, abs=1e-3)
        assert m.ce_tokens == n_pred and m.eval_tokens == int(rows.sum())
    for rep, reps in ((ev.replaced, tcs), (ev.baseline_replaced, baselines)):
        lp = _independent_run(tiny_model, held, [0, 1], reps)
        kl = (clean_lp.exp() * (clean_lp - lp)).sum(-1)
        assert rep.n_replaced == 2 and rep.ce_tokens == n_pred
        assert rep.ce_clean == pytest.approx(clean, abs=1e-4)
        assert rep.ce_replaced == pytest.approx(_ce(lp, held), abs=1e-4)
        assert rep.kl == pytest.approx(float(kl.double().mean()), abs=1e-4)
        assert rep.top1 == pytest.approx(float((clean_lp.argmax(-1) == lp.argmax(-1)).double().mean()), abs=1e-6)
        assert rep.ce_ablated == pytest.approx(_ce(_independent_run(tiny_model, held, [0, 1]), held), abs=1e-4)
        lo, hi = rep.intervals["delta_ce"]
        assert lo <= rep.delta_ce <= hi and lo < hi  # an interval over 6 contexts around the mean
    assert ev.replaced.replacement == "transcoder" and ev.baseline_replaced.replacement == "linear"
    # Replacing both layers is not the same as replacing either alone: the all-at-once run really is joint.
    assert ev.replaced.ce_replaced != pytest.approx(ev.layers[0].ce_spliced, abs=1e-6)


def test_ce_on_a_subset_and_dead_fraction(tiny_model, tokens):
    from backend.dictionaries.eval import evaluate_transcoders

    tc = make_random_transcoder(64, 256, 64, seed=3, l0=8)
    with torch.no_grad():
        tc.b_enc[:100] = -1e4  # these 100 can never fire
    held = tokens[30:36]
    ev = evaluate_transcoders(tiny_model, {1: tc}, held, batch_size=4, ce_contexts=2)
    m = ev.layers[1]
    assert m.ce_tokens == 2 * 31 and m.eval_tokens == int(_non_sink_rows(tiny_model, held).sum())
    assert ev.replaced.ce_tokens == 6 * 31 and ev.baseline_replaced is None and ev.baselines == {}
    with torch.no_grad():
        assert m.ce_clean == pytest.approx(tiny_model(held[:2], return_type="loss").item(), abs=1e-4)
    assert m.dead_fraction >= 100 / 256
    all_fired = torch.ones(256, dtype=torch.bool)
    m2 = evaluate_transcoders(tiny_model, {1: tc}, held, batch_size=4, train_fired={1: all_fired}).layers[1]
    assert m2.dead_fraction == 0.0


# ------------------------------------------------------------------------------------------------------------
# Store round trip, precompute step, imports


def test_step_writes_transcoders_baselines_and_the_replacement_rows(tiny_store):
    from backend.store.access import reading

    with reading(tiny_store) as con:
        df = con.execute("SELECT * FROM dictionaries WHERE kind = 'transcoder' ORDER BY layer").df()
        rep = con.execute("SELECT * FROM replacement_evals ORDER BY replacement").df()
        n_ctx = con.execute("SELECT n_ctx FROM corpora").fetchall()[0][0]
        summary = json.loads(con.execute("SELECT summary FROM runs").fetchall()[0][0])
    assert list(df.layer) == [0, 1]  # the demo preset's transcoder layers = "all"
    arch = "jumprelu_skip_transcoder"
    assert list(df.dict_id) == [transcoder_dict_id("tiny-llama", layer, arch, 256) for layer in (0, 1)]
    for row in df.itertuples():
        assert row.hook_name == hook_name("mlp_in", row.layer) and row.architecture == arch
        assert (row.d_in, row.d_sae) == (64, 256) and row.source == "trained"
        assert 0 < row.training_tokens <= 6 * (n_ctx - 1) and 0 < row.eval_tokens <= 2 * (n_ctx - 1)
        assert 0 < row.l0 <= 64 and row.fve <= 1.0 and 0.0 <= row.dead_fraction <= 1.0
        assert all(math.isfinite(v) and v > 0 for v in (row.ce_clean, row.ce_spliced, row.ce_ablated))
        assert math.isfinite(row.baseline_fve) and math.isfinite(row.baseline_ce_spliced)
        assert row.ce_loss_recovered == pytest.approx((row.ce_ablated - row.ce_spliced) / (row.ce_ablated - row.ce_clean))
        cfg = json.loads(row.cfg)
        assert cfg["architecture"] == arch and cfg["d_out"] == 64 and cfg["apply_b_dec_to_input"] is False
        assert cfg["metadata"]["hook_name_out"] == hook_name("mlp_out", row.layer)
        assert cfg["metadata"]["evaluation"]["baseline"]["fve"] == pytest.approx(row.baseline_fve)
    assert list(rep.replacement) == ["linear", "transcoder"]
    for r in rep.itertuples():
        assert json.loads(r.dict_ids) == list(df.dict_id) and r.n_replaced == 2 and r.ce_tokens == 2 * (n_ctx - 1)
        assert r.ce_loss_recovered == pytest.approx((r.ce_ablated - r.ce_replaced) / (r.ce_ablated - r.ce_clean))
        assert 0.0 <= r.top1 <= 1.0 and r.kl >= 0.0
        stats = json.loads(r.stats)
        assert stats["layers"] == [0, 1] and set(stats["intervals"]) == {"delta_ce", "kl", "top1"}
    assert set(summary["transcoders"]["layers"]) == {"0", "1"} and "transcoders" in summary["step_seconds"]


def test_store_round_trip_gives_identical_outputs(tiny_store, tiny_model, tokens, tmp_path):
    from backend.dictionaries.storage import load_dictionary
    from backend.store.access import StoreWriter, reading

    stored = transcoder_dict_id("tiny-llama", 1, "jumprelu_skip_transcoder", 256)
    with reading(tiny_store) as con:
        loaded = load_transcoders(con, "tiny-llama")
        again = load_dictionary(con, stored)
    assert sorted(loaded) == [0, 1]
    assert loaded[1].cfg.metadata.dict_id == stored
    x, _ = _mlp_io(tiny_model, tokens[:2], 1)
    assert torch.equal(encode(loaded[1], x), encode(again, x))
    # save -> load of a transcoder built here gives bit-identical outputs (skip transcoder: every weight matters).
    from backend.dictionaries.storage import save_dictionary, to_stored_precision

    xs, ys = _mlp_io(tiny_model, tokens[:10], 0)
    tc, _ = train_transcoder((xs, ys), 128, k=8, skip=True)
    to_stored_precision(tc)  # what the transcoder step does before evaluating and saving
    path = tmp_path / "rt.duckdb"
    with StoreWriter(path, kind="test", model="tiny-llama") as w:
        save_dictionary(w, tc, {"dict_id": "rt", "model": "tiny-llama", "kind": "transcoder", "layer": 0,
                                "architecture": "jumprelu_skip_transcoder", "hook_name": hook_name("mlp_in", 0)})
    with reading(path) as con:
        back = load_dictionary(con, "rt")
        assert list(load_transcoders(con, "tiny-llama")) == [0]
    assert type(back).__name__ == "JumpReLUSkipTranscoder" and not back.training
    assert torch.equal(transcode(back, x), transcode(tc, x)) and torch.equal(encode(back, x), encode(tc, x))


def test_load_transcoders_prefers_the_newest_run(tiny_store, tmp_path, tiny_model):
    import shutil

    from backend.dictionaries.storage import save_dictionary
    from backend.store.access import StoreWriter, reading

    path = tmp_path / "two.duckdb"
    shutil.copy(tiny_store, path)
    newer = make_random_transcoder(64, 128, 64, seed=9)
    newer.cfg.metadata.hook_name = hook_name("mlp_in", 1)
    with StoreWriter(path, kind="test", model="tiny-llama") as w:
        save_dictionary(w, newer, {"dict_id": "newer-L1", "model": "tiny-llama", "kind": "transcoder", "layer": 1,
                                   "architecture": "transcoder", "hook_name": hook_name("mlp_in", 1)})
    with reading(path) as con:
        got = load_transcoders(con, "tiny-llama")
    assert got[1].cfg.metadata.dict_id == "newer-L1" and got[1].cfg.d_sae == 128
    assert got[0].cfg.d_sae == 256


def _ctx(tiny_model, writer, layers, tokens=None):
    from backend.inputs import corpus
    from backend.inputs.prompts import model_bos_id
    from backend.model.registry import get_spec
    from backend.pipeline.config import PRESETS
    from backend.pipeline.context import RunContext

    contexts = corpus.tokenize_contexts(corpus.load_documents(corpus.BUILTIN), tiny_model.tokenizer, n_ctx=32,
                                        bos=model_bos_id(tiny_model), max_contexts=8)
    return RunContext(model=tiny_model, spec=get_spec("tiny-llama"), writer=writer, preset=PRESETS["demo"], layers=[],
                      corpus_source="builtin", contexts=contexts, transcoder_layers=layers)


def test_import_a_sae_lens_transcoder_directory(tmp_path, tiny_model):
    from backend.dictionaries.steps import import_transcoder_sources
    from backend.dictionaries.storage import to_stored_precision
    from backend.store.access import StoreWriter, reading

    tc = make_random_transcoder(64, 128, 64, seed=5, l0=6)
    tc.cfg.metadata.hook_name = hook_name("mlp_in", 1)
    tc.cfg.metadata.hook_name_out = hook_name("mlp_out", 1)
    tc.save_model(tmp_path / "tc_dir")  # sae-lens' own writer (inference classes have save_model only)
    with StoreWriter(tmp_path / "imp.duckdb", kind="test", model="tiny-llama") as w:
        ids = import_transcoder_sources(_ctx(tiny_model, w, [0, 1]), [str(tmp_path / "tc_dir")])
        wrong = make_random_transcoder(64, 128, 64, seed=5)
        wrong.cfg.metadata.hook_name = hook_name("mlp_out", 1)  # reads the wrong hook
        wrong.save_model(tmp_path / "wrong_dir")
        with pytest.raises(InputError) as err:
            import_transcoder_sources(_ctx(tiny_model, w, [1]), [str(tmp_path / "wrong_dir")])
        assert "\n" not in str(err.value)
        from backend.dictionaries.attention_sae import make_random_sae

        make_random_sae(64, 128).save_model(tmp_path / "sae_dir")  # an SAE is not a transcoder
        with pytest.raises(InputError):
            import_transcoder_sources(_ctx(tiny_model, w, [1]), [str(tmp_path / "sae_dir")])
    assert ids == [transcoder_dict_id("tiny-llama", 1, "transcoder", 128)]
    with reading(tmp_path / "imp.duckdb") as con:
        row = con.execute("SELECT source, layer, eval_tokens, training_tokens, kind FROM dictionaries").fetchall()
        rep = con.execute("SELECT n_replaced, dict_ids FROM replacement_evals").fetchall()
        back = load_transcoders(con, "tiny-llama")[1]
    assert len(row) == 1 and row[0][0].startswith("local:") and row[0][1] == 1 and row[0][2] == 2 * 31
    assert row[0][3] is None and row[0][4] == "transcoder"
    assert rep == [(1, json.dumps(ids))]
    x = torch.randn(5, 64) * 2
    to_stored_precision(tc)  # an import is stored, and evaluated, at storage precision
    assert torch.equal(encode(back, x), encode(tc, x)) and torch.equal(transcode(back, x), transcode(tc, x))


def test_release_import_errors_are_one_sentence(tiny_model, monkeypatch, tmp_path):
    from backend.dictionaries.steps import import_transcoder_sources
    from backend.dictionaries.storage import release_ids
    from backend.model.registry import hub_reachable

    with pytest.raises(InputError) as err:
        release_ids("no-such-transcoder-release", [0])
    assert "\n" not in str(err.value) and "no-such-transcoder-release" in str(err.value)
    with pytest.raises(InputError):
        release_ids("gemma-scope-2b-pt-transcoders:nope", [0])
    assert release_ids("gemma-scope-2b-pt-transcoders", [3])[0].startswith("layer_3/")
    ctx = _ctx(tiny_model, None, [0])
    with pytest.raises(InputError) as err:
        import_transcoder_sources(ctx, ["no-such-transcoder-release"])
    assert "\n" not in str(err.value)
    if hub_reachable():
        pytest.skip("the hub is reachable here; the offline failure cannot be checked")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelUnavailableError) as err:
        import_transcoder_sources(ctx, ["gemma-scope-2b-pt-transcoders"])
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("Transcoder gemma-scope-2b-pt-transcoders/layer_0/")


def test_cli_transcoder_layers_are_separate_from_layers(tmp_path):
    from backend.cli import main
    from backend.store.access import reading

    store = tmp_path / "cli.duckdb"
    assert main(["precompute", "--model", "tiny-llama", "--store", str(store), "--contexts", "8", "--layers", "1",
                 "--transcoder-layers", "0"]) == 0
    with reading(store) as con:
        kinds = con.execute("SELECT kind, layer FROM dictionaries ORDER BY kind, layer").fetchall()
        rep = con.execute("SELECT n_replaced FROM replacement_evals WHERE replacement = 'transcoder'").fetchall()
    assert kinds == [("attn_sae", 1), ("transcoder", 0)] and rep == [(1,)]


def test_cli_imports_a_transcoder_directory_and_rejects_unknown_releases(tmp_path, capsys):
    from backend.cli import main
    from backend.store.access import reading

    tc = make_random_transcoder(64, 96, 64, seed=7, l0=6)
    tc.cfg.metadata.hook_name = hook_name("mlp_in", 0)
    tc.save_model(tmp_path / "tc0")
    bad = tmp_path / "bad.duckdb"
    assert main(["precompute", "--model", "tiny-llama", "--store", str(bad), "--contexts", "8",
                 "--transcoders", "no-such-transcoder-release"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Unknown sae-lens release") and "\n" not in err and not bad.exists()
    store = tmp_path / "cli.duckdb"
    assert main(["precompute", "--model", "tiny-llama", "--store", str(store), "--contexts", "8",
                 "--transcoders", str(tmp_path / "tc0")]) == 0
    with reading(store) as con:
        rows = con.execute("SELECT layer, d_sae, source FROM dictionaries WHERE kind = 'transcoder'").fetchall()
    assert rows == [(0, 96, f"local:{tmp_path / 'tc0'}")]


# ------------------------------------------------------------------------------------------------------------
# Home page


def test_home_page_lists_transcoders_baselines_and_the_all_replaced_rows(app_stores_dir):
    from pathlib import Path

    from streamlit.testing.v1 import AppTest

    from backend.store.access import reading

    root = Path(__file__).resolve().parents[2]
    at = AppTest.from_file(str(root / "app.py"), default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    with reading(app_stores_dir / "test.duckdb") as con:
        raw = con.execute("SELECT dict_id, ce_spliced - ce_clean, baseline_fve, baseline_ce_spliced - ce_clean "
                          "FROM dictionaries WHERE kind = 'transcoder'").fetchall()
        reps = con.execute("SELECT replacement, ce_replaced - ce_clean, kl, top1 FROM replacement_evals "
                           "ORDER BY replacement DESC").fetchall()
    frames = [df.value for df in at.dataframe]
    shown = next(f for f in frames if "ce_tokens" in f.columns).set_index("dict_id")
    assert sorted(shown.index) == sorted(r[0] for r in raw) and len(raw) == 2
    for dict_id, delta, base_fve, base_delta in raw:
        assert shown.loc[dict_id, "delta_ce"] == pytest.approx(delta)
        assert shown.loc[dict_id, "baseline_fve"] == pytest.approx(base_fve)
        assert shown.loc[dict_id, "baseline_delta_ce"] == pytest.approx(base_delta)
        assert shown.loc[dict_id, "ce_tokens"] == 2 * 127
    # The attention-SAE table stays separate from the transcoder table.
    sae_frame = next(f for f in frames if "kind" in f.columns)
    assert set(sae_frame["kind"]) == {"attn_sae"}
    # One row of metrics for the transcoders, one for the linear baselines, in that order.
    assert [r[0] for r in reps] == ["transcoder", "linear"]
    shown_delta = [m.value for m in at.metric if m.label == "ΔCE (nats)"]
    shown_top1 = [m.value for m in at.metric if m.label == "Top-1 agreement"]
    assert shown_delta == [f"{r[1]:+.3f}" for r in reps] and shown_top1 == [f"{r[3]:.1%}" for r in reps]
    captions = " ".join(c.value for c in at.caption)
    assert "transcoders" in captions and "dense linear baselines" in captions
