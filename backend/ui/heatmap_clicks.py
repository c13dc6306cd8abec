"""Heatmaps whose cells open what they show: a click on a head's cell opens that head.

plotly cannot select heatmap cells, so an almost invisible clickable point sits over every cell; the points carry the
cell's hover text and an id, so they, not the heatmap, are what the pointer finds. Streamlit's ``on_select`` then
hands the clicked point back to the page (:func:`clicked`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import streamlit as st

CELLS_TRACE = "heads"  # the name of the clickable points' trace (browser tests find the cells by it)


def add_cell_points(fig: Any, x: Sequence[Any], y: Sequence[Any], ids: Sequence[str], hover: Sequence[str],
                    size: int = 14) -> None:
    """Lay a clickable point over each cell (``x[i]``, ``y[i]``) of ``fig``'s heatmap carrying ``ids[i]`` and its
    hover text ``hover[i]`` (already escaped: plotly reads it as a little HTML); the heatmap stops hovering."""
    import plotly.graph_objects as go

    fig.update_traces(hoverinfo="skip", hovertemplate=None, selector=dict(type="heatmap"))
    fig.add_trace(go.Scatter(x=list(x), y=list(y), customdata=list(ids), mode="markers", hovertext=list(hover),
                             hoverinfo="text", showlegend=False, name=CELLS_TRACE,
                             marker=dict(size=size, symbol="square", opacity=0.01, color="#000")))
    fig.update_layout(clickmode="event+select")


def clicked(key: str) -> str | None:
    """The id of the cell last clicked on the chart drawn with ``key`` (None if none): read in its ``on_select``."""
    event = st.session_state.get(key) or {}
    for point in (event.get("selection") or {}).get("points") or []:
        cd = point.get("customdata")
        value = cd[0] if isinstance(cd, (list, tuple)) and cd else cd
        if isinstance(value, str):
            return value
    return None
