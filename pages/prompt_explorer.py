"""Prompt Explorer: type (or upload) any prompt and run it live through the store's model.

Shows every token with the model's loss on the token that follows it and its top-5 next-token predictions, plus a
closer look at one position. When the store holds attention-output SAEs, also every token's top features at each
SAE layer and, for one (position, feature), its direct feature attribution by head and by source position
(backend.features.live); the same overview and per-feature activations for the store's MLP transcoders. Interventions:
set, scale or zero features or heads (at chosen positions or all) and compare the next-token distribution, the metric
and a greedy continuation with the unchanged run's, on the live model, the frozen replacement model, or both side by
side (backend.interventions). Deep link: ``?store=...&model=...&prompt=...&pos=...&dict=...&feature=...`` plus
``do=SPEC&on=frozen,live&answer=...&wrong=...&n=...`` for interventions (backend.ui.intervention_links; prompts
longer than :data:`MAX_LINK_CHARS` are not put in the link).
"""

from __future__ import annotations

import hashlib
import html
import math
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlencode

import numpy as np
import pandas as pd
import streamlit as st

from backend.dictionaries.kinds import TRANSCODER
from backend.errors import InputError
from backend.interventions.run import FROZEN_NO_CONTINUATION, MAX_CONTINUATION
from backend.interventions.run import MODES as MODELS
from backend.interventions.spec import Intervention
from backend.model import predict
from backend.ui import cache, shell, token_html
from backend.ui import intervention_links as links

PROMPT_PARAM = links.PROMPT_PARAM
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


ATTN_TITLE = "Strongest attention-SAE feature per token and layer (hover for the top features)"
TRANSCODER_TITLE = "Strongest transcoder feature per token and layer (hover for the top features)"


def _overview(res: Any, tokens: list[str], layer_dicts: tuple[tuple[int, str], ...], title: str = ATTN_TITLE,
              table: bool = True) -> None:
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
    fig.update_layout(height=120 + (40 if len(layers) <= 6 else 20) * len(layers), margin=dict(l=10, r=10, t=30, b=10),
                      title=title,
                      xaxis=dict(tickmode="array", tickvals=list(range(len(tokens))), ticktext=x, tickangle=-60),
                      yaxis=dict(autorange="reversed"))  # first layer on top, as in the table
    st.plotly_chart(fig, config={"displayModeBar": False})
    if not table:
        return
    view = pd.DataFrame({"pos": range(len(tokens)), "token": [repr(token_html.visible_token(t)) for t in tokens]})
    for layer, dict_id in layer_dicts:
        lf = res.layers[layer]
        view[f"L{layer} top features"] = ["BOS · not scored" if p == 0 else _fmt_features(lf.features[p], lf.acts[p])
                                          for p in range(len(tokens))]
    st.dataframe(view, hide_index=True)
    st.caption(f"Top {FEATURE_TOP_N} features (id and activation) of each layer's SAE at every token; "
               + ", ".join(f"L{layer}: {shell.literal(d)}" for layer, d in layer_dicts) + ".")


@dataclass(frozen=True)
class _Picker:
    """Session keys of one feature picker (attention SAEs, transcoders). The chosen feature lives in a plain key; the
    selectbox's key includes a digest of the prompt, position and dictionary, so a new prompt draws a new widget
    instead of one that still holds the previous prompt's option and label."""

    choice: str  # plain key: the chosen feature
    dict_key: str  # plain key: the dictionary the choice belongs to
    ids_key: str  # plain key: the prompt (token ids) the choice was last checked on
    widget: str  # prefix of the selectbox key
    linked: bool  # the link's ``feature`` parameter belongs to this picker


_ATTN_PICKER = _Picker("_pe_feature", "_pe_feature_dict", "_pe_feature_ids", "pe_feature", linked=True)
_TC_PICKER = _Picker("_pe_tc_feature", "_pe_tc_dict", "_pe_tc_ids", "pe_tc_feature", linked=False)


