"""How many trials the tuner needs to reach a layout within 5% of the best, against grid search (what vLLM's
sweeps do: the grid in a fixed order) and random search. The simulator is the true world, each measurement
carries +-5% noise; the median over seeds. Target: at most a third of grid's trials.

    python bench/search_efficiency.py [--seeds 10] [--requests 500]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from autotune.search.space import load_space
from autotune.search.tuner import Tuner, layout_key, point_key
from autotune.sim.calibration import DEFAULT, Calibration
from autotune.sim.predict import predict
from autotune.spec.trial import TrialResult

PAIRS = (("DeepSeek-R1-Distill-Qwen-32B", "H200", 60), ("DeepSeek-R1-Distill-Llama-8B", "H200", 40),
         ("Llama-3.1-70B", "H100-SXM", 150), ("DeepSeek-R1", "H200", 250), ("Qwen3-30B-A3B", "H100-SXM", 40))

SPACE = """\
name: bench
cluster: {{gpu: {gpu}, nodes: 1, gpus_per_node: 8}}
model: {model}
workload: {{preset: natural-reasoning, num_requests: {requests}}}
dimensions:
  layout: auto
  max_num_seqs: [32, 64, 128, 256, 512, 1024]
  max_num_batched_tokens: [4096, 8192, 16384]
objectives: [{{metric: output_tok_s_per_gpu}}]
constraints: {{tpot_p99_ms: {slo}}}
budget: {{trials: 1000, parallel: 1}}
seed: {seed}
"""


# A world the simulator is not calibrated to: slower HBM, costlier collectives and scheduling, weaker TP scaling.
MISCALIBRATED = Calibration(DEFAULT.with_overrides({"hbm": 0.65, "kv_read": 0.8, "allreduce_latency_s": 35e-6,
                                                    "step_overhead_s": 2e-3, "kernel_floor_s": 3e-6,
                                                    "p2p_latency_s": 300e-6}, "bench"))


def truth(space, calibration: Calibration | None) -> dict[str, float]:
    """The noise-free value of every grid point in the world; 0 for infeasible or SLO-violating points."""
    values = {}
    scenario = replace(space.scenario, calibration=calibration) if calibration else space.scenario
    requests = scenario.workload.sample()
    for layout, knobs in space.candidates():
        p = predict(scenario, layout, knobs, requests)
        ok = p.feasible and all(v <= 0 for v in space.slo_violation(p.metrics).values())
        key = point_key({"layout": layout_key(layout), **{k: getattr(knobs, k) for k in space.knob_grid}})
        values[key] = p.get("output_tok_s_per_gpu") if ok else 0.0
    return values


def trials_to_target(order: list[str], values: dict[str, float], target: float) -> int:
    for i, key in enumerate(order, 1):
        if values[key] >= target:
            return i
    return len(order)


def tuner_run(space, values, target, seed: int, warm: bool, cap: int) -> int:
    rng = np.random.default_rng(seed)
    tuner = Tuner(space, None)
    if warm:
        tuner.warm_start(5)
    for i in range(1, cap + 1):
        asked = tuner.ask(i)
        if asked is None:
            return cap
        trial, spec = asked
        key = point_key({"layout": layout_key(spec.layout), **{k: getattr(spec.knobs, k) for k in space.knob_grid}})
        if values[key] >= target:
            return i
        if values[key] == 0.0:
            result = TrialResult(i, False, "infeasible or violates the SLO")
        else:
            noisy = values[key] * (1 + rng.uniform(-0.05, 0.05))
            result = TrialResult(i, True, metrics={"output_tok_s_per_gpu": noisy, "tpot_p99_s": 0.0})
        tuner.tell(trial, result)
    return cap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--requests", type=int, default=500)
    args = ap.parse_args()
    for world, calibration in (("the simulator's own world", None), ("a mis-calibrated world", MISCALIBRATED)):
        print(f"\n{world}: median trials to within 5% of the best ({args.seeds} seeds)")
        print(f"{'model / cluster':38s} {'points':>6s} {'grid':>5s} {'random':>7s} {'TPE':>5s} {'TPE+warm':>8s}")
        ratios = []
        for model, gpu, slo in PAIRS:
            t0 = time.time()
            with tempfile.TemporaryDirectory() as d:
                f = Path(d) / "space.yaml"
                f.write_text(SPACE.format(model=model, gpu=gpu, requests=args.requests, slo=slo, seed=0))
                space = load_space(f)
                values = truth(space, calibration)
                target = 0.95 * max(values.values())
                grid = trials_to_target(list(values), values, target)
                rand, tpe, warm = [], [], []
                for seed in range(args.seeds):
                    rng = np.random.default_rng(seed)
                    rand.append(trials_to_target(list(rng.permutation(list(values))), values, target))
                    f.write_text(SPACE.format(model=model, gpu=gpu, requests=args.requests, slo=slo, seed=seed))
                    seeded = load_space(f)
                    tpe.append(tuner_run(seeded, values, target, seed, warm=False, cap=len(values)))
                    warm.append(tuner_run(seeded, values, target, seed, warm=True, cap=len(values)))
            med = [statistics.median(x) for x in (rand, tpe, warm)]
            ratios.append(med[2] / grid)
            print(f"{model + ' / 8 ' + gpu:38s} {len(values):6d} {grid:5d} {med[0]:7.1f} {med[1]:5.1f} "
                  f"{med[2]:8.1f}  ({time.time() - t0:.0f} s)")
        print(f"TPE+warm start over grid, median across pairs: {statistics.median(ratios):.2f} (target <= 0.33)")


if __name__ == "__main__":
    main()
