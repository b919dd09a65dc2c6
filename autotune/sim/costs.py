"""Step time of one engine step (one token for every running sequence): a roofline per pipeline stage plus
communication and CPU overhead. Pure arithmetic, each term named with its source."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import numpy as np
from numba import njit

from autotune.sim.calibration import Efficiency
from autotune.sim.memory import StageShape
from autotune.spec.hardware import Cluster
from autotune.spec.layout import DEFAULT_ALL2ALL, TOPK_ALL2ALL_BACKENDS, EngineKnobs, Layout
from autotune.spec.models import ModelSpec

BF16 = 2  # activations travel in bf16
# Kernels of one decoder layer on each GPU in a step (vllm/model_executor/models/llama.py under CUDA graphs): fused
# add+RMSNorm, QKV GEMM, rotary, KV-cache write, attention, O GEMM, fused add+RMSNorm, gate_up GEMM, SiLU-and-mul,
# down GEMM. The all-reduces are priced apart, in `_comm`.
DENSE_LAYER_KERNELS = 10
# A fused-MoE layer swaps the MLP's three for the router GEMM, top-k softmax, moe_align_block_size, two grouped
# GEMMs, the activation and the weighted sum (vllm/model_executor/layers/fused_moe/fused_moe.py).
MOE_LAYER_KERNELS = 14
# vLLM's custom all-reduce takes messages up to its buffer (max_size 8 MiB) on 2, 4, 6 or 8 GPUs that reach each
# other's memory (all over NVLink, or two GPUs); NCCL takes the rest (custom_all_reduce.py: should_custom_ar).
CUSTOM_ALLREDUCE_MAX_BYTES = 8 * 1024**2
CUSTOM_ALLREDUCE_WORLDS = (2, 4, 6, 8)


@dataclass(frozen=True)
class StepLines:
    """One step as lines in the context C it reads: GPU time = pp * (max(c0, m0) + max(c1*C, m1*C) + comm +
    kernels): the weight GEMMs' compute c0 against their weight reads m0, attention's compute c1*C against its KV
    reads m1*C (seconds per microbatch and stage); the engine's CPU work
    `overhead` adds to it (or hides behind it with async scheduling), and the API servers' output processing puts
    a floor `floor` under the step (see `combine`)."""

    c0: float
    c1: float
    m0: float
    m1: float
    comm: float
    kernels: float      # sampling and the kernels' latency floor, outside the layers' roofline
    overhead: float
    floor: float
    microbatches: int


def ring_allreduce_s(nbytes, ranks: int, bw: float, latency: float):
    # Ring all-reduce moves 2(p-1)/p of the buffer per rank (Patarasuk & Yuan 2009).
    return latency + 2 * (ranks - 1) / ranks * nbytes / bw


def allreduce_s(nbytes, ranks: int, bw: float, nccl_latency: float, custom_latency: float | None,
                multicast: bool = False):
    """One all-reduce of nbytes (a scalar or an array): vLLM's custom kernel (two shots over peer memory, the same
    2(p-1)/p traffic as a ring at a fraction of NCCL's latency) up to its buffer size, NCCL's ring above it or
    where the custom kernel does not apply (custom_latency None). On an NVSwitch fabric with multicast (NVLS), NCCL
    reduces in the switch instead: each GPU sends its buffer once and receives the sum once (NCCL 2.17 NVLS
    algorithm), where the ring sends and receives 2(p-1)/p of it."""
    latency = nccl_latency if custom_latency is None else \
        np.where(nbytes <= CUSTOM_ALLREDUCE_MAX_BYTES, custom_latency, nccl_latency)
    ring = ring_allreduce_s(nbytes, ranks, bw, latency)
    if not multicast:
        return ring
    nccl = np.minimum(ring, nccl_latency + nbytes / bw)      # NCCL picks NVLS where it is faster
    return nccl if custom_latency is None else np.where(nbytes <= CUSTOM_ALLREDUCE_MAX_BYTES, ring, nccl)


def narrowed_share(loss: float, split: float) -> float:
    """The share of HBM bandwidth left to reads split `split` ways over GPUs, at `loss` per halving (empirical:
    Calibration.tp_bw_loss); the floor keeps a wild calibration physical."""
    return max(0.5, 1.0 - loss * math.log2(split))


def gemm_flops(params, rows, ramp):
    """FLOPs at the full rate of a GEMM of `rows` rows against `params` weights: 2 per weight per row (Kaplan et al.
    2020), and a GEMM of M rows runs at flops x M/(M + ramp), so it costs as M + ramp rows (below one tile of rows
    the tensor cores idle: CUTLASS/cuBLAS tile shapes)."""
    return 2 * params * (rows + ramp)


def gqa_attention_flops(heads, head_dim, context):
    # QK^T and PV: 2 x 2 x head_dim FLOPs per query head per cached token.
    return 4 * heads * head_dim * context


def touched_fraction(tokens: float, experts: int, top_k: int) -> float:
    # Each token picks top_k of E experts: P(an expert is untouched) = (1 - k/E)^tokens under uniform routing.
    return 1.0 - (1.0 - top_k / experts) ** tokens


class StepCost:
    """Precomputed per-layout coefficients so one step, or a run of decode steps, costs O(1)."""

    def __init__(self, model: ModelSpec, cluster: Cluster, layout: Layout, shape: StageShape, eff: Efficiency,
                 knobs: EngineKnobs):
        gpu = cluster.gpu
        self.model, self.layout, self.shape, self.eff = model, layout, shape, eff
        self.pp, self.tp, self.dp, self.ep = layout.pp, layout.tp, layout.dp, layout.ep
        # FP8 weights run the weight GEMMs at the FP8 rate; attention and the (unquantised) LM head stay in BF16.
        self.peak_flops = gpu.tflops(model.weight_dtype) * 1e12
        self.peak_bw = gpu.hbm_tb_s * 1e12
        self.bf16_rate = gpu.tflops("bf16") * 1e12 * eff.flops
        self.bw = self.peak_bw * eff.hbm
        # Reads slow down where parallelism narrows what each GPU reads of one unit of work (`tp_bw_loss` per
        # halving): a KV head group split over TP (fewer KV heads per GPU, fewer attention blocks per sequence;
        # MLA's latent cache stays whole on every rank) and an expert's columns sliced over the dp x tp expert group
        # without EP (fused-MoE tiles over narrower shards). The dense layers' full-width GEMVs keep their rate.
        kv_split = 1.0 if model.is_mla else model.num_kv_heads / math.ceil(model.num_kv_heads / self.tp)
        self.kv_bw = self.bw * narrowed_share(eff.tp_bw_loss, kv_split)
        self.expert_share = narrowed_share(eff.tp_bw_loss, self.dp * self.tp if model.is_moe and self.ep == 1 else 1)
        # Block-scaled FP8 GEMMs reach a smaller share of both rooflines than per-tensor ones (`fp8_block_gemm`).
        block = eff.fp8_block_gemm if model.block_quantized else 1.0
        self.gemm_rate, self.weight_bw = self.peak_flops * eff.flops * block, self.bw * block
        # Quantised experts' kernels run below their roofline at prefill sizes: MXFP4 dequantises its weights inside
        # the GEMM, and FP8's Triton fused MoE reaches a fraction of the BF16 GEMMs' rate whatever FP8's peak says.
        # Each row they multiply runs at that share of the BF16 rate, while the few-row GEMMs of decode stay bound by
        # their tiles (the ramp) and weight reads as before.
        share = {"mxfp4": eff.mxfp4_moe_gemm, "fp8": eff.fp8_moe_gemm}.get(model.expert_dtype or model.weight_dtype)
        self.expert_row_cost = self.gemm_rate / (self.bf16_rate * share) if model.is_moe and share else 1.0
        # Achieved over peak rates (of the weight GEMMs, which dominate): an ideal (roofline) time is an achieved
        # time times these.
        self.flop_scale, self.bw_scale = self.gemm_rate / self.peak_flops, self.weight_bw / self.peak_bw
        self.kv_scale = self.kv_bw / self.peak_bw * eff.kv_read
        # TP shrinks each GPU's work but not its kernel count: small models at high TP run into this floor.
        kernels = shape.layers * DENSE_LAYER_KERNELS + shape.moe_layers * (MOE_LAYER_KERNELS - DENSE_LAYER_KERNELS)
        self.kernels = kernels * eff.kernel_floor_s
        # Every TP rank gathers the whole vocabulary's logits and samples every sequence (LogitsProcessor's
        # all-gather, vllm/v1/sample/sampler.py): this part of a step does not shrink with TP.
        self.sample_per_seq = model.vocab_size * eff.sampler_bytes_per_logit / self.bw
        frac = shape.layers / model.num_layers
        lm_head = model.vocab_size * model.hidden_size
        # The weights one token multiplies on this GPU's share of the stage, outside the routed experts and in them.
        self.dense_params = (model.compute_params_per_token - lm_head - model.num_moe_layers
                             * model.experts_per_token * model.expert_params) * frac / self.tp
        # Attention projections a quantized checkpoint leaves in BF16 multiply at the BF16 rate: counted among
        # weights of the quantized rate, each weighs gemm_rate / bf16_rate of one.
        self.dense_params += (model.unquantized_attention_params * frac / self.tp
                              * (self.gemm_rate / self.bf16_rate - 1))
        expert_params = model.experts_per_token * model.expert_params * shape.moe_layers / self.tp
        self.expert_params = expert_params * (eff.expert_imbalance if self.ep > 1 else 1.0)
        # The LM head runs on the hidden state of each sequence's last scheduled token only, not on every prompt
        # token of a prefill chunk (vllm/v1/worker/gpu_model_runner.py: logits_indices), vocab-parallel over TP.
        self.logits_s_per_seq = gemm_flops(lm_head / self.tp, 1, 0) / self.bf16_rate
        heads = model.num_heads / self.tp
        if model.is_mla:
            # Absorbed MLA decode: q.[c;k_rope] and p.c per head per cached token (DeepSeek-V2, appendix C).
            self.attn_flops_per_ctx = 2 * shape.layers * heads * (2 * model.kv_lora_rank + model.qk_rope_head_dim)
        else:
            self.attn_flops_per_ctx = shape.full_attention_layers * gqa_attention_flops(heads, model.head_dim, 1)
        self.kv_read_per_ctx = shape.kv_bytes_per_token
        per_node = cluster.gpus_per_node
        intra = cluster.intra_node_gb_s(eff.link) * 1e9
        inter = gpu.inter_node_gb_s * 1e9 * eff.link
        self.tp_bw, self.tp_lat = (intra, eff.allreduce_latency_s) if self.tp <= per_node else (inter, eff.internode_latency_s)
        # The custom kernel and NVLS both write into peer memory: without P2P, NCCL's host-memory path takes all.
        custom = (cluster.p2p and self.tp <= per_node and self.tp in CUSTOM_ALLREDUCE_WORLDS
                  and (gpu.nvlink or self.tp == 2))
        self.tp_custom_lat = eff.custom_allreduce_latency_s if custom else None
        self.tp_multicast = cluster.p2p and self.tp <= per_node and gpu.multicast
        self.ep_bw = intra if self.dp * self.tp <= per_node else inter     # the expert group spans dp x tp
        # vLLM's all2all kernels run only with EP across DP ranks (fused_moe/config.py: use_all2all_kernels =
        # dp_size > 1 and use_ep); without EP, DP falls back to all-gather and reduce-scatter whatever the backend.
        self.all2all = knobs.all2all_backend if self.ep > 1 else DEFAULT_ALL2ALL
        # The DP engines of a MoE model step together: every step all-reduces their token counts first
        # (coordinate_batch_across_dp, vllm/v1/worker/dp_utils.py), an engine without work runs a dummy batch
        # (DPEngineCoreProc, vllm/v1/engine/core.py), and every expert layer waits for all of them; so each step
        # takes the slowest engine's time (engine._round).
        self.lockstep = model.is_moe and self.dp > 1
        self.pp_bw = intra if self.tp * self.pp <= per_node else inter
        self.overhead_base = eff.step_overhead_s
        # The multiprocess executor's broadcast of each step to the tp x pp workers sits between the scheduler and
        # the GPU launch: async scheduling does not hide it (vllm/v1/executor/multiproc_executor.py).
        self.serial = eff.multiproc_overhead_s if self.tp * self.pp > 1 else 0.0
        # vLLM's async scheduling (on by default since it matured, off with PP on the V1 model runner:
        # vllm/config/vllm.py) prepares step k+1 while the GPU runs step k.
        self.async_scheduling = knobs.async_scheduling_for(layout)
        # With PP the engine core keeps up to pp batches in flight (EngineCore.step_with_batch_queue): it schedules
        # and processes the outputs of one batch while the others run, so its CPU work overlaps the GPUs as well.
        self.overlapped = self.async_scheduling or self.pp > 1
        # A running request rides in the batch it was scheduled in until its token is back, and the scheduler fills
        # each batch greedily up to max_num_seqs / pp (vLLM PR #28286): fewer sequences than that make fewer
        # batches than stages, and the other stages idle.
        self.batch_cap = math.ceil(knobs.max_num_seqs / self.pp) if knobs.max_num_seqs else 1
        # Every DP engine's tokens are detokenised and streamed by the API server processes, shared by all engines.
        api_servers = knobs.api_servers_for(layout)
        self.frontend_s_per_token = self.dp / (api_servers * eff.api_server_tok_s)
        # A request reaches the engine core after its API server's tokeniser is done with it (HTTP, tokenisation,
        # ZMQ hop); a busy tokeniser takes the prompts sent meanwhile as its next batch (engine._tokenise).
        self.ingress = np.array([api_servers, eff.frontend_latency_s, eff.tokenize_s_per_token])
        self._cache: dict[int, StepLines] = {}

    # ---- per-microbatch terms ------------------------------------------------------------
    def _comm_tokens(self, tokens):
        """Communication that grows with the tokens of a microbatch (a scalar or an array of token counts), outside the
        routed experts (_expert_terms)."""
        m, s, e = self.model, self.shape, self.eff
        t = 0.0
        if self.tp > 1:
            # Two all-reduces per layer: after attention and after the MLP (Megatron-LM, Shoeybi et al. 2019).
            t += 2 * s.layers * allreduce_s(tokens * m.hidden_size * BF16, self.tp, self.tp_bw, self.tp_lat,
                                            self.tp_custom_lat, self.tp_multicast)
        if self.pp > 1:
            # Hand hidden states and residual to the next stage: metadata over the CPU group, then each TP rank sends
            # its 1/tp slice and the receiving ranks all-gather them (send_tensor_dict with all_gather_group,
            # vllm/distributed/parallel_state.py).
            handoff = 2 * tokens * m.hidden_size * BF16
            t += e.p2p_latency_s + handoff / self.tp / self.pp_bw
            if self.tp > 1:
                t += self._tp_allgather_s(handoff)
        return t

    def _moe_exchange_bytes(self, tokens):
        """Bytes one GPU sends and receives in one MoE layer so that the DP ranks' tokens (dp > 1, in lockstep, with
        EP or without) meet their experts. vLLM's default all2all backend (allgather_reducescatter) all-gathers every
        DP rank's hidden states and reduce-scatters the expert outputs back, (dp-1)/dp of the gathered tokens each
        way; "naive" broadcasts the same way and combines by an all-reduce, twice the bytes back. The top-k kernels
        (DeepEP, FlashInfer) send each of this TP rank's share of the tokens once to every other rank that hosts one
        of its experts: ep x (1 - (1 - 1/ep)^k) ranks under uniform routing (deepseek-ai/DeepEP README)."""
        m = self.model
        if self.all2all in TOPK_ALL2ALL_BACKENDS:
            ranks = self.ep * (1 - (1 - 1 / self.ep) ** m.experts_per_token)
            return 2 * tokens / self.tp * ranks * (self.ep - 1) / self.ep * m.hidden_size * BF16
        gather = tokens * self.dp * m.hidden_size * BF16 * (self.dp - 1) / self.dp
        return gather * (3 if self.all2all == "naive" else 2)

    def _logits_s(self, seqs):
        """The LM head's compute for the sequences a microbatch samples."""
        return self.logits_s_per_seq * seqs

    def _comm_seqs(self, seqs):
        """Communication that grows with the sequences a microbatch samples."""
        # The sampled rows' bf16 logits, vocab-parallel, all-gathered to every rank.
        return self._tp_allgather_s(seqs * self.model.vocab_size * BF16) if self.tp > 1 else 0.0 * seqs

    def _tp_allgather_s(self, nbytes):
        # An all-gather over the TP group: (p-1)/p of the gathered buffer arrives at each rank.
        return self.tp_lat + (self.tp - 1) / self.tp * nbytes / self.tp_bw

    def _expert_terms(self, tokens):
        """(c0, weights, comm) of the routed experts when every DP engine brings a microbatch of `tokens` tokens: the
        engines' tokens meet in the expert layers, so in lockstep their mean prices these terms (engine._round)."""
        m, s, e = self.model, self.shape, self.eff
        if not m.is_moe:
            return 0.0 * tokens, 0.0 * tokens, 0.0 * tokens
        touched = touched_fraction(tokens * self.dp, m.num_experts, m.experts_per_token)
        # Each touched expert's GEMM pays the ramp on its own few rows: ramp x touched experts, in this GPU's
        # tokens (tokens x top_k spread over E experts).
        expert_ramp = e.moe_gemm_ramp_tokens * touched * m.num_experts / m.experts_per_token / self.dp
        c0 = gemm_flops(self.expert_params, tokens * self.expert_row_cost, expert_ramp) / self.gemm_rate
        comm = s.moe_layers * e.moe_routing_s + 0.0 * tokens
        if self.dp > 1:
            # With DP = 1 the TP ranks already hold every token: EP needs no exchange, its partial outputs sum in
            # the MLP's all-reduce.
            comm = comm + s.moe_layers * (2 * e.alltoall_latency_s + self._moe_exchange_bytes(tokens) / self.ep_bw)
        return c0, s.expert_bytes * touched / (self.weight_bw * self.expert_share), comm

    def _token_terms(self, tokens):
        """(c0, weights, comm) of a microbatch of `tokens` tokens: what grows with the tokens it computes."""
        s = self.shape
        expert_c0, expert_weights, expert_comm = self._expert_terms(tokens)
        # A step reads every weight it multiplies: the layers' (the experts its tokens touch) and the LM head (BF16 in
        # quantised checkpoints), not the input embedding table, of which it gathers one row per token.
        weights = s.layer_bytes / self.weight_bw + expert_weights + s.lm_head_bytes / self.bw
        c0 = gemm_flops(self.dense_params, tokens, self.eff.gemm_ramp_tokens) / self.gemm_rate + expert_c0
        return c0, weights, self._comm_tokens(tokens) + expert_comm

    def _coeffs(self, num_seqs, prefill_tokens, microbatches) -> StepLines:
        """The step's lines for a running-sequence count, or an array of them (the one place the formula lives)."""
        c0, weights, comm = self._token_terms((num_seqs + prefill_tokens) / microbatches)
        c0 = c0 + self._logits_s(num_seqs / microbatches)
        c1 = self.attn_flops_per_ctx / microbatches / self.bf16_rate
        m1 = self.kv_read_per_ctx / microbatches / (self.kv_bw * self.eff.kv_read)
        # The scheduler's fixed cost is per batch: with PP, `microbatches` batches make one step of every sequence.
        overhead = self.overhead_base * microbatches + self.eff.seq_overhead_s * num_seqs
        floor = self.frontend_s_per_token * num_seqs
        kernels = self.kernels + self.sample_per_seq * num_seqs / microbatches
        return StepLines(c0, c1, weights, m1, comm + self._comm_seqs(num_seqs / microbatches),
                         kernels, overhead, floor, microbatches)

    def lines(self, num_seqs: int, prefill_tokens: int = 0) -> StepLines:
        """Coefficients of a step with num_seqs decoding sequences and prefill_tokens new prompt tokens."""
        if prefill_tokens:
            return self._coeffs(num_seqs, prefill_tokens, self.batches(num_seqs))
        cached = self._cache.get(num_seqs)
        if cached is None:
            cached = self._cache[num_seqs] = self._coeffs(num_seqs, 0, self.batches(num_seqs))
        return cached

    def batches(self, num_seqs):
        """Batches in flight (the pipeline's microbatches) for a running-sequence count, or an array of them."""
        if isinstance(num_seqs, np.ndarray):
            return np.clip(np.ceil(num_seqs / self.batch_cap), 1, self.pp)
        return max(1, min(self.pp, math.ceil(num_seqs / self.batch_cap)))

    @cached_property
    def params(self) -> np.ndarray:
        """The scalars the compiled formulas need beside a step's lines (indexed by the P_* constants)."""
        return np.array([self.pp, self.serial, float(self.overlapped), self.flop_scale, self.bw_scale, self.kv_scale,
                         self.attn_flops_per_ctx / self.bf16_rate, float(self.async_scheduling)])

    def ingress_s(self, prompt_tokens: float) -> float:
        """From a request's send to its arrival in the engine core, when it finds its API server's tokeniser idle."""
        return self.eff.frontend_latency_s + self.eff.tokenize_s_per_token * prompt_tokens

    def table(self, max_seqs: int, max_tokens: int) -> "StepTable":
        """Every step the engine can take, tabulated once for the compiled engine: the lines of a decode step by
        running-sequence count n (0..max_seqs), and the token terms of a step that also prefills, by batches in
        flight and total tokens (decoded plus prefilled, 0..max_tokens). Computed by _coeffs and _token_terms,
        so the formulas stay in one place."""
        n = np.arange(max_seqs + 1, dtype=float)
        mb = self.batches(n)
        ln = self._coeffs(n, 0, mb)
        decode = np.stack([np.broadcast_to(np.asarray(v, dtype=float), n.shape) for v in
                           (ln.c0, ln.c1, ln.m0, ln.m1, ln.comm, ln.kernels, ln.overhead, ln.floor,
                            ln.microbatches, self._comm_seqs(n / mb), self._logits_s(n / mb))], axis=1)
        tokens = np.arange(max_tokens + 1, dtype=float)
        mixed = np.zeros((self.pp, max_tokens + 1, 6))
        for b in range(1, self.pp + 1):
            for i, v in enumerate((*self._token_terms(tokens / b), *self._expert_terms(tokens / b))):
                mixed[b - 1, :, i] = v
        return StepTable(np.ascontiguousarray(decode), mixed, self.params)

    def step_time(self, num_seqs: int, context: float, prefill_tokens: int = 0,
                  prefill_context: float = 0.0) -> tuple[float, float, float]:
        """One step: decodes read `context` cached tokens; the prefill chunk attends over `prefill_context`.
        Returns (time, its CPU overhead, the roofline-ideal time)."""
        ln = self.lines(num_seqs, prefill_tokens)
        return step_from_lines(ln.c0, ln.c1, ln.m0, ln.m1, ln.comm, ln.kernels, ln.overhead, ln.floor,
                               ln.microbatches, self.params, context, prefill_context)


