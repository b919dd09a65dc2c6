"""`autotune calibrate D`: fit the simulator's efficiency factors to a study's measured trials, so that predict,
recommend and the warm start of later studies speak for this cluster."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace

from autotune.errors import UserError
from autotune.search.space import load_space
from autotune.sim.calibration import Calibration, Efficiency, descend
from autotune.sim.predict import predict
from autotune.spec.layout import EngineKnobs, Layout
from store.queries import completed
from store.reader import StudyReader

# The factors fitted and their bounds: fractions of peak up to 1, latencies free.
FITTED = {"hbm": (0.01, 1.0), "flops": (0.01, 1.0), "step_overhead_s": (0.0, math.inf),
          "allreduce_latency_s": (0.0, math.inf)}
STEPS = (0.25, 0.5, 0.8, 1.25, 2.0, 4.0)
METRICS = ("output_tok_s", "tpot_p50_s")


def _knobs(t: dict) -> EngineKnobs:
    # A column that an older study's segments lack reads NULL: that knob takes its default.
    defaults = EngineKnobs()
    return EngineKnobs(**{name: t[name] if t.get(name) is not None else getattr(defaults, name)
                          for name in EngineKnobs.tunable()})


def _error(space, trials: list[dict], cal: Calibration) -> tuple[float, list[tuple]]:
    scenario = replace(space.scenario, calibration=cal)
    rows, errs = [], []
    requests = scenario.workload.sample()
    for t in trials:
        p = predict(scenario, Layout(t["dp"], t["tp"], t["pp"], t["ep"]), _knobs(t), requests)
        if not p.feasible:
            errs.append(5.0)
            rows.append((t, None))
            continue
        for m in METRICS:
            if t[m] and p.get(m):
                errs.append(abs(math.log(p.get(m) / t[m])))
        rows.append((t, p))
    return statistics.median(errs) if errs else float("inf"), rows


HOLD_OUT_EVERY = 3   # every third measured trial is held out to score the fit out of sample


@dataclass
class CalibrationResult:
    fitted: Calibration          # fitted on every measured trial: the file that is written
    before: list[tuple]          # (trial, prediction) with the starting factors
    after: list[tuple]           # the same with the fitted factors
    error_before: float          # median |log(predicted / measured)| over every trial, starting factors
    in_sample: float             # over the trials the split fit saw
    held_out: float | None       # over the trials it did not see (None with fewer than HOLD_OUT_EVERY trials)
    all_fitted: float            # over every trial with the written factors (in sample)


def _fit(space, trials: list[dict], base: Calibration, gpu: str) -> Calibration:
    def with_eff(e: Efficiency) -> Calibration:
        return Calibration(base.base, tuple({**dict(base.per_gpu), gpu: e}.items()), base.source)
    return with_eff(descend(base.for_gpu(gpu), FITTED, lambda e: _error(space, trials, with_eff(e))[0], STEPS,
                            rounds=4))


def calibrate(study_dir: str, base: Calibration) -> CalibrationResult:
    reader = StudyReader(study_dir)
    header = reader.header()
    if header.get("backend") == "sim":
        raise UserError(f"{study_dir} is a simulated study: it has no measurements to calibrate on "
                        "(calibrate a study run with --backend vllm)")
    trials = [t for t in completed(reader)]
    if not trials:
        raise UserError(f"{study_dir} has no completed trial to calibrate on")
    space = load_space(header.get("space_file", "space.yaml"), header["space"])
    gpu = space.scenario.cluster.gpu.name
    before_err, before = _error(space, trials, base)
    held = trials[HOLD_OUT_EVERY - 1::HOLD_OUT_EVERY]
    seen = [t for i, t in enumerate(trials) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1]
    split = _fit(space, seen, base, gpu)
    in_sample, _ = _error(space, seen, split)
    held_out = _error(space, held, split)[0] if held else None
    fitted = _fit(space, trials, base, gpu)
    all_err, after = _error(space, trials, fitted)
    return CalibrationResult(fitted, before, after, before_err, in_sample, held_out, all_err)
