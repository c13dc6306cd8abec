"""The Induction Heads page (pages/induction_heads.py) with AppTest on the tiny-llama test store: with and without
induction data, deep links, the user's prompt (validated, escaped, equal to the backend's per-token view)."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from backend.heads import induction as ind
from backend.heads import induction_queries
from backend.inputs.prompts import encode_prompt
from backend.store.access import StoreWriter, reading

ROOT = Path(__file__).resolve().parents[2]
PAGE = "pages/induction_heads.py"
MODEL = "tiny-llama"


def _app(**params: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / PAGE), default_timeout=120)
    at.query_params.update(params)
    return at


def _clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _figures(at: AppTest) -> list[dict[str, Any]]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def _values(v: Any) -> list[Any]:
    """A plotly array from a figure's JSON: a plain list, or plotly's base64 typed-array encoding of numpy arrays."""
    if isinstance(v, dict) and "bdata" in v:
        arr = np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"])
        return arr.reshape([int(x) for x in str(v["shape"]).split(",")]).tolist() if "shape" in v else arr.tolist()
    return list(v)


def _markdown(at: AppTest) -> str:
    return " ".join(str(m.value) for m in at.markdown)


def test_page_shows_the_stored_scores_and_classes(app_stores_dir: Path) -> None:
    at = _app().run()
    _clean(at)
    with reading(app_stores_dir / "test.duckdb") as con:
        scores = induction_queries.head_scores(con, MODEL)
        classes = induction_queries.induction_classes(con, MODEL)
    figs = _figures(at)
    heatmaps = [f for f in figs if f["data"][0]["type"] == "heatmap" and f["layout"]["title"]["text"] in
                ("Induction", "Previous token", "Duplicate token")]
    assert len(heatmaps) == 3
    grid = scores.pivot(index="layer", columns="head", values="induction").values
    assert np.allclose(_values(heatmaps[0]["data"][0]["z"]), grid, atol=1e-6)
    assert "L1.H0" in heatmaps[0]["data"][0]["customdata"][1][0]
    table = next(df.value for df in at.dataframe if "class" in df.value.columns)
    assert len(table) == len(classes) and set(table["class"]) <= set(ind.CLASSES)
    assert "Rule:" in _markdown(at) and "short-prefix" in _markdown(at)
    best = scores.sort_values(["induction", "layer", "head"], ascending=[False, True, True]).iloc[0]
    assert at.query_params["head"] == f"{int(best['layer'])}.{int(best['head'])}"
    titles = [f["layout"]["title"]["text"] for f in figs]
    assert "Attention to the induction target" in titles and "Direct effect on the target token" in titles
    assert any(t.startswith("Competition") for t in titles)


def test_deep_link_opens_a_head_and_its_curves(app_stores_dir: Path) -> None:
    at = _app(head="1.2").run()
    _clean(at)
    assert at.selectbox(key="ih_head").value == "1.2"
    with reading(app_stores_dir / "test.duckdb") as con:
        stored = induction_queries.induction_prefix_curves(con, MODEL, ("1.2",))
    curve = next(f for f in _figures(at) if f["layout"]["title"]["text"] == "Attention to the induction target")
    trace = next(t for t in curve["data"] if t["name"].startswith("L1.H2"))
    prefix = stored[stored["condition"] == "prefix"].sort_values("prefix_len")
    assert _values(trace["x"]) == prefix["prefix_len"].tolist()
    assert _values(trace["y"]) == pytest.approx(prefix["attention"].tolist(), abs=1e-6)
    assert trace["line"]["width"] == 4  # the chosen head is drawn bold


def test_unknown_head_in_a_link_is_refused(app_stores_dir: Path) -> None:
    at = _app(head="7.7").run()
    assert not at.exception
    assert any("7.7" in w.value and "does not have" in w.value for w in at.warning)
    assert at.query_params["head"] != "7.7"


def test_page_without_induction_data(app_stores_dir: Path) -> None:
    path = app_stores_dir / "old.duckdb"
    shutil.copy(app_stores_dir / "test.duckdb", path)
    with StoreWriter(path, kind="test", model=MODEL) as w:
        for table in ("head_scores", "induction_prefix", "induction_classes"):
            w.con.execute(f"DELETE FROM {table}")
    at = _app(store="old.duckdb", head="0.1").run()
    _clean(at)
    info = " ".join(str(i.value) for i in at.info)
    assert "has no induction-head scores" in info and "python -m backend precompute" in info
    assert at.selectbox(key="ih_head").value == "0.1"
    assert at.text_area(key="ih_prompt").value  # the live part still works
    assert any(f["layout"]["title"]["text"].startswith("L0.H1 on your prompt") for f in _figures(at))


def test_user_prompt_matches_the_backend_and_is_escaped(app_stores_dir: Path, tiny_model: Any) -> None:
    prompt = "<script>alert(1)</script> cat sat. <script>alert(1)</script> cat sat."
    at = _app(head="1.1").run()
    at.text_area(key="ih_prompt").input(prompt).run()
    _clean(at)
    ids = encode_prompt(tiny_model, prompt).ids
    view = ind.prompt_head_view(tiny_model, ids, 1, 1)
    repeated = view.table[view.table["prev_pos"] >= 0]
    table = next(df.value for df in at.dataframe if "matching prefix" in df.value.columns)
    assert table["pos"].tolist() == repeated["pos"].tolist()
    assert table["attention"].tolist() == pytest.approx(repeated["attention"].tolist(), abs=1e-6)
    assert table["matching prefix"].tolist() == repeated["match_len"].tolist()
    spec = next(c.proto.spec for c in at.get("plotly_chart") if "on your prompt" in c.proto.spec)
    assert "&lt;" in spec and "<script" not in spec and "\\u003cscript" not in spec
    assert at.query_params["prompt"] == prompt


@pytest.mark.parametrize("prompt", ["", "  \n "])
def test_empty_prompt_is_one_sentence(app_stores_dir: Path, prompt: str) -> None:
    at = _app().run()
    at.text_area(key="ih_prompt").input(prompt).run()
    assert not at.exception
    assert [e.value for e in at.error] == ["The prompt is empty: type some text to run through the model."]


def test_example_sequences_mark_their_targets(app_stores_dir: Path, tiny_model: Any) -> None:
    at = _app(head="0.0").run()
    at.selectbox(key="ih_example").select("competition").run()
    _clean(at)
    captions = " ".join(str(c.value) for c in at.caption)
    assert "long (position" in captions and "short (position" in captions
    with reading(app_stores_dir / "test.duckdb") as con:
        params = induction_queries.induction_rule(con, MODEL)["params"]
    ids, dest, targets = ind.example_ids(tiny_model, "competition", params["max_prefix"], params["seq_len"],
                                         params["repeat_len"])
    view = ind.prompt_head_view(tiny_model, ids, 0, 0)
    expected = f"long (position {targets['competition_long']}"
    assert expected in captions and f"{view.pattern[dest, targets['competition_long']]:.3f}" in captions
