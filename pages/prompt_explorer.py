"""Prompt Explorer: type (or upload) any prompt and run it live through the store's model.

Shows every token with the model's loss on the token that follows it and its top-5 next-token predictions, plus a
closer look at one position. When the store holds attention-output SAEs, also every token's top features at each
SAE layer and, for one (position, feature), its direct feature attribution by head and by source position
(backend.features.live). Deep link: ``?store=...&model=...&prompt=...&pos=...&dict=...&feature=...`` (prompts
longer than :data:`MAX_LINK_CHARS` are not put in the link).
"""

from __future__ import annotations

import html
import math
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pandas as pd
import streamlit as st

from backend.errors import InputError
from backend.model import predict
from backend.ui import cache, shell, token_html

PROMPT_PARAM = "prompt"
POS_PARAM = "pos"
MAX_LINK_CHARS = shell.MAX_LINK_CHARS
TOP_K = 5
DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"
_PROMPT_KEY = "pe_prompt"
_KEEP_PROMPT = "_pe_prompt"  # plain session key: survives page switches (widget state does not)
_FILE_KEY = "pe_file"
_POS_KEY = "pe_pos"
_LAST_N_KEY = "_pe_last_n"
DICT_PARAM = "dict"
FEATURE_PARAM = "feature"
FEATURE_TOP_N = 5
_DICT_KEY = "pe_dict"
_FEATURE_KEY = "pe_feature"
_FEATURE_DICT = "_pe_feature_dict"  # the dictionary the feature choice belongs to
FEATURE_BROWSER = "pages/feature_browser.py"
FEATURE_BROWSER_URL = "feature_browser"  # the page's URL path (relative: works under any base path)


def _prompt_input() -> str | bytes:
    """The prompt text area and file uploader; returns what to run (an uploaded file wins) and updates the link."""
    ss = st.session_state
    if _PROMPT_KEY not in ss:  # first run on this page: the link's prompt, else the one typed before a page switch
        ss[_PROMPT_KEY] = st.query_params.get(PROMPT_PARAM) or ss.get(_KEEP_PROMPT) or DEFAULT_PROMPT
    text: str = st.text_area("Prompt", key=_PROMPT_KEY, height=110,
                             help="Any text: it is tokenized with a BOS token in front and run through the model.")
    ss[_KEEP_PROMPT] = text
    upload = st.file_uploader("…or run a UTF-8 text file", type=["txt"], key=_FILE_KEY)
    if upload is not None:
        st.caption(f"Running the uploaded file {shell.literal(upload.name)} instead of the text above.")
        shell.set_param(PROMPT_PARAM, None)
        return upload.getvalue()
    if len(text) > MAX_LINK_CHARS:
        shell.set_param(PROMPT_PARAM, None)
        st.caption(f"The prompt is longer than {MAX_LINK_CHARS:,} characters, so the page link does not include it.")
    else:
        shell.set_param(PROMPT_PARAM, text if text.strip() else None)
    return text


def _top_text(tokens: list[str], probs: list[float]) -> str:
    return "   ".join(f"{token_html.visible_token(t)!r} {p:.0%}" for t, p in zip(tokens, probs))


def _token_table(df: pd.DataFrame) -> None:
    view = pd.DataFrame({
        "pos": df["pos"],
        "token": [repr(token_html.visible_token(t)) for t in df["token"]],
        "id": df["token_id"],
        "next token": [repr(token_html.visible_token(t)) if i < len(df) - 1 else "" for i, t in enumerate(df["next_token"])],
        "loss": df["loss"],
        f"top-{TOP_K} predictions": [_top_text(t, p) for t, p in zip(df["top_tokens"], df["top_probs"])],
    })
    st.dataframe(
        view, hide_index=True,
        column_config={
            "loss": st.column_config.NumberColumn("loss (nats)", format="%.3f",
                                                  help="−log p(next token): how surprised the model is by what follows"),
        },
    )


