"""Circuit Graph: attribution graphs of transcoder circuits (Dunefsky et al. 2024) for a prompt and a target logit.

A thin view over :mod:`backend.circuits`: stored graphs (``?graph=ID``) or a new one built live from the store's
transcoders and attention SAEs (``?prompt=...&answer=...&wrong=...``); how far to trust it (graph scores as built and
for the shown view, the target split into its direct edges plus a constant, cancellation ratios); pruning sliders
(node / edge influence thresholds), pinned and hidden nodes, strongest input→target paths highlighted, a node panel
(edges in and out, the attention heads that carry its strongest inputs, hover examples, the Feature Browser link, the
input-invariant view for transcoder features), the faithfulness check with frozen and live error nodes, and
downloads (SVG, PNG, GraphML, DOT, Neuronpedia JSON). The method is documented in backend/circuits/.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from backend.circuits import queries as circuit_queries
from backend.circuits import storage as graph_storage
from backend.errors import CircuitscopeError
from backend.ui import cache, shell, token_html

GRAPH_PARAM = "graph"
PROMPT_PARAM = "prompt"
ANSWER_PARAM = "answer"
WRONG_PARAM = "wrong"
NODE_PARAM = "node"
DEFAULT_PROMPT = "The capital of France is"
_LIVE = "_cg_live"  # session key: the graph built in this session (not stored yet)
_IMAGES = "_cg_images"
_PICK_NEXT = "_cg_pick_next"
_SPLITS = "_cg_splits"  # session key: {(graph key, node): per-head split of its strongest inputs}
PLOT_KEY = "cg_plot"


def _dictionaries(ctx: shell.PageContext, attn_saes: bool) -> tuple[dict, dict]:
    return cache.cached_graph_dictionaries(str(ctx.store.path), ctx.store.file_key, ctx.model, attn_saes)


def _build(ctx: shell.PageContext, prompt: str, answer: str, wrong: str, max_nodes: int, attn_saes: bool) -> Any:
    from backend.circuits.build import BuildParams, build_graph

    transcoders, saes = _dictionaries(ctx, attn_saes)
    model = cache.get_model(ctx.model)
    return build_graph(model, prompt, transcoders, saes, answer=answer or None, wrong=wrong or None,
                       params=BuildParams(max_nodes=max_nodes), model_name=ctx.model)


def _choose_graph(ctx: shell.PageContext) -> Any:
    """The stored graph picked (or linked), or the one built in this session; None if neither."""
    stored: pd.DataFrame = ctx.store.query(graph_storage.list_graphs, ctx.model)
    live = st.session_state.get(_LIVE)
    options = (["(built in this session)"] if live is not None else []) + stored["graph_id"].tolist()
    titles = dict(zip(stored["graph_id"], stored["title"]))
    linked = st.query_params.get(GRAPH_PARAM)
    if linked and linked not in titles:
        st.error(f"This store has no graph {shell.literal(linked)}: pick one below, or build one.")
        shell.set_param(GRAPH_PARAM, None)
        linked = None
    if not options:
        return None
    index = options.index(linked) if linked in options else 0
    pending = st.session_state.pop(_PICK_NEXT, None)
    if pending in options:
        st.session_state["cg_pick"] = pending
    choice = st.selectbox("Graph", options, index=index, key="cg_pick",
                          format_func=lambda g: g if g not in titles else f"{titles[g]}  ·  {g}")
    if choice == "(built in this session)":
        shell.set_param(GRAPH_PARAM, None)
        return live
    shell.set_param(GRAPH_PARAM, choice)
    return ctx.store.query(graph_storage.read_graph, choice)


def _build_form(ctx: shell.PageContext) -> None:
    with st.expander("Build a graph for your own prompt", expanded=st.session_state.get(_LIVE) is None):
        with st.form("cg_build"):
            prompt = st.text_area("Prompt", value=st.query_params.get(PROMPT_PARAM, DEFAULT_PROMPT), max_chars=2000)
            c1, c2, c3 = st.columns(3)
            answer = c1.text_input("Target token (empty: the model's top prediction)",
                                   value=st.query_params.get(ANSWER_PARAM, ""))
            wrong = c2.text_input("Minus this token's logit (optional)", value=st.query_params.get(WRONG_PARAM, ""))
            max_nodes = c3.number_input("Feature nodes kept", min_value=20, max_value=2000, value=400, step=20,
                                        help="Embeddings and error nodes are always kept.")
            attn_saes = st.checkbox("Use the store's attention SAEs for their layers (else attention is part of the "
                                    "edges there too)", value=True)
            go = st.form_submit_button("Build graph")
        if go:
            with st.spinner("Building the attribution graph…"):
                try:
                    graph = _build(ctx, prompt, answer, wrong, int(max_nodes), attn_saes)
                except CircuitscopeError as exc:
                    st.error(str(exc))
                    return
            st.session_state[_LIVE] = graph
            st.session_state.pop(_IMAGES, None)
            st.session_state["cg_pick"] = "(built in this session)"
            for w in graph.metadata.get("warnings", []):
                st.warning(w)
            st.rerun()


def _hover(ctx: shell.PageContext, graph: Any) -> dict[str, str]:
    """Hover text for feature nodes with stored examples: their top activating contexts."""
    feats = graph.nodes[graph.nodes["kind"].isin(["transcoder", "attn_feature"]) & graph.nodes["dict_id"].notna()]
    if feats.empty:
        return {}
    pairs = tuple(sorted({(str(d), int(f)) for d, f in zip(feats["dict_id"], feats["feature"])}))
    ex: pd.DataFrame = ctx.store.query(circuit_queries.graph_feature_examples, ctx.model, pairs)
    if ex.empty:
        return {}
    by = {k: g for k, g in ex.groupby(["dict_id", "feature"])}
    out = {}
    for row in feats.itertuples():
        g = by.get((row.dict_id, int(row.feature)))
        if g is None:
            continue
        lines = [f"{row.label} (act {row.activation:.2f}, attribution {row.attribution:+.3f})", "top examples:"]
        lines += [f"{r.act:.2f}: …{token_html.visible_token(r.context)}" for r in g.itertuples()]
        out[row.node_id] = "\n".join(lines)  # figure() escapes it
    return out


def _view(graph: Any) -> tuple[Any, list[str], list[tuple[list[str], float]]]:
    """Sliders, pins and hides applied: the graph to draw, the hidden ids and the highlighted paths."""
    from backend.circuits.prune import graph_scores, prune, strongest_paths

    c1, c2, c3 = st.columns(3)
    node_t = c1.slider("Node influence kept", 0.0, 1.0, 0.8, 0.01, key="cg_node_t",
                       help="Keep the most influential nodes until they account for this share of the total.")
    edge_t = c2.slider("Edge influence kept", 0.0, 1.0, 0.98, 0.01, key="cg_edge_t")
    k_paths = c3.slider("Strongest paths highlighted", 0, 10, 3, key="cg_paths")
    pruned = prune(graph, node_t, edge_t)
    all_ids = graph.nodes["node_id"].tolist()
    labels = dict(zip(graph.nodes["node_id"], graph.nodes["label"]))
    fmt = lambda n: f"{labels.get(n, n)} · {n}"  # noqa: E731
    c1, c2 = st.columns(2)
    pinned = c1.multiselect("Pin nodes (always shown)", all_ids, key="cg_pin", format_func=fmt)
    hidden = c2.multiselect("Hide nodes", [n for n in all_ids if n != graph.target_id], key="cg_hide", format_func=fmt)
    keep = (set(pruned.nodes["node_id"]) | set(pinned)) - set(hidden)
    edges = pd.concat([pruned.edges, graph.edges[graph.edges["source"].isin(pinned) | graph.edges["target"].isin(pinned)]]
                      ).drop_duplicates(["source", "target"])
    view = graph.subgraph(keep, edges)
    view.nodes = view.nodes.drop(columns=["influence"]).merge(
        pruned.nodes[["node_id", "influence"]], on="node_id", how="left")[graph.nodes.columns]
    view.metadata["pruning"] = pruned.metadata["pruning"] | {"pinned": list(pinned), "hidden": list(hidden),
                                                             "scores": graph_scores(view)}
    paths = strongest_paths(view, k=k_paths) if k_paths else []
    return view, hidden, paths


def _node_panel(ctx: shell.PageContext, graph: Any, view: Any, node: str) -> None:
    row = graph.node(node)
    st.markdown(f"#### {shell.literal(row['label'])} · {shell.literal(node)}")
    tokens = graph.tokens
    tok = tokens[int(row["pos"])] if 0 <= int(row["pos"]) < len(tokens) else ""
    st.caption(f"{shell.literal(row['kind'])} · layer {row['layer']} · position {row['pos']} "
               f"({shell.literal(token_html.visible_token(tok))}) · activation {row['activation']:.3f} · "
               f"total attribution to the target {row['attribution']:+.3f}")
    c1, c2 = st.columns(2)
    e = view.edges
    names = dict(zip(graph.nodes["node_id"], graph.nodes["label"]))
    for col, side, other in ((c1, "target", "source"), (c2, "source", "target")):
        part = e[e[side] == node].copy()
        part["node"] = part[other].map(names)
        part = part.reindex(part["weight"].abs().sort_values(ascending=False).index).head(15)
        col.markdown("**Inputs (direct effect on this node)**" if side == "target" else "**Outputs**")
        col.dataframe(part[["node", other, "weight", "invariant"]], hide_index=True, width="stretch")
    if row["kind"] in ("transcoder", "attn_feature", "logit"):
        _heads_panel(ctx, graph, node, names)
    if row["kind"] in ("transcoder", "attn_feature") and row.get("dict_id"):
        with_dash = ctx.store.query(circuit_queries.dictionaries_with_features)
        if row["dict_id"] in with_dash:
            params = {shell.STORE_PARAM: ctx.store.name, shell.MODEL_PARAM: ctx.model or "", "dict": row["dict_id"],
                      "feature": str(int(row["feature"]))}
            try:
                st.page_link("pages/feature_browser.py", label=f"Open feature #{int(row['feature'])} in the Feature Browser",
                             icon=":material/open_in_new:", query_params=params)
            except Exception:  # noqa: BLE001 - page run on its own: a plain link with the same address
                from urllib.parse import urlencode

                st.markdown(f"[Open feature #{int(row['feature'])} in the Feature Browser](feature_browser?{urlencode(params)})")
        else:
            st.caption("This dictionary's features have no stored dashboards yet.")
    if row["kind"] == "transcoder":
        _invariant_panel(ctx, int(row["layer"]), int(row["feature"]))


def _heads_panel(ctx: shell.PageContext, graph: Any, node: str, names: dict[str, str]) -> None:
    """The node's strongest incoming edges (in the graph as built) and the attention heads that carry them."""
    from backend.circuits.graph import has_head_nodes
    from backend.circuits.split import incoming_heads, summarise

    st.markdown("**Which heads carry its strongest inputs** (each edge split by the last attention hop of its paths; "
                "`residual`: the same-position path without attention)")
    if has_head_nodes(graph) or graph.metadata.get("attention") != "pass-through":
        st.caption("This graph was built with attention heads as nodes (before edges carried attention): rebuild it "
                   "to see which heads carry its edges.")
        return
    key = (st.query_params.get(GRAPH_PARAM) or id(graph), node)
    splits = st.session_state.setdefault(_SPLITS, {})
    if key not in splits:
        attn = bool(graph.metadata.get("dictionaries", {}).get("attn_sae_layers"))
        transcoders, saes = _dictionaries(ctx, attn)
        with st.spinner("Splitting its strongest inputs by attention head…"):
            try:
                splits[key] = incoming_heads(cache.get_model(ctx.model), graph, transcoders, saes, node)
            except CircuitscopeError as exc:
                st.caption(str(exc))
                return
    table = summarise(splits[key], names)
    if table.empty:
        st.caption("It has no incoming edges.")
    else:
        st.dataframe(table, hide_index=True, width="stretch")


