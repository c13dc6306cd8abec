"""Attribution Faithfulness: which components matter for a behaviour, and can the cheap estimates be trusted?

For a comparison stored in the store (the built-in tasks from the precompute, or pairs saved from here or the
``attribute`` CLI) — or for a clean/corrupted pair typed here and run live on the store's model — shows each method's
scores as heatmaps per component kind, the scatter of every estimate against activation patching with Pearson r
(SQL ``corr()``, backend/attribution/queries.py), and each method's wall time beside patching's. Sign convention of
every score: m(clean run with the component ← its corrupt value) − m(clean run), averaged over the examples.
Deep link: ``?store=...&model=...&comparison=ID``.
"""

from __future__ import annotations

import functools
import html
from typing import Any, Callable
from urllib.parse import urlencode

import pandas as pd
import streamlit as st

from backend.attribution import GROUND_TRUTH, METHODS
from backend.attribution import evaluation as attribution_evaluation
from backend.attribution import queries as attribution_queries
from backend.attribution.components import DEFAULT_KINDS, KINDS
from backend.errors import CircuitscopeError
from backend.ui import cache, heatmap_clicks, progress_bar, shell, token_html

COMPARISON_PARAM = "comparison"
_CMP_KEY = "af_comparison"
_LIVE = "_af_live"  # session key: the last live comparison (Comparison object)
LIVE_MAX_TOKENS = 48  # patching runs one pass per component: ~1000 components for 12 tokens on SmolLM2
KIND_TITLES = {"resid": "Residual stream", "mlp": "MLP outputs", "head": "Attention heads", "feature": "SAE features"}
METHOD_COLORS = {"atp": "#1f77b4", "atpstar": "#9467bd", "relp": "#d62728", "ig": "#2ca02c"}
Query = Callable[..., Any]


def _label(token: str) -> str:
    # Plotly renders some HTML in labels and hover text: token text is untrusted, escape it.
    return html.escape(token_html.visible_token(str(token)))


# --------------------------------------------------------------------------------------------------------------
# Views of one comparison (stored or live: ``query(fn, *args)`` runs a query function of
# backend.attribution.queries on the right connection)


def _summary(query: Query, cid: str, row: dict[str, Any]) -> None:
    cols = st.columns(4)
    cols[0].metric("Task", str(row["task"]))
    cols[1].metric("Examples", f"{int(row['n_examples'])}")
    cols[2].metric(f"Clean {shell.prose(row['metric_name'], 60)}", f"{row['clean_metric']:.3f}")
    cols[3].metric(f"Corrupt {shell.prose(row['metric_name'], 60)}", f"{row['corrupt_metric']:.3f}")
    params = row.get("params") or {}
    if params.get("description"):
        st.caption(shell.prose(params["description"]))
    prompts = pd.DataFrame({"clean": row["clean_prompts"], "corrupted": row["corrupt_prompts"] or [""] * len(
        row["clean_prompts"])})
    with st.expander(f"Prompts ({len(prompts)})"):
        st.dataframe(prompts, hide_index=True)


def _method_table(query: Query, cid: str) -> pd.DataFrame:
    methods: pd.DataFrame = query(attribution_queries.attribution_methods, cid)
    pearson: pd.DataFrame = query(attribution_queries.attribution_pearson, cid)
    # The numbers first (visible without scrolling sideways at 1400 px), the long descriptions last.
    view = pd.DataFrame({
        "method": methods["method"],
        "× faster than patching": methods["speedup_vs_patching"],
    })
    if not pearson.empty:
        wide = pearson.pivot(index="method", columns="component", values="pearson_r")
        for kind in wide.columns:
            view[f"r ({kind})"] = view["method"].map(wide[kind])
    view["seconds"] = methods["seconds"]
    view["cost"] = [METHODS[m].cost if m in METHODS else "" for m in methods["method"]]
    view["what"] = [METHODS[m].description if m in METHODS else "" for m in methods["method"]]
    st.dataframe(view, hide_index=True, column_config={
        "method": st.column_config.TextColumn(width="small"),
        "seconds": st.column_config.NumberColumn(format="%.2f", width="small"),
        "× faster than patching": st.column_config.NumberColumn("× faster", format="%.1f×", width="small",
                                                                help="patching's wall time / this method's"),
        **{c: st.column_config.NumberColumn(format="%.3f", width="small", help="Pearson r with activation patching")
           for c in view.columns if c.startswith("r (")},
        "cost": st.column_config.TextColumn(width="medium"),
        "what": st.column_config.TextColumn(width="large"),
    })
    st.caption("Wall time of each method on this machine, measured in the same run; r = Pearson correlation with "
               "activation patching over the components of one kind (SQL corr), leaving out components whose clean "
               "and corrupt activations are identical (every method scores them exactly 0).")
    return methods


