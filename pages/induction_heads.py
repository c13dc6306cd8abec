"""Induction Heads: per-head induction / previous-token / duplicate-token scores and the long- vs short-prefix test
(Kissane et al. 2024).

From the store (:mod:`backend.heads.induction_queries`): layer × head heatmaps of the three scores on repeated random
tokens, the classification of the top induction heads with its rule, and for chosen heads the attention to the
induction target and the direct effect vs the length of the matching prefix, plus the competition check (two earlier
occurrences, one with the long matching prefix and one where only the token matches). Live (the store's model, loaded
once per server): one head's attention pattern on an example probe sequence and on the user's own prompt, with its
induction behaviour at every repeated token. Deep link: ``?store=...&head=18.6&prompt=...``. The sequences, scores
and rule are defined in :mod:`backend.heads.induction`.
"""

from __future__ import annotations

import functools

import html
from typing import Any

import pandas as pd
import streamlit as st

from backend.errors import InputError
from backend.heads import induction_queries
from backend.model import predict
from backend.ui import cache, heatmap_clicks, shell, token_html

HEAD_PARAM = "head"
PROMPT_PARAM = "prompt"
MAX_LINK_CHARS = shell.MAX_LINK_CHARS
_HEAD_KEY = "ih_head"
_KEEP_HEAD = "_ih_head"  # plain session key: survives page switches (widget state does not)
_OVERLAY_KEY = "ih_overlay"
_EXAMPLE_KEY = "ih_example"
_PROMPT_KEY = "ih_prompt"
_KEEP_PROMPT = "_ih_prompt"
_LINK_ERROR = "_ih_link_error"
DEFAULT_PROMPT = ("The old clockmaker of Brackenridge repaired watches for the whole valley. Every morning the old "
                  "clockmaker of Brackenridge opened his shop, and every evening the old clockmaker closed it.")
SCORE_TITLES = {"induction": "Induction", "prev_token": "Previous token", "duplicate_token": "Duplicate token"}
CLASS_DASH = {"short-prefix": "solid", "long-prefix": "dash", "weak": "dot"}  # unclassified heads: dashdot
PLOT = {"displayModeBar": False}
HOVER_TOKENS = 128  # pattern heatmaps of longer sequences hover with positions only


def _name(layer: int, head: int) -> str:
    return f"{int(layer)}.{int(head)}"


def _label(token: str) -> str:
    # Plotly renders some HTML in tick labels and hover text: untrusted token text is escaped for it.
    return html.escape(token_html.visible_token(token))


# --------------------------------------------------------------------------------------------------------------
# Head choice (deep link ?head=L.H)


def _head_options(ctx: shell.PageContext, scores: pd.DataFrame) -> list[str]:
    """Every head of the model, best induction score first when the store has scores."""
    if not scores.empty:
        ordered = scores.sort_values(["induction", "layer", "head"], ascending=[False, True, True])
        return [_name(r.layer, r.head) for r in ordered.itertuples()]
    n_layers, n_heads = int(ctx.model_info.get("n_layers") or 0), int(ctx.model_info.get("n_heads") or 0)
    return [_name(layer, head) for layer in range(n_layers) for head in range(n_heads)]


def _choose_head(options: list[str], scores: pd.DataFrame, classes: pd.DataFrame) -> str:
    ss = st.session_state
    if _HEAD_KEY not in ss or ss[_HEAD_KEY] not in options:
        wanted = st.query_params.get(HEAD_PARAM) or ss.get(_KEEP_HEAD)
        if wanted is not None and wanted not in options:
            ss[_LINK_ERROR] = (f"The link names head {shell.literal(wanted)}, which this model does not have (heads "
                               f"are written layer.head, e.g. {shell.literal(options[0])}): showing "
                               f"{shell.literal(options[0])} instead.")
            wanted = None
        ss[_HEAD_KEY] = wanted or options[0]
    if ss.get(_LINK_ERROR):
        st.warning(ss.pop(_LINK_ERROR))
    score = {_name(r.layer, r.head): r.induction for r in scores.itertuples()}
    klass = {_name(r.layer, r.head): r.head_class for r in classes.itertuples()}

    def fmt(h: str) -> str:
        parts = [f"L{h.replace('.', '.H')}"]
        if h in score:
            parts.append(f"induction {score[h]:.2f}")
        if h in klass:
            parts.append(klass[h])
        return " · ".join(parts)

    head: str = st.selectbox("Head", options, key=_HEAD_KEY, format_func=fmt,
                             help="Heads are ordered by induction score. Link to one with ?head=layer.head.")
    ss[_KEEP_HEAD] = head
    shell.set_param(HEAD_PARAM, head)
    return head