def _choose_feature(res: Any, layer: int, pos: int, dict_id: str, d_sae: int, act_at: Callable[[int], float],
                    picker: _Picker = _ATTN_PICKER) -> int | None:
    """The feature picker: this position's top features, plus the feature already chosen (or linked), so a feature
    stays selected while the position changes. After a new prompt, a chosen feature that does not fire at this
    position is dropped (with a note) for the position's strongest one. ``act_at(f)``: feature f's activation at
    ``pos`` on this prompt."""
    ss = st.session_state
    lf = res.layers[layer]
    top = [int(f) for f in lf.features[pos] if f >= 0]
    acts = {int(f): float(a) for f, a in zip(lf.features[pos], lf.acts[pos]) if f >= 0}
    ids = tuple(int(i) for i in res.token_ids)
    if picker.dict_key not in ss:  # first run on this page: the link's feature, if it names one of this dictionary
        ss[picker.dict_key] = dict_id
        ss[picker.ids_key] = ids
        raw = st.query_params.get(FEATURE_PARAM) if picker.linked else None
        linked = shell.link_int(raw)
        if linked is not None and 0 <= linked < d_sae:
            ss[picker.choice] = linked
        elif raw is not None:
            st.warning(f"The link's feature {shell.literal(raw)} is not a feature of {shell.literal(dict_id)} (it has "
                       f"0–{d_sae - 1}): showing this token's strongest feature instead.")
    elif ss[picker.dict_key] != dict_id:  # another dictionary was chosen: old feature ids mean nothing in it
        ss.pop(picker.choice, None)
        ss[picker.dict_key] = dict_id
    current = ss.get(picker.choice)
    if ss.get(picker.ids_key) != ids:  # a new prompt: the choice stays only where it fires
        ss[picker.ids_key] = ids
        if current is not None and current not in acts and not act_at(current) > 0:
            st.caption(f"Feature #{current} does not fire at position {pos} of this prompt: showing the position's "
                       "strongest feature instead.")
            ss.pop(picker.choice, None)
            current = None
    options = ([current] if current is not None and current not in top else []) + top
    if not options:
        st.info(f"No feature of {shell.literal(dict_id)} fires at position {pos}: choose another position or "
                "dictionary.")
        if picker.linked:
            shell.set_param(FEATURE_PARAM, None)
        return None
    if current not in options:
        current = options[0]
    digest = hashlib.sha1(repr((ids, pos, dict_id)).encode()).hexdigest()[:12]
    feature: int = st.selectbox(
        "Feature", options, index=options.index(current), key=f"{picker.widget}_{digest}",
        format_func=lambda f: f"#{f} · act {acts[f]:.3f}" if f in acts
        else f"#{f} · act {act_at(f):.3f} (not in this token's top {FEATURE_TOP_N})")
    ss[picker.choice] = int(feature)
    if picker.linked:
        shell.set_param(FEATURE_PARAM, str(feature))
    return int(feature)


def _feature_link(ctx: shell.PageContext, dict_id: str, feature: int, label: str | None = None) -> None:
    """Link to the feature's dashboard: ``feature_browser?store=...&dict=...&feature=...``."""
    from streamlit.errors import StreamlitAPIException

    params = {shell.STORE_PARAM: ctx.store.name, shell.MODEL_PARAM: ctx.model or "", DICT_PARAM: dict_id,
              FEATURE_PARAM: str(feature)}
    label = label or f"Open feature #{feature} in the Feature Browser"
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
    _intervene_button("attn", layer, feature, pos)
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

    def act_at(f: int) -> float:
        from backend.features.live import feature_activations

        return float(feature_activations(sae, res.cache, layer, f)[pos])

    feature = _choose_feature(res, layer, pos, dict_id, int(sae.cfg.d_sae), act_at)
    if feature is None:
        return
    try:
        _dfa_charts(ctx, res, sae, tokens, layer, pos, feature, dict_id)
    except ValueError as exc:  # e.g. an SAE whose input normalisation mixes heads: no per-head split exists
        st.error(str(exc))


