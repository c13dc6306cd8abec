"""Progress reporting shared by the CLI (tqdm bars with ETA) and the app (``st.progress``).

Long loops call :func:`track`; what it draws depends on the active sink, which the app swaps for one that
updates a Streamlit progress bar. The default sink is tqdm on stderr.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Protocol, TypeVar

T = TypeVar("T")


class ProgressSink(Protocol):
    """Receives ``(description, done, total, eta_seconds)`` updates."""

    def __call__(self, desc: str, done: int, total: int, eta: float | None) -> None: ...


_sink: ProgressSink | None = None


@contextmanager
def using_sink(sink: ProgressSink) -> Iterator[None]:
    """Route :func:`track` updates to ``sink`` for the duration of the block (e.g. a Streamlit bar)."""
    global _sink
    old, _sink = _sink, sink
    try:
        yield
    finally:
        _sink = old


def track(items: Iterable[T], total: int, desc: str, unit: str = "it") -> Iterator[T]:
    """Iterate ``items`` while showing progress with an ETA (tqdm in a terminal, the active sink otherwise)."""
    if _sink is None:
        from tqdm.auto import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit, dynamic_ncols=True)
        return
    start = time.perf_counter()
    _sink(desc, 0, total, None)
    for done, item in enumerate(items, start=1):
        yield item
        elapsed = time.perf_counter() - start
        eta = elapsed / done * (total - done) if done else None
        _sink(desc, done, total, eta)


def say(message: str) -> None:
    """A one-line status message (printed in the CLI, shown as the bar text in the app)."""
    if _sink is None:
        from tqdm.auto import tqdm

        tqdm.write(message)
    else:
        _sink(message, 0, 0, None)


Callback = Callable[[str], None]
