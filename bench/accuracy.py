"""Prediction error against the comparable rows of ../shared/ground_truth.csv (published vLLM measurements).

Rows measured with TensorRT-LLM or SGLang, with unstated input/output lengths, or on engines older than vLLM v1's
scheduler are not comparable: they are listed as skipped with the reason. TensorRT-LLM offline rows are shown as
hardware upper bounds (the prediction for vLLM should stay below them).

    python bench/accuracy.py [--csv PATH] [--calibration FILE] [--fit OUT.yaml]
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from autotune.sim.calibration import Calibration
from autotune.sim.predict import Scenario, predict
from autotune.spec.hardware import Cluster, load_gpu
from autotune.spec.layout import EngineKnobs, Layout
from autotune.spec.models import load_model
from autotune.spec.workload import LengthDist, Workload

MIN_FIT_ROWS = 3
DEFAULT_CSV = Path(__file__).resolve().parents[1] / ".." / "shared" / "ground_truth.csv"


@dataclass(frozen=True)
class Case:
    """How to replay one CSV row: the row is found by its source substring, model, gpu and concurrency columns."""

    source: str
    model_col: str
    gpu_col: str
    concurrency_col: str
    metric_col: str                  # output_tok_s | total_tok_s | tpot_ms
    model: str
    gpu: str
    layout: Layout
    isl: int
    osl: int
    requests: int
    concurrency: int = 0             # 0 = the whole batch at once
    max_num_seqs: int | None = None
    kv_cache_dtype: str = "auto"
    from_notes: str = ""             # a regex reading the measurement from the notes column instead
    note: str = ""

    def predict(self, cal: Calibration) -> float:
        mode = "concurrency" if self.concurrency else "batch"
        w = Workload(self.source, LengthDist("fixed", value=self.isl), LengthDist("fixed", value=self.osl),
                     mode=mode, num_requests=self.requests, concurrency=self.concurrency)
        sc = Scenario(load_model(self.model), Cluster.of(load_gpu(self.gpu), self.layout.world_size), w, cal)
        p = predict(sc, self.layout, EngineKnobs(max_num_seqs=self.max_num_seqs, kv_cache_dtype=self.kv_cache_dtype))
        if not p.feasible:
            raise RuntimeError(f"{self.model} {self.layout.label()}: {p.reason}")
        return {"output_tok_s": p.get("output_tok_s"), "total_tok_s": p.get("total_tok_s"),
                "tpot_ms": p.get("tpot_p50_s") * 1e3}[self.metric_col]


CASES = [
    Case("amd.com", "Llama-3.1-70B-Instruct-FP8-KV", "MI300X", "3200 prompts; max-num-seqs 3200", "total_tok_s",
         "Llama-3.1-70B-FP8", "MI300X", Layout(tp=8), 128, 2048, 3200, max_num_seqs=3200, kv_cache_dtype="fp8",
         note="vLLM 0.10.2; AMD's 'throughput' read as total tokens/s"),
    Case("amd.com", "Llama-3.1-70B-Instruct-FP8-KV", "MI300X", "1500 prompts; max-num-seqs 1500", "total_tok_s",
         "Llama-3.1-70B-FP8", "MI300X", Layout(tp=8), 2048, 2048, 1500, max_num_seqs=1500, kv_cache_dtype="fp8",
         note="vLLM 0.10.2"),
    Case("amd.com", "Llama-3.1-405B-Instruct-FP8-KV", "MI300X", "1500 prompts; max-num-seqs 1500", "total_tok_s",
         "Llama-3.1-405B-FP8", "MI300X", Layout(tp=8), 128, 2048, 1500, max_num_seqs=1500, kv_cache_dtype="fp8",
         note="vLLM 0.10.2"),
    Case("oracle.com", "Llama-3.1-405B FP8", "MI300X", "offline (benchmark_throughput.py)", "output_tok_s",
         "Llama-3.1-405B-FP8", "MI300X", Layout(tp=8), 128, 2048, 1000, max_num_seqs=256,
         note="benchmark_throughput.py; prompt count not stated (1,000 assumed), vLLM default 256 sequences"),
    Case("oracle.com", "Llama-3.1-405B FP8", "MI300X", "batch 256 (benchmark_latency.py)", "output_tok_s",
         "Llama-3.1-405B-FP8", "MI300X", Layout(tp=8), 128, 128, 256, max_num_seqs=256,
         note="one batch of 256 through benchmark_latency"),
    Case("johnmusgrave.com", "Llama-3.1-8B-Instruct BF16", "A100 40GB", "1", "output_tok_s",
         "Llama-3.1-8B", "A100-40GB", Layout(), 1024, 128, 20, concurrency=1, note="single stream"),
    Case("yobitelcomm", "Llama-3.1-8B-Instruct fp16", "H100 80GB HBM3", "16", "tpot_ms",
         "Llama-3.1-8B", "H100-SXM", Layout(), 256, 256, 20, concurrency=1, from_notes=r"conc=1: .*?TPOT ([\d.]+)",
         note="the concurrency-1 TPOT in the notes column: a single stream depends little on the unknown lengths"),
]

SKIPPED = {
    "TensorRT-LLM": "TensorRT-LLM, not vLLM (upper bound only)",
    "lambdalabsml": "vLLM v0.5/v0.6 engine, input/output lengths not stated",
    "lmsys.org": "SGLang, prefill/decode disaggregated",
    "aiposthub": "production statistics, layout and lengths not comparable",
    "wide-ep": "layout and lengths not captured",
    "gb200": "GB200 not modelled, disaggregated",
    "gpustack": "ShareGPT lengths and concurrency not captured",
    "redhat": "MLPerf data set lengths not restated",
    "techcommunity": "TensorRT-LLM MLPerf submission",
}


def _find(rows: list[dict], case: Case) -> dict:
    for row in rows:
        if (case.source in row["source"].lower() and row["model"] == case.model_col and row["gpu"] == case.gpu_col
                and row["concurrency"] == case.concurrency_col):
            return row
    raise SystemExit(f"no row in the CSV for {case.source} {case.model_col} {case.concurrency_col}")


def _measured(row: dict, case: Case) -> float:
    if case.from_notes:
        return float(re.search(case.from_notes, row["notes"]).group(1))
    return float(row[case.metric_col].replace(",", ""))


def fit(rows: list[dict], base: Calibration) -> Calibration:
    """Per GPU type with at least MIN_FIT_ROWS rows, the (hbm, kv_read) pair that minimises the median
    |log(predicted / measured)| on its rows; fewer rows would fit noise."""
    per_gpu = dict(base.per_gpu)
    for gpu in sorted({c.gpu for c in CASES}):
        cases = [(c, _measured(_find(rows, c), c)) for c in CASES if c.gpu == gpu]
        if len(cases) < MIN_FIT_ROWS:
            print(f"not fitted {gpu}: {len(cases)} row(s)")
            continue
        best = None
        for hbm in [x / 100 for x in range(30, 95, 5)]:
            for kv in [x / 10 for x in range(2, 11)]:
                eff = base.for_gpu(gpu).with_overrides({"hbm": hbm, "kv_read": kv}, "fit")
                cal = Calibration(base.base, tuple({**per_gpu, gpu: eff}.items()))
                err = statistics.median(abs(math.log(c.predict(cal) / m)) for c, m in cases)
                if best is None or err < best[0]:
                    best = (err, eff)
        per_gpu[gpu] = best[1]
        print(f"fitted {gpu}: hbm {best[1].hbm:.2f}, kv_read {best[1].kv_read:.1f} over {len(cases)} rows "
              f"(median |log error| {best[0]:.3f})")
    return Calibration(base.base, tuple(per_gpu.items()), "fitted by bench/accuracy.py")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", default=str(DEFAULT_CSV))
    ap.add_argument("--calibration", default=None)
    ap.add_argument("--fit", metavar="OUT", help="fit hbm and kv_read per GPU type, write them to OUT, report with them")
    args = ap.parse_args()
    rows = list(csv.DictReader(open(args.csv, newline="")))
    cal = Calibration.load(args.calibration)
    if args.fit:
        cal = fit(rows, cal)
        cal.save(args.fit)
        print(f"wrote {args.fit}\n")
    errors = []
    print(f"{'row':62s} {'metric':12s} {'measured':>10s} {'predicted':>10s} {'error':>7s}")
    for case in CASES:
        row = _find(rows, case)
        measured = _measured(row, case)
        predicted = case.predict(cal)
        err = predicted / measured - 1
        errors.append(abs(err))
        label = f"{case.model} {case.gpu} {case.layout.label()} {case.isl}/{case.osl} x{case.requests}" + (
            f" c{case.concurrency}" if case.concurrency else "")
        print(f"{label:62s} {case.metric_col:12s} {measured:10,.1f} {predicted:10,.1f} {err:+7.1%}   {case.note}")
    print(f"\nmedian absolute error over {len(errors)} comparable rows: {statistics.median(errors):.1%} "
          f"(mean {statistics.mean(errors):.1%}, max {max(errors):.1%})")
    print("\nupper bounds (TensorRT-LLM offline, FP8): the vLLM prediction should stay below")
    for row in rows:
        if "TensorRT-LLM/blob/main" in row["source"] and row["output_tok_s"] and row["isl"] and row["osl"]:
            model = {"Llama-3.1-8B-Instruct FP8": "Llama-3.1-8B-FP8", "Llama-3.3-70B-Instruct FP8": "Llama-3.1-70B-FP8",
                     "Llama-3.1-405B-Instruct FP8": "Llama-3.1-405B-FP8"}.get(row["model"])
            if not model:
                continue
            case = Case("", "", "", "", "output_tok_s", model, row["gpu"].replace(" SXM", ""),
                        Layout(tp=int(row["tp"])), int(row["isl"]), int(row["osl"]), 2000)
            pred = case.predict(cal)
            bound = float(row["output_tok_s"])
            print(f"  {model:20s} {row['gpu']:9s} TP{row['tp']} {row['isl']}/{row['osl']}: vLLM predicted "
                  f"{pred:9,.0f} vs TensorRT-LLM {bound:9,.0f} ({pred / bound:.0%})")
    print("\nskipped rows:")
    for row in rows:
        src = row["source"].lower()
        reason = next((r for key, r in SKIPPED.items() if key.lower() in src or key.lower() in row["notes"].lower()),
                      None)
        if reason and "TensorRT-LLM/blob/main" not in row["source"]:
            print(f"  {row['model']} {row['gpu']}: {reason}")


if __name__ == "__main__":
    main()