# --------------------------------------------------------------------------------------------------------------
# MLP-transcoder features (Dunefsky et al. 2024): which features of each layer's transcoder fire on each token.


def _transcoder_section(ctx: shell.PageContext, df: pd.DataFrame, pos: int) -> None:
    """Top transcoder features per token and layer, and one (layer, position, feature)'s activations."""
    st.subheader("Transcoder features")
    dicts: pd.DataFrame = ctx.summary["dictionaries"]
    if dicts.empty or not ((dicts["kind"] == TRANSCODER) & (dicts["model"] == ctx.model)).any():
        st.info(f"This store has no MLP transcoders for {shell.literal(ctx.model)}: they come with the transcoder "
                f"precompute; run {shell.build_hint(ctx)} to add them.", icon=":material/info:")
        return
    ids = tuple(int(i) for i in df["token_id"])
    tokens = list(df["token"])
    with st.spinner("Encoding with the transcoders…"):
        res = cache.cached_transcoder_features(ctx.model, ids, str(ctx.store.path), ctx.store.file_key,
                                               FEATURE_TOP_N)
        transcoders, _ = cache.cached_graph_dictionaries(str(ctx.store.path), ctx.store.file_key, ctx.model, False)
    dict_of = {layer: str(tc.cfg.metadata.dict_id) for layer, tc in transcoders.items()}
    layers = sorted(res.layers)
    _overview(res, tokens, tuple((layer, dict_of[layer]) for layer in layers), title=TRANSCODER_TITLE, table=False)
    if pos == 0:
        st.caption("Position 0 is the BOS token: transcoders do not score it. Choose another position above.")
        return
    ss = st.session_state
    if ss.get(_TC_LAYER_KEY) not in layers:  # default: the layer whose strongest feature at this position is largest
        strongest = [np.nan_to_num(res.layers[layer].acts[pos, 0], nan=-np.inf) for layer in layers]
        ss[_TC_LAYER_KEY] = layers[int(np.argmax(strongest))]
    cols = st.columns([1, 3])
    layer: int = cols[0].selectbox("Transcoder layer", layers, key=_TC_LAYER_KEY, format_func=lambda l: f"layer {l}")
    tc = transcoders[layer]
    from backend.features.live import transcoder_activations

    with cols[1]:
        feature = _choose_feature(res, layer, pos, dict_of[layer], int(tc.cfg.d_sae),
                                  lambda f: float(transcoder_activations(tc, res.cache, layer, f)[pos]), _TC_PICKER)
    if feature is None:
        return
    acts = transcoder_activations(tc, res.cache, layer, feature)
    st.markdown(f"**Transcoder feature #{feature}** of layer {layer} ({shell.literal(dict_of[layer])}) at position "
                f"{pos} ({shell.literal(repr(token_html.visible_token(tokens[pos])))}): activation **{acts[pos]:.3f}**")
    _feature_link(ctx, dict_of[layer], feature, label=f"Open transcoder feature #{feature}'s dashboard")
    _intervene_button("transcoder", layer, feature, pos)
    st.html(token_html.signed_token_strip_html(tokens, acts, label=f"#{feature} act"))
    st.caption(f"Activation of transcoder feature #{feature} (layer {layer}) on every token (BOS is not scored).")


# --------------------------------------------------------------------------------------------------------------
# Interventions (backend.interventions): set, scale or zero features or heads, beside the unchanged run.

_DO_KEY = "pe_do"
_KEEP_DO = "_pe_do"
_ON_KEY = "pe_on"
_ANSWER_KEY = "pe_answer"
_WRONG_KEY = "pe_wrong"
_STEPS_KEY = "pe_steps"
_TC_LAYER_KEY = "pe_tc_layer"
DEFAULT_STEPS = 8  # greedy continuation tokens: one forward pass each, with and without the interventions
IV_TOP_K = 8
MODEL_TITLES = {"live": "Live model", "frozen": "Frozen replacement model"}
UNIT_TITLES = {"transcoder": "transcoder feature", "attn": "attention-SAE feature", "head": "attention head"}


