"""Attribution Faithfulness in a real browser: the key numbers visible without scrolling sideways, a click on a head's
heatmap cell opens that head, and a live comparison with cheaper settings estimated before it starts and run with
one progress bar per method."""

from __future__ import annotations

import re

import pytest
from e2e_harness import CELLS_JS, GRID_JS, Tab, query_param

pytestmark = pytest.mark.e2e
MAIN = '[data-testid="stMain"]'

# Streamlit's column widths "medium" and "large" (px): the method table ends with its two text columns at these widths.
TEXT_COLUMNS_PX = 200 + 400
TABLE_JS = f"""() => {{ for (const g of document.querySelectorAll('{MAIN} [data-testid="stDataFrame"]')) {{
    const heads = [...g.querySelectorAll('th')].map(h => h.innerText.trim()), s = g.querySelector('.dvn-scroller');
    if (heads[0] === 'method' && s) return {{heads, scroll: s.scrollWidth, client: s.clientWidth}}; }}
  return null; }}"""


def test_speedup_and_correlations_are_visible_without_scrolling(tab: Tab) -> None:
    """At 1400 px the method table's numbers (× faster, Pearson r per kind, seconds) come first and end inside the
    visible width: only the trailing text columns (cost, description) may need scrolling sideways."""
    tab.open("attribution_faithfulness", store="test.duckdb")
    tab.page.wait_for_function(f"() => ({TABLE_JS})() !== null")
    tab.wait_idle()
    table = tab.page.evaluate(TABLE_JS)
    heads = table["heads"]
    assert heads[1] == "× faster" and heads[-2:] == ["cost", "what"], heads
    assert all(h.startswith("r (") for h in heads[2:-3]) and heads[-3] == "seconds", heads
    assert table["scroll"] - TEXT_COLUMNS_PX <= table["client"], table  # everything before "cost" is in view


def test_clicking_a_head_cell_opens_that_head(tab: Tab) -> None:
    tab.open("attribution_faithfulness", store="test.duckdb")
    tab.page.get_by_role("tab", name="Attention heads").click()
    tab.page.wait_for_function(f"() => ({CELLS_JS})(0) !== null")
    cell = tab.page.evaluate(CELLS_JS, 0)[-1]
    tab.page.mouse.click(cell["x"], cell["y"])
    layer, head = cell["id"].split(".")
    tab.page.get_by_role("heading", name=f"Head L{layer}H{head}").wait_for(state="visible")
    tab.wait_idle()
    assert query_param(tab.page.url, "head") == cell["id"]
    link = tab.page.locator(f"{MAIN} a", has_text=f"Open head {cell['id']} in Induction Heads")
    link.click()
    tab.page.locator(f"{MAIN} h1", has_text="Induction Heads").wait_for(state="visible")
    tab.wait_ready()
    assert query_param(tab.page.url, "head") == cell["id"]
    assert tab.problems() == []


def test_cheaper_settings_are_estimated_then_run_with_progress_per_method(tab: Tab) -> None:
    tab.open("attribution_faithfulness", store="test.duckdb")
    methods = tab.page.get_by_role("combobox", name="Methods")
    methods.scroll_into_view_if_needed()
    for name in ("atpstar", "ig", "relp"):  # leave out the costlier estimates: AtP and patching remain
        tab.page.get_by_role("button", name=f"Remove {name}").click()
    tab.page.get_by_role("button", name="Estimate the cost").click()
    tab.page.get_by_text("Nothing has run yet").wait_for(state="visible")
    tab.wait_idle()
    # The estimate table (method, estimated seconds), once the grid has drawn its cells.
    find = f"""() => {{ const grids = document.querySelectorAll('{MAIN} [data-testid="stDataFrame"]');
        for (let i = 0; i < grids.length; i++) {{
            const heads = [...grids[i].querySelectorAll('th')].map(h => h.innerText.trim());
            const r = ({GRID_JS})(i);
            if (heads[1] === 'estimated seconds' && r && r.length === 2) return r; }}
        return null; }}"""
    tab.page.wait_for_function(find)
    estimate = tab.page.evaluate(find)
    assert [row[0] for row in estimate] == ["atp", "patching"]  # run order: patching last
    assert all(float(row[1]) > 0 for row in estimate), estimate
    tab.page.get_by_role("button", name="Run the methods").click()
    for name in ("atp", "patching"):
        tab.page.get_by_text(re.compile(rf"^{name} · done in \d+\.\d s$")).wait_for(state="visible")
    tab.page.get_by_text(re.compile(r"^About .* left \(")).wait_for(state="visible")
    tab.wait_idle()
    assert tab.page.get_by_text(re.compile(r"^(ig|relp|atpstar) · ")).count() == 0
    assert tab.problems() == [] and tab.alerts("Error") == []
    tab.screenshot("journey-attribution-cheaper-run")
