"""The simulator as a backend: the same events as a real trial (metrics, the KV and queue series of every DP
engine, the modelled memory of each GPU), optionally replayed at `pace` times real time."""

from __future__ import annotations

import socket
import time
from typing import Iterator

from autotune.deploy import serve_commands
from autotune.sim.predict import Scenario, predict
from autotune.spec.trial import TrialResult, TrialSpec
from autotune.trials.backend import Event, StudyContext

REPLAY_TICK_S = 0.5     # wall seconds between two batches of replayed samples


class SimBackend:
    name = "sim"

    def __init__(self) -> None:
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True

    def run(self, spec: TrialSpec, ctx: StudyContext) -> Iterator[Event]:
        scenario = Scenario(ctx.model, ctx.cluster, ctx.workload, ctx.calibration)
        pred = predict(scenario, spec.layout, spec.knobs)
        commands = tuple(serve_commands(ctx.model, ctx.cluster, spec.layout, pred.knobs))
        yield Event("log", f"simulating {spec.layout.label()} {pred.knobs.to_dict()}")
        if not pred.feasible:
            yield Event("log", f"infeasible: {pred.reason}")
            yield Event("result", TrialResult(spec.number, False, pred.reason, serve_commands=commands))
            return
        start = time.time()
        rows = sorted(((t, engine, kv, running, waiting, pre) for engine, series in enumerate(pred.engine_series)
                       for t, kv, running, waiting, pre in series), key=lambda r: r[0])
        memory = pred.memory
        used = memory.weight_bytes + memory.activation_bytes + memory.overhead_bytes + memory.kv_cache_bytes
        node_of = {g: f"{socket.gethostname()}-sim{g // ctx.cluster.gpus_per_node}" for g in spec.gpu_ids}
        roof = pred.get("roofline_frac") or 0.0
        sent, sim_clock = 0, 0.0
        makespan = pred.get("makespan_s")
        while sent < len(rows):
            if self._stopped:
                yield Event("result", TrialResult(spec.number, False, "interrupted"))
                return
            if ctx.pace > 0:
                time.sleep(REPLAY_TICK_S)
                sim_clock = min(makespan, (time.time() - start) * ctx.pace)
            else:
                sim_clock = makespan
            batch = []
            while sent < len(rows) and rows[sent][0] <= sim_clock:
                t, engine, kv, running, waiting, pre = rows[sent]
                batch.append({"number": spec.number, "engine": engine, "t": t, "wall": start + t / (ctx.pace or 1e12),
                              "kv_frac": kv, "running": running, "waiting": waiting, "preemptions": pre})
                sent += 1
            if batch:
                yield Event("series", batch)
            # vLLM allocates the whole KV cache at start-up: the memory a GPU shows is flat for the trial.
            yield Event("gpu", [{"number": spec.number, "node": node_of[g], "gpu": g % ctx.cluster.gpus_per_node,
                                 "wall": time.time(), "mem_used_bytes": used, "mem_total_bytes": memory.gpu_bytes,
                                 "util": roof, "power_w": None} for g in spec.gpu_ids])
        yield Event("log", f"done: {pred.get('output_tok_s'):,.0f} output tok/s, {pred.get('preemptions')} preemptions")
        yield Event("result", TrialResult(spec.number, True, "", pred.to_json(), serve_commands=commands))