def _add_intervention(spec: str) -> None:
    """Button callback: append ``spec`` to the interventions (runs before the page, so it may set the text box)."""
    ss = st.session_state
    current = str(ss.get(_DO_KEY) or "").strip().rstrip(";")
    ss[_DO_KEY] = f"{current};{spec}" if current else spec


def _intervene_button(kind: str, layer: int, feature: int, pos: int) -> None:
    """A button adding "zero this feature at this position" to the interventions section."""
    spec = Intervention(kind, int(layer), int(feature), "zero", 0.0, (int(pos),)).describe()
    st.button(f"Intervene: zero #{feature} at position {pos}", key=f"pe_iv_{kind}_{layer}_{feature}_{pos}",
              on_click=_add_intervention, args=(spec,), help=f"Adds {spec} to the interventions above.")


def _widths(ctx: shell.PageContext) -> dict[tuple[str, int], int]:
    """Features per (intervention kind, layer) for the dictionaries an intervention can use (one per layer)."""
    transcoders, saes = cache.cached_graph_dictionaries(str(ctx.store.path), ctx.store.file_key, ctx.model, True)
    out = {("transcoder", layer): int(t.cfg.d_sae) for layer, t in transcoders.items()}
    out.update({("attn", layer): int(s.cfg.d_sae) for layer, s in saes.items()})
    return out


def _keep_valid(key: str, options: list[Any]) -> None:
    """A widget's stored value stays only while it is one of ``options`` (the prompt or the kind changed)."""
    if st.session_state.get(key) not in options:
        st.session_state[key] = options[0]


def _builder(widths: dict[tuple[str, int], int], strings: list[str], n_layers: int, n_heads: int) -> None:
    """Widgets composing one intervention, and the button adding it to the list."""
    ss = st.session_state
    kinds = [k for k in ("transcoder", "attn") if any(kk == k for kk, _ in widths)] + ["head"]
    c = st.columns([1.4, 0.8, 1, 2.2, 0.9, 0.9])
    _keep_valid("pe_iv_kind", kinds)
    kind: str = c[0].selectbox("Unit", kinds, key="pe_iv_kind", format_func=UNIT_TITLES.get)
    layers = sorted(layer for k, layer in widths if k == kind) if kind != "head" else list(range(n_layers))
    _keep_valid("pe_iv_layer", layers)
    layer: int = c[1].selectbox("Layer", layers, key="pe_iv_layer")
    top = (widths[(kind, layer)] if kind != "head" else n_heads) - 1
    if not 0 <= int(ss.get("pe_iv_index", 0)) <= top:
        ss["pe_iv_index"] = 0
    index = int(c[2].number_input("Feature" if kind != "head" else "Head", min_value=0, max_value=top, step=1,
                                  key="pe_iv_index"))
    choices = list(range(1, len(strings)))
    ss["pe_iv_pos"] = [p for p in ss.get("pe_iv_pos", []) if p in choices]
    positions = c[3].multiselect("Positions (none: every token after BOS)", choices, key="pe_iv_pos",
                                 format_func=lambda p: f"{p}: {token_html.visible_token(strings[p])!r}")
    modes = ["zero", "scale", "set"] if kind != "head" else ["zero", "scale"]
    _keep_valid("pe_iv_mode", modes)
    mode: str = c[4].selectbox("Mode", modes, key="pe_iv_mode",
                               help="zero; scale (multiply by the value); set (hold a feature at the value)")
    value = float(c[5].number_input("Value", value=2.0, key="pe_iv_value", disabled=mode == "zero",
                                    help="scale: the factor; set: the feature's activation"))
    spec = Intervention(kind, int(layer), index, mode, 0.0 if mode == "zero" else value,
                        tuple(sorted(positions)) or None).describe()
    st.button("Add this intervention", key="pe_iv_add", on_click=_add_intervention, args=(spec,),
              help=f"Adds {spec} to the interventions below.")


