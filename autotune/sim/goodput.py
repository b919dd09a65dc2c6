"""Goodput: the highest request rate a configuration serves with its SLOs met at p99 and a queue that does not
grow, found by bisection over the rate with the simulator (DistServe's goodput, Zhong et al., OSDI 2024)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from autotune.sim.predict import Prediction, Scenario, predict
from autotune.sim.slo import Slo
from autotune.spec.layout import EngineKnobs, Layout

# A rate is judged in steady state: the run lasts a few request lifetimes, so the number in flight (rate x E2E,
# Little's law) is reached and a queue that grows has time to show. Reasoning requests live for minutes, so this is
# what the search costs.
LIFETIMES = 3
MIN_REQUESTS, MAX_REQUESTS = 400, 3000
BISECTIONS = 5          # the rate to within 1/32 of the bracket
HEADROOM = 1.25         # the bracket's top over the mean-value capacity estimate
GROWTH, GROWTH_TRIES = 1.5, 3   # the bracket grows while its top is still served


@dataclass(frozen=True)
class Goodput:
    rate: float | None              # requests/s served within the SLOs; None when no rate is
    binding: str                    # what stops a higher rate (an SLO or the capacity), or every rate
    at_rate: Prediction | None      # the prediction at `rate`
    mean_output: float              # tokens per request of the load, to state the rate in tokens/s

    @property
    def tok_s(self) -> float | None:
        return None if self.rate is None else self.rate * self.mean_output

    def per_gpu(self, gpus: int) -> float | None:
        return None if self.rate is None else self.rate / gpus


def open_loop(scenario: Scenario, rate: float, num_requests: int) -> Scenario:
    """The scenario's lengths sent at `rate` (constant arrivals if the workload's mode says so, else Poisson). The
    same seed draws the same lengths and unit gaps at every rate, so rates compare on the same requests."""
    w = scenario.workload
    mode = "constant" if w.mode == "constant" else "poisson"
    return replace(scenario, workload=replace(w, mode=mode, rate=rate, num_requests=num_requests, stages=()))


def mean_running_ctx(requests) -> float:
    """A request stays in the batch in proportion to its length, so the running set's mean context is the
    size-biased mean E[L^2] / (2 E[L]) of the total lengths L (renewal theory's mean age)."""
    total = (requests.prompt + requests.output).astype(float)
    return float(np.mean(total**2) / (2 * np.mean(total)))


def kv_safe_seqs(kv_capacity_tokens: int, mean_context: float) -> int:
    """How many sequences the KV cache holds at the mean running context."""
    return max(1, int(kv_capacity_tokens / mean_context))


def capacity_rps(batch: Prediction, mean_context: float) -> float:
    """Mean-value estimate of the rate a configuration sustains: each replica runs as many sequences as both
    max_num_seqs and its KV cache allow, each producing a token per step of the batch's mean TPOT, so it finishes
    requests at n / (mean output x TPOT) (Little's law)."""
    n = min(batch.knobs.max_num_seqs, kv_safe_seqs(batch.get("kv_capacity_tokens"), mean_context))
    mean_output = batch.get("output_tok_s") * batch.get("makespan_s") / batch.get("num_requests")
    return batch.layout.dp * n / (mean_output * batch.get("tpot_mean_s"))


def goodput(scenario: Scenario, layout: Layout, knobs: EngineKnobs, slo: Slo, batch: Prediction,
            mean_context: float) -> Goodput:
    """Bisect the rate below HEADROOM x the mean-value capacity of the configuration (`batch`, its prediction on a
    batch of the same requests), growing the bracket while its top is still served."""
    mean_output = batch.get("output_tok_s") * batch.get("makespan_s") / batch.get("num_requests")
    # A request lives about its output length times the time per token; the run must last a few such lifetimes.
    lifetime = mean_output * batch.get("tpot_mean_s")

    def at(rate: float) -> Prediction:
        n = int(min(MAX_REQUESTS, max(MIN_REQUESTS, LIFETIMES * rate * lifetime)))
        return predict(open_loop(scenario, rate, n), layout, knobs)

    lo, hi = 0.0, HEADROOM * capacity_rps(batch, mean_context)
    best: Prediction | None = None
    p = at(hi)
    binding = slo.miss_under_load(p)
    for _ in range(GROWTH_TRIES):
        if binding:
            break
        lo, best, hi = hi, p, hi * GROWTH
        p = at(hi)
        binding = slo.miss_under_load(p)
    if binding is None:
        return Goodput(hi, f"not bounded up to {hi:.3g} req/s", p, mean_output)
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        p = at(mid)
        reason = slo.miss_under_load(p)
        if reason is None:
            lo, best = mid, p
        else:
            hi, binding = mid, reason
    if best is None:
        return Goodput(None, f"no rate meets the SLOs; at {hi:.3g} req/s: {binding}", None, mean_output)
    return Goodput(lo, binding, best, mean_output)
