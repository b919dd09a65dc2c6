"""vLLM's Prometheus /metrics, per DP engine: KV-cache use (the current name and the one it replaced), running
and waiting requests (and waiting by reason), preemptions, prefix-cache lookups and hits, and the cache size from
cache_config_info."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")   # renamed in vLLM v1; both are 0..1


@dataclass
class EngineSample:
    engine: int
    kv_frac: float | None = None
    running: int = 0
    waiting: int = 0
    preemptions: int = 0
    prefix_queries: int = 0     # prompt tokens looked up in the prefix cache, since the server started
    prefix_hits: int = 0        # of which found there
    waiting_by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class MetricsSample:
    engines: dict[int, EngineSample]
    kv_capacity_tokens: int | None = None

    def prefix_cache(self) -> tuple[int, int]:
        """(hits, lookups) in prompt tokens over every engine since the server started."""
        return (sum(e.prefix_hits for e in self.engines.values()),
                sum(e.prefix_queries for e in self.engines.values()))


def parse(text: str) -> MetricsSample:
    engines: dict[int, EngineSample] = {}
    kv_seen: dict[int, str] = {}
    capacity = None

    def eng(labels: dict) -> EngineSample:
        e = int(labels.get("engine", 0) or 0)
        return engines.setdefault(e, EngineSample(e))
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if name in KV_USAGE:
                e = eng(labels)
                # Prefer the current name when a server exports both.
                if e.engine not in kv_seen or name == KV_USAGE[0]:
                    e.kv_frac = float(value)
                    kv_seen[e.engine] = name
            elif name == "vllm:num_requests_running":
                eng(labels).running = int(value)
            elif name == "vllm:num_requests_waiting":
                eng(labels).waiting = int(value)
            elif name == "vllm:num_requests_waiting_by_reason":
                eng(labels).waiting_by_reason[labels.get("reason", "?")] = int(value)
            elif name == "vllm:num_preemptions_total":
                eng(labels).preemptions = int(value)
            elif name == "vllm:prefix_cache_queries_total":
                eng(labels).prefix_queries = int(value)
            elif name == "vllm:prefix_cache_hits_total":
                eng(labels).prefix_hits = int(value)
            elif name == "vllm:cache_config_info" and labels.get("num_gpu_blocks") not in (None, "None"):
                capacity = int(labels["num_gpu_blocks"]) * int(labels.get("block_size", 16))
    return MetricsSample(engines, capacity)
