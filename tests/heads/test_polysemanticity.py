"""Head polysemanticity (backend/polysemanticity.py, backend/head_queries.py, pages/head_polysemanticity.py).

* The family clustering recovers planted families: decoder directions drawn around orthogonal centres, and token
  profiles that share (previous token, token) pairs.
* The dominance rule and the top-K cap are applied as documented, on a constructed ``feature_head_dfa`` table.
* The precompute step writes consistent tables on the tiny-llama test store, recomputed independently (pandas over the
  raw tables, scipy's connected components instead of networkx).
* End to end: a planted attention SAE (features confined to one head's slice, in families) on the tiny model goes
  through the real feature precompute and the step; the page renders it (AppTest), with deep links, escaped token
  text, and on stores without the tables.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import duckdb
import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from backend.features import queries as feature_queries
from backend.heads import polysemanticity as poly
from backend.heads import polysemanticity_queries as poly_queries
from backend.store import queries, schema
from backend.store.access import StoreWriter, reading

ROOT = Path(__file__).resolve().parents[2]
PAGE = str(ROOT / "pages" / "head_polysemanticity.py")
TIMEOUT = 120
EVIL = "<script>alert(1)</script> & co"


def _planted_rows(centres_per_head: dict[int, list[int]], n_heads: int, d_head: int, noise: float,
                  seed: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Decoder rows [n, n_heads * d_head], each confined to one head's slice and drawn around one of that head's
    orthonormal centres (unit centre + Gaussian noise); labels (head, centre) per row."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for head, sizes in centres_per_head.items():
        q, _ = np.linalg.qr(rng.normal(size=(d_head, d_head)))
        for k, size in enumerate(sizes):
            for _ in range(size):
                v = q[:, k] + rng.normal(scale=noise, size=d_head)
                w = np.zeros(n_heads * d_head)
                w[head * d_head:(head + 1) * d_head] = v / np.linalg.norm(v)
                rows.append(w)
                labels.append((head, k))
    return np.array(rows), labels


def _partition(assign: dict[int, Any]) -> set[frozenset[int]]:
    groups: dict[Any, set[int]] = {}
    for f, g in assign.items():
        groups.setdefault(g, set()).add(int(f))
    return {frozenset(s) for s in groups.values()}


# ------------------------------------------------------------------------------------------------------------------
# Pure functions


@pytest.mark.parametrize("sizes,d_head", [([4, 3, 3], 64), ([10], 64), ([3, 3, 2, 2], 16), ([6], 16)])
def test_decoder_families_recover_planted_centres(sizes: list[int], d_head: int) -> None:
    w, labels = _planted_rows({0: sizes}, 1, d_head, noise=0.5 / np.sqrt(d_head), seed=len(sizes) + d_head)
    feats = list(range(len(labels)))
    family_of, graph = poly.cluster_head(feats, w, [Counter() for _ in feats])  # no token evidence at all
    assert _partition(family_of) == _partition(dict(zip(feats, labels)))
    verdict = poly.judge(family_of)
    assert verdict.n_families == len(sizes) and verdict.n_singletons == 0
    assert verdict.polysemantic is (len(sizes) >= poly.MIN_FAMILIES)
    assert all(d["cos"] >= poly.COS_THRESHOLD for _, _, d in graph.edges(data=True))


def test_token_pair_families_link_features_whose_top_examples_share_pairs() -> None:
    n = 8
    w = np.eye(n)  # orthogonal decoders: only the token profiles can link features
    pairs = {0: (5, 6), 1: (7, 8)}
    profiles: list[Counter] = []
    for i in range(n):
        own = Counter({(100 + i, j): 1 for j in range(20)})  # 20 pairs of its own
        if i < 3 or 3 <= i < 5:  # features 0-2 share pair A on 12 of 20 examples; features 3-4 pair B on 10
            group = 0 if i < 3 else 1
            share = 12 if group == 0 else 10
            own = Counter({pairs[group]: share, **{(100 + i, j): 1 for j in range(20 - share)}})
        profiles.append(own)
    family_of, graph = poly.cluster_head(list(range(n)), w, profiles)
    assert _partition(family_of) == {frozenset({0, 1, 2}), frozenset({3, 4}), frozenset({5}), frozenset({6}),
                                     frozenset({7})}
    v = poly.judge(family_of)
    assert (v.n_families, v.n_singletons, v.polysemantic) == (2, 3, True)
    assert family_of[0] == 1 and family_of[3] == 2  # numbered by size, largest first
    # Just below the threshold (9 of 20 shared pairs = 45%) no link forms.
    low = [Counter({(5, 6): 9, **{(200 + i, j): 1 for j in range(11)}}) for i in range(2)]
    assert poly.cluster_head([0, 1], np.eye(2), low)[1].number_of_edges() == 0


def test_pair_overlap_is_the_multiset_intersection() -> None:
    rng = np.random.default_rng(3)
    profiles = [Counter({(int(a), int(b)): int(c) for a, b, c in rng.integers(0, 4, size=(6, 3)) if c})
                for _ in range(7)]
    got = poly.pair_overlap(profiles)
    for i, a in enumerate(profiles):
        for j, b in enumerate(profiles):
            denom = min(sum(a.values()), sum(b.values()))
            want = sum((a & b).values()) / denom if denom else 0.0  # Counter & = multiset intersection
            assert got[i, j] == pytest.approx(want)


def test_decoder_cosines_match_numpy_definition() -> None:
    rng = np.random.default_rng(4)
    w = rng.normal(size=(5, 16))
    w[2] = 0  # a zero row is similar to nothing
    got = poly.decoder_cosines(w)
    for i in range(5):
        for j in range(5):
            ni, nj = np.linalg.norm(w[i]), np.linalg.norm(w[j])
            want = float(w[i] @ w[j] / (ni * nj)) if ni and nj else 0.0
            assert got[i, j] == pytest.approx(want)


@pytest.mark.parametrize("sizes,n_families,n_singletons,verdict", [
    ([4, 3, 2, 1], 3, 1, True), ([9, 1], 1, 1, False), ([1] * 10, 0, 10, False), ([5, 5], 2, 0, True),
    ([2, 2], 2, 0, None),  # 4 judged features: fewer than MIN_JUDGED, not judged whatever the families
])
def test_the_rule(sizes: list[int], n_families: int, n_singletons: int, verdict: bool | None) -> None:
    family_of = {f: k + 1 for k, s in enumerate(sizes) for f in range(sum(sizes[:k]), sum(sizes[:k]) + s)}
    v = poly.judge(family_of)
    assert (v.n_families, v.n_singletons, v.polysemantic, v.n_judged) == (n_families, n_singletons, verdict, sum(sizes))


# ------------------------------------------------------------------------------------------------------------------
# Dominance rule and top-K cap on constructed tables


def _constructed_store(rows: list[dict[str, Any]], n_heads: int) -> duckdb.DuckDBPyConnection:
    """An in-memory store (the real DDL) whose features / feature_head_dfa hold ``rows``: feature, head (the one
    given ``share``; the rest is spread evenly over the other heads), share, n_active, max_act."""
    con = duckdb.connect(":memory:")
    for stmt in schema.DDL:
        con.execute(stmt)
    for r in rows:
        con.execute("INSERT INTO features (dict_id, feature, n_active, max_act) VALUES ('d', ?, ?, ?)",
                    [r["feature"], r["n_active"], r["max_act"]])
        for h in range(n_heads):
            share = r["share"] if h == r["head"] else (1 - r["share"]) / (n_heads - 1)
            con.execute("INSERT INTO feature_head_dfa (dict_id, feature, head, contribution, share, n_examples) "
                        "VALUES ('d', ?, ?, ?, ?, 20)", [r["feature"], h, share, share])
    return con


def test_dominance_threshold_and_top_k_are_applied_as_documented() -> None:
    n_heads, d_head = 4, 16
    plan = {0: [20, 20, 20], 1: [60], 2: [3], 3: [2, 2]}  # head -> planted decoder families
    w, labels = _planted_rows(plan, n_heads, d_head, noise=0.03, seed=7)
    rng = np.random.default_rng(8)
    rows = []
    for f, (head, k) in enumerate(labels):
        # Head 3 holds the borderline cases: share exactly 0.5 / just below, 19 / 20 activations.
        share = 0.95 - 0.001 * f
        n_active = 100
        if head == 3:
            share, n_active = [(0.5, 50), (0.4999, 50), (0.9, 19), (0.9, 20)][k * 2 + (f % 2)]
        rows.append({"feature": f, "head": head, "share": share, "n_active": n_active,
                     "max_act": float(rng.uniform(1, 2))})
    # Head 0: shares that cycle through its three centres in rank order, so its top 10 hold all three.
    head0 = [f for f, (h, _) in enumerate(labels) if h == 0]
    by_centre = {k: [f for f in head0 if labels[f][1] == k] for k in range(3)}
    cycled = [by_centre[i % 3][i // 3] for i in range(len(head0))]
    for rank, f in enumerate(cycled):
        rows[f]["share"] = 0.99 - 0.001 * rank
    con = _constructed_store(rows, n_heads)
    feats, heads = poly.analyse_dictionary(con, "d", 5, w, n_heads)

    # Independent: the dominance rule straight from the constructed rows.
    want = {(r["head"], r["feature"]) for r in rows if r["share"] >= poly.SHARE_THRESHOLD
            and r["n_active"] >= poly.MIN_ACTIVE}
    assert set(zip(feats["head"], feats["feature"])) == want
    assert (feats["share"] >= poly.SHARE_THRESHOLD).all()
    head3 = set(feats.loc[feats["head"] == 3, "feature"])
    assert {f for f, (h, _) in enumerate(labels) if h == 3 and rows[f]["share"] == 0.5} <= head3  # ≥, inclusive
    assert not any(rows[f]["share"] == 0.4999 or rows[f]["n_active"] == 19 for f in head3)
    # Ranks follow the share within each head; only the top K get a family.
    for head, part in feats.groupby("head"):
        part = part.sort_values("rank")
        assert list(part["rank"]) == list(range(1, len(part) + 1))
        assert list(part["share"]) == sorted(part["share"], reverse=True)
        assert part["family"].notna().sum() == min(len(part), poly.TOP_K)
        assert part.loc[part["rank"] > poly.TOP_K, "family"].isna().all()
    h = heads.set_index("head")
    assert list(h["n_dominant"]) == [60, 60, 3, 2]
    assert list(h["n_judged"]) == [10, 10, 3, 2]
    # Robust to the number of dominant features: 60 features around one centre are still one family,
    # 60 around three centres are three; heads with fewer than MIN_JUDGED dominant features are not judged.
    assert (h.loc[0, "n_families"], h.loc[0, "polysemantic"]) == (3, True)
    assert (h.loc[1, "n_families"], h.loc[1, "polysemantic"]) == (1, False)
    assert pd.isna(h.loc[2, "polysemantic"]) and pd.isna(h.loc[3, "polysemantic"])
    stats = json.loads(h.loc[0, "stats"])
    assert stats["family_sizes"] == [4, 3, 3] and stats["share_threshold"] == poly.SHARE_THRESHOLD


def test_min_active_is_the_feature_steps_top_n() -> None:
    from backend.features.step import TOP_N

    assert poly.MIN_ACTIVE == TOP_N


# ------------------------------------------------------------------------------------------------------------------
# The step on the tiny-llama precompute (tiny_store runs every step in STEPS)


def _raw(con: duckdb.DuckDBPyConnection, table: str) -> pd.DataFrame:
    return con.execute(f"SELECT * FROM {table}").df()


def _independent_profiles(con: duckdb.DuckDBPyConnection, dict_id: str) -> dict[int, Counter]:
    """(previous token, token) pairs of every feature's top examples, by pandas merges of the raw tables."""
    ex = _raw(con, "feature_examples")
    ex = ex[ex["dict_id"] == dict_id]
    tok = _raw(con, "tokens")[["corpus_id", "context_id", "pos", "token_id"]]
    cur = ex.merge(tok, on=["corpus_id", "context_id", "pos"])
    prev = tok.assign(pos=tok["pos"] + 1).rename(columns={"token_id": "prev_id"})
    both = cur.merge(prev, on=["corpus_id", "context_id", "pos"])
    out: dict[int, Counter] = {}
    for f, p, t in both[["feature", "prev_id", "token_id"]].itertuples(index=False):
        out.setdefault(int(f), Counter())[(int(p), int(t))] += 1
    return out


