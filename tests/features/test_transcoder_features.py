"""Transcoder feature dashboards: the ``transcoder_features`` precompute step (backend.features) checked against an
independent TransformerLens + sae-lens computation, the reuse of the transcoder step's activations, and the pages
that show them (Feature Browser dashboards, Circuit Graph links and hover examples)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from backend.dictionaries.storage import load_dictionary
from backend.features import logits as feature_logits
from backend.features import queries as feature_queries
from backend.features import step as features
from backend.store.access import StoreWriter, reading

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


def _transcoders(store: Path) -> pd.DataFrame:
    with reading(store) as con:
        return feature_queries.feature_dictionaries(con, kind="transcoder")


def _scored_tokens(store: Path, n_tokens: int) -> tuple[str, torch.Tensor]:
    """(corpus_id, the first contexts' token ids [n, n_ctx]) covering ``n_tokens`` non-BOS tokens."""
    with reading(store) as con:
        corpus_id, n_ctx = con.execute("SELECT corpus_id, n_ctx FROM corpora").fetchall()[0]
        n = n_tokens // (n_ctx - 1)
        ids = con.execute("SELECT token_id FROM tokens WHERE corpus_id = ? AND context_id < ? "
                          "ORDER BY context_id, pos", [corpus_id, n]).fetchnumpy()["token_id"]
    return corpus_id, torch.tensor(ids.astype(np.int64)).reshape(n, n_ctx)


def test_every_transcoder_gets_feature_tables_matching_an_independent_encode(tiny_store: Path, tiny_model: Any) -> None:
    """Stored nonzeros, statistics and top examples equal sae-lens' encode of TransformerLens' cached MLP input."""
    dicts = _transcoders(tiny_store)
    assert len(dicts) == 2 and (dicts["n_features"] == dicts["d_sae"]).all() and (dicts["n_alive"] > 0).all()
    for row in dicts.itertuples():
        corpus_id, tokens = _scored_tokens(tiny_store, int(row.scored_tokens))
        with reading(tiny_store) as con:
            tc = load_dictionary(con, row.dict_id)
            stored = con.execute("SELECT feature, context_id, pos, act FROM feature_activations WHERE dict_id = ? "
                                 "ORDER BY context_id, pos, feature", [row.dict_id]).df()
            stats = con.execute("SELECT feature, n_active, max_act, top_head FROM features WHERE dict_id = ? "
                                "ORDER BY feature", [row.dict_id]).df()
            top1 = con.execute("SELECT feature, context_id, pos, act FROM feature_examples WHERE dict_id = ? "
                               "AND rank = 1 ORDER BY feature", [row.dict_id]).df()
            n_dfa = con.execute("SELECT count(*) FROM feature_head_dfa WHERE dict_id = ?", [row.dict_id]).fetchall()[0][0]
        with torch.no_grad():
            _, cache = tiny_model.run_with_cache(tokens, names_filter=f"blocks.{row.layer}.ln2.hook_normalized")
            acts = tc.encode(cache[f"blocks.{row.layer}.ln2.hook_normalized"].float())[:, 1:]  # BOS not scored
        c, p, f = torch.nonzero(acts > 0, as_tuple=True)
        want = pd.DataFrame({"feature": f.numpy(), "context_id": c.numpy(), "pos": p.numpy() + 1,
                             "act": acts[c, p, f].numpy()}).sort_values(["context_id", "pos", "feature"])
        assert len(stored) == len(want) > 0
        np.testing.assert_array_equal(stored[["feature", "context_id", "pos"]].to_numpy(),
                                      want[["feature", "context_id", "pos"]].to_numpy())
        np.testing.assert_allclose(stored["act"], want["act"], rtol=1e-4, atol=1e-5)
        per_feature = acts.reshape(-1, acts.shape[-1])
        np.testing.assert_array_equal(stats["n_active"], (per_feature > 0).sum(0).numpy())
        alive = stats["n_active"] > 0
        np.testing.assert_allclose(stats.loc[alive, "max_act"], per_feature.max(0).values.numpy()[alive], rtol=1e-5)
        assert stats["top_head"].isna().all() and n_dfa == 0  # a transcoder reads the MLP input, not heads
        best = acts.reshape(-1, acts.shape[-1]).argmax(0).numpy()[top1["feature"]]
        n_pos = acts.shape[1]
        np.testing.assert_array_equal(top1["context_id"] * n_pos + top1["pos"] - 1, best)
        top_act = stored.groupby("feature")["act"].max()
        np.testing.assert_allclose(top1["act"], top_act.loc[top1["feature"]].to_numpy(), rtol=1e-6)


def _independent_logit_effect(model: Any, tc: Any, feature: int) -> torch.Tensor:
    """W_dec row → RMSNorm as a constant scale (its weight) → W_U, written out without backend code."""
    with torch.no_grad():
        return (tc.W_dec[feature] * model.ln_final.w) @ model.W_U


def test_transcoder_logit_effects_are_the_decoder_row_through_the_final_norm_and_unembedding(
        tiny_store: Path, tiny_model: Any) -> None:
    row = _transcoders(tiny_store).iloc[0]
    with reading(tiny_store) as con:
        tc = load_dictionary(con, row["dict_id"])
        # the demo preset stores none for transcoders (the page computes one feature's live with the same function)
        assert con.execute("SELECT count(*) FROM feature_logits WHERE dict_id = ?", [row["dict_id"]]).fetchall()[0][0] == 0
    got = feature_logits.top_logits(tiny_model, tc, int(row["layer"]), k=5, kind="transcoder", features=[7, 3])
    assert list(got["feature"].unique()) == [7, 3] and len(got) == 2 * 2 * 5
    for f in (7, 3):
        effect = _independent_logit_effect(tiny_model, tc, f)
        part = got[got["feature"] == f]
        promoted = part[part["kind"] == "promoted"].sort_values("rank")
        suppressed = part[part["kind"] == "suppressed"].sort_values("rank")
        assert list(promoted["token_id"]) == effect.topk(5).indices.tolist()
        assert list(suppressed["token_id"]) == effect.topk(5, largest=False).indices.tolist()
        np.testing.assert_allclose(promoted["value"], effect.topk(5).values.numpy(), rtol=1e-4, atol=1e-6)


def test_precollected_mlp_inputs_give_the_same_tables(tmp_path: Path, tiny_store: Path, tiny_model: Any) -> None:
    """Reusing the transcoder step's MLP inputs (no forward pass) must write exactly the rows a fresh pass writes."""
    from backend.model.activations import collect

    dicts = _transcoders(tiny_store)
    corpus_id, tokens = _scored_tokens(tiny_store, int(dicts["scored_tokens"].iloc[0]))
    path = tmp_path / "reuse.duckdb"
    shutil.copy(tiny_store, path)
    with reading(path) as con:
        entries = [features.DictEntry(r.dict_id, int(r.layer), load_dictionary(con, r.dict_id), "transcoder")
                   for r in dicts.itertuples()]
    pre = collect(tiny_model, tokens, [e.act for e in entries], batch_size=3)
    with StoreWriter(path, kind="test-features", model="tiny-llama") as w:
        info = features.build_features(w, tiny_model, entries, tokens, corpus_id, batch_size=3, precollected=pre,
                                       logits=False)
    assert info["forward_s"] < 1.0  # sanity: no model ran (slicing tensors only)
    q = "SELECT dict_id, feature, context_id, pos, act FROM feature_activations WHERE dict_id IN (SELECT dict_id " \
        "FROM dictionaries WHERE kind = 'transcoder') ORDER BY ALL"
    with reading(path) as a, reading(tiny_store) as b:
        got, want = a.execute(q).df(), b.execute(q).df()
        assert a.execute("SELECT count(*) FROM feature_logits l JOIN dictionaries d USING (dict_id) "
                         "WHERE d.kind = 'transcoder'").fetchall()[0][0] == 0  # logits=False skips them
    assert len(got) == len(want) > 0
    assert got[["dict_id", "feature", "context_id", "pos"]].equals(want[["dict_id", "feature", "context_id", "pos"]])
    np.testing.assert_allclose(got["act"], want["act"], rtol=1e-5, atol=1e-6)


def test_mismatched_precollected_activations_are_refused(tiny_store: Path, tiny_model: Any) -> None:
    dicts = _transcoders(tiny_store)
    _, tokens = _scored_tokens(tiny_store, int(dicts["scored_tokens"].iloc[0]))
    with reading(tiny_store) as con:
        e = features.DictEntry(dicts["dict_id"].iloc[0], int(dicts["layer"].iloc[0]),
                               load_dictionary(con, dicts["dict_id"].iloc[0]), "transcoder")
    with pytest.raises(ValueError, match="lack"):
        features.build_features(None, tiny_model, [e], tokens, "x", precollected={("mlp_in", 99): torch.zeros(1, 64)})


def test_transcoder_step_leaves_training_inputs_for_the_feature_step(tmp_path: Path, tiny_model: Any) -> None:
    """With the feature contexts inside the training contexts, the feature step runs no forward pass and frees them."""
    from dataclasses import replace

    from backend.pipeline import config
    from backend.pipeline.run import precompute

    demo = config.PRESETS["demo"]
    small = replace(demo, name="reuse", n_contexts=8, transcoder=replace(demo.transcoder, eval_contexts=2),
                    features=replace(demo.features, transcoder_contexts=3),
                    attribution=replace(demo.attribution, tasks=()), graphs=replace(demo.graphs, prompts=()),
                    sae=replace(demo.sae, train=False))
    config.PRESETS["reuse"] = small
    try:
        precompute("tiny-llama", tmp_path / "s.duckdb", preset="reuse", model=tiny_model)
    finally:
        del config.PRESETS["reuse"]
    with reading(tmp_path / "s.duckdb") as con:
        summary = json.loads(con.execute("SELECT summary FROM runs").fetchall()[0][0])
        scored = feature_queries.feature_dictionaries(con, kind="transcoder")["scored_tokens"]
        n_ctx = con.execute("SELECT n_ctx FROM corpora").fetchall()[0][0]
    assert summary["transcoder_features"]["reused_activations"] is True
    assert (scored == 3 * (n_ctx - 1)).all()


# ------------------------------------------------------------------------------------------------------------
# Pages


def _page(page: str, **params: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / "pages" / page), default_timeout=180)
    at.query_params.update(params)
    return at.run()


