"""`autotune size`: the fewest GPUs of each type, with layout and knobs, that serve a request rate within the SLOs
at p99; across types, what each costs per hour and per million output tokens."""

from __future__ import annotations

from dataclasses import dataclass, replace

from autotune.sim.goodput import LoadShape, estimate_capacity, open_loop, steady_requests
from autotune.sim.predict import Prediction, Scenario, infeasibility, predict
from autotune.sim.recommend import SEQ_GRID
from autotune.sim.slo import Slo
from autotune.spec.hardware import Cluster, GpuSpec
from autotune.spec.layout import EngineKnobs, enumerate_layouts
from autotune.spec.metrics import cost_stats

# At each GPU count, the configurations whose steady-state estimate clears the rate are simulated at that rate,
# most headroom first, until one meets the SLOs; past this many misses the count is judged too small.
VERIFY_TRIES = 3


@dataclass(frozen=True)
class Sizing:
    gpu: str
    gpus: int | None                   # the fewest that serve the rate; None when no count up to the limit does
    prediction: Prediction | None      # the chosen configuration, simulated at the rate
    reason: str                        # why the count below (or every count) fell short
    usd_per_gpu_hour: float | None
    output_tok_s: float                # what the rate asks for: requests/s x mean output tokens

    @property
    def usd_per_hour(self) -> float | None:
        return self.gpus * self.usd_per_gpu_hour if self.gpus and self.usd_per_gpu_hour else None

    @property
    def usd_per_mtok(self) -> float | None:
        """Serving the rate in steady state: every GPU billed, rate x mean output tokens made per second."""
        if not self.gpus:
            return None
        return cost_stats(self.gpus, 1.0, self.output_tok_s, self.usd_per_gpu_hour, None)["usd_per_mtok"]


def gpu_counts(gpu: GpuSpec, max_gpus: int, gpus_per_node: int | None = None) -> list[int]:
    """Counts worth offering: powers of two within a node, the whole node, then whole nodes."""
    per_node = gpus_per_node or gpu.gpus_per_node
    within = sorted({*(2**k for k in range(per_node.bit_length()) if 2**k < per_node), per_node})
    return [c for c in within + [k * per_node for k in range(2, max_gpus // per_node + 1)] if c <= max_gpus]


def size(base: Scenario, gpu: GpuSpec, rate: float, slo: Slo, max_gpus: int, usd_per_gpu_hour: float | None,
         gpus_per_node: int | None = None, knobs: EngineKnobs = EngineKnobs()) -> Sizing:
    """The smallest count of `gpu` at which a configuration meets the SLOs at `rate` in its own simulation."""
    load = LoadShape.of(base.workload.sample())
    need = rate * load.mean_output
    why = f"no layout of {base.model.name} fits {max_gpus} {gpu.name}"
    for count in gpu_counts(gpu, max_gpus, gpus_per_node):
        sc = replace(base, cluster=Cluster.of(gpu, count, gpus_per_node, usd_per_gpu_hour, base.cluster.p2p))
        options, closest = [], None
        for layout in enumerate_layouts(sc.model, sc.cluster, allow_cross_node_tp=sc.allow_cross_node_tp):
            problem, plan = infeasibility(sc, layout, sc.resolve(knobs))
            if problem:
                continue
            seqs_grid = [knobs.max_num_seqs] if knobs.max_num_seqs else \
                sorted({*SEQ_GRID, sc.resolve(knobs).max_num_seqs})
            for seqs in seqs_grid:
                k = replace(knobs, max_num_seqs=seqs)
                cap = estimate_capacity(sc, layout, k, load, slo)
                if cap.rate >= rate:
                    options.append((cap, layout, k))
                elif closest is None or cap.rate > closest[0].rate:
                    closest = (cap, layout, k)
        if not options:
            why = f"{count} {gpu.name}: no configuration's steady-state capacity reaches {rate:g} req/s" + (
                f" (the closest, {closest[1].label()} at max_num_seqs {closest[2].max_num_seqs}: "
                f"{closest[0].rate:.3g} req/s, {closest[0].describe()})" if closest else "")
            continue
        options.sort(key=lambda o: o[0].rate, reverse=True)
        for cap, layout, k in options[:VERIFY_TRIES]:
            p = predict(open_loop(sc, rate, steady_requests(rate, load.mean_output * cap.tpot_s)), layout, k)
            miss = slo.miss_under_load(p)
            if miss is None:
                return Sizing(gpu.name, count, p, why, usd_per_gpu_hour, need)
            why = f"{count} {gpu.name}: {layout.label()} (max_num_seqs {k.max_num_seqs}) at {rate:g} req/s: {miss}"
    return Sizing(gpu.name, None, None, why, usd_per_gpu_hour, need)