# --------------------------------------------------------------------------------------------------------------
# Store views


def _head_clicked(chart: str) -> None:
    """on_select of a score heatmap: the clicked cell's head becomes the chosen head."""
    head = heatmap_clicks.clicked(chart)
    if head is not None:
        st.session_state[_HEAD_KEY] = head


def _heatmaps(scores: pd.DataFrame) -> None:
    import plotly.graph_objects as go

    n_layers, n_heads = int(scores["layer"].max()) + 1, int(scores["head"].max()) + 1
    cols = st.columns(3)
    for col, (key, title) in zip(cols, SCORE_TITLES.items()):
        grid = scores.pivot(index="layer", columns="head", values=key).reindex(range(n_layers))
        names = [[f"L{layer}.H{head}" for head in range(n_heads)] for layer in range(n_layers)]
        fig = go.Figure(go.Heatmap(
            z=grid.values, x=list(range(n_heads)), y=list(range(n_layers)), customdata=names, zmin=0,
            colorscale="Viridis", hovertemplate="%{customdata}: " + title.lower() + " %{z:.3f}<extra></extra>",
            colorbar=dict(thickness=10)))
        cells = [(layer, head) for layer in range(n_layers) for head in range(n_heads)]
        values = grid.reindex(columns=range(n_heads)).to_numpy()
        heatmap_clicks.add_cell_points(
            fig, [h for _, h in cells], [layer for layer, _ in cells], [_name(layer, h) for layer, h in cells],
            [f"L{layer}.H{h}: {title.lower()} {values[layer, h]:.3f}" for layer, h in cells], size=9)
        fig.update_layout(title=title, height=140 + 16 * n_layers, margin=dict(l=10, r=10, t=40, b=10),
                          xaxis=dict(title="head", dtick=1), yaxis=dict(title="layer", autorange="reversed"))
        chart = f"ih_heatmap_{key}"
        col.plotly_chart(fig, config=PLOT, key=chart, on_select=functools.partial(_head_clicked, chart),
                         selection_mode="points")
    st.caption("Click a cell to open that head below.")
    n, seq_len = int(scores["n_sequences"].iloc[0]), int(scores["seq_len"].iloc[0])
    st.caption(f"Mean attention over {n} sequences of {seq_len} tokens: the BOS token (if the model uses one), then "
               f"{seq_len // 2} random word tokens twice. Induction = from each token of the second copy to the token "
               "after its first "
               "occurrence; duplicate token = to the first occurrence itself; previous token = to the position "
               "before (BOS is never a destination). A head that always attends to the induction target scores 1, "
               "a uniform head about 0.")


