"""Head heatmaps in a real browser: a click on a head's cell opens that head, on Induction Heads and on Head
Polysemanticity (the Attribution Faithfulness case is in test_e2e_attribution.py)."""

from __future__ import annotations

import re
from typing import Callable

import pytest
from e2e_harness import CELLS_JS, Tab, query_param

pytestmark = pytest.mark.e2e


def _click_another_head(tab: Tab, head_of: Callable[[dict[str, str]], str]) -> str:
    """Click, on the page's first head heatmap, a cell whose head ("layer.head") is not the one the link shows now;
    return that head."""
    tab.page.wait_for_function(f"() => ({CELLS_JS})(0) !== null")
    tab.wait_idle()
    current = query_param(tab.page.url, "head")
    cells = tab.page.evaluate(CELLS_JS, 0)
    cell = next(c for c in reversed(cells) if head_of(c) != current)
    tab.page.mouse.click(cell["x"], cell["y"])
    return head_of(cell)


def _opened(tab: Tab, head: str) -> None:
    """The page has chosen ``head``: the link says so and the head picker shows it."""
    tab.page.wait_for_function(f"() => new URL(location.href).searchParams.get('head') === '{head}'")
    tab.wait_idle()
    layer, index = head.split(".")
    shown = tab.page.get_by_role("combobox", name="Head", exact=True).input_value()
    assert re.match(rf"L{layer}\.H{index}\b", shown), shown
    assert tab.problems() == [] and tab.alerts("Error") == []


def test_clicking_an_induction_score_cell_opens_that_head(tab: Tab) -> None:
    tab.open("induction_heads", store="test.duckdb")
    _opened(tab, _click_another_head(tab, lambda c: c["id"]))  # cells carry "layer.head"


def test_clicking_a_polysemanticity_cell_opens_that_head(tab: Tab) -> None:
    tab.open("head_polysemanticity", store="test.duckdb")
    _opened(tab, _click_another_head(tab, _polysemanticity_head))


def _polysemanticity_head(cell: dict[str, str]) -> str:
    """The "layer.head" of a Head Polysemanticity cell: it carries "dict_id|head" under a row named "L<layer>..."."""
    layer = re.match(r"L(\d+)", cell["row"])
    assert layer is not None, cell
    return f"{layer.group(1)}.{cell['id'].rsplit('|', 1)[1]}"
