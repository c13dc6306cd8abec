"""The Feature Browser page (pages/feature_browser.py) via streamlit.testing.v1.AppTest on a tiny store holding one
random attention SAE and its feature tables (the ``feature_store`` fixture of tests/features/test_features.py)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pytest
from streamlit.testing.v1 import AppTest
from test_features import D_SAE, DICT_ID, feature_sae, feature_store  # noqa: F401  (fixtures used via pytest)

from backend.features import queries as feature_queries
from backend.store.access import reading

ROOT = Path(__file__).resolve().parents[2]
PAGE = str(ROOT / "pages" / "feature_browser.py")
EVIL = "<script>alert(1)</script> & co"


@pytest.fixture
def browser_store(tmp_path: Path, feature_store: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A stores dir with a copy of the feature store as test.duckdb, where the token at the strongest feature's top
    activation is renamed to hostile HTML; yields {"dir", "feature", "n_heads"}."""
    directory = tmp_path / "stores"
    directory.mkdir()
    path = directory / "test.duckdb"
    shutil.copy(feature_store["path"], path)
    with reading(path) as con:
        f = int(feature_queries.features_by_layer(con, DICT_ID, "max_act", 1)["feature"].iloc[0])
        ex = feature_queries.feature_top_examples(con, DICT_ID, f, 1).iloc[0]
        corpus_id = feature_store["corpus_id"]
    con = duckdb.connect(str(path))
    tok = con.execute("SELECT token_id FROM tokens WHERE corpus_id = ? AND context_id = ? AND pos = ?",
                      [corpus_id, int(ex["context_id"]), int(ex["pos"])]).fetchall()[0][0]
    con.execute("UPDATE vocab SET token_str = ? WHERE token_id = ?", [EVIL, tok])
    con.close()
    monkeypatch.setenv("CIRCUITSCOPE_STORES_DIR", str(directory))
    monkeypatch.setenv("CIRCUITSCOPE_STORE", "test.duckdb")
    yield {"dir": directory, "feature": f}


def _run(**params: str) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=120)
    at.query_params.update(params)
    return at.run()


def _clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def test_deep_link_opens_the_dashboard_with_escaped_tokens(browser_store: dict[str, Any]) -> None:
    f = browser_store["feature"]
    at = _run(dict=DICT_ID, feature=str(f))
    _clean(at)
    assert not at.error, [e.value for e in at.error]
    assert any(f"Feature {f}" in str(h.value) for h in at.subheader)
    labels = {m.label for m in at.metric}
    assert {"Density", "Max activation", "Mean activation", "Top head (DFA share)"} <= labels
    assert len(at.get("plotly_chart")) == 2  # histogram + DFA by head
    strips = [str(h.proto.body) for h in at.get("html")]
    assert len(strips) >= 10  # top examples (+ quantile examples)
    joined = "".join(strips)
    assert "<script>" not in joined and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in joined
    tables = [df.value for df in at.dataframe]
    assert any("logit effect" in t.columns for t in tables)
    promoted = next(t for t in tables if "logit effect" in t.columns)
    assert (promoted["logit effect"].diff().dropna() <= 0).all()
    assert at.query_params["dict"] == DICT_ID and at.query_params["feature"] == str(f)


def test_changing_the_feature_updates_the_link(browser_store: dict[str, Any]) -> None:
    at = _run(dict=DICT_ID, feature="0")
    _clean(at)
    at.number_input(key="fb_feature").set_value(5).run()
    _clean(at)
    assert at.query_params["feature"] == "5"
    assert any("Feature 5" in str(h.value) for h in at.subheader)


@pytest.mark.parametrize("params, needle", [
    ({"dict": DICT_ID, "feature": str(D_SAE + 7)}, f"Feature {D_SAE + 7} does not exist"),
    ({"dict": DICT_ID, "feature": "-1"}, "Feature -1 does not exist"),
    ({"dict": DICT_ID, "feature": "abc"}, "not a whole number"),
    ({"dict": "no/such/dict", "feature": "3"}, "does not have"),
])
def test_bad_deep_links_give_one_clear_sentence(browser_store: dict[str, Any], params: dict[str, str],
                                                needle: str) -> None:
    at = _run(**params)
    _clean(at)
    errors = " ".join(str(e.value) for e in at.error)
    assert needle in errors


def test_find_by_head_and_by_token_text(browser_store: dict[str, Any]) -> None:
    at = _run(dict=DICT_ID, feature="0")
    at.radio(key="fb_mode").set_value("By dominant head").run()
    _clean(at)
    with reading(browser_store["dir"] / "test.duckdb") as con:
        want = feature_queries.features_by_head(con, DICT_ID, 0)
    table = next(df.value for df in at.dataframe if "top_head" in df.value.columns)
    assert list(table["feature"]) == list(want["feature"])
    at.radio(key="fb_mode").set_value("By token text").run()
    at.text_input(key="fb_text").set_value("SCRIPT>").run()
    _clean(at)
    table = next(df.value for df in at.dataframe if "hits" in df.value.columns)
    assert browser_store["feature"] in set(table["feature"])
    # whole-token matching: part of the token finds nothing, the whole token (any case, spaces around) finds it
    at.checkbox(key="fb_whole").check().run()
    _clean(at)
    assert not [df for df in at.dataframe if "hits" in df.value.columns]
    assert any("that is" in str(i.value) for i in at.info)
    at.text_input(key="fb_text").set_value(f"  {EVIL.upper()} ").run()
    _clean(at)
    table = next(df.value for df in at.dataframe if "hits" in df.value.columns)
    assert browser_store["feature"] in set(table["feature"])


def test_store_without_features_says_how_to_get_them(app_stores_dir: Path) -> None:
    con = duckdb.connect(str(app_stores_dir / "test.duckdb"))  # the tiny store, minus any feature rows
    con.execute("DELETE FROM features")
    con.close()
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    _clean(at)
    info = " ".join(str(i.value) for i in at.info)
    assert "has no dictionary features" in info and "python -m backend precompute" in info
