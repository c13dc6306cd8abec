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
_AUTO = "_cg_auto"  # session key: the (prompt, answer, wrong) last built, so a link builds once
_PREPARED = "_cg_prepared"  # session key: (graph key, ranking, browser payload)
_NONCE = "_cg_nonce"  # the last component report acted on
_STATE_FOR = "_cg_state_for"  # the graph key the view state belongs to
_SELECTION = "_cg_selection"
_SUPERNODE = "_cg_supernode"
GRAPH_HEIGHT = 480  # px: the graph and the node details side by side fit a 1400x900 screen


def _dictionaries(ctx: shell.PageContext, attn_saes: bool) -> tuple[dict, dict]:
    return cache.cached_graph_dictionaries(str(ctx.store.path), ctx.store.file_key, ctx.model, attn_saes)


def _build(ctx: shell.PageContext, prompt: str, answer: str, wrong: str, max_nodes: int, attn_saes: bool) -> Any:
    from backend.circuits.build import BuildParams, build_graph
    from backend.features.labels import label_nodes

    transcoders, saes = _dictionaries(ctx, attn_saes)
    model = cache.get_model(ctx.model)
    graph = build_graph(model, prompt, transcoders, saes, answer=answer or None, wrong=wrong or None,
                        params=BuildParams(max_nodes=max_nodes), model_name=ctx.model)
    graph.nodes = ctx.store.query(label_nodes, graph.nodes)  # the features' labels (yours, else automatic)
    return graph


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
    if st.query_params.get(GRAPH_PARAM) != choice:
        for name in (PROMPT_PARAM, ANSWER_PARAM, WRONG_PARAM):
            shell.set_param(name, None)
    shell.set_param(GRAPH_PARAM, choice)
    return ctx.store.query(graph_storage.read_graph, choice)


def _build_form(ctx: shell.PageContext) -> None:
    """The build form; a link with ``prompt`` (and ``answer`` / ``wrong``) but no ``graph`` builds that graph once."""
    linked = st.query_params.get(PROMPT_PARAM)
    request = None
    if linked and not st.query_params.get(GRAPH_PARAM):
        wanted = (linked, st.query_params.get(ANSWER_PARAM, ""), st.query_params.get(WRONG_PARAM, ""))
        if st.session_state.get(_AUTO) != wanted:
            st.session_state[_AUTO] = wanted
            request = (*wanted, 400, True)
    with st.expander("Build a graph for your own prompt", expanded=not ctx.store.query(graph_storage.list_graphs, ctx.model).shape[0] and not linked):
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
            if st.form_submit_button("Build graph"):
                request = (prompt, answer, wrong, int(max_nodes), attn_saes)
    if request is None:
        return
    with st.spinner("Building the attribution graph…"):
        try:
            graph = _build(ctx, *request)
        except CircuitscopeError as exc:
            st.error(str(exc))
            return
    st.session_state[_LIVE] = graph
    st.session_state.pop(_IMAGES, None)
    st.session_state[_PICK_NEXT] = "(built in this session)"
    prompt, answer, wrong = request[:3]
    st.session_state[_AUTO] = (prompt, answer, wrong)
    if st.query_params.get(PROMPT_PARAM) != prompt:  # a new prompt: the old view's nodes are not this graph's
        from backend.circuits.view import PARAMS

        for name in PARAMS.values():
            shell.set_param(name, None)
    shell.set_param(GRAPH_PARAM, None)
    shell.set_param(PROMPT_PARAM, prompt if len(prompt) <= shell.MAX_LINK_CHARS else None)
    shell.set_param(ANSWER_PARAM, answer or None)
    shell.set_param(WRONG_PARAM, wrong or None)
    for w in graph.metadata.get("warnings", []):
        st.warning(w)
    st.rerun()


