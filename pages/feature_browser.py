"""Feature Browser: the features of the store's attention-output SAEs (Kissane et al. 2024) and MLP transcoders
(Dunefsky et al. 2024), one dashboard each.

Find a feature by id, by label text across every dictionary, from a dictionary's list (by layer), by dominant head
(attention SAEs), or by the text of the tokens it fires on (substring or whole token); one click on a row opens it.
Its dashboard shows its label (automatic, or the one a user wrote and saved beside the store), dense / outlier
warnings, the top activating contexts (one per passage, tokens shaded by activation), examples from several
activation intervals, the activation histogram, the output tokens it promotes / suppresses, its DFA by head (attention
SAEs) or its input-invariant connections to other transcoder features (transcoders), and the feature's activation on
any text you type. Downloads: the dictionary as a sae-lens directory, a stored graph as a bundle with one
circuit-tracer feature file per feature.
Deep link: ``?store=...&dict=<dict_id>&feature=<int>``. A thin view over :mod:`backend.features.queries`.
BOS (position 0) is shown in example windows but never scored.
"""

from __future__ import annotations

import math

import pandas as pd
import streamlit as st

from backend.dictionaries.kinds import KINDS
from backend.errors import CircuitscopeError
from backend.features import labels as feature_labels
from backend.features import queries as feature_queries
from backend.ui import cache, intervention_links, shell, token_html

DICT_PARAM = "dict"
FEATURE_PARAM = "feature"
_DICT_KEY = "fb_dict"
_FEATURE_KEY = "fb_feature"  # the number input (widget state is dropped while it is not drawn)
_FEATURE = "_fb_feature"  # plain session key: the feature on screen (source of truth within the session)
_MODE_KEY = "fb_mode"
_KEEP = "_fb_choice"  # plain session key: (dict_id, feature) survives page switches
_LINK_ERROR = "_fb_link_error"
LABEL_MODE = "By label (all dictionaries)"
MODES = ["Feature id", LABEL_MODE, "List by layer", "By dominant head", "By token text"]
HEAD_MODE = "By dominant head"  # attention SAEs only
AUTOMATIC_NOTE = ("Automatic labels are computed offline from each feature's statistics (the tokens its top examples "
                  "fire on, the token before them, the token it promotes most): they describe what it fires on, not "
                  "what it means.")
TOP_K = 10
N_INTERVALS = 5  # activation intervals of the quantile examples
PER_INTERVAL = 3


def _label(row: pd.Series) -> str:
    title = KINDS[row["kind"]].title
    return f"L{int(row['layer'])} {title} · {row['architecture']} · {int(row['d_sae']):,} features ({row['dict_id']})"


def _init_state(dicts: pd.DataFrame) -> None:
    """On the first run of this page: take dict / feature from the link (or the previous visit); refuse unknown ones
    with one sentence (kept for display) and fall back to the first dictionary / feature 0."""
    ss = st.session_state
    if _DICT_KEY in ss and _FEATURE in ss:
        return
    kept = ss.get(_KEEP) or (None, None)
    want_dict = st.query_params.get(DICT_PARAM) or kept[0]
    want_feat = st.query_params.get(FEATURE_PARAM)
    ids = list(dicts["dict_id"])
    ss[_DICT_KEY] = ids[0]
    if want_dict is not None:
        if want_dict in ids:
            ss[_DICT_KEY] = want_dict
        else:
            ss[_LINK_ERROR] = (f"The link names dictionary {shell.literal(want_dict)}, which this store does not "
                               "have: choose a dictionary below.")
            want_feat = None
    feature = 0
    if want_feat is not None:
        parsed = shell.link_int(want_feat)
        if parsed is None:
            ss[_LINK_ERROR] = (f"The link's feature {shell.literal(want_feat)} is not a whole number (at most 15 "
                               "digits): choose a feature id below.")
        else:
            feature = parsed
    elif kept[1] is not None and want_dict == kept[0]:
        feature = int(kept[1])
    ss[_FEATURE] = feature


def _open(feature: int, dict_id: str | None = None, keep_mode: bool = False) -> None:
    """Button callback (runs before the widgets are drawn, so it may set their state); ``keep_mode`` leaves the list
    the feature was picked from on screen."""
    st.session_state[_FEATURE] = int(feature)
    if not keep_mode:
        st.session_state[_MODE_KEY] = MODES[0]
    if dict_id is not None:
        st.session_state[_DICT_KEY] = dict_id