def _axis_labels(tokens: pd.DataFrame) -> list[str]:
    return [f"{p}: {_label(t)}" for p, t in zip(tokens["pos"], tokens["clean"])]


def _heatmap(frame: pd.DataFrame, kind: str, method: str, tokens: pd.DataFrame) -> Any:
    import plotly.graph_objects as go

    if kind == "head" and frame["pos"].notna().any():  # per (layer, head, pos)
        frame = frame.assign(row=[f"L{int(a)}H{int(h)}" for a, h in zip(frame["layer"], frame["head"])])
        grid = frame.pivot_table(index="row", columns="pos", values="score", sort=False)
        y, x_title = list(grid.index), "position"
    elif kind == "head":
        grid = frame.pivot_table(index="layer", columns="head", values="score")
        y, x_title = [f"L{int(a)}" for a in grid.index], "head"
    else:
        grid = frame.pivot_table(index="layer", columns="pos", values="score")
        y, x_title = [f"L{int(a)}" for a in grid.index], "position"
    x = [int(c) for c in grid.columns]
    labels = _axis_labels(tokens) if x_title == "position" else [f"H{c}" for c in x]
    ticktext = [labels[c] if c < len(labels) else str(c) for c in x]
    z = grid.to_numpy()
    hover = [[f"{y[i]} · {ticktext[j]}<br>score {z[i, j]:+.4f}" for j in range(len(x))] for i in range(len(y))]
    finite = pd.Series(z.ravel()).abs().dropna()
    top = float(finite.max()) if len(finite) and finite.max() > 0 else 1.0
    fig = go.Figure(go.Heatmap(z=z, x=list(range(len(x))), y=y, text=hover, hoverinfo="text", colorscale="RdBu",
                               zmid=0, zmin=-top, zmax=top, reversescale=True, colorbar=dict(title="score")))
    if kind == "head":  # clicking a cell opens that head
        heads = ([f"{int(a)}.{h}" for a in grid.index for h in x] if x_title == "head" else
                 [row[1:].replace("H", ".") for row in y for _ in x])
        heatmap_clicks.add_cell_points(fig, [j for _ in y for j in range(len(x))], [r for r in y for _ in x], heads,
                                       [h for row in hover for h in row])
    fig.update_layout(height=min(900, 140 + 14 * len(y)), margin=dict(l=10, r=10, t=40, b=10),
                      title=f"{method}: {KIND_TITLES.get(kind, kind)}", yaxis=dict(autorange="reversed"),
                      xaxis=dict(tickmode="array", tickvals=list(range(len(x))), ticktext=ticktext, tickangle=-60,
                                 title=x_title))
    return fig


def _component_label(r: Any, tokens: list[str]) -> str:
    parts = [f"L{int(r.layer)}"]
    if pd.notna(r.head):
        parts.append(f"H{int(r.head)}")
    if pd.notna(r.feature):
        parts.append(f"F{int(r.feature)}")
    if pd.notna(r.pos):
        p = int(r.pos)
        parts.append(f"pos {p} {_label(tokens[p]) if p < len(tokens) else ''}")
    return " ".join(parts)


