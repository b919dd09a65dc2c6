"""Every valid layout with the knobs that matter, ranked by throughput under the SLOs, with the Pareto front
of throughput per GPU against latency and the reason each alternative lost."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from autotune.sim.predict import Prediction, Scenario, infeasibility, predict
from autotune.spec.layout import EngineKnobs, Layout, enumerate_layouts

SEQ_GRID = (32, 64, 128, 256, 512, 1024, 2048)
# Past this many times the KV-safe concurrency a layout is deep in the capacity trap: preemption storms that
# lose and are the slowest to simulate, so the search does not spend time there.
TRAP_FACTOR = 2


@dataclass(frozen=True)
class Slo:
    tpot_p99_s: float | None = None
    ttft_p99_s: float | None = None

    def violation(self, p: Prediction) -> str | None:
        for key, limit in (("tpot_p99_s", self.tpot_p99_s), ("ttft_p99_s", self.ttft_p99_s)):
            if limit is not None and p.get(key) is not None and p.get(key) > limit:
                return f"{key[:-2].replace('_', ' ').upper()} {p.get(key) * 1e3:,.0f} ms > SLO {limit * 1e3:,.0f} ms"
        return None


@dataclass
class Recommendation:
    scenario: Scenario
    slo: Slo
    latency_metric: str
    evaluated: list[Prediction] = field(default_factory=list)
    ranked: list[Prediction] = field(default_factory=list)       # feasible and within the SLOs, best first
    pareto: list[Prediction] = field(default_factory=list)
    infeasible: list[Prediction] = field(default_factory=list)
    explanation: list[str] = field(default_factory=list)

    @property
    def winner(self) -> Prediction | None:
        return self.ranked[0] if self.ranked else None

    def best_per_layout(self) -> dict[Layout, Prediction]:
        best: dict[Layout, Prediction] = {}
        for p in self.evaluated:
            if p.feasible and (p.layout not in best or _score(p, self.slo) > _score(best[p.layout], self.slo)):
                best[p.layout] = p
        return best


def _score(p: Prediction, slo: Slo) -> tuple[int, float]:
    return (0 if slo.violation(p) else 1, p.get("output_tok_s") or 0.0)


def mean_running_ctx(requests) -> float:
    """A request stays in the batch in proportion to its length, so the running set's mean context is the
    size-biased mean E[L^2] / (2 E[L]) of the total lengths L (renewal theory's mean age)."""
    total = (requests.prompt + requests.output).astype(float)
    return float(np.mean(total**2) / (2 * np.mean(total)))


def kv_safe_seqs(kv_capacity_tokens: int, mean_context: float) -> int:
    """How many sequences the KV cache holds at the mean running context."""
    return max(1, int(kv_capacity_tokens / mean_context))


def _seq_grid(safe: int, default: int) -> list[int]:
    """max_num_seqs values worth simulating: up to vLLM's default, not deep in the capacity trap."""
    grid = [s for s in SEQ_GRID if s <= min(default, TRAP_FACTOR * safe)]
    return grid or [SEQ_GRID[0]]


def recommend(scenario: Scenario, slo: Slo = Slo(), latency_metric: str = "tpot_p99_s", base: EngineKnobs = EngineKnobs(),
              refine_top: int = 3) -> Recommendation:
    """Stage 1: every layout at vLLM's default max_num_seqs and at the largest grid value the KV cache holds.
    Stage 2: the best few layouts over the whole max_num_seqs grid."""
    rec = Recommendation(scenario, slo, latency_metric)
    requests = scenario.workload.sample()
    layouts = enumerate_layouts(scenario.model, scenario.cluster, allow_cross_node_tp=scenario.allow_cross_node_tp)
    mean_running_context = mean_running_ctx(requests)
    tried: set[tuple[Layout, int]] = set()

    def run(layout: Layout, seqs: int | None) -> Prediction:
        knobs = EngineKnobs(**{**base.to_dict(), "max_num_seqs": seqs}) if seqs else base
        p = predict(scenario, layout, knobs, requests)
        tried.add((layout, p.knobs.max_num_seqs))
        (rec.evaluated if p.feasible else rec.infeasible).append(p)
        return p

    safe_seqs: dict[Layout, int] = {}
    for layout in layouts:
        problem, plan = infeasibility(scenario, layout, scenario.resolve(base))
        if problem or base.max_num_seqs:
            run(layout, base.max_num_seqs)
            continue
        default = scenario.resolve(base).max_num_seqs
        safe_seqs[layout] = kv_safe_seqs(plan.kv_capacity_tokens, mean_running_context)
        grid = _seq_grid(safe_seqs[layout], default)
        # Stage 1: the largest value the KV cache holds at the mean running context, and vLLM's default.
        for seqs in {max([s for s in grid if s <= safe_seqs[layout]] or grid[:1]), grid[-1]}:
            run(layout, seqs)
    leaders = sorted(rec.best_per_layout().values(), key=lambda p: _score(p, slo), reverse=True)[:refine_top]
    for p in leaders if not base.max_num_seqs else []:
        for seqs in _seq_grid(safe_seqs[p.layout], max(scenario.resolve(base).max_num_seqs, 1024)):
            if (p.layout, seqs) not in tried:
                run(p.layout, seqs)
    ok = [p for p in rec.evaluated if not slo.violation(p)]
    rec.ranked = sorted(ok, key=lambda p: p.get("output_tok_s"), reverse=True)
    rec.pareto = pareto_front(rec.evaluated, latency_metric)
    rec.explanation = explain(rec)
    return rec


def pareto_front(preds: list[Prediction], latency_metric: str) -> list[Prediction]:
    """Non-dominated points: no other has both more throughput per GPU and lower latency."""
    pts = sorted((p for p in preds if p.feasible and p.get(latency_metric) is not None),
                 key=lambda p: (p.get(latency_metric), -p.get("output_tok_s_per_gpu")))
    front, best = [], -1.0
    for p in pts:
        if p.get("output_tok_s_per_gpu") > best:
            front.append(p)
            best = p.get("output_tok_s_per_gpu")
    return front


def _limit_detail(p: Prediction) -> str:
    b = p.get("bottleneck")
    share = p.get("time_share") or {}
    if b == "KV capacity":
        return (f"KV capacity: {p.get('preemptions'):,} preemptions, the cache holds {p.get('kv_capacity_tokens'):,} "
                f"tokens per replica" if p.get("preemptions") else
                f"KV capacity: the cache ({p.get('kv_capacity_tokens'):,} tokens per replica) throttles admission")
    if b == "communication":
        return f"communication: {share.get('comm', 0):.0%} of the time in all-reduce/all-to-all"
    if b == "pipeline bubbles":
        return f"pipeline bubbles: {share.get('bubble', 0):.0%} of stage time idle"
    if b == "HBM bandwidth":
        return (f"HBM bandwidth: {share.get('weights', 0):.0%} of the time reading weights, "
                f"{share.get('kv', 0):.0%} reading the KV cache")
    if b == "sampling and small kernels":
        return (f"sampling and small kernels: {share.get('kernels', 0):.0%} of the time sampling over the whole "
                f"vocabulary on every rank, or in kernels too small to reach the GPU's rates")
    return f"{b}: {share.get('compute' if b == 'compute' else 'overhead', 0):.0%} of the time"


def explain(rec: Recommendation) -> list[str]:
    w = rec.winner
    if w is None:
        if rec.evaluated:
            return ["no layout meets the SLOs; the closest: "
                    + "; ".join(f"{p.layout.label()}: {rec.slo.violation(p)}" for p in rec.evaluated[:3])]
        return ["no layout fits: " + "; ".join(f"{p.layout.label()}: {p.reason}" for p in rec.infeasible[:4])]
    lines = [f"{w.layout.label()} with max_num_seqs {w.knobs.max_num_seqs} wins: {w.get('output_tok_s'):,.0f} output "
             f"tok/s ({w.get('output_tok_s_per_gpu'):,.0f} per GPU), TPOT p99 {w.get('tpot_p99_s') * 1e3:,.0f} ms; "
             f"it is bound by {_limit_detail(w)}; KV peak {w.get('kv_peak_frac'):.0%} of "
             f"{w.get('kv_capacity_tokens'):,} tokens per replica, {w.get('preemptions'):,} preemptions."]
    for layout, p in sorted(rec.best_per_layout().items(), key=lambda kv: -kv[1].get("output_tok_s")):
        if layout == w.layout:
            continue
        gap = 1 - p.get("output_tok_s") / w.get("output_tok_s")
        why = rec.slo.violation(p) or _limit_detail(p)
        lines.append(f"{layout.label()}: {gap:.0%} slower at best (max_num_seqs {p.knobs.max_num_seqs}); {why}")
    seen = set(rec.best_per_layout())
    for p in rec.infeasible:
        if p.layout not in seen:
            seen.add(p.layout)
            lines.append(f"{p.layout.label()}: infeasible, {p.reason}")
    return lines