def _check_store(path: Path) -> dict[str, Any]:
    """Every consistency property of the step's tables, recomputed from the raw tables; returns what it read."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    from backend.dictionaries.storage import load_dictionary

    with reading(path) as con:
        hf, hp = _raw(con, "head_features"), _raw(con, "head_polysemanticity")
        dfa, fe = _raw(con, "feature_head_dfa"), _raw(con, "features")
        dicts = _raw(con, "dictionaries")
        n_heads = int(_raw(con, "models")["n_heads"].iloc[0])
        saes = {d: load_dictionary(con, d) for d in hp["dict_id"].unique()}
        profiles = {d: _independent_profiles(con, d) for d in hp["dict_id"].unique()}
    assert set(hp["dict_id"]) == set(dicts.loc[dicts["kind"] == "attn_sae", "dict_id"])
    for dict_id, part in hp.groupby("dict_id"):
        assert sorted(part["head"]) == list(range(n_heads))  # every head has a row
        assert (part["run_id"] == dicts.set_index("dict_id").loc[dict_id, "run_id"]).all()
        # Dominant set, independently: pandas over feature_head_dfa + features.
        m = dfa[dfa["dict_id"] == dict_id].merge(fe[fe["dict_id"] == dict_id][["feature", "n_active"]], on="feature")
        want = m[(m["share"] >= poly.SHARE_THRESHOLD) & (m["n_active"] >= poly.MIN_ACTIVE)]
        mine = hf[hf["dict_id"] == dict_id]
        assert set(zip(mine["head"], mine["feature"])) == set(zip(want["head"], want["feature"]))
        assert (mine["share"] >= poly.SHARE_THRESHOLD).all()
        got_share = mine.merge(want, on=["head", "feature"], suffixes=("", "_dfa"))
        assert np.allclose(got_share["share"], got_share["share_dfa"])
        w = saes[dict_id].W_dec.detach().numpy().reshape(-1, n_heads, saes[dict_id].W_dec.shape[1] // n_heads)
        for _, row in part.iterrows():
            feats = mine[mine["head"] == row["head"]].sort_values("rank")
            judged = feats[feats["family"].notna()]
            assert row["n_dominant"] == len(feats) and row["n_judged"] == min(len(feats), poly.TOP_K)
            assert list(judged["rank"]) == list(range(1, len(judged) + 1))
            sizes = judged["family"].value_counts()
            assert row["n_families"] == int((sizes >= poly.MIN_FAMILY_SIZE).sum())
            assert row["n_singletons"] == int((sizes == 1).sum())
            if row["n_judged"] < poly.MIN_JUDGED:
                assert pd.isna(row["polysemantic"])
            else:
                assert bool(row["polysemantic"]) == (row["n_families"] >= poly.MIN_FAMILIES)
            # Families, independently: cosines by numpy, overlaps by Counter intersection, scipy components.
            fs = [int(f) for f in judged["feature"]]
            if not fs:
                continue
            v = w[fs, int(row["head"]), :]
            v = v / np.linalg.norm(v, axis=1, keepdims=True)
            prof = [profiles[dict_id].get(f, Counter()) for f in fs]
            adj = np.zeros((len(fs), len(fs)))
            for i in range(len(fs)):
                for j in range(len(fs)):
                    ov = sum((prof[i] & prof[j]).values()) / max(1, min(sum(prof[i].values()), sum(prof[j].values())))
                    adj[i, j] = float(v[i] @ v[j] >= poly.COS_THRESHOLD or ov >= poly.OVERLAP_THRESHOLD)
            _, comp = connected_components(csr_matrix(adj), directed=False)
            assert _partition(dict(zip(fs, comp))) == _partition(dict(zip(fs, judged["family"])))
    return {"hf": hf, "hp": hp}


def test_step_writes_consistent_tables_on_the_tiny_precompute(tiny_store: Path) -> None:
    got = _check_store(tiny_store)
    assert len(got["hp"]) > 0
    with reading(tiny_store) as con:
        runs = queries.runs(con)
        headline = poly_queries.polysemanticity_headline(con)
    summary = json.loads(runs["summary"].iloc[0])
    assert summary["head_polysemanticity"] == headline
    hp = got["hp"]
    assert headline["heads"] == len(hp) and headline["judged"] == int(hp["polysemantic"].notna().sum())


def test_token_profiles_query_matches_pandas(tiny_store: Path) -> None:
    with reading(tiny_store) as con:
        dict_id = str(_raw(con, "dictionaries")["dict_id"].iloc[0])
        want = _independent_profiles(con, dict_id)
        feats = sorted(want)[:40]
        got = poly_queries.token_profiles(con, dict_id, feats)
    assert set(got["feature"]) == set(feats)
    for f in feats:
        part = got[got["feature"] == f]
        assert Counter({(int(p), int(t)): int(n) for p, t, n in part[["prev_id", "token_id", "n"]].itertuples(
            index=False)}) == want[f]


# ------------------------------------------------------------------------------------------------------------------
# End to end: a planted SAE through the real feature precompute and the step

PLANTED_LAYER = 0
PLANTED_DICT = "tiny-llama/L0/attn_z/planted-21"
PLAN = {0: [4, 4, 4], 1: [7], 2: [2]}  # head -> family sizes (head 3 gets no feature)


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory: pytest.TempPathFactory, tiny_store: Path, tiny_model: Any) -> dict[str, Any]:
    """The tiny store plus a TopK SAE on layer 0 whose features live in one head's slice each (encoder = decoder,
    zero biases, so that head supplies all of the DFA), in planted families; feature tables by the real features
    step code, then the head-polysemanticity step. Do not modify."""
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig

    from backend.dictionaries.attention_sae import KIND
    from backend.dictionaries.storage import save_dictionary
    from backend.features import step as features
    from backend.model.hooks import hook_name

    cfg = tiny_model.cfg
    w, labels = _planted_rows(PLAN, cfg.n_heads, cfg.d_head, noise=0.12, seed=0)
    sae = TopKSAE(TopKSAEConfig(d_in=cfg.n_heads * cfg.d_head, d_sae=len(labels), k=8))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor(w, dtype=torch.float32))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    path = tmp_path_factory.mktemp("planted") / "planted.duckdb"
    shutil.copy(tiny_store, path)
    with StoreWriter(path, kind="test-planted", model="tiny-llama") as writer:
        save_dictionary(writer, sae.eval(), {"dict_id": PLANTED_DICT, "model": "tiny-llama", "kind": KIND,
                                             "architecture": "topk", "hook_name": hook_name("z", PLANTED_LAYER),
                                             "layer": PLANTED_LAYER, "source": "planted (test)"})
        corpus_id = writer.con.execute("SELECT corpus_id FROM corpora LIMIT 1").fetchall()[0][0]
        tok = writer.con.execute("SELECT context_id, pos, token_id FROM tokens WHERE corpus_id = ? "
                                 "ORDER BY context_id, pos", [corpus_id]).df()
        n_ctx = int(tok["pos"].max()) + 1
        tokens = torch.tensor(tok["token_id"].to_numpy().reshape(-1, n_ctx), dtype=torch.long)
        features.build_features(writer, tiny_model, [features.DictEntry(PLANTED_DICT, PLANTED_LAYER, sae)], tokens,
                                corpus_id, batch_size=8)
        ctx = SimpleNamespace(con=writer.con, writer=writer, run_id=writer.run_id, model=tiny_model,
                              spec=SimpleNamespace(name="tiny-llama"), summary={})
        poly.step_head_polysemanticity(ctx)
    return {"path": path, "labels": labels}


def test_planted_families_are_recovered_end_to_end(planted_store: dict[str, Any]) -> None:
    got = _check_store(planted_store["path"])
    labels = planted_store["labels"]
    hf = got["hf"][got["hf"]["dict_id"] == PLANTED_DICT]
    hp = got["hp"][got["hp"]["dict_id"] == PLANTED_DICT].set_index("head")
    assert set(hf["head"]) <= set(PLAN)  # each feature is dominated by the head it was planted in
    assert all(labels[f][0] == h for h, f in zip(hf["head"], hf["feature"]))
    judged = hf[hf["family"].notna()]
    for head in PLAN:
        part = judged[judged["head"] == head]
        assert _partition(dict(zip(part["feature"], part["family"]))) == \
            _partition({int(f): labels[int(f)] for f in part["feature"]})
    assert (hp.loc[0, "n_families"], bool(hp.loc[0, "polysemantic"])) == (3, True)
    assert (hp.loc[1, "n_families"], bool(hp.loc[1, "polysemantic"])) == (1, False)
    assert pd.isna(hp.loc[2, "polysemantic"]) and hp.loc[3, "n_dominant"] == 0


# ------------------------------------------------------------------------------------------------------------------
# The page (AppTest)


@pytest.fixture
def page_stores(tmp_path: Path, planted_store: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A stores dir whose default store test.duckdb is a copy of the planted store."""
    directory = tmp_path / "stores"
    directory.mkdir()
    shutil.copy(planted_store["path"], directory / "test.duckdb")
    monkeypatch.setenv("CIRCUITSCOPE_STORES_DIR", str(directory))
    monkeypatch.setenv("CIRCUITSCOPE_STORE", "test.duckdb")
    yield directory


