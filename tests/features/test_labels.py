"""Feature labels (backend/features/labels.py), dense / outlier flags, whole-token search and a feature on any text, on
the tiny store (its precompute ran the labels step). Each is checked against a computation written here: pandas over
the stored tables, numpy, or a plain TransformerLens hook with sae-lens' encode."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from backend.errors import InputError
from backend.features import labels, queries
from backend.store.access import reading

SPAN = queries.WINDOW_BEFORE + queries.WINDOW_AFTER


@pytest.fixture
def store(tmp_path: Path, tiny_store: Path) -> Path:
    """A writable copy of the tiny store."""
    path = tmp_path / "s.duckdb"
    shutil.copy(tiny_store, path)
    return path


def _tables(path: Path) -> dict[str, pd.DataFrame]:
    with reading(path) as con:
        return {t: con.execute(f"SELECT * FROM {t}").df() for t in
                ("feature_examples", "tokens", "vocab", "corpora", "feature_logits", "dictionaries", "features")}


def _shown(text: str) -> str:
    t = text.strip(" \t\n\r")
    return t if t else text.replace("\n", "⏎").replace("\r", "↵").replace("\t", "→").replace(" ", "␣")


def _expected_label(t: dict[str, pd.DataFrame], dict_id: str, feature: int) -> str:
    """The automatic label recomputed with pandas: distinct top examples (no better-ranked one in the same context
    within the window span), their most frequent tokens, the shared preceding token, the top promoted token."""
    ex = t["feature_examples"]
    ex = ex[(ex.dict_id == dict_id) & (ex.feature == feature)].sort_values("rank")
    kept = [r for i, r in enumerate(ex.itertuples())
            if not any(o.context_id == r.context_id and o.corpus_id == r.corpus_id and o.rank < r.rank
                       and abs(int(o.pos) - int(r.pos)) <= SPAN for o in ex.itertuples())]
    model = t["dictionaries"].set_index("dict_id").loc[dict_id, "model"]
    vocab = t["vocab"][t["vocab"].model == model].set_index("token_id")["token_str"]
    tok = t["tokens"].set_index(["corpus_id", "context_id", "pos"])["token_id"]
    here = [(_shown(vocab[tok[(r.corpus_id, r.context_id, r.pos)]]), float(r.act)) for r in kept]
    before = [_shown(vocab[tok[(r.corpus_id, r.context_id, r.pos - 1)]]) for r in kept if r.pos > 0]
    counts = Counter(s for s, _ in here)
    best = {s: max(a for s2, a in here if s2 == s) for s in counts}
    ranked = sorted(counts, key=lambda s: (-counts[s], -best[s], s))
    label = f'"{ranked[0]}"' + (f' / "{ranked[1]}"' if len(ranked) > 1 and counts[ranked[1]] > 1 else "")
    if before:
        prev_counts = Counter(before)
        prev = sorted(prev_counts, key=lambda s: (-prev_counts[s], s))[0]
        if prev_counts[prev] >= max(2, labels.CONTEXT_SHARE * len(kept)):
            label += f' after "{prev}"'
    lg = t["feature_logits"]
    top = lg[(lg.dict_id == dict_id) & (lg.feature == feature) & (lg.kind == "promoted") & (lg["rank"] == 1)]
    if len(top):
        label += f' → "{_shown(vocab[int(top.token_id.iloc[0])])}"'
    return label


def test_automatic_labels_match_an_independent_computation(tiny_store: Path) -> None:
    t = _tables(tiny_store)
    with reading(tiny_store) as con:
        stored = con.execute("SELECT dict_id, feature, label FROM feature_labels").df()
        fresh = labels.automatic_labels(con)
    live = t["features"][t["features"].n_active > 0]
    with_examples = t["feature_examples"][["dict_id", "feature"]].drop_duplicates()
    assert len(stored) == len(with_examples) > 0  # every feature with examples got exactly one label
    assert set(zip(stored.dict_id, stored.feature)) <= set(zip(live.dict_id, live.feature))
    pd.testing.assert_frame_equal(stored.sort_values(["dict_id", "feature"]).reset_index(drop=True),
                                  fresh[["dict_id", "feature", "label"]].reset_index(drop=True))
    rng = np.random.default_rng(0)
    picks = stored.iloc[rng.choice(len(stored), 12, replace=False)]
    attn = stored[stored.dict_id.str.contains("attn")].iloc[:3]  # these have promoted tokens in the store
    for r in pd.concat([picks, attn]).itertuples():
        assert r.label == _expected_label(t, r.dict_id, int(r.feature)), (r.dict_id, r.feature)
    assert any("→" in lab for lab in attn.label)


def test_label_store_adds_labels_to_an_existing_store_in_a_run_of_its_own(store: Path) -> None:
    import duckdb

    con = duckdb.connect(str(store))
    con.execute("DELETE FROM feature_labels")
    con.close()
    labels.save_user_label(store, *_first_feature(store), "kept")  # a save beside the store survives the run
    with reading(store) as con:
        assert con.execute("SELECT count(*) FROM feature_labels").fetchall()[0][0] == 0
        want = labels.automatic_labels(con)
        counts = {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in ("features", "graphs")}
    n = labels.label_store(store)
    assert n == len(want) > 0
    with reading(store) as con:
        assert con.execute("SELECT count(*) FROM runs WHERE kind = 'label' AND status = 'complete'").fetchall() == [(1,)]
        assert {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in counts} == counts
        assert labels.feature_label(con, *_first_feature(store))["label"] == "kept"
        got = con.execute("SELECT dict_id, feature, label FROM feature_labels ORDER BY ALL").df()
    pd.testing.assert_frame_equal(got, want[["dict_id", "feature", "label"]].sort_values(
        ["dict_id", "feature", "label"]).reset_index(drop=True))
    labels.label_store(store)  # again: replaces instead of adding duplicates
    with reading(store) as con:
        assert con.execute("SELECT count(*) FROM feature_labels").fetchall()[0][0] == n


def _first_feature(path: Path) -> tuple[str, int]:
    with reading(path) as con:
        d, f = con.execute("SELECT dict_id, feature FROM features WHERE n_active > 0 ORDER BY ALL LIMIT 1").fetchall()[0]
    return d, int(f)


def test_user_labels_are_preferred_searchable_and_removable(store: Path) -> None:
    with reading(store) as con:
        row = con.execute("SELECT dict_id, feature, label FROM feature_labels ORDER BY dict_id, feature LIMIT 1 "
                          "OFFSET 3").fetchall()[0]
    dict_id, feature, auto = row[0], int(row[1]), row[2]
    assert labels.save_user_label(store, dict_id, feature, "  Capital\tcities\x00 100%_sure ") == \
        "Capital cities 100%_sure"
    with reading(store) as con:
        lab = labels.feature_label(con, dict_id, feature)
        assert lab == {"label": "Capital cities 100%_sure", "automatic": False, "auto_label": auto,
                       "user_label": "Capital cities 100%_sure"}
        found = labels.search_labels(con, "capital CITIES")
        assert list(zip(found.dict_id, found.feature)) == [(dict_id, feature)] and not found.automatic.iloc[0]
        assert len(labels.search_labels(con, "%_s")) == 1  # % and _ match themselves
        every = con.execute("SELECT count(*) FROM feature_labels WHERE label ILIKE '%\"%'").fetchall()[0][0]
        # across every dictionary; the user-labelled feature shows (and matches by) its user label only
        assert len(labels.search_labels(con, '"', limit=10**6)) == every - 1
    labels.save_user_label(store, dict_id, feature, "second thoughts")
    with reading(store) as con:
        assert labels.feature_label(con, dict_id, feature)["label"] == "second thoughts"
        assert labels.search_labels(con, "capital").empty
    labels.save_user_label(store, dict_id, feature, "")
    with reading(store) as con:
        assert labels.feature_label(con, dict_id, feature) == {"label": auto, "automatic": True, "auto_label": auto,
                                                                "user_label": None}
    with pytest.raises(InputError, match="no feature"):
        labels.save_user_label(store, dict_id, 10**6, "x")
    with pytest.raises(InputError, match="characters"):
        labels.save_user_label(store, dict_id, feature, "x" * (labels.MAX_LABEL_CHARS + 1))


def test_graph_nodes_show_the_features_labels(store: Path) -> None:
    from backend.circuits.storage import read_graph

    with reading(store) as con:
        gid = con.execute("SELECT graph_id FROM graphs ORDER BY graph_id LIMIT 1").fetchall()[0][0]
        node = con.execute("SELECT dict_id, feature FROM graph_nodes WHERE graph_id = ? AND kind = 'transcoder' "
                           "LIMIT 1", [gid]).fetchall()[0]
        auto = labels.feature_label(con, node[0], int(node[1]))["auto_label"]
        graph = read_graph(con, gid)
    mine = (graph.nodes.dict_id == node[0]) & (graph.nodes.feature == node[1])
    assert set(graph.nodes.label[mine]) == {auto}
    errors = graph.nodes[graph.nodes.kind == "mlp_error"]
    assert errors.label.str.contains("error").all()  # other nodes keep their own labels
    labels.save_user_label(store, node[0], int(node[1]), "my node")
    with reading(store) as con:
        graph = read_graph(con, gid)
    assert set(graph.nodes.label[mine]) == {"my node"}


def test_flags_and_whole_token_search(tiny_store: Path) -> None:
    t = _tables(tiny_store)
    feats, ex = t["features"], t["feature_examples"]
    with reading(tiny_store) as con:
        for r in feats[feats.n_active > 0].itertuples():
            flags = queries.feature_flags(con, r.dict_id, int(r.feature))
            acts = np.sort(ex[(ex.dict_id == r.dict_id) & (ex.feature == r.feature)].act.to_numpy())[::-1]
            second = float(acts[1]) if len(acts) > 1 else None
            assert flags["dense"] == (r.density > queries.DENSE_ABOVE)
            assert flags["outlier"] == (second is not None and r.n_active >= queries.OUTLIER_MIN_ACTIVE
                                        and r.max_act > queries.OUTLIER_RATIO * second)
            assert flags["second"] == (pytest.approx(second, rel=1e-6) if second is not None else None)
        assert feats.density.max() > queries.DENSE_ABOVE  # the tiny store has dense features: the flag is exercised
        dict_id = feats[feats.dict_id.str.contains("attn")].dict_id.iloc[0]
        model = t["dictionaries"].set_index("dict_id").loc[dict_id, "model"]
        vocab = t["vocab"][t["vocab"].model == model].set_index("token_id")["token_str"]
        tok = t["tokens"].set_index(["corpus_id", "context_id", "pos"])["token_id"]
        mine = ex[ex.dict_id == dict_id]
        texts = [vocab[tok[(r.corpus_id, r.context_id, r.pos)]] for r in mine.itertuples()]
        word = Counter(s.strip() for s in texts if len(s.strip()) >= 2).most_common(1)[0][0]
        part = word[:-1]
        for query, whole in ((part, True), (part, False), (" " + word.upper() + " ", True)):
            hits = {int(r.feature) for r, s in zip(mine.itertuples(), texts)
                    if (s.strip(" \t\n\r").lower() == query.strip().lower() if whole else query.lower() in s.lower())}
            got = set(queries.features_by_token(con, dict_id, query, 10**6, whole)["feature"])
            assert got == hits, (query, whole)
        assert set(queries.features_by_token(con, dict_id, part, 10**6, True)["feature"]) < \
            set(queries.features_by_token(con, dict_id, part, 10**6, False)["feature"])


def test_a_feature_on_your_text_matches_a_plain_hook(tiny_store: Path, tiny_model: Any) -> None:
    from backend.dictionaries.storage import load_dictionary
    from backend.features.live import feature_on_tokens
    from backend.inputs.prompts import encode_prompt

    enc = encode_prompt(tiny_model, "Thou art more lovely and more temperate, though")
    with reading(tiny_store) as con:
        dicts = con.execute("SELECT dict_id, kind, layer FROM dictionaries ORDER BY dict_id").fetchall()
        saes = {d: load_dictionary(con, d) for d, _, _ in dicts}
    tokens = torch.tensor([enc.ids])
    _, cache = tiny_model.run_with_cache(tokens)
    for dict_id, kind, layer in dicts:
        sae = saes[dict_id]
        x = (cache[f"blocks.{layer}.attn.hook_z"].flatten(-2) if kind == "attn_sae"
             else cache[f"blocks.{layer}.ln2.hook_normalized"])
        with torch.no_grad():
            want = sae.encode(x[0, 1:]).numpy()
        f = int(np.argmax(want.max(0)))
        got = feature_on_tokens(tiny_model, sae, kind, layer, f, enc.ids)
        assert np.isnan(got[0]) and len(got) == len(enc.ids)
        np.testing.assert_allclose(got[1:], want[:, f], rtol=1e-4, atol=1e-5)
        assert got[1:].max() > 0