def _typed() -> None:
    st.session_state[_FEATURE] = int(st.session_state[_FEATURE_KEY])


def _feature_list(df: pd.DataFrame, key: str, empty: str) -> None:
    """A table of features; clicking a row opens that feature (its dictionary too, when the table has a dict_id
    column) below the table, which stays on screen."""
    if df.empty:
        st.info(empty)
        return
    view = df.dropna(axis=1, how="all").reset_index(drop=True)  # transcoders have no dominant head
    picks = [(int(f), d) for f, d in zip(view["feature"], view["dict_id"] if "dict_id" in view else [None] * len(view))]

    def picked() -> None:
        rows = st.session_state[key].selection.rows
        if rows and rows[0] < len(picks):
            _open(picks[rows[0]][0], picks[rows[0]][1], keep_mode=True)

    st.caption("Click a row to open that feature.")
    st.dataframe(view, hide_index=True, height=260, key=key, on_select=picked, selection_mode="single-row",
                 column_config={
        "density": st.column_config.NumberColumn("density", format="%.2e",
                                                 help="fraction of non-BOS corpus tokens where the feature fires"),
        "max_act": st.column_config.NumberColumn("max act", format="%.3f"),
        "mean_act": st.column_config.NumberColumn("mean act", format="%.3f", help="mean over tokens where it fires"),
        "top_head_share": st.column_config.NumberColumn("top head share", format="%.2f"),
        "label": st.column_config.TextColumn("label"),
        "automatic": st.column_config.CheckboxColumn("automatic label", help=AUTOMATIC_NOTE),
    })


def _finder(ctx: shell.PageContext, dict_row: pd.Series) -> None:
    dict_id, d_sae = dict_row["dict_id"], int(dict_row["d_sae"])
    per_head = KINDS[dict_row["kind"]].per_head
    modes = MODES if per_head else [m for m in MODES if m != HEAD_MODE]
    if st.session_state.get(_MODE_KEY) not in modes:
        st.session_state[_MODE_KEY] = MODES[0]
    mode = st.radio("Find a feature", modes, horizontal=True, key=_MODE_KEY)
    if mode == "Feature id":
        st.session_state[_FEATURE_KEY] = st.session_state[_FEATURE]
        st.number_input(f"Feature id (0–{d_sae - 1})", step=1, key=_FEATURE_KEY, on_change=_typed)
    elif mode == LABEL_MODE:
        text = st.text_input("Label contains", key="fb_label_q",
                             help="Searches every dictionary's feature labels (yours first, then automatic ones).")
        st.caption(AUTOMATIC_NOTE)
        if text.strip():
            found = ctx.store.query(feature_labels.search_labels, text, None, 200)
            _feature_list(found[["dict_id", "layer", "feature", "label", "automatic", "density", "max_act"]],
                          "fb_pick_label", f"No feature label contains {shell.literal(text)}.")
    elif mode == "List by layer":
        orders = ["max_act", "density", "top_head_share", "mean_act"] if per_head else ["max_act", "density", "mean_act"]
        if st.session_state.get("fb_order") not in orders:
            st.session_state["fb_order"] = orders[0]
        order = st.selectbox("Sort by", orders, key="fb_order")
        _feature_list(ctx.store.query(feature_queries.features_by_layer, dict_id, order, 200), "fb_pick_layer",
                      "This dictionary has no live features on the store's corpus.")
    elif mode == "By dominant head":
        n_heads = int(dict_row["n_heads"]) if pd.notna(dict_row["n_heads"]) else 1
        head = st.selectbox("Dominant head (largest DFA share)", list(range(n_heads)), key="fb_head")
        _feature_list(ctx.store.query(feature_queries.features_by_head, dict_id, head, 200), "fb_pick_head",
                      f"No feature of this dictionary is dominated by head {head}.")
    else:
        text = st.text_input("Token text contains", key="fb_text",
                             help="Features whose top examples fire on a token whose text contains this (any case).")
        whole = st.checkbox("Whole token only", key="fb_whole",
                            help="Match the whole token (any case, surrounding spaces ignored): ' thou' finds 'thou' "
                                 "and ' Thou', not 'though'.")
        if text.strip():
            what = "that is" if whole else "containing"
            _feature_list(ctx.store.query(feature_queries.features_by_token, dict_id, text, 200, whole),
                          "fb_pick_token", f"No feature's top examples fire on a token {what} {shell.literal(text)}.")