def _invariant_panel(ctx: shell.PageContext, layer: int, feature: int) -> None:
    from backend.circuits.invariant import invariant_neighbours

    transcoders, _ = _dictionaries(ctx, False)
    st.markdown("**Input-invariant connections** (decoder·encoder only, the same for every prompt)")
    up, down = invariant_neighbours(transcoders, layer, feature, k=10)
    c1, c2 = st.columns(2)
    c1.caption("Upstream features writing into its encoder")
    c1.dataframe(up, hide_index=True, width="stretch")
    c2.caption("Downstream features it writes into")
    c2.dataframe(down, hide_index=True, width="stretch")


def _faithfulness(ctx: shell.PageContext, graph: Any, view: Any) -> None:
    from backend.circuits import faithfulness as faith

    c1, c2 = st.columns([1, 3])
    mode = c1.radio("Ablate the rest", faith.MODES, key="cg_ablate", horizontal=True,
                    help="zero: set to 0; mean: set to its mean over the store's corpus contexts")
    if c2.button("Check faithfulness of the shown circuit", key="cg_faith"):
        attn = bool(graph.metadata.get("dictionaries", {}).get("attn_sae_layers"))
        transcoders, saes = _dictionaries(ctx, attn)
        model = cache.get_model(ctx.model)
        with st.spinner("Running the model with everything outside the circuit ablated…"):
            try:
                results = faith.check_in_store(model, view, transcoders, saes, mode, ctx.store.path, ctx.model)
            except CircuitscopeError as exc:
                st.error(str(exc))
                return
        st.session_state["_cg_faith"] = (_view_key(view), mode, results)
    shown = st.session_state.get("_cg_faith")  # kept across reruns while the shown circuit and mode stay the same
    if shown is None or shown[0] != _view_key(view) or shown[1] != mode:
        return
    cols = st.columns(2)
    for col, (errors, result) in zip(cols, shown[2].items()):
        col.markdown(f"**Error nodes {'frozen at their clean values' if errors == 'frozen' else 'recomputed live'}**")
        if result.caveat:
            col.warning(result.caveat)
        else:
            col.metric("Fraction of the metric kept", f"{result.fraction:.3f}")
        col.caption(f"circuit only {result.metric_circuit:.3f} · full model {result.metric_full:.3f} · everything "
                    f"ablated {result.metric_empty:.3f}")


