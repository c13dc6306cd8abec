"""Prompt Explorer's attention-SAE views (streamlit.testing.v1.AppTest) on a copy of the tiny-llama test store with a
random TopK SAE added at each of its two layers: per-token top features, DFA charts for a selected (position, feature),
deep links, the no-SAE message and escaping of untrusted token text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from backend.features import live as fa
from backend.inputs.prompts import encode_prompt
from backend.model.hooks import hook_name
from backend.store.access import StoreWriter
from backend.ui import token_html

ROOT = Path(__file__).resolve().parents[2]
PAGE = str(ROOT / "pages/prompt_explorer.py")
TIMEOUT = 120
STORE = "saes.duckdb"
D_SAE = 96
PROMPT = "When Mary and John went to the store, John gave a drink to"



def _picker(at):  # type: ignore[no-untyped-def]
    """The attention-SAE feature picker (its key carries a digest of the prompt, position and dictionary)."""
    return next(b for b in at.selectbox if str(b.key).startswith("pe_feature_"))

def _dict_id(model: Any, layer: int) -> str:
    from backend.dictionaries.attention_sae import dict_id_for

    return dict_id_for("tiny-llama", layer, "topk", D_SAE)


@pytest.fixture(scope="module")
def saes(tiny_model: Any) -> dict[int, Any]:
    from backend.dictionaries.attention_sae import make_random_sae

    d_in = tiny_model.cfg.n_heads * tiny_model.cfg.d_head
    # At storage precision, as every stored dictionary is: the page's numbers then match these objects exactly.
    from backend.dictionaries.storage import to_stored_precision

    return {layer: to_stored_precision(make_random_sae(d_in, D_SAE, 8, seed=layer)) for layer in (0, 1)}


@pytest.fixture(scope="module")
def sae_store(tmp_path_factory: pytest.TempPathFactory, tiny_store: Path, tiny_model: Any,
              saes: dict[int, Any]) -> Path:
    """The tiny test store plus one attention SAE per layer, saved with the store's save function."""
    from backend.dictionaries.attention_sae import KIND
    from backend.dictionaries.storage import save_dictionary

    path = tmp_path_factory.mktemp("sae_store") / STORE
    shutil.copy(tiny_store, path)
    with StoreWriter(path, kind="test", model="tiny-llama") as w:
        _drop_attention_saes(w)  # the precompute's own SAEs: replaced by these known ones
        for layer, sae in saes.items():
            save_dictionary(w, sae, {"dict_id": _dict_id(tiny_model, layer), "model": "tiny-llama", "kind": KIND,
                                     "architecture": "topk", "hook_name": hook_name("z", layer), "layer": layer,
                                     "source": "random (test)"})
    return path


def _drop_attention_saes(writer: StoreWriter) -> None:
    from backend.dictionaries.attention_sae import KIND

    writer.con.execute("DELETE FROM dictionary_weights WHERE dict_id IN "
                       "(SELECT dict_id FROM dictionaries WHERE kind = ?)", [KIND])
    writer.con.execute("DELETE FROM dictionaries WHERE kind = ?", [KIND])


@pytest.fixture
def stores(app_stores_dir: Path, sae_store: Path) -> Iterator[Path]:
    shutil.copy(sae_store, app_stores_dir / STORE)
    yield app_stores_dir


def _app(**params: str) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=TIMEOUT)
    at.query_params.update(params)
    return at


def _clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def _feature_table(at: AppTest) -> Any:
    return next(df.value for df in at.dataframe if any(c.endswith(" top features") for c in df.value.columns))


def _values(v: Any) -> list[float]:
    """A plotly trace's x / y: a list, or plotly's binary typed-array encoding of a numpy array."""
    if isinstance(v, dict) and "bdata" in v:
        import base64

        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"])).tolist()
    return list(v)


def _charts(at: AppTest) -> dict[str, dict[str, Any]]:
    out = {}
    for el in at.get("plotly_chart"):
        spec = json.loads(el.proto.spec)
        out[spec["layout"].get("title", {}).get("text", "")] = spec
    return out


def _expected(tiny_model: Any, saes: dict[int, Any], prompt: str) -> tuple[list[int], fa.PromptFeatures]:
    ids = encode_prompt(tiny_model, prompt).ids
    return ids, fa.analyze_prompt(tiny_model, saes, ids, top_n=5)