def _scatter(pairs: pd.DataFrame, pearson: pd.DataFrame, kind: str, tokens: list[str]) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    r_of = {m: r for m, r in zip(pearson["method"], pearson["pearson_r"])}
    for method, grp in pairs.groupby("method", sort=True):
        r = r_of.get(method)
        name = f"{method} (r = {r:.3f})" if r is not None and pd.notna(r) else f"{method} (r undefined)"
        fig.add_trace(go.Scatter(x=grp["patching"], y=grp["estimate"], mode="markers", name=name,
                                 marker=dict(size=6, opacity=0.7, color=METHOD_COLORS.get(str(method))),
                                 text=[_component_label(r_, tokens) for r_ in grp.itertuples()],
                                 hovertemplate="%{text}<br>patching %{x:+.4f}<br>estimate %{y:+.4f}<extra></extra>"))
    lo = float(min(pairs["patching"].min(), pairs["estimate"].min()))
    hi = float(max(pairs["patching"].max(), pairs["estimate"].max()))
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", name="y = x",
                             line=dict(color="gray", dash="dash")))
    fig.update_layout(height=420, margin=dict(l=10, r=10, t=40, b=10), xaxis_title="activation patching (exact)",
                      yaxis_title="estimate", title=f"{KIND_TITLES.get(kind, kind)}: estimate vs activation patching")
    return fig


def _kind_view(query: Query, cid: str, kind: str, tokens: pd.DataFrame, methods: list[str]) -> None:
    scores: pd.DataFrame = query(attribution_queries.attribution_scores, cid, kind)
    pairs: pd.DataFrame = query(attribution_queries.attribution_pairs, cid, kind)
    pearson: pd.DataFrame = query(attribution_queries.attribution_pearson, cid)
    pearson = pearson[pearson["component"] == kind]
    token_list = list(tokens["clean"])
    if not pairs.empty:
        st.plotly_chart(_scatter(pairs, pearson, kind, token_list), config={"displayModeBar": False},
                        key=f"af_scatter_{cid}_{kind}")
    elif GROUND_TRUTH not in methods:
        st.info("This comparison has no activation patching, so there is nothing to score the estimates against.")
    if kind == "feature":  # thousands of latents: a table of the strongest ones instead of a heatmap
        wide = scores.pivot_table(index=["layer", "feature"], columns="method", values="score").reset_index()
        order = wide[GROUND_TRUTH].abs() if GROUND_TRUTH in wide else wide.iloc[:, 2:].abs().max(axis=1)
        st.dataframe(wide.loc[order.sort_values(ascending=False).index[:30]], hide_index=True)
        st.caption("The 30 features with the largest |score| (by activation patching when present).")
        return
    ordered = [m for m in methods if m == GROUND_TRUTH] + [m for m in methods if m != GROUND_TRUTH]
    cols = st.columns(2)
    for i, method in enumerate(ordered):
        frame = scores[scores["method"] == method]
        if frame.empty:
            continue
        key = f"af_heat_{cid}_{kind}_{method}"
        if kind == "head":
            cols[i % 2].plotly_chart(_heatmap(frame, kind, method, tokens), config={"displayModeBar": False},
                                     key=key, on_select=functools.partial(_head_clicked, key), selection_mode="points")
        else:
            cols[i % 2].plotly_chart(_heatmap(frame, kind, method, tokens), config={"displayModeBar": False}, key=key)
    if kind == "head":
        st.caption("Click a head's cell to open that head.")
        _head_panel(scores)
    if kind != "head" or scores["pos"].notna().any():
        st.caption("Positions are labelled with the first example's clean tokens (the built-in tasks' examples share "
                   "one template). Blue: patching the corrupt value in lowers the metric (the component carries the "
                   "clean behaviour); red: raises it. Each heatmap has its own colour range.")


HEAD_PARAM = "head"
_HEAD_KEY = "_af_head"  # the head last clicked ("L.H")
HEAD_PAGES = (("pages/head_polysemanticity.py", "Head Polysemanticity", ":material/hub:"),
              ("pages/induction_heads.py", "Induction Heads", ":material/repeat:"))


def _head_clicked(key: str) -> None:
    """on_select of a head heatmap: the clicked cell's head becomes the open head."""
    head = heatmap_clicks.clicked(key)
    if head is not None and shell.link_int(head.split(".")[0]) is not None:
        st.session_state[_HEAD_KEY] = head


