"""Latency statistics as every report here gives them."""

from __future__ import annotations

import numpy as np


def percentiles(values, keys: tuple[str, ...] = ("p50", "p90", "p99")) -> dict[str, float]:
    """{"p50": ..., "p99": ..., "max": ...} of a sample; {} when empty."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {}
    return {k: float(np.percentile(values, float(k[1:]))) for k in keys} | {"max": float(values.max())}