def _clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_feature_browser_shows_a_transcoder_dashboard_with_invariant_connections(app_stores_dir: Path,
                                                                                 tiny_model: Any) -> None:
    store = app_stores_dir / "test.duckdb"
    dicts = _transcoders(store)
    up_layer = dicts[dicts["layer"] == dicts["layer"].max()].iloc[0]  # has an upstream layer to connect to
    with reading(store) as con:
        f = int(feature_queries.features_by_layer(con, up_layer["dict_id"], "max_act", 1)["feature"].iloc[0])
    at = _page("feature_browser.py", dict=up_layer["dict_id"], feature=str(f))
    _clean(at)
    assert any(f"Feature {f} · layer {int(up_layer['layer'])} MLP transcoder" in str(h.value) for h in at.subheader)
    labels = {m.label for m in at.metric}
    assert "Reads / writes" in labels and "Top head (DFA share)" not in labels
    assert "By dominant head" not in at.radio(key="fb_mode").options
    tables = [d.value for d in at.dataframe]
    promoted = next(t for t in tables if "logit effect" in t.columns)  # computed live: the store has none
    with reading(store) as con:
        tc = load_dictionary(con, up_layer["dict_id"])
    want = _independent_logit_effect(tiny_model, tc, f).topk(len(promoted)).values.numpy()
    np.testing.assert_allclose(promoted["logit effect"], want.round(4), atol=1e-4)
    invariant = [t for t in tables if "invariant" in t.columns]
    assert len(invariant) == 1 and len(invariant[0]) > 0  # upstream: the earlier layer; downstream: none (last layer)
    assert any("no transcoder layer after this one" in str(c.value) for c in at.caption)
    # open the strongest upstream connection: the dashboard and the link follow it
    pick = at.selectbox(key="fb_inv_pick")
    first = pick.options[0]
    pick.set_value(first).run()
    at.button(key="fb_inv_open").click().run()
    _clean(at)
    up = invariant[0].iloc[0]
    want_dict = dicts[dicts["layer"] == int(up["layer"])]["dict_id"].iloc[0]
    assert at.query_params["dict"] == want_dict and at.query_params["feature"] == str(int(up["feature"]))