def _class_table(classes: pd.DataFrame, rule: dict[str, Any]) -> None:
    counts = classes["head_class"].value_counts()
    cols = st.columns(3)
    for col, klass in zip(cols, ("short-prefix", "long-prefix", "weak")):
        col.metric(klass.capitalize(), int(counts.get(klass, 0)))
    st.markdown(f"**Rule:** {shell.prose(rule.get('rule', ''))}")
    params = rule.get("params", {})
    k = params.get("max_prefix", "K")
    view = pd.DataFrame({
        "head": [f"L{r.layer}.H{r.head}" for r in classes.itertuples()],
        "class": classes["head_class"],
        "induction": classes["induction"],
        "attn k=0": classes["control_attention"],
        "attn k=1": classes["attention_k1"],
        f"attn k={k}": classes["attention_kmax"],
        "e(1) / plateau": classes["ratio"],
        "k half": classes["k_half"],
        "long share": classes["long_share"],
        "DE k=1": classes["direct_effect_k1"],
        f"DE k={k}": classes["direct_effect_kmax"],
    })
    num = {c: st.column_config.NumberColumn(c, format="%.3f") for c in view.columns
           if c not in ("head", "class", "k half")}
    num["e(1) / plateau"] = st.column_config.NumberColumn(
        "e(1) / plateau", format="%.2f", help="attention gained with one matching token, as a share of the "
        "attention gained with the longest prefixes (both above the k = 0 control)")
    num["k half"] = st.column_config.NumberColumn("k half", help="shortest matching prefix that reaches half "
                                                  "of the plateau")
    num["long share"] = st.column_config.NumberColumn(
        "long share", format="%.2f", help="competition: attention to the long-prefix occurrence's successor / "
        "(that + attention to the short one's)")
    st.dataframe(view, hide_index=True, column_config=num)
    st.caption(f"attn k = attention from the destination to the induction target when exactly k tokens ending at "
               f"the destination match the earlier occurrence (k = 0: control, nothing matches); DE = direct effect "
               f"on the target token's logit minus the vocabulary mean (logits), through the final norm with its "
               f"scale frozen. {params.get('n_sequences', '?')} sequences of {params.get('seq_len', '?')} tokens per "
               f"condition.")


def _curves(curves: pd.DataFrame, chosen: str, klass: dict[str, str]) -> None:
    import plotly.graph_objects as go
    from plotly.colors import qualitative

    prefix = curves[curves["condition"] == "prefix"]
    big_k = int(prefix["prefix_len"].max())
    heads = list(dict.fromkeys(prefix["head"]))
    palette = qualitative.Plotly
    colour = {h: "#000000" if h == chosen else palette[i % len(palette)] for i, h in enumerate(heads)}
    cols = st.columns(2)
    for col, value, title, axis in ((cols[0], "attention", "Attention to the induction target", "attention"),
                                    (cols[1], "direct_effect", "Direct effect on the target token", "logits")):
        fig = go.Figure()
        for head, part in prefix.groupby("head", sort=False):
            part = part.sort_values("prefix_len")
            name = f"L{head.replace('.', '.H')}" + (f" ({klass[head]})" if head in klass else "")
            fig.add_trace(go.Scatter(
                x=part["prefix_len"], y=part[value], mode="lines+markers", name=name,
                line=dict(width=4 if head == chosen else 2, color=colour[head],
                          dash=CLASS_DASH.get(klass.get(head, ""), "dashdot")),
                hovertemplate=f"{name}<br>k=%{{x}}: %{{y:.3f}}<extra></extra>"))
        fig.update_layout(title=title, height=360, margin=dict(l=10, r=10, t=40, b=10), yaxis_title=axis,
                          xaxis=dict(title="matching prefix length k (0 = control)", dtick=1, range=[-0.3, big_k + 0.3]),
                          legend=dict(font=dict(size=10)))
        col.plotly_chart(fig, config=PLOT, key=f"ih_curve_{value}")
    st.caption("k = 1: only the repeated token itself matches its earlier occurrence (the token before it differs); "
               f"k = {big_k}: it and its {big_k - 1} predecessors match. The chosen head is drawn thick and black; "
               "lines: solid short-prefix, dashed long-prefix, dotted weak, dash-dotted not classified.")


