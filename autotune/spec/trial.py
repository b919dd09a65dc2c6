"""A trial as the search hands it to a backend, and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field

from autotune.spec.layout import EngineKnobs, Layout


@dataclass(frozen=True)
class TrialSpec:
    number: int
    layout: Layout
    knobs: EngineKnobs
    origin: str = "sampler"          # "warm-start" (the simulator's best predictions) or "sampler"
    gpu_ids: tuple[int, ...] = ()    # the cluster GPUs (global indices) the trial holds

    @property
    def gpus(self) -> int:
        return self.layout.world_size


@dataclass
class TrialResult:
    number: int
    ok: bool
    reason: str = ""
    metrics: dict = field(default_factory=dict)      # the keys of `autotune predict`
    predicted: dict | None = None                     # the simulator's prediction beside a real measurement
    serve_commands: tuple[str, ...] = ()           # one `vllm serve` (or `ray start`) per node, head first
