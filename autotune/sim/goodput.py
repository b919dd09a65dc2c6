"""Goodput: the highest request rate a configuration serves with its SLOs met at p99 and a queue that does not
grow, found by bisection over the rate with the simulator (DistServe's goodput, Zhong et al., OSDI 2024)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from autotune.sim.predict import Prediction, Scenario, infeasibility, predict, step_cost
from autotune.sim.slo import Slo
from autotune.spec.layout import EngineKnobs, Layout
from autotune.spec.metrics import cost_stats

# A rate is judged in steady state: the run lasts a few request lifetimes, so the number in flight (rate x E2E,
# Little's law) is reached and a queue that grows has time to show. Reasoning requests live for minutes, so this is
# what the search costs.
LIFETIMES = 3
MIN_REQUESTS, MAX_REQUESTS = 400, 3000
BISECTIONS = 5          # the rate to within 1/32 of the capacity


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

    def usd_per_mtok(self, gpus: int, usd_per_gpu_hour: float | None) -> float | None:
        """What serving this rate costs in steady state, every GPU billed."""
        if self.rate is None:
            return None
        return cost_stats(gpus, 1.0, self.tok_s, usd_per_gpu_hour, None)["usd_per_mtok"]


def steady_requests(rate: float, lifetime_s: float) -> int:
    """Requests for a run at `rate` to last LIFETIMES request lifetimes (within the bounds)."""
    return int(min(MAX_REQUESTS, max(MIN_REQUESTS, LIFETIMES * rate * lifetime_s)))


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


@dataclass(frozen=True)
class LoadShape:
    """The lengths of a load, as the mean-value estimate needs them."""
    mean_prompt: float
    mean_prefill: float     # prompt tokens computed: less the prefix-cache hits (a shared prefix after its first use)
    mean_output: float
    mean_context: float     # of the running set (mean_running_ctx)
    output_cv2: float       # squared coefficient of variation of the output lengths: of the requests' lifetimes

    @classmethod
    def of(cls, requests) -> "LoadShape":
        out = requests.output.astype(float)
        prompt = float(requests.prompt.mean())
        hits = requests.cached_tokens + (requests.prefix_tokens if requests.prefix_id is not None else 0)
        return cls(prompt, prompt - hits, float(out.mean()), mean_running_ctx(requests),
                   float(out.var() / out.mean() ** 2))


@dataclass(frozen=True)
class Capacity:
    rate: float         # requests/s the configuration finishes in steady state (0: it cannot meet the TPOT SLO)
    seqs: int           # sequences each replica runs at that rate
    tpot_s: float       # the time per output token there
    limit: str          # what caps the rate: max_num_seqs, the KV cache, the TPOT SLO or the TTFT SLO

    def describe(self) -> str:
        return (f"capacity: {self.seqs} sequences per replica at {self.tpot_s * 1e3:,.1f} ms per token, "
                f"limited by the {self.limit}")


def estimate_capacity(scenario: Scenario, layout: Layout, knobs: EngineKnobs, load: LoadShape, slo: Slo) -> Capacity:
    """Mean-value estimate of the steady state, from the simulator's own step-time model: each replica runs as many
    sequences as max_num_seqs, its KV cache (at the running set's mean context) and the TPOT SLO allow, each
    producing a token per step, and so finishes requests at n / (mean output x TPOT) (Little's law). Each step also
    prefills the prompts of the requests that replace the finished ones."""
    knobs = scenario.resolve(knobs)
    problem, plan = infeasibility(scenario, layout, knobs)
    if problem:
        return Capacity(0.0, 0, float("inf"), problem)
    cost, _ = step_cost(scenario, layout, knobs)

    def tpot(n: int) -> float:
        prefill = round(n * load.mean_prefill / load.mean_output)
        # Each computed token attends over the cached tokens before it and half its own prompt's computed part.
        attention = prefill * (load.mean_prompt - load.mean_prefill / 2)
        return cost.step_time(n, n * load.mean_context, prefill, attention)[0]
    kv = kv_safe_seqs(plan.kv_capacity_tokens, load.mean_context)
    n, limit = (knobs.max_num_seqs, "max_num_seqs") if knobs.max_num_seqs <= kv else (kv, "KV cache")
    if slo.tpot_p99_s is not None and tpot(n) > slo.tpot_p99_s:
        lo, hi = 0, n          # tpot grows with n: the most sequences within the SLO
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if tpot(mid) <= slo.tpot_p99_s else (lo, mid)
        n, limit = lo, "TPOT SLO"
    if n == 0:
        return Capacity(0.0, 0, tpot(1), limit)
    t = tpot(n)
    rate = layout.dp * n / (load.mean_output * t)
    if slo.ttft_p99_s is not None:
        # Near that rate arrivals wait for one of the n slots: the most rate whose p99 wait, plus the first step,
        # fits the TTFT SLO.
        service = load.mean_output * t
        ingress = cost.ingress_s(load.mean_prompt)

        def ttft99(r: float) -> float:
            return wait_p99(r / layout.dp, n, service, load.output_cv2) + t + ingress
        if ttft99(rate * (1 - 1e-9)) > slo.ttft_p99_s:
            lo, hi = 0.0, rate
            for _ in range(40):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if ttft99(mid) <= slo.ttft_p99_s else (lo, mid)
            rate, limit = lo, f"TTFT SLO (queueing for a slot: p99 wait {ttft99(lo) - t - ingress:,.2f} s)"
    return Capacity(rate, n, t, limit)


def erlang_c(c: int, a: float) -> float:
    """The probability that an arrival waits in an M/M/c queue with offered load a < c (Erlang C):
    (a^c/c! x c/(c-a)) / (sum_{k<c} a^k/k! + a^c/c! x c/(c-a)), in logs so that c may be in the thousands."""
    if a >= c:
        return 1.0
    if a <= 0:
        return 0.0
    k = np.arange(c + 1)
    log_terms = k * math.log(a) - np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, c + 1)))))
    log_terms[c] += math.log(c / (c - a))
    top = log_terms.max()
    weights = np.exp(log_terms - top)
    return float(weights[c] / weights.sum())


def wait_p99(rate: float, slots: int, service_s: float, cv2: float) -> float:
    """The 99th percentile of the wait for a free slot: M/M/c's tail P(W > t) = C e^(-(c/S - rate) t) (Kleinrock,
    Queueing Systems I, 1975), scaled by (1 + CV^2) / 2 for general service times (Allen-Cunneen)."""
    a = rate * service_s
    if a >= slots:
        return float("inf")
    waits = erlang_c(slots, a)
    if waits <= 0.01:
        return 0.0
    return math.log(waits / 0.01) / (slots / service_s - rate) * (1 + cv2) / 2


def goodput(scenario: Scenario, layout: Layout, knobs: EngineKnobs, slo: Slo, load: LoadShape,
            cap: Capacity | None = None) -> Goodput:
    """The steady-state capacity estimate (`cap`, when the caller has it already) bounds the rate (a finite
    simulated run is too short to show that a reasoning load above it never settles); below it, the simulator
    judges the SLOs at p99, by bisection."""
    cap = cap or estimate_capacity(scenario, layout, knobs, load, slo)
    if not cap.rate:
        return Goodput(None, f"no rate meets the SLOs: one sequence alone takes {cap.tpot_s * 1e3:,.1f} ms per "
                             "token", None, load.mean_output)
    # A request lives about its output length times the time per token; the run lasts a few such lifetimes.
    lifetime = load.mean_output * cap.tpot_s

    def at(rate: float) -> Prediction:
        return predict(open_loop(scenario, rate, steady_requests(rate, lifetime)), layout, knobs)

    p = at(cap.rate)
    binding = slo.miss_under_load(p)
    if binding is None:
        return Goodput(cap.rate, cap.describe(), p, load.mean_output)
    lo, hi, best = 0.0, cap.rate, None
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        p = at(mid)
        reason = slo.miss_under_load(p)
        if reason is None:
            lo, best = mid, p
        else:
            hi, binding = mid, reason
    if best is None:
        return Goodput(None, f"no rate meets the SLOs; at {hi:.3g} req/s: {binding}", None, load.mean_output)
    return Goodput(lo, binding, best, load.mean_output)