def test_circuit_graph_links_transcoder_nodes_to_their_dashboards(app_stores_dir: Path) -> None:
    from backend.circuits.storage import list_graphs, read_graph

    store = app_stores_dir / "test.duckdb"
    with reading(store) as con:
        graphs = list_graphs(con, "tiny-llama")
        graph = read_graph(con, graphs["graph_id"].iloc[0])
        tc_ids = set(_transcoders(store)["dict_id"])
    nodes = graph.nodes[graph.nodes["kind"] == "transcoder"].sort_values("influence", ascending=False)
    assert len(nodes) and set(nodes["dict_id"]) <= tc_ids
    node = nodes.iloc[0]
    at = _page("circuit_graph.py", graph=graphs["graph_id"].iloc[0], node=node["node_id"])
    _clean(at)
    text = " ".join(str(m.value) for m in at.markdown) + " ".join(str(c.value) for c in at.caption)
    assert "no stored dashboards" not in text
    links = [e for e in at.get("page_link")] or [m for m in at.markdown if "Feature Browser" in str(m.value)]
    assert links, "a transcoder node must link to its Feature Browser dashboard"
    with reading(store) as con:
        from backend.circuits.queries import graph_feature_examples

        ex = graph_feature_examples(con, "tiny-llama", [(node["dict_id"], int(node["feature"]))])
    assert len(ex) > 0  # hover texts now have examples for transcoder features