def _competition(curves: pd.DataFrame, chosen: str) -> None:
    import plotly.graph_objects as go

    comp = curves[curves["condition"].isin(["competition_long", "competition_short"])]
    if comp.empty:
        return
    heads = list(dict.fromkeys(comp["head"]))
    fig = go.Figure()
    for cond, label, colour in (("competition_long", "after the long-prefix occurrence", "#d62728"),
                                ("competition_short", "after the occurrence where only the token matches", "#1f77b4")):
        part = comp[comp["condition"] == cond].set_index("head").reindex(heads)
        fig.add_trace(go.Bar(x=[f"L{h.replace('.', '.H')}" for h in heads], y=part["attention"], name=label,
                             marker_color=colour, customdata=part["direct_effect"],
                             hovertemplate="%{x}: attention %{y:.3f}, direct effect %{customdata:.3f}<extra></extra>"))
    fig.update_layout(barmode="group", height=320, margin=dict(l=10, r=10, t=40, b=10), yaxis_title="attention",
                      title="Competition: two earlier occurrences of the token", legend=dict(orientation="h"))
    st.plotly_chart(fig, config=PLOT, key="ih_competition")
    mine = comp[comp["head"] == chosen].set_index("condition")
    if len(mine) == 2:
        a_long, a_short = mine.loc["competition_long", "attention"], mine.loc["competition_short", "attention"]
        d_long, d_short = mine.loc["competition_long", "direct_effect"], mine.loc["competition_short", "direct_effect"]
        k = int(mine.loc["competition_long", "prefix_len"])
        st.markdown(f"**L{chosen.replace('.', '.H')}** puts **{a_long:.2f}** of its attention on the token after the "
                    f"occurrence whose {k}-token prefix matches and **{a_short:.2f}** on the token after the "
                    f"occurrence where only the token itself matches (direct effects {d_long:+.3f} vs "
                    f"{d_short:+.3f} logits).")
    st.caption("Each sequence holds the destination token twice before: once with its whole matching prefix, once "
               "preceded by a different token; half the sequences put the long one first, so recency favours "
               "neither. A head that needs the long prefix puts (almost) all its attention on the first; a head "
               "that fires on the token alone splits it.")


# --------------------------------------------------------------------------------------------------------------
# Live views (the store's model)


@st.cache_data(show_spinner=False, max_entries=32)
def _head_view(model_name: str, ids: tuple[int, ...], layer: int, head: int) -> Any:
    from backend.heads.induction import prompt_head_view

    return prompt_head_view(cache.get_model(model_name), ids, layer, head)


@st.cache_data(show_spinner=False, max_entries=32)
def _example(model_name: str, kind: str, max_prefix: int, seq_len: int, repeat_len: int) -> Any:
    from backend.heads.induction import example_ids

    return example_ids(cache.get_model(model_name), kind, max_prefix, seq_len, repeat_len)


def _pattern_heatmap(view: Any, title: str, key: str, marks: dict[str, int] | None = None,
                     dest: int | None = None) -> None:
    import plotly.graph_objects as go

    labels = [f"{p}: {_label(t)}" for p, t in enumerate(view.tokens)]
    n = len(labels)
    if n <= HOVER_TOKENS:
        extra = dict(customdata=[[f"{labels[d]} → {labels[s]}" for s in range(n)] for d in range(n)],
                     hovertemplate="%{customdata}: %{z:.3f}<extra></extra>")
    else:  # n² hover texts would make the page megabytes heavy: positions only (tokens are on the axes)
        extra = dict(hovertemplate="%{y} → %{x}: %{z:.3f}<extra></extra>")
    # Most heads park most of their attention on BOS (an attention sink): the colour scale stops at the largest
    # attention to any other token, so the induction stripes stay visible (BOS cells saturate).
    rest = view.pattern[:, view.start:] if view.start < n else view.pattern
    zmax = max(float(rest.max()), 0.05)
    fig = go.Figure(go.Heatmap(z=view.pattern, x=list(range(n)), y=list(range(n)), colorscale="Blues", zmin=0,
                               zmax=zmax, colorbar=dict(title="attention", thickness=10), **extra))
    size = min(900, 200 + 14 * n)
    for name, pos in (marks or {}).items():
        fig.add_vline(x=pos, line=dict(color="#d62728", width=1, dash="dot"),
                      annotation_text=html.escape(name), annotation_position="top")
    if dest is not None:
        fig.add_hline(y=dest, line=dict(color="#ff7f0e", width=1, dash="dot"))
    ticks = dict(tickmode="array", tickvals=list(range(n)), ticktext=labels, tickfont=dict(size=9))
    fig.update_layout(title=title, height=size, margin=dict(l=10, r=10, t=50, b=10),
                      xaxis=dict(title="source", **ticks), yaxis=dict(title="destination", autorange="reversed", **ticks))
    st.plotly_chart(fig, config=PLOT, key=key)
    if view.start > 0:
        st.caption(f"Colour scale 0–{zmax:.2f}, the largest attention to a token other than BOS; the BOS column "
                   f"holds the rest (mean {float(view.pattern[view.start:, 0].mean()):.2f} per row).")


