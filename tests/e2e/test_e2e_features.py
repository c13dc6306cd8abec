"""The Feature Browser's journeys in a real browser: find a feature by its label and open it with one click, write a
label that survives a reload and replaces the automatic one, download a graph bundle and a sae-lens dictionary and
parse every file, top examples that never show one passage twice, and a feature's activations on typed text.

Expected values come from the test process: DuckDB queries of the store, and the tiny model run here."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_check import check_bundle
from e2e_harness import GRID_JS, Tab, query_param
from tiny_stores import TEST_STORE_NAME

from backend.features.queries import WINDOW_AFTER, WINDOW_BEFORE
from backend.store.access import reading

pytestmark = pytest.mark.e2e

SPAN = WINDOW_BEFORE + WINDOW_AFTER
MAIN = '[data-testid="stMain"]'


def _store(e2e_stores: Path) -> Path:
    return e2e_stores / TEST_STORE_NAME


def _attn_dict(store: Path) -> str:
    with reading(store) as con:
        return con.execute("SELECT dict_id FROM dictionaries WHERE kind = 'attn_sae' ORDER BY dict_id").fetchall()[0][0]


def _subheader(tab: Tab, feature: int) -> Any:
    return tab.page.locator(f"{MAIN} h3", has_text=f"Feature {feature} · layer")


def _click_first_row(tab: Tab) -> None:
    """Click the first data row of the (only) table, at its row-selection marker: one click, as a user would."""
    grid = tab.page.locator(f'{MAIN} [data-testid="stDataFrame"]').first
    grid.wait_for(state="visible")
    tab.wait_idle()
    box = grid.bounding_box()
    tab.page.mouse.click(box["x"] + 12, box["y"] + 35 + 35 / 2)  # header row, then the first row (35 px each)


def test_label_search_finds_a_feature_and_opens_it_in_one_click(tab: Tab, e2e_stores: Path) -> None:
    store = _store(e2e_stores)
    with reading(store) as con:
        # a label held by exactly one feature, of a dictionary other than the one the page opens on
        dict_id, feature, layer, label = con.execute("""
            SELECT l.dict_id, l.feature, d.layer, l.label FROM feature_labels l JOIN dictionaries d USING (dict_id)
            WHERE d.kind = 'transcoder' AND l.label NOT IN (SELECT label FROM feature_labels GROUP BY label
                                                           HAVING count(*) > 1)
            ORDER BY d.layer DESC, l.feature LIMIT 1""").fetchall()[0]
    tab.open("feature_browser", dict=_attn_dict(store), feature="0")
    tab.page.get_by_text("By label (all dictionaries)").click()
    box = tab.page.get_by_role("textbox", name="Label contains")
    box.fill(label.upper())
    box.press("Enter")
    # the search's rerun has drawn its one row (clicking the grid it replaces would be lost with it)
    tab.page.wait_for_function(f"(d) => {{ const r = ({GRID_JS})(0); return r && r.length === 1 && "
                               "r[0].some(c => c === d); }", arg=dict_id)
    _click_first_row(tab)
    tab.page.wait_for_function("(d) => new URLSearchParams(location.search).get('dict') === d", arg=dict_id)
    _subheader(tab, feature).wait_for(state="visible")
    tab.wait_idle()
    assert f"layer {layer} MLP transcoder" in _subheader(tab, feature).inner_text()
    assert query_param(tab.page.url, "dict") == dict_id and query_param(tab.page.url, "feature") == str(feature)
    shown = tab.page.locator(f"{MAIN} [data-testid='stMarkdownContainer']", has_text="Label:").first.inner_text()
    assert label in shown and "automatic" in shown
    assert tab.problems() == []


def test_a_user_label_is_saved_and_shown_instead_of_the_automatic_one(tab: Tab, e2e_stores: Path) -> None:
    store = _store(e2e_stores)
    dict_id = _attn_dict(store)
    with reading(store) as con:
        feature, auto = con.execute("SELECT feature, label FROM feature_labels WHERE dict_id = ? ORDER BY feature "
                                    "LIMIT 1 OFFSET 5", [dict_id]).fetchall()[0]
    mine = "<b>bold?</b> quotes & co"
    tab.open("feature_browser", dict=dict_id, feature=str(feature))
    tab.page.get_by_role("textbox", name="Your label").fill(mine)
    tab.page.get_by_role("button", name="Save label").click()
    tab.page.locator(MAIN, has_text="yours").first.wait_for(state="visible")
    tab.open("feature_browser", dict=dict_id, feature=str(feature))  # a new session: read back from the store
    label_line = tab.page.locator(f"{MAIN} [data-testid='stMarkdownContainer']", has_text="Label:").first
    label_line.wait_for(state="visible")
    text = label_line.inner_text()
    assert mine in text and "yours" in text and f"automatic: {auto}" in text
    assert label_line.locator("b", has_text="bold?").count() == 0  # the label is text, not markup
    with reading(store) as con:
        assert con.execute("SELECT label FROM user_labels WHERE dict_id = ? AND feature = ?",
                           [dict_id, feature]).fetchall() == [(mine,)]
    assert tab.problems() == []


def test_downloads_a_graph_bundle_and_a_sae_lens_dictionary_and_parses_every_file(tab: Tab, e2e_stores: Path,
                                                                                  tmp_path: Path) -> None:
    import torch
    from sae_lens import SAE

    from backend.dictionaries.storage import load_dictionary

    store = _store(e2e_stores)
    dict_id = _attn_dict(store)
    tab.open("feature_browser", dict=dict_id, feature="1")
    tab.page.get_by_text("Downloads: this dictionary for sae-lens").click()
    tab.page.get_by_role("button", name="Prepare the graph bundle").click()
    button = tab.page.get_by_role("button", name="Download graph bundle (.zip)")
    button.wait_for(state="visible")
    with tab.page.expect_download() as info:
        button.click()
    download = info.value
    graph_id = download.suggested_filename.removesuffix("-bundle.zip")
    data = Path(download.path()).read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        files = {name: json.loads(zf.read(name)) for name in zf.namelist()}
    check_bundle(files, store, graph_id)

    tab.page.get_by_role("button", name="Prepare the sae-lens download").click()
    button = tab.page.get_by_role("button", name="Download sae-lens directory")
    button.wait_for(state="visible")
    with tab.page.expect_download() as info:
        button.click()
    with zipfile.ZipFile(info.value.path()) as zf:
        assert sorted(zf.namelist()) == ["cfg.json", "sae_weights.safetensors"]
        zf.extractall(tmp_path / "sae")
    theirs = SAE.load_from_disk(tmp_path / "sae")
    with reading(store) as con:
        ours = load_dictionary(con, dict_id)
    x = torch.randn(32, ours.cfg.d_in) * 3
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x))
        torch.testing.assert_close(theirs(x), ours(x))
    assert tab.problems() == []


def _overlaps(rows: list[tuple[int, int]]) -> bool:
    return any(c1 == c2 and abs(p1 - p2) <= SPAN for i, (c1, p1) in enumerate(rows) for c2, p2 in rows[i + 1:])


def test_top_examples_never_show_one_passage_twice(tab: Tab, e2e_stores: Path) -> None:
    store = _store(e2e_stores)
    with reading(store) as con:
        acts = con.execute("SELECT dict_id, feature, context_id, pos, act FROM feature_activations "
                           "ORDER BY dict_id, feature, act DESC, context_id, pos").df()
    picked = None
    for (dict_id, feature), part in acts.groupby(["dict_id", "feature"], sort=True):
        naive = list(zip(part.context_id.head(10), part.pos.head(10)))
        if _overlaps(naive):  # the plain top 10 would repeat a passage: dedup has something to do here
            picked = dict_id, int(feature), part
            break
    assert picked is not None
    dict_id, feature, part = picked
    ranked = list(zip(part.context_id, part.pos))[:200]
    want = [r for i, r in enumerate(ranked) if not any(c == r[0] and abs(p - r[1]) <= SPAN for c, p in ranked[:i])]
    tab.open("feature_browser", dict=dict_id, feature=str(feature))
    shown = tab.page.locator(f'{MAIN} [data-testid="fb-example"][data-section="top"]')
    shown.first.wait_for(state="attached")
    tab.wait_idle()
    got = [(int(shown.nth(i).get_attribute("data-context")), int(shown.nth(i).get_attribute("data-pos")))
           for i in range(shown.count())]
    assert got == want[:10]
    assert not _overlaps(got)
    windows = [(int(shown.nth(i).get_attribute("data-first")), int(shown.nth(i).get_attribute("data-last")))
               for i in range(shown.count())]
    for i, ((c1, _), (a1, b1)) in enumerate(zip(got, windows)):  # the drawn windows themselves never overlap
        for (c2, _), (a2, b2) in zip(got[i + 1:], windows[i + 1:]):
            assert c1 != c2 or b1 < a2 or b2 < a1
    assert tab.problems() == []


def test_your_own_text_shows_the_features_activation_per_token(tab: Tab, e2e_stores: Path, tiny_model: Any) -> None:
    import torch

    from backend.dictionaries.storage import load_dictionary
    from backend.inputs.prompts import encode_prompt

    store = _store(e2e_stores)
    dict_id = _attn_dict(store)
    text = "When Mary and John went to the store <img src=x onerror=alert(1)>, John gave"
    enc = encode_prompt(tiny_model, text)
    with reading(store) as con:
        sae = load_dictionary(con, dict_id)
        layer = con.execute("SELECT layer FROM dictionaries WHERE dict_id = ?", [dict_id]).fetchall()[0][0]
    _, cache = tiny_model.run_with_cache(torch.tensor([enc.ids]))  # a plain TransformerLens hook, here
    with torch.no_grad():
        acts = sae.encode(cache[f"blocks.{layer}.attn.hook_z"].flatten(-2)[0, 1:]).numpy()
    feature = int(np.argmax(acts.max(0)))
    tab.open("feature_browser", dict=dict_id, feature=str(feature))
    tab.page.get_by_role("textbox", name="Text").fill(text)
    tab.page.get_by_role("button", name="Run the model on this text").click()
    strip = tab.page.locator(f'{MAIN} [data-testid="fb-own-strip"]')
    strip.wait_for(state="visible")
    tab.wait_idle()
    spans = strip.locator("span")
    assert spans.count() == len(enc.ids)
    titles = [spans.nth(i).get_attribute("title") for i in range(spans.count())]
    assert titles[0] == "pos 0"  # BOS: not scored
    for i, title in enumerate(titles[1:], start=1):
        shown = float(title.split("act ")[1]) if "act " in title else 0.0
        assert shown == pytest.approx(float(acts[i - 1, feature]), abs=6e-4), (i, title)
    assert strip.locator("img").count() == 0 and "<img src=x" in strip.inner_text()
    assert tab.problems() == []


def test_dense_and_outlier_features_are_flagged(tab: Tab, e2e_stores: Path) -> None:
    store = _store(e2e_stores)
    with reading(store) as con:
        dense = con.execute("SELECT dict_id, feature, density FROM features WHERE density > 0.1 ORDER BY density DESC "
                            "LIMIT 1").fetchall()[0]
        sparse = con.execute("SELECT dict_id, feature FROM features WHERE n_active >= 5 AND density < 0.05 "
                             "ORDER BY dict_id, feature LIMIT 1").fetchall()[0]
        # an outlier by the documented rule, computed here: fired >= 20 times, max over twice the second largest
        outlier = con.execute("""
            SELECT dict_id, feature FROM (
                SELECT dict_id, feature, count(*) AS n, max(act) AS m1,
                       list(act ORDER BY act DESC)[2] AS m2 FROM feature_activations GROUP BY ALL)
            WHERE n >= 20 AND m1 > 2 * m2 ORDER BY dict_id, feature LIMIT 1""").fetchall()
    tab.open("feature_browser", dict=dense[0], feature=str(dense[1]))
    warning = tab.wait_for_alert("Warning", "Dense feature")
    assert f"{dense[2]:.0%}" in warning
    tab.open("feature_browser", dict=sparse[0], feature=str(sparse[1]))
    _subheader(tab, int(sparse[1])).wait_for(state="visible")
    assert not [w for w in tab.alerts("Warning") if "Dense feature" in w]
    if outlier:  # the random tiny model may have none; the rule itself is unit-tested in tests/features
        tab.open("feature_browser", dict=outlier[0][0], feature=str(outlier[0][1]))
        tab.wait_for_alert("Warning", "Outlier activation")
    assert tab.problems() == []


def test_whole_token_search_and_one_click_from_the_list(tab: Tab, e2e_stores: Path) -> None:
    store = _store(e2e_stores)
    dict_id = _attn_dict(store)
    with reading(store) as con:
        rows = con.execute("""
            SELECT e.feature, v.token_str FROM feature_examples e JOIN tokens t USING (corpus_id, context_id, pos)
            JOIN vocab v ON v.token_id = t.token_id WHERE e.dict_id = ?""", [dict_id]).fetchall()
    # a word whose prefix is a different token somewhere: substring search finds more features than whole-token
    words = sorted({s.strip() for _, s in rows if len(s.strip()) >= 3})
    def found(prefix: str, whole: bool) -> set[int]:
        return {int(f) for f, s in rows if (s.strip().lower() == prefix.lower() if whole else
                                            prefix.lower() in s.lower())}

    # prefer a prefix that is itself a token somewhere, so that the whole-token list has a row to click
    pairs = sorted(((w, w[:-1]) for w in words if found(w[:-1], True) != found(w[:-1], False)),
                   key=lambda p: (not found(p[1], True), p[0]))
    prefix = pairs[0][1]
    whole, partial = found(prefix, True), found(prefix, False)
    tab.open("feature_browser", dict=dict_id, feature="0")
    tab.page.get_by_text("By token text").click()
    box = tab.page.get_by_role("textbox", name="Token text contains")
    box.fill(prefix)
    box.press("Enter")
    tab.page.locator(f'{MAIN} [data-testid="stDataFrame"]').first.wait_for(state="visible")  # substring: found
    tab.wait_idle()
    assert len(partial) > len(whole)
    tab.page.get_by_text("Whole token only").click()
    tab.wait_idle()
    if whole:
        _click_first_row(tab)  # one click opens the feature; the list stays on screen
        tab.page.wait_for_function("(want) => want.includes(new URLSearchParams(location.search).get('feature'))",
                                   arg=[str(f) for f in whole])
        opened = int(query_param(tab.page.url, "feature"))
        _subheader(tab, opened).wait_for(state="visible")
        tab.wait_idle()
        assert tab.page.locator(f'{MAIN} [data-testid="stDataFrame"]').count() >= 1
    else:
        message = tab.wait_for_alert("Info", "that is")
        assert prefix in message
    assert tab.problems() == []
