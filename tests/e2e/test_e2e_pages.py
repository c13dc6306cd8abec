"""Every page in a real browser (headless chromium on a live ``streamlit run``), and the user journeys across them.

Per page: it loads without an exception box, its title and main content are visible, and a screenshot lands in
test-artifacts/e2e/. Journeys: type a prompt in the Prompt Explorer and see each token's attention-SAE features,
follow its link to the feature's dashboard, open a dashboard by deep link, use the sidebar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from e2e_harness import BOS, Tab, feature_rows, graph_frame, prompt_features, query_param, submit_prompt, wait_for_strip
from e2e_harness import drawn as graph_drawn

from backend.features import queries as feature_queries
from backend.store.access import reading
from backend.ui.token_html import visible_token

pytestmark = pytest.mark.e2e

# (URL path, title, what shows that the page drew its content). The three analysis pages were being built when this
# was written: any chart, table, metric or message below the title counts (on a store without their data they say
# so in a message).
CONTENT = ('[data-testid="stMain"] :is([data-testid="stPlotlyChart"], [data-testid="stDataFrame"], '
           '[data-testid="stMetric"], [data-testid="stAlert"])')
PAGES: list[tuple[str, str, str]] = [
    ("", "circuitscope", '[data-testid="stMain"] [data-testid="stMetric"]'),
    ("feature_browser", "Feature Browser", '[data-testid="stMain"] [data-testid="stSelectbox"]'),
    ("prompt_explorer", "Prompt Explorer", '[data-testid="stMain"] [data-testid="stHtml"]'),
    ("head_polysemanticity", "Head Polysemanticity", CONTENT),
    ("induction_heads", "Induction Heads", CONTENT),
    ("attribution_faithfulness", "Attribution Faithfulness", CONTENT),
    ("circuit_graph", "Circuit Graph", '[data-testid="stMain"] iframe[title*="circuit_graph"]'),
    ("compare_graphs", "Compare Graphs", '[data-testid="stMain"] [data-testid="stPlotlyChart"]'),
]


@pytest.mark.parametrize("path,title,content", PAGES, ids=[p[0] or "home" for p in PAGES])
def test_page_loads_with_its_content(tab: Tab, path: str, title: str, content: str) -> None:
    tab.open(path)
    tab.page.locator(content).first.wait_for(state="visible")
    tab.wait_idle()
    assert tab.title() == title
    assert tab.problems() == []
    tab.screenshot(f"page-{path or 'home'}")


def test_home_shows_the_store(tab: Tab) -> None:
    tab.open()
    assert tab.page.get_by_role("heading", name="Model · tiny-llama").is_visible()
    assert tab.metric("Layers") == "2"
    assert tab.page.get_by_role("combobox", name="Store").input_value() == "test.duckdb"
    assert query_param(tab.page.url, "store") == "test.duckdb"


def test_sidebar_links_every_page(tab: Tab) -> None:
    """The navigation lists every view and links it to the path the per-page tests above open."""
    tab.open()
    links = tab.page.locator('[data-testid="stSidebarNav"] a')
    shown = {links.nth(i).inner_text().strip().splitlines()[-1]: urlparse(links.nth(i).get_attribute("href")).path
             for i in range(links.count())}
    assert shown == {title: f"/{path}" for path, title, _ in PAGES if path} | {"Home": "/"}
    # One click, as a user would: the page opens in the same session and keeps the chosen store.
    links.filter(has_text="Head Polysemanticity").click()
    tab.page.locator('[data-testid="stMain"] h1', has_text="Head Polysemanticity").wait_for(state="visible")
    tab.wait_ready()
    assert tab.problems() == []
    assert query_param(tab.page.url, "store") == "test.duckdb"


def test_pages_fetch_nothing_from_the_internet(tab: Tab) -> None:
    tab.open()
    tab.open("prompt_explorer")
    tab.page.locator('[data-testid="stMain"] .js-plotly-plot').first.wait_for(state="visible")
    assert tab.external == []


def _token_reprs(tiny_model: Any, prompt: str) -> list[str]:
    ids = tiny_model.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return [repr(visible_token(BOS))] + [repr(visible_token(tiny_model.tokenizer.decode([i]))) for i in ids]


def test_prompt_explorer_journey(tab: Tab, tiny_model: Any) -> None:
    """Type a prompt, see its tokens and every token's top features, then open one feature's dashboard."""
    prompt = "The cat sat on the mat because it was tired"
    tab.open("prompt_explorer")
    submit_prompt(tab, prompt)
    wait_for_strip(tab, BOS + prompt)
    tokens = _token_reprs(tiny_model, prompt)
    assert tab.metric("Tokens") == str(len(tokens))
    assert query_param(tab.page.url, "prompt") == prompt  # the view is a link

    features = prompt_features(tab, BOS + prompt)  # per SAE layer, per token: (feature, activation), best first
    assert features and all(len(per_pos) == len(tokens) for per_pos in features.values())
    assert all(per_pos[0] == [] and all(per_pos[1:]) for per_pos in features.values())  # BOS is not scored
    rows = feature_rows(tab, tokens)  # the table beside it, as far as it is in view: pos, token, one column per layer
    assert len(rows) >= 8 and [r[1] for r in rows] == tokens[:len(rows)]
    assert rows[0][2] == "BOS · not scored"
    first = next(iter(features.values()))
    assert [r[2].split()[0] for r in rows[1:]] == [f"#{per_pos[0][0]}" for per_pos in first[1:len(rows)]]
    assert tab.problems() == []
    tab.screenshot("journey-prompt-explorer")

    link = tab.page.locator('[data-testid="stMain"] a', has_text="in the Feature Browser")
    label = link.inner_text()  # "Open feature #N in the Feature Browser"
    feature = label.split("#")[1].split()[0]
    link.click()
    tab.page.locator('[data-testid="stMain"] h1', has_text="Feature Browser").wait_for(state="visible")
    heading = tab.page.locator('[data-testid="stMain"] h3', has_text=f"Feature {feature} · layer")
    heading.wait_for(state="visible")
    tab.wait_idle()
    assert query_param(tab.page.url, "feature") == feature
    assert tab.problems() == []


@pytest.mark.parametrize("kind", ["attn_sae", "transcoder"])
def test_feature_dashboard_by_deep_link(tab: Tab, tiny_store: Path, kind: str) -> None:
    """A shared link opens the feature's dashboard (an attention-SAE or a transcoder feature): its numbers are the
    store's, and its second panel is DFA by head / the input-invariant connections."""
    with reading(tiny_store) as con:
        dicts = feature_queries.feature_dictionaries(con, kind=kind)
        dict_id = str(dicts[dicts["n_features"] > 0]["dict_id"].iloc[-1])
        feature = int(feature_queries.features_by_layer(con, dict_id, "max_act", 1)["feature"].iloc[0])
        summary = feature_queries.feature_summary(con, dict_id, feature)
    assert summary is not None
    tab.open("feature_browser", store="test.duckdb", dict=dict_id, feature=str(feature))
    title = "attention output" if kind == "attn_sae" else "MLP transcoder"
    heading = f"Feature {feature} · layer {int(summary['layer'])} {title}"
    tab.page.get_by_role("heading", name=heading).wait_for(state="visible")
    tab.page.get_by_role("heading", name="Top 10 activations").wait_for(state="visible")
    tab.wait_idle()
    assert tab.metric("Max activation") == f"{summary['max_act']:.3f}"
    assert tab.page.locator('[data-testid="stMain"] [data-testid="stHtml"]').count() >= 1  # highlighted examples
    if kind == "attn_sae":
        tab.page.locator('[data-testid="stMain"] .js-plotly-plot').nth(1).wait_for(state="visible")  # histogram, DFA
    else:
        tab.page.get_by_text("Input-invariant connections").first.wait_for(state="visible")
        tab.page.get_by_text("Promoted tokens").first.wait_for(state="visible")  # logit effects, computed live
    assert (query_param(tab.page.url, "dict"), query_param(tab.page.url, "feature")) == (dict_id, str(feature))
    assert tab.problems() == []
    tab.screenshot(f"journey-feature-deep-link-{kind}")


