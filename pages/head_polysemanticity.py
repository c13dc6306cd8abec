"""Head Polysemanticity: the attention-SAE features each head dominates, grouped into families (Kissane et al. 2024).

Shows the headline (fraction of judged heads that are polysemantic, with the rule), a layer × head heatmap of the
measure, and one head's families: each feature with a link to its Feature Browser dashboard, its top tokens and its
strongest activation in context. Deep link: ``?store=...&head=15.3`` (layer 15, head 3; ``&dict=...`` picks the
dictionary when a layer has several). A thin view over :mod:`backend.heads.polysemanticity_queries`; the method is documented in
:mod:`backend.heads.polysemanticity` and recorded with every head's row (``stats``).
"""

from __future__ import annotations

import html
import math
from typing import Any
from urllib.parse import urlencode

import pandas as pd
import streamlit as st

from backend.features import queries as feature_queries
from backend.heads import polysemanticity_queries as poly_queries
from backend.ui import heatmap_clicks, shell, token_html

HEAD_PARAM = "head"
DICT_PARAM = "dict"  # the Feature Browser's parameter names, so links carry over
FEATURE_PARAM = "feature"
FEATURE_BROWSER_URL = "feature_browser"  # the page's URL path (relative: works under any base path)
_HEAD_KEY = "hp_head"  # selectbox of (dict_id, head) option keys
_HEATMAP_KEY = "hp_heatmap"
_KEEP = "_hp_choice"  # plain session key: survives page switches
_LINK_ERROR = "_hp_link_error"
EXAMPLE_BEFORE, EXAMPLE_AFTER = 12, 4  # tokens around the activating token in example strips


def _key(row: pd.Series) -> str:
    return f"{row['dict_id']}|{int(row['head'])}"


def _name(row: pd.Series) -> str:
    return f"L{int(row['layer'])}.H{int(row['head'])}"


def _verdict(row: pd.Series) -> str:
    if pd.isna(row["polysemantic"]):
        return "not judged"
    return "polysemantic" if bool(row["polysemantic"]) else "not polysemantic"


def _layer_labels(heads: pd.DataFrame) -> dict[str, str]:
    """dict_id -> row label of the heatmap: "L15", or "L15 · dict_id" when a layer has several dictionaries."""
    per_layer = heads.groupby("layer")["dict_id"].nunique()
    return {d: f"L{int(layer)}" if per_layer[layer] == 1 else f"L{int(layer)} · {d}"
            for d, layer in heads.groupby("dict_id")["layer"].first().items()}


# --------------------------------------------------------------------------------------------------------------
# Overview: headline and heatmap


def _headline(ctx: shell.PageContext, heads: pd.DataFrame) -> None:
    h = ctx.store.query(poly_queries.polysemanticity_headline, ctx.model)
    params = heads["stats"].iloc[0]
    not_judged = h["heads"] - h["judged"]
    cols = st.columns(3)
    cols[0].metric("Polysemantic heads", "–" if h["fraction"] is None else f"{h['fraction']:.0%}",
                   help="of the heads that could be judged")
    cols[1].metric("Polysemantic / judged", f"{h['polysemantic']} / {h['judged']}")
    cols[2].metric("Not judged", f"{not_judged} of {h['heads']}",
                   help=f"fewer than {params.get('min_judged')} dominant features")
    st.markdown(f"**Rule:** {shell.prose(params.get('rule', ''))}.")
    st.caption("Singletons (features linked to no other) do not count as families, so this is a lower bound. "
               "Kissane et al. (2024) estimate that at least 90% of GPT-2 Small's heads are polysemantic, judging "
               "each head's top 10 features by eye.")


