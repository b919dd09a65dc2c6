"""One prediction: a model on a cluster with a layout, knobs and a workload, as vLLM would measure it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from autotune.sim.calibration import Calibration
from autotune.sim.costs import PHASE_FIELDS, StepCost
from autotune.sim.engine import EngineLimits, ReplicaResult, RunResult, simulate
from autotune.sim.memory import MemoryPlan, StageShape, plan_memory, stage_shape
from autotune.sim.power import energy_joules
from autotune.sim.uncertainty import intervals
from autotune.spec.hardware import Cluster
from autotune.spec.layout import EngineKnobs, Layout, structural_problem
from autotune.spec.metrics import COST_KEYS, LATENCY_KEYS, cost_stats, latency_stats
from autotune.spec.models import ModelSpec
from autotune.spec.workload import Requests, Workload

SERIES_POINTS = 60


@dataclass(frozen=True)
class Scenario:
    model: ModelSpec
    cluster: Cluster
    workload: Workload
    calibration: Calibration = Calibration()
    router: str = "least-loaded"
    allow_cross_node_tp: bool = False

    def resolve(self, knobs: EngineKnobs) -> EngineKnobs:
        """vLLM's defaults filled in; max_model_len fits the workload's longest request and the model."""
        return knobs.resolved(self.cluster.gpu, min(self.workload.max_model_len, self.model.max_position_embeddings))


@dataclass
class Prediction:
    layout: Layout
    knobs: EngineKnobs
    feasible: bool
    reason: str
    memory: MemoryPlan | None = None
    metrics: dict = field(default_factory=dict)
    series: list[dict] = field(default_factory=list)
    engine_series: list[list[tuple]] = field(default_factory=list)

    def get(self, key: str, default=None):
        return self.metrics.get(key, default)

    def to_json(self, with_series: bool = False) -> dict:
        out = {"layout": self.layout.to_dict(), "label": self.layout.label(), "knobs": self.knobs.to_dict(),
               "feasible": self.feasible, "reason": self.reason}
        keys = ("makespan_s", "output_tok_s", "output_tok_s_per_gpu", "total_tok_s", "total_tok_s_per_gpu",
                *LATENCY_KEYS, "preemptions", "kv_capacity_tokens", "kv_peak_frac", "kv_mean_frac", "bottleneck",
                "roofline_frac", "time_share", "num_requests", "gpus", "offered_rate", "overloaded",
                "sustainable_rate", *COST_KEYS, "intervals", "near_validated", "extrapolation", "interval_basis",
                "interval_coverage")
        out.update({k: self.metrics.get(k) for k in keys})
        if self.memory is not None:
            out["memory_per_gpu"] = {k: self.memory.to_dict()[k] for k in
                                     ("gpu_bytes", "weight_bytes", "activation_bytes", "overhead_bytes",
                                      "kv_cache_bytes", "kv_bytes_per_token")}
        if with_series:
            out["timeseries"] = self.series
        return out


def _bottleneck(cost: dict[str, float], preemptions: int, kv_limited_share: float, layout: Layout) -> str:
    if preemptions > 0 or kv_limited_share > 0.2:
        return "KV capacity"
    if cost["total"] and cost["bubble"] / cost["total"] > 0.25:
        # Idle GPUs: pipeline stages without a batch, or a MoE model's DP engines waiting for the slowest.
        return "pipeline bubbles" if layout.pp > 1 else "DP engines waiting"
    shares = {"compute": cost["compute"], "HBM bandwidth": cost["weights"] + cost["kv"],
              "communication": cost["comm"], "sampling and small kernels": cost["kernels"], "scheduler overhead": cost["overhead"]}
    return max(shares, key=shares.get)


def _aggregate_series(replicas: list[ReplicaResult], end: float) -> list[dict]:
    """KV use (mean over engines), running, waiting and preemptions (sums) on an even time grid."""
    grid = np.linspace(0.0, end, SERIES_POINTS)
    kv = np.zeros_like(grid)
    running = np.zeros_like(grid)
    waiting = np.zeros_like(grid)
    preempted = np.zeros_like(grid)
    for r in replicas:
        if not len(r.series):
            continue
        s = r.series
        idx = np.searchsorted(s[:, 0], grid, side="right") - 1
        ok = idx >= 0
        kv[ok] += s[idx[ok], 1]
        running[ok] += s[idx[ok], 2]
        waiting[ok] += s[idx[ok], 3]
        preempted[ok] += s[idx[ok], 4]
    kv /= max(len(replicas), 1)
    return [{"t": float(t), "kv_frac": float(k), "running": int(r), "waiting": int(w), "preemptions": int(p)}
            for t, k, r, w, p in zip(grid, kv, running, waiting, preempted)]


def _downsample(series: np.ndarray, points: int = SERIES_POINTS * 4) -> list[tuple]:
    """At most about `points` of an engine's (t, kv fraction, running, waiting, preempted) rows, the last kept."""
    step = max(1, len(series) // points)
    rows = series[::step] if not len(series) or (len(series) - 1) % step == 0 else np.vstack([series[::step],
                                                                                           series[-1:]])
    return [(t, kv, int(running), int(waiting), int(pre)) for t, kv, running, waiting, pre in rows.tolist()]


def infeasibility(scenario: Scenario, layout: Layout, knobs: EngineKnobs) -> tuple[str | None, MemoryPlan | None]:
    """Why a layout with resolved knobs cannot run (vLLM would refuse the knobs, the layout or the memory), or None
    with its memory plan."""
    problem = knobs.refusal() or structural_problem(scenario.model, scenario.cluster, layout,
                                                    scenario.allow_cross_node_tp)
    if problem:
        return problem, None
    eff = scenario.calibration.for_gpu(scenario.cluster.gpu.name)
    plan = plan_memory(scenario.model, scenario.cluster.gpu, layout, knobs, eff)
    return plan.problem, plan


def step_cost(scenario: Scenario, layout: Layout, knobs: EngineKnobs) -> tuple[StepCost, StageShape]:
    """The step-time model of a layout with resolved knobs, and the shape of one pipeline stage."""
    shape = stage_shape(scenario.model, layout, knobs.kv_dtype_for(scenario.model))
    eff = scenario.calibration.for_gpu(scenario.cluster.gpu.name)
    return StepCost(scenario.model, scenario.cluster, layout, shape, eff, knobs), shape


def predict(scenario: Scenario, layout: Layout, knobs: EngineKnobs = EngineKnobs(),
            requests: Requests | None = None) -> Prediction:
    """Simulate the workload on `layout`; an infeasible layout comes back with its reason and no metrics."""
    model, cluster, workload = scenario.model, scenario.cluster, scenario.workload
    knobs = scenario.resolve(knobs)
    problem, plan = infeasibility(scenario, layout, knobs)
    if problem:
        return Prediction(layout, knobs, False, problem, plan)
    assert plan is not None
    eff = scenario.calibration.for_gpu(cluster.gpu.name)
    cost, shape = step_cost(scenario, layout, knobs)
    limits = EngineLimits(knobs.max_num_seqs, knobs.max_num_batched_tokens, plan.kv_capacity_tokens,
                          knobs.block_size, shape.kv_bytes_per_seq / max(shape.kv_bytes_per_token, 1.0))
    reqs_in = requests if requests is not None else workload.sample()
    prefix = reqs_in.prefix_id if reqs_in.prefix_tokens and reqs_in.prefix_id is not None else None
    run = simulate(cost, limits, layout.dp, reqs_in.prompt, reqs_in.output, reqs_in.arrival, prefix,
                   reqs_in.prefix_tokens if prefix is not None else 0, workload.mode, workload.concurrency,
                   scenario.router, reqs_in.cached_tokens)
    metrics, series, engine_series = _summarise(run, reqs_in.prompt, reqs_in.output, layout, plan)
    joules = energy_joules(cluster.gpu, eff, [r.time_split for r in run.replicas], layout.tp * layout.pp,
                           metrics["makespan_s"])
    metrics.update(cost_stats(layout.world_size, metrics["makespan_s"], float(reqs_in.output.sum()),
                              cluster.usd_per_gpu_hour, joules))
    metrics.update(intervals(model, cluster.gpu, layout, workload.mode, metrics))
    metrics.update(load_verdict(workload, run.arrival, run.first_token, run.finish, reqs_in.output))
    return Prediction(layout, knobs, True, "", plan, metrics, series, engine_series)


# An open-loop run counts as overloaded when, at its last arrival, more than this share of the last stage's requests
# still wait for their first token and that backlog grew over the stage's second half (a stable queue does not grow).
BACKLOG_SHARE = 0.1


def load_verdict(workload: Workload, arrival: np.ndarray, first: np.ndarray, finish: np.ndarray,
                 output: np.ndarray) -> dict:
    """For rate-driven loads: the offered rate, whether the layout kept up with it, and when it did not, the rate it
    sustains (output tokens produced per second from the last stage's midpoint until the last request starts, in
    requests of the mean length)."""
    rate = workload.offered_rate
    if rate is None:
        return {"offered_rate": None, "overloaded": None, "sustainable_rate": None}
    n_last = workload.stages[-1].num_requests if workload.stages else len(arrival)
    t0, t1 = float(arrival[-n_last]), float(arrival[-1])
    mid = (t0 + t1) / 2

    def backlog(t: float) -> int:
        return int(np.sum((arrival <= t) & (first > t)))
    growing = backlog(t1) > max(1.0, BACKLOG_SHARE * n_last) and backlog(t1) > 1.5 * backlog(mid)
    # While requests still wait (until the last one starts), an overloaded server runs at its capacity.
    end = max(float(first.max()), t1)
    span = np.maximum(finish - first, 1e-12)
    overlap = np.clip(np.minimum(finish, end) - np.maximum(first, mid), 0.0, None)
    tokens = float(np.sum(output * overlap / span))
    sustained = tokens / max(end - mid, 1e-12) / float(output.mean())
    return {"offered_rate": rate, "overloaded": bool(growing),
            "sustainable_rate": sustained if growing else None}


def _summarise(run: RunResult, prompt: np.ndarray, output: np.ndarray, layout: Layout,
               plan: MemoryPlan) -> tuple[dict, list[dict], list[list[tuple]]]:
    first, finish, arrival, replicas = run.first_token, run.finish, run.arrival, run.replicas
    start = float(arrival.min())
    makespan = float(finish.max() - start)
    out_tokens = float(output.sum())
    gpus = layout.world_size
    ttft = first - arrival
    e2e = finish - arrival
    multi = output > 1
    tpot = (finish[multi] - first[multi]) / (output[multi] - 1)
    itl = run.itl
    cost = {name: sum(r.time_split[i] for r in replicas) for i, name in enumerate(PHASE_FIELDS)}
    preemptions = sum(r.preemptions for r in replicas)
    busy = sum(r.clock for r in replicas) or 1.0
    kv_limited = sum(r.kv_limited_s for r in replicas) / busy
    cap = plan.kv_capacity_tokens
    metrics = {
        "num_requests": len(output), "gpus": gpus,
        "makespan_s": makespan,
        "output_tok_s": out_tokens / makespan,
        "output_tok_s_per_gpu": out_tokens / makespan / gpus,
        "total_tok_s": (out_tokens + float(prompt.sum())) / makespan,
        "total_tok_s_per_gpu": (out_tokens + float(prompt.sum())) / makespan / gpus,
        **latency_stats("ttft", ttft), **latency_stats("tpot", tpot),
        **latency_stats("itl", itl[:, 0], itl[:, 1]), **latency_stats("e2e", e2e),
        "preemptions": preemptions,
        "kv_capacity_tokens": cap,
        "kv_peak_frac": max(r.kv_peak for r in replicas),
        "kv_mean_frac": sum(r.kv_area for r in replicas) / (cap * busy),
        "bottleneck": _bottleneck(cost, preemptions, kv_limited, layout),
        "roofline_frac": cost["ideal"] / cost["total"] if cost["total"] else None,
        "time_share": {k: (cost[k] / cost["total"] if cost["total"] else 0.0)
                       for k in ("compute", "weights", "kv", "comm", "kernels", "overhead", "bubble")},
    }
    return metrics, _aggregate_series(replicas, makespan + start), [_downsample(r.series) for r in replicas]
