"""Prompt Explorer: type (or upload) any prompt and run it live through the store's model.

Shows every token with the model's loss on the token that follows it and its top-5 next-token predictions, plus a
closer look at one position. Deep link: ``?store=...&model=...&prompt=...&pos=...`` (prompts longer than
:data:`MAX_LINK_CHARS` are not put in the link).
"""

from __future__ import annotations

import math

import pandas as pd
import streamlit as st

from backend import ui
from backend.errors import InputError

PROMPT_PARAM = "prompt"
POS_PARAM = "pos"
MAX_LINK_CHARS = 2_000  # longer prompts would make unwieldy links (and browsers cap URL length)
TOP_K = 5
DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"
_PROMPT_KEY = "pe_prompt"
_KEEP_PROMPT = "_pe_prompt"  # plain session key: survives page switches (widget state does not)
_FILE_KEY = "pe_file"
_POS_KEY = "pe_pos"
_LAST_N_KEY = "_pe_last_n"


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
        st.caption(f"Running the uploaded file **{upload.name}** instead of the text above.")
        ui.set_param(PROMPT_PARAM, None)
        return upload.getvalue()
    if len(text) > MAX_LINK_CHARS:
        ui.set_param(PROMPT_PARAM, None)
        st.caption(f"The prompt is longer than {MAX_LINK_CHARS:,} characters, so the page link does not include it.")
    else:
        ui.set_param(PROMPT_PARAM, text if text.strip() else None)
    return text


def _top_text(tokens: list[str], probs: list[float]) -> str:
    return "   ".join(f"{ui.visible_token(t)!r} {p:.0%}" for t, p in zip(tokens, probs))


def _token_table(df: pd.DataFrame) -> None:
    view = pd.DataFrame({
        "pos": df["pos"],
        "token": [repr(ui.visible_token(t)) for t in df["token"]],
        "id": df["token_id"],
        "next token": [repr(ui.visible_token(t)) if i < len(df) - 1 else "" for i, t in enumerate(df["next_token"])],
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


def _position_detail(df: pd.DataFrame) -> None:
    import plotly.graph_objects as go  # only this section draws a chart

    n = len(df)
    ss = st.session_state
    if _POS_KEY not in ss:
        raw = st.query_params.get(POS_PARAM)
        ss[_POS_KEY] = int(raw) if raw is not None and raw.lstrip("-").isdigit() else n - 1
    elif ss[_POS_KEY] == ss.get(_LAST_N_KEY, n) - 1:
        ss[_POS_KEY] = n - 1  # the last position was chosen: keep following the end when the prompt changes
    ss[_POS_KEY] = min(max(int(ss[_POS_KEY]), 0), n - 1)  # the prompt may have shrunk under the choice
    ss[_LAST_N_KEY] = n
    pos = st.selectbox("Position", list(range(n)), key=_POS_KEY,
                       format_func=lambda p: f"{p}: {ui.visible_token(df['token'].iloc[p])!r}")
    ui.set_param(POS_PARAM, str(pos))
    row = df.iloc[pos]
    tokens = [repr(ui.visible_token(t)) for t in row["top_tokens"]]
    fig = go.Figure(go.Bar(x=list(row["top_probs"])[::-1], y=tokens[::-1], orientation="h",
                           text=[f"{p:.1%}" for p in list(row["top_probs"])[::-1]], textposition="auto"))
    fig.update_layout(height=60 + 40 * len(tokens), margin=dict(l=10, r=10, t=30, b=10),
                      title=f"Top-{TOP_K} next-token predictions after position {pos}", xaxis_title="probability")
    st.plotly_chart(fig, config={"displayModeBar": False})
    if pos < n - 1:
        st.caption(f"Actual next token {ui.visible_token(row['next_token'])!r}: loss {row['loss']:.3f} nats "
                   f"(p = {math.exp(-row['loss']):.1%}).")
    else:
        st.caption("This is the last position: nothing follows it in the prompt, so it has no loss.")


def body(ctx: ui.PageContext) -> None:
    """Prompt in, live forward pass, tokens with loss and predictions out."""
    if ctx.model is None:
        st.warning(f"This store records no model to run: build it with `{ui.build_hint(ctx)}`.")
        return
    source = _prompt_input()
    with st.spinner(f"Loading {ctx.model} (once per server)…"):
        model = ui.get_model(ctx.model)
    try:
        from backend.prompts import encode_prompt

        limit = min(int(model.cfg.n_ctx), ui.EXPLORER_MAX_TOKENS)
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
        df = ui.cached_predictions(ctx.model, tuple(enc.ids), TOP_K)
    losses = df["loss"].dropna()
    cols = st.columns(3)
    cols[0].metric("Tokens", f"{len(df):,}", help="including the BOS token the model sees first")
    cols[1].metric("Mean loss", f"{losses.mean():.3f} nats" if len(losses) else "–")
    cols[2].metric("Max loss", f"{losses.max():.3f} nats" if len(losses) else "–")
    st.html(ui.token_strip_html(list(df["token"]), list(df["loss"]), label="loss"))
    st.caption("Each token is shaded by the model's loss on the token that follows it (darker = more surprised).")
    _token_table(df)
    _position_detail(df)


ui.run_page("Prompt Explorer", body,
            caption="Run any text through the store's model, live: per-token loss and top next-token predictions.")
