"""Transformer model specs: read from a Hugging Face config.json or the built-in catalog."""

from __future__ import annotations

import difflib
import fnmatch
import json
import re
from dataclasses import dataclass, asdict, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from autotune.errors import UserError
from autotune.spec.files import integer

# Bytes per stored element for each dtype we model; mxfp4 is 4-bit values plus a shared
# 8-bit scale per 32 elements (OCP microscaling spec) = 4.25 bits.
DTYPE_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp32": 4.0, "fp8": 1.0, "mxfp4": 4.25 / 8}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    # Mixture of experts (0 routed experts = dense).
    num_experts: int = 0
    experts_per_token: int = 0
    num_shared_experts: int = 0
    first_dense_layers: int = 0
    moe_intermediate_size: int = 0
    # The quantized dtype of the expert weights when it differs from weight_dtype (gpt-oss: mxfp4).
    expert_dtype: str | None = None
    # FP8 weights with one scale per block of weights (quantization_config.weight_block_size, 128x128 in
    # DeepSeek-V3/R1 and Qwen3-*-FP8) rather than per tensor or channel: vLLM runs them through block-scaled GEMMs.
    block_quantized: bool = False
    # Layers whose attention projections a quantized checkpoint leaves unquantized (its ignore list; RedHatAI's
    # Llama-4 FP8-dynamic keeps q/k/v/o in BF16): vLLM runs them through its unquantized linear method.
    unquantized_attention_layers: int = 0
    # Multi-head latent attention (DeepSeek): the compressed KV is cached instead of K and V.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    # Sliding-window layers cache at most `sliding_window` tokens each (gpt-oss alternates).
    sliding_window: int = 0
    num_sliding_layers: int = 0
    hf_id: str = ""
    source: str = ""        # the local model directory its config.json was read from ("" for the catalog)
    notes: tuple[str, ...] = ()   # what was assumed because the config did not say

    def __post_init__(self) -> None:
        """Refuse a shape no model has, whichever way it was built (catalog, config.json, code)."""
        positive = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
                    "max_position_embeddings")
        bad = [f for f in positive if getattr(self, f) < 1]
        bad += [f for f in ("intermediate_size", "num_experts", "experts_per_token", "num_shared_experts",
                            "first_dense_layers", "moe_intermediate_size", "kv_lora_rank", "q_lora_rank",
                            "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "sliding_window",
                            "num_sliding_layers", "unquantized_attention_layers") if getattr(self, f) < 0]
        if bad:
            raise UserError(f"model {self.name}: {', '.join(bad)} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"model {self.name}: {self.num_heads} attention heads do not share "
                            f"{self.num_kv_heads} KV heads evenly")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise UserError(f"model {self.name}: experts_per_token must be in 1..{self.num_experts}")
        if self.num_experts and not self.moe_intermediate_size:
            raise UserError(f"model {self.name}: a mixture of experts needs moe_intermediate_size")
        if not self.num_experts and not self.intermediate_size:
            raise UserError(f"model {self.name}: intermediate_size must be positive")
        if max(self.first_dense_layers, self.num_sliding_layers, self.unquantized_attention_layers) > self.num_layers:
            raise UserError(f"model {self.name}: more dense, sliding or unquantized-attention layers than layers")
        for dtype in (self.weight_dtype, self.kv_dtype, self.expert_dtype or self.weight_dtype):
            if dtype not in DTYPE_BYTES:
                raise UserError(f"model {self.name}: unknown dtype {dtype}")

    # ---- structure -------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers if self.is_moe else 0

    @property
    def num_full_attention_layers(self) -> int:
        return self.num_layers - self.num_sliding_layers

    # ---- parameter counts (gated SwiGLU FFNs: gate, up and down projections) ----------
    @property
    def attention_params_per_layer(self) -> int:
        h = self.hidden_size
        if self.is_mla:
            # DeepSeek-V2 paper, section 2.1: low-rank Q and joint low-rank KV projections.
            qk_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = (h * self.q_lora_rank + self.q_lora_rank * self.num_heads * qk_dim
                 if self.q_lora_rank else h * self.num_heads * qk_dim)
            kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank * self.num_heads * (
                self.qk_nope_head_dim + self.v_head_dim)
            o = self.num_heads * self.v_head_dim * h
            return q + kv + o
        q_and_o = 2 * h * self.num_heads * self.head_dim
        k_and_v = 2 * h * self.num_kv_heads * self.head_dim
        return q_and_o + k_and_v

    @property
    def dense_ffn_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def embedding_params(self) -> int:
        """Input embedding plus the LM head (once when they are tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def routed_expert_params(self) -> int:
        return self.num_moe_layers * self.num_experts * self.expert_params

    @property
    def non_expert_layer_params(self) -> int:
        """Attention, dense FFNs, shared experts and routers of all layers."""
        dense_layers = self.num_layers - self.num_moe_layers
        moe_layer = self.num_shared_experts * self.expert_params + self.hidden_size * self.num_experts
        return (self.num_layers * self.attention_params_per_layer + dense_layers * self.dense_ffn_params
                + self.num_moe_layers * moe_layer)

    @property
    def unquantized_attention_params(self) -> int:
        """Attention projection weights held in BF16 in a quantized checkpoint (none when nothing is quantized)."""
        quantized = DTYPE_BYTES[self.weight_dtype] < DTYPE_BYTES["bf16"]
        return self.unquantized_attention_layers * self.attention_params_per_layer if quantized else 0

    @property
    def total_params(self) -> int:
        return self.non_expert_layer_params + self.routed_expert_params + self.embedding_params

    @property
    def active_params(self) -> int:
        """Parameters touched by one token: routed experts count only the top-k."""
        active_experts = self.num_moe_layers * self.experts_per_token * self.expert_params
        return self.non_expert_layer_params + active_experts + self.embedding_params

    @property
    def compute_params_per_token(self) -> int:
        """Active parameters that cost 2 FLOPs per token (the embedding lookup costs none)."""
        return self.active_params - self.vocab_size * self.hidden_size * (0 if self.tie_word_embeddings else 1)

    # ---- bytes --------------------------------------------------------------------------
    @property
    def weight_bytes_per_param(self) -> float:
        return DTYPE_BYTES[self.weight_dtype]

    @property
    def embedding_bytes(self) -> float:
        # Quantized checkpoints (FP8, MXFP4) keep embeddings and LM head in bf16.
        return self.embedding_params * 2.0

    @property
    def routed_expert_bytes(self) -> float:
        return self.routed_expert_params * DTYPE_BYTES[self.expert_dtype or self.weight_dtype]

    @property
    def non_expert_layer_bytes(self) -> float:
        bf16_extra = DTYPE_BYTES["bf16"] - self.weight_bytes_per_param     # an unquantized weight's second byte
        return (self.non_expert_layer_params * self.weight_bytes_per_param
                + self.unquantized_attention_params * bf16_extra)

    @property
    def weight_bytes(self) -> float:
        return self.non_expert_layer_bytes + self.routed_expert_bytes + self.embedding_bytes

    def kv_bytes_per_token_per_layer(self, kv_dtype: str | None = None) -> float:
        b = DTYPE_BYTES[kv_dtype or self.kv_dtype]
        if self.is_mla:
            # MLA caches the compressed latent plus the decoupled RoPE key (DeepSeek-V2, eq. 9-10).
            return (self.kv_lora_rank + self.qk_rope_head_dim) * b
        # GQA: one K and one V vector per KV head.
        return 2 * self.num_kv_heads * self.head_dim * b

    def kv_bytes_per_token(self, kv_dtype: str | None = None) -> float:
        """KV bytes per token of context over the full-attention layers (the part that grows)."""
        return self.num_full_attention_layers * self.kv_bytes_per_token_per_layer(kv_dtype)

    def derived(self) -> dict:
        return {
            "total_params": self.total_params,
            "active_params": self.active_params,
            "weight_bytes": self.weight_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token(),
            "attention": "MLA" if self.is_mla else ("MHA" if self.num_kv_heads == self.num_heads else "GQA"),
            "moe": self.is_moe,
        }

    def to_dict(self) -> dict:
        return asdict(self) | {"derived": self.derived()}


# ---- Hugging Face config.json -----------------------------------------------------------
_REQUIRED = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")


def _first(cfg: dict, *keys, default=None):
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def _weight_dtype(cfg: dict) -> tuple[str, str | None]:
    quant = cfg.get("quantization_config") or {}
    method = str(quant.get("quant_method", "")).lower()
    if method == "mxfp4":
        return "bf16", "mxfp4"
    if method in ("fp8", "compressed-tensors", "modelopt") or "fp8" in str(quant.get("quant_algo", "")).lower():
        return "fp8", None
    dtype = str(_first(cfg, "torch_dtype", "dtype", default="bfloat16"))
    return ("fp32" if "32" in dtype else "fp16" if "float16" == dtype else "bf16"), None


# The keys under which quantization configs list the modules they leave unquantized: compressed-tensors `ignore`
# (exact names or `re:` regexes), vLLM fp8 `ignored_layers` (prefixes), ModelOpt `exclude_modules` (wildcards),
# transformers' `modules_to_not_convert` (substrings).
_IGNORE_KEYS = ("ignore", "ignored_layers", "exclude_modules", "modules_to_not_convert")


def _ignored(entry: str, name: str) -> bool:
    if entry.startswith("re:"):
        return re.match(entry[3:], name) is not None     # compressed-tensors: re.match on the module name
    if any(c in entry for c in "*?["):
        return fnmatch.fnmatchcase(name, entry)
    return entry in name


def _unquantized_attention_layers(quant: dict, num_layers: int, source: str) -> int:
    """How many decoder layers' attention projections the quantization config leaves unquantized, probed on each
    layer's q_proj under the module names of text models and of multimodal wrappers (language_model.*)."""
    lists = [quant.get(key) or [] for key in _IGNORE_KEYS]
    entries = [e for names in lists if isinstance(names, list) for e in names]
    if not all(isinstance(names, list) for names in lists) or not all(isinstance(e, str) for e in entries):
        raise UserError(f"{source}: quantization_config's ignore lists must be lists of module names")
    try:
        return sum(1 for i in range(num_layers)
                   if any(_ignored(e, f"{prefix}model.layers.{i}.self_attn.q_proj")
                          for e in entries for prefix in ("", "language_model.")))
    except re.error as exc:
        raise UserError(f"{source}: quantization_config: a bad regex in its ignore list ({exc})") from None


