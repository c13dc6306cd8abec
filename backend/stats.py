"""Small statistics shared by the backend: the percentile bootstrap over items (prompt pairs, held-out contexts).

One place for it, so every confidence interval the project reports is computed the same way.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000


def percentile_bootstrap(statistic: Callable[[np.ndarray], float], n_items: int, resamples: int = DEFAULT_RESAMPLES,
                         level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """``(point, low, high)``: ``statistic(indices)`` on all ``n_items`` items and the percentile interval of the
    statistic over ``resamples`` resamples of the items with replacement (Efron's percentile bootstrap).

    ``statistic`` receives an integer index array (with repeats in the resamples) and returns a float; resamples
    where it is NaN (e.g. a correlation of a constant) are left out of the interval. A fixed ``seed`` makes the
    interval reproducible.
    """
    if n_items < 1:
        raise ValueError("the bootstrap needs at least one item")
    point = float(statistic(np.arange(n_items)))
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n_items, n_items)) for _ in range(int(resamples))], dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return point, float("nan"), float("nan")
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return point, float(low), float(high)


def bootstrap_interval(values: Sequence[float] | np.ndarray, statistic: Callable[[np.ndarray], float] = np.mean,
                       level: float = 0.95, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """The ``level`` percentile-bootstrap interval of ``statistic`` over ``values`` (one per unit; rows of a 2-D
    array are units). NaN bounds when there are fewer than two units: one unit says nothing about its spread."""
    data = np.asarray(values, dtype=float)
    if len(data) < 2:
        return float("nan"), float("nan")
    _, low, high = percentile_bootstrap(lambda idx: statistic(data[idx]), len(data), resamples, level, seed)
    return low, high


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r of two equal-length vectors (NaN when either is constant)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2:
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    denom = float(np.sqrt((xc * xc).sum() * (yc * yc).sum()))
    return float((xc * yc).sum() / denom) if denom > 0 else float("nan")


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as Spearman's ρ needs)."""
    x = np.asarray(x, float)
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x), float)
    r[order] = np.arange(1, len(x) + 1)
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    if len(values) < len(x):  # average the ranks of ties
        sums = np.zeros(len(values))
        np.add.at(sums, inverse, r)
        r = (sums / counts)[inverse]
    return r


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's ρ: Pearson r of the (tie-averaged) ranks."""
    return pearson(ranks(x), ranks(y))


def top_k_overlap(estimate: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Share of the ``k`` components with the largest |truth| that are also among the ``k`` largest |estimate|."""
    k = min(int(k), len(truth))
    if k < 1:
        return float("nan")
    top_e = set(np.argsort(-np.abs(np.asarray(estimate, float)), kind="mergesort")[:k].tolist())
    top_t = set(np.argsort(-np.abs(np.asarray(truth, float)), kind="mergesort")[:k].tolist())
    return len(top_e & top_t) / k


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, min and max of a list of numbers (for logs and benchmark JSON)."""
    arr = np.asarray(list(values), float)
    return {"mean": float(arr.mean()), "min": float(arr.min()), "max": float(arr.max())}
