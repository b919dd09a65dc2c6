"""Workloads: prompt and output length distributions and how requests arrive. Seeded, so results repeat."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from autotune.errors import UserError
from autotune.spec.files import integer, read_yaml

MODES = ("batch", "concurrency", "poisson", "constant")
# Bounds on what a load may ask for, checked before any work: beyond them an input is a typo (a billion requests
# would need gigabytes before the first step).
MAX_REQUESTS = 1_000_000
MAX_LENGTH = 10_000_000
OPEN_LOOP = ("poisson", "constant")   # arrivals at a rate, whatever the server does


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

    def __post_init__(self) -> None:
        finite = all(math.isfinite(v) for v in (self.median, self.sigma, *(b[0] for b in self.bins)))
        if not finite:
            raise UserError("a length distribution's numbers must be finite")
        if self.kind == "fixed" and not 1 <= self.value <= MAX_LENGTH:
            raise UserError(f"a fixed length must be in 1..{MAX_LENGTH}, got {self.value}")
        if self.kind == "lognormal" and not (self.median > 0 and self.sigma >= 0 and 1 <= self.low <= self.high
                                             <= MAX_LENGTH):
            raise UserError(f"lognormal lengths need median > 0, sigma >= 0 and 1 <= min <= max <= {MAX_LENGTH}")
        if self.kind == "bins" and (not self.bins or any(w < 0 or lo < 1 or hi < lo or hi > MAX_LENGTH
                                                          for w, lo, hi in self.bins)
                                    or sum(b[0] for b in self.bins) <= 0):
            raise UserError(f"each bin is [weight >= 0, low >= 1, high >= low, high <= {MAX_LENGTH}], with a "
                            "positive total weight")

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

    def to_dict(self) -> dict:
        """The mapping from_dict reads back."""
        if self.kind == "fixed":
            return {"kind": "fixed", "value": self.value}
        if self.kind == "lognormal":
            return {"kind": "lognormal", "median": self.median, "sigma": self.sigma, "min": self.low, "max": self.high}
        return {"kind": "bins", "bins": [list(b) for b in self.bins]}

    @property
    def bounds(self) -> tuple[int, int]:
        """The shortest and the longest length it can draw."""
        if self.kind == "fixed":
            return self.value, self.value
        if self.kind == "lognormal":
            return self.low, self.high
        return min(b[1] for b in self.bins), max(b[2] for b in self.bins)

    @classmethod
    def from_dict(cls, d: object, where: str) -> "LengthDist":
        if isinstance(d, int) and not isinstance(d, bool):
            d = {"kind": "fixed", "value": d}
        if not isinstance(d, dict) or "kind" not in d:
            raise UserError(f"{where}: expected a length or a mapping with 'kind' (fixed, lognormal, bins)")
        kind = d["kind"]
        try:
            if kind == "fixed":
                _only(d, {"kind", "value"})
                return cls("fixed", value=integer(d["value"], "a fixed length"))
            if kind == "lognormal":
                _only(d, {"kind", "median", "sigma", "min", "max"})
                return cls("lognormal", median=float(d["median"]), sigma=float(d["sigma"]),
                           low=integer(d.get("min", 1), "min"), high=integer(d["max"], "max"))
            if kind == "bins":
                _only(d, {"kind", "bins"})
                return cls("bins", bins=tuple((float(w), integer(lo, "a bin's low"), integer(hi, "a bin's high"))
                                              for w, lo, hi in d["bins"]))
        except KeyError as exc:
            raise UserError(f"{where}: missing key {exc}") from None
        except (TypeError, ValueError, OverflowError, UserError) as exc:
            raise UserError(f"{where}: {exc}") from None
        raise UserError(f"{where}: unknown kind '{kind}' (fixed, lognormal, bins)")


@dataclass(frozen=True)
class Stage:
    """One stage of an open-loop load: `rate` requests/s for `duration_s` seconds (inference-perf's load stages)."""

    rate: float
    duration_s: float

    @property
    def num_requests(self) -> int:
        return max(1, round(self.rate * self.duration_s))


@dataclass(frozen=True)
class SharedPrefix:
    """Prompts that open with one of `distinct` system prompts of `tokens` tokens (counted in the prompt length):
    vLLM's automatic prefix caching computes each once and shares its full blocks."""

    tokens: int = 0
    distinct: int = 1


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
    stages: tuple[Stage, ...] = ()
    prefix: SharedPrefix = SharedPrefix()
    # Each request's first this-many prompt tokens are in the server's prefix cache when it arrives, its own (earlier
    # turns of its conversation; the same prompts sent before on that server): their prefill is skipped.
    cached_prompt_tokens: int = 0

    def with_(self, **changes) -> "Workload":
        changes = {k: v for k, v in changes.items() if v is not None}
        if "rate" in changes:
            changes.setdefault("stages", ())   # a rate given on the command line replaces the stages
        elif self.stages and "num_requests" in changes and "stages" not in changes:
            raise UserError("a staged load's request count comes from its stages (rate x duration_s); "
                            "give --rate to replace the stages with one rate")
        w = replace(self, **changes)
        w.validate()
        return w

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"workload mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        if not 1 <= self.num_requests <= MAX_REQUESTS:
            raise UserError(f"a workload has 1..{MAX_REQUESTS:,} requests, got {self.num_requests:,}")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"the seed must be in 0..2^63-1, got {self.seed}")
        if self.mode == "concurrency" and not 1 <= self.concurrency <= MAX_REQUESTS:
            raise UserError(f"mode 'concurrency' needs concurrency in 1..{MAX_REQUESTS:,}")
        if not math.isfinite(self.rate) or self.rate < 0:
            raise UserError(f"the rate must be a finite number of requests/s >= 0, got {self.rate}")
        if self.stages and self.mode not in OPEN_LOOP:
            raise UserError(f"stages need an open-loop mode ({', '.join(OPEN_LOOP)}), not '{self.mode}'")
        for s in self.stages:
            if not (math.isfinite(s.rate) and s.rate > 0 and math.isfinite(s.duration_s) and s.duration_s > 0):
                raise UserError("each stage needs a finite rate > 0 requests/s and duration_s > 0")
        if self.mode in OPEN_LOOP and not self.stages and not (math.isfinite(self.rate) and self.rate > 0):
            raise UserError(f"mode '{self.mode}' needs a finite rate > 0 requests/s")
        if self.stages and sum(s.num_requests for s in self.stages) > MAX_REQUESTS:
            raise UserError(f"the stages send more than {MAX_REQUESTS:,} requests (rate x duration_s)")
        if self.prefix.tokens < 0 or self.prefix.distinct < 1:
            raise UserError("shared_prefix needs tokens >= 0 and distinct >= 1")
        if self.prefix.tokens and self.prefix.tokens >= self.prompt.bounds[0]:
            raise UserError(f"shared_prefix tokens ({self.prefix.tokens}) must be shorter than every prompt "
                            f"(shortest {self.prompt.bounds[0]})")
        if not 0 <= self.cached_prompt_tokens < self.prompt.bounds[0]:
            raise UserError(f"cached_prompt_tokens ({self.cached_prompt_tokens}) must be >= 0 and shorter than every "
                            f"prompt (shortest {self.prompt.bounds[0]})")
        if self.cached_prompt_tokens and self.prefix.tokens:
            raise UserError("give shared_prefix or cached_prompt_tokens, not both: a request's own cached tokens "
                            "already cover a shared system prompt")

    @property
    def max_model_len(self) -> int:
        return int(self.prompt.bounds[1] + self.output.bounds[1])

    @property
    def offered_rate(self) -> float | None:
        """Requests/s an open-loop load sends (the last stage's when staged), None for batch and closed loops."""
        if self.mode not in OPEN_LOOP:
            return None
        return self.stages[-1].rate if self.stages else self.rate

    def sample(self) -> "Requests":
        rng = np.random.default_rng(self.seed)
        stages = self.stages or ((Stage(self.rate, self.num_requests / self.rate),) if self.mode in OPEN_LOOP else ())
        n = sum(s.num_requests for s in stages) if self.stages else self.num_requests
        prompt = self.prompt.sample(rng, n)
        output = self.output.sample(rng, n)
        arrival = np.zeros(n)
        start, i = 0.0, 0
        for s in stages:
            k = s.num_requests if self.stages else n
            if self.mode == "poisson":
                gaps = rng.exponential(1.0 / s.rate, k)
            else:   # constant: one request every 1/rate seconds, the first at the stage's start
                gaps = np.full(k, 1.0 / s.rate)
                gaps[0] = 0.0 if i == 0 else gaps[0]
            arrival[i:i + k] = start + np.cumsum(gaps)
            start += s.duration_s if self.stages else 0.0
            i += k
        prefix_id = (rng.integers(0, self.prefix.distinct, n) if self.prefix.tokens
                     else np.full(n, -1, dtype=np.int64))
        return Requests(prompt=prompt, output=output, arrival=arrival, prefix_id=prefix_id,
                        prefix_tokens=self.prefix.tokens, cached_tokens=self.cached_prompt_tokens)

    def to_dict(self) -> dict:
        d = {"name": self.name, "prompt": self.prompt.to_dict(), "output": self.output.to_dict(),
             "mode": self.mode, "num_requests": self.num_requests,
             "concurrency": self.concurrency, "rate": self.rate, "seed": self.seed,
             "stages": [{"rate": s.rate, "duration_s": s.duration_s} for s in self.stages],
             "shared_prefix": {"tokens": self.prefix.tokens, "distinct": self.prefix.distinct}}
        # Written only when set, so a study recorded before the key existed still resumes as the same study.
        return d | ({"cached_prompt_tokens": self.cached_prompt_tokens} if self.cached_prompt_tokens else {})


