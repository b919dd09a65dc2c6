"""A GPU's efficiency factors fitted to timed kernels (bench/gpu_probe.py): the decode step's GEMMs over batch sizes
and its attention over contexts, each predicted by the laws the step model (autotune/sim/costs.py) applies to a
whole layer, here to one kernel."""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from autotune.errors import UserError
from autotune.sim.calibration import Efficiency, descend
from autotune.sim.costs import BF16, gemm_flops, gqa_attention_flops
from autotune.spec.hardware import GpuSpec
from autotune.spec.models import ModelSpec

# The factors a kernel table decides, and how far a fit may take them.
KERNEL_FACTORS = {"hbm": (0.05, 1.0), "kv_read": (0.05, 1.0), "flops": (0.02, 1.0),
                  "gemm_ramp_tokens": (1.0, 4096.0), "kernel_floor_s": (1e-7, 1e-3)}
START_FLOPS = (0.6, 0.2, 0.05)
START_HBM = (0.8, 0.3, 0.1)


@dataclass(frozen=True)
class KernelTiming:
    """One timed kernel: a GEMM of `rows` token rows against an n x k bf16 weight, or decode attention of `rows`
    sequences of `context` cached tokens each with `heads` query and `kv_heads` KV heads of `head_dim`."""

    model: str
    kernel: str            # qkv, o, gate_up, down or attention
    rows: int
    n: int = 0
    k: int = 0
    context: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    seconds: float = 0.0

    @property
    def is_gemm(self) -> bool:
        return self.kernel != "attention"


def decode_kernels(model: ModelSpec, tp: int, rows: list[int], contexts: list[int]) -> list[KernelTiming]:
    """The kernels of one dense decoder layer of `model` on one of `tp` GPUs (Megatron sharding: QKV and gate_up
    split by columns, O and down by rows), untimed: the GEMMs at each batch size, attention at each context."""
    if model.is_moe or model.is_mla:
        raise UserError(f"{model.name}: the kernel probe times dense GQA layers; pick a dense model")
    heads, kv_heads = model.num_heads // tp, max(1, model.num_kv_heads // tp)
    qkv = (heads + 2 * kv_heads) * model.head_dim
    shapes = {"qkv": (qkv, model.hidden_size), "o": (model.hidden_size, heads * model.head_dim),
              "gate_up": (2 * model.intermediate_size // tp, model.hidden_size),
              "down": (model.hidden_size, model.intermediate_size // tp)}
    out = [KernelTiming(model.name, name, m, n, k) for name, (n, k) in shapes.items() for m in rows]
    out += [KernelTiming(model.name, "attention", b, context=c, heads=heads, kv_heads=kv_heads,
                         head_dim=model.head_dim) for c in contexts for b in rows if b * c <= max(contexts) * 8]
    return out


def modelled_s(t: KernelTiming, gpu: GpuSpec, eff: Efficiency) -> float:
    """The kernel's time under the step model's laws (costs.py): the slower of its compute and its memory reads,
    plus the kernel floor."""
    flops = gpu.bf16_tflops * 1e12 * eff.flops
    bw = gpu.hbm_tb_s * 1e12 * eff.hbm
    if t.is_gemm:
        compute = gemm_flops(t.n * t.k, t.rows, eff.gemm_ramp_tokens) / flops
        memory = t.n * t.k * BF16 / bw          # decode reads the whole weight once
    else:
        compute = gqa_attention_flops(t.heads, t.head_dim, t.context) * t.rows / flops
        memory = 2 * t.kv_heads * t.head_dim * BF16 * t.context * t.rows / (bw * eff.kv_read)   # K and V, once
    return max(compute, memory) + eff.kernel_floor_s


def log_error(timings: list[KernelTiming], gpu: GpuSpec, eff: Efficiency) -> float:
    """Median |log(modelled / measured)| over the timings."""
    return statistics.median(abs(math.log(modelled_s(t, gpu, eff) / t.seconds)) for t in timings)


def fit(timings: list[KernelTiming], gpu: GpuSpec, start: Efficiency) -> Efficiency:
    """The kernel factors that make the step model's laws reproduce the timings (least mean squared log error).
    The loss has kinks where a kernel turns from memory- to compute-bound, so the descent starts from a grid of
    compute and bandwidth shares (a device may sit far from the GPU priors: a CPU core emulating bf16) and keeps
    the best landing point."""
    def loss(eff: Efficiency) -> float:
        return statistics.fmean(math.log(modelled_s(t, gpu, eff) / t.seconds) ** 2 for t in timings)
    starts = [start.with_overrides({"flops": f, "hbm": h}, "fit") for f in START_FLOPS for h in START_HBM]
    return min((descend(s, KERNEL_FACTORS, loss, steps=(0.5, 0.8, 0.95, 1.05, 1.25, 2.0), rounds=30)
                for s in starts), key=loss)


def write_table(timings: list[KernelTiming], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, [fl.name for fl in fields(KernelTiming)])
        w.writeheader()
        w.writerows(asdict(t) for t in timings)


def read_table(path: str | Path) -> list[KernelTiming]:
    types = {fl.name: fl.type for fl in fields(KernelTiming)}
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        timings = [KernelTiming(**{k: (v if types[k] == "str" else float(v) if types[k] == "float" else int(v))
                                   for k, v in row.items()}) for row in rows]
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: not a kernel table ({exc})") from None
    if not timings or any(t.seconds <= 0 for t in timings):
        raise UserError(f"{path}: a kernel table needs timed rows (seconds > 0)")
    return timings
