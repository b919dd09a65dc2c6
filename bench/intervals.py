"""The simulator's residuals on the validation set, by figure and regime, for the intervals every prediction carries
(autotune/sim/uncertainty.py reads autotune/sim/residuals.json, which this writes).

The residuals are those of the shipped factors (the priors, with one factor, the frontend latency, fitted on the
training split's rows; see README "Accuracy").
Each figure's margin is a split-conformal quantile over sources: every source's residuals against the median the
other sources give its regime. The honesty check printed here is nested, so that no source is scored against a
margin it helped choose: each source's figures against the other sources' medians and a margin chosen from the
other sources alone; the share that falls inside is the intervals' real coverage, stored beside the residuals and
shown with every interval.

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


class HeldOut:
    """The residuals with the regime medians that sets of sources leave, memoised: the nested leave-one-source-out
    below asks for the same regime's median without the same sources many times."""

    def __init__(self, rows: list[tuple[list, str]]):
        self.rows = rows
        self.sources = sorted({s for _, s in rows})
        self._medians: dict[tuple, float | None] = {}

    def median(self, without: frozenset, row: list) -> float | None:
        key = (without, row[0], tuple(row[1:5]))
        if key not in self._medians:
            med = uncertainty.regime_median([r for r, s in self.rows if s not in without], row[0], key[2])
            self._medians[key] = med and med[0]
        return self._medians[key]

    def scores(self, sources: list[str], without: frozenset = frozenset()) -> dict[str, list[float]]:
        """Per figure, each residual of `sources` minus the median of its regime from the other sources of
        `sources` (those in `without` left out as well)."""
        out: dict[str, list[float]] = {f: [] for f in FIGURES}
        for source in sources:
            for r in (r for r, s in self.rows if s == source):
                med = self.median(without | {source}, r)
                if med is not None:
                    out[r[0]].append(r[6] - med)
        return out

    def margins(self, sources: list[str], without: frozenset = frozenset()) -> dict[str, list[float]]:
        """[90% margin, 96% margin] per figure, from the leave-one-source-out scores of `sources`."""
        return {f: [uncertainty.conformal_margin(v, uncertainty.LEVEL),
                    uncertainty.conformal_margin(v, uncertainty.WIDE_LEVEL)]
                for f, v in self.scores(sources, without).items() if v}

    def coverage(self) -> dict[str, tuple[int, int]]:
        """(inside, total) per figure: each source's figures against the others' regime medians and the 90% margin
        chosen on the others alone."""
        counts = {f: [0, 0] for f in FIGURES}
        for source in self.sources:
            margins = self.margins([s for s in self.sources if s != source], frozenset({source}))
            for figure, scores in self.scores([source]).items():
                if figure in margins:
                    counts[figure][0] += sum(abs(v) <= margins[figure][0] for v in scores)
                    counts[figure][1] += len(scores)
        return {f: (a, b) for f, (a, b) in counts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"write {uncertainty.RESIDUALS}")
    args = ap.parse_args()
    rows = residual_rows()
    print(f"{len(rows)} residuals from {len({s for _, s in rows})} sources")
    held = HeldOut(rows)
    margins = held.margins(held.sources)
    for figure in FIGURES:
        r = [row[6] for row, _ in rows if row[0] == figure]
        if figure in margins:
            m = margins[figure][0]
            print(f"  {figure:10s} n={len(r):4d}  median log(pred/meas) {np.median(r):+.2f}; {uncertainty.LEVEL:.0%} "
                  f"margin about a regime's median +-{m:.2f}: the measured value within x{math.exp(-m):.2f} .. "
                  f"x{math.exp(m):.2f} of the prediction with its regime's bias removed")
    print(f"\nout-of-sample coverage of the nominal {uncertainty.LEVEL:.0%} intervals (each source against the other "
          "sources' medians and a margin chosen on the other sources alone):")
    covered = held.coverage()
    for figure, (inside, total) in covered.items():
        if total:
            print(f"  {figure:10s} {inside / total:5.0%} of {total}")
    spread = pair_spread(rows, uncertainty.LEVEL)
    print(f"\n{uncertainty.LEVEL:.0%} of side-by-side pairs (two layouts or knob settings under the same load) get "
          "their ratio right within:")
    for figure, v in spread.items():
        print(f"  {figure:10s} x{math.exp(v):.2f}")
    if args.write:
        # The residuals are the working tree's: say so when it differs from HEAD (besides the file written here).
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                  f":!{uncertainty.RESIDUALS}"], capture_output=True, text=True).stdout.strip()
        commit += " with uncommitted changes" if changed else ""
        doc = {"provenance": {"written_by": "python bench/intervals.py --write", "date": time.strftime("%Y-%m-%d"),
                              "commit": commit, "calibration": "shipped defaults",
                              "fields": ["figure", "arch", "model", "parallel", "load", "gpu", "log_pred_over_meas",
                                         "source", "case"],
                              "nominal_level": uncertainty.LEVEL,
                              "margins": {f: [round(v, 4) for v in m] for f, m in margins.items()},
                              "coverage": {f: round(a / b, 3) for f, (a, b) in covered.items() if b},
                              "pair_log_spread": {f: round(v, 4) for f, v in spread.items()}},
               "rows": [row for row, _ in rows]}
        uncertainty.RESIDUALS.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
        print(f"\nwrote {uncertainty.RESIDUALS} ({len(rows)} residuals)")


if __name__ == "__main__":
    main()