def _example_section(ctx: shell.PageContext, head: str, params: dict[str, Any]) -> None:
    st.subheader("Attention pattern on an example")
    big_k, seq_len, repeat_len = int(params["max_prefix"]), int(params["seq_len"]), int(params["repeat_len"])
    kinds = {"prefix:1": "Prefix k = 1 (only the token matches)",
             f"prefix:{big_k}": f"Prefix k = {big_k} (the token and its {big_k - 1} predecessors match)",
             "prefix:0": "Control k = 0 (nothing matches)",
             "competition": "Competition (long- and short-prefix occurrences)",
             "repeat": "Repeated random tokens"}
    kind: str = st.selectbox("Example sequence", list(kinds), format_func=kinds.get, key=_EXAMPLE_KEY)
    layer, h = (int(x) for x in head.split("."))
    with st.spinner(f"Running {shell.literal(ctx.model)}…"):
        ids, dest, targets = _example(ctx.model, kind, big_k, seq_len, repeat_len)
        view = _head_view(ctx.model, tuple(ids), layer, h)
    names = {"prefix": "target", "competition_long": "long", "competition_short": "short"}
    marks = {names[t]: pos for t, pos in targets.items()}
    _pattern_heatmap(view, f"L{layer}.H{h} · {kinds[kind]} (the precompute's first sequence)",
                     "ih_example_pattern", marks, dest)
    if dest is not None:
        parts = [f"{names[t]} (position {pos}, {_label(view.tokens[pos])!s}): {view.pattern[dest, pos]:.3f}"
                 for t, pos in targets.items()]
        st.caption(f"Destination: the last position ({dest}, orange line). Attention to the marked induction "
                   "target(s), red lines: " + "; ".join(parts) + ".")
    else:
        sub = view.table[view.table["prev_pos"] >= 0]
        st.caption(f"Mean attention from the second copy to the induction targets: {sub['attention'].mean():.3f}.")


def _prompt_input() -> str:
    ss = st.session_state
    if _PROMPT_KEY not in ss:
        ss[_PROMPT_KEY] = st.query_params.get(PROMPT_PARAM) or ss.get(_KEEP_PROMPT) or DEFAULT_PROMPT
    text: str = st.text_area("Your prompt", key=_PROMPT_KEY, height=100,
                             help="Repeat some words or phrases: induction heads act where a token occurred before.")
    ss[_KEEP_PROMPT] = text
    shell.set_param(PROMPT_PARAM, text if text.strip() and len(text) <= MAX_LINK_CHARS else None)
    return text


def _prompt_section(ctx: shell.PageContext, head: str) -> None:
    st.subheader("Your own prompt")
    text = _prompt_input()
    with st.spinner(f"Loading {shell.literal(ctx.model)} (once per server)…"):
        model = cache.get_model(ctx.model)
    try:
        from backend.inputs.prompts import encode_prompt

        enc = encode_prompt(model, text, max_tokens=min(int(model.cfg.n_ctx), predict.EXPLORER_MAX_TOKENS))
    except InputError as exc:
        st.error(str(exc))
        return
    for warning in enc.warnings:
        st.warning(warning, icon=":material/content_cut:")
    layer, h = (int(x) for x in head.split("."))
    with st.spinner("Running the model…"):
        view = _head_view(ctx.model, tuple(enc.ids), layer, h)
    table = view.table
    st.html(token_html.token_strip_html(view.tokens, list(table["attention"]), vmax=1.0, label="attention to induction target"))
    st.caption(f"Each token that occurred before is shaded by L{layer}.H{h}'s attention to the token that followed "
               "its previous occurrence (the induction target); unshaded tokens have not occurred before.")
    rep = table[table["prev_pos"] >= 0]
    if rep.empty:
        st.info("No token of this prompt occurs twice (BOS aside), so there is no induction target: repeat a word "
                "or a phrase.")
    else:
        short, long = rep[rep["match_len"] == 1], rep[rep["match_len"] >= 2]
        cols = st.columns(3)
        cols[0].metric("Repeated tokens", len(rep))
        cols[1].metric("Attention, only the token matches", f"{short['attention'].mean():.3f}" if len(short) else "–",
                       help=f"mean over {len(short)} positions whose previous token differs from the one before the "
                            "earlier occurrence")
        cols[2].metric("Attention, ≥ 2 tokens match", f"{long['attention'].mean():.3f}" if len(long) else "–",
                       help=f"mean over {len(long)} positions")
        st.dataframe(pd.DataFrame({
            "pos": rep["pos"], "token": [repr(token_html.visible_token(t)) for t in rep["token"]],
            "previous occurrence": rep["prev_pos"], "matching prefix": rep["match_len"],
            "induction target": [repr(token_html.visible_token(t)) for t in rep["target_token"]],
            "attention": rep["attention"], "direct effect": rep["direct_effect"],
        }), hide_index=True, column_config={
            "attention": st.column_config.NumberColumn("attention", format="%.3f",
                                                       help="to the induction target (previous occurrence + 1)"),
            "direct effect": st.column_config.NumberColumn(
                "direct effect", format="%.3f", help="on the target token's logit minus the vocabulary mean (logits)"),
            "matching prefix": st.column_config.NumberColumn(
                "matching prefix", help="tokens ending here that equal the tokens ending at the previous occurrence"),
        })
    _pattern_heatmap(view, f"L{layer}.H{h} on your prompt", "ih_prompt_pattern")