def _strip(tokens: list[str], acts: list[float], vmax: float) -> str:
    return token_html.token_strip_html(list(tokens), [float(a) for a in acts], vmax=vmax, label="act")


def _examples(df: pd.DataFrame, vmax: float, section: str) -> None:
    for _, row in df.iterrows():
        st.caption(f"act **{row['act']:.3f}** · context {int(row['context_id'])}, position {int(row['pos'])}")
        positions = [int(p) for p in row["positions"]]
        # whole numbers only in the attributes: the browser tests read each example's window from them
        st.html(f'<div data-testid="fb-example" data-section="{section}" data-context="{int(row["context_id"])}" data-pos="{int(row["pos"])}" '
                f'data-first="{min(positions)}" data-last="{max(positions)}">'
                + _strip(row["tokens"], row["acts"], vmax) + "</div>")


def _histogram(hist: pd.DataFrame) -> None:
    import plotly.graph_objects as go

    mid = [math.sqrt(lo * hi) for lo, hi in zip(hist["lo"], hist["hi"])]
    fig = go.Figure(go.Bar(x=mid, y=hist["count"], width=list(hist["hi"] - hist["lo"]),
                           customdata=list(zip(hist["lo"], hist["hi"])),
                           hovertemplate="[%{customdata[0]:.3g}, %{customdata[1]:.3g}): %{y} tokens<extra></extra>"))
    lo, hi = float(hist["lo"].min()), float(hist["hi"].max())
    ticks = [lo * (hi / lo) ** (i / 4) for i in range(5)] if hi > lo > 0 else [lo]
    fig.update_layout(xaxis=dict(type="log", title="activation (log scale)", tickvals=ticks,
                                 ticktext=[f"{t:.2g}" for t in ticks]),
                      yaxis_title="tokens", height=280, margin=dict(l=10, r=10, t=30, b=10),
                      title="Activation histogram (where it fires)")
    st.plotly_chart(fig, config={"displayModeBar": False})


def _dfa(dfa: pd.DataFrame) -> None:
    import plotly.graph_objects as go

    colours = ["#d62728" if v >= 0 else "#1f77b4" for v in dfa["contribution"]]
    fig = go.Figure(go.Bar(x=[f"H{int(h)}" for h in dfa["head"]], y=dfa["contribution"], marker_color=colours,
                           customdata=dfa["share"],
                           hovertemplate="%{x}: %{y:.3f} (share %{customdata:.0%})<extra></extra>"))
    fig.update_layout(height=280, margin=dict(l=10, r=10, t=30, b=10), yaxis_title="mean contribution",
                      title=f"DFA by head (mean of top {int(dfa['n_examples'].max())} acts)")
    st.plotly_chart(fig, config={"displayModeBar": False})


def _invariant(ctx: shell.PageContext, layer: int, feature: int) -> None:
    """A transcoder feature's top upstream / downstream transcoder features by the input-invariant term alone
    (decoder·encoder, the same on every prompt; backend.circuits.invariant), each openable here."""
    from backend.circuits.invariant import invariant_neighbours

    st.markdown("**Input-invariant connections** (decoder · encoder, the same for every prompt)")
    with st.spinner("Loading the store's transcoders…"):
        transcoders, _ = cache.cached_graph_dictionaries(str(ctx.store.path), ctx.store.file_key, ctx.model, False)
    if layer not in transcoders:
        st.caption(f"The store's current transcoder for layer {layer} is another one: no connections to show.")
        return
    up, down = invariant_neighbours(transcoders, layer, feature, k=8)
    ids = {l: getattr(tc.cfg.metadata, "dict_id", None) for l, tc in transcoders.items()}
    options: dict[str, tuple[str, int]] = {}
    for side, part in (("upstream", up), ("downstream", down)):
        st.caption("Earlier features writing into its encoder" if side == "upstream"
                   else "Later features it writes into")
        if part.empty:
            st.caption("None: no transcoder layer " + ("before" if side == "upstream" else "after") + " this one.")
            continue
        st.dataframe(part, hide_index=True, width="stretch", height=160)
        for r in part.itertuples():
            if ids.get(int(r.layer)):
                options[f"{side}: L{int(r.layer)} #{int(r.feature)} ({r.invariant:+.3f})"] = (ids[int(r.layer)], int(r.feature))
    pick = st.selectbox("Open a connected feature", list(options), index=None, key="fb_inv_pick",
                        placeholder="choose a connection")
    if pick is not None:
        st.button("Open", key="fb_inv_open", on_click=_open, args=(options[pick][1], options[pick][0]))


