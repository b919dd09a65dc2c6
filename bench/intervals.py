"""The simulator's residuals on the validation set, by figure and regime, for the intervals every prediction carries
(autotune/sim/uncertainty.py reads autotune/sim/residuals.json, which this writes).

The residuals are those of the shipped factors (the priors, never fitted to these rows; see README "Accuracy"). The
honesty check printed here is out of sample: for each source, its figures are scored against intervals built from
every other source only, and the share that falls inside is the intervals' real coverage; it is stored beside the
residuals and shown with every interval.

    python bench/intervals.py [--write]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time

import numpy as np
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from validation_set import load_rows, load_simreal  # noqa: E402

from accuracy import errors  # noqa: E402
from autotune.sim import uncertainty  # noqa: E402
from autotune.sim.calibration import Calibration  # noqa: E402
from autotune.spec.hardware import load_gpu  # noqa: E402
from autotune.spec.metrics import FIGURES, figure_of  # noqa: E402


def residual_rows() -> list[tuple[list, str]]:
    """([figure, arch, model, parallel, load, gpu, log(predicted/measured), source, case], source) for every feasible
    figure of
    every run the simulator models (vLLM V1, or a version not stated)."""
    runs = [r for r in load_rows() + load_simreal() if r.modelled]
    out = []
    for run, key, measured, predicted in errors(runs, Calibration()):
        if not predicted or measured <= 0:
            continue
        gpu = load_gpu(run.gpu)
        reg = uncertainty.regime(run._model, gpu, run.layout, run.workload.mode)
        # The model and load a configuration was measured under: pairs share it and differ in layout or knobs.
        w = run.workload
        case = hashlib.sha1(repr((run.model, key, w.mode, w.num_requests, w.concurrency, w.rate, w.prompt, w.output,
                                  w.stages)).encode()).hexdigest()[:10]
        out.append(([figure_of(key), reg.arch, reg.model, reg.parallel, reg.load, gpu.name,
                     round(math.log(predicted / measured), 4), run.source, case], run.source))
    return out


def pair_spread(rows: list[tuple[list, str]], level: float) -> dict[str, float]:
    """How far the model errs on the ratio of two configurations measured side by side (same source, GPU, model,
    load and figure; different layout or knobs): the `level` quantile of |residual_a - residual_b| per figure.
    Shared biases cancel in a ratio, so this is what decides whether two layouts are too close to call."""
    groups: dict[tuple, list[float]] = {}
    for r, s in rows:
        groups.setdefault((s, r[5], r[0], r[8]), []).append(r[6])
    out = {}
    for figure in FIGURES:
        d = [abs(a - b) for (_, _, f, _), rs in groups.items() if f == figure
             for i, a in enumerate(rs) for b in rs[i + 1:]]
        if d:
            out[figure] = float(np.quantile(d, level))
    return out


def coverage(rows: list[tuple[list, str]]) -> dict[str, tuple[int, int]]:
    """Leave one source out: (inside, total) per figure, each source's figures against the intervals that the
    other sources' residuals give (the same regime fallback as at run time)."""
    counts = {f: [0, 0] for f in FIGURES}
    for source in sorted({s for _, s in rows}):
        others = [r for r, s in rows if s != source]
        for r in (r for r, s in rows if s == source):
            band = uncertainty.band_of(others, r[0], tuple(r[1:5]), uncertainty.LEVEL)
            if band:
                counts[r[0]][0] += band[0] <= r[6] <= band[1]
                counts[r[0]][1] += 1
    return {f: (a, b) for f, (a, b) in counts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"write {uncertainty.RESIDUALS}")
    args = ap.parse_args()
    rows = residual_rows()
    print(f"{len(rows)} residuals from {len({s for _, s in rows})} sources")
    for figure in FIGURES:
        r = sorted(row[6] for row, _ in rows if row[0] == figure)
        if r:
            q_lo, q_hi = uncertainty.LEVEL
            lo, hi = r[int(q_lo * (len(r) - 1))], r[int(math.ceil(q_hi * (len(r) - 1)))]
            print(f"  {figure:10s} n={len(r):4d}  {q_hi - q_lo:.0%} of log(pred/meas) in [{lo:+.2f}, {hi:+.2f}]: the "
                  f"measured value lies within x{math.exp(-hi):.2f} .. x{math.exp(-lo):.2f} of the prediction")
    nominal = uncertainty.LEVEL[1] - uncertainty.LEVEL[0]
    print(f"\nout-of-sample coverage of the nominal {nominal:.0%} intervals (each source against the other sources' "
          "residuals):")
    covered = coverage(rows)
    for figure, (inside, total) in covered.items():
        if total:
            print(f"  {figure:10s} {inside / total:5.0%} of {total}")
    nominal_pair = uncertainty.LEVEL[1] - uncertainty.LEVEL[0]
    spread = pair_spread(rows, nominal_pair)
    print(f"\n{nominal_pair:.0%} of side-by-side pairs (two layouts or knob settings under the same load) get "
          "their ratio right within:")
    for figure, v in spread.items():
        print(f"  {figure:10s} x{math.exp(v):.2f}")
    if args.write:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        doc = {"provenance": {"written_by": "python bench/intervals.py --write", "date": time.strftime("%Y-%m-%d"),
                              "commit": commit, "calibration": "shipped defaults (priors)",
                              "fields": ["figure", "arch", "model", "parallel", "load", "gpu", "log_pred_over_meas",
                                         "source", "case"],
                              "nominal_level": nominal,
                              "coverage": {f: round(a / b, 3) for f, (a, b) in covered.items() if b},
                              "pair_log_spread": {f: round(v, 4) for f, v in spread.items()}},
               "rows": [row for row, _ in rows]}
        uncertainty.RESIDUALS.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
        print(f"\nwrote {uncertainty.RESIDUALS} ({len(rows)} residuals)")


if __name__ == "__main__":
    main()
