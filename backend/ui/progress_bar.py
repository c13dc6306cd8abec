"""Progress in the app: :mod:`backend.progress` sinks that drive ``st.progress`` bars with an ETA (one bar, or one bar
per step of a run with the whole run's ETA)."""

from __future__ import annotations

import math
from typing import Any, Callable

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


def st_method_progress(estimates: dict[str, float], unit: str = "passes",
                       container: Any = None) -> tuple[ProgressSink, Callable[[str, float | None], None]]:
    """One st.progress bar per step of a run (``estimates``: step -> estimated seconds, in run order) and a line with
    the whole run's ETA (:class:`backend.progress.MethodClock`). Returns the sink for
    :func:`backend.progress.using_sink` (the running step's progress loop) and the callback for step starts and ends
    (``(name, None)`` / ``(name, seconds)``, e.g. ``run_comparison(on_method=...)``)."""
    from backend.progress import MethodClock

    box = container if container is not None else st
    clock = MethodClock(estimates)
    overall = box.empty()
    bars = {name: box.progress(0.0) for name in estimates}

    def draw() -> None:
        for name, bar in bars.items():
            left = clock.remaining(name)
            if name in clock.seconds:
                bar.progress(1.0, text=f"{name} · done in {clock.seconds[name]:.1f} s")
            elif name == clock.current:
                done, total = clock.done, clock.total
                count = f" · {done:,}/{total:,} {unit}" if total else ""
                frac = done / total if total else 0.0
                bar.progress(min(1.0, frac), text=f"{name} · running{count} · {format_eta(left)} left")
            else:
                bar.progress(0.0, text=f"{name} · waiting · about {format_eta(left)}")
        basis = ("its own measured rate for the running method; the waiting ones at their estimate × "
                 f"{clock.ratio:.2f}, the ratio measured / estimated so far" if clock.seconds else
                 "estimates from a forward pass timed just now")
        overall.caption(f"About {format_eta(clock.eta())} left ({basis}).")

    def on_step(name: str, seconds: float | None) -> None:
        if seconds is None:
            clock.start(name)
        else:
            clock.finish(name)
        draw()

    def sink(desc: str, done: int, total: int, eta: float | None) -> None:
        if total > 0 and clock.current is not None:
            clock.update(done, total)
            draw()

    draw()
    return sink, on_step
