"""A small deterministic study written straight into a real store, for the dashboard's tests."""

from __future__ import annotations

from pathlib import Path

from store.writer import StudyWriter

LAYOUTS = [("DP8", 8, 1, 1), ("DP4xTP2", 4, 2, 1), ("DP2xTP4", 2, 4, 1), ("TP8", 1, 8, 1), ("TP4xPP2", 1, 4, 2)]


def trial_row(n: int, state: str, **extra) -> dict:
    label, dp, tp, pp = LAYOUTS[n % len(LAYOUTS)]
    return {"number": n, "state": state, "label": label, "dp": dp, "tp": tp, "pp": pp, "ep": 1,
            "max_num_seqs": 64 << (n % 4), "max_num_batched_tokens": 8192, "gpu_memory_utilization": 0.9,
            "kv_cache_dtype": "auto", "enable_chunked_prefill": True, "gpus": 8, "origin": "sampler",
            "started_at": 1000.0 + n, **extra}


def add_trial(w: StudyWriter, n: int, study_dir: Path) -> None:
    """Trial n: a failure every 7th, an SLO violator every 3rd, the rest completes with its series."""
    log = study_dir / "logs" / f"trial-{n}.log"
    log.parent.mkdir(exist_ok=True)
    log.write_text(f"12:00:00 simulating trial {n}\n12:00:01 done\n")
    if n % 7 == 6:
        w.add("trials", trial_row(n, "FAIL", reason="does not fit: 189.0 GiB of weights", log_path=str(log)))
        return
    tok = 600.0 + 97.0 * ((n * 37) % 11)
    tpot = 0.02 + 0.011 * ((n * 53) % 9)
    w.add("trials", trial_row(n, "COMPLETE", feasible_slo=n % 3 != 2, finished_at=1010.0 + n, log_path=str(log),
                              serve_command=f"vllm serve org/model --tensor-parallel-size {trial_row(n, '')['tp']}"))
    w.add("trial_metrics", {"number": n, "source": "backend", "output_tok_s": tok * 8, "output_tok_s_per_gpu": tok,
                            "tpot_p50_s": tpot * 0.8, "tpot_p99_s": tpot, "ttft_p99_s": 1.5 + n, "e2e_p99_s": 300 + 7 * n,
                            "preemptions": 40 * n if n % 2 else 0, "kv_peak_frac": 0.9, "bottleneck": "HBM bandwidth"})
    dp = trial_row(n, "")["dp"]
    w.add_many("trial_series", [{"number": n, "engine": e, "t": float(t), "kv_frac": min(1.0, t / 20 + e / 50),
                                 "running": 100 - t, "waiting": max(0, 50 - 3 * t),
                                 "preemptions": t * 2 if n % 2 else 0} for e in range(min(dp, 2)) for t in range(25)])


def build(study_dir: Path, trials: int = 12) -> StudyWriter:
    w = StudyWriter(study_dir, flush_s=0.1)
    w.write_header({"name": "fixture-study", "backend": "sim", "model": "DeepSeek-R1-Distill-Qwen-32B",
                    "cluster": "1 x 8 H200", "status": "finished", "budget_trials": 20, "started_at": 1000.0,
                    "finished_at": 1754.0,
                    "objectives": [{"metric": "output_tok_s_per_gpu", "direction": "maximize"}]})
    for n in range(trials):
        add_trial(w, n, study_dir)
    w.add_many("gpu_samples", [{"number": 11, "node": "node-a", "gpu": g, "wall": 1750.0,
                                "mem_used_bytes": (100 + g) * 2**30, "mem_total_bytes": 140 * 2**30, "util": 0.5,
                                "power_w": 600.0} for g in range(8)])
    w.flush()
    return w
