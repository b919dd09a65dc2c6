"""Simulator speed on one core: one 2,000-request prediction (target < 20 ms) and `recommend` over the whole
layout space (target < 2 s) for DeepSeek-R1 on 64 H200 and Llama-3.1-70B on 8 H100.

    python bench/sim_speed.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from autotune.sim.predict import Scenario, predict
from autotune.sim.recommend import recommend
from autotune.spec.hardware import Cluster, load_gpu
from autotune.spec.layout import EngineKnobs, Layout
from autotune.spec.models import load_model
from autotune.spec.workload import PRESETS


def _scenario(model: str, gpu: str, gpus: int) -> Scenario:
    return Scenario(load_model(model), Cluster.of(load_gpu(gpu), gpus), PRESETS["natural-reasoning"])


def _time(fn, repeat: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})   # one core, as the target says
    print(f"cores used: {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else 'all'}")
    print("\none 2,000-request natural-reasoning prediction (median wall time):")
    for model, gpu, gpus, layout, seqs, what in (
            ("Llama-3.1-8B", "H200", 8, Layout(dp=8), None, "typical: every request admitted at once"),
            ("DeepSeek-R1-Distill-Qwen-32B", "H200", 8, Layout(dp=2, tp=4), 256, "admission-bound, no preemption"),
            ("DeepSeek-R1-Distill-Qwen-32B", "H200", 8, Layout(tp=8), None, "capacity trap: thousands of preemptions"),
    ):
        sc = _scenario(model, gpu, gpus)
        requests = sc.workload.sample()
        dt, p = _time(lambda: predict(sc, layout, EngineKnobs(max_num_seqs=seqs), requests), args.repeat)
        print(f"  {model} {layout.label()} seqs {p.knobs.max_num_seqs}: {dt * 1e3:7.1f} ms "
              f"({p.get('preemptions'):,} preemptions; {what})")
    print("\nrecommend over the whole space (median wall time):")
    for model, gpu, gpus in (("DeepSeek-R1", "H200", 64), ("Llama-3.1-70B", "H100-SXM", 8)):
        sc = _scenario(model, gpu, gpus)
        dt, rec = _time(lambda: recommend(sc), max(1, args.repeat // 2))
        print(f"  {model} on {gpus} {gpu}: {dt:5.2f} s for {len(rec.evaluated)} simulations of "
              f"{len({p.layout for p in rec.evaluated})} feasible layouts ({len(rec.infeasible)} infeasible checked); "
              f"winner {rec.winner.layout.label()} at max_num_seqs {rec.winner.knobs.max_num_seqs}")


if __name__ == "__main__":
    main()
