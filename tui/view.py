"""Pure functions from a store snapshot to what the panels show: testable without a screen, cheap per refresh."""

from __future__ import annotations

import time
from dataclasses import dataclass

from autotune.spec import objectives
from autotune.spec.layout import knob_columns
from autotune.spec.objectives import FRONT_THROUGHPUT, Objective
from store.reader import StudySnapshot

# The knobs the trial table and the detail's title show, as their declarations title them (spec/layout.py).
KNOB_COLUMNS = knob_columns()
LATENCY_CHOICES = ("tpot_p99_s", "ttft_p99_s", "e2e_p99_s")
LATENCY_LABELS = {"tpot_p99_s": "p99 TPOT (ms)", "ttft_p99_s": "p99 TTFT (s)", "e2e_p99_s": "p99 E2E (s)"}
LATENCY_SCALE = {"tpot_p99_s": 1e3, "ttft_p99_s": 1.0, "e2e_p99_s": 1.0}


@dataclass(frozen=True)
class HeaderView:
    name: str
    backend: str
    model: str
    cluster: str
    status: str
    done: int
    running: int
    failed: int
    budget: int
    best: str
    elapsed_s: float
    eta_s: float | None


@dataclass(frozen=True)
class ParetoPoint:
    number: int
    label: str
    throughput: float
    latency: float
    on_front: bool
    meets_slo: bool


@dataclass(frozen=True)
class KvRow:
    number: int
    label: str
    engine: int
    kv_now: float
    kv_history: tuple[float, ...]
    running: int
    waiting: int
    preemptions: int

    @property
    def trapped(self) -> bool:
        return self.preemptions > 0


def header_view(snap: StudySnapshot, now: float | None = None) -> HeaderView:
    h = snap.header
    trials = snap.trials
    finished = [t for t in trials if t["state"] in ("COMPLETE", "FAIL")]
    budget = int(h.get("budget_trials") or len(trials))
    ranked = study_objectives(h)
    top = objectives.best([t for t in trials if t["state"] == "COMPLETE"], ranked, dict.get,
                          lambda t: bool(t["feasible_slo"])) if ranked else None
    best = top if top and top["feasible_slo"] else None
    end = h.get("finished_at") if h.get("status") != "running" else None
    elapsed = (end or now or time.time()) - h.get("started_at", snap.taken_at)
    eta = None
    if h.get("status") == "running" and finished:
        eta = elapsed / len(finished) * max(budget - len(finished), 0)
    return HeaderView(h.get("name", "?"), h.get("backend", "?"), h.get("model", "?"), h.get("cluster", "?"),
                      h.get("status", "?"), len(finished), snap.count("RUNNING"), snap.count("FAIL"), budget,
                      f"{best['label']} s{best['max_num_seqs']}: {_objective_text(ranked[0], best)}"
                      if best else "-", max(elapsed, 0.0), eta)


def study_objectives(header: dict) -> tuple[Objective, ...]:
    try:
        return objectives.objectives_of(header)
    except (KeyError, TypeError, AttributeError):
        return ()      # a header written by hand or by another version: no ranking rather than a crash


def _objective_text(objective: Objective, trial: dict) -> str:
    value = trial[objective.metric]
    if objective.metric in LATENCY_SCALE:
        return f"{LATENCY_LABELS[objective.metric]} {value * LATENCY_SCALE[objective.metric]:,.1f}"
    return f"{value:,.4g} {objective.metric}" if objective.metric != FRONT_THROUGHPUT else f"{value:,.0f} tok/s/GPU"


def pareto_points(snap: StudySnapshot, latency: str) -> list[ParetoPoint]:
    """Completed trials as (throughput per GPU, latency), those on the front (spec/objectives.pareto_front) flagged."""
    done = sorted((t for t in snap.trials if t["state"] == "COMPLETE" and t[latency] is not None
                   and t[FRONT_THROUGHPUT] is not None), key=lambda t: (t[latency], -t[FRONT_THROUGHPUT]))
    front = {t["number"] for t in objectives.pareto_front(done, latency, dict.get)}
    return [ParetoPoint(t["number"], t["label"], t[FRONT_THROUGHPUT], t[latency] * LATENCY_SCALE[latency],
                        t["number"] in front, bool(t["feasible_slo"])) for t in done]


def kv_rows(snap: StudySnapshot, history: int = 60) -> list[KvRow]:
    """Per trial with a series (the running ones, else the latest) and per DP engine."""
    labels = {t["number"]: t["label"] for t in snap.trials}
    rows = []
    for number, series in sorted(snap.series.items()):
        by_engine: dict[int, list[dict]] = {}
        for s in series:
            by_engine.setdefault(s["engine"], []).append(s)
        for engine, samples in sorted(by_engine.items()):
            last = samples[-1]
            rows.append(KvRow(number, labels.get(number, "?"), engine, last["kv_frac"] or 0.0,
                              tuple((s["kv_frac"] or 0.0) for s in samples[-history:]), last["running"] or 0,
                              last["waiting"] or 0, last["preemptions"] or 0))
    return rows


def fmt_duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
