"""Per-GPU memory: weights, activations and overheads, and what is left for the KV cache."""

from __future__ import annotations

import math
from dataclasses import dataclass

from autotune.sim.calibration import Efficiency
from autotune.spec.hardware import GIB, GpuSpec
from autotune.spec.layout import EngineKnobs, Layout
from autotune.spec.models import ModelSpec


@dataclass(frozen=True)
class StageShape:
    """The heaviest pipeline stage as one GPU of it sees it (all GPUs of a replica hold the same token count)."""

    layers: int
    moe_layers: int
    full_attention_layers: int
    sliding_layers: int
    non_expert_bytes: float     # attention, dense FFN, shared experts, routers, embeddings
    layer_bytes: float          # the decoder layers' share of them
    lm_head_bytes: float        # the LM head (on the last stage): a step reads it whole, where it only gathers one
                                # row per token from the input embedding
    expert_bytes: float         # routed experts held by this GPU
    kv_bytes_per_token: float   # grows with context
    kv_bytes_per_seq: float     # sliding-window layers: a fixed amount per sequence


def stage_shape(model: ModelSpec, layout: Layout, kv_dtype: str) -> StageShape:
    tp, pp = layout.tp, layout.pp
    layers = math.ceil(model.num_layers / pp)
    frac = layers / model.num_layers
    moe_layers = min(layers, model.num_moe_layers)
    sliding = math.ceil(model.num_sliding_layers / pp)
    full = layers - min(sliding, layers)
    # vLLM puts the embedding on the first stage and the LM head on the last; both are vocab-parallel over TP.
    embed = model.embedding_bytes if pp == 1 else model.embedding_bytes / (1 if model.tie_word_embeddings else 2)
    layer = model.non_expert_layer_bytes * frac / tp
    non_expert = layer + embed / tp
    lm_head = model.embedding_bytes / (1 if model.tie_word_embeddings else 2) / tp
    per_moe_layer = model.routed_expert_bytes / model.num_moe_layers if model.is_moe else 0.0
    # The expert layers of a MoE model form one group over dp x tp ranks: with --enable-expert-parallel each rank
    # holds whole experts, otherwise each holds a 1/(dp x tp) slice of every expert ("expert layers form a tensor
    # parallel group of size DP x TP": vLLM's data-parallel deployment docs; FusedMoEParallelConfig.make).
    expert = per_moe_layer * moe_layers / (layout.dp * tp)
    per_layer_kv = model.kv_bytes_per_token_per_layer(kv_dtype)
    if model.is_mla:
        # vLLM replicates the MLA latent cache on every TP rank: TP does not shrink it.
        heads_share = 1.0
    else:
        # KV heads are split over TP, or replicated (one per GPU) when TP exceeds them.
        heads_share = math.ceil(model.num_kv_heads / tp) / model.num_kv_heads
    kv_token = full * per_layer_kv * heads_share
    kv_seq = min(sliding, layers) * model.sliding_window * per_layer_kv * heads_share
    return StageShape(layers, moe_layers, full, min(sliding, layers), non_expert, layer, lm_head, expert, kv_token,
                      kv_seq)


@dataclass(frozen=True)
class MemoryPlan:
    gpu_bytes: float
    usable_bytes: float
    weight_bytes: float
    activation_bytes: float
    overhead_bytes: float
    kv_cache_bytes: float
    kv_bytes_per_token: float
    kv_bytes_per_seq: float
    block_size: int
    num_blocks: int
    kv_capacity_tokens: int
    problem: str | None

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def activation_bytes(model: ModelSpec, layout: Layout, knobs: EngineKnobs, eff: Efficiency) -> float:
    """Peak of vLLM's profiling forward pass: max_num_batched_tokens through one layer, plus sampler logits."""
    tokens = knobs.max_num_batched_tokens
    ffn = max(model.intermediate_size, model.moe_intermediate_size * max(model.experts_per_token, 1))
    per_token = (eff.activation_hidden_copies * model.hidden_size + eff.activation_ffn_copies * ffn / layout.tp) * 2
    logits = knobs.max_num_seqs * model.vocab_size * 4 * eff.logit_copies
    return tokens * per_token + logits


def plan_memory(model: ModelSpec, gpu: GpuSpec, layout: Layout, knobs: EngineKnobs,
                eff: Efficiency) -> MemoryPlan:
    """vLLM sizes the KV cache as gpu_memory_utilization x total - weights - peak activation - non-torch memory."""
    kv_dtype = knobs.kv_dtype_for(model)
    shape = stage_shape(model, layout, kv_dtype)
    weights = shape.non_expert_bytes + shape.expert_bytes
    act = activation_bytes(model, layout, knobs, eff)
    overhead = (eff.fixed_memory_gib + (eff.comm_buffer_gib if layout.world_size > 1 else 0.0)) * GIB
    usable = gpu.memory_bytes * knobs.gpu_memory_utilization
    kv_bytes = usable - weights - act - overhead
    block_bytes = shape.kv_bytes_per_token * knobs.block_size
    blocks = max(0, int(kv_bytes // block_bytes)) if kv_bytes > 0 else 0
    if knobs.num_gpu_blocks_override:
        blocks = knobs.num_gpu_blocks_override
    # vLLM v1 keeps one block aside as the null block (vllm/v1/core/block_pool.py).
    capacity = max(blocks - 1, 0) * knobs.block_size
    problem = None
    if weights + act + overhead > usable:
        problem = (f"does not fit: {weights / GIB:.1f} GiB of weights + {(act + overhead) / GIB:.1f} GiB of activations "
                   f"and overhead per GPU exceed {usable / GIB:.1f} GiB usable ({knobs.gpu_memory_utilization:.0%} of "
                   f"{gpu.name})")
    else:
        need = knobs.max_model_len + math.ceil(shape.kv_bytes_per_seq / max(shape.kv_bytes_per_token, 1.0))
        if capacity < need:
            problem = (f"KV cache holds {capacity:,} tokens per replica, less than one max_model_len "
                       f"sequence ({knobs.max_model_len:,}); vLLM refuses to start")
    return MemoryPlan(gpu.memory_bytes, usable, weights, act, overhead, max(kv_bytes, 0.0), shape.kv_bytes_per_token,
                      shape.kv_bytes_per_seq, knobs.block_size, blocks, capacity, problem)