@dataclass(frozen=True)
class Requests:
    prompt: np.ndarray
    output: np.ndarray
    arrival: np.ndarray = field(repr=False)
    prefix_id: np.ndarray | None = field(default=None, repr=False)   # which shared prefix, -1 for none
    prefix_tokens: int = 0
    cached_tokens: int = 0      # each request's own prompt tokens already in the prefix cache

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


# The keys a workload file (or a search space's workload) may have: any other is a typo that would be ignored.
WORKLOAD_KEYS = frozenset({"name", "preset", "prompt", "output", "mode", "num_requests", "concurrency", "rate", "seed",
                           "stages", "shared_prefix", "cached_prompt_tokens"})


def _only(d: dict, keys: set | frozenset) -> None:
    unknown = sorted(set(map(str, d)) - set(keys))
    if unknown:
        raise UserError(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(keys))})")


def load_workload(ref: str) -> Workload:
    """A preset name or a YAML file with name, prompt, output and optional mode/num_requests/concurrency/rate/seed."""
    if ref in PRESETS:
        return PRESETS[ref]
    path = Path(ref)
    if not path.is_file():
        raise UserError(f"unknown workload '{ref}': use a preset ({', '.join(PRESETS)}) or a YAML file")
    return workload_from_dict(read_yaml(path, "workload file"), str(path))


