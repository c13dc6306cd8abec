"""Progress reporting shared by the CLI (tqdm bars with ETA) and the app (``st.progress``).

Long loops call :func:`track`; what it draws depends on the active sink, which the app swaps for one that
updates a Streamlit progress bar. The default sink is tqdm on stderr. :class:`MethodClock` turns per-step estimates
and the measured progress of the step running into an ETA for a run of several steps.
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


class MethodClock:
    """An honest ETA for a run made of named steps done one after another (e.g. attribution methods).

    Before the run each step has an estimate in seconds (from a measured unit time × its number of units). While it
    runs: a step with a progress loop is timed by its own measured rate (elapsed / done × remaining units); a step
    without one counts down its estimate; steps still waiting are their estimates × the ratio actual / estimated
    measured on the steps finished so far (1 before any has finished). So the total never restarts at each step, and
    every figure says what it rests on. ``now`` is injectable for tests.
    """

    def __init__(self, estimates: dict[str, float], now: Callable[[], float] = time.perf_counter) -> None:
        self.estimates = dict(estimates)
        self.now = now
        self.seconds: dict[str, float] = {}  # finished steps: measured wall time
        self.current: str | None = None
        self._start = 0.0
        self._done = 0
        self._total = 0

    def start(self, name: str) -> None:
        """Step ``name`` begins."""
        self.current, self._start, self._done, self._total = name, self.now(), 0, 0

    @property
    def done(self) -> int:
        """Units of the running step done so far (0 without a progress loop)."""
        return self._done

    @property
    def total(self) -> int:
        """Units of the running step in all (0 without a progress loop)."""
        return self._total

    def update(self, done: int, total: int) -> None:
        """The current step's progress loop reports ``done`` of ``total`` units."""
        self._done, self._total = done, total

    def finish(self, name: str) -> None:
        """Step ``name`` ends (its wall time is measured here)."""
        self.seconds[name] = self.now() - self._start
        self.current = None

    @property
    def ratio(self) -> float:
        """Measured / estimated seconds over the finished steps (1.0 before any has finished)."""
        est = sum(self.estimates.get(n, 0.0) for n in self.seconds)
        return sum(self.seconds.values()) / est if est > 0 else 1.0

    def remaining(self, name: str) -> float:
        """Seconds ``name`` still needs: 0 when finished, see the class docstring otherwise."""
        if name in self.seconds:
            return 0.0
        expected = self.estimates.get(name, 0.0) * self.ratio
        if name != self.current:
            return expected
        elapsed = self.now() - self._start
        if self._total > 0 and self._done > 0:
            return elapsed / self._done * (self._total - self._done)
        return max(expected - elapsed, 0.0)

    def eta(self) -> float:
        """Seconds left for the whole run."""
        return sum(self.remaining(n) for n in self.estimates)