class StepTable(NamedTuple):
    """StepCost.table: `decode[n]` holds the D_* columns, `mixed[batches - 1, tokens]` the (c0, weights, comm)
    token terms and then the routed experts' share of them, `params` the P_* scalars."""

    decode: np.ndarray
    mixed: np.ndarray
    params: np.ndarray


# Columns of StepTable.decode and entries of StepCost.params.
D_C0, D_C1, D_M0, D_M1, D_COMM, D_KERNELS, D_OVERHEAD, D_FLOOR, D_MB, D_COMM_SEQS, D_LOGITS = range(11)
P_PP, P_SERIAL, P_OVERLAPPED, P_FLOP_SCALE, P_BW_SCALE, P_KV_SCALE, P_PREFILL_ATTN, P_ASYNC = range(8)

# Where the time of a run of steps went: indexes into the tuples decode_run returns.
TOTAL, COMPUTE, WEIGHTS, KV, COMM, KERNELS, OVERHEAD, BUBBLE, IDEAL = range(9)
PHASE_FIELDS = ("total", "compute", "weights", "kv", "comm", "kernels", "overhead", "bubble", "ideal")


@njit(cache=True)
def combine(gpu, cpu, floor, overlapped):
    """Wall time of steps from their GPU time, the engine's CPU time and the output-processing floor (scalars, or
    sums over a run of steps). Synchronous scheduling runs the CPU work between GPU steps; async scheduling hides it
    behind the GPU (vLLM v1 AsyncScheduler); the API servers process step k's tokens while step k+1 runs, so they
    slow the engine only when they are the slower stage of that pipeline."""
    return max(max(gpu, cpu), floor) if overlapped else max(gpu + cpu, floor)


