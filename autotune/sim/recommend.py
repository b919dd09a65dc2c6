"""Every valid layout with the knobs that matter, ranked by throughput (or goodput) under the SLOs, with the Pareto
front of throughput per GPU against latency and the reason each alternative lost."""

from __future__ import annotations

from dataclasses import dataclass, field

import math

from autotune.sim.goodput import Capacity, Goodput, LoadShape, estimate_capacity, goodput, kv_safe_seqs, mean_running_ctx
from autotune.sim.predict import Prediction, Scenario, infeasibility, predict
from autotune.sim.slo import Slo
from autotune.sim.uncertainty import pair_spread
from autotune.spec.layout import EngineKnobs, Layout, enumerate_layouts
from autotune.spec.objectives import pareto_front
from autotune.spec.workload import OPEN_LOOP

SEQ_GRID = (32, 64, 128, 256, 512, 1024, 2048)
# Past this many times the KV-safe concurrency a layout is deep in the capacity trap: preemption storms that
# lose and are the slowest to simulate, so the search does not spend time there.
TRAP_FACTOR = 2
# The guard against crowning a configuration that thrashes or queues for a sliver of throughput: among the
# configurations within this share of the best throughput, the one with the lowest latency wins.
TOLERANCE = 0.05
GOALS = ("throughput", "goodput")
CLOSE_CALLS = 3         # runners-up named as too close to call, at most
# With --goal goodput, a layout's goodput is searched at its best few configurations by capacity estimate.
GOODPUT_CANDIDATES = 2


@dataclass
class Recommendation:
    scenario: Scenario
    slo: Slo
    latency_metric: str
    goal: str = "throughput"
    tolerance: float = TOLERANCE
    evaluated: list[Prediction] = field(default_factory=list)
    ranked: list[Prediction] = field(default_factory=list)       # feasible and within the SLOs, best first
    pareto: list[Prediction] = field(default_factory=list)
    infeasible: list[Prediction] = field(default_factory=list)
    explanation: list[str] = field(default_factory=list)
    goodputs: dict[tuple[Layout, int], Goodput] = field(default_factory=dict)   # with goal goodput
    layouts: list[Layout] = field(default_factory=list)     # every valid layout considered

    @property
    def winner(self) -> Prediction | None:
        return self.ranked[0] if self.ranked else None

    def best_per_layout(self) -> dict[Layout, Prediction]:
        best: dict[Layout, Prediction] = {}
        for p in self.evaluated:
            if p.feasible and (p.layout not in best or _score(p, self.slo) > _score(best[p.layout], self.slo)):
                best[p.layout] = p
        return best

    def distinct_layouts(self) -> list[Prediction]:
        """The ranking with one row per layout (its best configuration): rows that differ only in a knob are one."""
        seen: set[Layout] = set()
        return [p for p in self.ranked if not (p.layout in seen or seen.add(p.layout))]

    def goodput_of(self, p: Prediction) -> Goodput | None:
        return self.goodputs.get((p.layout, p.knobs.max_num_seqs))

    def value(self, p: Prediction) -> float:
        """What the ranking compares: throughput on the load, or goodput."""
        return self.goodput_of(p).rate if self.goal == "goodput" else p.get("output_tok_s")

    def close_calls(self, most: int = CLOSE_CALLS) -> list[Prediction]:
        """The other layouts whose best is within the model's error on the ratio of two configurations measured
        side by side (uncertainty.pair_spread): the order of these is not known well enough to skip measuring."""
        spread = pair_spread("throughput")
        if not self.winner or spread is None:
            return []
        top = self.value(self.winner)
        return [p for p in self.distinct_layouts()[1:] if math.log(top / self.value(p)) < spread][:most]


def _score(p: Prediction, slo: Slo) -> tuple[int, float]:
    return (0 if slo.violation(p) else 1, p.get("output_tok_s") or 0.0)


def _seq_grid(safe: int, default: int) -> list[int]:
    """max_num_seqs values worth simulating: up to vLLM's default, not deep in the capacity trap."""
    grid = [s for s in SEQ_GRID if s <= min(default, TRAP_FACTOR * safe)]
    return grid or [SEQ_GRID[0]]