def _view_key(view: Any) -> tuple[Any, ...]:
    return (st.query_params.get(GRAPH_PARAM), tuple(view.metadata.get("token_ids", [])),
            tuple(sorted(view.nodes["node_id"])))


def _trust(graph: Any, view: Any) -> None:
    """Graph scores (as built and for the shown view) and the conservation split with its cancellation ratios."""
    from backend.circuits.prune import graph_scores
    from backend.circuits.quality import cancellation_note

    built = graph.metadata.get("scores") or graph_scores(graph)
    shown = view.metadata["pruning"]["scores"]
    c1, c2, c3 = st.columns(3)
    c1.metric("Replacement score", f"{shown['replacement']:.3f}", help="Share of the tokens' influence on the target "
              "that reaches it without passing an error node (circuit-tracer). As built: "
              f"{built['replacement']:.3f}.")
    c2.metric("Completeness score", f"{shown['completeness']:.3f}", help="Influence-weighted share of the nodes' "
              f"inputs that do not come from error nodes (circuit-tracer). As built: {built['completeness']:.3f}.")
    c3.metric("Error nodes' share of influence", f"{shown['error_share']:.3f}",
              help=f"As built: {built['error_share']:.3f}.")
    st.caption(f"Scores of the shown view; as built: replacement {built['replacement']:.3f}, completeness "
               f"{built['completeness']:.3f}, error share {built['error_share']:.3f}.")
    cons = graph.metadata.get("conservation")
    if cons:
        d = cons["direct"]
        st.caption(f"The target {cons['target']:.3f} = features {d['features']:+.3f} + error nodes {d['errors']:+.3f} + "
                   f"embeddings {d['embeddings']:+.3f} + constant {d['constant']:+.3f} (its direct edges from every "
                   f"candidate node; the constant is BOS and biases). Cancellation: Σ|direct edges| / |their sum| = "
                   f"{cons['direct_cancellation']:.2f}, Σ|total attribution of the inputs| / |target| = "
                   f"{cons['input_cancellation']:.2f}.")
        note = cancellation_note(cons)
        if note:
            st.warning(note)