def _run(**params: str) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT)
    at.query_params.update(params)
    return at.run()


def _clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def _link_features(at: AppTest) -> list[int]:
    out = []
    for df in at.dataframe:
        if "feature" in df.value.columns and df.value["feature"].astype(str).str.startswith("feature_browser?").all():
            out += [int(u.rsplit("feature=", 1)[1]) for u in df.value["feature"]]
    return out


def test_page_shows_headline_heatmap_and_a_deep_linked_head(page_stores: Path) -> None:
    at = _run(head=f"{PLANTED_LAYER}.0")
    _clean(at)
    assert not at.error, [e.value for e in at.error]
    with reading(page_stores / "test.duckdb") as con:
        hp = _raw(con, "head_polysemanticity")
        hf = _raw(con, "head_features")
    judged = hp["polysemantic"].notna()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Polysemantic heads"] == f"{hp.loc[judged, 'polysemantic'].mean():.0%}"
    assert metrics["Not judged"] == f"{int((~judged).sum())} of {len(hp)}"
    assert any("Rule:" in m.value and "families" in m.value for m in at.markdown)
    charts = at.get("plotly_chart")
    assert len(charts) == 1
    fig = json.loads(charts[0].proto.spec)
    heat = fig["data"][0]
    assert heat["type"] == "heatmap" and len(heat["y"]) == hp["dict_id"].nunique()
    assert any(f"L{PLANTED_LAYER}.H0" in h and "polysemantic" in h for row in heat["hovertext"] for h in row)
    # The deep-linked head: its families, each feature linked to the Feature Browser, one example each.
    assert at.subheader[0].value == f"Head L{PLANTED_LAYER}.H0 · polysemantic"
    assert at.query_params["head"] == f"{PLANTED_LAYER}.0"
    mine = hf[(hf["dict_id"] == PLANTED_DICT) & (hf["head"] == 0)]
    families = [m.value for m in at.markdown if m.value.startswith("#### Family")]
    assert len(families) == int(hp[(hp["dict_id"] == PLANTED_DICT) & (hp["head"] == 0)]["n_families"].iloc[0])
    linked = _link_features(at)
    assert sorted(linked) == sorted(mine["feature"])  # the judged ones in family tables, the rest in the expander
    urls = [u for df in at.dataframe if "feature" in df.value.columns for u in df.value["feature"].astype(str)]
    assert all(u.startswith("feature_browser?store=test.duckdb&model=tiny-llama&dict=tiny-llama%2FL0%2F")
               for u in urls if u.startswith("feature_browser"))
    assert len(at.get("html")) == int(mine["family"].notna().sum())