def _position_detail(df: pd.DataFrame) -> int:
    """The position picker (shared with the feature views below) and that position's next-token predictions."""
    import plotly.graph_objects as go  # only this section draws a chart

    n = len(df)
    ss = st.session_state
    if _POS_KEY not in ss:
        raw = st.query_params.get(POS_PARAM)
        linked = shell.link_int(raw)
        if raw is not None and (linked is None or not 0 <= linked < n):
            st.warning(f"The link's position {shell.literal(raw)} is not a position of this prompt (0–{n - 1}): "
                       "showing the last position; choose another below.")
            linked = None
        ss[_POS_KEY] = n - 1 if linked is None else linked
    elif ss[_POS_KEY] == ss.get(_LAST_N_KEY, n) - 1:
        ss[_POS_KEY] = n - 1  # the last position was chosen: keep following the end when the prompt changes
    ss[_POS_KEY] = min(max(int(ss[_POS_KEY]), 0), n - 1)  # the prompt may have shrunk under the choice
    ss[_LAST_N_KEY] = n
    pos = st.selectbox("Position", list(range(n)), key=_POS_KEY,
                       format_func=lambda p: f"{p}: {token_html.visible_token(df['token'].iloc[p])!r}")
    shell.set_param(POS_PARAM, str(pos))
    row = df.iloc[pos]
    tokens = [repr(token_html.visible_token(t)) for t in row["top_tokens"]]
    fig = go.Figure(go.Bar(x=list(row["top_probs"])[::-1], y=tokens[::-1], orientation="h",
                           text=[f"{p:.1%}" for p in list(row["top_probs"])[::-1]], textposition="auto"))
    fig.update_layout(height=60 + 40 * len(tokens), margin=dict(l=10, r=10, t=30, b=10),
                      title=f"Top-{TOP_K} next-token predictions after position {pos}", xaxis_title="probability")
    st.plotly_chart(fig, config={"displayModeBar": False})
    if pos < n - 1:
        st.caption(f"Actual next token {shell.literal(repr(token_html.visible_token(row['next_token'])))}: loss "
                   f"{row['loss']:.3f} nats "
                   f"(p = {math.exp(-row['loss']):.1%}).")
    else:
        st.caption("This is the last position: nothing follows it in the prompt, so it has no loss.")
    return int(pos)


# --------------------------------------------------------------------------------------------------------------
# Attention-SAE features (Kissane et al. 2024): which features fire on each token, and which heads / source tokens
# write them. BOS (position 0) is shown but never scored: the SAEs are not trained on the attention-sink outlier.


def _attention_dicts(ctx: shell.PageContext) -> pd.DataFrame:
    """The store's attention-output SAEs for the current model, by layer (widest first within a layer)."""
    dicts: pd.DataFrame = ctx.summary["dictionaries"]
    if dicts.empty:
        return dicts
    dicts = dicts[(dicts["kind"] == "attn_sae") & (dicts["model"] == ctx.model)]
    return dicts.sort_values(["layer", "d_sae", "dict_id"], ascending=[True, False, True]).reset_index(drop=True)


def _choose_dict(dicts: pd.DataFrame) -> str:
    """The dictionary picker: the link's ``dict`` if the store has it, else the first layer's SAE."""
    ss = st.session_state
    options = list(dicts["dict_id"])
    if _DICT_KEY not in ss or ss[_DICT_KEY] not in options:
        wanted = st.query_params.get(DICT_PARAM)
        ss[_DICT_KEY] = wanted if wanted in options else options[0]
        if wanted and wanted not in options:
            st.warning(f"This store has no attention SAE {shell.literal(wanted)} for this model: showing "
                       f"{shell.literal(options[0])} instead.")
    layer_of = dict(zip(dicts["dict_id"], dicts["layer"]))
    dict_id: str = st.selectbox("Attention SAE", options, key=_DICT_KEY,
                                format_func=lambda d: f"layer {int(layer_of[d])} · {d}",
                                help="The dictionary whose features are examined below.")
    shell.set_param(DICT_PARAM, dict_id)
    return dict_id


def _layer_dicts(dicts: pd.DataFrame, chosen: str) -> tuple[tuple[int, str], ...]:
    """One SAE per layer for the overview: the chosen one on its layer, the widest elsewhere."""
    chosen_layer = int(dicts.loc[dicts["dict_id"] == chosen, "layer"].iloc[0])
    first = dicts.drop_duplicates("layer")
    return tuple((int(layer), chosen if int(layer) == chosen_layer else str(d))
                 for layer, d in zip(first["layer"], first["dict_id"]))


