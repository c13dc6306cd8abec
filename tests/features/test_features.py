"""Per-feature precompute (backend/features.py) and its queries (backend/feature_queries.py), each checked against an
independent computation: sae-lens' own pre-activation, a dense brute-force pass over the corpus, and the model's own
attention-output / final-norm / unembedding modules.

``feature_store`` (defined here, also used by tests/features/test_feature_browser.py) is a copy of the tiny-llama test store
with a random sae-lens TopK SAE on layer 1's hook_z (4 heads x 16 -> 64 -> 96 features, k 6) and its feature tables.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from backend.features import logits as feature_logits
from backend.features import queries as feature_queries
from backend.features import step as features
from backend.model.hooks import hook_name
from backend.store import queries
from backend.store.access import StoreWriter, reading

LAYER = 1
D_SAE = 96
K = 6
DICT_ID = "tiny-llama/L1/attn_z/topk-96"


def random_topk_sae(d_in: int, d_sae: int, k: int, seed: int, apply_b_dec: bool = True) -> Any:
    """A random sae-lens TopK SAE with nonzero biases (so the b_dec / b_enc terms are exercised)."""
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, apply_b_dec_to_input=apply_b_dec))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.1)
    return sae.eval()


def build_feature_store(src: Path, dst: Path, model: Any, sae: Any, batch_size: int = 3) -> dict[str, Any]:
    """Copy the store at ``src`` to ``dst`` and add one attention-SAE dictionary row plus its feature tables."""
    shutil.copy(src, dst)
    with StoreWriter(dst, kind="test-features", model="tiny-llama") as w:
        corpus_id, = w.con.execute("SELECT corpus_id FROM corpora LIMIT 1").fetchall()[0]
        w.con.execute(
            "INSERT INTO dictionaries (dict_id, model, kind, architecture, hook_name, layer, d_in, d_sae, source, run_id) "
            "VALUES (?, 'tiny-llama', 'attn_sae', 'topk', ?, ?, ?, ?, 'random (test)', ?)",
            [DICT_ID, hook_name("z", LAYER), LAYER, sae.cfg.d_in, sae.cfg.d_sae, w.run_id])
        tok = w.con.execute("SELECT context_id, pos, token_id FROM tokens WHERE corpus_id = ? ORDER BY context_id, pos",
                            [corpus_id]).df()
        n_ctx = int(tok["pos"].max()) + 1
        tokens = torch.tensor(tok["token_id"].to_numpy().reshape(-1, n_ctx), dtype=torch.long)
        info = features.build_features(w, model, [features.DictEntry(DICT_ID, LAYER, sae)], tokens, corpus_id,
                                       batch_size=batch_size)
    return {"tokens": tokens, "corpus_id": corpus_id, "info": info}


@pytest.fixture(scope="session")
def feature_sae(tiny_model: Any) -> Any:
    cfg = tiny_model.cfg
    return random_topk_sae(cfg.n_heads * cfg.d_head, D_SAE, K, seed=0)


@pytest.fixture(scope="session")
def feature_store(tmp_path_factory: pytest.TempPathFactory, tiny_store: Path, tiny_model: Any,
                  feature_sae: Any) -> dict[str, Any]:
    """{"path", "tokens", "corpus_id", "info"} of a store with feature tables for one random SAE (do not modify)."""
    path = tmp_path_factory.mktemp("feature_store") / "features.duckdb"
    built = build_feature_store(tiny_store, path, tiny_model, feature_sae)
    return {"path": path, **built}


@pytest.fixture(scope="session")
def dense_acts(feature_store: dict[str, Any], tiny_model: Any, feature_sae: Any) -> np.ndarray:
    """Brute force: every activation [n, n_ctx, d_sae] by a plain cached forward + sae-lens encode (BOS row kept)."""
    _, cache = tiny_model.run_with_cache(feature_store["tokens"], names_filter=hook_name("z", LAYER))
    z = cache[hook_name("z", LAYER)]
    with torch.no_grad():
        return feature_sae.encode(z.reshape(*z.shape[:2], -1)).numpy()


# ------------------------------------------------------------------------------------------------------------------
# Math


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_dfa_by_head_sums_to_sae_lens_preactivation(tiny_model: Any, apply_b_dec: bool) -> None:
    cfg = tiny_model.cfg
    sae = random_topk_sae(cfg.n_heads * cfg.d_head, 32, 4, seed=1, apply_b_dec=apply_b_dec)
    tokens = torch.randint(10, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    _, cache = tiny_model.run_with_cache(tokens, names_filter=hook_name("z", LAYER))
    x = cache[hook_name("z", LAYER)].reshape(14, -1)
    with torch.no_grad():
        _, sae_cache = sae.run_with_cache(x)
    pre = sae_cache["hook_sae_acts_pre"]  # sae-lens' own pre-activation [14, 32]
    tok = torch.arange(14).repeat_interleave(32)
    feat = torch.arange(32).repeat(14)
    contrib = features.head_contributions(sae, x[tok], feat, cfg.n_heads)
    assert contrib.shape == (14 * 32, cfg.n_heads)
    expected = (pre - sae.b_enc).reshape(-1)
    torch.testing.assert_close(contrib.sum(-1), expected, atol=1e-5, rtol=1e-4)
    # each head's term depends on that head's slice only: zeroing head 2's z changes column 2 and no other
    # (apart from the b_dec term, which stays with its head)
    x2 = x.clone()
    x2[:, 2 * cfg.d_head : 3 * cfg.d_head] = 0
    contrib2 = features.head_contributions(sae, x2[tok], feat, cfg.n_heads)
    torch.testing.assert_close(contrib2[:, [0, 1, 3]], contrib[:, [0, 1, 3]])
    assert not torch.allclose(contrib2[:, 2], contrib[:, 2])


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gpt2"])
def test_logit_effects_match_the_models_own_modules(model_name: str, tiny_model: Any) -> None:
    from backend.model.registry import load_model

    model = tiny_model if model_name == "tiny-llama" else load_model(model_name)
    cfg = model.cfg
    sae = random_topk_sae(cfg.n_heads * cfg.d_head, 16, 4, seed=2)
    feats = torch.tensor([0, 5, 11])
    ours = feature_logits.feature_logit_effects(model, sae, LAYER, feats)

    # Independent: put the decoder direction into hook_z at the last position (vs zeros) and read the block's
    # attention output, then the final norm with its scale hooked to 1, then the model's own unembed.
    tokens = torch.tensor([[1, 2]])
    directions = []
    for f in feats.tolist():
        outs = []
        for vec in (sae.W_dec[f].detach(), torch.zeros(cfg.n_heads * cfg.d_head)):
            def put(z: torch.Tensor, hook: Any, vec: torch.Tensor = vec) -> torch.Tensor:
                z = z.clone()
                z[:, -1] = vec.reshape(cfg.n_heads, cfg.d_head)
                return z
            store: dict[str, torch.Tensor] = {}

            def grab(t: torch.Tensor, hook: Any) -> None:
                store["out"] = t[0, -1].detach().clone()
            model.run_with_hooks(tokens, fwd_hooks=[(hook_name("z", LAYER), put),
                                                    (hook_name("attn_out", LAYER), grab)])
            outs.append(store["out"])
        directions.append(outs[0] - outs[1])
    d = torch.stack(directions)
    model.ln_final.hook_scale.add_hook(lambda t, hook: torch.ones_like(t))
    try:
        with torch.no_grad():
            indep = model.unembed(model.ln_final(d[None]))[0] - model.unembed(model.ln_final(torch.zeros_like(d)[None]))[0]
    finally:
        model.ln_final.hook_scale.remove_hooks()
    torch.testing.assert_close(ours, indep, atol=1e-4, rtol=1e-3)

    # one block of all 16 features, then blocks of 3 (the last one short)
    for max_bytes in (feature_logits.EFFECT_BYTES, 3 * cfg.d_vocab * model.W_U.element_size()):
        table = feature_logits.top_logits(model, sae, LAYER, k=5, max_bytes=max_bytes)
        assert sorted(table.feature.unique().tolist()) == list(range(16)) and len(table) == 16 * 2 * 5
        for f in feats.tolist():
            promoted = table[(table.feature == f) & (table.kind == "promoted")].sort_values("rank")
            suppressed = table[(table.feature == f) & (table.kind == "suppressed")].sort_values("rank")
            want = indep[feats.tolist().index(f)]
            assert promoted["token_id"].tolist() == want.topk(5).indices.tolist()
            assert suppressed["token_id"].tolist() == want.topk(5, largest=False).indices.tolist()
            np.testing.assert_allclose(promoted["value"], want.topk(5).values.numpy(), rtol=1e-3, atol=1e-4)
            np.testing.assert_allclose(suppressed["value"], want.topk(5, largest=False).values.numpy(),
                                       rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------------
# The stored tables against a brute-force pass


def test_activations_are_exactly_the_nonzeros_without_bos(feature_store: dict[str, Any], dense_acts: np.ndarray) -> None:
    with reading(feature_store["path"]) as con:
        stored = con.execute("SELECT context_id, pos, feature, act FROM feature_activations WHERE dict_id = ?",
                             [DICT_ID]).df()
    assert len(stored) and (stored["pos"] > 0).all() and (stored["act"] > 0).all()
    c, p, f = np.nonzero(dense_acts[:, 1:] > 0)
    assert len(stored) == len(c) == feature_store["info"]["nonzeros"][DICT_ID]
    got = dense_acts[stored["context_id"], stored["pos"], stored["feature"]]
    np.testing.assert_allclose(stored["act"], got, rtol=1e-5, atol=1e-6)
    assert len(set(zip(stored["context_id"], stored["pos"], stored["feature"]))) == len(stored)


def distinct_top(acts: np.ndarray, k: int, span: int = feature_queries.WINDOW_BEFORE + feature_queries.WINDOW_AFTER,
                 candidates: int = feature_queries.TOP_CANDIDATES) -> list[tuple[float, int, int]]:
    """Independent reference for the distinct top examples: of the ``candidates`` largest activations of
    ``acts`` [context, pos] (BOS excluded; ties by context, pos), those with no better-ranked candidate in the same
    context within ``span`` positions, the first ``k``: (act, context, pos)."""
    ctx, pos = np.nonzero(acts[:, 1:] > 0)
    pos = pos + 1
    order = sorted(zip(-acts[ctx, pos], ctx, pos))[:candidates]
    kept = [(float(-a), int(c), int(p)) for i, (a, c, p) in enumerate(order)
            if not any(c2 == c and abs(p2 - p) <= span for _, c2, p2 in order[:i])]
    return kept[:k]


def test_feature_stats_and_top_examples_are_the_maxima(feature_store: dict[str, Any], dense_acts: np.ndarray) -> None:
    scored = dense_acts[:, 1:].reshape(-1, D_SAE)  # BOS excluded from statistics
    with reading(feature_store["path"]) as con:
        feats = feature_queries.features_by_layer(con, DICT_ID, "max_act", 1000)
        assert len(feats) == int((scored > 0).any(0).sum())
        for f in [int(feats["feature"].iloc[0]), int(feats["feature"].iloc[len(feats) // 2]),
                  int(feats["feature"].iloc[-1])]:
            s = feature_queries.feature_summary(con, DICT_ID, f)
            col = scored[:, f]
            assert s["n_active"] == int((col > 0).sum())
            assert s["density"] == pytest.approx((col > 0).mean())
            assert s["max_act"] == pytest.approx(col.max(), rel=1e-5)
            assert s["mean_act"] == pytest.approx(col[col > 0].mean(), rel=1e-4)
            top = feature_queries.feature_top_examples(con, DICT_ID, f, k=5)
            want = distinct_top(dense_acts[:, :, f], 5)
            np.testing.assert_allclose(top["act"].to_numpy(), [a for a, _, _ in want], rtol=1e-5)
            assert list(zip(top["context_id"], top["pos"])) == [(c, p) for _, c, p in want]
            for _, row in top.iterrows():
                # the window's activation list holds the feature's activation at every shown token
                full = dense_acts[int(row["context_id"]), :, f]
                for pos, a in zip(row["positions"], row["acts"]):
                    if pos == 0:
                        assert np.isnan(a)
                    else:
                        assert a == pytest.approx(full[pos], rel=1e-5, abs=1e-7)
                assert int(row["pos"]) in list(row["positions"])
        assert feature_queries.feature_summary(con, DICT_ID, D_SAE) is None


def test_histogram_counts_sum_to_nonzeros(feature_store: dict[str, Any], dense_acts: np.ndarray) -> None:
    with reading(feature_store["path"]) as con:
        total = con.execute("SELECT sum(count) FROM feature_histograms WHERE dict_id = ?", [DICT_ID]).fetchall()[0][0]
        assert total == feature_store["info"]["nonzeros"][DICT_ID]
        f = int(feature_queries.features_by_layer(con, DICT_ID, "density", 1)["feature"].iloc[0])
        hist = feature_queries.feature_histogram(con, DICT_ID, f)
    col = dense_acts[:, 1:, f].reshape(-1)
    col = col[col > 0]
    assert hist["count"].sum() == len(col)
    assert hist["lo"].iloc[0] == pytest.approx(col.min(), rel=1e-4)
    assert hist["hi"].iloc[-1] == pytest.approx(col.max(), rel=1e-4)
    ratios = (hist["hi"] / hist["lo"]).to_numpy()
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-3)  # log-spaced: equal ratios
    # each bin's count is the number of activations in [lo, hi)
    for _, b in hist.iterrows():
        inside = ((col >= b["lo"] * (1 - 1e-5)) & (col < b["hi"] * (1 - 1e-5))).sum()
        assert abs(int(inside) - int(b["count"])) <= 1  # float edges: at most the boundary value moves


def test_stored_dfa_matches_recomputation_over_top_examples(feature_store: dict[str, Any], tiny_model: Any,
                                                            feature_sae: Any) -> None:
    with reading(feature_store["path"]) as con:
        f = int(feature_queries.features_by_layer(con, DICT_ID, "density", 1)["feature"].iloc[0])
        dfa = feature_queries.feature_head_dfa(con, DICT_ID, f)
        top = con.execute("SELECT context_id, pos FROM feature_examples WHERE dict_id = ? AND feature = ? "
                          "ORDER BY rank", [DICT_ID, f]).df()  # the stored top activations the DFA averages over
        summary = feature_queries.feature_summary(con, DICT_ID, f)
    _, cache = tiny_model.run_with_cache(feature_store["tokens"], names_filter=hook_name("z", LAYER))
    z = cache[hook_name("z", LAYER)]
    x = z[torch.tensor(top["context_id"].to_numpy().astype(np.int64)),
          torch.tensor(top["pos"].to_numpy().astype(np.int64))].reshape(len(top), -1)
    with torch.no_grad():
        _, sae_cache = feature_sae.run_with_cache(x)
    pre = (sae_cache["hook_sae_acts_pre"][:, f] - feature_sae.b_enc[f]).detach()
    assert dfa["contribution"].sum() == pytest.approx(float(pre.mean()), rel=1e-4, abs=1e-5)
    assert dfa["share"].sum() == pytest.approx(1.0, rel=1e-5)
    assert summary["top_head"] == int(dfa["contribution"].abs().idxmax())
    assert summary["top_head_share"] == pytest.approx(float(dfa["share"].max()), rel=1e-5)
    assert (dfa["n_examples"] == len(top)).all()


def test_feature_lists_by_head_and_token(feature_store: dict[str, Any]) -> None:
    with reading(feature_store["path"]) as con:
        dicts = feature_queries.feature_dictionaries(con).set_index("dict_id")
        assert int(dicts.loc[DICT_ID, "n_features"]) == D_SAE and int(dicts.loc[DICT_ID, "n_heads"]) == 4
        alive = con.execute("SELECT count(DISTINCT feature) FROM feature_activations WHERE dict_id = ?",
                            [DICT_ID]).fetchall()[0][0]
        assert int(dicts.loc[DICT_ID, "n_alive"]) == alive > 0
        assert int(dicts.loc[DICT_ID, "scored_tokens"]) == feature_store["info"]["scored_tokens"]
        by_head = feature_queries.features_by_head(con, DICT_ID, 0)
        assert len(by_head) and (by_head["top_head"] == 0).all()
        s = feature_queries.feature_summary(con, DICT_ID, int(by_head["feature"].iloc[0]))
        assert s["top_head"] == 0
        # the token at feature f's strongest example must find f by its text
        f = int(feature_queries.features_by_layer(con, DICT_ID, "max_act", 1)["feature"].iloc[0])
        top = feature_queries.feature_top_examples(con, DICT_ID, f, k=1).iloc[0]
        token = list(top["tokens"])[list(top["positions"]).index(int(top["pos"]))]
        needle = token.strip() or token
        found = feature_queries.features_by_token(con, DICT_ID, needle.upper())
        assert f in set(found["feature"])
        assert feature_queries.features_by_token(con, DICT_ID, "no token contains this \u2603\u2603").empty
        quant = feature_queries.feature_quantile_examples(con, DICT_ID, f, n_intervals=4, per_interval=2)
        mx = s_max = feature_queries.feature_summary(con, DICT_ID, f)["max_act"]
        assert len(quant) and (quant.groupby("interval").size() <= 2).all()
        for _, row in quant.iterrows():  # each example lies in its interval of (0, max]
            assert row["interval"] * mx / 4 - 1e-5 <= row["act"] <= (row["interval"] + 1) * s_max / 4 + 1e-5
        logits = feature_queries.feature_logits(con, DICT_ID, f)
        assert sorted(set(logits["kind"])) == ["promoted", "suppressed"]
        assert (logits[logits.kind == "promoted"]["value"].diff().dropna() <= 0).all()


# ------------------------------------------------------------------------------------------------------------------
# The step inside the real precompute pipeline (with trained SAEs and load_dictionary)


def test_step_features_runs_after_the_sae_step(tmp_path: Path, tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from backend.dictionaries.attention_sae import encode_z
    from backend.dictionaries.storage import load_dictionary
    from backend.pipeline import run as pc

    if not any(fn is features.step_features for _, fn in pc.STEPS):
        monkeypatch.setattr(pc, "STEPS", [*pc.STEPS, ("features", features.step_features)])
    path = tmp_path / "run.duckdb"
    run_id = pc.precompute("tiny-llama", path, preset="demo", n_contexts=6, model=tiny_model)
    with reading(path) as con:
        dicts = con.execute("SELECT dict_id, layer, d_sae FROM dictionaries WHERE run_id = ? AND kind = 'attn_sae'",
                            [run_id]).fetchall()
        assert dicts, "the SAE step wrote no dictionary"
        corpus_id, n_ctx = con.execute("SELECT corpus_id, n_ctx FROM corpora").fetchall()[0]
        tok = con.execute("SELECT token_id FROM tokens WHERE corpus_id = ? ORDER BY context_id, pos", [corpus_id]).df()
        tokens = torch.tensor(tok["token_id"].to_numpy().reshape(-1, n_ctx), dtype=torch.long)
        for dict_id, layer, d_sae in dicts:
            sae = load_dictionary(con, dict_id)
            _, cache = tiny_model.run_with_cache(tokens, names_filter=hook_name("z", layer))
            acts = encode_z(sae, cache[hook_name("z", layer)])[:, 1:].numpy()
            n_rows, n_feat, n_hist = con.execute(
                "SELECT (SELECT count(*) FROM feature_activations WHERE dict_id = $1), "
                "(SELECT count(*) FROM features WHERE dict_id = $1), "
                "(SELECT sum(count) FROM feature_histograms WHERE dict_id = $1)", [dict_id]).fetchall()[0]
            assert n_rows == int((acts > 0).sum()) == n_hist
            assert n_feat == d_sae
            dens = con.execute("SELECT feature, density FROM features WHERE dict_id = ? ORDER BY feature",
                               [dict_id]).df()
            np.testing.assert_allclose(dens["density"], (acts > 0).reshape(-1, d_sae).mean(0), rtol=1e-6)
            assert con.execute("SELECT count(DISTINCT feature) FROM feature_logits WHERE dict_id = ?",
                               [dict_id]).fetchall()[0][0] == d_sae
        summary = queries.runs(con)["summary"].iloc[0]
    assert '"features"' in summary


def test_sparse_dfa_agrees_with_the_live_per_prompt_dfa(tiny_model: Any, feature_sae: Any) -> None:
    """Two implementations of docs/methods.md §1 DFA by head (batched here for the precompute, per position in
    backend/feature_analysis.py for the live pages) must give the same numbers."""
    from backend.features.live import dfa_by_head

    tokens = torch.randint(10, 1000, (1, 9), generator=torch.Generator().manual_seed(3))
    _, cache = tiny_model.run_with_cache(tokens, names_filter=hook_name("z", LAYER))
    x = cache[hook_name("z", LAYER)][0].reshape(9, -1)
    for pos, feat in [(3, 0), (5, 17), (8, D_SAE - 1)]:
        ours = features.head_contributions(feature_sae, x[[pos]], torch.tensor([feat]), tiny_model.cfg.n_heads)[0]
        live = dfa_by_head(tiny_model, feature_sae, cache, LAYER, pos, feat).contributions
        np.testing.assert_allclose(ours.numpy(), live, rtol=1e-4, atol=1e-6)


def test_precollected_activations_give_the_same_tables(tmp_path: Path, tiny_store: Path, tiny_model: Any,
                                                      feature_sae: Any, feature_store: dict[str, Any]) -> None:
    """Feeding collect_z's activations instead of running the model must write exactly the same rows."""
    from backend.model.activations import collect_z

    path = tmp_path / "reuse.duckdb"
    shutil.copy(tiny_store, path)
    tokens = feature_store["tokens"]
    z = collect_z(tiny_model, tokens, [LAYER], batch_size=3)
    with StoreWriter(path, kind="test-features", model="tiny-llama") as w:
        w.con.execute("INSERT INTO dictionaries (dict_id, model, kind, layer, d_in, d_sae) "
                      "VALUES (?, 'tiny-llama', 'attn_sae', ?, 64, ?)", [DICT_ID, LAYER, D_SAE])
        features.build_features(w, tiny_model, [features.DictEntry(DICT_ID, LAYER, feature_sae)], tokens,
                                feature_store["corpus_id"], batch_size=3,
                                precollected={("z", LAYER): z[LAYER]})
    sql = {"feature_activations": "SELECT feature, context_id, pos, act FROM feature_activations",
           "features": "SELECT feature, n_active, max_act, top_head FROM features",
           "feature_head_dfa": "SELECT feature, head, contribution FROM feature_head_dfa"}
    for table, q in sql.items():
        with reading(path) as a, reading(feature_store["path"]) as b:
            got = a.execute(f"{q} WHERE dict_id = ? ORDER BY ALL", [DICT_ID]).df()
            want = b.execute(f"{q} WHERE dict_id = ? ORDER BY ALL", [DICT_ID]).df()
        assert len(got) == len(want) > 0, table
        np.testing.assert_allclose(got.to_numpy(float), want.to_numpy(float), rtol=1e-4, atol=1e-5, err_msg=table)