def _heatmap(heads: pd.DataFrame) -> None:
    import plotly.graph_objects as go

    labels = _layer_labels(heads)
    rows = list(dict.fromkeys(labels[d] for d in heads["dict_id"]))
    n_heads = int(heads["head"].max()) + 1
    z = [[math.nan] * n_heads for _ in rows]
    text = [[""] * n_heads for _ in rows]
    hover = [["no data"] * n_heads for _ in rows]
    for _, r in heads.iterrows():
        i, j = rows.index(labels[r["dict_id"]]), int(r["head"])
        judged = not pd.isna(r["polysemantic"])
        z[i][j] = float(r["n_families"]) if judged else math.nan
        text[i][j] = (f"{int(r['n_families'])}" + (" ●" if bool(r["polysemantic"]) else "")) if judged else "–"
        # Only numbers and our own labels here; the dictionary id comes from the store, so it is escaped.
        hover[i][j] = "<br>".join([
            html.escape(f"{_name(r)} ({r['dict_id']})"),
            f"dominant features: {int(r['n_dominant'])} (judged: {int(r['n_judged'])})",
            f"families of ≥ 2 features: {int(r['n_families'])} · single features: {int(r['n_singletons'])}",
            _verdict(r)])
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"H{j}" for j in range(n_heads)], y=[html.escape(r) for r in rows], text=text,
        texttemplate="%{text}", hovertext=hover, hovertemplate="%{hovertext}<extra></extra>",
        colorscale="Blues", zmin=0, colorbar=dict(title="families"), xgap=2, ygap=2))
    cells = [(rows.index(labels[r["dict_id"]]), int(r["head"]), _key(r)) for _, r in heads.iterrows()]
    heatmap_clicks.add_cell_points(fig, [f"H{j}" for _, j, _ in cells], [html.escape(rows[i]) for i, _, _ in cells],
                                   [k for _, _, k in cells], [hover[i][j] for i, j, _ in cells], size=18)
    fig.update_layout(height=120 + 45 * len(rows), margin=dict(l=10, r=10, t=30, b=10),
                      title="Families of ≥ 2 features per head (● polysemantic, – not judged)",
                      yaxis=dict(autorange="reversed"))
    st.plotly_chart(fig, config={"displayModeBar": False}, key=_HEATMAP_KEY, on_select=_head_clicked,
                    selection_mode="points")
    st.caption("Click a head's cell to open it below.")


def _head_clicked() -> None:
    """on_select of the heatmap: the clicked cell's head becomes the chosen head."""
    key = heatmap_clicks.clicked(_HEATMAP_KEY)
    if key is not None:
        st.session_state[_HEAD_KEY] = key


# --------------------------------------------------------------------------------------------------------------
# Head selection (deep link ?head=L.H)


def _whole(text: str) -> int:
    """One number of a ``?head=LAYER.HEAD`` link: ValueError unless it is a whole number (see shell.link_int)."""
    value = shell.link_int(text)
    if value is None:
        raise ValueError(text)
    return value


def _init_state(heads: pd.DataFrame) -> None:
    """On the page's first run: take the head from the link (or the previous visit); refuse unknown ones with one
    sentence and fall back to the first judged head."""
    ss = st.session_state
    keys = [_key(r) for _, r in heads.iterrows()]
    if ss.get(_HEAD_KEY) in keys:
        return
    judged = heads[heads["polysemantic"].notna()]
    default = _key(judged.iloc[0]) if len(judged) else keys[0]
    want = st.query_params.get(HEAD_PARAM)
    if want is None:
        ss[_HEAD_KEY] = ss.get(_KEEP) if ss.get(_KEEP) in keys else default
        return
    ss[_HEAD_KEY] = default
    try:
        layer, head = (_whole(x) for x in want.split("."))
    except ValueError:
        ss[_LINK_ERROR] = (f"The link's head {shell.literal(want)} is not of the form LAYER.HEAD (e.g. 15.3): choose "
                           "a head below.")
        return
    match = heads[(heads["layer"] == layer) & (heads["head"] == head)]
    want_dict = st.query_params.get(DICT_PARAM)
    if want_dict is not None and (match["dict_id"] == want_dict).any():
        match = match[match["dict_id"] == want_dict]
    if match.empty:
        ss[_LINK_ERROR] = (f"The link names head L{layer}.H{head}, which this store has no polysemanticity data "
                           "for: choose a head below.")
        return
    ss[_HEAD_KEY] = _key(match.iloc[0])


