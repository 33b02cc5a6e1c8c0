"""Summary statistics for the benchmarks."""

from __future__ import annotations


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile (0..1) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
