"""Service-level objectives on a prediction: p99 TPOT and TTFT limits, and what it means to meet them under a load."""

from __future__ import annotations

from dataclasses import dataclass

# Under a steady rate, preemptions beyond this share of the requests mean the KV cache is the bottleneck: the load
# sits in the capacity trap, whatever the latency percentiles of a finite run say.
PREEMPTION_SHARE = 0.01


@dataclass(frozen=True)
class Slo:
    tpot_p99_s: float | None = None
    ttft_p99_s: float | None = None

    @property
    def any(self) -> bool:
        return self.tpot_p99_s is not None or self.ttft_p99_s is not None

    def describe(self) -> str:
        parts = [f"{name} p99 <= {limit * 1e3:,.0f} ms" for name, limit in (("TPOT", self.tpot_p99_s),
                                                                             ("TTFT", self.ttft_p99_s)) if limit]
        return ", ".join(parts) or "no SLO"

    def violation(self, p) -> str | None:
        """The first SLO the prediction breaks, in words; None when it meets them all."""
        for key, limit in (("tpot_p99_s", self.tpot_p99_s), ("ttft_p99_s", self.ttft_p99_s)):
            if limit is not None and p.get(key) is not None and p.get(key) > limit:
                return f"{key[:-2].replace('_', ' ').upper()} {p.get(key) * 1e3:,.1f} ms > SLO {limit * 1e3:,.0f} ms"
        return None

    def tpot_missed(self, p) -> bool:
        return self.tpot_p99_s is not None and p.get("tpot_p99_s") is not None and p.get("tpot_p99_s") > self.tpot_p99_s

    def miss_under_load(self, p) -> str | None:
        """What stops a rate-driven load from being served: an SLO, a queue that grows for the whole run, or the
        capacity trap (the KV cache full, requests preempted and recomputed: a load no server holds for long)."""
        if p.get("overloaded"):
            return f"capacity: the queue grows (sustains {p.get('sustainable_rate'):.3g} req/s)"
        if p.get("preemptions", 0) > PREEMPTION_SHARE * p.get("num_requests", 0):
            return f"KV capacity: {p.get('preemptions'):,} preemptions ({p.get('num_requests'):,} requests)"
        return self.violation(p)