def _head_panel(scores: pd.DataFrame) -> None:
    """The open head (clicked, or ``?head=L.H``): its score by each method and links to its pages."""
    head = st.session_state.get(_HEAD_KEY) or st.query_params.get(HEAD_PARAM)
    parts = str(head or "").split(".")
    layer, index = (shell.link_int(parts[0]), shell.link_int(parts[1])) if len(parts) == 2 else (None, None)
    rows = scores[(scores["layer"] == layer) & (scores["head"] == index)] if layer is not None else scores.iloc[:0]
    if rows.empty:
        shell.set_param(HEAD_PARAM, None)
        return
    name = f"{layer}.{index}"
    shell.set_param(HEAD_PARAM, name)
    st.markdown(f"##### Head L{layer}H{index}")
    by_method = rows.groupby("method", sort=False)["score"].sum().reset_index()
    st.dataframe(by_method, hide_index=True, column_config={"score": st.column_config.NumberColumn(format="%+.4f")})
    st.caption("Its score by each method (summed over positions where heads are scored per position).")
    from streamlit.errors import StreamlitAPIException

    params = {**{k: v for k, v in st.query_params.items() if k in (shell.STORE_PARAM, shell.MODEL_PARAM)},
              HEAD_PARAM: name}
    cols = st.columns(len(HEAD_PAGES))
    for col, (path, title, icon) in zip(cols, HEAD_PAGES):
        label = f"Open head {name} in {title}"
        try:
            col.page_link(path, label=label, icon=icon, query_params=params)
        except StreamlitAPIException:  # the page run on its own (no navigation)
            col.markdown(f"[{label}]({path.split('/')[-1][:-3]}?{urlencode(params)})")


def show_comparison(query: Query, cid: str) -> None:
    """Every view of one comparison, read through ``query`` (a store or a live in-memory database)."""
    row = query(attribution_queries.attribution_comparison, cid)
    if row is None:
        st.error(f"This store has no attribution comparison {shell.literal(cid)}: choose one from the list.")
        return
    _summary(query, cid, row)
    methods_df = _method_table(query, cid)
    tokens: pd.DataFrame = query(attribution_queries.attribution_tokens, cid)
    kinds = [k for k in (row.get("params") or {}).get("kinds", DEFAULT_KINDS) if k in KINDS]
    methods = list(methods_df["method"])
    tabs = st.tabs([KIND_TITLES.get(k, k) for k in kinds])
    for tab, kind in zip(tabs, kinds):
        with tab:
            _kind_view(query, cid, kind, tokens, methods)


# --------------------------------------------------------------------------------------------------------------
# Stored comparisons


def _stored(ctx: shell.PageContext) -> None:
    comps: pd.DataFrame = ctx.store.query(attribution_queries.attribution_comparisons, ctx.model)
    if comps.empty:
        st.info(
            f"This store has no attribution comparisons for {shell.literal(ctx.model)}: add the built-in tasks with "
            f"{shell.build_hint(ctx)} (`make demo` rebuilds the demo store), or one task with "
            f"{shell.literal(f'python -m backend attribute --store {ctx.store.path} --model {ctx.model} --task ioi', 400)}. "
            "You can still run your own pair below.", icon=":material/construction:")
        shell.set_param(COMPARISON_PARAM, None)
        return
    options = list(comps["comparison_id"])
    ss = st.session_state
    if _CMP_KEY not in ss or ss[_CMP_KEY] not in options:
        wanted = st.query_params.get(COMPARISON_PARAM)
        ss[_CMP_KEY] = wanted if wanted in options else options[0]
        if wanted and wanted not in options:
            st.warning(f"This store has no comparison {shell.literal(wanted)} for {shell.literal(ctx.model)}: showing "
                       f"{shell.literal(options[0])} instead.")
    info = comps.set_index("comparison_id")
    cid: str = st.selectbox(
        "Comparison", options, key=_CMP_KEY,
        format_func=lambda c: f"{info.loc[c, 'task']} · {int(info.loc[c, 'n_examples'])} example(s) · "
                              f"{info.loc[c, 'methods']} · {info.loc[c, 'source']} ({c})")
    shell.set_param(COMPARISON_PARAM, cid)
    show_comparison(ctx.store.query, cid)