def _downloads(view: Any, stem: str) -> None:
    from backend.circuits.export import FORMATS, export

    cols = st.columns(len(FORMATS) + 1)
    images = st.session_state.get(_IMAGES)
    key = (stem, tuple(sorted(view.nodes["node_id"])), len(view.edges))
    for col, (name, fmt) in zip(cols, FORMATS.items()):
        if name in ("svg", "png"):
            if images is None or images[0] != key:
                continue
            data = images[1][name]
        else:
            data = export(view, name)
        col.download_button(f"{name.upper()}", data=data, file_name=f"{stem}{fmt.extension}", mime=fmt.mime,
                            key=f"cg_dl_{name}")
    if images is None or images[0] != key:
        if cols[-1].button("Render SVG + PNG", key="cg_render", help="Static images are drawn by a headless browser "
                                                                      "(a few seconds)."):
            with st.spinner("Rendering images…"):
                try:
                    st.session_state[_IMAGES] = (key, {n: export(view, n) for n in ("svg", "png")})
                except CircuitscopeError as exc:
                    st.error(str(exc))
                    return
            st.rerun()


def _save(ctx: shell.PageContext, graph: Any) -> None:
    from backend.circuits.storage import save_graph

    if st.button("Save this graph into the store", key="cg_save"):
        try:
            gid = save_graph(ctx.store.path, graph, source="app")
        except CircuitscopeError as exc:
            st.error(str(exc))
            return
        st.session_state.pop(_LIVE, None)
        st.session_state[_PICK_NEXT] = gid  # the picker exists already in this run: set it in the next one
        shell.set_param(GRAPH_PARAM, gid)
        st.rerun()