def guarded_order(preds: list[Prediction], value, latency, tolerance: float) -> list[Prediction]:
    """Best first by value(p), except that among those within `tolerance` of the best, the lowest latency(p) leads:
    a few percent of throughput never buys a configuration that thrashes or queues."""
    order = sorted(preds, key=value, reverse=True)
    if not order:
        return order
    close = [p for p in order if value(p) >= (1 - tolerance) * value(order[0])]
    lead = min(close, key=lambda p: (latency(p) is None, latency(p) or 0.0))
    return [lead] + [p for p in order if p is not lead]


def recommend(scenario: Scenario, slo: Slo = Slo(), latency_metric: str = "tpot_p99_s", base: EngineKnobs = EngineKnobs(),
              refine_top: int = 3, goal: str = "throughput", tolerance: float = TOLERANCE) -> Recommendation:
    """Goal throughput, on the load as given. Stage 1: every layout at vLLM's default max_num_seqs and at the
    largest grid value the KV cache holds, and at smaller values while those break the TPOT SLO. Stage 2: the best
    few layouts over the whole max_num_seqs grid. Goal goodput: see _recommend_goodput."""
    rec = Recommendation(scenario, slo, latency_metric, goal, tolerance)
    requests = scenario.workload.sample()
    layouts = rec.layouts = enumerate_layouts(scenario.model, scenario.cluster,
                                              allow_cross_node_tp=scenario.allow_cross_node_tp)
    if goal == "goodput":
        return _recommend_goodput(rec, layouts, base, LoadShape.of(requests))
    mean_running_context = mean_running_ctx(requests)
    tried: dict[tuple[Layout, int], Prediction] = {}

    def run(layout: Layout, seqs: int | None) -> Prediction:
        knobs = EngineKnobs(**{**base.to_dict(), "max_num_seqs": seqs}) if seqs else base
        key = (layout, scenario.resolve(knobs).max_num_seqs)
        if key not in tried:
            p = tried[key] = predict(scenario, layout, knobs, requests)
            (rec.evaluated if p.feasible else rec.infeasible).append(p)
        return tried[key]

    safe_seqs: dict[Layout, int] = {}
    for layout in layouts:
        problem, plan = infeasibility(scenario, layout, scenario.resolve(base))
        if problem or base.max_num_seqs:
            run(layout, base.max_num_seqs)
            continue
        default = scenario.resolve(base).max_num_seqs
        safe_seqs[layout] = kv_safe_seqs(plan.kv_capacity_tokens, mean_running_context)
        grid = _seq_grid(safe_seqs[layout], default)
        # Stage 1: the largest value the KV cache holds at the mean running context, and vLLM's default; below a
        # value that breaks the TPOT SLO, the next smaller one, until one meets it (fewer sequences, shorter steps;
        # fewer slots never shorten a queue, so a TTFT miss does not descend).
        for seqs in sorted({max([s for s in grid if s <= safe_seqs[layout]] or grid[:1]), grid[-1]}):
            below = [s for s in grid if s < seqs]
            while slo.tpot_missed(run(layout, seqs)) and below:
                seqs = below.pop()
    leaders = sorted(rec.best_per_layout().values(), key=lambda p: _score(p, slo), reverse=True)[:refine_top]
    for p in leaders if not base.max_num_seqs else []:
        for seqs in _seq_grid(safe_seqs[p.layout], max(scenario.resolve(base).max_num_seqs, 1024)):
            run(p.layout, seqs)
    # Under a request rate a layout must also keep up with it: a growing queue or the capacity trap is a miss.
    miss = slo.miss_under_load if scenario.workload.mode in OPEN_LOOP else slo.violation
    ok = [p for p in rec.evaluated if not miss(p)]
    rec.ranked = guarded_order(ok, lambda p: p.get("output_tok_s"), lambda p: p.get(latency_metric), tolerance)
    rec.pareto = pareto_front([p for p in rec.evaluated if p.feasible], latency_metric, Prediction.get)
    rec.explanation = explain(rec)
    return rec