def model_from_hf_config(cfg: dict, name: str, source: str = "config.json") -> ModelSpec:
    """Build a ModelSpec from the keys of a Hugging Face config.json (Llama, Qwen, Mixtral, DeepSeek, gpt-oss)."""
    if "text_config" in cfg:
        if not isinstance(cfg["text_config"], dict):
            raise UserError(f"{source}: text_config must be a mapping")
        cfg = {**cfg["text_config"], **{k: v for k, v in cfg.items() if k == "quantization_config"}}
    if not isinstance(cfg.get("quantization_config") or {}, dict):
        raise UserError(f"{source}: quantization_config must be a mapping")
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise UserError(f"{source} is missing required field(s): {', '.join(missing)}")

    def get(*keys, default=0) -> int:
        value = _first(cfg, *keys, default=default)
        return integer(value, f"{source}: {keys[0]}")
    heads = get("num_attention_heads")
    hidden = get("hidden_size")
    if heads < 1:
        raise UserError(f"{source}: num_attention_heads must be positive")
    num_experts = get("n_routed_experts", "num_local_experts", "num_experts")
    weight_dtype, expert_dtype = _weight_dtype(cfg)
    layer_types = cfg.get("layer_types") or []
    if not isinstance(layer_types, list):
        raise UserError(f"{source}: layer_types must be a list")
    sliding_layers = sum(1 for t in layer_types if t == "sliding_attention")
    intermediate = get("intermediate_size")
    moe_intermediate = get("moe_intermediate_size")
    if num_experts and not moe_intermediate:
        moe_intermediate = intermediate  # Mixtral and gpt-oss give the expert size as intermediate_size
    if not intermediate and not num_experts:
        raise UserError(f"{source} is missing required field: intermediate_size")
    notes = () if "max_position_embeddings" in cfg else (
        f"{source} has no max_position_embeddings: 131,072 tokens assumed as the longest context",)
    return ModelSpec(
        notes=notes,
        name=name,
        num_layers=get("num_hidden_layers"),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=get("num_key_value_heads", default=heads),
        head_dim=get("head_dim", default=hidden // heads),
        intermediate_size=intermediate,
        vocab_size=get("vocab_size"),
        weight_dtype=weight_dtype,
        expert_dtype=expert_dtype,
        block_quantized=weight_dtype == "fp8" and bool((cfg.get("quantization_config") or {}).get("weight_block_size")),
        unquantized_attention_layers=_unquantized_attention_layers(cfg.get("quantization_config") or {},
                                                                   get("num_hidden_layers"), source),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=get("max_position_embeddings", default=131072),
        num_experts=num_experts,
        experts_per_token=get("num_experts_per_tok", "experts_per_token"),
        num_shared_experts=get("n_shared_experts"),
        first_dense_layers=get("first_k_dense_replace"),
        moe_intermediate_size=moe_intermediate,
        kv_lora_rank=get("kv_lora_rank"),
        q_lora_rank=get("q_lora_rank"),
        qk_rope_head_dim=get("qk_rope_head_dim"),
        qk_nope_head_dim=get("qk_nope_head_dim"),
        v_head_dim=get("v_head_dim"),
        sliding_window=get("sliding_window") if sliding_layers else 0,
        num_sliding_layers=sliding_layers,
        hf_id=str(cfg.get("_name_or_path", "")),
    )


# ---- catalog ------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _catalog_configs() -> dict[str, dict]:
    text = resources.files("autotune.spec").joinpath("catalog/models.yaml").read_text()
    return yaml.safe_load(text)


def catalog() -> dict[str, ModelSpec]:
    return {name: model_from_hf_config(cfg, name, f"catalog entry {name}") for name, cfg in _catalog_configs().items()}


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").split("/")[-1]


def load_model(ref: str, download: bool = False) -> ModelSpec:
    """A catalog name (case-insensitive, with or without an org/ prefix), the Hub id of a catalog entry, a model
    directory, a config.json, or the Hub id of a model in the local Hugging Face cache (its config.json is fetched
    only when `download` says so)."""
    path = Path(ref)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise UserError(f"no config.json at {path}")
        return replace(_read_config(path), source=str(path.resolve().parent))
    configs = _catalog_configs()
    by_norm = {_normalise(n): n for n in configs}
    # The Hub id each entry was taken from (what `autotune models` prints) names it too; a catalog name wins a tie.
    by_hub = {cfg["_name_or_path"].lower(): n for n, cfg in configs.items() if cfg.get("_name_or_path")}
    key = by_norm.get(_normalise(ref)) or by_hub.get(ref.strip().lower())
    if key is not None:
        return model_from_hf_config(configs[key], key, f"catalog entry {key}")
    if HUB_ID.fullmatch(ref.strip()):
        cached = _hub_config(ref.strip(), download)
        if cached is not None:
            return replace(_read_config(cached), name=ref.strip().split("/")[-1], hf_id=ref.strip())
    close = difflib.get_close_matches(_normalise(ref), list(by_norm), n=3, cutoff=0.4)
    hint = f"; did you mean {', '.join(by_norm[c] for c in close)}?" if close else "; see `autotune models`"
    hub = (" nor in the local Hugging Face cache (--download fetches its config.json)"
           if HUB_ID.fullmatch(ref.strip()) else "")
    raise UserError(f"unknown model '{ref}': not in the catalog{hub}{hint}")


def _read_config(path: Path) -> ModelSpec:
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} is not a JSON object")
    return model_from_hf_config(cfg, path.parent.name or path.stem, str(path))


# A Hugging Face repository id: owner/name.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _hub_config(repo_id: str, download: bool) -> Path | None:
    """config.json of a Hub model from the local cache (huggingface_hub's layout and HF_HOME/HF_HUB_CACHE), or
    fetched (that file only) when `download` is given; None when it is not cached and not to be fetched."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cached = huggingface_hub.try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return Path(cached)
    if not download:
        return None
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, "config.json"))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise UserError(f"cannot fetch {repo_id}/config.json: {str(exc).splitlines()[0][:200]}") from None


def human_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.{1 if n / scale < 100 else 0}f}{unit}"
    return str(int(n))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