def _live_logits(ctx: shell.PageContext, dict_id: str, layer: int, kind: str, feature: int) -> pd.DataFrame:
    """The feature's logit effects computed now (the store has none for this dictionary): the same function the
    precompute uses, on the shared model and the store's dictionary."""
    from backend.features.logits import top_logits
    from backend.inputs.prompts import token_strings

    model = cache.get_model(ctx.model)
    sae = cache.get_dictionary(str(ctx.store.path), ctx.store.file_key, dict_id)
    df = top_logits(model, sae, layer, kind=kind, features=[feature])  # weights only: no hooks, no lock needed
    df["token_str"] = token_strings(model.tokenizer, [int(t) for t in df["token_id"]])
    return df


def _logits(logits: pd.DataFrame) -> None:
    cols = st.columns(2)
    for col, kind, title in ((cols[0], "promoted", "Promoted tokens"), (cols[1], "suppressed", "Suppressed tokens")):
        part = logits[logits["kind"] == kind]
        col.markdown(f"**{title}**")
        col.dataframe(pd.DataFrame({"token": [repr(token_html.visible_token(t)) for t in part["token_str"]],
                                    "logit effect": part["value"].round(4)}), hide_index=True)


def _label_section(ctx: shell.PageContext, dict_id: str, feature: int) -> None:
    """The feature's label (marked automatic or yours) and a form to write your own, saved beside the store."""
    lab = ctx.store.query(feature_labels.feature_label, dict_id, feature)
    if lab["label"] is None:
        st.markdown("**Label:** none yet (no automatic label: `python -m backend label --store STORE` adds them).")
    elif lab["automatic"]:
        st.markdown(f"**Label:** {shell.literal(lab['label'])} · *automatic* (not written by a person)",
                    help=AUTOMATIC_NOTE)
    else:
        auto = f" · automatic: {shell.literal(lab['auto_label'])}" if lab["auto_label"] else ""
        st.markdown(f"**Label:** {shell.literal(lab['label'])} · *yours* (saved beside the store){auto}")
    if not shell.saves_offered():
        return
    with st.form(key=f"fb_label_form_{dict_id}_{feature}", border=False):
        cols = st.columns([4, 1])
        text = cols[0].text_input("Your label", value=lab["user_label"] or "", key=f"fb_user_label_{dict_id}_{feature}",
                                  max_chars=feature_labels.MAX_LABEL_CHARS, placeholder="a short name for this feature",
                                  help="Saved beside the store and shown instead of the automatic label everywhere; "
                                       "save an empty label to go back to the automatic one.")
        if cols[1].form_submit_button("Save label"):
            try:
                feature_labels.save_user_label(ctx.store.path, dict_id, feature, text)
            except CircuitscopeError as exc:
                st.error(str(exc))
                return
            st.rerun()


def _flags(ctx: shell.PageContext, dict_id: str, feature: int) -> None:
    flags = ctx.store.query(feature_queries.feature_flags, dict_id, feature)
    if flags["dense"]:
        st.warning(f"Dense feature: it fires on {flags['density']:.0%} of scored tokens (above "
                   f"{feature_queries.DENSE_ABOVE:.0%}), so its top examples show little of what it detects.")
    if flags["outlier"]:
        st.warning(f"Outlier activation: its maximum {flags['max_act']:.3f} is over "
                   f"{feature_queries.OUTLIER_RATIO:g}× its next largest ({flags['second']:.3f}); the shading of the "
                   "other examples is relative to that one token.")