def _label(token: str) -> str:
    # Plotly renders a few HTML tags in labels and decodes entities: escape untrusted token text for it too.
    return html.escape(token_html.visible_token(token))


def _fmt_features(feats: np.ndarray, acts: np.ndarray) -> str:
    return "  ".join(f"#{int(f)} {a:.2f}" for f, a in zip(feats, acts) if f >= 0)


def _overview(res: Any, tokens: list[str], layer_dicts: tuple[tuple[int, str], ...]) -> None:
    """Heatmap (layers × tokens, shaded by each token's strongest feature) and the per-token top-feature table."""
    import plotly.graph_objects as go

    layers = [layer for layer, _ in layer_dicts]
    x = [f"{p}: {_label(t)}" for p, t in enumerate(tokens)]
    z = [res.layers[layer].acts[:, 0] for layer in layers]

    def tip(lf: Any, p: int) -> str:
        if p == 0:
            return "BOS: not scored"
        return "<br>".join(f"#{int(f)}: {a:.3f}" for f, a in zip(lf.features[p], lf.acts[p]) if f >= 0) or "none fires"

    hover = [[f"L{layer} · pos {p} {_label(tokens[p])}<br>{tip(res.layers[layer], p)}" for p in range(len(tokens))]
             for layer in layers]
    fig = go.Figure(go.Heatmap(z=z, x=list(range(len(tokens))), y=[f"L{layer}" for layer in layers],
                               text=hover, hoverinfo="text", colorscale="Oranges",
                               colorbar=dict(title="top act")))
    fig.update_layout(height=120 + 40 * len(layers), margin=dict(l=10, r=10, t=30, b=10),
                      title="Strongest attention-SAE feature per token and layer (hover for the top features)",
                      xaxis=dict(tickmode="array", tickvals=list(range(len(tokens))), ticktext=x, tickangle=-60),
                      yaxis=dict(autorange="reversed"))  # first layer on top, as in the table
    st.plotly_chart(fig, config={"displayModeBar": False})
    view = pd.DataFrame({"pos": range(len(tokens)), "token": [repr(token_html.visible_token(t)) for t in tokens]})
    for layer, dict_id in layer_dicts:
        lf = res.layers[layer]
        view[f"L{layer} top features"] = ["BOS · not scored" if p == 0 else _fmt_features(lf.features[p], lf.acts[p])
                                          for p in range(len(tokens))]
    st.dataframe(view, hide_index=True)
    st.caption(f"Top {FEATURE_TOP_N} features (id and activation) of each layer's SAE at every token; "
               + ", ".join(f"L{layer}: {shell.literal(d)}" for layer, d in layer_dicts) + ".")


def _choose_feature(res: Any, layer: int, pos: int, dict_id: str, d_sae: int) -> int | None:
    """The feature picker: this position's top features, plus the feature already chosen (or linked), so a feature
    stays selected while the position changes."""
    ss = st.session_state
    lf = res.layers[layer]
    top = [int(f) for f in lf.features[pos] if f >= 0]
    acts = {int(f): float(a) for f, a in zip(lf.features[pos], lf.acts[pos]) if f >= 0}
    if _FEATURE_DICT not in ss:  # first run on this page: the link's feature, if it names one of this dictionary
        ss[_FEATURE_DICT] = dict_id
        raw = st.query_params.get(FEATURE_PARAM)
        linked = shell.link_int(raw)
        if linked is not None and 0 <= linked < d_sae:
            ss[_FEATURE_KEY] = linked
        elif raw is not None:
            st.warning(f"The link's feature {shell.literal(raw)} is not a feature of {shell.literal(dict_id)} (it has "
                       f"0–{d_sae - 1}): showing this token's strongest feature instead.")
    elif ss[_FEATURE_DICT] != dict_id:  # another dictionary was chosen: old feature ids mean nothing in it
        ss.pop(_FEATURE_KEY, None)
        ss[_FEATURE_DICT] = dict_id
    current = ss.get(_FEATURE_KEY)
    options = ([current] if current is not None and current not in top else []) + top
    if not options:
        st.info(f"No feature of {shell.literal(dict_id)} fires at position {pos}: choose another position or "
                "dictionary.")
        shell.set_param(FEATURE_PARAM, None)
        return None
    if current not in options:
        ss[_FEATURE_KEY] = options[0]
    feature: int = st.selectbox(
        "Feature", options, key=_FEATURE_KEY,
        format_func=lambda f: f"#{f} · act {acts[f]:.3f}" if f in acts
        else f"#{f} (not in this token's top {FEATURE_TOP_N})")
    shell.set_param(FEATURE_PARAM, str(feature))
    return int(feature)


