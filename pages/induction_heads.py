"""Induction Heads: per-head prefix-matching and copying scores on repeated random tokens.

Placeholder until the induction-heads issue lands: says what is missing.
"""

from __future__ import annotations

import streamlit as st

from backend import ui


def body(ctx: ui.PageContext) -> None:
    """Say what the view will show; nothing has to be precomputed for it yet."""
    info = ctx.model_info
    st.info(
        "The Induction Heads view is not built yet: it arrives with the induction-heads issue, which scores every "
        "attention head for prefix matching and copying on repeated random tokens. Nothing needs to be "
        "precomputed for it now.",
        icon=":material/construction:",
    )
    if ctx.model:
        st.caption(f"This store's model {ctx.model} has {info.get('n_layers', '?')} layers × "
                   f"{info.get('n_heads', '?')} heads to score.")


ui.run_page("Induction Heads", body)