# --------------------------------------------------------------------------------------------------------------


def body(ctx: shell.PageContext) -> None:
    """Scores and classification from the store; prefix curves and live patterns for the chosen head."""
    if ctx.model is None:
        st.warning(f"This store records no model: build it with {shell.build_hint(ctx)}.")
        return
    scores: pd.DataFrame = ctx.store.query(induction_queries.head_scores, ctx.model)
    classes: pd.DataFrame = ctx.store.query(induction_queries.induction_classes, ctx.model)
    options = _head_options(ctx, scores)
    if not options:
        st.warning(f"This store does not record the shape of {shell.literal(ctx.model)}: rebuild it with {shell.build_hint(ctx)}.")
        return
    if scores.empty:
        st.info(f"This store has no induction-head scores for {shell.literal(ctx.model)}: they come from the `induction` precompute "
                f"step, which this store was built without; rebuild it with {shell.build_hint(ctx)} (`make demo` "
                "rebuilds the demo store). Your own prompt can still be examined below.", icon=":material/info:")
        head = _choose_head(options, scores, classes)
        _prompt_section(ctx, head)
        return
    st.subheader("Scores on repeated random tokens")
    _heatmaps(scores)
    st.subheader("Long- vs short-prefix induction heads")
    rule = ctx.store.query(induction_queries.induction_rule, ctx.model)
    if not classes.empty:
        _class_table(classes, rule)
    head = _choose_head(options, scores, classes)
    klass = {_name(r.layer, r.head): r.head_class for r in classes.itertuples()}
    defaults = [h for c in ("short-prefix", "long-prefix") for h in
                [_name(r.layer, r.head) for r in classes.itertuples() if r.head_class == c][:2]]
    ss = st.session_state
    if _OVERLAY_KEY not in ss:
        ss[_OVERLAY_KEY] = [h for h in defaults if h != head]
    else:  # the chosen head may have been one of the compared ones: it cannot be both
        ss[_OVERLAY_KEY] = [h for h in ss[_OVERLAY_KEY] if h != head and h in options]
    overlay: list[str] = st.multiselect("Compare with", [h for h in options if h != head], key=_OVERLAY_KEY,
                                        format_func=lambda h: f"L{h.replace('.', '.H')}" +
                                        (f" ({klass[h]})" if h in klass else ""))
    curves = ctx.store.query(induction_queries.induction_prefix_curves, ctx.model, tuple([head, *overlay]))
    if curves.empty:
        st.info(f"This store has no prefix-length curves for {shell.literal(ctx.model)}: rebuild it with {shell.build_hint(ctx)}.")
    else:
        _curves(curves, head, klass)
        _competition(curves, head)
    if rule.get("params"):
        _example_section(ctx, head, rule["params"])
    _prompt_section(ctx, head)


shell.run_page("Induction Heads", body,
            caption="Which heads copy what followed an earlier occurrence of the current token, and how long a "
                    "matching prefix they need (Kissane et al. 2024).")
