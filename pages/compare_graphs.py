"""Compare Graphs: the attribution graphs of two prompts side by side (backend.circuits.compare).

Each prompt's graph is built with the store's transcoders and attention SAEs for its top prediction (or a typed
answer), pruned with the same thresholds, and the two are matched by position-independent node keys: a transcoder or
attention feature by (kind, layer, feature), an embedding by its token, an error node by (kind, layer). Both figures
ring the nodes the other graph shares (green) and the ones only this graph has (red), and a table lists the nodes
whose influence on the target changed most. Deep link: ``?store=...&model=...&a=PROMPT&b=PROMPT``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from backend.errors import InputError
from backend.ui import cache, shell

A_PARAM, B_PARAM = "a", "b"
ANSWER_A_PARAM, ANSWER_B_PARAM = "answer_a", "answer_b"
DEFAULT_A = "When Mary and John went to the store, John gave a drink to"
DEFAULT_B = "When Alice and Bob went to the park, Bob gave a ball to"
SHARED_COLOR, ONLY_COLOR = "#2ca02c", "#d62728"
TOP = 20
_KEYS = {A_PARAM: "cmp_a", B_PARAM: "cmp_b", ANSWER_A_PARAM: "cmp_answer_a", ANSWER_B_PARAM: "cmp_answer_b"}
_DEFAULTS = {A_PARAM: DEFAULT_A, B_PARAM: DEFAULT_B, ANSWER_A_PARAM: "", ANSWER_B_PARAM: ""}


def _inputs() -> dict[str, str]:
    """The two prompts (and optional answers): text boxes started from the link, written back into it."""
    ss = st.session_state
    for param, key in _KEYS.items():
        if key not in ss:
            ss[key] = st.query_params.get(param) or _DEFAULTS[param]
    with st.form("cmp_form"):
        c = st.columns(2)
        c[0].text_area("Prompt A", key=_KEYS[A_PARAM], height=80)
        c[1].text_area("Prompt B", key=_KEYS[B_PARAM], height=80)
        c[0].text_input("Answer A (optional; default: the top prediction)", key=_KEYS[ANSWER_A_PARAM])
        c[1].text_input("Answer B (optional; default: the top prediction)", key=_KEYS[ANSWER_B_PARAM])
        st.form_submit_button("Compare the graphs")
    values = {param: str(ss[key]) for param, key in _KEYS.items()}
    for param, value in values.items():
        shell.set_param(param, value if value.strip() and len(value) <= shell.MAX_LINK_CHARS else None)
    return values


def _figure(graph: Any, shared: set[str], only: set[str]) -> Any:
    """The graph's figure (backend.circuits.figure) with rings over the shared and the unique nodes."""
    import plotly.graph_objects as go

    from backend.circuits.figure import figure
    from backend.circuits.layout import layout

    pos = layout(graph)
    fig = figure(graph, positions=pos)
    for ids, color, name in ((shared, SHARED_COLOR, "shared with the other graph"), (only, ONLY_COLOR, "only here")):
        ids = sorted(i for i in ids if i in pos)
        if not ids:
            continue
        fig.add_trace(go.Scatter(x=[pos[i][0] for i in ids], y=[pos[i][1] for i in ids], mode="markers", name=name,
                                 customdata=ids, hoverinfo="skip",
                                 marker=dict(symbol="circle-open", size=30, color=color, line=dict(width=3))))
    fig.update_layout(width=None, autosize=True, legend=dict(y=1.12))
    return fig


def body(ctx: shell.PageContext) -> None:
    """Two prompts in, two graphs and their comparison out."""
    from backend.circuits.compare import compare_graphs
    from backend.circuits.prune import prune

    if ctx.model is None:
        st.warning(f"This store records no model: build it with {shell.build_hint(ctx)}.")
        return
    values = _inputs()
    c = st.columns(2)
    node_t = c[0].slider("Node influence kept", 0.0, 1.0, 0.8, 0.01, key="cmp_node_t",
                         help="Each graph keeps its most influential nodes until they account for this share.")
    edge_t = c[1].slider("Edge influence kept", 0.0, 1.0, 0.98, 0.01, key="cmp_edge_t")
    graphs = []
    for side, answer in ((A_PARAM, ANSWER_A_PARAM), (B_PARAM, ANSWER_B_PARAM)):
        try:
            with st.spinner(f"Building the graph of prompt {side.upper()}…"):
                g = cache.cached_graph(ctx.model, str(ctx.store.path), ctx.store.file_key, values[side],
                                       values[answer].strip("\n") or None)
        except InputError as exc:
            st.error(f"Prompt {side.upper()}: {exc}")
            return
        graphs.append(prune(g, node_t, edge_t))
    result = compare_graphs(*graphs)
    counts = result.counts()
    m = st.columns(3)
    m[0].metric("Shared nodes", counts["shared"], help="keys present in both graphs")
    m[1].metric("Only in A", counts["only_a"])
    m[2].metric("Only in B", counts["only_b"])
    sets = result.node_sets()
    cols = st.columns(2)
    for col, side, graph in zip(cols, ("a", "b"), graphs):
        t = graph.metadata["target"]
        col.markdown(f"**{side.upper()}** → target {shell.literal(repr(t['token']))} "
                     f"({len(graph.nodes)} nodes after pruning)")
        col.plotly_chart(_figure(graph, sets[f"shared_{side}"], sets[f"only_{side}"]), key=f"cmp_fig_{side}",
                         config={"displayModeBar": False})
    st.caption("Rings: green = the other graph has this node (same feature, token or error layer, at any position); "
               "red = only this graph has it. Nodes are sized by influence on their own graph's target.")
    st.subheader("Nodes whose influence changed most")
    top = result.changed(TOP)
    st.dataframe(pd.DataFrame({
        "node": top["text"], "label": top["label"],
        "in": ["both" if a and b else "A only" if a else "B only" for a, b in zip(top["in_a"], top["in_b"])],
        "influence A": top["influence_a"], "influence B": top["influence_b"], "change (B − A)": top["change"],
    }), hide_index=True, column_config={c: st.column_config.NumberColumn(format="%+.4f")
                                        for c in ("influence A", "influence B", "change (B − A)")})
    st.caption("A node's influence is the share of its graph's explanation of the target that flows through it "
               "(summed over the positions it appears at); a node a graph lacks counts 0 there.")
    with st.expander(f"Every node ({len(result.table)})"):
        st.dataframe(pd.DataFrame({"node": result.table["text"], "label": result.table["label"],
                                   "in A": result.table["in_a"], "in B": result.table["in_b"],
                                   "change (B − A)": result.table["change"]}), hide_index=True)


shell.run_page("Compare Graphs", body,
               caption="The attribution graphs of two prompts side by side: shared and unique nodes, and the nodes "
                       "whose influence on the target changed most.")