def test_prompt_shows_top_features_per_token_and_layer(stores: Path, tiny_model: Any, saes: dict[int, Any]) -> None:
    at = _app(store=STORE).run()
    at.text_area(key="pe_prompt").input(PROMPT).run()
    _clean(at)
    ids, res = _expected(tiny_model, saes, PROMPT)
    table = _feature_table(at)
    assert len(table) == len(ids) and "L1 top features" in table.columns
    assert table["L0 top features"].iloc[0] == "BOS · not scored"
    for layer in (0, 1):
        for pos in (1, len(ids) - 1):
            lf = res.layers[layer]
            shown = table[f"L{layer} top features"].iloc[pos].split("  ")
            assert [s.split()[0] for s in shown] == [f"#{int(f)}" for f in lf.features[pos] if f >= 0]
            assert [float(s.split()[1]) for s in shown] == pytest.approx(
                [float(a) for a in lf.acts[pos] if np.isfinite(a)], abs=0.006)
    heat = next(spec for title, spec in _charts(at).items() if title.startswith("Strongest"))
    assert heat["data"][0]["y"] == ["L0", "L1"]
    assert at.query_params["dict"] == _dict_id(tiny_model, 0)


def test_selected_position_and_feature_show_dfa_charts(stores: Path, tiny_model: Any, saes: dict[int, Any]) -> None:
    at = _app(store=STORE, prompt=PROMPT).run()
    ids, res = _expected(tiny_model, saes, PROMPT)
    pos = 4
    at.selectbox(key="pe_pos").select(pos).run()
    at.selectbox(key="pe_dict").select(_dict_id(tiny_model, 1)).run()
    options = _picker(at).options
    want = [int(f) for f in res.layers[1].features[pos] if f >= 0]
    assert [int(o.split()[0].lstrip("#")) for o in options] == want
    feature = want[1]
    _picker(at).select(feature).run()
    _clean(at)
    assert at.query_params["pos"] == str(pos) and at.query_params["feature"] == str(feature)
    charts = _charts(at)
    head = fa.dfa_by_head(tiny_model, saes[1], res.cache, 1, pos, feature)
    src = fa.dfa_by_source(tiny_model, saes[1], res.cache, 1, pos, feature)
    assert _values(charts["DFA by head"]["data"][0]["y"]) == pytest.approx(head.contributions.tolist(), abs=1e-5)
    by_source = _values(charts["DFA by source position"]["data"][0]["y"])
    assert len(by_source) == pos + 1
    assert by_source == pytest.approx(src.by_source[: pos + 1].tolist(), abs=1e-5)
    # What the page shows adds up: sources + the b_dec share = heads = the pre-activation - b_enc.
    assert sum(by_source) + src.bdec_total == pytest.approx(head.preactivation - head.b_enc, abs=1e-4)
    link = " ".join(m.value for m in at.markdown)
    assert f"dict={_dict_id(tiny_model, 1).replace('/', '%2F')}&feature={feature}" in link
    assert "feature_browser?store=saes.duckdb" in link


def test_deep_link_restores_the_selection(stores: Path, tiny_model: Any, saes: dict[int, Any]) -> None:
    ids, res = _expected(tiny_model, saes, PROMPT)
    dict_id = _dict_id(tiny_model, 1)
    pos = 5
    feature = int(res.layers[1].features[pos, 2])
    at = _app(store=STORE, prompt=PROMPT, pos=str(pos), dict=dict_id, feature=str(feature)).run()
    _clean(at)
    assert at.text_area(key="pe_prompt").value == PROMPT
    assert at.selectbox(key="pe_pos").value == pos
    assert at.selectbox(key="pe_dict").value == dict_id
    assert _picker(at).value == feature
    assert {k: at.query_params[k] for k in ("pos", "dict", "feature")} == {
        "pos": str(pos), "dict": dict_id, "feature": str(feature)}
    assert "DFA by head" in _charts(at)
    # A linked feature that is not among this token's top features stays selected (and is labelled as such).
    quiet = next(f for f in range(D_SAE) if f not in set(res.layers[1].features[pos].tolist()))
    at = _app(store=STORE, prompt=PROMPT, pos=str(pos), dict=dict_id, feature=str(quiet)).run()
    _clean(at)
    assert _picker(at).value == quiet
    assert "not in this token's top" in _picker(at).options[0]


def test_inside_the_app_the_feature_link_is_a_page_link(stores: Path) -> None:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT)
    at.query_params.update(store=STORE)
    at.run()
    at.switch_page("pages/prompt_explorer.py").run()
    _clean(at)
    links = [link for link in at.get("page_link") if "in the Feature Browser" in link.proto.label]  # not the
    # transcoder feature's link further down
    assert len(links) == 1 and links[0].proto.page == "feature_browser"
    params = dict(p.split("=", 1) for p in links[0].proto.query_string.split("&"))
    assert params["store"] == STORE and params["feature"] == at.query_params["feature"]
    assert params["dict"] == at.query_params["dict"].replace("/", "%2F")