def _import_form(ctx: shell.PageContext) -> None:
    """Import a Neuronpedia / circuit-tracer graph JSON (with its pins, supernodes and labels) beside the store."""
    from backend.circuits.export.neuronpedia_read import MAX_BYTES, import_graph

    with st.expander("Import a graph JSON"):
        if not shell.saves_offered():
            return
        upload = st.file_uploader("Neuronpedia / circuit-tracer / circuitscope graph JSON", type=["json"],
                                  key="cg_import", max_upload_size=MAX_BYTES // 2**20)
        if upload is None or not st.button("Import into the store", key="cg_import_go"):
            return
        try:
            gid, problems = import_graph(ctx.store.path, upload.getvalue(), ctx.model)
        except CircuitscopeError as exc:
            st.error(str(exc))
            return
        for problem in problems:
            st.warning(problem)
        st.session_state[_PICK_NEXT] = gid
        shell.set_param(GRAPH_PARAM, gid)
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


def _node_panel(ctx: shell.PageContext, graph: Any, view: Any, node: str, state: Any) -> Any:
    """The selected node's details; returns the view state (changed when its label was edited)."""
    row = graph.node(node)
    label = state.label_map().get(node) or row["label"]
    st.markdown(f"#### {shell.literal(label)} · {shell.literal(node)}")
    tokens = graph.tokens
    tok = tokens[int(row["pos"])] if 0 <= int(row["pos"]) < len(tokens) else ""
    st.caption(f"{shell.literal(row['kind'])} · layer {row['layer']} · position {row['pos']} "
               f"({shell.literal(token_html.visible_token(tok))}) · activation {row['activation']:.3f} · "
               f"total attribution to the target {row['attribution']:+.3f}")
    state = _label_form(ctx, node, label, state)
    _intervene_link(ctx, graph, [node])
    e = view.edges
    names = dict(zip(graph.nodes["node_id"], graph.nodes["label"])) | state.label_map()
    for side, other in (("target", "source"), ("source", "target")):
        part = e[e[side] == node].copy()
        part["node"] = part[other].map(names)
        part = part.reindex(part["weight"].abs().sort_values(ascending=False).index).head(15)
        st.markdown("**Inputs (direct effect on this node)**" if side == "target" else "**Outputs**")
        if part.empty:
            st.caption("None in the shown graph.")
            continue
        st.dataframe(part[["node", other, "weight"]], hide_index=True, width="stretch",
                     height=min(38 + 35 * len(part), 210))
    if row["kind"] in ("transcoder", "attn_feature") and row.get("dict_id"):
        with_dash = ctx.store.query(circuit_queries.dictionaries_with_features)
        if row["dict_id"] in with_dash:
            params = {shell.STORE_PARAM: ctx.store.name, shell.MODEL_PARAM: ctx.model or "", "dict": row["dict_id"],
                      "feature": str(int(row["feature"]))}
            _page_link("pages/feature_browser.py", f"Open feature #{int(row['feature'])} in the Feature Browser",
                       params)
        else:
            st.caption("This dictionary's features have no stored dashboards yet.")
    built_here = graph.metadata.get("method") != "imported"
    if built_here and row["kind"] in ("transcoder", "attn_feature", "logit") and st.toggle(
            "Which heads carry its strongest inputs", key=f"cg_heads_{node}",
            help="Runs the model once per input edge (seconds)."):
        _heads_panel(ctx, graph, node, names)
    if built_here and row["kind"] == "transcoder" and st.toggle("Input-invariant connections", key=f"cg_inv_{node}"):
        _invariant_panel(ctx, int(row["layer"]), int(row["feature"]))
    return state


def _page_link(page: str, label: str, params: dict[str, str]) -> None:
    try:
        st.page_link(page, label=label, icon=":material/open_in_new:", query_params=params)
    except Exception:  # noqa: BLE001 - page run on its own: a plain link with the same address
        from urllib.parse import urlencode

        st.markdown(f"[{label}]({page.removeprefix('pages/').removesuffix('.py')}?{urlencode(params)})")


def _intervene_link(ctx: shell.PageContext, graph: Any, nodes: list[str]) -> None:
    """A link to the Prompt Explorer that zero-ablates the feature nodes among ``nodes`` on this graph's prompt, on the
    frozen replacement model and the live model side by side."""
    from backend.interventions.spec import from_graph_nodes, render

    interventions, _ = from_graph_nodes(nodes)
    if not interventions:
        return
    params = {shell.STORE_PARAM: ctx.store.name, shell.MODEL_PARAM: ctx.model or "",
              "prompt": str(graph.metadata.get("prompt", ""))[: shell.MAX_LINK_CHARS], "do": render(interventions),
              "on": "frozen,live"}
    label = "Intervene on the selected node" if len(nodes) == 1 else f"Intervene on the {len(interventions)} selected " \
        "feature nodes"
    _page_link("pages/prompt_explorer.py", label, params)


def _label_form(ctx: shell.PageContext, node: str, label: str, state: Any) -> Any:
    """A text box that labels the node in this view (the link carries it; saving the view stores it)."""
    from dataclasses import replace

    from backend.circuits.view import MAX_LABEL_CHARS, MAX_LABELS

    with st.form(f"cg_label_{node}", border=False):
        c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
        text = c1.text_input("Label this node", value=state.label_map().get(node, ""), max_chars=MAX_LABEL_CHARS,
                             placeholder=str(label))
        if c2.form_submit_button("Set"):
            labels = {k: v for k, v in state.labels if k != node}
            if text.strip():
                labels[node] = text.strip()
            if len(labels) > MAX_LABELS:
                st.error(f"A view holds at most {MAX_LABELS} labels: clear one first.")
                return state
            _write_state(replace(state, labels=tuple(labels.items())))
            st.rerun()  # the graph, drawn earlier in this run, draws the label too
    return state


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


def _prepared(ctx: shell.PageContext, graph: Any, key: str) -> tuple[Any, dict[str, Any]]:
    """The graph's ranking and the browser payload, computed once per graph and session (every slider move, pin or
    click after that costs no solve)."""
    from backend.circuits.prune import ranking
    from backend.circuits.view import payload

    cached = st.session_state.get(_PREPARED)
    if cached is None or cached[0] != key:
        ranked = ranking(graph)
        cached = (key, ranked, payload(ranked, _hover(ctx, ranked.graph)))
        st.session_state[_PREPARED] = cached
    return cached[1], cached[2]


def _write_state(state: Any) -> None:
    """Write the view into the page's link (values at their defaults are left out)."""
    from backend.circuits.view import to_params

    for name, value in to_params(state).items():
        shell.set_param(name, value)


def _current_state(ctx: shell.PageContext, graph: Any, key: str) -> Any:
    """The view: the component's latest report if it is new, else the link's parameters, else (for a stored graph
    opened without any) its saved view."""
    from backend.circuits.view import PARAMS, from_dict, from_params

    known = set(graph.nodes["node_id"])
    value = st.session_state.get(PLOT_KEY)
    if isinstance(value, dict) and value.get("nonce") != st.session_state.get(_NONCE) and st.session_state.get(
            _STATE_FOR) == key:
        st.session_state[_NONCE] = value.get("nonce")
        state, problems = from_dict(value.get("state") or {}, known)
        for problem in problems:
            st.warning(problem)
        st.session_state[_SELECTION] = [n for n in value.get("selection") or [] if n in known][:60]
        st.session_state[_SUPERNODE] = value.get("supernode")
        _write_state(state)
        return state
    if st.session_state.get(_STATE_FOR) != key:
        st.session_state[_STATE_FOR] = key
        st.session_state[_SELECTION], st.session_state[_SUPERNODE] = [], None
        if isinstance(value, dict):
            st.session_state[_NONCE] = value.get("nonce")
        linked = any(name in st.query_params for name in PARAMS.values())
        stored = st.query_params.get(GRAPH_PARAM)
        if stored and not linked:
            saved = ctx.store.query(graph_storage.read_view, stored)
            if saved:
                state, problems = from_dict(saved, known)
                for problem in problems:
                    st.warning(problem)
                _write_state(state)
                return state
    state, problems = from_params(dict(st.query_params), known)
    for problem in problems:
        st.warning(problem)
    if problems:
        _write_state(state)  # the link keeps only what was used
    return state


def _graph_section(ctx: shell.PageContext, graph: Any, ranked: Any, data: dict[str, Any], key: str
                   ) -> tuple[Any, Any]:
    """The graph (filtered in the browser) beside the selected node's details; returns the view and its state."""
    from backend.circuits.view import apply_view
    from backend.ui.graph_component import circuit_graph

    state = _current_state(ctx, graph, key)
    left, right = st.columns([0.64, 0.36])
    with left:
        circuit_graph(data, state.to_dict(), key, GRAPH_HEIGHT, PLOT_KEY)
    view = apply_view(ranked, state)
    with right, st.container(height=GRAPH_HEIGHT + 70, border=False):
        selection = st.session_state.get(_SELECTION) or []
        supernode = st.session_state.get(_SUPERNODE)
        members = dict(state.supernodes).get(supernode) if supernode else None
        if members:
            st.markdown(f"#### Supernode {shell.literal(supernode)}")
            names = dict(zip(graph.nodes["node_id"], graph.nodes["label"])) | state.label_map()
            st.dataframe(pd.DataFrame({"node": list(members), "label": [names.get(m, m) for m in members]}),
                         hide_index=True, width="stretch")
            _intervene_link(ctx, graph, list(members))
        elif len(selection) > 1:
            st.markdown(f"#### {len(selection)} nodes selected")
            st.caption("Pin, hide or group them with the buttons above the graph; click one node for its details.")
            _intervene_link(ctx, graph, selection)
        if state.selected and not members:
            state = _node_panel(ctx, graph, view, state.selected, state)
        elif not members and len(selection) <= 1:
            st.info("Click a node for its details; drag a box or lasso (toolbar of the graph) to select several.")
    return view, state


def _paths(graph: Any, view: Any) -> None:
    from backend.circuits.prune import strongest_paths

    with st.expander("Strongest paths from the input to the target"):
        if st.toggle("Find the 5 strongest paths of the shown graph", key="cg_paths"):
            paths = strongest_paths(view, k=5)
            labels = dict(zip(view.nodes["node_id"], view.nodes["label"]))
            st.dataframe(pd.DataFrame({"path": [" → ".join(labels.get(n, n) for n in p) for p, _ in paths],
                                       "strength": [s for _, s in paths]}), hide_index=True, width="stretch")


def _save(ctx: shell.PageContext, graph: Any, state: Any, stored: str | None) -> None:
    """Save the graph with its view (a graph built in this session), or the view of a stored graph."""
    from backend.circuits.storage import save_graph, save_view

    if not shell.saves_offered():
        return
    label = "Save this view (supernodes, labels, pins) with the graph" if stored else \
        "Save this graph and its view into the store"
    if st.button(label, key="cg_save"):
        try:
            if stored:
                save_view(ctx.store.path, stored, state.to_dict(), str(ctx.model))
                st.success("Saved: opening this graph shows this view.")
                return
            gid = save_graph(ctx.store.path, graph, source="app", view=state.to_dict())
        except CircuitscopeError as exc:
            st.error(str(exc))
            return
        st.session_state.pop(_LIVE, None)
        st.session_state[_PICK_NEXT] = gid  # the picker exists already in this run: set it in the next one
        for name in (PROMPT_PARAM, ANSWER_PARAM, WRONG_PARAM):
            shell.set_param(name, None)
        shell.set_param(GRAPH_PARAM, gid)
        st.rerun()


def _quality(ctx: shell.PageContext) -> None:
    quality = ctx.store.query(circuit_queries.replacement_quality, ctx.model)
    if quality:
        st.caption(f"Transcoders replace {quality['n_replaced']} MLP layer(s); with all of them spliced in at once the "
                   f"model keeps {quality['ce_loss_recovered']:.2f} of the CE loss (clean {quality['ce_clean']:.3f}, "
                   f"replaced {quality['ce_replaced']:.3f}, MLPs zeroed {quality['ce_ablated']:.3f} nats); what they "
                   "miss is in the error nodes.")
    else:
        st.caption("This store has no transcoders: every MLP is one error node per position. Build them with "
                   f"{shell.build_hint(ctx)}.")


def body(ctx: shell.PageContext) -> None:
    """Pick, build or import a graph, then view, inspect, check, export and save it."""
    if ctx.model is None:
        st.warning(f"This store records no model: build it with {shell.build_hint(ctx)}.")
        return
    c1, c2, c3 = st.columns([5, 3, 3], vertical_alignment="top")
    with c2:
        _build_form(ctx)
    with c3:
        _import_form(ctx)
    with c1:
        graph = _choose_graph(ctx)
    if graph is None:
        _quality(ctx)
        st.info("No graph yet: build or import one above.")
        return
    m = graph.metadata
    t = m["target"]
    target = repr(t["token"]) + (f" − {t['wrong']!r}" if t.get("wrong") is not None else "")
    metric = ("logit difference" if t.get("wrong") is not None else "logit − mean logit (demeaned)"
              if t.get("demeaned") else "raw logit")
    st.caption(f"**Target** {shell.literal(target)} · {metric} {t['value']:.3f} · p = {t.get('prob', float('nan')):.3f} · "
               f"{len(graph.nodes)} nodes, {len(graph.edges):,} edges as built (method {shell.literal(str(m['method']))})"
               " · edges: blue excite, red inhibit · nodes: ■ embedding, ● transcoder feature, ⬢ attention feature, ◇ error "
               "(open symbols), ★ target")
    key = st.query_params.get(GRAPH_PARAM) or f"live-{graph_storage.graph_id_for(graph)}"
    ranked, data = _prepared(ctx, graph, key)
    view, state = _graph_section(ctx, graph, ranked, data, key)
    _save(ctx, graph, state, stored=st.query_params.get(GRAPH_PARAM))
    _quality(ctx)
    _trust(graph, view)
    _paths(graph, view)
    st.subheader("Faithfulness")
    if m.get("method") == "imported":
        st.caption("An imported graph has no replacement model here: build the graph in circuitscope to check it.")
    else:
        _faithfulness(ctx, graph, view)
    st.subheader("Export the shown graph")
    st.caption(f"The shown graph: {len(view.nodes)} nodes, {len(view.edges):,} edges (the view the browser draws, "
               "as of the last change it reported).")
    _downloads(view, st.query_params.get(GRAPH_PARAM) or "circuit-graph")


shell.run_page("Circuit Graph", body)