def test_choosing_a_head_updates_the_link(page_stores: Path) -> None:
    at = _run(head=f"{PLANTED_LAYER}.0")
    at.selectbox(key="hp_head").set_value(f"{PLANTED_DICT}|1").run()
    _clean(at)
    assert at.query_params["head"] == f"{PLANTED_LAYER}.1"
    assert at.subheader[0].value == f"Head L{PLANTED_LAYER}.H1 · not polysemantic"


@pytest.mark.parametrize("value,says", [("9.9", "which this store has no polysemanticity data for"),
                                        ("abc", "is not of the form LAYER.HEAD")])
def test_a_bad_head_link_says_so_and_falls_back(page_stores: Path, value: str, says: str) -> None:
    at = _run(head=value)
    _clean(at)
    assert len(at.error) == 1 and says in at.error[0].value
    assert at.subheader and at.query_params["head"] != value


@pytest.mark.parametrize("how", ["dropped", "empty"])
def test_store_without_the_tables_says_how_to_build_them(page_stores: Path, how: str) -> None:
    path = page_stores / "test.duckdb"
    con = duckdb.connect(str(path))
    for table in ("head_features", "head_polysemanticity"):
        con.execute(f"DROP TABLE {table}" if how == "dropped" else f"DELETE FROM {table}")
    con.close()
    at = _run(head="1.0")
    _clean(at)
    assert not at.error
    info = " ".join(i.value for i in at.info)
    assert "has no head-polysemanticity data" in info and "python -m backend precompute" in info
    assert "make demo" in info and not at.get("plotly_chart")