def _own_text(ctx: shell.PageContext, dict_id: str, layer: int, kind: str, feature: int, vmax: float) -> None:
    """A text box: this feature's activation on every token of the user's text (the shared live model)."""
    from backend.features.live import feature_on_tokens
    from backend.inputs.prompts import encode_prompt

    st.markdown("#### Test your own text")
    with st.form(key="fb_own_form", border=False):
        text = st.text_area("Text", key="fb_own_text", height=80, placeholder="Type any text to see where this "
                            "feature fires")
        run = st.form_submit_button("Run the model on this text")
    if not run:
        return
    try:
        with st.spinner("Running the model…"):
            model = cache.get_model(ctx.model)
            enc = encode_prompt(model, text)
            sae = cache.get_dictionary(str(ctx.store.path), ctx.store.file_key, dict_id)
            acts = feature_on_tokens(model, sae, kind, layer, feature, enc.ids)
    except CircuitscopeError as exc:
        st.error(str(exc))
        return
    for warning in enc.warnings:
        st.warning(warning)
    finite = [a for a in acts if a == a]
    top = max(finite) if finite else 0.0
    st.caption(f"Max activation on your text **{top:.3f}** (the corpus maximum is {vmax:.3f}; BOS is not scored).")
    st.html('<div data-testid="fb-own-strip">' + _strip(enc.strings, list(acts), vmax if vmax > 0 else None) + "</div>")


def _downloads(ctx: shell.PageContext, dict_id: str) -> None:
    """The dictionary as a sae-lens directory, and a stored graph as a bundle with one feature file per feature."""
    from backend.circuits.storage import list_graphs

    with st.expander("Downloads: this dictionary for sae-lens, a graph bundle with feature dashboards"):
        if st.button("Prepare the sae-lens download of this dictionary", key="fb_prep_sae"):
            from backend.dictionaries.storage import sae_lens_zip

            st.session_state["_fb_sae_zip"] = (dict_id, ctx.store.query(sae_lens_zip, dict_id))
        ready = st.session_state.get("_fb_sae_zip")
        if ready and ready[0] == dict_id:
            st.download_button("Download sae-lens directory (.zip: cfg.json, sae_weights.safetensors)", ready[1],
                               file_name=f"{dict_id.replace('/', '__')}.zip", mime="application/zip",
                               key="fb_dl_sae")
        graphs = ctx.store.query(list_graphs, ctx.model)
        if graphs.empty:
            st.caption("No stored graph to bundle: save one on the Circuit Graph page.")
            return
        titles = dict(zip(graphs["graph_id"], graphs["title"]))
        gid = st.selectbox("Stored graph", list(titles), format_func=lambda g: f"{titles[g]} ({g})", key="fb_bundle_g")
        if st.button("Prepare the graph bundle (pruned as the Circuit Graph page's defaults)", key="fb_prep_bundle"):
            st.session_state["_fb_bundle"] = (gid, ctx.store.query(_bundle_zip, gid))
        ready = st.session_state.get("_fb_bundle")
        if ready and ready[0] == gid:
            st.download_button("Download graph bundle (.zip)", ready[1], file_name=f"{gid}-bundle.zip",
                               mime="application/zip", key="fb_dl_bundle")


def _bundle_zip(con: object, graph_id: str) -> bytes:
    """A stored graph, pruned with the default thresholds, as a bundle zip (cached per store version)."""
    from backend.circuits.prune import prune
    from backend.circuits.storage import read_graph
    from backend.features.bundle import bundle_zip

    return bundle_zip(con, prune(read_graph(con, graph_id), 0.8, 0.98))


