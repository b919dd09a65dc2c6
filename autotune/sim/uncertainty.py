"""How sure a prediction is. The simulator's residuals on the validation set (log predicted/measured, written by
`python bench/intervals.py` into residuals.json with its provenance) give each predicted figure an interval: the
median residual of its regime (GPU generation, dense/MoE/MLA, parallelism kind, batch/online load), the bias shared
by the validated runs like it, plus or minus the figure's margin, the distance from that median within which 90% of
the residuals of a source left out of the median fall (split conformal prediction with sources as the
exchangeable units: most of the error is a bias shared by one source's runs, so rows of the same source are not
independent draws). A case unlike every validated row (an unseen GPU, model class, or parallelism for that class)
is flagged as an extrapolation and also gets the median of all the figure's residuals with the 96% margin."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from autotune.spec.hardware import GpuSpec
from autotune.spec.layout import Layout
from autotune.spec.metrics import figure_of
from autotune.spec.models import ModelSpec

RESIDUALS = Path(__file__).parent / "residuals.json"
LEVEL = 0.90                # the nominal coverage of an interval
WIDE_LEVEL = 0.96           # the nominal coverage of an extrapolation's interval
# A regime with fewer residuals, or from fewer sources, falls back to the next coarser one: a median seen through
# one or two sources is those sources' bias.
MIN_ROWS, MIN_SOURCES = 12, 4
REGIME_FIELDS = ("arch", "model", "parallel", "load")   # finest first; dropped from the right when too few rows


def conformal_margin(scores: list[float], level: float) -> float:
    """The split-conformal quantile of |scores| for coverage `level`: the ceil((n + 1) level)-th smallest (the
    largest when n is too small for the level)."""
    a = np.sort(np.abs(scores))
    return float(a[min(len(a), int(np.ceil((len(a) + 1) * level))) - 1])


@dataclass(frozen=True)
class Regime:
    arch: str          # GPU generation
    model: str         # dense, moe or mla (MLA attention, MoE)
    parallel: str      # the replica's defining kind: pp, ep, tp, dp (MoE only) or single (checked in that order)
    load: str          # batch or online


def regime(model: ModelSpec, gpu: GpuSpec, layout: Layout, mode: str) -> Regime:
    kind = "mla" if model.is_mla else "moe" if model.is_moe else "dense"
    # What one replica runs: dense DP replicas are independent single-GPU (or TP/PP) engines, while a MoE model's
    # DP ranks share their experts (the DP x TP expert group), a collective of its own.
    parallel = ("pp" if layout.pp > 1 else "ep" if layout.ep > 1 else "tp" if layout.tp > 1
                else "dp" if layout.dp > 1 and model.is_moe else "single")
    return Regime(gpu.arch, kind, parallel, "batch" if mode == "batch" else "online")


@lru_cache(maxsize=1)
def _table() -> dict:
    """{"rows": [[figure, arch, model, parallel, load, gpu, residual, source, case], ...], "provenance": {...}}"""
    if not RESIDUALS.is_file():
        return {"rows": [], "provenance": {}}
    return json.loads(RESIDUALS.read_text())


def regime_median(rows: list, figure: str, fields: tuple) -> tuple[float, int, int] | None:
    """The median residual of `figure` in the finest regime (a prefix of `fields`) with MIN_ROWS of them from
    MIN_SOURCES sources: (median, count, depth); None when even all of the figure's residuals are too few."""
    for depth in range(len(fields), -1, -1):
        sel = [row for row in rows if row[0] == figure and tuple(row[1:1 + depth]) == fields[:depth]]
        if len(sel) >= MIN_ROWS and len({row[7] for row in sel}) >= MIN_SOURCES:
            return float(np.median([row[6] for row in sel])), len(sel), depth
    return None


@lru_cache(maxsize=4096)
def _band(figure: str, fields: tuple, wide: bool) -> tuple[float, float, int, int] | None:
    """(low, high, count, depth) of the residual band: the regime's median and the figure's margin."""
    med = regime_median(_table()["rows"], figure, fields)
    margins = provenance().get("margins", {}).get(figure)
    if med is None or not margins:
        return None
    mid, n, depth = med
    margin = margins[1 if wide else 0]
    return mid - margin, mid + margin, n, depth


@lru_cache(maxsize=1024)
def extrapolation(model: ModelSpec, gpu: GpuSpec, layout: Layout) -> tuple[str, ...]:
    """Why the case is unlike every validated row: an unseen GPU, model class, or parallelism for that class."""
    rows = _table()["rows"]
    if not rows:
        return ("no validation residuals are installed (bench/intervals.py)",)
    reg = regime(model, gpu, layout, "batch")
    why = []
    if gpu.name not in {row[5] for row in rows}:
        why.append(f"no validated runs on {gpu.name}")
    if reg.model not in {row[2] for row in rows}:
        why.append(f"no validated {reg.model} model")
    elif reg.parallel not in {row[3] for row in rows if row[2] == reg.model}:
        why.append(f"no validated {reg.parallel.upper()} runs of a {reg.model} model")
    return tuple(why)


def intervals(model: ModelSpec, gpu: GpuSpec, layout: Layout, mode: str, metrics: dict) -> dict:
    """{"intervals": {key: [low, high]}, "near_validated": bool, "extrapolation": [why], "interval_basis": {...}}
    for every predicted figure in `metrics`. Cost per token moves inversely with throughput."""
    why = extrapolation(model, gpu, layout)
    reg = regime(model, gpu, layout, mode)
    fields = tuple(getattr(reg, f) for f in REGIME_FIELDS)
    out: dict[str, list[float]] = {}
    basis: dict[str, str] = {}
    for key, value in metrics.items():
        figure = figure_of(key)
        if figure is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            continue
        band = _band(figure, fields, False)
        if why:     # an extrapolation: at least the regime's band, and every residual's wide band
            wide = _band(figure, (), True)
            band = band and wide and (min(band[0], wide[0]), max(band[1], wide[1]), wide[2], 0)
        if band is None:
            continue
        lo, hi, n, depth = band
        used = "all runs, widened (extrapolation)" if why else "/".join(fields[:depth]) or "all runs"
        # residual = log(predicted / measured), so measured = predicted x exp(-residual).
        out[key] = [value * float(np.exp(-hi)), value * float(np.exp(-lo))]
        basis[figure] = f"{used} ({n} residuals)"
    if "output_tok_s" in out and metrics.get("usd_per_mtok"):
        tok = metrics["output_tok_s"]
        out["usd_per_mtok"] = [metrics["usd_per_mtok"] * tok / out["output_tok_s"][1],
                               metrics["usd_per_mtok"] * tok / out["output_tok_s"][0]]
    return {"intervals": out, "near_validated": not why, "extrapolation": list(why), "interval_basis": basis,
            "interval_coverage": provenance().get("coverage", {})}


def provenance() -> dict:
    return _table().get("provenance", {})


def pair_spread(figure: str) -> float | None:
    """|log error| of a predicted ratio between two configurations on the same hardware, at the nominal level of
    the intervals (bench/intervals.py): predictions closer than this are too close to call."""
    return provenance().get("pair_log_spread", {}).get(figure)