def _recommend_goodput(rec: Recommendation, layouts: list[Layout], base: EngineKnobs, load: LoadShape
                       ) -> Recommendation:
    """Every layout over the max_num_seqs grid, by the steady-state capacity estimate (no simulation); the best
    few configurations of each layout, best estimate first, get their goodput searched with the simulator. The
    estimate bounds goodput, so the search stops once no estimate left can beat the best goodput found. Ranked by
    goodput (ties by the guard), each configuration shown as it runs at its goodput rate."""
    sc, slo = rec.scenario, rec.slo
    candidates: list[tuple[Capacity, Layout, EngineKnobs]] = []
    for layout in layouts:
        problem, plan = infeasibility(sc, layout, sc.resolve(base))
        if problem:
            rec.infeasible.append(predict(sc, layout, base))
            continue
        default = sc.resolve(base).max_num_seqs
        grid = [base.max_num_seqs] if base.max_num_seqs else sorted(
            {*_seq_grid(kv_safe_seqs(plan.kv_capacity_tokens, load.mean_context), default), default})
        options = []
        for seqs in grid:
            knobs = EngineKnobs(**{**base.to_dict(), "max_num_seqs": seqs})
            options.append((estimate_capacity(sc, layout, knobs, load, slo), layout, knobs))
        candidates += sorted(options, key=lambda o: o[0].rate, reverse=True)[:GOODPUT_CANDIDATES]
    best = 0.0
    for cap, layout, knobs in sorted(candidates, key=lambda o: o[0].rate, reverse=True):
        if cap.rate <= best or not cap.rate:
            break
        g = rec.goodputs[(layout, sc.resolve(knobs).max_num_seqs)] = goodput(sc, layout, knobs, slo, load, cap)
        best = max(best, g.rate or 0.0)
        if g.at_rate is not None:
            rec.evaluated.append(g.at_rate)
    rec.ranked = guarded_order(rec.evaluated, lambda p: rec.goodput_of(p).rate,
                               lambda p: p.get(rec.latency_metric), rec.tolerance)
    rec.pareto = pareto_front(rec.evaluated, rec.latency_metric, Prediction.get)
    rec.explanation = explain(rec)
    return rec


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
    if b == "DP engines waiting":
        return f"DP engines waiting: {share.get('bubble', 0):.0%} of the time waiting for the slowest DP engine's step"
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
        if rec.goal == "goodput" and rec.goodputs:
            return ["no configuration serves any rate within the SLOs: "
                    + "; ".join(f"{layout.label()} (max_num_seqs {seqs}): {g.binding}"
                                for (layout, seqs), g in list(rec.goodputs.items())[:3])]
        if rec.evaluated:
            return ["no layout meets the SLOs; the closest: "
                    + "; ".join(f"{p.layout.label()}: {rec.slo.violation(p)}" for p in rec.evaluated[:3])]
        return ["no layout fits: " + "; ".join(f"{p.layout.label()}: {p.reason}" for p in rec.infeasible[:4])]
    if rec.goal == "goodput":
        lines = _goodput_lines(rec)
    else:
        lines = [f"{w.layout.label()} with max_num_seqs {w.knobs.max_num_seqs} wins: {w.get('output_tok_s'):,.0f} "
                 f"output tok/s ({w.get('output_tok_s_per_gpu'):,.0f} per GPU), TPOT p99 "
                 f"{w.get('tpot_p99_s') * 1e3:,.0f} ms; it is bound by {_limit_detail(w)}; KV peak "
                 f"{w.get('kv_peak_frac'):.0%} of {w.get('kv_capacity_tokens'):,} tokens per replica, "
                 f"{w.get('preemptions'):,} preemptions."]
        lines.append(_guard_line(rec))
        for layout, p in sorted(rec.best_per_layout().items(), key=lambda kv: -kv[1].get("output_tok_s")):
            if layout == w.layout:
                continue
            gap = 1 - p.get("output_tok_s") / w.get("output_tok_s")
            why = (rec.slo.miss_under_load(p) if rec.scenario.workload.mode in OPEN_LOOP else rec.slo.violation(p)) \
                or _limit_detail(p)
            lines.append(f"{layout.label()}: {gap:.0%} slower at best (max_num_seqs {p.knobs.max_num_seqs}); {why}")
    close = rec.close_calls()
    if close:
        spread = math.exp(pair_spread("throughput"))
        lines.append("too close to call: " + ", ".join(f"{p.layout.label()} at max_num_seqs {p.knobs.max_num_seqs} "
                                                        f"({rec.value(p) / rec.value(w) - 1:+.0%})" for p in close)
                     + f" {'is' if len(close) == 1 else 'are'} within the model's error on the ratio of two layouts "
                     f"measured side by side (x{spread:.2f} for 90% of validated pairs): measure "
                     f"{'both' if len(close) == 1 else 'them'} (recommend --emit-space FILE, then autotune run FILE)")
    seen = set(rec.best_per_layout())
    for p in rec.infeasible:
        if p.layout not in seen:
            seen.add(p.layout)
            lines.append(f"{p.layout.label()}: infeasible, {p.reason}")
    if rec.scenario.workload.mode == "batch" and rec.goal != "goodput":
        lines.append("the load is a batch sent at t=0: TTFT is mostly the wait for a free slot (queueing), not the "
                     "response time of a server under a request rate (--mode poisson --rate R, or --goal goodput)")
    return lines