def _init_interventions() -> None:
    """First run on this page: the link's interventions, models, target and length (else what was typed before)."""
    ss = st.session_state
    q = st.query_params
    if _DO_KEY not in ss:
        ss[_DO_KEY] = q.get(links.DO_PARAM) or ss.get(_KEEP_DO) or ""
    if _ON_KEY not in ss:
        wanted = [m.strip() for m in (q.get(links.ON_PARAM) or "live").split(",") if m.strip()]
        bad = [m for m in wanted if m not in MODELS]
        if bad:
            st.warning(f"The link asks for the model(s) {shell.literal(','.join(bad))}; the models are "
                       f"{', '.join(MODELS)}: using the others.")
        ss[_ON_KEY] = list(dict.fromkeys(m for m in wanted if m in MODELS)) or ["live"]
    if _ANSWER_KEY not in ss:
        ss[_ANSWER_KEY] = q.get(links.ANSWER_PARAM) or ""
    if _WRONG_KEY not in ss:
        ss[_WRONG_KEY] = q.get(links.WRONG_PARAM) or ""
    if _STEPS_KEY not in ss:
        steps = shell.link_int(q.get(links.STEPS_PARAM))
        ss[_STEPS_KEY] = steps if steps is not None and 0 <= steps <= MAX_CONTINUATION else DEFAULT_STEPS


def _intervention_section(ctx: shell.PageContext, source: str | bytes, strings: list[str], limit: int) -> None:
    """Compose interventions, run them on the live and/or frozen model, and show each beside the unchanged run."""
    st.subheader("Interventions")
    _init_interventions()
    ss = st.session_state
    info = ctx.model_info
    model = cache.get_model(ctx.model)
    n_layers = int(info.get("n_layers") or model.cfg.n_layers)
    n_heads = int(info.get("n_heads") or model.cfg.n_heads)
    widths = _widths(ctx)
    with st.expander("Add an intervention", expanded=not ss[_DO_KEY]):
        _builder(widths, strings, n_layers, n_heads)
    spec = st.text_input(
        "Interventions (KIND:LAYER:INDEX[@POSITIONS]=MODE[:VALUE], joined by ;)", key=_DO_KEY,
        placeholder="e.g. transcoder:1:5@3=zero;head:0:1=scale:0.5",
        help="KIND transcoder, attn (attention-SAE feature) or head; POSITIONS a comma list (none: every token after "
             "BOS); MODE zero, scale (VALUE = factor) or set (VALUE = the feature's activation). Features are "
             "changed with their dictionary's error held fixed.").strip()
    ss[_KEEP_DO] = spec
    c = st.columns([2, 1, 1, 1])
    on: list[str] = c[0].multiselect("Run on", list(MODELS), key=_ON_KEY, format_func=MODEL_TITLES.get,
                                     help="Live: the model itself. Frozen: the replacement model an attribution "
                                          "graph explains (attention and norms frozen at the prompt's values). "
                                          "Both: side by side.")
    steps = int(c[1].number_input("Continuation tokens", min_value=0, max_value=MAX_CONTINUATION, step=1,
                                  key=_STEPS_KEY, help="greedy tokens generated after the prompt (live model)"))
    answer = c[2].text_input("Answer token (optional)", key=_ANSWER_KEY,
                             help="report the metric logit(answer) − mean logit; one token, mind the leading space")
    wrong = c[3].text_input("Wrong token (optional)", key=_WRONG_KEY,
                            help="with an answer: report logit(answer) − logit(wrong) instead")
    for name, value in ((links.DO_PARAM, spec), (links.ON_PARAM, ",".join(on)), (links.ANSWER_PARAM, answer),
                        (links.WRONG_PARAM, wrong), (links.STEPS_PARAM, str(steps))):
        shell.set_param(name, value if spec and value else None)
    if not spec:
        st.caption("Add an intervention above (or use a feature's \"Intervene\" button below) to compare the "
                   "prediction and a continuation with the unchanged model's.")
        return
    if not on:
        st.info("Choose the model(s) to run the interventions on.")
        return
    for col, mode in zip(st.columns(len(on)), on):
        with col:
            _intervention_result(ctx, source, spec, mode, answer, wrong, steps, limit)