# --------------------------------------------------------------------------------------------------------------
# A user-entered clean/corrupted pair, run live


def _live_form(ctx: shell.PageContext) -> None:
    # Every registered method is offered; availability is checked on submit (checking imports torch, which a page
    # that only reads the store should not pay for).
    available = list(METHODS)
    with st.form("af_live_form"):
        c1, c2 = st.columns(2)
        clean = c1.text_input("Clean prompt", "When Mary and John went to the store, John gave a drink to",
                              key="af_clean")
        corrupt = c2.text_input("Corrupted prompt", "When Alice and Bob went to the store, Carol gave a drink to",
                                key="af_corrupt")
        answer = c1.text_input("Answer token (one token, mind the leading space)", " Mary", key="af_answer")
        wrong = c2.text_input("Wrong token", " John", key="af_wrong")
        methods = c1.multiselect("Methods", available, default=available, key="af_methods")
        kinds = c2.multiselect("Components", [k for k in KINDS if k != "feature"], default=list(DEFAULT_KINDS),
                               key="af_kinds")
        steps = c1.number_input("IG steps", min_value=1, max_value=64, value=4, key="af_steps",
                                help="fewer steps: cheaper and coarser integrated gradients")
        b1, b2 = st.columns([1, 4])
        estimate = b1.form_submit_button("Estimate the cost")
        submitted = b2.form_submit_button("Run the methods", type="primary")
    st.caption(f"Activation patching runs one forward pass per component (about 1,000 for a 12-token prompt on "
               f"SmolLM2), so the prompts are limited to {LIVE_MAX_TOKENS} tokens; IG runs its steps once per "
               "(kind, layer). The metric is logit(answer) − logit(wrong) at the last position. Leave out methods, "
               "component kinds or IG steps for a cheaper run; \"Estimate the cost\" says how long each method "
               "should take before anything starts.")
    if estimate or submitted:
        _run_live(ctx, clean, corrupt, answer, wrong, list(methods), list(kinds), int(steps), run=submitted)
    live = st.session_state.get(_LIVE)
    if live is None or live.model != ctx.model:
        return
    from backend.attribution.compare import comparison_db

    con = comparison_db(live, cache.get_model(ctx.model).tokenizer)

    def query(fn: Callable[..., Any], *args: Any) -> Any:
        return fn(con, *args)

    show_comparison(query, live.comparison_id)
    _save(ctx, live)


def _run_live(ctx: shell.PageContext, clean: str, corrupt: str, answer: str, wrong: str, methods: list[str],
              kinds: list[str], steps: int, run: bool = True) -> None:
    """Estimate each method's time on this pair (a forward pass timed now × its cost) and, when ``run``, run them
    with one progress bar per method and the whole run's ETA."""
    from backend.attribution.compare import check_methods, estimate_seconds, run_comparison
    from backend.attribution.components import check_kinds
    from backend.inputs.tasks import custom_pair
    from backend.progress import using_sink

    with st.spinner(f"Loading {shell.literal(ctx.model)} (once per server)…"):
        model = cache.get_model(ctx.model)
    try:
        chosen = check_methods(methods)
        check_kinds(kinds, None)
        batch = custom_pair(model, clean, corrupt, answer, wrong)
        if batch.seq_len > LIVE_MAX_TOKENS:
            st.error(f"The prompts have {batch.seq_len} tokens; this page patches at most {LIVE_MAX_TOKENS} "
                     "(one forward pass per component): shorten them, or use `python -m backend attribute`.")
            return
        order = [m for m in chosen if m != GROUND_TRUTH] + [m for m in chosen if m == GROUND_TRUTH]  # run order
        estimates = estimate_seconds(model, batch, order, kinds, steps)
        if not run:
            st.dataframe(pd.DataFrame({"method": order, "estimated seconds": [estimates[m] for m in order]}),
                         hide_index=True, column_config={
                             "estimated seconds": st.column_config.NumberColumn(format="%.1f")})
            st.caption(f"About {progress_bar.format_eta(sum(estimates.values()))} in all with these settings: each "
                       "method's cost in forward passes (backward = 2) × one forward pass of these prompts timed "
                       "just now; patching's count is an upper bound. Nothing has run yet.")
            return
        st.session_state.pop(_LIVE, None)
        sink, on_method = progress_bar.st_method_progress(estimates)
        with using_sink(sink):
            st.session_state[_LIVE] = run_comparison(model, batch, ctx.model, order, kinds, ig_steps=steps,
                                                     source="app", on_method=on_method)
    except CircuitscopeError as exc:
        st.error(str(exc))


