"""Workloads: prompt and output length distributions and how requests arrive. Seeded, so results repeat."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml

from autotune.errors import UserError

MODES = ("batch", "concurrency", "poisson")


@dataclass(frozen=True)
class LengthDist:
    """kind 'bins': weighted uniform ranges [(weight, low, high)]; 'lognormal': median and sigma, clipped;
    'fixed': one value."""

    kind: str
    bins: tuple[tuple[float, int, int], ...] = ()
    median: float = 0.0
    sigma: float = 0.0
    low: int = 1
    high: int = 1
    value: int = 0

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            return np.full(n, self.value, dtype=np.int64)
        if self.kind == "lognormal":
            x = rng.lognormal(np.log(self.median), self.sigma, n)
            return np.clip(np.rint(x), self.low, self.high).astype(np.int64)
        weights = np.array([b[0] for b in self.bins], dtype=float)
        which = rng.choice(len(self.bins), size=n, p=weights / weights.sum())
        lows = np.array([b[1] for b in self.bins])[which]
        highs = np.array([b[2] for b in self.bins])[which]
        return rng.integers(lows, highs + 1)

    @property
    def max_value(self) -> int:
        if self.kind == "fixed":
            return self.value
        if self.kind == "lognormal":
            return self.high
        return max(b[2] for b in self.bins)

    @classmethod
    def from_dict(cls, d: object, where: str) -> "LengthDist":
        if isinstance(d, int):
            return cls("fixed", value=d)
        if not isinstance(d, dict) or "kind" not in d:
            raise UserError(f"{where}: expected a length or a mapping with 'kind' (fixed, lognormal, bins)")
        kind = d["kind"]
        try:
            if kind == "fixed":
                return cls("fixed", value=int(d["value"]))
            if kind == "lognormal":
                dist = cls("lognormal", median=float(d["median"]), sigma=float(d["sigma"]),
                           low=int(d.get("min", 1)), high=int(d["max"]))
                if dist.median <= 0 or dist.sigma < 0 or dist.low > dist.high:
                    raise ValueError("median > 0, sigma >= 0 and min <= max are required")
                return dist
            if kind == "bins":
                bins = tuple((float(w), int(lo), int(hi)) for w, lo, hi in d["bins"])
                if not bins or any(w < 0 or lo < 1 or hi < lo for w, lo, hi in bins) or sum(b[0] for b in bins) <= 0:
                    raise ValueError("each bin is [weight >= 0, low >= 1, high >= low], with a positive total weight")
                return cls("bins", bins=bins)
        except KeyError as exc:
            raise UserError(f"{where}: missing key {exc}") from None
        except (TypeError, ValueError) as exc:
            raise UserError(f"{where}: {exc}") from None
        raise UserError(f"{where}: unknown kind '{kind}' (fixed, lognormal, bins)")


@dataclass(frozen=True)
class Workload:
    name: str
    prompt: LengthDist
    output: LengthDist
    mode: str = "batch"
    num_requests: int = 2000
    concurrency: int = 0
    rate: float = 0.0
    seed: int = 0

    def with_(self, **changes) -> "Workload":
        w = replace(self, **{k: v for k, v in changes.items() if v is not None})
        w.validate()
        return w

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"workload mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if self.num_requests < 1:
            raise UserError("a workload needs at least one request")
        if self.mode == "concurrency" and self.concurrency < 1:
            raise UserError("mode 'concurrency' needs concurrency >= 1")
        if self.mode == "poisson" and self.rate <= 0:
            raise UserError("mode 'poisson' needs a rate > 0 requests/s")

    @property
    def max_model_len(self) -> int:
        return int(self.prompt.max_value + self.output.max_value)

    def sample(self) -> "Requests":
        rng = np.random.default_rng(self.seed)
        n = self.num_requests
        prompt = self.prompt.sample(rng, n)
        output = self.output.sample(rng, n)
        if self.mode == "poisson":
            arrival = np.cumsum(rng.exponential(1.0 / self.rate, n))
        else:
            arrival = np.zeros(n)
        return Requests(prompt=prompt, output=output, arrival=arrival)

    def to_dict(self) -> dict:
        return {"name": self.name, "mode": self.mode, "num_requests": self.num_requests,
                "concurrency": self.concurrency, "rate": self.rate, "seed": self.seed}


@dataclass(frozen=True)
class Requests:
    prompt: np.ndarray
    output: np.ndarray
    arrival: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return len(self.prompt)


# The study's reasoning data set: ~77% of prompts in 50-150 tokens with a tail to ~1k; outputs heavy-tailed,
# about half over 5,000 tokens (lognormal median 4,800, sigma 0.75: P(>5000) = 0.48), capped at 32k.
PRESETS: dict[str, Workload] = {
    "natural-reasoning": Workload(
        "natural-reasoning",
        prompt=LengthDist("bins", bins=((0.08, 16, 49), (0.77, 50, 150), (0.12, 151, 400), (0.03, 401, 1024))),
        output=LengthDist("lognormal", median=4800, sigma=0.75, low=64, high=32768),
    ),
    "chat": Workload(
        "chat",
        prompt=LengthDist("lognormal", median=300, sigma=0.8, low=8, high=4096),
        output=LengthDist("lognormal", median=250, sigma=0.7, low=8, high=2048),
    ),
    "long-context": Workload(
        "long-context",
        prompt=LengthDist("lognormal", median=16000, sigma=0.5, low=2048, high=64000),
        output=LengthDist("lognormal", median=300, sigma=0.6, low=16, high=2048),
    ),
}


def load_workload(ref: str) -> Workload:
    """A preset name or a YAML file with name, prompt, output and optional mode/num_requests/concurrency/rate/seed."""
    if ref in PRESETS:
        return PRESETS[ref]
    path = Path(ref)
    if not path.is_file():
        raise UserError(f"unknown workload '{ref}': use a preset ({', '.join(PRESETS)}) or a YAML file")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{at}: invalid YAML") from None
    return workload_from_dict(d, str(path))


def workload_from_dict(d: object, where: str) -> Workload:
    if not isinstance(d, dict):
        raise UserError(f"{where}: a workload is a mapping with prompt and output")
    base = PRESETS.get(d.get("preset", ""), None)
    if "preset" in d and base is None:
        raise UserError(f"{where}: unknown preset '{d['preset']}' ({', '.join(PRESETS)})")
    try:
        w = Workload(
            name=str(d.get("name", base.name if base else Path(where).stem)),
            prompt=LengthDist.from_dict(d["prompt"], f"{where}: prompt") if "prompt" in d or not base else base.prompt,
            output=LengthDist.from_dict(d["output"], f"{where}: output") if "output" in d or not base else base.output,
            mode=str(d.get("mode", "batch")),
            num_requests=int(d.get("num_requests", 2000)),
            concurrency=int(d.get("concurrency", 0)),
            rate=float(d.get("rate", 0.0)),
            seed=int(d.get("seed", 0)),
        )
    except KeyError as exc:
        raise UserError(f"{where}: missing key {exc}") from None
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}: {exc}") from None
    w.validate()
    return w
