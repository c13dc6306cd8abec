"""Attention-SAE API (backend.dictionaries): encoding conventions, pre-activations, storage, training, loading."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from backend.dictionaries.attention_sae import (
    dict_id_for,
    encode_z,
    flatten_z,
    init_training_sae,
    make_random_sae,
    preactivation,
    reconstruct,
    to_inference,
    train_attention_sae,
)
from backend.dictionaries.storage import (
    load_dictionary,
    load_local,
    load_pretrained,
    save_dictionary,
    to_stored_precision,
)
from backend.errors import InputError, ModelUnavailableError, StoreError
from backend.model.activations import collect_z, shuffled_batches
from backend.model.hooks import hook_name


@pytest.fixture(scope="module")
def tiny_tokens(tiny_model):
    from backend.inputs import corpus
    from backend.inputs.prompts import model_bos_id

    docs = corpus.load_documents(corpus.BUILTIN)
    return corpus.tokenize_contexts(docs, tiny_model.tokenizer, n_ctx=32, bos=model_bos_id(tiny_model),
                                    max_contexts=64).tokens


@pytest.fixture(scope="module")
def tiny_acts(tiny_model, tiny_tokens):
    return collect_z(tiny_model, tiny_tokens, [0, 1], batch_size=16)


def test_collect_z_matches_run_with_cache_and_drops_bos(tiny_model, tiny_tokens, tiny_acts):
    batch = tiny_tokens[:3]
    _, cache = tiny_model.run_with_cache(batch, names_filter=lambda n: n.endswith("hook_z"))
    z = cache[hook_name("z", 1)]  # [3, 32, 4, 16]
    n_ctx = batch.shape[1]
    expected = z[:, 1:].reshape(3 * (n_ctx - 1), -1)
    torch.testing.assert_close(tiny_acts[1][: 3 * (n_ctx - 1)], expected, rtol=1e-5, atol=1e-6)
    # head-major: head 2 of context 0, position 5 is the slice [32:48] of its row
    torch.testing.assert_close(tiny_acts[1][4, 32:48], z[0, 5, 2])
    assert tiny_acts[0].shape == (tiny_tokens.shape[0] * (n_ctx - 1), 64)


def test_shuffled_batches_cover_every_row_once_per_epoch():
    acts = torch.arange(40, dtype=torch.float32)[:, None]
    batches = list(shuffled_batches(acts, 8, seed=1, epochs=2))
    assert len(batches) == 10 and all(b.shape == (8, 1) for b in batches)
    assert sorted(torch.cat(batches[:5]).flatten().tolist()) == list(range(40))
    assert torch.cat(batches[:5]).flatten().tolist() != torch.cat(batches[5:]).flatten().tolist()  # reshuffled


def test_encode_z_unflattened_equals_flattened(tiny_acts):
    sae = make_random_sae(64, 256, k=8, seed=3)
    x = tiny_acts[1][:50]
    z = x.reshape(50, 4, 16)
    torch.testing.assert_close(encode_z(sae, z), encode_z(sae, x))
    assert torch.equal(flatten_z(z), x)
    # an SAE whose cfg asks sae-lens to reshape hook_z itself gives the same features for both inputs
    from sae_lens import TopKSAE, TopKSAEConfig

    zsae = TopKSAE(TopKSAEConfig(d_in=64, d_sae=256, k=8, reshape_activations="hook_z"))
    zsae.load_state_dict(sae.state_dict())
    torch.testing.assert_close(encode_z(zsae, z), encode_z(sae, x))
    torch.testing.assert_close(encode_z(zsae, x), encode_z(sae, x))


def test_make_random_sae_fires_on_real_activations(tiny_acts):
    sae = make_random_sae(64, 256, k=8, seed=0)
    f = encode_z(sae, tiny_acts[0][:500])
    assert ((f > 0).sum(-1) == 8).all()  # k positive features on every token
    assert (f > 0).any(0).sum() > 100  # and many different features overall
    assert f[f > 0].std() > 0


def test_preactivation_is_the_per_head_sum(tiny_acts):
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=96))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    x = tiny_acts[1][:20]
    # independent: per-head terms W_enc[slice_h]^T (x_h - b_dec_h), summed, plus b_enc (explicit loops)
    expected = torch.zeros(20, 96)
    for t in range(20):
        for h in range(4):
            sl = slice(h * 16, (h + 1) * 16)
            for i in range(96):
                expected[t, i] += float(((x[t, sl] - sae.b_dec[sl]) * sae.W_enc[sl, i]).sum().detach())
        expected[t] += sae.b_enc.detach()
    torch.testing.assert_close(preactivation(sae, x), expected, rtol=1e-4, atol=1e-4)
    # and it is what sae-lens itself computes before the activation function
    _, cache = sae.run_with_cache(x)
    torch.testing.assert_close(preactivation(sae, x), cache["hook_sae_acts_pre"], rtol=1e-5, atol=1e-5)


def test_dict_id_format():
    assert dict_id_for("smollm2-135m", 8, "topk", 2304) == "smollm2-135m/L8/attn_z/topk-2304"


def _writer(path: Path):
    from backend.store.access import StoreWriter

    return StoreWriter(path, kind="test", model="tiny-llama")


def test_save_load_round_trip_identical_outputs(tmp_path, tiny_acts):
    from backend.store.access import reading

    sae = make_random_sae(64, 256, k=8, seed=5)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    to_stored_precision(sae)  # what every step does before it evaluates a dictionary it will save
    did = dict_id_for("tiny-llama", 1, "topk", 256)
    with _writer(tmp_path / "s.duckdb") as w:
        save_dictionary(w, sae, {"dict_id": did, "model": "tiny-llama", "architecture": "topk", "layer": 1,
                                 "hook_name": hook_name("z", 1), "l0": 8.0, "fve": 0.5})
        save_dictionary(w, sae, {"dict_id": did, "model": "tiny-llama", "architecture": "topk", "layer": 1})
    with reading(tmp_path / "s.duckdb") as con:
        assert con.execute("SELECT count(*) FROM dictionaries").fetchall()[0][0] == 1  # replaced, not duplicated
        row = con.execute("SELECT kind, d_in, d_sae, format FROM dictionaries JOIN dictionary_weights USING (dict_id)").fetchall()
        assert row == [("attn_sae", 64, 256, "safetensors")]
        loaded = load_dictionary(con, did)
        with pytest.raises(StoreError):
            load_dictionary(con, "nope")
    x = tiny_acts[1][:100]
    assert type(loaded) is type(sae) and loaded.cfg.k == 8
    assert torch.equal(encode_z(loaded, x), encode_z(sae, x))
    assert torch.equal(reconstruct(loaded, x), reconstruct(sae, x))


def test_weights_read_once_from_the_store_are_loaded_from_the_cache_file_after(tmp_path, monkeypatch):
    """The first load writes the blob to the weights cache; later loads read that file (the store's blob is not
    read: shown by replacing the cache file's tensors); a rewrite by a new run gets a new file; a corrupt file is
    read again from the store."""
    from safetensors.torch import save_file

    from backend.dictionaries import storage
    from backend.dictionaries.transcoder import make_random_transcoder
    from backend.store.access import reading

    monkeypatch.setattr(storage, "WEIGHTS_CACHE", tmp_path / "cache")
    tc = make_random_transcoder(64, 128, 64, seed=3, architecture="skip_transcoder")
    with torch.no_grad():
        tc.W_skip.normal_()
    to_stored_precision(tc)
    row = {"dict_id": "tiny-llama/L0/mlp/skip_transcoder-128", "model": "tiny-llama", "kind": "transcoder",
           "architecture": "skip_transcoder", "layer": 0}
    with _writer(tmp_path / "s.duckdb") as w:
        save_dictionary(w, tc, row)
    with reading(tmp_path / "s.duckdb") as con:
        first = load_dictionary(con, row["dict_id"])
    files = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 1 and type(first).__name__ == "SkipTranscoder"
    assert all(torch.equal(first.state_dict()[k], v) for k, v in tc.state_dict().items())
    assert all(p.device.type == "cpu" for p in first.parameters())
    marked = {k: v.clone() for k, v in tc.state_dict().items()}
    marked["b_dec"] = torch.full_like(marked["b_dec"], 7.0)
    save_file(marked, str(files[0]))
    with reading(tmp_path / "s.duckdb") as con:
        assert torch.equal(load_dictionary(con, row["dict_id"]).b_dec, marked["b_dec"])  # from the file
    files[0].write_bytes(b"not safetensors")
    with reading(tmp_path / "s.duckdb") as con:
        assert torch.equal(load_dictionary(con, row["dict_id"]).b_dec, tc.b_dec.detach())  # back to the store
    with _writer(tmp_path / "s.duckdb") as w:  # a new run rewrites it: a new cache file
        save_dictionary(w, tc, row)
    with reading(tmp_path / "s.duckdb") as con:
        load_dictionary(con, row["dict_id"])
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2


def test_training_reduces_reconstruction_error(tiny_acts):
    acts = tiny_acts[1]
    train, held = acts[:1500], acts[1500:]

    def mse(s):
        return float(((reconstruct(s, held) - held) ** 2).sum(-1).mean())

    # the untrained starting point, built exactly as train_attention_sae builds it
    before = mse(to_inference(init_training_sae(train, d_sae=256, k=8)))
    trained, info = train_attention_sae(train, d_sae=256, k=8, lr=5e-3, batch_size=128, epochs=30.0)
    assert info["steps"] >= 300 and info["samples_per_second"] > 0
    after = mse(trained)
    variance = float(((held - held.mean(0)) ** 2).sum(-1).mean())
    assert after < 0.5 * before, (before, after)
    assert after < 0.5 * variance  # FVE > 0.5 on held-out tokens
    assert not trained.training and trained.cfg.metadata["training"]["training_tokens"] == 1500


def test_other_architectures_train_by_name(tiny_acts):
    sae, _ = train_attention_sae(tiny_acts[0][:512], d_sae=128, architecture="standard", batch_size=128,
                                 epochs=1.0, l1_coefficient=1.0)
    assert sae.cfg.architecture() == "standard"
    with pytest.raises(InputError):
        train_attention_sae(tiny_acts[0][:512], d_sae=128, architecture="nonsense")


def test_local_directory_round_trip_and_bad_path(tmp_path, tiny_acts):
    sae = make_random_sae(64, 128, k=4, seed=2)
    sae.save_model(tmp_path / "sae")
    loaded = load_local(tmp_path / "sae")
    x = tiny_acts[0][:10]
    assert torch.equal(encode_z(loaded, x), encode_z(sae, x))
    with pytest.raises(InputError) as err:
        load_local(tmp_path / "missing")
    assert "\n" not in str(err.value)


def test_pretrained_release_offline_is_one_sentence_without_retries(monkeypatch, tmp_path):
    from backend.model.registry import hub_reachable

    if hub_reachable():
        pytest.skip("the hub is reachable here; this test checks the offline failure")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelUnavailableError) as err:
        load_pretrained("gpt2-small-hook-z-kk", "blocks.5.hook_z")
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # switched offline after one probe: nothing retries for minutes
    msg = str(err.value)
    assert "\n" not in msg and "gpt2-small-hook-z-kk" in msg and "Traceback" not in msg
    with pytest.raises(InputError):
        load_pretrained("no-such-release", "x")
    with pytest.raises(InputError):
        load_pretrained("gpt2-small-hook-z-kk", "blocks.99.hook_z")


def test_weights_are_stored_in_half_precision_and_load_back_as_float32(tmp_path):
    """The blob holds float16 tensors (half the bytes); loading gives float32 values equal to the float16 rounding
    of what was saved, which is what to_stored_precision makes the in-memory dictionary before it is evaluated."""
    from safetensors.torch import load

    from backend.store.access import reading

    sae = make_random_sae(64, 256, k=8, seed=6)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.W_enc.mul_(1.0 + 1e-4)  # values float16 cannot hold exactly
    original = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    did = dict_id_for("tiny-llama", 1, "topk", 256)
    with _writer(tmp_path / "s.duckdb") as w:
        save_dictionary(w, sae, {"dict_id": did, "model": "tiny-llama", "architecture": "topk", "layer": 1})
    with reading(tmp_path / "s.duckdb") as con:
        blob = con.execute("SELECT data FROM dictionary_weights").fetchall()[0][0]
        loaded = load_dictionary(con, did)
    assert {v.dtype for v in load(blob).values()} == {torch.float16}
    for name, value in loaded.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, original[name].half().float()), name  # independent rounding, written here
    assert not torch.equal(loaded.W_enc, original["W_enc"])  # the rounding is real, so the test can fail
    rounded = to_stored_precision(make_random_sae(64, 256, k=8, seed=6))
    with torch.no_grad():
        rounded.W_enc.copy_(original["W_enc"].half().float())
    assert torch.equal(rounded.W_enc, loaded.W_enc)