# ----------------------------------------------------------------------------------------------------------------
# CIRCUIT GRAPH JOURNEY: build a graph from a prompt, download every export format and check the files against what
# the page draws, move a threshold slider and see the graph change.

def _drawn_nodes(tab: Tab) -> list[str]:
    """Node ids the Circuit Graph's browser component draws right now."""
    return sorted(graph_drawn(graph_frame(tab))["ids"])


def _download(tab: Tab, label: str, tmp_path: Path) -> Path:
    with tab.page.expect_download() as info:
        tab.page.get_by_role("button", name=label, exact=True).click()
    path = tmp_path / info.value.suggested_filename
    info.value.save_as(path)
    return path


def test_circuit_graph_journey_build_export_and_prune(tab: Tab, tmp_path: Path) -> None:
    import json
    import xml.etree.ElementTree as ET

    import networkx as nx
    import pydot

    tab.open("circuit_graph")
    tab.page.get_by_text("Build a graph for your own prompt").click()  # folded when the store has graphs already
    tab.page.locator('[data-testid="stMain"] [data-testid="stTextArea"] textarea').first.fill("Mary and John went to")
    tab.page.get_by_role("button", name="Build graph").click()
    from playwright.sync_api import expect

    expect(tab.page.get_by_role("combobox", name="Graph")).to_have_value("(built in this session)", timeout=120_000)
    tab.wait_idle()
    assert tab.problems() == []
    drawn = _drawn_nodes(tab)
    assert len(drawn) > 3
    tab.screenshot("circuit-graph-built")

    graphml = nx.read_graphml(_download(tab, "GRAPHML", tmp_path))
    assert sorted(graphml.nodes) == drawn
    dot = pydot.graph_from_dot_data(_download(tab, "DOT", tmp_path).read_text())[0]
    assert len([n for n in dot.get_nodes() if n.get_name().strip('"') not in ("node", "edge", "graph")]) == len(drawn)
    data = json.loads(_download(tab, "JSON", tmp_path).read_text())
    assert {"metadata", "qParams", "nodes", "links"} <= set(data) and len(data["nodes"]) == len(drawn)
    assert len(data["links"]) == graphml.number_of_edges()
    tab.page.get_by_role("button", name="Render SVG + PNG").click()
    tab.page.get_by_role("button", name="SVG", exact=True).wait_for(state="visible", timeout=120_000)
    svg = ET.parse(_download(tab, "SVG", tmp_path)).getroot()
    assert svg.tag.endswith("svg")
    png = _download(tab, "PNG", tmp_path).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    # lower the node-influence threshold: the graph is drawn again with fewer nodes, all among the earlier ones
    slider = graph_frame(tab).get_by_label("Node influence kept")
    slider.focus()
    for _ in range(50):
        slider.press("ArrowLeft")
    fewer = _drawn_nodes(tab)
    assert set(fewer) < set(drawn)
    assert tab.problems() == []
    tab.screenshot("circuit-graph-pruned")
