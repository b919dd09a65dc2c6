"""Simulator speed on one core: one 2,000-request prediction (target < 20 ms, also in the capacity trap; a MoE
model's 64 DP engines, which step together, and a closed loop over DP engines, whose runs stop at each other's
completions, take longer and are printed beside),
`recommend` over the whole layout space (DeepSeek-R1 on 64 H200 under 2 s; Qwen3-32B on 8 H100 and DeepSeek-R1 on
16 H200 under 1 s), `recommend --goal goodput`, and `size` for DeepSeek-R1 up to 64 H200 (target < 5 s).

    python bench/sim_speed.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from autotune.sim.predict import Scenario, predict
from autotune.sim.recommend import recommend
from autotune.sim.size import size
from autotune.sim.slo import Slo
from autotune.spec.hardware import Cluster, load_gpu
from autotune.spec.layout import EngineKnobs, Layout
from autotune.spec.models import load_model
from autotune.spec.workload import PRESETS


def _scenario(model: str, gpu: str, gpus: int, **load) -> Scenario:
    return Scenario(load_model(model), Cluster.of(load_gpu(gpu), gpus), PRESETS["natural-reasoning"].with_(**load))


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
    for model, gpu, gpus, layout, seqs, what, load in (
            ("Llama-3.1-8B", "H200", 8, Layout(dp=8), None, "typical: every request admitted at once", {}),
            ("DeepSeek-R1-Distill-Qwen-32B", "H200", 8, Layout(dp=2, tp=4), 256, "admission-bound, no preemption",
             {}),
            ("DeepSeek-R1-Distill-Qwen-32B", "H200", 8, Layout(tp=8), None, "capacity trap: thousands of preemptions",
             {}),
            ("DeepSeek-R1", "H200", 64, Layout(dp=64), 256, "a MoE model's 64 DP engines stepping together", {}),
            ("Llama-3.1-8B", "H200", 8, Layout(dp=8), 256, "a closed loop of 512 clients over 8 DP engines",
             {"mode": "concurrency", "concurrency": 512}),
    ):
        sc = _scenario(model, gpu, gpus, **load)
        requests = sc.workload.sample()
        dt, p = _time(lambda: predict(sc, layout, EngineKnobs(max_num_seqs=seqs), requests), args.repeat)
        print(f"  {model} {layout.label()} seqs {p.knobs.max_num_seqs}: {dt * 1e3:7.1f} ms "
              f"({p.get('preemptions'):,} preemptions; {what})")
    print("\nrecommend over the whole space (median wall time):")
    for model, gpu, gpus in (("DeepSeek-R1", "H200", 64), ("Qwen3-32B", "H100-SXM", 8), ("DeepSeek-R1", "H200", 16),
                             ("Llama-3.1-70B", "H100-SXM", 8)):
        sc = _scenario(model, gpu, gpus)
        dt, rec = _time(lambda: recommend(sc), max(1, args.repeat // 2))
        print(f"  {model} on {gpus} {gpu}: {dt:5.2f} s for {len(rec.evaluated)} simulations of "
              f"{len({p.layout for p in rec.evaluated})} feasible layouts ({len(rec.infeasible)} infeasible checked); "
              f"winner {rec.winner.layout.label()} at max_num_seqs {rec.winner.knobs.max_num_seqs}")
    slo = Slo(tpot_p99_s=0.05, ttft_p99_s=10)
    print(f"\nrecommend --goal goodput ({slo.describe()}), median wall time:")
    for model, gpu, gpus in (("Qwen3-32B", "H100-SXM", 8), ("DeepSeek-R1", "H200", 16)):
        sc = _scenario(model, gpu, gpus)
        dt, rec = _time(lambda: recommend(sc, slo, goal="goodput"), max(1, args.repeat // 2))
        g = rec.goodput_of(rec.winner)
        print(f"  {model} on {gpus} {gpu}: {dt:5.2f} s, {len(rec.goodputs)} goodput searches; winner "
              f"{rec.winner.layout.label()} at max_num_seqs {rec.winner.knobs.max_num_seqs}: {g.rate:.3g} req/s")
    print(f"\nsize ({slo.describe()}), median wall time:")
    for model, gpu, rate in (("DeepSeek-R1", "H200", 5.0), ("DeepSeek-R1", "H200", 20.0), ("Llama-3.1-70B", "H100-SXM", 2.0)):
        spec = load_gpu(gpu)
        sc = _scenario(model, gpu, 1)
        dt, answer = _time(lambda: size(sc, spec, rate, slo, 64, sc.cluster.usd_per_gpu_hour), max(1, args.repeat // 2))
        found = (f"{answer.gpus} GPUs, {answer.prediction.layout.label()} at max_num_seqs "
                 f"{answer.prediction.knobs.max_num_seqs}" if answer.gpus else f"none: {answer.reason}")
        print(f"  {model} at {rate:g} req/s on up to 64 {gpu}: {dt:5.2f} s; {found}")


if __name__ == "__main__":
    main()