@njit(cache=True)
def step_from_lines(c0, c1, m0, m1, comm, kernels, overhead, floor, mb, params, context, prefill_context):
    """One step's (time, CPU overhead, roofline-ideal time) from its lines. The weight GEMMs and attention are
    separate kernels, one after the other: each is bound by its own roofline, compute or memory, and their times add
    (a roofline per operator, Williams et al. CACM 2009; InferSim's layers/attn.py), so compute-bound GEMMs of a big
    batch do not hide behind the memory-bound attention of its long contexts."""
    # A prefill chunk's attention is compute-bound: it reads its context once but multiplies by every new token.
    attention = c1 * context + params[P_PREFILL_ATTN] * prefill_context
    kv = m1 * context
    ideal = mb * (max(c0 * params[P_FLOP_SCALE], m0 * params[P_BW_SCALE])
                  + max(attention * params[P_FLOP_SCALE], kv * params[P_KV_SCALE]))
    gpu = params[P_PP] * (max(c0, m0) + max(attention, kv) + comm + kernels)
    total = combine(gpu + params[P_SERIAL], overhead, floor, params[P_OVERLAPPED] > 0)
    return total, total - gpu, ideal


@njit(cache=True)
def mixed_step(row, tok, params, context, prefill_context):
    """A step that decodes the n sequences of the decode lines `row` (a StepTable.decode row) and prefills chunks
    whose tokens make the token terms `tok` (a StepTable.mixed entry at n plus the chunks' tokens): the token terms
    replace the decode step's (compute, weight reads, communication), the rest (attention, per-sequence costs) stays
    the decode step's."""
    return step_from_lines(tok[0] + row[D_LOGITS], row[D_C1], tok[1], row[D_M1],
                           tok[2] + row[D_COMM_SEQS], row[D_KERNELS], row[D_OVERHEAD], row[D_FLOOR], row[D_MB],
                           params, context, prefill_context)