def _feature_link(ctx: shell.PageContext, dict_id: str, feature: int) -> None:
    """Link to the feature's dashboard: ``feature_browser?store=...&dict=...&feature=...``."""
    from streamlit.errors import StreamlitAPIException

    params = {shell.STORE_PARAM: ctx.store.name, shell.MODEL_PARAM: ctx.model or "", DICT_PARAM: dict_id,
              FEATURE_PARAM: str(feature)}
    label = f"Open feature #{feature} in the Feature Browser"
    try:  # inside the app's navigation: a page link keeps the session
        st.page_link(FEATURE_BROWSER, label=label, icon=":material/open_in_new:", query_params=params)
    except StreamlitAPIException:  # the page run on its own (no navigation): a plain link with the same address
        st.markdown(f"[{label}]({FEATURE_BROWSER_URL}?{urlencode(params)})")


def _dfa_charts(ctx: shell.PageContext, res: Any, sae: Any, tokens: list[str], layer: int, pos: int, feature: int,
                dict_id: str) -> None:
    import plotly.graph_objects as go

    from backend.features import live as fa

    model = cache.get_model(ctx.model)
    acts = fa.feature_activations(sae, res.cache, layer, feature)
    st.markdown(f"**Feature #{feature}** of {shell.literal(dict_id)} at position {pos} "
                f"({shell.literal(repr(token_html.visible_token(tokens[pos])))}): "
                f"activation **{acts[pos]:.3f}**")
    _feature_link(ctx, dict_id, feature)
    st.html(token_html.signed_token_strip_html(tokens, acts, label=f"#{feature} act"))
    st.caption(f"Activation of feature #{feature} on every token of the prompt (BOS is not scored).")

    head = fa.dfa_by_head(model, sae, res.cache, layer, pos, feature)
    src = fa.dfa_by_source(model, sae, res.cache, layer, pos, feature)
    n_heads = len(head.contributions)
    cols = st.columns(2)
    fig = go.Figure(go.Bar(x=[f"L{layer}H{h}" for h in range(n_heads)], y=head.contributions,
                           marker_color=["#d62728" if v >= 0 else "#1f77b4" for v in head.contributions]))
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=40, b=10), yaxis_title="contribution",
                      title="DFA by head")
    cols[0].plotly_chart(fig, config={"displayModeBar": False})
    cols[0].caption(f"Each head's term W_enc·(z_h − b_dec): they sum to the pre-activation {head.preactivation:.3f} "
                    f"minus b_enc ({head.b_enc:+.3f}).")
    upto = list(range(pos + 1))  # causal: later tokens cannot contribute
    by_source = src.by_source[: pos + 1]
    fig = go.Figure(go.Bar(x=upto, y=by_source, marker_color=["#d62728" if v >= 0 else "#1f77b4" for v in by_source],
                           hovertext=[f"{p}: {_label(tokens[p])}" for p in upto], hoverinfo="text+y"))
    fig.update_layout(height=320, margin=dict(l=10, r=10, t=40, b=10), yaxis_title="contribution",
                      title="DFA by source position",
                      xaxis=dict(tickmode="array", tickvals=upto, ticktext=[f"{p}: {_label(tokens[p])}" for p in upto]))
    cols[1].plotly_chart(fig, config={"displayModeBar": False})
    cols[1].caption(f"Source s contributes Σ_h W_enc·A_h[{pos}, s]·v_h[s]; the −W_enc·b_dec term "
                    f"({src.bdec_total:+.3f}) belongs to no source and is left out of the bars.")
    st.html(token_html.signed_token_strip_html(tokens[: pos + 1], by_source, label="contribution"))
    st.caption("The same source contributions on the prompt's tokens (red promotes, blue suppresses the feature).")


