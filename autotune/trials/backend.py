"""The interface the `sim` and `vllm` backends share. A backend runs one trial as a generator of events, so
the runner can record time series while the trial is still running."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

from autotune.sim.calibration import Calibration
from autotune.spec.hardware import Cluster
from autotune.spec.models import ModelSpec
from autotune.spec.trial import TrialSpec
from autotune.spec.workload import Workload


@dataclass(frozen=True)
class StudyContext:
    """What every trial of a study shares (pickled to the Ray actor)."""

    model: ModelSpec
    cluster: Cluster
    workload: Workload
    calibration: Calibration
    study_dir: str
    pace: float = 0.0          # sim: replay simulated time at this many times real time (0 = at once)
    model_ref: str = ""        # what the server loads: a local model directory or a Hugging Face id
    extra_args: tuple[str, ...] = ()   # more `vllm serve` flags from the space


@dataclass(frozen=True)
class Event:
    """kind 'series' (trial_series rows), 'gpu' (gpu_samples rows), 'log' (a line) or 'result' (TrialResult)."""

    kind: str
    payload: object


class Backend(Protocol):
    name: str

    def run(self, spec: TrialSpec, ctx: StudyContext) -> Iterator[Event]:
        """Yield series, GPU samples and log lines while the trial runs, then exactly one result."""
        ...

    def stop(self) -> None:
        """Called from another thread: end the trial now and leave nothing running."""
        ...


def make_backend(name: str) -> Backend:
    if name == "sim":
        from autotune.trials.sim_backend import SimBackend
        return SimBackend()
    if name == "vllm":
        from autotune.trials.vllm_backend import VllmBackend
        return VllmBackend()
    raise ValueError(f"unknown backend '{name}'")