@njit(cache=True)
def decode_run(row, params, n, context0, steps):
    """`steps` decode steps of n sequences whose total context grows by n tokens a step, in closed form, from the
    decode lines `row` (a StepTable.decode row). Returns the time split as PHASE_FIELDS."""
    pp = params[P_PP]
    # The GEMMs cost the same every step; attention's compute and KV reads both grow with the context, so one of
    # them binds for the whole run: its sum is its rate times the run's summed context.
    context = steps * context0 + n * steps * (steps - 1) / 2
    c0, m0 = row[D_C0], row[D_M0]
    attention, reads = row[D_C1] * context, row[D_M1] * context    # summed over the run
    comp = (c0 * steps if c0 >= m0 else 0.0) + (attention if attention >= reads else 0.0)
    weights = m0 * steps if m0 > c0 else 0.0
    kv = reads if reads > attention else 0.0
    gpu = pp * (comp + weights + kv)
    comm = pp * row[D_COMM] * steps
    kernels = pp * row[D_KERNELS] * steps
    # The CPU time and the floor are constant per step while the GPU time grows slowly with context: comparing the
    # sums is exact unless they cross inside the run.
    total = combine(gpu + comm + kernels + params[P_SERIAL] * steps, row[D_OVERHEAD] * steps, row[D_FLOOR] * steps,
                    params[P_OVERLAPPED] > 0)
    mbs = row[D_MB]
    ideal = mbs * (max(c0 * params[P_FLOP_SCALE], m0 * params[P_BW_SCALE]) * steps
                   + max(attention * params[P_FLOP_SCALE], reads * params[P_KV_SCALE]))
    return (total, pp * comp, pp * weights, pp * kv, comm, kernels, total - gpu - comm - kernels,
            (gpu + comm + kernels) * (pp - mbs) / pp, ideal)


@njit(cache=True)
def steps_within(row, params, n, context0, budget_s, max_steps):
    """The fewest decode steps whose time reaches budget_s (at most max_steps): the step an arrival lands in."""
    first = decode_run(row, params, n, context0, 1)[0]
    if first >= budget_s:
        return 1
    # A step never takes less than the one before it (the context only grows), so k steps take at least k first
    # steps, and at most k of the last: the answer lies in a narrow bracket, found in a few evaluations.
    hi = math.ceil(budget_s / first)
    if hi >= max_steps:
        if decode_run(row, params, n, context0, max_steps)[0] < budget_s:
            return max_steps
        hi = max_steps
    top = decode_run(row, params, n, context0, hi)[0]
    last = top - decode_run(row, params, n, context0, hi - 1)[0]
    lo = max(1, min(hi - 1, math.floor(budget_s / last)))     # total(lo) <= lo x last <= budget_s
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if decode_run(row, params, n, context0, mid)[0] >= budget_s:
            hi = mid
        else:
            lo = mid
    return hi