def body(ctx: shell.PageContext) -> None:
    """Pick or build a graph, then view, inspect, check and export it."""
    from backend.circuits.figure import figure

    if ctx.model is None:
        st.warning(f"This store records no model: build it with {shell.build_hint(ctx)}.")
        return
    quality = ctx.store.query(circuit_queries.replacement_quality, ctx.model)
    if quality:
        st.caption(f"Transcoders replace {quality['n_replaced']} MLP layer(s); with all of them spliced in at once the "
                   f"model keeps {quality['ce_loss_recovered']:.2f} of the CE loss (clean {quality['ce_clean']:.3f}, "
                   f"replaced {quality['ce_replaced']:.3f}, MLPs zeroed {quality['ce_ablated']:.3f} nats); what they "
                   "miss is in the error nodes.")
    else:
        st.caption("This store has no transcoders: every MLP is one error node per position. Build them with "
                   f"{shell.build_hint(ctx)}.")
    _build_form(ctx)
    graph = _choose_graph(ctx)
    if graph is None:
        st.info("No graph yet: build one above.")
        return
    m = graph.metadata
    t = m["target"]
    target = repr(t["token"]) + (f" − {t['wrong']!r}" if t.get("wrong") is not None else "")
    metric = ("logit difference" if t.get("wrong") is not None else "logit − mean logit (demeaned)"
              if t.get("demeaned") else "raw logit")
    st.markdown(f"**Target** {shell.literal(target)} · {metric} {t['value']:.3f} · p = {t.get('prob', float('nan')):.3f} · "
                f"{len(graph.nodes)} nodes, {len(graph.edges):,} edges as built (method {shell.literal(str(m['method']))})")
    view, hidden, paths = _view(graph)
    _trust(graph, view)
    hl_nodes = {n for p, _ in paths for n in p}
    hl_edges = {(a, b) for p, _ in paths for a, b in zip(p[:-1], p[1:])}
    fig = figure(view, highlight_nodes=hl_nodes, highlight_edges=hl_edges, hover=_hover(ctx, view))
    event = st.plotly_chart(fig, key=PLOT_KEY, on_select="rerun", selection_mode="points", width="content",
                            config={"displaylogo": False})
    st.caption(f"Shown: {len(view.nodes)} nodes, {len(view.edges)} edges. Blue edges excite, red inhibit; "
               "click a node for its details.")
    if paths:
        with st.expander("Strongest paths from the input to the target"):
            labels = dict(zip(graph.nodes["node_id"], graph.nodes["label"]))
            st.dataframe(pd.DataFrame({"path": [" → ".join(labels[n] for n in p) for p, _ in paths],
                                       "strength": [s for _, s in paths]}), hide_index=True, width="stretch")
    selected = None
    points = (event.get("selection", {}) or {}).get("points", []) if event else []
    for point in points:
        cd = point.get("customdata")
        selected = cd[0] if isinstance(cd, (list, tuple)) else cd
    if selected is None:
        linked = st.query_params.get(NODE_PARAM)
        selected = linked if linked in set(graph.nodes["node_id"]) else None
    if selected:
        shell.set_param(NODE_PARAM, selected)
        _node_panel(ctx, graph, view, selected)
    st.subheader("Faithfulness")
    _faithfulness(ctx, graph, view)
    st.subheader("Export the shown graph")
    _downloads(view, st.query_params.get(GRAPH_PARAM) or "circuit-graph")
    if st.session_state.get(_LIVE) is graph:
        _save(ctx, graph)


shell.run_page("Circuit Graph", body)
