"""The cost of one dashboard refresh on a big study: 500 trials and an hour of telemetry from 64 GPUs at 1 Hz.
Prints the CPU time of the reader's snapshot (the worker's side), of the panels' update (the UI side) and the
resident memory. Targets: under 50 ms per refresh, under 200 MB.

    python bench/tui_refresh.py [--trials 500] [--gpus 64] [--seconds 3600]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import tempfile
import time
from pathlib import Path

from store.reader import StudyReader
from store.writer import StudyWriter
from tui.app import AutotuneApp


def build(study: Path, trials: int, gpus: int, seconds: int) -> None:
    w = StudyWriter(study)
    w.write_header({"name": "bench", "backend": "vllm", "model": "DeepSeek-R1", "cluster": f"{gpus // 8} x 8 H200",
                    "status": "running", "budget_trials": trials + 20, "started_at": time.time() - seconds,
                    "objectives": [{"metric": "output_tok_s_per_gpu", "direction": "maximize"}]})
    for n in range(trials):
        state = "RUNNING" if n >= trials - 4 else ("FAIL" if n % 9 == 0 else "COMPLETE")
        w.add("trials", {"number": n, "state": state, "label": "DP2xTP4", "dp": 2, "tp": 4, "pp": 1, "ep": 1,
                         "max_num_seqs": 256, "max_num_batched_tokens": 8192, "gpus": 8, "feasible_slo": n % 3 > 0,
                         "reason": "startup OOM" if state == "FAIL" else None})
        if state == "COMPLETE":
            w.add("trial_metrics", {"number": n, "source": "backend", "output_tok_s": 8000.0 + n,
                                    "output_tok_s_per_gpu": 1000.0 + (n * 37) % 400, "tpot_p99_s": 0.02 + n % 50 / 1e3,
                                    "ttft_p99_s": 1.0, "e2e_p99_s": 100.0 + n % 70, "preemptions": n % 5})
        if n % 50 == 49:
            w.flush()
    t0 = time.time() - seconds
    for second in range(seconds):
        w.add_many("gpu_samples", [{"number": trials - 1, "node": f"node{g // 8}", "gpu": g % 8, "wall": t0 + second,
                                    "mem_used_bytes": 1.2e11, "mem_total_bytes": 1.5e11, "util": 0.9,
                                    "power_w": 650.0} for g in range(gpus)])
        for n in range(trials - 4, trials):
            w.add_many("trial_series", [{"number": n, "engine": e, "t": float(second), "wall": t0 + second,
                                         "kv_frac": 0.8, "running": 200, "waiting": 10, "preemptions": 3}
                                        for e in range(2)])
        if second % 300 == 299:
            w.flush()
    w.close()


async def measure_ui(study: Path, rounds: int) -> list[float]:
    app = AutotuneApp(study, interval=3600)
    times = []
    async with app.run_test(size=(160, 48)) as pilot:
        while app.snapshot is None:
            await pilot.pause(0.05)
        for _ in range(rounds):
            t = time.process_time()
            app.refresh_views()
            await pilot.pause()
            times.append(time.process_time() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=500)
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--seconds", type=int, default=3600)
    ap.add_argument("--rounds", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        study = Path(d)
        t = time.time()
        build(study, args.trials, args.gpus, args.seconds)
        rows = args.gpus * args.seconds
        print(f"study: {args.trials} trials, {rows:,} GPU samples, {8 * args.seconds:,} series rows "
              f"(built in {time.time() - t:.0f} s)")
        reader = StudyReader(study)
        snap_cpu, snap_wall = [], []
        for _ in range(args.rounds):
            c, w = time.process_time(), time.perf_counter()
            reader.snapshot()
            snap_cpu.append(time.process_time() - c)
            snap_wall.append(time.perf_counter() - w)
        ui = asyncio.run(measure_ui(study, args.rounds))
    print(f"snapshot (worker thread): median CPU {statistics.median(snap_cpu) * 1e3:.1f} ms, "
          f"wall {statistics.median(snap_wall) * 1e3:.1f} ms")
    print(f"panels update (UI thread): median CPU {statistics.median(ui) * 1e3:.1f} ms")
    print(f"one refresh: {(statistics.median(snap_cpu) + statistics.median(ui)) * 1e3:.1f} ms CPU (target < 50 ms)")
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
          f"(target < 200 MB)")


if __name__ == "__main__":
    main()
