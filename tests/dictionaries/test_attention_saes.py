"""The attention-SAE precompute step on the tiny test model (backend.attention_saes)."""

from __future__ import annotations

import math

import pytest
import torch

from backend.dictionaries.attention_sae import dict_id_for, encode_z
from backend.dictionaries.storage import load_dictionary, to_stored_precision
from backend.errors import InputError, ModelUnavailableError
from backend.model.hooks import hook_name


@pytest.fixture(scope="module")
def sae_store(tmp_path_factory, tiny_model):
    from backend.pipeline.run import precompute

    path = tmp_path_factory.mktemp("sae_store") / "s.duckdb"
    precompute("tiny-llama", path, preset="demo", n_contexts=8, layers="0,1", model=tiny_model)
    return path


def test_step_writes_one_valid_row_per_layer(sae_store):
    from backend.store.access import reading

    with reading(sae_store) as con:
        df = con.execute("SELECT * FROM dictionaries WHERE kind = 'attn_sae' ORDER BY layer").df()
        weights = con.execute("SELECT dict_id, format, octet_length(data) FROM dictionary_weights "
                               "WHERE dict_id IN (SELECT dict_id FROM dictionaries WHERE kind = 'attn_sae')").fetchall()
        n_ctx = con.execute("SELECT n_ctx FROM corpora").fetchall()[0][0]
        sae = load_dictionary(con, df.dict_id[1])
        summary = con.execute("SELECT summary FROM runs").fetchall()[0][0]
    assert list(df.layer) == [0, 1]
    assert list(df.dict_id) == [dict_id_for("tiny-llama", layer, "topk", 256) for layer in (0, 1)]
    assert {w[0] for w in weights} == set(df.dict_id) and all(w[1] == "safetensors" and w[2] > 0 for w in weights)
    for row in df.itertuples():
        assert row.kind == "attn_sae" and row.architecture == "topk" and row.hook_name == hook_name("z", row.layer)
        assert (row.d_in, row.d_sae) == (64, 256)
        assert row.training_tokens == 6 * (n_ctx - 1)  # 8 contexts: 6 trained on, the last 2 held out
        assert row.eval_tokens == 2 * (n_ctx - 1)
        assert 0 < row.l0 <= 32
        assert row.fve <= 1.0 and 0.0 <= row.dead_fraction <= 1.0
        assert all(math.isfinite(v) and v > 0 for v in (row.ce_clean, row.ce_spliced, row.ce_ablated))
        expected = (row.ce_ablated - row.ce_spliced) / (row.ce_ablated - row.ce_clean)
        assert row.ce_loss_recovered == pytest.approx(expected)
        assert row.source == "trained" and '"training"' in row.cfg
    assert sae.cfg.d_in == 64 and not sae.training
    assert '"attention_saes"' in summary


def test_rerun_replaces_dictionaries(sae_store, tmp_path, tiny_model):
    import shutil

    from backend.pipeline.run import precompute
    from backend.store.access import reading

    path = tmp_path / "again.duckdb"
    shutil.copy(sae_store, path)
    precompute("tiny-llama", path, preset="demo", n_contexts=8, layers="1", model=tiny_model)
    with reading(path) as con:
        rows = con.execute("SELECT dict_id, count(*) FROM dictionaries GROUP BY dict_id ORDER BY dict_id").fetchall()
        n_weights = con.execute("SELECT count(*) FROM dictionary_weights").fetchall()[0][0]
        runs = con.execute("SELECT count(*) FROM runs").fetchall()[0][0]
    assert runs == 2 and n_weights == len(rows)
    assert all(count == 1 for _, count in rows)