def workload_from_dict(d: object, where: str) -> Workload:
    if not isinstance(d, dict):
        raise UserError(f"{where}: a workload is a mapping with prompt and output")
    preset = d.get("preset")
    if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
        raise UserError(f"{where}: unknown preset {preset!r} ({', '.join(PRESETS)})")
    base = PRESETS.get(preset) if preset else None
    try:
        _only(d, WORKLOAD_KEYS)
        counts = {k: integer(d.get(k, default), k) for k, default in (("num_requests", 2000), ("concurrency", 0),
                                                                     ("seed", 0), ("cached_prompt_tokens", 0))}
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    try:
        w = Workload(
            name=str(d.get("name", base.name if base else Path(where).stem)),
            prompt=LengthDist.from_dict(d["prompt"], f"{where}: prompt") if "prompt" in d or not base else base.prompt,
            output=LengthDist.from_dict(d["output"], f"{where}: output") if "output" in d or not base else base.output,
            mode=str(d.get("mode", "batch")),
            num_requests=counts["num_requests"],
            concurrency=counts["concurrency"],
            rate=float(d.get("rate", 0.0)),
            seed=counts["seed"],
            stages=_stages(d.get("stages"), where),
            prefix=_prefix(d.get("shared_prefix"), where),
            cached_prompt_tokens=counts["cached_prompt_tokens"],
        )
    except KeyError as exc:
        raise UserError(f"{where}: missing key {exc}") from None
    except (TypeError, ValueError, OverflowError) as exc:
        raise UserError(f"{where}: {exc}") from None
    if w.stages:
        w = replace(w, num_requests=sum(s.num_requests for s in w.stages))
    try:
        w.validate()
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    return w


def _stages(raw: object, where: str) -> tuple[Stage, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(s, dict) and set(s) == {"rate", "duration_s"} for s in raw):
        raise UserError(f"{where}: stages is a list of {{rate: requests/s, duration_s: seconds}}")
    stages = tuple(Stage(float(s["rate"]), float(s["duration_s"])) for s in raw)
    if not all(math.isfinite(s.rate) and s.rate > 0 and math.isfinite(s.duration_s) and s.duration_s > 0
               for s in stages):
        raise UserError(f"{where}: each stage needs a finite rate > 0 requests/s and duration_s > 0")
    return stages


def _prefix(raw: object, where: str) -> SharedPrefix:
    if raw is None:
        return SharedPrefix()
    if not isinstance(raw, dict):
        raise UserError(f"{where}: shared_prefix is {{tokens: N, distinct: K}}")
    try:
        _only(raw, {"tokens", "distinct"})
    except UserError as exc:
        raise UserError(f"{where}: shared_prefix: {exc}") from None
    return SharedPrefix(integer(raw.get("tokens", 0), f"{where}: shared_prefix tokens"),
                        integer(raw.get("distinct", 1), f"{where}: shared_prefix distinct"))
