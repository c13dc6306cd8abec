"""Hostile input in a real browser: nothing runs, nothing crashes, every message says what to do.

HTML/JS in prompts (typed and in a shared link), right-to-left / zero-width / emoji text, 10^5 characters, only
whitespace; store names that point outside the stores directory, a corrupt store, a missing one; links naming a
feature or dictionary that does not exist; SQL-looking search text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from e2e_harness import BOS, CORRUPT_STORE, ESCAPING_LINK, STRIP_JS, Tab, query_param, submit_prompt, wait_for_strip

from backend.features import queries as feature_queries
from backend.inputs.prompts import MAX_PROMPT_CHARS
from backend.store.access import reading
from backend.ui.token_html import visible_token

pytestmark = pytest.mark.e2e

XSS = "<img src=x onerror=alert(1)><script>alert(2)</script><b onmouseover=alert(3)>bold?</b>"


def _no_injected_markup(tab: Tab) -> None:
    injected = tab.page.evaluate("""() => {
        const main = document.querySelector('[data-testid="stMain"]');
        return [...main.querySelectorAll('img[src="x"], script, b[onmouseover], [onerror]')].map(e => e.outerHTML);
    }""")
    assert injected == []


@pytest.mark.parametrize("how", ["typed", "link"])
def test_html_and_script_in_a_prompt_are_shown_as_text(tab: Tab, how: str) -> None:
    if how == "typed":
        tab.open("prompt_explorer")
        submit_prompt(tab, XSS)
    else:  # a malicious shared link is the realistic attack
        tab.open("prompt_explorer", prompt=XSS)
    wait_for_strip(tab, BOS + XSS)  # the literal text, token by token
    tab.page.locator('[data-testid="stMain"] [data-testid="stHtml"]').first.hover()  # a mouseover handler would fire
    assert tab.page.locator('[data-testid="stMain"] textarea').input_value() == XSS
    _no_injected_markup(tab)
    assert tab.dialogs == []
    assert tab.problems() == []


def test_rtl_zero_width_and_emoji_prompt(tab: Tab, tiny_model: Any) -> None:
    prompt = ("שלום עולם \u200fمرحبا بالعالم\u200e "  # right-to-left text with direction marks
              "zero\u200bwidth\u200djoin \u202eevil\u202c 👩🏽‍🚀🎉 done")  # zero-width, an override, emoji
    ids = tiny_model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    strip = visible_token(BOS) + "".join(visible_token(tiny_model.tokenizer.decode([i])) for i in ids)
    tab.open("prompt_explorer")
    submit_prompt(tab, prompt)
    wait_for_strip(tab, strip)
    assert tab.metric("Tokens") == str(len(ids) + 1)
    assert query_param(tab.page.url, "prompt") == prompt  # survives the link unchanged
    assert tab.problems() == []
    assert tab.alerts("Error") == []


def test_a_prompt_of_100k_characters_is_cut_with_a_message(tab: Tab) -> None:
    prompt = "word " * 20_000
    assert len(prompt) == 100_000
    tab.open("prompt_explorer")
    submit_prompt(tab, prompt)
    chars = tab.wait_for_alert("Warning", "characters")
    tokens = tab.wait_for_alert("Warning", "tokens")
    assert f"100,000 characters; only the first {MAX_PROMPT_CHARS:,} were read" in chars
    assert "only the first 255 fit the context and were used" in tokens  # tiny-llama: 256 positions with BOS
    assert "shorten the prompt" in chars and "shorten the prompt" in tokens  # and says what to do
    assert tab.metric("Tokens") == "256"
    assert tab.page.get_by_text("so the page link does not include it").is_visible()
    assert query_param(tab.page.url, "prompt") is None
    assert tab.problems() == []


def test_a_whitespace_prompt_asks_for_text(tab: Tab) -> None:
    tab.open("prompt_explorer")
    submit_prompt(tab, " \n\t  \u3000\n ")  # spaces, newlines, a tab, an ideographic space
    message = tab.wait_for_alert("Error", "The prompt is empty")
    assert "type some text" in message
    assert tab.page.evaluate(STRIP_JS) is None  # no stale result from the default prompt
    assert tab.problems() == []


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", ESCAPING_LINK])
def test_store_outside_the_stores_dir_is_refused(tab: Tab, name: str) -> None:
    tab.open("", store=name)
    message = tab.wait_for_alert("Error", "outside the stores directory")
    assert "choose one in the sidebar" in message
    assert "root:" not in tab.page.locator('[data-testid="stMain"]').inner_text()
    assert tab.problems() == []


def test_an_absolute_path_to_a_real_store_elsewhere_is_refused(tab: Tab, tiny_store: Path) -> None:
    tab.open("feature_browser", store=str(tiny_store))
    message = tab.wait_for_alert("Error", "outside the stores directory")
    assert "choose one in the sidebar" in message
    assert tab.page.locator('[data-testid="stMain"] [data-testid="stPlotlyChart"]').count() == 0  # nothing read


@pytest.mark.parametrize("name,what,todo", [
    (CORRUPT_STORE, "is not a readable circuitscope store", "delete it and build one with"),
    ("missing.duckdb", "No store at", "build one with"),
    ("[click me](javascript:alert(1))", "is not a .duckdb file", "choose a store in the sidebar"),
])
def test_a_bad_store_gets_a_message_saying_what_to_do(tab: Tab, name: str, what: str, todo: str) -> None:
    tab.open("prompt_explorer", store=name)
    message = tab.wait_for_alert("Error", what)
    assert todo in message
    assert tab.problems() == []
    # The name is echoed in the message: markdown in it must not become a live link.
    assert tab.page.locator('[data-testid="stMain"] a[href^="javascript:" i]').count() == 0
    # The sidebar still offers the good store: the user can recover without editing the address.
    tab.page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').first.click()
    assert tab.page.get_by_role("option", name="test.duckdb").is_visible()


def _live_feature(tiny_store: Path) -> tuple[str, int]:
    with reading(tiny_store) as con:
        dicts = feature_queries.feature_dictionaries(con, kind="attn_sae")
        dict_id = str(dicts[dicts["n_features"] > 0]["dict_id"].iloc[0])
        return dict_id, int(dicts[dicts["dict_id"] == dict_id]["d_sae"].iloc[0])


@pytest.mark.parametrize("feature,what,todo", [
    ("99999", "does not exist", "choose another id"),
    ("<script>alert(1)</script>", "is not a whole number", "choose a feature id"),
])
def test_an_unknown_feature_in_a_link_gets_a_message(tab: Tab, tiny_store: Path, feature: str, what: str,
                                                      todo: str) -> None:
    dict_id, d_sae = _live_feature(tiny_store)
    tab.open("feature_browser", dict=dict_id, feature=feature)
    message = tab.wait_for_alert("Error", what)
    assert todo in message
    if what == "does not exist":
        assert f"0–{d_sae - 1}" in message  # says which ids exist
    _no_injected_markup(tab)
    assert tab.problems() == []


def test_an_unknown_dictionary_in_a_link_gets_a_message(tab: Tab) -> None:
    tab.open("feature_browser", dict="no/such/dict", feature="3")
    message = tab.wait_for_alert("Error", "which this store does not have")
    assert "choose a dictionary below" in message
    assert tab.page.get_by_role("heading", name="Feature 0 · layer", exact=False).is_visible()  # falls back
    assert tab.problems() == []


def test_sql_like_search_text_is_just_text(tab: Tab, tiny_store: Path) -> None:
    dict_id, _ = _live_feature(tiny_store)
    tab.open("feature_browser", dict=dict_id, feature="0")
    tab.page.get_by_text("By token text").click()
    box = tab.page.get_by_role("textbox", name="Token text contains")
    box.fill("x'; DROP TABLE features; --")
    box.press("Enter")
    message = tab.wait_for_alert("Info", "No feature's top examples fire")
    assert "DROP TABLE" in message  # echoed back as text: the query took it as a parameter
    assert tab.problems() == []
