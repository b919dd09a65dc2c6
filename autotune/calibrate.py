"""`autotune calibrate D`: fit the simulator's efficiency factors to a study's measured trials, so that predict,
recommend and the warm start of later studies speak for this cluster."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

from autotune.errors import UserError
from autotune.search.space import load_space
from autotune.sim.calibration import Calibration, Efficiency
from autotune.sim.predict import predict
from autotune.spec.layout import EngineKnobs, Layout
from store.queries import completed
from store.reader import StudyReader

FITTED = ("hbm", "flops", "step_overhead_s", "allreduce_latency_s")
STEPS = (0.25, 0.5, 0.8, 1.25, 2.0, 4.0)
METRICS = ("output_tok_s", "tpot_p50_s")
BOUNDED = {"hbm": 1.0, "flops": 1.0}


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


def calibrate(study_dir: str, base: Calibration) -> tuple[Calibration, list[tuple], list[tuple], float, float]:
    reader = StudyReader(study_dir)
    header = reader.header()
    trials = [t for t in completed(reader)]
    if not trials:
        raise UserError(f"{study_dir} has no completed trial to calibrate on")
    space = load_space(header.get("space_file", "space.yaml"), header["space"])
    gpu = space.scenario.cluster.gpu.name
    eff = base.for_gpu(gpu)
    before_err, before = _error(space, trials, base)

    def with_eff(e: Efficiency) -> Calibration:
        return Calibration(base.base, tuple({**dict(base.per_gpu), gpu: e}.items()), base.source)
    best_err = before_err
    for _ in range(4):           # coordinate descent over multiplicative steps
        improved = False
        for name in FITTED:
            for step in STEPS:
                value = getattr(eff, name) * step
                if name in BOUNDED and value > BOUNDED[name]:
                    continue
                trial_eff = eff.with_overrides({name: value}, "calibrate")
                err, _ = _error(space, trials, with_eff(trial_eff))
                if err < best_err - 1e-9:
                    best_err, eff, improved = err, trial_eff, True
        if not improved:
            break
    fitted = with_eff(eff)
    _, after = _error(space, trials, fitted)
    return fitted, before, after, before_err, best_err
