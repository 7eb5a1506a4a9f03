"""What every benchmark here shares: the summary of a sample (p50, p99, max)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def summary(values: Sequence[float], digits: int = 3) -> dict[str, float]:
    """p50, p99 and max (inclusive quantiles: p99 interpolates between the two top ranks)."""
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    data = sorted(values)
    p99 = statistics.quantiles(data, n=100, method="inclusive")[98] if len(data) > 1 else data[0]
    return {
        "p50": round(statistics.median(data), digits),
        "p99": round(p99, digits),
        "max": round(data[-1], digits),
    }
