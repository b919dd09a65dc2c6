"""Out-of-sample accuracy of the simulator against real vLLM measurements.

Every run of the validation set (bench/validation/rows_*.csv, public sources with links, and the shared sim-to-real
training runs) replays through the same code path as `autotune predict`. Errors are always out of sample:

* cross-validated by source: each source falls into a fold by its name (folds_of; one fold per source with --folds
  0); for each fold the efficiency factors are fitted on every other fold and the fold's runs are predicted with
  them;
* the test split is scored with the shipped defaults (autotune/sim/calibration.py: the first-principles priors,
  with the frontend latency fitted on the training split, bench/validation/train_sources.txt and the shared runs;
  --fit-defaults fits on that split, every factor or those --only names, and scores that fit instead).

It prints, per figure family (throughput, TTFT, TPOT/ITL, E2E), the median and mean |predicted/measured - 1|, and the
share of pairs (two runs of the same source, model and GPU that differ in layout, knobs or load) whose predicted
order matches the measured order.

    python bench/accuracy.py [--folds K] [--fit-defaults OUT.yaml [--only FACTOR ...]] [--calibration FILE]
                             [--rows] [--sources] [--stages] [--factors]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from validation_set import ROWS_DIR, Run, load_rows, load_simreal, predicted_value  # noqa: E402

from autotune.sim.calibration import PRIOR_EFFICIENCY, Calibration, Efficiency, descend  # noqa: E402
from autotune.spec.metrics import FIGURES, figure_of  # noqa: E402

# The factors fitted, each by multiplicative steps within bounds: the hardware efficiencies and the CPU-side costs.
# The upper bounds are what a kernel can reach (about 95% of peak HBM bandwidth, 80% of peak tensor FLOP/s on
# large GEMMs): a fit that wants more is compensating for a cost the model gets wrong.
FITTED = {"hbm": (0.3, 0.95), "kv_read": (0.2, 1.0), "flops": (0.2, 0.8), "gemm_ramp_tokens": (16.0, 1024.0),
          "kernel_floor_s": (5e-7, 1e-5), "step_overhead_s": (1e-4, 1e-2), "seq_overhead_s": (0.0, 1e-4),
          "frontend_latency_s": (1e-3, 5e-2), "custom_allreduce_latency_s": (3e-6, 3e-5), "link": (0.3, 1.0),
          "tp_bw_loss": (0.0, 0.3), "allreduce_latency_s": (5e-6, 1e-4), "alltoall_latency_s": (1e-5, 2e-4),
          "expert_imbalance": (1.0, 2.0)}
STEPS = (0.5, 0.8, 1.25, 2.0)
ROUNDS = 3
TRAIN_LIST = ROWS_DIR / "train_sources.txt"


def errors(runs: list[Run], cal: Calibration) -> list[tuple[Run, str, float, float | None]]:
    """(run, key, measured, predicted) for every figure; predicted is None when the layout does not fit."""
    out = []
    for run in runs:
        pred = run.predict(cal)
        for key, measured in run.figures:
            out.append((run, key, measured, predicted_value(pred, key) if pred.feasible else None))
    return out


# A figure off by more than this factor counts as this far off: one wild row (an overloaded open loop, a source's
# odd setting) must not steer every factor. Chosen among x1.5, x2 and x3 by the cross-validated figures (a mild
# selection on the same rows, said in the README): x2 gave the lowest TTFT and E2E errors and the best shared-run
# figures at a point more of throughput error; x1.5 lost 10 points of throughput.
CLIP = math.log(2)


def loss(rows) -> float:
    """Mean over figure families, and within a family over sources, of the mean clipped |log(predicted/measured)|;
    an infeasible run costs CLIP. Each source has one vote in its family: the sources range from one row to 55, and
    a source's rows share its setup (client, server flags, machine), so its errors are not independent; weighting
    rows alone let the largest source bend every factor towards its own setup."""
    by_family: dict[str, dict[str, list[float]]] = {}
    for run, key, measured, predicted in rows:
        e = min(abs(math.log(predicted / measured)), CLIP) if predicted else CLIP
        by_family.setdefault(figure_of(key), {}).setdefault(run.source, []).append(e)
    return statistics.mean(statistics.mean(statistics.mean(v) for v in by_source.values())
                           for by_source in by_family.values()) if by_family else 0.0


# Factors refitted per GPU type on top of the global ones, for the types whose software stack differs (ROCm); the
# NVIDIA parts share one set (refitting each on a few noisy sources overfits: H200 came out at 0.3 of peak HBM).
# Refitting the engine's CPU costs per type as well helped the 6-fold figures (E2E 31.8% -> 28.0%) but, with one
# fold per source, fitted MI300X's on two sources' large-batch throughput alone and doubled the E2E error: not kept.
# The GEMM ramp is refitted too: how many rows a GEMM needs to fill the matrix units is the GEMM library's tiling
# (CUTLASS/cuBLAS on NVIDIA, hipBLASLt on ROCm), a property of the stack like its share of peak.
PER_GPU = ("hbm", "kv_read", "flops", "gemm_ramp_tokens")
PER_GPU_TYPES = ("MI300X",)
MIN_GPU_RUNS = 3
PRIOR = Calibration(PRIOR_EFFICIENCY, (), "first-principles priors")


def _descend(eff: Efficiency, names, make, runs: list[Run]) -> Efficiency:
    """The factors `names` fitted to minimise `loss` on `runs`."""
    return descend(eff, {n: FITTED[n] for n in names}, lambda e: loss(errors(runs, make(e))), STEPS, ROUNDS)


def fit(runs: list[Run], start: Calibration = PRIOR, names=tuple(FITTED)) -> Calibration:
    """The global factors `names` on the runs of the GPUs that share them, then for each type in PER_GPU_TYPES with
    enough runs its bandwidth and compute efficiencies among them on its own runs (ROCm on MI300X reaches a different
    share of peak than CUDA on NVIDIA parts, and must not bend the global factors)."""
    shared = [r for r in runs if r.gpu not in PER_GPU_TYPES]
    base = _descend(start.base, names, lambda e: Calibration(e, (), "fit"), shared)
    per_gpu = []
    for gpu in PER_GPU_TYPES:
        mine = [r for r in runs if r.gpu == gpu]
        own = [n for n in PER_GPU if n in names]
        if len(mine) >= MIN_GPU_RUNS and own:
            eff = _descend(base, own, lambda e, g=gpu: Calibration(base, ((g, e),), "fit"), mine)
            if eff != base:
                per_gpu.append((gpu, eff))
    return Calibration(base, tuple(per_gpu), "fitted by bench/accuracy.py")


def _fold_job(args):
    train, test = args
    cal = fit(train)
    return cal, errors(test, cal)


def folds_of(runs: list[Run], k: int) -> list[list[str]]:
    """The sources in k folds (k <= 0 or at least the sources: one fold each). A source's fold follows from its name
    alone (CRC-32 mod k): a source added to the set joins a fold and leaves the others where they were, so the
    figures of one round compare with the next (dealing the sorted names round-robin reshuffled every fold)."""
    sources = sorted({r.source for r in runs})
    if k <= 0 or k >= len(sources):
        return [[s] for s in sources]
    folds: list[list[str]] = [[] for _ in range(k)]
    for source in sources:
        folds[zlib.crc32(source.encode()) % k].append(source)
    return [fold for fold in folds if fold]


def cross_validate(runs: list[Run], k: int) -> tuple[list, list[tuple[list[str], Calibration]]]:
    """Each fold predicted with factors fitted from the priors on the other folds (never from the shipped factors,
    which saw every training source). Returns the rows and, per fold, its sources and the factors fitted without it."""
    folds = folds_of(runs, k)
    jobs = [([r for r in runs if r.source not in fold], [r for r in runs if r.source in fold]) for fold in folds]
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        fitted = list(pool.map(_fold_job, jobs))
    return [row for _, rows in fitted for row in rows], [(fold, cal) for fold, (cal, _) in zip(folds, fitted)]


def print_factors(fits: list[tuple[list[str], Calibration]]) -> None:
    """Per fold, the factors fitted without it where they left the priors: what the fits trade against each
    other (a factor at a bound is making up for a cost the model gets wrong)."""
    def moved(eff: Efficiency, start: Efficiency) -> str:
        return ", ".join(f"{k} {v:.4g}{' (bound)' if v in FITTED[k] else ''}" for k, v in eff.to_dict().items()
                         if k in FITTED and v != getattr(start, k))

    for fold, cal in fits:
        print(f"  without {', '.join(fold)}:\n    {moved(cal.base, PRIOR_EFFICIENCY) or 'the priors'}")
        for gpu, eff in cal.per_gpu:
            print(f"    {gpu}: {moved(eff, cal.base)}")


def summary(rows, title: str) -> None:
    print(f"\n{title}")
    print(f"  {'figure':11s} {'n':>4s} {'median |err|':>13s} {'mean |err|':>11s} {'within 15%':>11s}")
    for fam in FIGURES:
        errs = [abs(p / m - 1) if p else 9.0 for _, key, m, p in rows if figure_of(key) == fam]
        if errs:
            print(f"  {fam:11s} {len(errs):4d} {statistics.median(errs):13.1%} {statistics.mean(errs):11.1%} "
                  f"{sum(e <= 0.15 for e in errs) / len(errs):11.0%}")
    agree, total = pair_order(rows)
    if total:
        print(f"  order of {total} pairs (same source, model, GPU and figure; another layout, knob or load): "
              f"{agree / total:.0%} as measured")


def pair_order(rows) -> tuple[int, int]:
    groups: dict[tuple, list] = {}
    for run, key, m, p in rows:
        groups.setdefault((run.source, run.model, run.gpu, key), []).append((m, p))
    agree = total = 0
    for items in groups.values():
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                (m1, p1), (m2, p2) = items[i], items[j]
                if m1 == m2 or not p1 or not p2:
                    continue
                total += 1
                agree += (m1 < m2) == (p1 < p2)
    return agree, total


def print_rows(rows) -> None:
    print(f"  {'run':78s} {'figure':13s} {'measured':>10s} {'predicted':>10s} {'error':>7s}")
    for run, key, m, p in rows:
        err = f"{p / m - 1:+7.1%}" if p else "  infeasible"
        print(f"  {run.label[:78]:78s} {key:13s} {m:10.4g} {(p or 0):10.4g} {err}")


def print_sources(rows) -> None:
    """Where the error sits: per source and figure, the median signed error (a bias shared by a source's runs) and
    the median |error|."""
    groups: dict[tuple[str, str], list[float]] = {}
    for run, key, m, p in rows:
        groups.setdefault((run.source, figure_of(key)), []).append(p / m - 1 if p else math.inf)
    print(f"  {'source':44s} {'figure':11s} {'n':>4s} {'median':>8s} {'median |err|':>13s}")
    for (source, fam), errs in sorted(groups.items()):
        print(f"  {source[:44]:44s} {fam:11s} {len(errs):4d} {statistics.median(errs):+8.1%} "
              f"{statistics.median(map(abs, errs)):13.1%}")


def print_stages(runs: list[Run], cal: Calibration) -> None:
    """For the runs measured over two or more load stages (the shared runs' two constant rates), each stage's means
    measured against the stage replayed alone at its rate, and how much they grow from one stage to the next: the
    growth of ITL with the rate is the cost of the prompts that the higher rate mixes into decode steps."""
    print(f"\n  {'run':52s} {'stage':>5s} {'req/s':>6s} {'figure':12s} {'measured':>9s} {'predicted':>9s} "
          f"{'error':>7s} {'growth measured':>15s} {'predicted':>9s}")
    for run in (r for r in runs if len(r.workload.stages) > 1):
        last: dict[str, tuple[float, float]] = {}
        for i, stage in enumerate(run.workload.stages):
            alone = run.stage_alone(i)
            for _, key, m, p in errors([alone], cal):
                growth = (f"{m / last[key][0] - 1:+15.1%} {p / last[key][1] - 1:+9.1%}"
                          if key in last and p and last[key][1] else "")
                err = f"{p / m - 1:+7.1%}" if p else "  infeasible"
                print(f"  {run.label[:52]:52s} {i:5d} {stage.rate:6.2f} {key:12s} {m:9.4g} {(p or 0):9.4g} {err} "
                      f"{growth}")
                last[key] = (m, p or 0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folds", type=int, default=6, help="source folds for cross-validation (0: one per source)")
    ap.add_argument("--calibration", default=None, help="score the test split with this file instead of the defaults")
    ap.add_argument("--fit-defaults", metavar="OUT", help="fit on the training split and write the factors to OUT")
    ap.add_argument("--only", metavar="FACTOR", nargs="+", choices=sorted(FITTED),
                    help="with --fit-defaults: fit these factors alone, the others kept at their priors")
    ap.add_argument("--rows", action="store_true", help="print every figure, measured against predicted")
    ap.add_argument("--stages", action="store_true", help="print, for the runs measured over several load stages, "
                                                          "each stage's means and their growth with the rate")
    ap.add_argument("--sources", action="store_true", help="print the signed and absolute median error per source "
                                                           "and figure")
    ap.add_argument("--factors", action="store_true", help="print the factors each cross-validation fold fitted "
                                                           "where they left the priors")
    args = ap.parse_args()
    if args.only and not args.fit_defaults:
        ap.error("--only names the factors --fit-defaults fits")
    train_sources = frozenset(TRAIN_LIST.read_text().split()) if TRAIN_LIST.is_file() else frozenset()
    every = load_rows(train_sources=train_sources) + load_simreal()
    # Runs of vLLM's V0 engine (before 0.8) and cold runs are outside what the simulator models: reported apart,
    # never fitted.
    older = [r for r in every if r.engine == "V0"]
    cold = [r for r in every if r.cold and r.engine != "V0"]
    runs = [r for r in every if r.modelled]
    base = Calibration.load(args.calibration)
    sources = sorted({r.source for r in runs})
    train = [r for r in runs if r.split == "train"]
    test = [r for r in runs if r.split != "train"]
    print(f"validation set: {sum(len(r.figures) for r in runs)} figures of {len(runs)} runs of vLLM V1 (or of an "
          f"unstated version) from {len(sources)} sources ({sum(len(r.figures) for r in train)} figures in the "
          f"training split, {sum(len(r.figures) for r in test)} in the test split); {len(older)} runs of the older "
          f"V0 engine from {len({r.source for r in older})} sources and {len(cold)} cold runs (first on a fresh "
          f"server) reported apart")
    if args.fit_defaults:
        names = tuple(args.only or FITTED)
        fitted = fit(train, PRIOR, names)
        fitted.save(args.fit_defaults, {"fitted_on": "training split of bench/validation"})
        print(f"wrote {args.fit_defaults}: " + ", ".join(f"{k} {getattr(fitted.base, k):.4g}" for k in names))
        base = fitted
    shipped = errors(test, base)
    summary(shipped, f"test split, shipped factors ({base.source}; never fitted on the test split)")
    if args.rows:
        print_rows(shipped)
    if args.sources:
        print_sources(shipped)
    if args.stages:
        print("\nload stages, each replayed alone with the shipped factors (the runs measured in stages are in the "
              "training split: a diagnostic, not an out-of-sample figure)")
        print_stages(runs, base)
    cv, fits = cross_validate(runs, args.folds)
    summary(cv, f"all runs, cross-validated over {len(fits)} folds of sources (each fold predicted with factors "
                f"fitted on the others)")
    if args.factors:
        print_factors(fits)
    if args.rows:
        print_rows(cv)
    if args.sources:
        print_sources(cv)
    summary([row for row in cv if row[0].source.startswith("simreal")],
            "  of which the shared sim-to-real runs (inference-perf, constant rate, H100)")
    summary([row for row in cv if row[0].engine == "V1"], "  of which the runs of a stated vLLM V1 version")
    summary(errors(older, base), "older V0 engine (vLLM < 0.8; not modelled, never fitted), shipped factors")
    summary(errors(cold, base), "cold runs (the first benchmark on a freshly started server; never fitted), "
                                "shipped factors")
    summary(errors(train, base), "for reference, the training split with the shipped factors (IN SAMPLE when they "
                                 "were fitted on it: not an accuracy figure)")


if __name__ == "__main__":
    main()
