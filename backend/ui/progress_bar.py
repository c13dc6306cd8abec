"""Progress in the app: a :mod:`backend.progress` sink that drives one ``st.progress`` bar with an ETA."""

from __future__ import annotations

import math
from typing import Any

import streamlit as st

from backend.progress import ProgressSink


def format_eta(seconds: float | None) -> str:
    """Short human ETA: '<1 s', '42 s', '3 min 05 s', '1 h 02 min'."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 1:
        return "<1 s"
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def st_progress_sink(container: Any = None) -> ProgressSink:
    """A sink for :func:`backend.progress.using_sink` that drives one st.progress bar (text with count and ETA).

    ``with using_sink(st_progress_sink()): precompute(...)`` shows the backend's progress in the page.
    """
    bar = (container if container is not None else st).progress(0.0, text="Starting…")
    state = {"frac": 0.0}

    def sink(desc: str, done: int, total: int, eta: float | None) -> None:
        if total > 0:
            state["frac"] = min(1.0, max(0.0, done / total))
            text = f"{desc}: {done:,}/{total:,}"
            if done < total:
                text += f" · ETA {format_eta(eta)}"
        else:  # a status message from backend.progress.say: keep the bar where it is
            text = desc
        bar.progress(state["frac"], text=text)

    return sink