def _save(ctx: shell.PageContext, live: Any) -> None:
    st.markdown("##### Save this comparison")
    if not shell.saves_offered():
        return
    st.caption("Saving writes the comparison into a small file beside the store (the store itself is not copied), "
               "so it can be opened again from Stored comparisons or a link.")
    if st.button("Save into the store", key="af_save"):
        from backend.attribution.compare import save_comparison
        from backend.model.registry import get_spec

        try:
            save_comparison(ctx.store.path, live, cache.get_model(ctx.model), get_spec(ctx.model), source="app")
        except CircuitscopeError as exc:
            st.error(str(exc))
            return
        st.success(f"Saved as {shell.literal(live.comparison_id)}: choose it under Stored comparisons "
                   f"(link: {shell.literal(f'?{COMPARISON_PARAM}={live.comparison_id}')}).")


def _evaluation(ctx: shell.PageContext) -> None:
    """The evaluation protocol's table (held-out pairs of every task family), from the committed summary."""
    summary = attribution_evaluation.load_summary()
    if summary is None:
        st.info("No evaluation summary yet: `python -m benchmarks.attribution_eval` records it (see "
                "benchmarks/attribution_eval.py).")
        return
    if summary.get("model") != ctx.model:
        st.info(f"The evaluation across task families was measured on {summary.get('model')}; this store's model is "
                f"{ctx.model}. Open a {summary.get('model')} store to see it.")
        return
    view, cost = attribution_evaluation.summary_view(summary)
    split = summary.get("split", {})
    n_eval = sum(len(v.get("eval", [])) for v in split.values())
    st.markdown(f"**Evaluation set** ({n_eval} held-out prompt pairs, "
                f"{len(split)} task families): these pairs were never used to choose a rule or a setting.")
    st.caption("RelP's rules (" + attribution_evaluation.rules_text(summary.get("relp_rules")) + ") were chosen "
               "on the separate dev pairs; IG's steps (the number in its label) were fixed, not tuned. Per family and component kind: each method's scores averaged over the "
               "pairs, against activation patching's — Pearson r, Spearman ρ, and the share of patching's 10 largest "
               "effects among the method's 10 largest scores — with 95% bootstrap intervals over pairs. "
               f"Measured {summary.get('when', '')[:10]} (benchmarks/results/attribution-eval.json).")
    st.dataframe(view, hide_index=True, column_config={
        c: st.column_config.NumberColumn(format="%.2f") for c in ("Pearson r", "Spearman ρ", "top-10 overlap")})
    if not cost.empty:
        st.caption("Cost of the evaluation runs (all families; wall time varies with the shared machine's load, CPU "
                   "time far less):")
        st.dataframe(cost, hide_index=True, column_config={
            "× cheaper than patching (CPU)": st.column_config.NumberColumn(format="%.1f×")})


def body(ctx: shell.PageContext) -> None:
    """The held-out evaluation, stored comparisons, then the live pair form."""
    if ctx.model is None:
        st.warning(f"This store records no model: build it with {shell.build_hint(ctx)}.")
        return
    st.subheader("How faithful is each method? (held-out evaluation)")
    _evaluation(ctx)
    st.subheader("Stored comparisons")
    _stored(ctx)
    st.subheader("Your own clean/corrupted pair")
    _live_form(ctx)


shell.run_page(
    "Attribution Faithfulness", body,
    caption="Which components matter for a behaviour, and can the cheap estimates (attribution patching, RelP, "
            "integrated gradients) be trusted? Each is scored against activation patching. Score = m(clean with "
            "the component patched to its corrupt value) − m(clean), averaged over examples.")