def _feature_section(ctx: shell.PageContext, df: pd.DataFrame, pos: int) -> None:
    """Top attention-SAE features per token and layer, and DFA of one (position, feature) pair."""
    st.subheader("Attention-SAE features")
    dicts = _attention_dicts(ctx)
    if dicts.empty:
        st.info(f"This store has no attention SAEs for {shell.literal(ctx.model)}, so the feature views are off: they need the "
                f"attention-SAE precompute; run {shell.build_hint(ctx)} to add them.", icon=":material/info:")
        return
    dict_id = _choose_dict(dicts)
    layer_dicts = _layer_dicts(dicts, dict_id)
    ids = tuple(int(i) for i in df["token_id"])
    tokens = list(df["token"])
    with st.spinner(f"Encoding with {len(layer_dicts)} attention SAE(s)…"):
        try:
            res = cache.cached_prompt_features(ctx.model, ids, str(ctx.store.path), ctx.store.file_key, layer_dicts,
                                            FEATURE_TOP_N)
        except ValueError as exc:  # e.g. an SAE built for another model's shapes: one sentence, not a traceback
            st.error(str(exc))
            return
    _overview(res, tokens, layer_dicts)
    layer = int(dicts.loc[dicts["dict_id"] == dict_id, "layer"].iloc[0])
    st.markdown(f"##### Where does a feature at position {pos} come from? (layer {layer})")
    if pos == 0:
        st.info("Position 0 is the BOS token: SAEs do not score it (it is an attention-sink outlier). "
                "Choose another position above.")
        return
    sae = cache.get_dictionary(str(ctx.store.path), ctx.store.file_key, dict_id)
    feature = _choose_feature(res, layer, pos, dict_id, int(sae.cfg.d_sae))
    if feature is None:
        return
    try:
        _dfa_charts(ctx, res, sae, tokens, layer, pos, feature, dict_id)
    except ValueError as exc:  # e.g. an SAE whose input normalisation mixes heads: no per-head split exists
        st.error(str(exc))


def body(ctx: shell.PageContext) -> None:
    """Prompt in, live forward pass, tokens with loss and predictions out."""
    if ctx.model is None:
        st.warning(f"This store records no model to run: build it with {shell.build_hint(ctx)}.")
        return
    source = _prompt_input()
    with st.spinner(f"Loading {shell.literal(ctx.model)} (once per server)…"):
        model = cache.get_model(ctx.model)
    try:
        from backend.inputs.prompts import encode_prompt

        limit = min(int(model.cfg.n_ctx), predict.EXPLORER_MAX_TOKENS)
        enc = encode_prompt(model, source, max_tokens=limit)
    except InputError as exc:
        st.error(str(exc))
        return
    for warning in enc.warnings:
        st.warning(warning, icon=":material/content_cut:")
    if enc.warnings and limit < int(model.cfg.n_ctx):
        st.caption(f"The Prompt Explorer runs at most {limit:,} tokens (the model's context is "
                   f"{int(model.cfg.n_ctx):,}) so that it stays interactive on a CPU.")
    with st.spinner("Running the model…"):
        df = cache.cached_predictions(ctx.model, tuple(enc.ids), TOP_K)
    losses = df["loss"].dropna()
    cols = st.columns(3)
    cols[0].metric("Tokens", f"{len(df):,}", help="including the BOS token the model sees first")
    cols[1].metric("Mean loss", f"{losses.mean():.3f} nats" if len(losses) else "–")
    cols[2].metric("Max loss", f"{losses.max():.3f} nats" if len(losses) else "–")
    st.html(token_html.token_strip_html(list(df["token"]), list(df["loss"]), label="loss"))
    st.caption("Each token is shaded by the model's loss on the token that follows it (darker = more surprised).")
    _token_table(df)
    pos = _position_detail(df)
    _feature_section(ctx, df, pos)


shell.run_page("Prompt Explorer", body,
            caption="Run any text through the store's model, live: per-token loss, top next-token predictions and "
                    "the attention-SAE features of every token.")
