"""The latency metrics, defined once: their names, and how a set of per-request (or per-token) values becomes them.
The simulator and the real load generator both summarise through `latency_stats`, so their keys always agree."""

from __future__ import annotations

import numpy as np

LATENCIES = ("ttft", "tpot", "itl", "e2e")
STATS = ("mean", "p50", "p90", "p99")
LATENCY_KEYS = tuple(f"{name}_{stat}_s" for name in LATENCIES for stat in STATS)
# The ones a user may rank or plot by.
# The figure each result key belongs to, for accuracy and intervals: throughput, TTFT, TPOT/ITL (one family: both
# time a token of the decode) and E2E.
FIGURES = ("throughput", "TTFT", "TPOT/ITL", "E2E")
_FIGURE_OF = {"output": "throughput", "total": "throughput", "req": "throughput", "ttft": "TTFT", "tpot": "TPOT/ITL",
              "itl": "TPOT/ITL", "e2e": "E2E"}


def figure_of(key: str) -> str | None:
    """output_tok_s -> throughput, ttft_p99_s -> TTFT, ...; None for keys that are not a validated figure."""
    return _FIGURE_OF.get(key.split("_")[0])


# What serving costs, per output token: money at the cluster's price per GPU-hour, and energy.
COST_KEYS = ("usd_per_mtok", "joules_per_token")
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


def cost_stats(gpus: int, seconds: float, output_tokens: float, usd_per_gpu_hour: float | None,
               joules: float | None) -> dict[str, float | None]:
    """USD per million output tokens (every GPU of the layout billed for the whole run) and joules per output
    token; None where the price or the energy is unknown."""
    if output_tokens <= 0:
        return dict.fromkeys(COST_KEYS)
    usd = gpus * seconds / 3600 * usd_per_gpu_hour / output_tokens * 1e6 if usd_per_gpu_hour else None
    return {"usd_per_mtok": usd, "joules_per_token": joules / output_tokens if joules is not None else None}
