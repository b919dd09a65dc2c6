"""Energy of a simulated run: each replica's GPUs draw a share of their TDP that depends on what the time went to
(compute-bound, bandwidth-bound, or waiting), over the whole run."""

from __future__ import annotations

from autotune.sim.calibration import Efficiency
from autotune.sim.costs import BUBBLE, COMM, COMPUTE, KERNELS, KV, WEIGHTS
from autotune.spec.hardware import GpuSpec


def energy_joules(gpu: GpuSpec, eff: Efficiency, splits: list, gpus_per_replica: int, seconds: float) -> float | None:
    """Joules drawn by every GPU of the layout over `seconds`, from each replica's time split (PHASE_FIELDS);
    None when the GPU's TDP is unknown."""
    if not gpu.tdp_w:
        return None
    joules = 0.0
    for split in splits:
        memory = split[WEIGHTS] + split[KV] + split[COMM] + split[KERNELS]
        busy = split[COMPUTE] + memory
        # The bubble is the idle share of the stages' time; the CPU overhead in the split, and the time after the
        # replica's last step, are waits: they draw idle power only, which the first term charges for every second.
        active = 1.0 - split[BUBBLE] / busy if busy else 0.0
        # Idle draw over the whole run, plus the extra draw of the active time (power = TDP x share, Splitwise).
        watt_s = (eff.power_idle_frac * seconds
                  + (eff.power_compute_frac - eff.power_idle_frac) * split[COMPUTE] * active
                  + (eff.power_memory_frac - eff.power_idle_frac) * memory * active)
        joules += gpus_per_replica * gpu.tdp_w * watt_s
    return joules
