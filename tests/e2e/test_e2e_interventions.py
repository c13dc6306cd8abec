"""Interventions and feature choices in the Prompt Explorer, in a real browser: compose an intervention and see the
continuation change (checked against a TransformerLens hook written here), frozen and live side by side from a
``do=`` link, the "steer with this feature" link, and a feature choice that does not outlive a prompt it does not fire
on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from e2e_harness import BOS, Tab, submit_prompt, wait_for_strip
from playwright.sync_api import expect

from backend.features import queries as feature_queries
from backend.inputs.prompts import encode_prompt, token_strings
from backend.store.access import reading
from backend.ui import intervention_links as links
from backend.ui.token_html import visible_token

pytestmark = pytest.mark.e2e
PROMPT = "The cat sat on the mat because it was tired"
MAIN = '[data-testid="stMain"]'


def _continuation(tab: Tab, name: str) -> str:
    """The tokens of one continuation strip (``live-unchanged``, ``live-intervened``) as the page shows them."""
    sel = f'{MAIN} [data-cs-continuation="{name}"]'
    tab.page.locator(sel).first.wait_for(state="visible")
    return "".join(tab.page.locator(f"{sel} span").all_inner_texts())


def _greedy(model: Any, ids: list[int], hooks: list[tuple[str, Any]], n: int) -> list[int]:
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model.run_with_hooks(torch.tensor([seq]), fwd_hooks=hooks)[0, -1].argmax()))
    return seq[len(ids):]


def _shown(model: Any, ids: list[int]) -> str:
    return "".join(visible_token(t) for t in token_strings(model.tokenizer, ids))


def _choose(tab: Tab, label: str, option: str | re.Pattern[str]) -> None:
    """Pick ``option`` in the (first) selectbox labelled exactly ``label``, as a user would."""
    box = tab.page.get_by_role("combobox", name=label, exact=True).first
    box.scroll_into_view_if_needed()
    box.click()
    choice = tab.page.get_by_role("option", name=option, exact=isinstance(option, str))
    try:
        choice.wait_for(state="visible", timeout=10_000)
    except Exception:  # the list did not open (a rerun redrew the box under the click): click once more
        box.click()
    choice.click()
    tab.wait_idle()


def test_intervene_on_a_head_and_see_the_continuation_change(tab: Tab, tiny_model: Any) -> None:
    """Type a prompt, compose "head 0 of layer 1 scaled by 0" with the builder, add it: the live continuation is the
    one an independent hook on hook_z gives, and it differs from the unchanged one."""
    tab.open("prompt_explorer")
    submit_prompt(tab, PROMPT)
    wait_for_strip(tab, BOS + PROMPT)
    if not tab.page.get_by_role("combobox", name="Unit").is_visible():  # the builder opens when nothing is chosen
        tab.page.get_by_text("Add an intervention", exact=True).click()
    _choose(tab, "Unit", "attention head")
    _choose(tab, "Layer", "1")
    _choose(tab, "Mode", "scale")
    value = tab.page.get_by_label("Value", exact=True)
    for _ in range(3):  # the mode's rerun may redraw the box (back at its default) under the typing: type again
        value.fill("0")
        value.press("Enter")
        tab.wait_idle()
        try:
            expect(value).to_have_value(re.compile(r"^0(\.0*)?$"), timeout=10_000)
            break
        except AssertionError:
            continue
    tab.page.get_by_role("button", name="Add this intervention").click()
    # the click's rerun may not have started when the page last looked idle: wait for the value, not for idleness
    expect(tab.page.get_by_role("textbox", name=re.compile("^Interventions"))).to_have_value("head:1:0=scale:0",
                                                                                            timeout=120_000)
    tab.wait_idle()

    ids = encode_prompt(tiny_model, PROMPT).ids

    def zero_head(z: torch.Tensor, hook: Any) -> torch.Tensor:
        z = z.clone()
        z[0, 1:, 0] = 0.0  # every position after BOS, the new tokens included
        return z

    plain = _greedy(tiny_model, ids, [], 8)
    steered = _greedy(tiny_model, ids, [("blocks.1.attn.hook_z", zero_head)], 8)
    assert plain != steered  # the journey needs an intervention that changes the continuation
    assert _continuation(tab, "live-unchanged") == _shown(tiny_model, plain)
    assert _continuation(tab, "live-intervened") == _shown(tiny_model, steered)
    tab.page.get_by_text("The greedy continuation changes from its token").wait_for(state="visible")
    assert tab.page.url.count("do=head%3A1%3A0%3Dscale%3A0") == 1  # the result is a link
    assert tab.problems() == [] and tab.alerts("Error") == []
    tab.screenshot("journey-intervene-head")


def _firing(model: Any, store: Path, prompt: str) -> tuple[int, int, int, int]:
    """(transcoder layer, feature, attention-SAE layer, feature) firing at the prompt's last position."""
    from backend.dictionaries.storage import graph_dictionaries

    with reading(store) as con:
        transcoders, saes = graph_dictionaries(con, "tiny-llama")
    ids = encode_prompt(model, prompt).ids
    tl, al = max(transcoders), max(saes)
    names = [f"blocks.{tl}.ln2.hook_normalized", f"blocks.{al}.attn.hook_z"]
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=names)
        tf = int(transcoders[tl].encode(cache[names[0]][0])[-1].argmax())
        z = cache[names[1]][0]
        af = int(saes[al].encode(z.reshape(z.shape[0], -1))[-1].argmax())
    return tl, tf, al, af


def test_frozen_and_live_side_by_side_from_a_link(tab: Tab, tiny_model: Any, tiny_store: Path) -> None:
    """A Circuit-Graph-style link (features zeroed at a position, on=frozen,live) opens both runs side by side: the
    frozen one says why it has no continuation, the live one shows it, and the numbers are the backend's."""
    from backend.api import open_workspace

    tl, tf, al, af = _firing(tiny_model, tiny_store, PROMPT)
    last = len(encode_prompt(tiny_model, PROMPT).ids) - 1
    do = f"transcoder:{tl}:{tf}@{last}=zero;attn:{al}:{af}@{last}=zero"
    params = links.intervention_params("test.duckdb", "tiny-llama", do, on=("frozen", "live"), prompt=PROMPT,
                                       answer=" the")
    tab.open("prompt_explorer", **params)
    tab.page.locator(f"{MAIN} strong", has_text="Frozen replacement model").wait_for(state="visible")
    tab.page.locator(f"{MAIN} strong", has_text="Live model").wait_for(state="visible")
    _continuation(tab, "live-intervened")
    tab.wait_idle()
    assert tab.page.locator(f'{MAIN} [data-cs-continuation^="frozen"]').count() == 0
    assert any("no continuation" in t for t in tab.alerts("Info"))
    ws = open_workspace(tiny_store, model="tiny-llama")
    metrics = tab.page.locator(f'{MAIN} [data-testid="stMetric"]', has_text="logit − mean logit")
    shown = [v.strip() for v in metrics.locator('[data-testid="stMetricValue"]').all_inner_texts()]
    expected = [f"{ws.intervene(PROMPT, do, on=mode, answer=' the').intervened.metric:.3f}" for mode in ("frozen", "live")]
    assert shown == expected
    assert tab.problems() == [] and tab.alerts("Error") == []
    tab.screenshot("journey-intervene-frozen-live")


def test_steer_with_a_feature_opens_the_prompt_explorer_with_it(tab: Tab, tiny_store: Path) -> None:
    """The dashboard's "steer with this feature" link (backend.ui.intervention_links.steer_link), clicked on the
    feature's dashboard, opens the Prompt Explorer with the feature preselected, held at its corpus maximum, and
    runs it on the live model."""
    with reading(tiny_store) as con:
        dicts = feature_queries.feature_dictionaries(con, kind="attn_sae")
        dict_id = str(dicts["dict_id"].iloc[0])
        layer = int(dicts["layer"].iloc[0])
        feature = int(feature_queries.features_by_layer(con, dict_id, "max_act", 1)["feature"].iloc[0])
        summary = feature_queries.feature_summary(con, dict_id, feature)
    spec = links.steer_spec("attn_sae", layer, feature, summary["max_act"])
    assert spec == f"attn:{layer}:{feature}=set:{summary['max_act']:.4g}"
    tab.open("feature_browser", dict=dict_id, feature=str(feature))
    tab.page.get_by_role("link", name=f"Steer with feature #{feature} in the Prompt Explorer").click()
    tab.wait_ready()
    _continuation(tab, "live-intervened")
    tab.wait_idle()
    assert tab.page.get_by_role("textbox", name=re.compile("^Interventions")).input_value() == spec
    assert tab.page.locator(f"{MAIN} strong", has_text="Live model").is_visible()
    assert tab.problems() == [] and tab.alerts("Error") == []


def _attn_acts(model: Any, store: Path, prompt: str) -> torch.Tensor:
    """Every attention-SAE feature's activation at the prompt's last position (sae-lens' encode on hook_z)."""
    from backend.dictionaries.storage import graph_dictionaries

    with reading(store) as con:
        _, saes = graph_dictionaries(con, "tiny-llama")
    layer = min(saes)
    ids = encode_prompt(model, prompt).ids
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=[f"blocks.{layer}.attn.hook_z"])
        z = cache[f"blocks.{layer}.attn.hook_z"][0]
        return saes[layer].encode(z.reshape(z.shape[0], -1))[-1]


def test_a_chosen_feature_does_not_outlive_a_prompt_it_does_not_fire_on(tab: Tab, tiny_model: Any,
                                                                       tiny_store: Path) -> None:
    """Type a prompt, pick one of its last token's features, type a new prompt on which that feature is silent: the
    picker moves to a feature that fires there, and its label and the panel show the same activation."""
    acts_a = _attn_acts(tiny_model, tiny_store, PROMPT)
    top_a = [int(f) for f in torch.topk(acts_a, 5).indices if acts_a[f] > 0]
    candidates = ["One two three four", "Hello world", "Dogs bark loudly at night", "A B C D E F"]
    pick, other = next((f, b) for b in candidates for f in top_a[1:] if _attn_acts(tiny_model, tiny_store, b)[f] == 0)
    tab.open("prompt_explorer")
    submit_prompt(tab, PROMPT)
    wait_for_strip(tab, BOS + PROMPT)
    _choose(tab, "Feature", re.compile(rf"^#{pick} · act"))
    picker = tab.page.get_by_role("combobox", name="Feature", exact=True).first
    tab.page.get_by_text(re.compile(rf"^Feature #{pick} of")).wait_for(state="visible")

    submit_prompt(tab, other)
    wait_for_strip(tab, BOS + other)
    tab.page.get_by_text(f"Feature #{pick} does not fire at position").wait_for(state="visible")
    acts_b = _attn_acts(tiny_model, tiny_store, other)
    top_b = int(acts_b.argmax())
    label = picker.input_value()
    assert label.startswith(f"#{top_b} · act "), label
    shown_act = label.split("act ")[1].split()[0]
    assert float(shown_act) == pytest.approx(float(acts_b[top_b]), abs=1e-3)
    panel = tab.page.get_by_text(re.compile(rf"^Feature #{top_b} of")).inner_text()
    assert panel.rstrip().endswith(f"activation {shown_act}"), panel
    assert tab.problems() == [] and tab.alerts("Error") == []
    tab.screenshot("journey-stale-feature")


# ---------------------------------------------------------------------------------------------------------------
# Compare Graphs

RINGS_JS = """() => { const out = {};
  document.querySelectorAll('[data-testid="stMain"] .js-plotly-plot').forEach((el, i) => {
    for (const t of el.data || []) if (t.name === 'shared with the other graph' || t.name === 'only here')
      out[`${i}:${t.name}`] = [...t.customdata].sort(); });
  return out; }"""


def test_compare_graphs_shows_shared_and_unique_nodes(tab: Tab, tiny_model: Any, tiny_store: Path) -> None:
    """Two prompts by link: the counts and the rings on each figure are the comparison of the two graphs built here."""
    from backend.circuits.build import build_graph
    from backend.circuits.compare import compare_graphs
    from backend.circuits.prune import prune
    from backend.dictionaries.storage import graph_dictionaries

    a, b = "When Mary and John went to the store, John gave a drink to", "The cat sat on the mat because it was"
    with reading(tiny_store) as con:
        transcoders, saes = graph_dictionaries(con, "tiny-llama")
    graphs = [prune(build_graph(tiny_model, p, transcoders, saes, model_name="tiny-llama")) for p in (a, b)]
    expected = compare_graphs(*graphs)
    tab.open("compare_graphs", store="test.duckdb", a=a, b=b)
    tab.page.locator(f'{MAIN} [data-testid="stPlotlyChart"]').nth(1).wait_for(state="visible")
    tab.wait_idle()
    counts = expected.counts()
    assert (tab.metric("Shared nodes"), tab.metric("Only in A"), tab.metric("Only in B")) == \
        (str(counts["shared"]), str(counts["only_a"]), str(counts["only_b"]))
    sets = expected.node_sets()
    rings = tab.page.evaluate(RINGS_JS)
    assert rings.get("0:shared with the other graph", []) == sorted(sets["shared_a"])
    assert rings.get("0:only here", []) == sorted(sets["only_a"])
    assert rings.get("1:shared with the other graph", []) == sorted(sets["shared_b"])
    assert rings.get("1:only here", []) == sorted(sets["only_b"])
    assert counts["shared"] > 0 and counts["only_a"] + counts["only_b"] > 0
    assert tab.problems() == [] and tab.alerts("Error") == []
    tab.screenshot("journey-compare-graphs")
