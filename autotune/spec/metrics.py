"""The latency metrics, defined once: their names, and how a set of per-request (or per-token) values becomes them.
The simulator and the real load generator both summarise through `latency_stats`, so their keys always agree."""

from __future__ import annotations

import numpy as np

LATENCIES = ("ttft", "tpot", "itl", "e2e")
STATS = ("mean", "p50", "p90", "p99")
LATENCY_KEYS = tuple(f"{name}_{stat}_s" for name in LATENCIES for stat in STATS)
# The ones a user may rank or plot by.
LATENCY_METRICS = ("tpot_p99_s", "ttft_p99_s", "e2e_p99_s", "tpot_p50_s", "ttft_p50_s", "e2e_p50_s", "itl_p99_s",
                   "ttft_mean_s", "tpot_mean_s", "itl_mean_s", "e2e_mean_s")


def latency_stats(name: str, values: np.ndarray, weights: np.ndarray | None = None) -> dict[str, float | None]:
    """Mean and percentiles of one latency; `weights` counts how many observations each value stands for (the
    simulator's ITL is a step time shared by every token of that step)."""
    values = np.asarray(values, dtype=float)
    keys = [f"{name}_{stat}_s" for stat in STATS]
    if not len(values):
        return dict.fromkeys(keys)
    if weights is None:
        qs = np.percentile(values, (50, 90, 99))
        return dict(zip(keys, [float(values.mean()), *map(float, qs)]))
    w = np.asarray(weights, dtype=float)
    order = np.argsort(values)
    vals, cum = values[order], np.cumsum(w[order])
    pct = [float(vals[min(int(np.searchsorted(cum, q / 100 * cum[-1])), len(vals) - 1)]) for q in (50, 90, 99)]
    return dict(zip(keys, [float(np.dot(values, w) / w.sum()), *pct]))
