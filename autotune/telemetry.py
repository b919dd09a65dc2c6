"""GPU telemetry from NVML (nvidia-ml-py): memory, utilisation and power of this node's GPUs. Without the
library or the driver it reports one clear state instead of raising."""

from __future__ import annotations

import os
import socket
import time


class NvmlUnavailable(Exception):
    """NVML cannot be used here: no driver, no library, no GPU."""


def visible_gpus(count: int) -> list[int]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES (Ray sets it for a trial's actor, so its samples, its
    memory-free wait and its energy cover its own GPUs, not the node's), else all of them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return list(range(count))
    try:
        return [i for i in (int(x) for x in visible.split(",") if x.strip()) if 0 <= i < count]
    except ValueError:      # UUIDs rather than indices: NVML's order is not theirs, so take the node's
        return list(range(count))


class NvmlSampler:
    def __init__(self):
        try:
            import pynvml
        except ImportError:
            raise NvmlUnavailable("no GPU telemetry: nvidia-ml-py is not installed") from None
        self._nvml = pynvml
        try:
            pynvml.nvmlInit()
            self.count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable(f"no GPU telemetry: NVML is unavailable ({exc})") from None
        if not self.count:
            raise NvmlUnavailable("no GPU telemetry: NVML sees no GPU on this node")
        self.node = socket.gethostname()
        self.names = [self._name(i) for i in range(self.count)]
        self.indices = visible_gpus(self.count)

    def _name(self, index: int) -> str:
        name = self._nvml.nvmlDeviceGetName(self._nvml.nvmlDeviceGetHandleByIndex(index))
        return name.decode() if isinstance(name, bytes) else str(name)

    def sample(self, number: int | None = None) -> list[dict]:
        """One row per GPU, in the store's gpu_samples shape."""
        nv = self._nvml
        rows = []
        now = time.time()
        for i in self.indices:
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
            except nv.NVMLError:
                continue    # a GPU NVML cannot read now is a missed sample, not a failed trial
            try:
                util = nv.nvmlDeviceGetUtilizationRates(h).gpu / 100
            except nv.NVMLError:
                util = None
            try:
                power = nv.nvmlDeviceGetPowerUsage(h) / 1000
            except nv.NVMLError:
                power = None
            rows.append({"number": number, "node": self.node, "gpu": i, "wall": now, "mem_used_bytes": float(mem.used),
                         "mem_total_bytes": float(mem.total), "util": util, "power_w": power})
        return rows

    def energy_j(self) -> float | None:
        """Joules the GPUs this process may use have drawn since the driver loaded (NVML's total-energy counter,
        Volta and later); None when a GPU does not count it."""
        nv = self._nvml
        try:
            return sum(nv.nvmlDeviceGetTotalEnergyConsumption(nv.nvmlDeviceGetHandleByIndex(i))
                       for i in self.indices) / 1e3
        except nv.NVMLError:
            return None

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass
