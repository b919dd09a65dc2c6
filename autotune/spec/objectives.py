"""What a configuration is judged on, defined once: the objective metrics with their directions, the best of a set of
results, and the Pareto front of throughput per GPU against a latency. A result is anything `get(result, metric)`
reads a number (or None) from: a store row, a trial's metrics, a prediction. The store's queries, the study's
progress line, the dashboard and `recommend` all rank through these."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

R = TypeVar("R")
Get = Callable[[R, str], "float | None"]

OBJECTIVE_METRICS = {
    "output_tok_s_per_gpu": "maximize", "output_tok_s": "maximize", "total_tok_s": "maximize",
    "tpot_p50_s": "minimize", "tpot_p99_s": "minimize", "ttft_p50_s": "minimize", "ttft_p99_s": "minimize",
    "e2e_p50_s": "minimize", "e2e_p99_s": "minimize", "itl_p99_s": "minimize", "preemptions": "minimize",
    "usd_per_mtok": "minimize", "joules_per_token": "minimize",
}
# The Pareto front's axes: what a GPU delivers against what a user waits.
FRONT_THROUGHPUT = "output_tok_s_per_gpu"
DEFAULT_LATENCY = "tpot_p99_s"


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str      # "maximize" or "minimize"

    @classmethod
    def of(cls, metric: str, direction: str | None = None) -> Objective:
        return cls(metric, direction or OBJECTIVE_METRICS[metric])

    def score(self, value: float) -> float:
        """Larger is better, whatever the direction."""
        return value if self.direction == "maximize" else -value

    def to_dict(self) -> dict:
        return {"metric": self.metric, "direction": self.direction}


def objectives_of(header: dict) -> tuple[Objective, ...]:
    """A study's objectives as its header (study.json) records them."""
    return tuple(Objective.of(o["metric"], o.get("direction")) for o in header["objectives"])


def ranking_key(objectives: tuple[Objective, ...], get: Get) -> Callable[[R], tuple]:
    """Sort key, larger is better: the first objective, ties broken by the next ones."""
    return lambda r: tuple(o.score(get(r, o.metric)) for o in objectives)


def best(results: Iterable[R], objectives: tuple[Objective, ...], get: Get, meets_slo: Callable[[R], bool]
         ) -> R | None:
    """The result with every objective measured that is best on the first objective (ties: the next ones), among
    those that meet the SLOs; among all of them when none does (the caller says so, from meets_slo)."""
    measured = [r for r in results if all(get(r, o.metric) is not None for o in objectives)]
    pool = [r for r in measured if meets_slo(r)] or measured
    return max(pool, key=ranking_key(objectives, get), default=None)


def pareto_front(results: Iterable[R], latency: str, get: Get) -> list[R]:
    """The results no other beats on both throughput per GPU (higher) and `latency` (lower), by latency."""
    points = sorted((r for r in results if get(r, latency) is not None and get(r, FRONT_THROUGHPUT) is not None),
                    key=lambda r: (get(r, latency), -get(r, FRONT_THROUGHPUT)))
    front, top = [], float("-inf")
    for r in points:
        if get(r, FRONT_THROUGHPUT) > top:
            front.append(r)
            top = get(r, FRONT_THROUGHPUT)
    return front
