"""The validation set: public real-vLLM measurements (bench/validation/rows_*.csv) and the shared sim-to-real training
runs (../shared/validation/simreal_train.csv), each turned into a `Run` that replays through the same code path as
`autotune predict` (Scenario -> predict) and names the prediction key every measured figure compares with."""

from __future__ import annotations

import math

import csv
import re
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from autotune.sim.calibration import Calibration
from autotune.sim.predict import Prediction, Scenario, predict
from autotune.spec.hardware import Cluster, load_gpu
from autotune.spec.layout import EngineKnobs, Layout
from autotune.spec.metrics import figure_of
from autotune.spec.models import ModelSpec, load_model
from autotune.spec.workload import LengthDist, SharedPrefix, Stage, Workload

HERE = Path(__file__).resolve().parent
ROWS_DIR = HERE / "validation"
SHARED = HERE.parents[1] / "shared" / "validation"

# A measured figure -> the prediction key it compares with, and the figure family it is scored in.
STAT = {"mean": "mean", "median": "p50", "p50": "p50", "p90": "p90", "p99": "p99"}
# Replays of long constant-rate stages are shortened to this many requests (the same rates, so the same steady
# state; a stage of 600 s at 6 req/s becomes 50 s) to keep the leave-one-source-out fit within minutes.
MAX_STAGE_REQUESTS = 300
MAX_BATCH_REQUESTS = 3000
# vLLM made async scheduling its default in v0.12 (vllm/config/vllm.py); older servers ran synchronously.
ASYNC_DEFAULT_SINCE = (0, 12)
# The V1 engine (the scheduler the simulator models) became vLLM's default in v0.8.0.
V1_SINCE = (0, 8)


@dataclass
class Run:
    """One measured configuration and the figures measured on it."""

    source: str
    url: str
    label: str
    model: str
    gpu: str
    layout: Layout
    knobs: EngineKnobs
    workload: Workload
    figures: list[tuple[str, float]] = field(default_factory=list)   # (prediction key, measured value)
    uncertain: str = ""
    split: str = "test"
    engine: str = "V1"   # V1 (vLLM >= 0.8, what the simulator models), V0 (older engines) or unknown
    p2p: bool = True     # False where the source's logs show the GPUs cannot reach each other's memory
    cold: bool = False   # measured first on a freshly started server, warmed by one request at most
    stage_figures: list[tuple[int, str, float]] = field(default_factory=list)  # (stage, key, measured) per load stage

    @property
    def modelled(self) -> bool:
        """What the simulator models: vLLM's V1 engine (or an unstated version) serving at steady state. V0 runs and
        cold runs (kernels compiled just in time for their first shapes land in their figures) are reported apart."""
        return self.engine != "V0" and not self.cold

    @cached_property
    def _model(self) -> ModelSpec:
        return load_model(self.model)   # parsed once: a fit predicts every run hundreds of times

    def scenario(self, cal: Calibration) -> Scenario:
        gpu = load_gpu(self.gpu)
        return Scenario(self._model, Cluster.of(gpu, max(self.layout.world_size, 1), p2p=self.p2p), self.workload, cal)

    def predict(self, cal: Calibration) -> Prediction:
        return predict(self.scenario(cal), self.layout, self.knobs)

    def stage_alone(self, i: int) -> "Run":
        """This run with only its i-th load stage, replayed alone at that stage's rate (its steady state)."""
        stage = self.workload.stages[i]
        w = replace(self.workload, stages=(stage,), num_requests=stage.num_requests)
        return replace(self, workload=w, figures=[(k, v) for j, k, v in self.stage_figures if j == i])

    @property
    def key(self) -> tuple:
        """What identifies the configuration (rows of one run in the long CSV share it)."""
        w = self.workload
        return (self.source, self.model, self.gpu, self.p2p, self.layout, self.knobs, w.mode, w.num_requests,
                w.concurrency, w.rate, w.prompt, w.output, w.stages, w.cached_prompt_tokens)


def predicted_value(pred: Prediction, key: str) -> float | None:
    if key == "req_s":
        return pred.get("num_requests") / pred.get("makespan_s")
    return pred.get(key)


def _version(text: str) -> tuple[int, ...]:
    """(major, minor) of a stated version ('0.10.2', 'v0.9.1 (rocm/...)'); () when none is stated ('unknown',
    'main @ 5a84b', a guess in words)."""
    m = re.match(r"v?(\d+)\.(\d+)", text.strip())
    return (int(m.group(1)), int(m.group(2))) if m else ()


def _int(text: str) -> int | None:
    text = (text or "").strip().replace(",", "")
    return int(float(text)) if text else None


