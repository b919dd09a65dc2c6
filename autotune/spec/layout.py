"""Parallel layouts and vLLM engine knobs, with vLLM's semantics, and their structural validity."""

from __future__ import annotations

import re
from dataclasses import Field, dataclass, asdict, field, fields, replace
from typing import get_args, get_type_hints

from autotune.errors import UserError
from autotune.spec.hardware import MAX_GPUS, Cluster, GpuSpec
from autotune.spec.models import ModelSpec


@dataclass(frozen=True, order=True)
class Layout:
    """dp replicas, each of tp x pp GPUs; ep > 1 means --enable-expert-parallel, whose group is dp x tp."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "ep"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_GPUS:
                raise UserError(f"layout: {name} must be an integer in 1..{MAX_GPUS}, got {v!r}")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def gpus_per_replica(self) -> int:
        return self.tp * self.pp

    @property
    def expert_parallel(self) -> bool:
        return self.ep > 1

    def label(self) -> str:
        parts = [f"{k.upper()}{v}" for k, v in (("dp", self.dp), ("tp", self.tp), ("pp", self.pp)) if v > 1]
        if self.ep > 1:
            parts.append(f"EP{self.ep}")
        return "x".join(parts) or "TP1"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """'dp=4,tp=2', 'tp=8,pp=2', 'dp=8,ep' (EP over dp x tp) or 'dp=8,ep=8'."""
        values: dict[str, int] = {}
        ep_on = False
        for part in filter(None, (p.strip() for p in text.lower().split(","))):
            m = re.fullmatch(r"(dp|tp|pp|ep)\s*(?:=\s*(\w+))?", part, re.ASCII)
            if not m:
                raise UserError(f"cannot parse layout '{text}': expected e.g. dp=4,tp=2 (keys dp, tp, pp, ep)")
            key, raw = m.group(1), m.group(2)
            if key == "ep" and raw in (None, "on", "true", "yes"):
                ep_on = True
                continue
            if raw is None or not re.fullmatch(r"[0-9]{1,6}", raw) or not 1 <= int(raw) <= MAX_GPUS:
                raise UserError(f"cannot parse layout '{text}': {key} needs an integer in 1..{MAX_GPUS}")
            values[key] = int(raw)
        if not values and not ep_on:
            raise UserError(f"cannot parse layout '{text}': expected e.g. dp=4,tp=2")
        layout = cls(**{k: v for k, v in values.items() if k != "ep"})
        ep = values.get("ep", 1)
        if ep_on:
            ep = layout.dp * layout.tp
        if ep > 1 and ep != layout.dp * layout.tp:
            raise UserError(f"layout '{text}': vLLM's expert parallelism spans dp x tp = {layout.dp * layout.tp}, "
                            f"not {ep}")
        return replace(layout, ep=ep)


# vLLM's accepted values (vllm/config/cache.py: BlockSize and CacheDType); counts beyond MAX_KNOB are typos.
BLOCK_SIZES = (1, 8, 16, 32, 64, 128)
KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc")
# How DP ranks' tokens reach their experts under EP (vllm/config/parallel.py: All2AllBackend, the ones every recent
# version accepts): the first, vLLM's default, gathers every token to every rank; the DeepEP and FlashInfer kernels
# send each token only to the ranks of its top-k experts.
ALL2ALL_BACKENDS = ("allgather_reducescatter", "naive", "deepep_high_throughput", "deepep_low_latency",
                    "flashinfer_all2allv")
DEFAULT_ALL2ALL = ALL2ALL_BACKENDS[0]
TOPK_ALL2ALL_BACKENDS = ("deepep_high_throughput", "deepep_low_latency", "flashinfer_all2allv")
MAX_KNOB = 10_000_000


ALWAYS = object()    # a flag written on every command line, whatever its value


def knob(default, flag: str, help: str, search: tuple | None, column: tuple[str, int] | None = None,
         choices: tuple | None = None, omit_at=ALWAYS):
    """One engine knob, declared once: its default (None: vLLM's own, per GPU, filled by EngineKnobs.resolved), vLLM's
    flag, the help the CLI shows, the values a space searches when it names none (None: not searched), its title and
    width in the dashboard's trial table, the values vLLM accepts, and the value at which the serve command leaves the
    flag out (vLLM's default). The CLI flags, the space schema, the store's columns, the serve command and the
    dashboard's columns all derive from these fields (knob_fields)."""
    return field(default=default, metadata={"flag": flag, "help": help, "search": search, "column": column,
                                            "choices": choices, "omit_at": omit_at})


@dataclass(frozen=True)
class EngineKnobs:
    """The vLLM scheduler and cache knobs we search; None means vLLM's own default for the GPU."""

    max_num_seqs: int | None = knob(
        None, "--max-num-seqs", "sequences a DP engine runs at once (vLLM: 1024 on GPUs of 70 GiB or more, else 256)",
        (64, 128, 256, 512, 1024), ("seqs", 5))
    max_num_batched_tokens: int | None = knob(
        None, "--max-num-batched-tokens", "tokens per scheduler step, prefill chunks included (vLLM: 8192 on GPUs "
        "of 70 GiB or more, else 2048)", (8192,), ("tokens", 6))
    gpu_memory_utilization: float = knob(
        0.9, "--gpu-memory-utilization", "share of each GPU's memory vLLM may take, in (0, 1]", (0.9,), ("mem", 4))
    kv_cache_dtype: str = knob(
        "auto", "--kv-cache-dtype", "the KV cache's data type (auto: the model's)", ("auto",), ("kv", 4),
        KV_CACHE_DTYPES, "auto")
    enable_chunked_prefill: bool = knob(
        True, "--enable-chunked-prefill", "split long prefills into chunks that share steps with decodes", (True,),
        omit_at=True)
    block_size: int = knob(16, "--block-size", "tokens per KV cache block", (16,), choices=BLOCK_SIZES, omit_at=16)
    num_gpu_blocks_override: int | None = knob(
        None, "--num-gpu-blocks-override", "cap the KV cache at this many blocks per engine", (None,))
    async_scheduling: bool | None = knob(
        None, "--async-scheduling", "schedule the next step while the GPU runs this one (vLLM: on, except with PP)",
        (None,))
    api_server_count: int | None = knob(
        None, "--api-server-count", "API server processes (vLLM: one per DP rank)", (None,))
    all2all_backend: str = knob(
        DEFAULT_ALL2ALL, "--all2all-backend", "how the DP ranks' tokens reach their experts with EP "
        "(vLLM's default gathers every token to every rank; deepep_* and flashinfer_all2allv send each only to the "
        "ranks of its top-k experts, and need those kernels installed)", (DEFAULT_ALL2ALL,),
        choices=ALL2ALL_BACKENDS, omit_at=DEFAULT_ALL2ALL)
    max_model_len: int | None = knob(
        None, "--max-model-len", "longest sequence (default: what the workload needs)", None)

    def __post_init__(self) -> None:
        """Refuse values vLLM would refuse (or misread) before anything runs, whichever entry point built them."""
        def count(name: str, v, low: int = 1) -> None:
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not low <= v <= MAX_KNOB):
                raise UserError(f"{name} must be an integer in {low}..{MAX_KNOB}, got {v!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_gpu_blocks_override",
                     "api_server_count"):
            count(name, getattr(self, name))
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise UserError(f"gpu_memory_utilization must be in (0, 1], got {u!r}")
        for f in knob_fields():     # a knob declared with the values vLLM accepts takes no other
            choices, v = f.metadata["choices"], getattr(self, f.name)
            if choices and v not in choices:
                raise UserError(f"{f.name} must be one of {', '.join(map(str, choices))}, got {v!r}")

    @staticmethod
    def tunable() -> tuple[str, ...]:
        """The knobs a search space may vary (max_model_len follows the workload)."""
        return tuple(f.name for f in knob_fields(tunable_only=True))

    def resolved(self, gpu: GpuSpec, default_max_model_len: int) -> "EngineKnobs":
        """Fill vLLM v1's defaults as EngineArgs._set_default_args does (vllm/engine/arg_utils.py): larger ones on
        >= 70 GiB GPUs but A100; without chunked prefill the token budget defaults to max_model_len; the default
        max_num_seqs never exceeds the token budget. Values given explicitly are kept as given (see `refusal`)."""
        big = gpu.memory_gib >= 70 and not gpu.name.startswith("A100")
        max_model_len = self.max_model_len or default_max_model_len
        tokens = self.max_num_batched_tokens or ((8192 if big else 2048) if self.enable_chunked_prefill
                                                 else max_model_len)
        seqs = self.max_num_seqs or min(1024 if big else 256, tokens)
        return replace(self, max_num_seqs=seqs, max_num_batched_tokens=tokens, max_model_len=max_model_len)

    def refusal(self) -> str | None:
        """Why vLLM would refuse to start with these resolved knobs (SchedulerConfig._verify_args), or None."""
        tokens, seqs, length = self.max_num_batched_tokens, self.max_num_seqs, self.max_model_len
        if not self.enable_chunked_prefill and tokens < length:
            return (f"cannot start: vLLM refuses max_num_batched_tokens {tokens} below max_model_len {length} "
                    f"without chunked prefill (a prompt must fit one step): raise it or enable chunked prefill")
        if tokens < seqs:
            return (f"cannot start: vLLM refuses max_num_batched_tokens {tokens} below max_num_seqs {seqs}: raise it "
                    f"or lower max_num_seqs")
        return None

    def async_scheduling_for(self, layout: Layout) -> bool:
        # vllm/config/vllm.py: async scheduling defaults on unless pipeline parallelism runs on the V1 model runner.
        return self.async_scheduling if self.async_scheduling is not None else layout.pp == 1

    def api_servers_for(self, layout: Layout) -> int:
        # vllm/entrypoints/cli/serve.py: api_server_count defaults to data_parallel_size (internal load balancing).
        return self.api_server_count or layout.dp

    def kv_dtype_for(self, model: ModelSpec) -> str:
        return model.kv_dtype if self.kv_cache_dtype == "auto" else "fp8" if "fp8" in self.kv_cache_dtype else "bf16"

    def to_dict(self) -> dict:
        return asdict(self)


def knob_fields(tunable_only: bool = False) -> tuple[Field, ...]:
    """Every knob's declaration (or only those a user sets: max_model_len follows the workload), in the order of
    the store's columns and the serve command's flags."""
    return tuple(f for f in fields(EngineKnobs) if not tunable_only or f.metadata["search"] is not None)


def knob_columns() -> tuple[tuple[str, str, int], ...]:
    """(title, knob, width) of the knobs that tables of trials show, in the CLI and the dashboard."""
    return tuple((f.metadata["column"][0], f.name, f.metadata["column"][1]) for f in knob_fields()
                 if f.metadata["column"])


def knob_kind(f: Field) -> type:
    """int, float, str or bool: the knob's type without its None."""
    hint = get_type_hints(EngineKnobs)[f.name]
    return next((t for t in get_args(hint) if t is not type(None)), hint)


def structural_problem(model: ModelSpec, cluster: Cluster, layout: Layout,
                       allow_cross_node_tp: bool = False) -> str | None:
    """The first reason vLLM would refuse this layout before loading weights, or None."""
    if model.num_heads % layout.tp:
        return f"TP{layout.tp} does not divide the {model.num_heads} attention heads"
    kv = model.num_kv_heads
    if not model.is_mla and (kv % layout.tp if layout.tp <= kv else layout.tp % kv):
        return f"TP{layout.tp} and the {kv} KV heads neither divide nor replicate evenly"
    if layout.pp > model.num_layers:
        return f"PP{layout.pp} exceeds the {model.num_layers} layers"
    if layout.ep > 1 and not model.is_moe:
        return "expert parallelism needs a mixture-of-experts model"
    if layout.ep > model.num_experts > 0:
        return f"EP{layout.ep} exceeds the {model.num_experts} experts"
    if layout.world_size > cluster.num_gpus:
        return f"needs {layout.world_size} GPUs, the cluster has {cluster.num_gpus}"
    if layout.tp > cluster.gpus_per_node and not allow_cross_node_tp:
        return f"TP{layout.tp} would cross nodes of {cluster.gpus_per_node} GPUs (NVLink ends at the node)"
    if layout.gpus_per_replica > cluster.gpus_per_node and (layout.gpus_per_replica % cluster.gpus_per_node
                                                             and cluster.gpus_per_node % layout.tp):
        return f"a TP{layout.tp} x PP{layout.pp} replica does not tile nodes of {cluster.gpus_per_node} GPUs"
    return None


def enumerate_layouts(model: ModelSpec, cluster: Cluster, num_gpus: int | None = None,
                      allow_cross_node_tp: bool = False) -> list[Layout]:
    """Every structurally valid layout using exactly num_gpus (default: the whole cluster)."""
    total = num_gpus or cluster.num_gpus
    out = []
    for tp in _divisors(total):
        for pp in _divisors(total // tp):
            dp = total // (tp * pp)
            eps = [1] + ([dp * tp] if model.is_moe and dp * tp > 1 else [])
            for ep in eps:
                layout = Layout(dp=dp, tp=tp, pp=pp, ep=ep)
                if structural_problem(model, cluster, layout, allow_cross_node_tp) is None:
                    out.append(layout)
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
