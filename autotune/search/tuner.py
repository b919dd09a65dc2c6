"""Optuna over a search space: multi-objective, SLOs as constraints, layouts sampled from the valid ones before
the knobs, a warm start from the simulator, no duplicate trials, failures recorded as FAIL (never scored)."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from autotune.search.space import SearchSpace
from autotune.sim.predict import Prediction, predict
from autotune.spec.layout import EngineKnobs, Layout
from autotune.spec.objectives import ranking_key
from autotune.spec.trial import TrialResult, TrialSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)
# `group=True` (conditional spaces) is marked experimental; it is the documented way to sample them.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
MAX_DUPLICATES_IN_A_ROW = 200   # the sampler keeps proposing evaluated points: the space is exhausted
WARM_START_REQUESTS = 500       # a quicker, smaller replay of the workload for ranking the warm start


def layout_key(layout: Layout) -> str:
    return f"dp={layout.dp},tp={layout.tp},pp={layout.pp},ep={layout.ep}"


def params_of(layout: Layout, knobs: EngineKnobs, space: SearchSpace) -> dict:
    return {"layout": layout_key(layout), **{k: getattr(knobs, k) for k in space.knob_grid}}


def point_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def repair_journal(journal: Path) -> str | None:
    """A runner killed mid-write leaves a torn last record, which Optuna cannot load: drop it (the store, which is
    the record, still has the trial) and say what was done; None when the journal is whole or absent."""
    if not journal.exists():
        return None
    data = journal.read_bytes()
    keep = len(data)
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
    else:
        last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        try:
            if last:
                json.loads(last)
        except ValueError:
            keep = data.rstrip(b"\n").rfind(b"\n") + 1
    if keep == len(data):
        return None
    with open(journal, "r+b") as f:
        f.truncate(keep)
    return f"{journal.name}: dropped a torn last record ({len(data) - keep} bytes)"


class Tuner:
    def __init__(self, space: SearchSpace, journal: Path | None, resume: bool = False, sampler: str = "tpe"):
        self.space = space
        self.notes: list[str] = []
        if journal and resume:
            if not journal.exists():
                self.notes.append(f"{journal.name} is missing: the sampler's history is rebuilt from the store")
            elif (note := repair_journal(journal)):
                self.notes.append(note)
        storage = JournalStorage(JournalFileBackend(str(journal))) if journal else None
        if sampler == "random":
            chosen = optuna.samplers.RandomSampler(seed=space.seed)
        else:
            chosen = optuna.samplers.TPESampler(seed=space.seed, multivariate=True, group=True,
                                                n_startup_trials=max(4, min(10, space.trials // 4)))
        self.study = optuna.create_study(study_name=space.name, storage=storage, sampler=chosen,
                                         directions=[o.direction for o in space.objectives], load_if_exists=resume)
        self._layouts = {layout_key(l): l for l in space.layouts}
        self.seen: set[str] = set()
        # What each evaluated point measured (its objective values and SLO excesses), for the sampler's repeats.
        self.outcomes: dict[str, tuple[list[float], dict[str, float]]] = {
            point_key(t.params): (list(t.values), t.user_attrs.get("slo_over", {}))
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values}

    # ---- bookkeeping --------------------------------------------------------------------
    def fail_stale(self) -> int:
        """Trials left RUNNING by a runner that died: FAIL, so the sampler stops waiting on them."""
        stale = [t for t in self.study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
        for t in stale:
            self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        return len(stale)

    def remember(self, params: dict) -> None:
        self.seen.add(point_key(params))

    def reconcile(self, completed: list[tuple[int, dict, dict]]) -> int:
        """The store is the record: every trial it holds as COMPLETE, as (number, params, metrics), that Optuna does
        not (a kill between the store's flush and Optuna's tell, a torn or missing journal) is told again, with its
        measured values and constraints. Returns how many."""
        known = {t.user_attrs.get("number"): t.state for t in self.study.get_trials(deepcopy=False)}
        told = 0
        for number, params, metrics in completed:
            if known.get(number) == TrialState.COMPLETE:
                continue
            self.study.enqueue_trial(params, user_attrs={"origin": "reconciled", "number": number})
            trial = self.study.ask()
            trial.suggest_categorical("layout", list(self._layouts))
            for name, values in self.space.knob_grid.items():
                trial.suggest_categorical(name, list(values))
            self.tell(trial, TrialResult(number, True, "", metrics))
            told += 1
        return told

    # ---- warm start -----------------------------------------------------------------------
    def warm_start(self, count: int) -> list[dict]:
        """Enqueue the simulator's `count` best grid points by the first objective, on a smaller replay."""
        space = self.space
        scenario = space.scenario
        quick = scenario.workload.with_(num_requests=min(WARM_START_REQUESTS, scenario.workload.num_requests))
        quick_scenario = replace(scenario, workload=quick)
        requests = quick.sample()
        scored = []
        base = {k: v[0] for k, v in space.knob_grid.items()}
        for layout in space.layouts:
            for seqs in space.knob_grid["max_num_seqs"]:
                knobs = EngineKnobs(**{**base, "max_num_seqs": seqs})
                p = predict(quick_scenario, layout, knobs, requests)
                if p.feasible and all(p.get(o.metric) is not None for o in space.objectives) \
                        and not any(v > 0 for v in space.slo_violation(p.metrics).values()):
                    scored.append((p, params_of(layout, knobs, space)))
        key = ranking_key(space.objectives, Prediction.get)
        scored.sort(key=lambda s: key(s[0]), reverse=True)
        picked = []
        for _, params in scored[:count]:
            if point_key(params) not in self.seen:
                self.study.enqueue_trial(params, user_attrs={"origin": "warm-start"}, skip_if_exists=True)
                picked.append(params)
        return picked

    # ---- ask / tell -------------------------------------------------------------------------
    def ask(self, number: int) -> tuple[optuna.trial.Trial, TrialSpec] | None:
        """The next new point of the space, or None when the sampler only proposes evaluated ones."""
        for _ in range(MAX_DUPLICATES_IN_A_ROW):
            trial = self.study.ask()
            params = {"layout": trial.suggest_categorical("layout", list(self._layouts))}
            for name, values in self.space.knob_grid.items():
                params[name] = trial.suggest_categorical(name, list(values))
            key = point_key(params)
            if key in self.seen:
                # Never run the same point twice. The sampler learns from a repeat what the point measured (TPE
                # reads a PRUNED trial as a bad observation); a point still running or failed tells it nothing.
                if key in self.outcomes:
                    values, over = self.outcomes[key]
                    trial.set_user_attr("repeat", True)
                    self._tell_values(trial, values, over)
                else:
                    self.study.tell(trial, state=TrialState.FAIL)
                continue
            self.seen.add(key)
            trial.set_user_attr("number", number)
            layout = self._layouts[params["layout"]]
            knobs = EngineKnobs(**{k: params[k] for k in self.space.knob_grid})
            origin = trial.user_attrs.get("origin", "sampler")
            return trial, TrialSpec(number, layout, knobs, origin)
        return None

    def score(self, result: TrialResult) -> tuple[list[float] | None, bool]:
        """The objective values of a completed trial and whether it meets the SLOs (None, False for a failure)."""
        if not result.ok:
            return None, False
        meets = all(v <= 0 for v in self.space.slo_violation(result.metrics).values())
        values = [result.metrics.get(o.metric) for o in self.space.objectives]
        if any(v is None for v in values):     # e.g. energy where the GPUs have no NVML energy counter
            return None, False
        return [float(v) for v in values], meets

    def tell(self, trial: optuna.trial.Trial, result: TrialResult) -> None:
        """Record the outcome: a failure is FAIL (never a score), SLOs go in as constraints (<= 0 is met)."""
        values, _ = self.score(result)
        if values is None:
            self.study.tell(trial, state=TrialState.FAIL)
            return
        over = self.space.slo_violation(result.metrics)
        self.outcomes[point_key(trial.params)] = (values, over)
        self._tell_values(trial, values, over)

    def _tell_values(self, trial: optuna.trial.Trial, values: list[float], over: dict[str, float]) -> None:
        for metric, excess in over.items():
            trial.set_constraint(metric, excess)
        trial.set_user_attr("slo_over", over)
        self.study.tell(trial, values)