def test_token_text_is_escaped(page_stores: Path) -> None:
    path = page_stores / "test.duckdb"
    with reading(path) as con:
        hf = _raw(con, "head_features")
        f = int(hf[(hf["dict_id"] == PLANTED_DICT) & (hf["head"] == 0) & (hf["rank"] == 1)]["feature"].iloc[0])
        ex = feature_queries.feature_top_examples(con, PLANTED_DICT, f, 1).iloc[0]
        corpus_id = con.execute("SELECT corpus_id FROM corpora LIMIT 1").fetchall()[0][0]
    con = duckdb.connect(str(path))
    tok = con.execute("SELECT token_id FROM tokens WHERE corpus_id = ? AND context_id = ? AND pos = ?",
                      [corpus_id, int(ex["context_id"]), int(ex["pos"])]).fetchall()[0][0]
    con.execute("UPDATE vocab SET token_str = ? WHERE token_id = ?", [EVIL, tok])
    con.close()
    at = _run(head=f"{PLANTED_LAYER}.0")
    _clean(at)
    bodies = [h.proto.body for h in at.get("html")]
    assert any("&lt;script&gt;" in b for b in bodies) and not any("<script>" in b for b in bodies)
    tables = " ".join(df.value.to_string() for df in at.dataframe)
    assert "<script>" in tables  # dataframe cells are plain text (never HTML): shown verbatim, quoted


def test_page_does_not_import_torch(page_stores: Path) -> None:
    code = (
        "import sys\n"
        "from streamlit.testing.v1 import AppTest\n"
        f"at = AppTest.from_file({PAGE!r}, default_timeout=60).run()\n"
        "assert not at.exception and not at.error and at.get('plotly_chart')\n"
        "print(sorted(m for m in ('torch', 'transformer_lens', 'sae_lens') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("[]"), out.stdout