def _guard_line(rec: Recommendation) -> str:
    w, fastest = rec.winner, max(rec.ranked, key=lambda p: p.get("output_tok_s"))
    rule = (f"guard: within {rec.tolerance:.0%} of the best throughput the lowest {rec.latency_metric} wins "
            f"(--tolerance)")
    if fastest is w:
        return rule
    return (f"{rule}: {fastest.layout.label()} at max_num_seqs {fastest.knobs.max_num_seqs} makes "
            f"{fastest.get('output_tok_s') / w.get('output_tok_s') - 1:.1%} more tok/s at {rec.latency_metric} "
            f"{fastest.get(rec.latency_metric):,.3f} s against {w.get(rec.latency_metric):,.3f} s, "
            f"{fastest.get('preemptions'):,} preemptions against {w.get('preemptions'):,}")


def _goodput_lines(rec: Recommendation) -> list[str]:
    w = rec.winner
    g = rec.goodput_of(w)
    cost = g.usd_per_mtok(w.layout.world_size, rec.scenario.cluster.usd_per_gpu_hour)
    lines = [f"{w.layout.label()} with max_num_seqs {w.knobs.max_num_seqs} wins: it serves {g.rate:.3g} req/s "
             f"({g.tok_s:,.0f} output tok/s, {g.per_gpu(w.layout.world_size):.3g} req/s per GPU"
             + (f", ${cost:,.2f} per million output tokens" if cost else "") + f") with {rec.slo.describe()} at p99; "
             f"simulated at that rate: TPOT p99 {w.get('tpot_p99_s') * 1e3:,.1f} ms, TTFT p99 "
             f"{w.get('ttft_p99_s'):,.2f} s, {w.get('preemptions'):,} preemptions",
             f"what stops a higher rate: {g.binding}",
             f"guard: within {rec.tolerance:.0%} of the best goodput the lowest {rec.latency_metric} wins (--tolerance)"]
    for (layout, seqs), other in rec.goodputs.items():
        if (layout, seqs) != (w.layout, w.knobs.max_num_seqs):
            what = f"{other.rate:.3g} req/s; then {other.binding}" if other.rate else other.binding
            lines.append(f"{layout.label()} (max_num_seqs {seqs}): {what}")
    searched = {layout for layout, _ in rec.goodputs}
    infeasible = {p.layout for p in rec.infeasible}
    rest = [layout for layout in rec.layouts if layout not in searched | infeasible]
    if rest:
        lines.append("not simulated, their steady-state capacity estimate is below the winner's goodput: "
                     + ", ".join(layout.label() for layout in rest))
    return lines