def _continuation_html(mode: str, run: str, strings: list[str]) -> str:
    # data-cs-continuation names the run for tests and scripts; the tokens are escaped by token_strip_html.
    return (f'<div data-cs-continuation="{mode}-{run}"><div style="font-size: .85em; color: gray;">{run}</div>'
            + token_html.token_strip_html(strings) + "</div>")


def _intervention_result(ctx: shell.PageContext, source: str | bytes, spec: str, mode: str, answer: str, wrong: str,
                         steps: int, limit: int) -> None:
    """One model's intervened run beside its unchanged run."""
    from backend.inputs.prompts import token_strings

    st.markdown(f"**{MODEL_TITLES[mode]}**")
    try:
        with st.spinner(f"Running the interventions on the {mode} model…"):
            r = cache.cached_intervention(ctx.model, str(ctx.store.path), ctx.store.file_key, source, spec, mode,
                                          answer or None, wrong or None, IV_TOP_K, steps if mode == "live" else 0,
                                          limit)
    except InputError as exc:
        st.error(str(exc))
        return
    tokenizer = cache.get_model(ctx.model).tokenizer
    m = st.columns(3)
    m[0].metric("KL", f"{r.kl:.4f}", help="KL(unchanged ‖ intervened) of the next-token distribution at the last "
                                            "position, nats")
    m[1].metric("p(top token)", f"{r.intervened.reference_prob:.1%}",
                delta=f"{100 * (r.intervened.reference_prob - r.baseline.reference_prob):+.1f} pp",
                help=f"probability of the unchanged run's top token; was {r.baseline.reference_prob:.1%}")
    if r.metric_change is not None:
        m[2].metric(str(r.metric_name), f"{r.intervened.metric:.3f}", delta=f"{r.metric_change:+.3f}",
                    help=f"unchanged {r.baseline.metric:.3f}")
    shown = lambda ids: [repr(token_html.visible_token(t)) for t in token_strings(tokenizer, ids)]  # noqa: E731
    st.dataframe(pd.DataFrame({"unchanged": shown(r.baseline.top_ids), "p unchanged": r.baseline.top_probs,
                               "intervened": shown(r.intervened.top_ids), "p intervened": r.intervened.top_probs}),
                 hide_index=True, column_config={
                     "p unchanged": st.column_config.NumberColumn(format="%.3f"),
                     "p intervened": st.column_config.NumberColumn(format="%.3f")})
    if mode == "frozen":
        st.info(FROZEN_NO_CONTINUATION, icon=":material/info:")
    elif steps:
        base, new = r.baseline.continuation, r.intervened.continuation
        st.html(_continuation_html(mode, "unchanged", token_strings(tokenizer, base)))
        st.html(_continuation_html(mode, "intervened", token_strings(tokenizer, new)))
        first = next((i for i, (a, b) in enumerate(zip(base, new)) if a != b), None)
        st.caption("The greedy continuation is unchanged." if first is None else
                   f"The greedy continuation changes from its token {first + 1} on.")
    st.caption("Interventions: " + shell.literal("; ".join(i.describe() for i in r.interventions), 400))


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
    _intervention_section(ctx, source, list(df["token"]), limit)
    _feature_section(ctx, df, pos)
    _transcoder_section(ctx, df, pos)


shell.run_page("Prompt Explorer", body,
            caption="Run any text through the store's model, live: per-token loss, top next-token predictions, the "
                    "attention-SAE and transcoder features of every token, and interventions on features or heads.")
