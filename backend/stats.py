"""Small statistics shared by the evaluations: percentile-bootstrap intervals over independent units.

Written by hand (a few lines of numpy): the units are held-out contexts or prompt pairs, the statistic is a mean or a
correlation, and the interval is the 2.5th–97.5th percentile of the statistic over resamples of the units with
replacement (Efron's percentile bootstrap), with a fixed seed so that a stored interval can be reproduced.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

BOOTSTRAP_RESAMPLES = 2000


def bootstrap_interval(values: Sequence[float] | np.ndarray, statistic: Callable[[np.ndarray], float] = np.mean,
                       level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """The ``level`` percentile-bootstrap interval of ``statistic`` over ``values`` (one per unit; rows of a 2-D
    array are units). NaN bounds when there are fewer than two units: one unit says nothing about its spread."""
    data = np.asarray(values, dtype=float)
    if len(data) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(data), size=(resamples, len(data)))
    stats = np.array([statistic(data[i]) for i in idx], dtype=float)
    stats = stats[np.isfinite(stats)]
    if not len(stats):
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return float(lo), float(hi)