@pytest.mark.parametrize("param,value,says", [("dict", "nope/L9/attn_z/topk-1", "has no attention SAE `nope"),
                                              ("feature", str(D_SAE), "is not a feature of"),
                                              ("feature", "-3", "is not a feature of")])
def test_a_bad_link_falls_back_with_a_warning(stores: Path, tiny_model: Any, param: str, value: str, says: str) -> None:
    at = _app(store=STORE, prompt=PROMPT, pos="2", **{param: value}).run()
    _clean(at)
    assert any(says in w.value for w in at.warning)
    assert at.selectbox(key="pe_dict").value == _dict_id(tiny_model, 0)
    assert at.query_params["feature"] == str(_picker(at).value)
    assert "DFA by head" in _charts(at)


def test_bos_position_is_shown_but_not_scored(stores: Path) -> None:
    at = _app(store=STORE, prompt=PROMPT, pos="0").run()
    _clean(at)
    assert any("BOS token" in i.value and "not score" in i.value for i in at.info)
    assert "DFA by head" not in _charts(at)


def test_store_without_saes_says_so_and_the_loss_table_still_works(app_stores_dir: Path, tiny_model: Any) -> None:
    shutil.copy(app_stores_dir / "test.duckdb", app_stores_dir / "plain.duckdb")
    with StoreWriter(app_stores_dir / "plain.duckdb", kind="test", model="tiny-llama") as w:
        _drop_attention_saes(w)
    at = _app(store="plain.duckdb", prompt=PROMPT).run()
    _clean(at)
    assert any("attention-SAE precompute" in i.value and "python -m backend precompute" in i.value for i in at.info)
    assert at.dataframe[0].value["id"].tolist() == encode_prompt(tiny_model, PROMPT).ids
    assert at.selectbox(key="pe_pos").value is not None and not any(s.key == "pe_dict" for s in at.selectbox)
    assert not any(c.endswith(" top features") for df in at.dataframe for c in df.value.columns)


def test_the_precomputes_own_saes_are_shown(app_stores_dir: Path, tiny_model: Any) -> None:
    """End to end on the store the real precompute built (its attention_saes step trained the SAEs)."""
    from backend.dictionaries.attention_sae import KIND
    from backend.store.access import reading

    with reading(app_stores_dir / "test.duckdb") as con:
        layers = [int(r[0]) for r in con.execute(
            "SELECT DISTINCT layer FROM dictionaries WHERE kind = ? ORDER BY layer", [KIND]).fetchall()]
    assert layers, "the tiny store's precompute should have trained attention SAEs"
    at = _app(prompt=PROMPT, pos="3").run()
    _clean(at)
    table = _feature_table(at)
    assert [c for c in table.columns if c.endswith("top features")] == [f"L{layer} top features" for layer in layers]
    assert "DFA by head" in _charts(at)


def test_script_tokens_are_escaped_everywhere(stores: Path, tiny_model: Any) -> None:
    import html
    import re

    prompt = 'Look: <script>alert("x")</script> & <b>bold</b>'
    strings = encode_prompt(tiny_model, prompt).strings  # '<|im_start|>', ..., ' <', 'script', '>', ...
    at = _app(store=STORE, prompt=prompt, pos=str(len(strings) - 1)).run()
    _clean(at)
    htmls = [h.proto.body for h in at.get("html")]
    assert len(htmls) == 4  # loss strip, feature activation strip, source-contribution strip, transcoder feature
    for body in htmls:
        text = re.sub(r"</?(span|div)( [^>]*)?>", "", body)  # the strip's own markup; token text is what is left
        assert "<" not in text and ">" not in text
        assert all(html.escape(token_html.visible_token(t), quote=True) in text for t in strings)
    escaped = [f"{p}: {html.escape(token_html.visible_token(t))}" for p, t in enumerate(strings)]
    charts = _charts(at)
    heat = next(spec for title, spec in charts.items() if title.startswith("Strongest"))
    assert heat["layout"]["xaxis"]["ticktext"] == escaped
    assert charts["DFA by source position"]["layout"]["xaxis"]["ticktext"] == escaped


def test_signed_token_strip_escapes_and_shades_by_sign() -> None:
    out = token_html.signed_token_strip_html(["<script>", "a & b", "x"], [1.0, -0.5, float("nan")], label="c")
    assert "<script>" not in out and "&lt;script&gt;" in out and "a &amp; b" in out
    assert "rgba(214, 39, 40, 1.00)" in out and "rgba(31, 119, 180, 0.50)" in out and "rgba(31, 119, 180, 0.00)" in out