def dashboard(ctx: shell.PageContext, dict_id: str, feature: int) -> None:
    """The feature's dashboard (the caller has checked that it exists)."""
    s = ctx.store.query(feature_queries.feature_summary, dict_id, feature)
    per_head = KINDS[s["kind"]].per_head
    st.subheader(f"Feature {feature} · layer {int(s['layer'])} {KINDS[s['kind']].title}")
    _label_section(ctx, dict_id, feature)
    _flags(ctx, dict_id, feature)
    intervention_links.steer_link(ctx.store.name, ctx.model, s["kind"], int(s["layer"]), feature,
                                  None if pd.isna(s["max_act"]) else float(s["max_act"]))
    m = st.columns(4)
    m[0].metric("Density", f"{s['density']:.2e}" if s["density"] else "0 (dead)",
                help=f"fraction of the {int(s['scored_tokens']):,} non-BOS corpus tokens scored where it fires")
    m[1].metric("Max activation", f"{s['max_act']:.3f}" if pd.notna(s["max_act"]) else "—")
    m[2].metric("Mean activation", f"{s['mean_act']:.3f}" if pd.notna(s["mean_act"]) else "—",
                help="over the tokens where it fires")
    if per_head:
        m[3].metric("Top head (DFA share)",
                    f"H{int(s['top_head'])} · {s['top_head_share']:.0%}" if pd.notna(s["top_head"]) else "—")
    else:
        m[3].metric("Reads / writes", f"MLP {int(s['layer'])}", help="normalised MLP input → MLP output")
    if not s["n_active"]:
        st.info("This feature never fires on the store's corpus (a dead feature): there are no examples to show.")
    else:
        vmax = float(s["max_act"])
        left, right = st.columns(2)
        with left:
            _histogram(ctx.store.query(feature_queries.feature_histogram, dict_id, feature))
        with right:
            if per_head:
                _dfa(ctx.store.query(feature_queries.feature_head_dfa, dict_id, feature))
            else:
                _invariant(ctx, int(s["layer"]), feature)
        st.markdown(f"#### Top {TOP_K} activations")
        st.caption("One example per passage: no two windows shown overlap in the same context.")
        _examples(ctx.store.query(feature_queries.feature_top_examples, dict_id, feature, TOP_K), vmax, "top")
        with st.expander("Examples from each activation interval"):
            quant = ctx.store.query(feature_queries.feature_quantile_examples, dict_id, feature, N_INTERVALS, PER_INTERVAL)
            for interval, part in quant.groupby("interval", sort=False):
                lo, hi = int(interval) / N_INTERVALS * vmax, (int(interval) + 1) / N_INTERVALS * vmax
                st.markdown(f"**Interval {int(interval) + 1} of {N_INTERVALS}** (activation {lo:.3f} – {hi:.3f})")
                _examples(part, vmax, "interval")
    st.markdown("#### Direct logit effects")
    logits = ctx.store.query(feature_queries.feature_logits, dict_id, feature)
    if logits.empty:  # presets may skip storing them (30 transcoder layers cost ~50 s): one feature's is instant
        logits = _live_logits(ctx, dict_id, int(s["layer"]), s["kind"], feature)
    st.caption(("The feature's decoder direction through each head's W_O" if per_head else "The feature's decoder "
                "direction (what it adds to the MLP output)") + ", the final norm as a constant scale, and W_U.")
    _logits(logits)
    if ctx.model is not None:
        _own_text(ctx, dict_id, int(s["layer"]), s["kind"], feature, float(s["max_act"] or 0.0))
    _downloads(ctx, dict_id)


def body(ctx: shell.PageContext) -> None:
    """Pick a dictionary and a feature, then draw its dashboard."""
    dicts: pd.DataFrame = ctx.store.query(feature_queries.feature_dictionaries)
    dicts = dicts[dicts["n_features"] > 0]
    if ctx.model is not None and (dicts["model"] == ctx.model).any():
        dicts = dicts[dicts["model"] == ctx.model]
    if dicts.empty:
        st.info(f"This store has no dictionary features yet: run {shell.build_hint(ctx)} to train the attention "
                "SAEs and transcoders and precompute their features (`make demo` rebuilds the demo store).")
        return
    dicts = dicts.reset_index(drop=True)
    _init_state(dicts)
    ss = st.session_state
    if ss.get(_LINK_ERROR):
        st.error(ss.pop(_LINK_ERROR))
    labels = {r["dict_id"]: _label(r) for _, r in dicts.iterrows()}
    if ss[_DICT_KEY] not in labels:  # e.g. the store changed under the choice
        ss[_DICT_KEY] = next(iter(labels))
    dict_id = st.selectbox("Dictionary (layer)", list(labels), format_func=labels.get, key=_DICT_KEY)
    row = dicts[dicts["dict_id"] == dict_id].iloc[0]
    _finder(ctx, row)
    feature = int(ss[_FEATURE])
    ss[_KEEP] = (dict_id, feature)
    shell.set_param(DICT_PARAM, dict_id)
    shell.set_param(FEATURE_PARAM, str(feature))
    d_sae = int(row["d_sae"])
    if not 0 <= feature < d_sae or ctx.store.query(feature_queries.feature_summary, dict_id, feature) is None:
        st.error(f"Feature {feature} does not exist in {shell.literal(dict_id)}: it has features 0–{d_sae - 1}; "
                 "choose another id.")
        return
    st.divider()
    dashboard(ctx, dict_id, feature)


shell.run_page("Feature Browser", body,
            caption="Attention-output SAE and MLP transcoder features: top activations, activation histogram, logit "
                    "effects, DFA by head or input-invariant connections.")