def _model_ref(ref: str, base: Path) -> str:
    return str((base / ref).resolve()) if ref.startswith("configs/") else ref


def load_rows(rows_dir: Path = ROWS_DIR, train_sources: frozenset[str] = frozenset()) -> list[Run]:
    """The long-format rows (one figure a line) grouped into runs."""
    runs: dict[tuple, Run] = {}
    for path in sorted(rows_dir.glob("rows_*.csv")):
        for line, r in enumerate(csv.DictReader(open(path, newline="")), start=2):
            try:
                run = _run_from_row(r, rows_dir)
            except (ValueError, KeyError) as exc:
                raise SystemExit(f"{path.name}:{line}: {exc}") from None
            if run is None:
                continue
            stated, model = (r.get("dtype") or "").strip().lower(), run._model
            if stated and stated not in (model.weight_dtype, model.expert_dtype) and {stated, model.weight_dtype} != {
                    "bf16", "fp16"}:    # the row's checkpoint must be the catalog model it is replayed as
                raise SystemExit(f"{path.name}:{line}: dtype {stated} but {model.name} holds {model.weight_dtype}"
                                 f"{' + ' + model.expert_dtype + ' experts' if model.expert_dtype else ''} weights")
            metric, stat = r["metric"].strip(), r["statistic"].strip().lower()
            if metric in ("output_tok_s", "total_tok_s", "req_s"):
                key = metric
            else:
                name = metric.removesuffix("_ms")
                if figure_of(name) is None or stat not in STAT:
                    raise SystemExit(f"{path.name}:{line}: unknown metric/statistic {metric}/{stat}")
                key = f"{name}_{STAT[stat]}_s"
            value = float(r["value"]) / (1e3 if metric.endswith("_ms") else 1.0)
            run = runs.setdefault(run.key, run)
            run.figures.append((key, value))
            if run.source in train_sources:
                run.split = "train"
    return list(runs.values())


# ShareGPT's conversation turns are heavy-tailed (Kwon et al. 2023, vLLM paper, Fig. 11); vLLM's sampler keeps
# prompts of 4-1024 tokens (benchmarks/datasets.py). A lognormal of this sigma with the stated mean stands for it: an
# assumption of the replay (the makespan of a 200-prompt batch is set by its longest outputs), never fitted.
SHAREGPT_SIGMA = 1.0
SHAREGPT_BOUNDS = (4, 1024)


def _lengths(mean: int, sharegpt: bool, range_ratio: float = 0.0) -> LengthDist:
    if range_ratio:     # vllm bench serve's random dataset: uniform in mean x [1 - r, 1 + r] (--random-range-ratio)
        low, high = max(1, round(mean * (1 - range_ratio))), round(mean * (1 + range_ratio))
        return LengthDist("bins", bins=((1.0, low, high),))
    if not sharegpt:
        return LengthDist("fixed", value=mean)
    return LengthDist("lognormal", median=mean / math.exp(SHAREGPT_SIGMA ** 2 / 2), sigma=SHAREGPT_SIGMA,
                      low=SHAREGPT_BOUNDS[0], high=SHAREGPT_BOUNDS[1])