def _pick_head(heads: pd.DataFrame) -> pd.Series:
    _init_state(heads)
    ss = st.session_state
    if ss.get(_LINK_ERROR):
        st.error(ss.pop(_LINK_ERROR))
    rows = {_key(r): r for _, r in heads.iterrows()}
    ambiguous = heads.groupby("layer")["dict_id"].nunique().max() > 1

    def label(key: str) -> str:
        r = rows[key]
        extra = f" · {r['dict_id']}" if ambiguous else ""
        return f"{_name(r)} · {_verdict(r)} · {int(r['n_dominant'])} dominant features{extra}"

    key = st.selectbox("Head", list(rows), format_func=label, key=_HEAD_KEY)
    ss[_KEEP] = key
    row = rows[key]
    shell.set_param(HEAD_PARAM, f"{int(row['layer'])}.{int(row['head'])}")
    shell.set_param(DICT_PARAM, str(row["dict_id"]) if ambiguous else None)
    return row


# --------------------------------------------------------------------------------------------------------------
# One head: families, their features, tokens and examples


def _feature_url(ctx: shell.PageContext, dict_id: str, feature: int) -> str:
    params = {shell.STORE_PARAM: ctx.store.name, shell.MODEL_PARAM: ctx.model or "", DICT_PARAM: dict_id,
              FEATURE_PARAM: str(feature)}
    return f"{FEATURE_BROWSER_URL}?{urlencode(params)}"


def _counts(strings: Any, counts: Any) -> str:
    """'How' ×8, ' how' ×3 — token text made visible and quoted (shown as plain dataframe text, never as HTML)."""
    if strings is None or counts is None:
        return ""
    return ", ".join(f"{token_html.visible_token(str(s))!r} ×{int(n)}" for s, n in zip(strings, counts))


def _pairs(prevs: Any, tokens: Any, counts: Any) -> str:
    if prevs is None or tokens is None or counts is None:
        return ""
    return ", ".join(f"{token_html.visible_token(str(p))!r}→{token_html.visible_token(str(t))!r} ×{int(n)}"
                     for p, t, n in zip(prevs, tokens, counts))


def _feature_table(ctx: shell.PageContext, dict_id: str, feats: pd.DataFrame, tokens: pd.DataFrame, key: str) -> None:
    tok = tokens.set_index("feature") if len(tokens) else tokens
    view = pd.DataFrame({
        "feature": [_feature_url(ctx, dict_id, int(f)) for f in feats["feature"]],
        "share": feats["share"].to_numpy(),
        "activating tokens": [_counts(tok.at[f, "tokens"], tok.at[f, "token_n"]) if f in tok.index else ""
                              for f in feats["feature"]],
        "previous tokens": [_counts(tok.at[f, "prevs"], tok.at[f, "prev_n"]) if f in tok.index else ""
                            for f in feats["feature"]],
        "top pairs": [_pairs(tok.at[f, "pair_prevs"], tok.at[f, "pair_tokens"], tok.at[f, "pair_n"])
                      if f in tok.index else "" for f in feats["feature"]],
        "activations": feats["n_active"].to_numpy(),
    })
    st.dataframe(view, hide_index=True, key=key, column_config={
        "feature": st.column_config.LinkColumn("feature", display_text=r"feature=(\d+)$",
                                               help="opens the feature's dashboard in the Feature Browser"),
        "share": st.column_config.NumberColumn("DFA share", format="%.2f",
                                               help="this head's share of the feature's DFA (top activations)"),
        "activations": st.column_config.NumberColumn("activations", help="nonzero activations on the corpus"),
    })


def _examples(ctx: shell.PageContext, dict_id: str, feats: pd.DataFrame) -> None:
    """Each feature's strongest activation in context (the activating token is the most shaded one)."""
    for f, max_act in zip(feats["feature"], feats["max_act"]):
        ex = ctx.store.query(feature_queries.feature_top_examples, dict_id, int(f), 1, EXAMPLE_BEFORE, EXAMPLE_AFTER)
        if ex.empty:
            continue
        row = ex.iloc[0]
        st.caption(f"#{int(f)} · act {row['act']:.3f} · context {int(row['context_id'])}, position {int(row['pos'])}")
        st.html(token_html.token_strip_html(list(row["tokens"]), [float(a) for a in row["acts"]],
                                    vmax=float(max_act) if pd.notna(max_act) else None, label="act"))