def test_trained_sae_reconstructs_better_than_random(sae_store, tiny_model):
    """The stored SAE was trained: its FVE on the held-out tokens beats a random SAE of the same shape."""
    from backend.dictionaries.attention_sae import make_random_sae
    from backend.dictionaries.eval import reconstruction_stats
    from backend.model.activations import collect_z
    from backend.store.access import reading

    with reading(sae_store) as con:
        sae = load_dictionary(con, dict_id_for("tiny-llama", 1, "topk", 256))
        toks = con.execute("SELECT token_id FROM tokens WHERE context_id >= 6 ORDER BY context_id, pos").fetchall()
    tokens = torch.tensor([t[0] for t in toks]).reshape(2, -1)
    acts = collect_z(tiny_model, tokens, [1])[1]
    trained = reconstruction_stats(sae, acts)["fve"]
    random = reconstruction_stats(make_random_sae(64, 256, k=32, seed=0), acts)["fve"]
    assert trained > random
    assert encode_z(sae, acts[:5]).shape == (5, 256)


def test_import_pretrained_offline_is_one_sentence(tiny_model, monkeypatch, tmp_path):
    from backend.dictionaries.steps import import_pretrained
    from backend.model.registry import get_spec, hub_reachable
    from backend.pipeline.config import PRESETS
    from backend.pipeline.context import RunContext

    if hub_reachable():
        pytest.skip("the hub is reachable here; this test checks the offline failure")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    ctx = RunContext(model=tiny_model, spec=get_spec("tiny-llama"), writer=None, preset=PRESETS["demo"],
                     layers=[0], corpus_source="builtin")
    with pytest.raises(InputError):  # no corpus yet
        import_pretrained(ctx, "gpt2-small-hook-z-kk", ["blocks.5.hook_z"])
    ctx.contexts = object()
    with pytest.raises(ModelUnavailableError) as err:
        import_pretrained(ctx, "gpt2-small-hook-z-kk", ["blocks.5.hook_z"])
    assert "\n" not in str(err.value)


def test_import_local_sae_directory_into_a_store(tmp_path, tiny_model):
    """A sae-lens directory (here a random hook_z SAE for layer 1) is evaluated and stored like a trained one."""
    from backend.dictionaries.attention_sae import make_random_sae
    from backend.dictionaries.steps import import_local
    from backend.inputs import corpus
    from backend.inputs.prompts import model_bos_id
    from backend.model.registry import get_spec
    from backend.pipeline.config import PRESETS
    from backend.pipeline.context import RunContext
    from backend.store.access import StoreWriter, reading

    sae = make_random_sae(64, 128, k=4, seed=0)
    sae.cfg.metadata.hook_name = hook_name("z", 1)
    sae.save_model(tmp_path / "sae_dir")
    contexts = corpus.tokenize_contexts(corpus.load_documents(corpus.BUILTIN), tiny_model.tokenizer, n_ctx=32,
                                        bos=model_bos_id(tiny_model), max_contexts=8)
    with StoreWriter(tmp_path / "imp.duckdb", kind="test", model="tiny-llama") as w:
        ctx = RunContext(model=tiny_model, spec=get_spec("tiny-llama"), writer=w, preset=PRESETS["demo"],
                         layers=[1], corpus_source="builtin", contexts=contexts)
        ids = import_local(ctx, [str(tmp_path / "sae_dir")])
        bad = make_random_sae(64, 128, k=4)  # no hook name: which layer it reads is unknown
        bad.save_model(tmp_path / "bad_dir")
        with pytest.raises(InputError):
            import_local(ctx, [str(tmp_path / "bad_dir")])
    assert ids == [dict_id_for("tiny-llama", 1, "topk", 128)]
    with reading(tmp_path / "imp.duckdb") as con:
        row = con.execute("SELECT source, layer, eval_tokens, l0, training_tokens FROM dictionaries").fetchall()[0]
        loaded = load_dictionary(con, ids[0])
    assert row[0].startswith("local:") and row[1] == 1 and row[2] == 2 * 31 and row[3] == pytest.approx(4.0)
    assert row[4] is None
    x = torch.randn(3, 64)
    to_stored_precision(sae)  # an import is stored, and evaluated, at storage precision
    assert torch.equal(encode_z(loaded, x), encode_z(sae, x))
