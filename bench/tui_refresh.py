"""The cost of one dashboard refresh on a big study: 500 trials and an hour of telemetry from 64 GPUs at 1 Hz.
Prints the CPU time of the reader's snapshot (the worker's side), of the panels' update (the UI side) and the
resident memory. Targets: under 50 ms per refresh, under 200 MB.

    python bench/tui_refresh.py [--trials 500] [--gpus 64] [--seconds 3600]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import resource
import statistics
import tempfile
import time
from pathlib import Path

from store.follow import StudyFollower
from store.writer import StudyWriter
from tui.app import AutotuneApp


def build(study: Path, trials: int, gpus: int, seconds: int) -> StudyWriter:
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
    for second in range(seconds):
        add_second(w, trials, gpus, second, time.time() - seconds)
        if second % 300 == 299:
            w.flush()
    w.flush()
    return w


def _build_and_close(study: Path, trials: int, gpus: int, seconds: int) -> None:
    build(study, trials, gpus, seconds).close()


def add_second(w: StudyWriter, trials: int, gpus: int, second: int, t0: float) -> None:
    """One second of telemetry: every GPU, and every DP engine of the four running trials."""
    w.add_many("gpu_samples", [{"number": trials - 1, "node": f"node{g // 8}", "gpu": g % 8, "wall": t0 + second,
                                "mem_used_bytes": 1.2e11, "mem_total_bytes": 1.5e11, "util": 0.9,
                                "power_w": 650.0} for g in range(gpus)])
    for n in range(trials - 4, trials):
        w.add_many("trial_series", [{"number": n, "engine": e, "t": float(second), "wall": t0 + second,
                                     "kv_frac": 0.5 + (second % 50) / 100, "running": 200, "waiting": 10,
                                     "preemptions": 3} for e in range(2)])


async def measure(study: Path, w: StudyWriter, args) -> tuple[list[float], list[float], float]:
    """Each round: one more second of telemetry lands, then one refresh (the worker's read, the panels' update)."""
    follower = StudyFollower(study)
    first = time.process_time()
    snap = follower.refresh()
    first = time.process_time() - first
    app = AutotuneApp(study, interval=3600)
    reads, updates = [], []
    t0 = time.time() - args.seconds
    async with app.run_test(size=(160, 48)) as pilot:
        for i in range(args.rounds):
            add_second(w, args.trials, args.gpus, args.seconds + i, t0)
            w.flush()
            t = time.process_time()
            snap = follower.refresh()
            reads.append(time.process_time() - t)
            t = time.process_time()
            app.snapshot = snap
            app.refresh_views()
            await pilot.pause()
            updates.append(time.process_time() - t)
    return reads, updates, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=500)
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--seconds", type=int, default=3600)
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        study = Path(d)
        t = time.time()
        # Built in another process, as a runner would write it: the resident memory below is the dashboard's.
        builder = multiprocessing.Process(target=_build_and_close, args=(study, args.trials, args.gpus, args.seconds))
        builder.start()
        builder.join()
        print(f"study: {args.trials} trials, {args.gpus * args.seconds:,} GPU samples, "
              f"{8 * args.seconds:,} series rows (built in {time.time() - t:.0f} s)")
        w = StudyWriter(study)
        reads, updates, first = asyncio.run(measure(study, w, args))
        w.close()
    read, update = statistics.median(reads), statistics.median(updates)
    print(f"first load (every segment): {first * 1e3:.0f} ms CPU")
    print(f"per refresh, median of {args.rounds}: read {read * 1e3:.1f} ms + panels {update * 1e3:.1f} ms "
          f"= {(read + update) * 1e3:.1f} ms CPU (target < 50 ms)")
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
          f"(target < 200 MB)")


if __name__ == "__main__":
    main()
