"""The Attribution Faithfulness page (AppTest) on tiny-llama stores: with the precomputed comparisons, by deep link,
without comparisons, with untrusted token text, and with a live clean/corrupt pair saved into the store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from streamlit.testing.v1 import AppTest

from backend.attribution import queries as aq
from backend.store.access import StoreWriter, reading

ROOT = Path(__file__).resolve().parents[2]
PAGE = "pages/attribution_faithfulness.py"
TIMEOUT = 180


def _app(**params: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / PAGE), default_timeout=TIMEOUT)
    at.query_params.update(params)
    return at


def _clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _method_table(at: AppTest) -> Any:
    return next(df.value for df in at.dataframe if "× faster than patching" in df.value.columns)


def test_page_shows_the_precomputed_comparisons(app_stores_dir: Path) -> None:
    at = _app().run()
    _clean(at)
    picker = at.selectbox(key="af_comparison")
    labels = " ".join(picker.options)  # formatted labels; each ends with "(comparison id)"
    assert len(picker.options) == 2 and all(f"(tiny-llama/{t})" in labels for t in ("ioi", "induction"))
    cid = picker.value
    assert at.query_params["comparison"] == cid
    table = _method_table(at).set_index("method")
    with reading(app_stores_dir / "test.duckdb") as con:
        pearson = aq.attribution_pearson(con, cid)
        methods = aq.attribution_methods(con, cid).set_index("method")
    # The page shows the store's numbers (SQL corr, wall times), not numbers of its own.
    for row in pearson.itertuples():
        assert table.loc[row.method, f"r ({row.component})"] == pytest.approx(row.pearson_r)
    assert table.loc["patching", "seconds"] == pytest.approx(methods.loc["patching", "seconds"])
    assert {"patching", "atp", "ig"} <= set(table.index)
    charts = at.get("plotly_chart")
    # per kind (resid, mlp, head): one scatter + one heatmap per method
    assert len(charts) == 3 * (1 + len(table))
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in charts]
    assert sum("estimate vs activation patching" in t for t in titles) == 3


def test_deep_link_opens_a_comparison(app_stores_dir: Path) -> None:
    at = _app(comparison="tiny-llama/induction").run()
    _clean(at)
    assert at.selectbox(key="af_comparison").value == "tiny-llama/induction"
    assert any(m.label == "Task" and m.value == "induction" for m in at.metric)


def test_unknown_deep_link_warns_and_falls_back(app_stores_dir: Path) -> None:
    at = _app(comparison="nope").run()
    _clean(at)
    assert any("no comparison `nope`" in w.value for w in at.warning)
    assert at.query_params["comparison"] == at.selectbox(key="af_comparison").value != "nope"


def test_store_without_comparisons_says_how_to_add_them(app_stores_dir: Path, tiny_store: Path) -> None:
    path = app_stores_dir / "bare.duckdb"
    shutil.copy(tiny_store, path)
    with StoreWriter(path, kind="test", model="tiny-llama") as w:
        for table in ("attributions", "attribution_runs", "attribution_comparisons"):
            w.con.execute(f"DELETE FROM {table}")
    at = _app(store="bare.duckdb").run()
    _clean(at)
    info = " ".join(i.value for i in at.info)
    assert "has no attribution comparisons" in info and "python -m backend" in info and "make demo" in info
    assert not at.get("plotly_chart")
    assert "comparison" not in at.query_params


def test_token_text_is_escaped_in_plots(app_stores_dir: Path, tiny_model: Any) -> None:
    from backend.attribution.compare import run_comparison, write_comparison
    from backend.inputs.tasks import custom_pair

    batch = custom_pair(tiny_model, "When <b>Mary</b> met John, John gave it to",
                        "When <b>Alice</b> met Bob, Carol gave it to", " Mary", " John")
    c = run_comparison(tiny_model, batch, "tiny-llama", ["patching", "atp"], ["resid"], source="cli",
                       comparison_id="tiny-llama/xss")
    with StoreWriter(app_stores_dir / "test.duckdb", kind="attribution", model="tiny-llama") as w:
        write_comparison(w.con, c, w.run_id)
    at = _app(comparison="tiny-llama/xss").run()
    _clean(at)
    specs = [c.proto.spec for c in at.get("plotly_chart")]
    figs = [json.loads(s) for s in specs]
    heat = [f for f in figs if f["data"][0]["type"] == "heatmap"]
    assert heat
    ticks = " ".join(heat[0]["layout"]["xaxis"]["ticktext"])
    assert "&lt;" in ticks and "&gt;" in ticks and "<" not in ticks  # the tokenizer splits "<b>" into <, b, >
    hovers = " ".join(json.dumps(f["data"]) for f in figs)
    assert "<" not in hovers.replace("<br>", "").replace("<extra>", "").replace("</extra>", "")


def test_live_pair_runs_and_saves(app_stores_dir: Path) -> None:
    at = _app().run()
    at.text_input(key="af_clean").input("When Mary and John went to the park, John gave a ball to")
    at.text_input(key="af_corrupt").input("When Alice and Bob went to the park, Carol gave a ball to")
    at.multiselect(key="af_methods").set_value(["patching", "atp"])
    at.multiselect(key="af_kinds").set_value(["mlp", "head"])
    button = {b.label: b for b in at.button}
    button["Estimate the cost"].click().run()  # cheaper settings first: an estimate per method, nothing run
    _clean(at)
    estimate = [df.value for df in at.dataframe if "estimated seconds" in df.value.columns]
    assert len(estimate) == 1 and list(estimate[0]["method"]) == ["atp", "patching"]  # the order they run in
    assert (estimate[0]["estimated seconds"] > 0).all()
    assert len([df for df in at.dataframe if "× faster than patching" in df.value.columns]) == 1  # stored only
    {b.label: b for b in at.button}["Run the methods"].click().run()
    _clean(at)
    tables = [df.value for df in at.dataframe if "× faster than patching" in df.value.columns]
    assert len(tables) == 2  # the stored comparison and the live one
    live = tables[1].set_index("method")
    assert set(live.index) == {"patching", "atp"} and {"r (mlp)", "r (head)"} <= set(live.columns)
    assert at.get("progress")
    at.button(key="af_save").click().run()
    _clean(at)
    assert any("Saved as" in s.value for s in at.success)
    with reading(app_stores_dir / "test.duckdb") as con:
        comps = aq.attribution_comparisons(con, "tiny-llama")
    saved = comps[comps["source"] == "app"]
    assert len(saved) == 1 and saved["task"].iloc[0] == "custom"


def test_live_pair_is_not_offered_for_saving_in_a_read_only_deployment(app_stores_dir: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from backend.store.access import READ_ONLY_MESSAGE

    monkeypatch.setenv("CIRCUITSCOPE_READ_ONLY", "1")
    at = _app().run()
    at.text_input(key="af_clean").input("When Mary and John went to the park, John gave a ball to")
    at.text_input(key="af_corrupt").input("When Alice and Bob went to the park, Carol gave a ball to")
    at.multiselect(key="af_methods").set_value(["atp"])
    at.multiselect(key="af_kinds").set_value(["mlp"])
    {b.label: b for b in at.button}["Run the methods"].click().run()
    _clean(at)
    assert len([df for df in at.dataframe if "× faster than patching" in df.value.columns]) == 2  # it ran
    assert "af_save" not in {b.key for b in at.button}
    assert any(c.value == READ_ONLY_MESSAGE for c in at.caption)


def test_live_pair_bad_input_is_one_sentence(app_stores_dir: Path) -> None:
    at = _app().run()
    at.text_input(key="af_answer").input(" Maryland-Virginia")
    at.button[0].click().run()
    assert not at.exception
    assert len(at.error) == 1 and "single token" in at.error[0].value


def test_page_shows_the_evaluation_table_and_says_which_set(app_stores_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    row = {"family": "ioi", "kind": "resid", "label": "relp", "method": "relp", "n_pairs": 8, "r": 0.9, "r_lo": 0.8,
           "r_hi": 0.95, "rho": 0.7, "rho_lo": 0.6, "rho_hi": 0.8, "top10": 0.6, "top10_lo": 0.5, "top10_hi": 0.7,
           "wall_s": 1.0, "cpu_s": 1.0}
    summary = {"model": "tiny-llama", "when": "2026-12-07T00:00:00", "split": {"ioi": {"dev": [0], "eval": [1, 2]}},
               "relp_rules": {"attention": "gradient"}, "table": [row],
               "timing_eval_records": {"patching": {"wall_s": 100.0, "cpu_s": 80.0},
                                       "relp": {"wall_s": 1.0, "cpu_s": 0.8}}}
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(summary))
    monkeypatch.setenv("CIRCUITSCOPE_ATTRIBUTION_EVAL", str(path))
    at = _app().run()
    _clean(at)
    assert any("Evaluation set" in m.value and "2 held-out prompt pairs" in m.value for m in at.markdown)
    table = next(df.value for df in at.dataframe if "r 95% CI" in df.value.columns)
    assert table["r 95% CI"].tolist() == ["[0.80, 0.95]"] and table["Pearson r"].tolist() == [0.9]
    cost = next(df.value for df in at.dataframe if "× cheaper than patching (CPU)" in df.value.columns)
    assert cost.set_index("method").loc["relp", "× cheaper than patching (CPU)"] == pytest.approx(100.0)


def test_page_says_when_the_evaluation_is_for_another_model(app_stores_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"model": "smollm2-135m", "table": []}))
    monkeypatch.setenv("CIRCUITSCOPE_ATTRIBUTION_EVAL", str(path))
    at = _app().run()
    _clean(at)
    assert any("measured on smollm2-135m" in i.value for i in at.info)
