"""The interface the `sim` and `vllm` backends share. A backend runs one trial as a generator of events, so
the runner can record time series while the trial is still running."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

from autotune.sim.calibration import Calibration
from autotune.spec.hardware import Cluster
from autotune.spec.models import ModelSpec
from autotune.spec.trial import TrialResult, TrialSpec
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


def make_backend(name: str) -> Backend:
    if name == "sim":
        from autotune.trials.sim_backend import SimBackend
        return SimBackend()
    raise ValueError(f"unknown backend '{name}'")


def result_event(result: TrialResult) -> Event:
    return Event("result", result)
