"""Search spaces: a YAML file names the cluster, model, workload, dimensions, objectives, SLOs, budget and backend.
Validated with pydantic; every error names the file, the line and the key."""

from __future__ import annotations

import difflib
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from autotune.errors import UserError
from autotune.sim.calibration import Calibration
from autotune.sim.predict import Scenario, infeasibility
from autotune.spec.hardware import Cluster, load_gpu
from autotune.spec.layout import (EngineKnobs, Layout, enumerate_layouts, knob_fields, knob_kind,
                                  structural_problem)
from autotune.spec.models import load_model
from autotune.spec.objectives import OBJECTIVE_METRICS, Objective
from autotune.spec.workload import PRESETS, workload_from_dict

MAX_SPACE_BYTES = 1 << 20
CONSTRAINT_METRICS = {"tpot_p99_ms": "tpot_p99_s", "ttft_p99_ms": "ttft_p99_s", "e2e_p99_ms": "e2e_p99_s",
                      "tpot_p50_ms": "tpot_p50_s", "ttft_p50_ms": "ttft_p50_s"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClusterCfg(_Strict):
    gpu: str
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(8, ge=1)
    usd_per_gpu_hour: float | None = Field(None, gt=0)   # default: the built-in public price of the GPU
    p2p: bool = True        # false: the node's GPUs cannot reach each other's memory (spec/hardware.py: Cluster.p2p)


class LayoutCfg(_Strict):
    dp: list[int] | Literal["auto"] = "auto"
    tp: list[int] | Literal["auto"] = "auto"
    pp: list[int] | Literal["auto"] = "auto"
    ep: list[bool] | Literal["auto"] = "auto"
    gpus_per_trial: list[int] | Literal["all"] = "all"


def _non_empty(cls, v):
    if not v:
        raise ValueError("needs at least one value")
    return v


def _knob_dimension(f):
    """A knob's list of values in a space, from its declaration (spec/layout.py): the values searched by default,
    None allowed where None means vLLM's own default."""
    kind = knob_kind(f)
    return (list[kind | None] if f.default is None else list[kind],
            Field(default_factory=lambda values=f.metadata["search"]: list(values)))


# `dimensions:` of a space: the layout and every tunable knob, derived from the knobs' declarations.
DimensionsCfg = create_model(
    "DimensionsCfg", __base__=_Strict,
    __validators__={"non_empty": field_validator(*EngineKnobs.tunable())(_non_empty)},
    layout=(LayoutCfg | Literal["auto"], "auto"),
    **{f.name: _knob_dimension(f) for f in knob_fields(tunable_only=True)})


class ObjectiveCfg(_Strict):
    metric: str
    direction: Literal["maximize", "minimize"] | None = None

    @field_validator("metric")
    @classmethod
    def _known(cls, v):
        if v not in OBJECTIVE_METRICS:
            raise ValueError(f"unknown objective '{v}'; known: {', '.join(OBJECTIVE_METRICS)}")
        return v


class BudgetCfg(_Strict):
    trials: int = Field(40, ge=1)
    wall_time_s: float | None = Field(None, gt=0)
    parallel: int = Field(4, ge=1)


class SpaceCfg(_Strict):
    name: str
    cluster: ClusterCfg
    model: str
    workload: str | dict = "natural-reasoning"
    dimensions: DimensionsCfg = Field(default_factory=DimensionsCfg)
    objectives: list[ObjectiveCfg] = Field(default_factory=lambda: [ObjectiveCfg(metric="output_tok_s_per_gpu"),
                                                                    ObjectiveCfg(metric="tpot_p99_s")])
    constraints: dict[str, float] = Field(default_factory=dict)
    budget: BudgetCfg = Field(default_factory=BudgetCfg)
    backend: Literal["sim", "vllm"] = "sim"
    calibration: str | None = None
    seed: int = 0
    extra_args: list[str] = Field(default_factory=list)   # more `vllm serve` flags for every trial

    @field_validator("name")
    @classmethod
    def _a_name(cls, v):
        # The name becomes studies/<name>: a name, not a path.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v):
            raise ValueError("a study name is 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    @field_validator("constraints")
    @classmethod
    def _known_constraints(cls, v):
        for key, limit in v.items():
            if key not in CONSTRAINT_METRICS:
                raise ValueError(f"unknown constraint '{key}'; known: {', '.join(CONSTRAINT_METRICS)}")
            if limit <= 0:
                raise ValueError(f"constraint '{key}' must be positive")
        return v

    @field_validator("objectives")
    @classmethod
    def _some_objective(cls, v):
        if not v:
            raise ValueError("needs at least one objective")
        return v


# Every key a space file may hold, at any level: what a mistyped key is compared with.
KNOWN_KEYS = sorted({name for cfg in (SpaceCfg, ClusterCfg, LayoutCfg, DimensionsCfg, ObjectiveCfg, BudgetCfg)
                     for name in cfg.model_fields})


@dataclass(frozen=True)
class SearchSpace:
    """A validated space: the scenario it tunes, the valid layouts and the knob grid."""

    name: str
    source: str
    text: str
    scenario: Scenario
    layouts: tuple[Layout, ...]
    knob_grid: dict[str, tuple]
    objectives: tuple[Objective, ...]
    constraints: dict[str, float]     # metric (seconds) -> limit
    trials: int
    wall_time_s: float | None
    parallel: int
    backend: str
    seed: int
    calibration_path: str | None
    model_ref: str = ""
    extra_args: tuple[str, ...] = ()

    def size(self) -> int:
        n = len(self.layouts)
        for v in self.knob_grid.values():
            n *= len(v)
        return n

    def candidates(self):
        """Every (layout, knobs) point of the grid."""
        names = list(self.knob_grid)
        for layout in self.layouts:
            for combo in itertools.product(*(self.knob_grid[n] for n in names)):
                yield layout, EngineKnobs(**dict(zip(names, combo)))

    def slo_violation(self, metrics: dict) -> dict[str, float]:
        """Per constraint, how far over its limit the trial is (<= 0 is within)."""
        return {m: (metrics.get(m) if metrics.get(m) is not None else float("inf")) - limit
                for m, limit in self.constraints.items()}


def _line_index(text: str) -> dict[tuple, int]:
    """Line number (1-based) of every key path in the YAML document."""
    lines: dict[tuple, int] = {}
    seen: set[int] = set()

    def walk(node, path):
        # An alias is the node it names: walked once, so anchors nested on anchors cannot blow up (billion laughs).
        if id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                p = path + (key.value,)
                lines[p] = key.start_mark.line + 1
                walk(value, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, ())
    return lines


def _line_of(lines: dict[tuple, int], loc: tuple) -> int | None:
    for cut in range(len(loc), 0, -1):
        if loc[:cut] in lines:
            return lines[loc[:cut]]
    return None


def load_space(path: str | Path, text: str | None = None) -> SearchSpace:
    """A space file; `text` stands for its content when it comes from elsewhere (a study's header)."""
    p = Path(path)
    if text is None:
        if not p.is_file():
            raise UserError(f"search space {p} does not exist")
        if p.stat().st_size > MAX_SPACE_BYTES:
            raise UserError(f"{p}: {p.stat().st_size:,} bytes is not a search space (at most {MAX_SPACE_BYTES:,})")
        try:
            text = p.read_text()
        except (UnicodeDecodeError, OSError) as exc:
            raise UserError(f"{p}: not a readable text file ({exc})") from None
    try:
        data = yaml.safe_load(text)
        lines = _line_index(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise UserError(f"{where}: invalid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}:1: a search space is a mapping (name, cluster, model, ...)")
    try:
        cfg = SpaceCfg.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x in ("literal['auto']", "list[int]")))
        key = ".".join(str(x) for x in loc) or "(top level)"
        line = _line_of(lines, loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and loc:
            close = difflib.get_close_matches(str(loc[-1]), KNOWN_KEYS, n=1, cutoff=0.6)
            msg += f"; did you mean {close[0]}?" if close else ""
        raise UserError(f"{p}:{line or 1}: {key}: {msg}") from None
    return _build(cfg, p, text, lines)


def _build(cfg: SpaceCfg, path: Path, text: str, lines: dict) -> SearchSpace:
    def fail(key: tuple, msg: str):
        raise UserError(f"{path}:{_line_of(lines, key) or 1}: {'.'.join(map(str, key))}: {msg}")

    # A model path may be given relative to the space file; the server loads the same path (or the HF id).
    local = path.parent / cfg.model
    model_arg = str(local.resolve()) if local.exists() else cfg.model
    try:
        model = load_model(model_arg)
    except UserError as exc:
        fail(("model",), str(exc))
    model_ref = model_arg if Path(model_arg).exists() else (model.hf_id or cfg.model)
    try:
        gpu = load_gpu(cfg.cluster.gpu)
    except UserError as exc:
        fail(("cluster", "gpu"), str(exc))
    cluster = Cluster.of(gpu, cfg.cluster.nodes * cfg.cluster.gpus_per_node, cfg.cluster.gpus_per_node,
                         cfg.cluster.usd_per_gpu_hour, cfg.cluster.p2p)
    if cluster.usd_per_gpu_hour is None and any(o.metric == "usd_per_mtok" for o in cfg.objectives):
        fail(("cluster", "usd_per_gpu_hour"), f"objective usd_per_mtok needs a price: there is no built-in price "
                                              f"for {gpu.name}")
    try:
        workload = PRESETS[cfg.workload] if isinstance(cfg.workload, str) and cfg.workload in PRESETS else (
            workload_from_dict(cfg.workload, f"{path}: workload") if isinstance(cfg.workload, dict)
            else fail(("workload",), f"unknown preset '{cfg.workload}' ({', '.join(PRESETS)})"))
        calibration = Calibration.load(cfg.calibration and str((path.parent / cfg.calibration).resolve()))
    except UserError as exc:
        fail(("workload",) if "workload" in str(exc) else ("calibration",), str(exc))
    scenario = Scenario(model, cluster, workload, calibration)
    dims = cfg.dimensions
    for name in EngineKnobs.tunable():     # each value as vLLM would take it, refused here with its line
        for value in getattr(dims, name):
            try:
                EngineKnobs(**{name: value})
            except UserError as exc:
                fail(("dimensions", name), str(exc))
    layouts = _layouts(cfg, model, cluster, fail)
    if cfg.backend == "vllm":
        _within_a_node(layouts, cluster, fail)
    # Drop the layouts whose weights cannot fit even with the most generous knobs of the space.
    generous = EngineKnobs(gpu_memory_utilization=max(dims.gpu_memory_utilization),
                           max_num_batched_tokens=min(dims.max_num_batched_tokens),
                           max_num_seqs=min(dims.max_num_seqs), block_size=max(dims.block_size),
                           kv_cache_dtype="fp8" if "fp8" in dims.kv_cache_dtype else "auto",
                           num_gpu_blocks_override=max((b for b in dims.num_gpu_blocks_override if b), default=None)
                           if None not in dims.num_gpu_blocks_override else None)
    fitting = [l for l in layouts if infeasibility(scenario, l, scenario.resolve(generous))[0] is None]
    if not fitting:
        fail(("dimensions", "layout"), "no layout of the space fits in memory: "
             + infeasibility(scenario, layouts[0], scenario.resolve(generous))[0])
    layouts = fitting
    grid = {name: tuple(getattr(dims, name)) for name in EngineKnobs.tunable()}
    objectives = tuple(Objective.of(o.metric, o.direction) for o in cfg.objectives)
    constraints = {CONSTRAINT_METRICS[k]: v / 1e3 for k, v in cfg.constraints.items()}
    return SearchSpace(cfg.name, str(path), text, scenario, tuple(layouts), grid, objectives, constraints,
                       cfg.budget.trials, cfg.budget.wall_time_s, cfg.budget.parallel, cfg.backend, cfg.seed,
                       cfg.calibration, model_ref, tuple(cfg.extra_args))


def _within_a_node(layouts: list[Layout], cluster: Cluster, fail) -> None:
    """A real trial is one vLLM server on one node (the `mp` executor in the trial's actor). Wider trials would
    need a headless server per extra node, or for a replica that spans nodes vLLM's Ray executor, which makes its
    own placement group (vllm/v1/executor/ray_utils.py) from a process outside the trial's and would wait for the
    GPUs the trial already holds: refused, never started to fail."""
    wide = [l for l in layouts if l.world_size > cluster.gpus_per_node]
    if wide:
        l = wide[0]
        fail(("dimensions", "layout"), f"backend vllm runs each trial on one node: {l.label()} needs "
                                       f"{-(-l.world_size // cluster.gpus_per_node)} nodes of {cluster.gpus_per_node} "
                                       f"GPUs; set dimensions.layout.gpus_per_trial to at most "
                                       f"{cluster.gpus_per_node}, or use backend sim")


def _layouts(cfg: SpaceCfg, model, cluster: Cluster, fail) -> list[Layout]:
    lay = cfg.dimensions.layout if isinstance(cfg.dimensions.layout, LayoutCfg) else LayoutCfg()
    sizes = [cluster.num_gpus] if lay.gpus_per_trial == "all" else lay.gpus_per_trial
    for s in sizes:
        if not 1 <= s <= cluster.num_gpus:
            fail(("dimensions", "layout", "gpus_per_trial"), f"{s} GPUs per trial, the cluster has {cluster.num_gpus}")
    candidates: list[Layout] = []
    for size in sizes:
        candidates += enumerate_layouts(model, cluster, size)
    reasons = []

    def allowed(values, v):
        return values == "auto" or v in values
    chosen = []
    for layout in candidates:
        if (allowed(lay.dp, layout.dp) and allowed(lay.tp, layout.tp) and allowed(lay.pp, layout.pp)
                and allowed(lay.ep, layout.ep > 1)):
            chosen.append(layout)
    if not chosen:
        # Say why the explicitly listed combinations are impossible.
        for dp, tp, pp in itertools.product(*(v if v != "auto" else [1] for v in (lay.dp, lay.tp, lay.pp))):
            problem = structural_problem(model, cluster, Layout(dp, tp, pp))
            if problem:
                reasons.append(f"DP{dp}xTP{tp}xPP{pp}: {problem}")
        fail(("dimensions", "layout"), "no valid layout is left after the validity checks"
             + (f" ({'; '.join(reasons[:3])})" if reasons else ""))
    return chosen


def space_around(name: str, cluster: Cluster, model_ref: str, workload, layouts: list[Layout], seqs: list[int],
                 constraints_ms: dict[str, float]) -> dict:
    """The YAML document of a search space over these layouts and max_num_seqs values, for a real (vllm) study
    of what the simulator cannot rank with confidence."""
    dims = {"layout": {"dp": sorted({l.dp for l in layouts}), "tp": sorted({l.tp for l in layouts}),
                       "pp": sorted({l.pp for l in layouts}), "ep": sorted({l.ep > 1 for l in layouts}),
                       "gpus_per_trial": sorted({l.world_size for l in layouts})},
            "max_num_seqs": sorted(set(seqs))}
    doc = {"name": name,
           "cluster": {"gpu": cluster.gpu.name, "nodes": cluster.num_nodes, "gpus_per_node": cluster.gpus_per_node,
                       **({"usd_per_gpu_hour": cluster.usd_per_gpu_hour} if cluster.usd_per_gpu_hour else {}),
                       **({} if cluster.p2p else {"p2p": False})},
           "model": model_ref, "workload": workload.to_dict(), "dimensions": dims,
           "objectives": [{"metric": "output_tok_s_per_gpu", "direction": "maximize"},
                          {"metric": "tpot_p99_s", "direction": "minimize"}],
           "constraints": dict(constraints_ms),
           "budget": {"trials": len(layouts) * len(dims["max_num_seqs"]), "parallel": 1},
           "backend": "vllm"}
    return doc