def _links_text(links: list[list[Any]], members: set[int]) -> str:
    parts = [f"#{a}–#{b} (decoder cos {c:.2f}, shared pairs {o:.0%})" for a, b, c, o in links
             if a in members and b in members]
    return "Linked by: " + "; ".join(parts) if parts else ""


def head_view(ctx: shell.PageContext, row: pd.Series) -> None:
    """The selected head: verdict, families with features, tokens and examples, then further dominant features."""
    dict_id, head = str(row["dict_id"]), int(row["head"])
    stats: dict[str, Any] = row["stats"]
    st.subheader(f"Head {_name(row)} · {_verdict(row)}")
    feats = ctx.store.query(poly_queries.head_features, dict_id, head)
    if feats.empty:
        st.info(f"{_name(row)} supplies at least {stats.get('share_threshold', 0.5):g} of the DFA of no feature with "
                f"≥ {stats.get('min_active')} activations: it has no dominant features to group.")
        return
    st.markdown(
        f"{int(row['n_dominant'])} dominant features; judged on the top {int(row['n_judged'])} by DFA share: "
        f"**{int(row['n_families'])} families of ≥ 2 features** and {int(row['n_singletons'])} single features."
        + ("" if pd.notna(row["polysemantic"]) else
           f" Not judged: fewer than {stats.get('min_judged')} dominant features."))
    tokens = ctx.store.query(poly_queries.head_feature_tokens, dict_id, head, 3)
    links = stats.get("links", [])
    judged = feats[feats["family"].notna()]
    size = judged["family"].map(judged["family"].value_counts())
    for fam in sorted(judged.loc[size >= 2, "family"].unique()):
        members = judged[judged["family"] == fam]
        st.markdown(f"#### Family {int(fam)} · {len(members)} features")
        st.caption(_links_text(links, set(int(f) for f in members["feature"])))
        _feature_table(ctx, dict_id, members, tokens, key=f"hp_family_{int(fam)}")
        _examples(ctx, dict_id, members)
    singles = judged[size == 1]
    if len(singles):
        st.markdown(f"#### Single features · {len(singles)}")
        st.caption("Judged features linked to no other: a role of their own, or noise; they do not count as families.")
        _feature_table(ctx, dict_id, singles, tokens, key="hp_singles")
        _examples(ctx, dict_id, singles)
    rest = feats[feats["family"].isna()]
    if len(rest):
        with st.expander(f"{len(rest)} further dominant features (beyond the judged top {int(row['n_judged'])})"):
            st.dataframe(pd.DataFrame({
                "feature": [_feature_url(ctx, dict_id, int(f)) for f in rest["feature"]],
                "share": rest["share"].to_numpy(), "activations": rest["n_active"].to_numpy(),
                "max act": rest["max_act"].to_numpy()}), hide_index=True, key="hp_rest", column_config={
                "feature": st.column_config.LinkColumn("feature", display_text=r"feature=(\d+)$"),
                "share": st.column_config.NumberColumn("DFA share", format="%.2f"),
                "max act": st.column_config.NumberColumn("max act", format="%.3f")})


def body(ctx: shell.PageContext) -> None:
    """Headline and heatmap over all heads, then the selected head's families."""
    heads: pd.DataFrame = ctx.store.query(poly_queries.head_polysemanticity_heads, ctx.model)
    if heads.empty:
        st.info(f"This store has no head-polysemanticity data for {shell.literal(ctx.model or 'its model')} (it "
                "needs attention-SAE "
                f"features and the head_polysemanticity step): run {shell.build_hint(ctx)} to add it "
                "(`make demo` rebuilds the demo store).")
        return
    heads = heads.reset_index(drop=True)
    _headline(ctx, heads)
    _heatmap(heads)
    with st.expander("All heads as a table"):
        st.dataframe(heads.drop(columns=["stats", "model"]), hide_index=True)
    st.divider()
    head_view(ctx, _pick_head(heads))


shell.run_page("Head Polysemanticity", body,
            caption="The features each attention head dominates by DFA share, grouped into families by decoder "
                    "direction and shared tokens; a head with two or more families is polysemantic.")
