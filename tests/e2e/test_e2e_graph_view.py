"""The Circuit Graph in a real browser: filtering in the browser (a slider move redraws without a server run), the
graph and the selected node's details together on a 1400x900 screen, and a link that carries the view (thresholds,
pins, hides, supernodes, labels, error nodes, search, the selected node) reproducing it — including a supernode and a
label made by hand in the browser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from e2e_harness import READY, Tab, drawn, emit, graph_frame, move_and_time, query_param
from tiny_stores import TEST_STORE_NAME

from backend.circuits.prune import ranking
from backend.circuits.storage import list_graphs, read_graph
from backend.circuits.view import ViewState, apply_view
from backend.store.access import reading

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stored(e2e_stores: Path) -> tuple[str, object]:
    """A graph stored in the e2e store, read back with the backend (the reference the browser must agree with)."""
    with reading(e2e_stores / TEST_STORE_NAME) as con:
        gid = str(list_graphs(con)["graph_id"].iloc[0])
        return gid, read_graph(con, gid)


def _script_state(tab: Tab) -> str:
    return tab.page.locator('[data-testid="stApp"]').get_attribute("data-test-script-state")


def test_a_slider_move_redraws_in_the_browser_without_a_server_run(tab: Tab, stored) -> None:
    gid, graph = stored
    tab.open("circuit_graph", graph=gid)
    frame = graph_frame(tab)
    before = drawn(frame)
    ranked = ranking(graph)
    assert before["nodes"] == len(apply_view(ranked, ViewState()).nodes)
    after = move_and_time(frame, "nt", "0.3")
    assert _script_state(tab) == "notRunning"  # redrawn in the same JavaScript task: no server run in between
    expected = apply_view(ranked, ViewState(node_threshold=0.3))
    assert after["nodes"] == len(expected.nodes) < before["nodes"]
    assert after["edges"] == len(expected.edges)
    assert set(after["ids"]) == set(expected.nodes["node_id"])
    # a moment later the page hears of it, and the link carries the threshold
    tab.page.wait_for_function("() => new URL(location.href).searchParams.get('nt') === '0.3'")
    # the keyboard, as a person moves the slider: every step redraws at once
    slider = frame.locator("#et")
    slider.focus()
    for _ in range(10):
        slider.press("ArrowLeft")
    now = drawn(frame)
    assert now["state"]["edge_threshold"] == pytest.approx(0.88)
    assert now["edges"] == len(apply_view(ranked, ViewState(node_threshold=0.3, edge_threshold=0.88)).edges)
    # errors off and a search: answered in the browser too
    frame.locator("#err").uncheck()
    assert not any(i.startswith(("M", "AE")) for i in drawn(frame)["ids"])
    found = move_and_time(frame, "q", graph.target_id)
    assert found["found"] == [graph.target_id]
    assert tab.problems() == []


def test_a_large_view_draws_only_its_strongest_lines_and_keeps_every_edge(tab: Tab, stored) -> None:
    gid, graph = stored
    tab.open("circuit_graph", graph=gid)
    frame = graph_frame(tab)
    frame.evaluate("() => { G.maxLines = 7; }")  # the tiny graph is small: a low cap stands in for a large view
    shown = move_and_time(frame, "nt", "1")
    expected = apply_view(ranking(graph), ViewState(node_threshold=1.0))
    assert shown["edges"] == len(expected.edges) > 7  # every kept edge still counts (exports, the link, the status)
    assert shown["linesDrawn"] == 7
    segments = frame.evaluate("""() => document.getElementById('plot').data.filter((t) => t.mode === 'lines')
        .reduce((n, t) => n + t.x.filter((x) => x === null).length, 0)""")
    assert segments == 7
    weight = {(s, t): abs(w) for s, t, w in zip(expected.edges["source"], expected.edges["target"],
                                                  expected.edges["weight"])}
    drawn_lines = {tuple(line) for line in shown["lines"]}
    assert drawn_lines <= set(weight)
    weakest_drawn = min(weight[e] for e in drawn_lines)
    strongest_left = max(w for e, w in weight.items() if e not in drawn_lines)
    assert weakest_drawn >= strongest_left * (1 - 1e-3)  # the payload carries 4 significant digits
    assert "the 7 strongest of" in frame.locator("#status").inner_text()
    # a search puts the found node's lines first
    node = next(s for s, t in sorted(weight, key=weight.get) if s != graph.target_id)
    found = move_and_time(frame, "q", node)
    assert node in found["found"]
    assert any(node in line for line in found["lines"])
    assert tab.problems() == []


def test_graph_and_selected_node_details_fit_a_1400x900_screen(tab: Tab, stored) -> None:
    gid, graph = stored
    view = apply_view(ranking(graph), ViewState())
    node = view.nodes[~view.nodes["is_target"]].sort_values("influence", ascending=False)["node_id"].iloc[0]
    tab.page.set_viewport_size({"width": 1400, "height": 900})
    tab.open("circuit_graph", graph=gid, node=node)
    graph_frame(tab)
    tab.wait_idle()
    header = tab.page.locator('[data-testid="stMain"] h4', has_text=node).first
    header.wait_for(state="visible")
    inputs = tab.page.locator('[data-testid="stMain"]', has_text="Inputs (direct effect on this node)").first
    boxes = {"graph": tab.page.locator('[data-testid="stMain"] iframe').first.bounding_box(),
             "node details": header.bounding_box()}
    for name, box in boxes.items():
        assert box is not None, name
        assert box["y"] >= 0 and box["y"] + box["height"] <= 900, (name, box)
        assert box["x"] >= 0 and box["x"] + box["width"] <= 1400, (name, box)
    assert inputs.is_visible()
    tab.screenshot("graph-view-1400x900")
    assert tab.problems() == []


def test_supernode_and_label_made_in_the_browser_come_back_from_the_link(tab: Tab, stored, browser_context) -> None:
    gid, graph = stored
    tab.open("circuit_graph", graph=gid)
    frame = graph_frame(tab)
    ids = [i for i in drawn(frame)["ids"] if i != graph.target_id]
    other = next(i for i in ids if i.startswith(("T", "A")) and not i.startswith("AE"))  # a feature: it can be zeroed
    ids = [other] + [i for i in ids if i != other]
    group = ids[1:3]
    # box / lasso selection, a name, Group: drawn as one node at once, and the link carries it after the page hears
    emit(frame, "plotly_selected", group)
    frame.locator("#snname").fill("my group")
    frame.locator("#group").click()
    assert drawn(frame)["supernodes"] == ["my group"]
    tab.page.wait_for_function("() => new URL(location.href).searchParams.get('sn') !== null")
    assert json.loads(query_param(tab.page.url, "sn")) == [["my group", *group]]
    # click a node, label it (hostile text: shown as text, never run)
    label = "<img src=x onerror=alert(1)> capital"
    emit(frame, "plotly_click", [other])
    tab.page.locator('[data-testid="stMain"] h4', has_text=other).first.wait_for(state="visible")
    tab.page.get_by_label("Label this node").fill(label)
    tab.page.get_by_role("button", name="Set", exact=True).click()
    tab.page.wait_for_function("() => new URL(location.href).searchParams.get('lbl') !== null")
    tab.page.wait_for_selector(READY, state="attached")
    assert json.loads(query_param(tab.page.url, "lbl")) == {other: label}
    href = tab.page.locator('a[href*="prompt_explorer"]', has_text="Intervene").first.get_attribute("href")
    kind, layer, pos, feature = ("transcoder" if other[0] == "T" else "attn"), *other[1:].split("_")
    assert f"do={kind}%3A{layer}%3A{feature}%40{pos}%3Dzero" in href and "on=frozen%2Clive" in href
    pin = next(i for i in ids[3:] if i != other)
    emit(frame, "plotly_selected", [pin])
    frame.locator("#pin").click()
    tab.page.wait_for_function(f"() => new URL(location.href).searchParams.get('pin') === '{pin}'")
    url = tab.page.url
    # the link in a new session reproduces the view
    fresh = Tab(browser_context.new_page(), tab.base_url)
    try:
        fresh.page.goto(url)
        fresh.wait_ready()
        try:
            again = drawn(graph_frame(fresh))
        finally:
            fresh.screenshot("graph-view-from-link")
        assert again["supernodes"] == ["my group"]
        assert label in again["named"]
        assert again["state"]["selected"] == other and again["state"]["pinned"] == [pin]
        assert set(again["ids"]) == set(drawn(frame)["ids"])
        fresh.page.locator('[data-testid="stMain"] h4', has_text=other).first.wait_for(state="visible")
        assert fresh.problems() == [] and fresh.dialogs == []
    finally:
        fresh.page.close()
    assert tab.problems() == []
