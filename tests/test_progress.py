"""The run-wide ETA (backend.progress.MethodClock) on a fake clock: every figure worked out by hand below."""

from __future__ import annotations

import pytest

from backend.progress import MethodClock


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_eta_uses_estimates_then_measured_rates_and_never_restarts() -> None:
    t = FakeClock()
    clock = MethodClock({"atp": 2.0, "ig": 10.0, "patching": 20.0}, now=t)
    assert clock.eta() == pytest.approx(32.0)  # nothing measured yet: the estimates
    clock.start("atp")
    t.t = 1.0
    assert clock.remaining("atp") == pytest.approx(1.0)  # no progress loop: its estimate counts down
    t.t = 4.0
    clock.finish("atp")  # took 4 s against 2 estimated: the waiting ones are now expected to take twice as long
    assert clock.ratio == pytest.approx(2.0)
    assert clock.eta() == pytest.approx(2 * 10.0 + 2 * 20.0)
    clock.start("ig")
    t.t = 7.0
    clock.update(3, 12)  # 3 of 12 passes in 3 s: 9 s to go by its own rate
    assert clock.remaining("ig") == pytest.approx(9.0)
    assert clock.eta() == pytest.approx(9.0 + 2 * 20.0)
    t.t = 16.0
    clock.finish("ig")  # 12 s against 10: ratio (4 + 12) / (2 + 10)
    assert clock.ratio == pytest.approx(16 / 12)
    assert clock.eta() == pytest.approx(20.0 * 16 / 12)
    assert clock.remaining("atp") == 0.0 and clock.remaining("ig") == 0.0