def _run_from_row(r: dict, base: Path) -> Run | None:
    tp, pp, dp = (_int(r[k]) or 1 for k in ("tp", "pp", "dp"))
    ep = _int(r["ep"]) or 1
    layout = Layout(dp=dp, tp=tp, pp=pp, ep=dp * tp if ep > 1 else 1)
    version = _version(r.get("vllm_version") or "")
    async_sched = None if version and version >= ASYNC_DEFAULT_SINCE else False
    knobs = EngineKnobs(max_num_seqs=_int(r["max_num_seqs"]), max_num_batched_tokens=_int(r["max_num_batched_tokens"]),
                        kv_cache_dtype="fp8" if r.get("kv_cache_dtype", "").strip() == "fp8" else "auto",
                        async_scheduling=async_sched)
    mode = r["mode"].strip()
    concurrency = _int(r["concurrency"]) or 0
    rate = float(r["rate"]) if r["rate"].strip() and r["rate"].strip() != "inf" else 0.0
    if mode == "poisson" and not rate:
        mode = "batch"   # --request-rate inf: every request at t=0
    n = _int(r["num_requests"]) or (max(10 * concurrency, 200) if mode == "concurrency" else 1000)
    n = min(n, MAX_BATCH_REQUESTS)
    inp, out = _int(r["input_len"]), _int(r["output_len"])
    if not inp or not out:
        return None
    sharegpt = r.get("dataset", "").strip().lower() == "sharegpt"
    # Prompt tokens of each request that the server's prefix cache already held (an earlier run on the same server
    # sent the same prompts' openings; README, "How rows are replayed").
    cached = _int(r.get("cached_prompt_tokens") or "") or 0
    spread = float(r.get("range_ratio") or 0)
    if not 0 <= spread < 1:
        raise ValueError(f"range_ratio {spread} outside [0, 1)")
    if spread and sharegpt:     # ShareGPT lengths follow their own distribution; a spread there would be ignored
        raise ValueError("range_ratio applies to random-dataset rows, not to ShareGPT ones")
    w = Workload(r["source_id"], _lengths(inp, sharegpt, spread), _lengths(out, sharegpt, spread), mode=mode,
                 num_requests=n, concurrency=concurrency, rate=rate, cached_prompt_tokens=cached)
    label = (f"{r['model']} {r['gpu']} {layout.label()} {inp}/{out}" + (f" ({cached} cached)" if cached else "")
             + f" {mode}"
             + (f" c{concurrency}" if concurrency else "") + (f" r{rate:g}" if rate else "")
             + (f" seqs{knobs.max_num_seqs}" if knobs.max_num_seqs else ""))
    # A row can say that its run fell back to V0 whatever its version (vLLM 0.8's PP did; the log says so).
    stated = r.get("vllm_version") or ""
    engine = "V0" if "V0" in stated else "unknown" if not version else "V1" if version >= V1_SINCE else "V0"
    return Run(r["source_id"].strip(), r["url"].strip(), label, _model_ref(r["model"].strip(), base),
               r["gpu"].strip(), layout, knobs, w, uncertain=r.get("uncertain", ""), engine=engine,
               p2p=(r.get("p2p") or "").strip().lower() != "no", cold=(r.get("cold") or "").strip().lower() == "yes")


def load_simreal(path: Path = SHARED / "simreal_train.csv") -> list[Run]:
    """The shared sim-to-real training runs: constant-rate stages, fixed lengths, shared system prompts."""
    runs = []
    if not path.is_file():
        return runs
    for r in csv.DictReader(open(path, newline="")):
        rates = [float(x) for x in r["stage_rates"].split(";")]
        durations = [float(x) for x in r["stage_durations_s"].split(";")]
        total = sum(rate * d for rate, d in zip(rates, durations))
        scale = min(1.0, MAX_STAGE_REQUESTS * len(rates) / total)
        stages = tuple(Stage(rate, d * scale) for rate, d in zip(rates, durations))
        w = Workload(r["workload"], LengthDist("fixed", value=int(r["input_len"])),
                     LengthDist("fixed", value=int(r["output_len"])), mode="constant",
                     num_requests=sum(s.num_requests for s in stages), stages=stages,
                     prefix=SharedPrefix(int(r["system_prompt_len"]), int(r["num_unique_system_prompts"])))
        layout = Layout(dp=int(r["dp"] or 1), tp=int(r["tp"]))
        knobs = EngineKnobs(max_num_seqs=int(r["max_num_seqs"]), max_num_batched_tokens=int(r["max_num_batched_tokens"]),
                            max_model_len=int(r["max_model_len"]), gpu_memory_utilization=float(r["gpu_mem_util"]))
        figures = [(f"{name}_mean_s", float(r[f"gt_{name}_mean_ms"]) / 1e3)
                   for name in ("e2e", "ttft")] + [("tpot_mean_s", float(r["gt_itl_mean_ms"]) / 1e3)]
        # The same means measured over each stage alone (gt_s0_*, gt_s1_*), where the source has them.
        stage_figures = [(i, key, float(r[f"gt_s{i}_{col}_mean_ms"]) / 1e3) for i in range(len(stages))
                         for key, col in (("e2e_mean_s", "e2e"), ("ttft_mean_s", "ttft"), ("tpot_mean_s", "itl"))
                         if (r.get(f"gt_s{i}_{col}_mean_ms") or "").strip()]
        label = (f"{r['model_hf'].split('/')[-1]} H100 TP{r['tp']} {r['workload']} {r['stage_rates']} req/s "
                 f"{r['input_len']}/{r['output_len']}")
        # One source per model: leaving a source out leaves out every run of that model.
        source = "simreal-" + r["model_hf"].split("/")[-1].lower()
        runs.append(Run(source, "shared/validation/simreal_train.csv", label,
                        _model_ref(r["model_ref"], SHARED), r["gpu_ours"], layout, knobs, w, figures,
                        uncertain=r["confidence"], split="train", stage_figures=stage_figures))
    return runs
