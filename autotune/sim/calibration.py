"""Achieved-efficiency factors: the one place the simulator's fudge lives, replaceable by a calibration file."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields, replace, asdict
from pathlib import Path

import yaml

from autotune.errors import UserError
from autotune.spec.hardware import load_gpu


@dataclass(frozen=True)
class Efficiency:
    hbm: float = 0.80                   # achieved/peak HBM bandwidth of the weight GEMVs in decode (a prior between
                                        # cuBLAS BF16 at decode sizes, ~3.0 of 3.35 TB/s on H100, vLLM PR #13917,
                                        # and what a step's mix of smaller GEMVs reaches)
    kv_read: float = 0.90               # paged-attention KV reads relative to `hbm` (gathers over scattered blocks;
                                        # FA3 with 8-token pages reads 1.80-1.85 TB/s on H100, 0.67-0.69 of
                                        # `hbm`'s rate: flash-attention issue #1572; larger pages and batches read
                                        # faster, and the prior set on that side held up better on the validation
                                        # rows)
    flops: float = 0.60                 # achieved/peak tensor FLOP/s of a prefill's large GEMMs and attention
                                        # (cuBLAS bf16 on H100 reaches 650-750 of 989 TFLOP/s on square GEMMs; a
                                        # layer's mix of shapes, norms and attention sits near 60%)
    fp8_block_gemm: float = 0.6         # block-scaled FP8 GEMMs (128x128 weight scales, per-token-group activation
                                        # scales) against the FP8 roofline at the BF16 GEMMs' shares, in FLOP/s and
                                        # in bytes/s. On H100: DeepGEMM reads weights at ~1.9 TB/s at decode sizes
                                        # where cuBLAS BF16 reads ~3.0 (0.62, vLLM PR #13917) and reaches ~970
                                        # TFLOP/s at M = 1024 (0.73 of 2x BF16's ~670); vLLM's CUTLASS and Triton
                                        # block kernels reach 400-490 TFLOP/s at M >= 2048 (0.3-0.37) and are
                                        # slower still at decode sizes on narrow shapes (vLLM PR #23280)
    mxfp4_moe_gemm: float = 0.43        # MXFP4 expert GEMMs (gpt-oss; weights dequantised in the kernel, W4A16 Marlin
                                        # on Hopper) against the BF16 GEMMs' FLOP/s share at prefill sizes: a Marlin
                                        # MXFP4 MoE in a live server prefilling 16k-token chunks on H100 ran at 254
                                        # TFLOP/s, 25.7% of BF16 peak, "issue-bound, not bandwidth-bound" (sglang PR
                                        # #38884), i.e. 0.43 of `flops`. Blackwell's FP8 x MXFP4 kernels may do better
                                        # (811 TFLOP/s at 8192 rows, triton PR #10114): no server figure yet
    fp8_moe_gemm: float = 0.34          # FP8 expert GEMMs (Triton fused MoE, W8A8) against the BF16 GEMMs' FLOP/s
                                        # share at prefill sizes, whatever the FP8 roofline says: vLLM's
                                        # benchmark_moe.py on H100, Qwen3-30B-A3B fp8_w8a8 (E=128, N=768, K=2048,
                                        # top-8), 1,648 us at 4,096 tokens and 912 us at 2,048: 188 and 170 TFLOP/s,
                                        # 0.19 of BF16 peak, about 6x the modelled FP8 row cost (vLLM PR #24700);
                                        # it holds for per-channel FP8 experts through CUTLASS as well: Scout
                                        # FP8-dynamic's offline gsm8k batch at TP4 (vLLM PR #16537) is predicted
                                        # within 2.2% with it, +47% at 1.0 (a test-split row, never fitted)
    gemm_ramp_tokens: float = 23.0      # a dense GEMM of M rows runs at flops x M/(M + this): its tiles idle part of
                                        # the matrix units at few rows. H100 BF16 torch.matmul reaches 544 TFLOP/s at
                                        # 256 rows (N=6144, K=4096: vLLM PR #17126) and 593 (N=43008, K=5376: vLLM PR
                                        # #49363), i.e. `flops` x 989 at a ramp of 23 and 0 rows; below ~200 rows
                                        # those GEMMs are bound by their weight reads anyway
    moe_gemm_ramp_tokens: float = 128.0  # the same for each routed expert's grouped GEMM (fused MoE pads each expert's
                                        # few rows to whole blocks, moe_align_block_size, and runs them far below the
                                        # dense rate): the value the single ramp had before the dense GEMMs got their
                                        # measured one, kept on the MoE rows' evidence (README, "Accuracy")
    kernel_floor_s: float = 2.0e-6      # the least a kernel takes inside a CUDA graph, however small its work
                                        # (launch, ramp-up and tail of one grid; Nsight traces of decode steps)
    sampler_bytes_per_logit: float = 32.0  # HBM traffic of sampling per vocabulary entry of each sequence: fp32
                                        # cast, temperature, softmax, top-k/top-p passes (vllm/v1/sample/sampler.py)
    tp_bw_loss: float = 0.15            # HBM efficiency lost per halving of a KV head group or an expert's
                                        # columns over GPUs (costs.narrowed_share): empirical, what the modelled TP
                                        # costs leave out
    link: float = 0.75                  # achieved/peak NVLink or network bandwidth in collectives
    custom_allreduce_latency_s: float = 8e-6  # vLLM's custom all-reduce over peer memory, messages up to 8 MiB
                                        # (vllm/distributed/device_communicators/custom_all_reduce.py; PR #2192)
    allreduce_latency_s: float = 25e-6  # one NCCL all-reduce within a node (nccl-tests small-message latency)
    internode_latency_s: float = 35e-6  # one collective across nodes (NCCL over InfiniBand)
    p2p_latency_s: float = 100e-6       # one PP stage hand-off: its metadata pickled over the gloo CPU group, then
                                        # the NCCL send/recv (send_tensor_dict, vllm/distributed/parallel_state.py)
    alltoall_latency_s: float = 30e-6   # one MoE dispatch or combine across DP ranks
    moe_routing_s: float = 25e-6        # top-k, permute and align kernels of one MoE layer
    expert_imbalance: float = 1.25      # busiest EP rank's tokens over the mean
    step_overhead_s: float = 0.6e-3     # scheduler, sampler and input preparation of one engine step
    seq_overhead_s: float = 4e-6        # the same, per running sequence
    multiproc_overhead_s: float = 1.0e-3  # MultiprocExecutor broadcast to tp x pp workers, per step
    # The frontend (vllm/entrypoints/openai + vllm/v1/engine/async_llm.py): HTTP parsing, tokenisation and the ZMQ
    # hop to the engine core before a request is scheduled, and detokenisation + SSE streaming of every output token
    # in the API server processes, pipelined with the engine (vLLM V1 architecture blog, Jan 2025).
    frontend_latency_s: float = 4e-3    # from the client's send to the engine's queue, per tokeniser batch (HTTP,
                                        # the batch's wait, the ZMQ hop), besides its prompts' tokenising; the
                                        # shipped default (DEFAULT, below: fitted) also carries the first token's
                                        # way back, which a client's TTFT and E2E count as they count this
    tokenize_s_per_token: float = 1e-6  # the API server's tokeniser, per prompt token of a batch, one worker: "for
                                        # concurrency=1, DGX H100's CPU can do only about 1k tokens/ms" (vLLM issue
                                        # #19012, which led to micro-batched tokenisation, PR #19334)
    api_server_tok_s: float = 30000.0   # output tokens/s one API server process detokenises and streams
    fixed_memory_gib: float = 1.5       # CUDA context, CUDA graphs, allocator slack
    # vLLM's profiling forward pass (gpu_worker.determine_available_memory) peaks in one layer: bf16 copies per
    # token of the hidden size (hidden states, residual, QKV, attention output) and of the gated FFN's TP shard.
    activation_hidden_copies: float = 6.0
    activation_ffn_copies: float = 3.0
    logit_copies: float = 2.0           # fp32 logits of the sampled rows and the sampler's temporary copy
    last_block_fill: float = 0.5        # a sequence's last KV block is this full on average (uniform lengths)
    comm_buffer_gib: float = 0.5        # NCCL and custom all-reduce buffers when world > 1
    # Board power as a share of TDP (energy figures; approximate, not validated against measured energy): prompt
    # GEMMs run near the power limit and token generation well below it (Splitwise, Patel et al., ISCA 2024, on
    # DGX-H100); a GPU waiting on the CPU, a pipeline bubble or for work draws about a tenth (nvidia-smi: an idle
    # H100 SXM draws 60-90 W of 700 W).
    power_compute_frac: float = 0.9
    power_memory_frac: float = 0.6
    power_idle_frac: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, overrides: dict, where: str) -> "Efficiency":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise UserError(f"{where}: unknown efficiency factor(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            values = {k: float(v) for k, v in overrides.items()}
        except (TypeError, ValueError) as exc:
            raise UserError(f"{where}: efficiency factors are numbers ({exc})") from None
        fractions = ("hbm", "kv_read", "flops", "fp8_block_gemm", "mxfp4_moe_gemm", "fp8_moe_gemm", "link",
                     "last_block_fill", "power_compute_frac", "power_memory_frac", "power_idle_frac")
        bad = [k for k, v in values.items() if v < 0 or (k in fractions and not 0 < v <= 1)]
        if bad:
            raise UserError(f"{where}: out of range: {', '.join(bad)} ({', '.join(fractions)} in (0, 1]; others >= 0)")
        return replace(self, **values)


def descend(eff: Efficiency, bounds: dict[str, tuple[float, float]], loss: Callable[[Efficiency], float],
            steps: tuple[float, ...] = (0.5, 0.8, 1.25, 2.0), rounds: int = 3) -> Efficiency:
    """Coordinate descent over the factors named in `bounds`, in multiplicative steps clipped to each factor's
    (lo, hi), minimising loss(eff); a factor at zero restarts from lo x step. The one fitting loop behind
    `autotune calibrate`, bench/accuracy.py and bench/gpu_probe.py."""
    best = loss(eff)
    for _ in range(rounds):
        improved = False
        for name, (lo, hi) in bounds.items():
            for step in steps:
                current = getattr(eff, name)
                value = min(max(current * step, lo), hi) if current else lo * step
                if value == current:
                    continue
                trial = eff.with_overrides({name: value}, "fit")
                err = loss(trial)
                if err < best - 1e-6:
                    best, eff, improved = err, trial, True
        if not improved:
            break
    return eff


# The first-principles values above are the priors every fit starts from (bench/accuracy.py cross-validates from
# them). The shipped defaults are those priors with one factor fitted on the training split of bench/validation
# alone (`python bench/accuracy.py --fit-defaults OUT --only frontend_latency_s`; the test split never informs it):
# the client's round trip outside the engine, which the priors held at the server's part (HTTP and the ZMQ hop: +4
# ms online against offline, tenstorrent/tt-inference-server issue #190) while a client also waits for the first
# token's way back (detokenisation, SSE, its own event loop). Since the engine admits a request arriving mid-step
# under async scheduling one step later (engine._advance), the fit lands at its lower bound, 1 ms: the step a prompt
# rides in is priced high at a few hundred rows, and the frontend absorbs it (README, "Accuracy"). A fit of every
# factor on that split is not shipped: it drives the TP costs to their bounds (link 1.0, custom all-reduce 3 us,
# tp_bw_loss 0.02), then ranks TP8 above DP2xTP4 for a 32B model and above PP with low TP for DeepSeek-R1 on 8 H200,
# against the study's measured findings, and does worse out of sample (README, "Accuracy").
PRIOR_EFFICIENCY = Efficiency()
DEFAULT = replace(PRIOR_EFFICIENCY, frontend_latency_s=1e-3)

# Per-GPU factors (from a calibration file or a future fit on the training split).
BUILTIN_PER_GPU: tuple[tuple[str, Efficiency], ...] = ()


# What a calibration file may carry beside its factors, written by the tools that fit them: `autotune calibrate`
# (fitted_on, median_abs_log_error), bench/accuracy.py (fitted_on) and bench/gpu_probe.py (probe).
METADATA_KEYS = ("fitted_on", "median_abs_log_error", "probe")


@dataclass(frozen=True)
class Calibration:
    """Global factors plus per-GPU overrides, as written by `autotune calibrate` or bench/gpu_probe.py."""

    base: Efficiency = DEFAULT
    per_gpu: tuple[tuple[str, Efficiency], ...] = BUILTIN_PER_GPU
    source: str = "built-in defaults"

    def for_gpu(self, gpu_name: str) -> Efficiency:
        return dict(self.per_gpu).get(gpu_name, self.base)

    @classmethod
    def load(cls, path: str | Path | None) -> "Calibration":
        if path is None:
            return cls()
        p = Path(path)
        if not p.is_file():
            raise UserError(f"calibration file {p} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
            data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{p}: not a readable text file ({exc})") from None
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise UserError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'} ({str(exc).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UserError(f"{p}: expected a mapping with 'efficiency' and optional 'gpus'")
        # A factor at the top level (not under 'efficiency') would otherwise be silently ignored.
        unknown = sorted(set(map(str, data)) - {"efficiency", "gpus", *METADATA_KEYS})
        if unknown:
            raise UserError(f"{p}: unknown key(s) {', '.join(unknown)}: factors go under 'efficiency' (all GPUs) "
                            f"or 'gpus: {{NAME: {{...}}}}'")
        base = DEFAULT.with_overrides(data.get("efficiency") or {}, f"{p}: efficiency")
        builtin = {name: eff.to_dict() for name, eff in BUILTIN_PER_GPU}
        given = data.get("gpus") or {}
        if not isinstance(given, dict):
            raise UserError(f"{p}: 'gpus' maps GPU names to factors")
        try:    # an alias ("H100") or a typo must not leave its factors unused: names as the catalog spells them
            canonical = [(load_gpu(str(name)).name, factors) for name, factors in given.items()]
        except UserError as exc:
            raise UserError(f"{p}: gpus: {exc}") from None
        given = dict(canonical)
        if len(given) < len(canonical):     # "H100" and "H100-SXM" both given: one would silently replace the other
            raise UserError(f"{p}: gpus: the same GPU is named twice ({', '.join(map(str, data['gpus']))})")
        names = sorted(set(builtin) | set(given))
        # A file's factors apply over the built-in per-GPU ones, which apply over the file's global ones.
        per_gpu = tuple((name, base.with_overrides({**{k: v for k, v in builtin.get(name, {}).items()
                                                       if v != DEFAULT.to_dict()[k]}, **(given.get(name) or {})},
                                                   f"{p}: gpus.{name}")) for name in names)
        return cls(base, per_gpu, str(p))

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """Write the factors that differ from the defaults, with `extra` (keys of METADATA_KEYS) beside them."""
        assert set(extra or {}) <= set(METADATA_KEYS), f"undeclared calibration metadata {sorted(extra or {})}"
        defaults = DEFAULT.to_dict()
        doc = {"efficiency": {k: v for k, v in self.base.to_dict().items() if v != defaults[k]},
               "gpus": {n: {k: v for k, v in e.to_dict().items() if v != self.base.to_dict()[k]}
                        for n, e in self.per_gpu}}
        doc.update(extra or {})
        Path(path).write_text(yaml.safe_dump(doc, sort_keys=False))
