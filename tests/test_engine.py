"""The event-driven engine against first principles: closed forms, conservation, vLLM's scheduling rules."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from autotune.sim.calibration import DEFAULT
from autotune.sim.costs import D_MB, TOTAL, StepCost, decode_run, mixed_step, steps_within
from autotune.sim.memory import stage_shape
from autotune.sim.predict import Scenario, predict
from autotune.spec.hardware import Cluster, load_gpu
from autotune.spec.layout import EngineKnobs, Layout
from autotune.spec.models import load_model


def _cost(model="Llama-3.1-8B", layout=Layout(), gpus=1, gpu="H200", p2p=True, knobs=EngineKnobs()):
    m = load_model(model)
    return StepCost(m, Cluster.of(load_gpu(gpu), gpus, p2p=p2p), layout, stage_shape(m, layout, "bf16"), DEFAULT,
                    knobs)


@pytest.mark.parametrize("model,layout,n,ctx0,steps", [
    ("Llama-3.1-8B", Layout(), 64, 10_000, 500),          # memory-bound throughout
    ("Llama-3.1-8B", Layout(), 4096, 0, 50),              # compute-bound at first
    ("DeepSeek-R1", Layout(tp=8), 200, 1e6, 300),         # MLA attention crosses from memory to compute
    ("Llama-3.1-70B", Layout(tp=2, pp=4), 3, 5_000, 200),  # fewer sequences than stages: bubbles
])
def test_closed_form_equals_step_by_step_sum(model, layout, n, ctx0, steps):
    cost = _cost(model, layout, layout.world_size)
    table = cost.table(n, 1)
    naive = sum(cost.step_time(n, ctx0 + n * k)[0] for k in range(steps))
    assert decode_run(table.decode[n], table.params, n, ctx0, steps)[TOTAL] == pytest.approx(naive, rel=1e-9)


@pytest.mark.parametrize("model,layout", [("Llama-3.1-8B", Layout()), ("DeepSeek-R1", Layout(dp=2, tp=4)),
                                          ("Llama-3.1-70B", Layout(tp=2, pp=4)), ("DeepSeek-R1", Layout(dp=8, ep=8))])
def test_the_engines_table_prices_a_mixed_step_as_the_formula_does(model, layout):
    """The compiled engine reads a prefill step's lines from StepCost.table: the same time as StepCost.step_time."""
    cost = _cost(model, layout, layout.world_size)
    table = cost.table(256, 8192)
    for n, chunk, ctx, attn in ((0, 8192, 0.0, 3e7), (1, 100, 2e3, 5e3), (37, 512, 4e5, 1e5), (256, 7936, 3e6, 2e7)):
        row = table.decode[n]
        tok = table.mixed[int(row[D_MB]) - 1, n + chunk]
        got = mixed_step(row, tok, table.params, ctx, attn)
        assert got == pytest.approx(cost.step_time(n, ctx, chunk, attn), rel=1e-12)


def test_steps_within_finds_the_first_step_past_the_budget():
    cost = _cost()
    table = cost.table(32, 1)
    row = table.decode[32]
    k = steps_within(row, table.params, 32, 1000, 0.5, 10_000)
    assert decode_run(row, table.params, 32, 1000, k)[TOTAL] >= 0.5 > decode_run(row, table.params, 32, 1000, k - 1)[TOTAL]


def test_attention_reads_its_kv_cache_after_the_gemms_not_behind_them():
    """A big batch's weight GEMMs are compute-bound and its attention reads the KV cache: separate kernels, one
    after the other, so every cached token read adds its time even when the step's FLOPs outweigh all its bytes."""
    cost = _cost(knobs=EngineKnobs(max_num_seqs=1024))
    lines = cost.lines(1024)
    assert lines.c0 > lines.m0 and lines.m1 > lines.c1            # GEMMs compute-bound, attention memory-bound
    small = 0.1 * (lines.c0 - lines.m0) / lines.m1                  # a context whose KV reads the GEMMs' FLOPs outlast
    gpu = {c: cost.step_time(1024, c)[0] - cost.step_time(1024, c)[1] for c in (small, 2 * small)}
    extra = gpu[2 * small] - gpu[small]
    assert extra == pytest.approx(lines.m1 * small, rel=1e-9)


def test_more_sequences_cost_more_per_step_but_less_per_token():
    cost = _cost()
    t1, t256 = cost.step_time(1, 1000)[0], cost.step_time(256, 256 * 1000)[0]
    assert t256 > t1 and t256 / 256 < t1


def test_every_request_completes_and_times_are_ordered(make_scenario):
    sc = make_scenario("Llama-3.1-8B", gpus=1, num_requests=300)
    p = predict(sc, Layout(), EngineKnobs(max_num_seqs=128))
    m = p.metrics
    assert p.feasible and m["num_requests"] == 300
    assert 0 < m["ttft_p50_s"] <= m["ttft_p99_s"] <= m["e2e_p99_s"] <= m["makespan_s"]
    assert m["tpot_p50_s"] <= m["tpot_p99_s"]
    requests = sc.workload.sample()
    assert m["output_tok_s"] == pytest.approx(requests.output.sum() / m["makespan_s"])
    assert p.series[-1]["running"] == 0 and p.series[-1]["waiting"] == 0


def test_results_repeat_for_a_seed_and_change_with_it(make_scenario):
    a = predict(make_scenario("Llama-3.1-8B", gpus=2, num_requests=200), Layout(dp=2)).metrics
    b = predict(make_scenario("Llama-3.1-8B", gpus=2, num_requests=200), Layout(dp=2)).metrics
    c = predict(make_scenario("Llama-3.1-8B", gpus=2, num_requests=200, seed=7), Layout(dp=2)).metrics
    assert a == b and a["makespan_s"] != c["makespan_s"]


def test_a_small_kv_cache_preempts_and_a_large_one_does_not(make_scenario):
    sc = make_scenario("Llama-3.1-8B", gpus=1, num_requests=200)
    roomy = predict(sc, Layout(), EngineKnobs(max_num_seqs=32))
    tight = predict(sc, Layout(), EngineKnobs(max_num_seqs=200, num_gpu_blocks_override=2400))
    assert roomy.get("preemptions") == 0 and roomy.get("kv_peak_frac") < 1
    assert tight.get("preemptions") > 0 and tight.get("kv_peak_frac") > 0.95
    assert tight.get("bottleneck") == "KV capacity"
    assert tight.get("kv_capacity_tokens") == 2399 * 16


def test_a_queue_waiting_for_the_token_budget_is_not_blamed_on_the_kv_cache():
    """A burst of long prompts waits for chunked prefill's token budget, with the cache half empty: the run is
    bound by compute, not by KV capacity; the same burst in a cache too small to admit them all is."""
    from autotune.spec.workload import LengthDist, Workload

    burst = Workload("b", LengthDist("fixed", value=8192), LengthDist("fixed", value=128), num_requests=64)
    sc = Scenario(load_model("Qwen3-32B"), Cluster.of(load_gpu("H100"), 8), burst)
    roomy = predict(sc, Layout(tp=8))
    assert roomy.get("kv_peak_frac") < 0.8 and roomy.get("bottleneck") != "KV capacity"
    tight = predict(sc, Layout(tp=8), EngineKnobs(num_gpu_blocks_override=8192 * 12 // 16))
    assert tight.get("bottleneck") == "KV capacity"


def test_max_num_seqs_caps_the_running_batch(make_scenario):
    p = predict(make_scenario("Llama-3.1-8B", gpus=1, num_requests=300), Layout(), EngineKnobs(max_num_seqs=48))
    assert max(s[2] for s in p.engine_series[0]) <= 48


@pytest.mark.parametrize("mode,extra", [("concurrency", {"concurrency": 64}), ("poisson", {"rate": 2.0})])
def test_online_modes(make_scenario, mode, extra):
    sc = make_scenario("Llama-3.1-8B", gpus=2, workload="chat", num_requests=400, mode=mode, **extra)
    p = predict(sc, Layout(dp=2))
    assert p.feasible and p.get("num_requests") == 400
    if mode == "concurrency":
        assert max(x["running"] + x["waiting"] for x in p.series) <= 64
    else:
        # Poisson at 2 req/s: the run lasts about as long as the arrivals (~200 s), the queue stays short.
        assert 150 < p.get("makespan_s") < 300 and p.get("ttft_p50_s") < 1.0


def test_least_loaded_router_balances_better_than_round_robin(make_scenario):
    from dataclasses import replace
    sc = make_scenario("Llama-3.1-8B", gpus=4, workload="chat", num_requests=1500, mode="poisson", rate=60.0)
    ll = predict(sc, Layout(dp=4))
    rr = predict(replace(sc, router="round-robin"), Layout(dp=4))
    assert ll.get("e2e_p99_s") <= rr.get("e2e_p99_s") * 1.05


def test_two_thousand_request_batch_with_32k_outputs_predicts(make_scenario):
    p = predict(make_scenario("Llama-3.1-8B"), Layout(dp=8))
    assert p.feasible and p.get("num_requests") == 2000 and p.get("makespan_s") > 0


def test_all_reduce_takes_vllms_custom_kernel_for_small_messages_and_ncclring_above():
    from autotune.sim.costs import CUSTOM_ALLREDUCE_MAX_BYTES, allreduce_s
    bw = 300e9
    small, large = 1 << 20, 4 * CUSTOM_ALLREDUCE_MAX_BYTES
    assert allreduce_s(small, 8, bw, 25e-6, 8e-6) == pytest.approx(allreduce_s(small, 8, bw, 25e-6, None) - 17e-6)
    assert allreduce_s(large, 8, bw, 25e-6, 8e-6) == allreduce_s(large, 8, bw, 25e-6, None)
    sizes = np.array([small, large], dtype=float)
    assert allreduce_s(sizes, 8, bw, 25e-6, 8e-6) == pytest.approx([allreduce_s(s, 8, bw, 25e-6, 8e-6) for s in sizes])
    # Peer memory over PCIe serves two GPUs only; beyond that vLLM falls back to NCCL.
    pcie = [_cost(layout=Layout(tp=tp), gpus=tp, gpu="A100-PCIe-40GB").tp_custom_lat for tp in (2, 4)]
    assert pcie == [DEFAULT.custom_allreduce_latency_s, None]


def test_on_an_nvswitch_with_multicast_large_all_reduces_move_the_buffer_once():
    from autotune.sim.costs import CUSTOM_ALLREDUCE_MAX_BYTES, allreduce_s
    bw, small, large = 300e9, 1 << 20, 16 * CUSTOM_ALLREDUCE_MAX_BYTES
    # The custom kernel keeps the small messages; NCCL's NVLS sends and receives a large buffer once, not 2(p-1)/p.
    assert allreduce_s(small, 8, bw, 25e-6, 8e-6, multicast=True) == allreduce_s(small, 8, bw, 25e-6, 8e-6)
    assert allreduce_s(large, 8, bw, 25e-6, 8e-6, multicast=True) == pytest.approx(25e-6 + large / bw)
    assert allreduce_s(large, 8, bw, 25e-6, 8e-6) == pytest.approx(25e-6 + 1.75 * large / bw)
    # A ring of two already moves the buffer once each way: the switch saves nothing there.
    assert allreduce_s(large, 2, bw, 25e-6, None, multicast=True) == allreduce_s(large, 2, bw, 25e-6, None)
    fabric = {g: _cost(layout=Layout(tp=8), gpus=8, gpu=g).tp_multicast
              for g in ("H100-SXM", "H200", "B200", "A100-80GB", "MI300X")}
    assert fabric == {"H100-SXM": True, "H200": True, "B200": True, "A100-80GB": False, "MI300X": False}


def test_without_p2p_collectives_go_through_host_memory():
    # vLLM's custom all-reduce needs peer access ("lacks GPU P2P capability"), and NCCL falls back to its SHM
    # transport: the same TP2 on PCIe A100s, with and without P2P.
    from autotune.spec.hardware import SHM_GB_S
    cost = {p2p: _cost("Qwen3-30B-A3B", Layout(tp=2), 2, "A100-PCIe-40GB", p2p) for p2p in (True, False)}
    assert cost[True].tp_custom_lat == DEFAULT.custom_allreduce_latency_s and cost[False].tp_custom_lat is None
    assert cost[False].tp_bw == pytest.approx(SHM_GB_S * 1e9) and cost[False].tp_bw < cost[True].tp_bw
    # A measured, achieved rate: the fabric's link efficiency does not scale it again.
    no_p2p = Cluster.of(load_gpu("A100-PCIe-40GB"), 2, p2p=False)
    assert no_p2p.intra_node_gb_s(0.4) == no_p2p.intra_node_gb_s(1.0) == SHM_GB_S
    prefill = {p2p: c.step_time(0, 0.0, 8192, 8192 ** 2 / 2)[0] for p2p, c in cost.items()}
    assert prefill[False] > 1.5 * prefill[True]
    # NVLS writes into peer memory too: an H100 node without P2P loses it.
    assert not _cost("Qwen3-30B-A3B", Layout(tp=8), 8, "H100-SXM", p2p=False).tp_multicast
    assert Cluster.of(load_gpu("H100-SXM"), 8, p2p=False).describe().endswith("(no P2P)")


@pytest.mark.parametrize("dp", [8, 32])
def test_deepep_sends_each_token_to_its_experts_ranks_not_to_every_rank(dp):
    # The gather moves dp - 1 copies of each token; DeepEP about ep(1 - (1 - 1/ep)^k)(ep - 1)/ep: 4.6 at EP8 and
    # 6.9 at EP32 for DeepSeek-R1's top-8, so wide EP gains most.
    m = load_model("DeepSeek-R1")
    one_token_both_ways = 2 * m.hidden_size * 2

    def copies(layout, backend):
        cost = _cost("DeepSeek-R1", layout, dp, knobs=EngineKnobs(all2all_backend=backend))
        return cost._moe_exchange_bytes(1.0) / one_token_both_ways
    assert copies(Layout(dp=dp, ep=dp), "allgather_reducescatter") == pytest.approx(dp - 1)
    assert copies(Layout(dp=dp, ep=dp), "deepep_low_latency") == pytest.approx(dp * (1 - (1 - 1 / dp) ** 8)
                                                                              * (dp - 1) / dp)
    # Without EP the DP ranks fall back to the gather whatever the backend asks for (all2all_utils.py).
    assert copies(Layout(dp=dp), "deepep_low_latency") == pytest.approx(dp - 1)


def test_an_unknown_all2all_backend_is_refused():
    from autotune.errors import UserError
    with pytest.raises(UserError, match="all2all_backend must be one of"):
        EngineKnobs(all2all_backend="deepep")


def test_the_lm_head_runs_once_per_sampled_sequence_not_per_prompt_token():
    m, cost = load_model("Llama-3.1-8B"), _cost()
    lm_head = 2 * m.vocab_size * m.hidden_size / cost.bf16_rate
    body = 2 * m.compute_params_per_token / cost.gemm_rate - 2 * m.vocab_size * m.hidden_size / cost.gemm_rate
    # 4,096 more prompt tokens in a chunk cost the layers' FLOPs alone; 32 more decoding sequences, the head too.
    assert cost.lines(0, 8192).c0 - cost.lines(0, 4096).c0 == pytest.approx(4096 * body)
    assert cost.lines(64).c0 - cost.lines(32).c0 == pytest.approx(32 * (body + lm_head))


def test_moe_tokens_cross_dp_ranks_the_same_way_with_ep_or_without():
    # vLLM's default all2all backend all-gathers the DP ranks' tokens and reduce-scatters the outputs, EP or not;
    # with one DP rank the TP ranks hold every token already and EP needs no dispatch (use_all2all_kernels).
    tokens = np.array([1.0, 64.0, 8192.0])
    comm = {str(lay): _cost("Qwen3-30B-A3B", lay, lay.world_size, gpu="H100-SXM")._token_terms(tokens)[2]
            for lay in (Layout(tp=4), Layout(tp=4, ep=4), Layout(dp=2, tp=2), Layout(dp=2, tp=2, ep=4))}
    assert comm[str(Layout(tp=4, ep=4))] == pytest.approx(comm[str(Layout(tp=4))])
    assert comm[str(Layout(dp=2, tp=2, ep=4))] == pytest.approx(comm[str(Layout(dp=2, tp=2))])
    # What DP2xTP2 pays beyond its own TP2 all-reduces: a gather and a scatter per MoE layer, growing with tokens.
    alone = _cost("Qwen3-30B-A3B", Layout(tp=2), 2, gpu="H100-SXM")._token_terms(tokens)[2]
    extra = comm[str(Layout(dp=2, tp=2))] - alone
    assert extra[0] == pytest.approx(2 * load_model("Qwen3-30B-A3B").num_moe_layers * DEFAULT.alltoall_latency_s,
                                     rel=0.01)
    assert extra[0] < extra[1] < extra[2]


@pytest.mark.parametrize("model,lockstep", [("Qwen3-30B-A3B", True), ("Qwen3-32B", False)])
def test_a_moe_models_dp_engines_step_together_so_one_long_prefill_stalls_the_others(make_scenario, model, lockstep):
    # vLLM's DP engines of a MoE model run every forward pass together (the expert layers gather all their tokens):
    # while engine 0 prefills a long prompt, engine 1's decode steps wait for it. Dense replicas never wait.
    from dataclasses import replace
    from autotune.spec.workload import Requests
    sc = replace(make_scenario(model, gpus=2), router="round-robin")

    def run(prompt0):
        # Round-robin deals request 0 to engine 0 and request 1 (600 tokens to decode) to engine 1.
        p = predict(sc, Layout(dp=2), EngineKnobs(), Requests(np.array([prompt0, 16]), np.array([8, 600]), np.zeros(2)))
        return p.get("makespan_s"), p.get("ttft_p99_s"), p.get("time_share")["bubble"]

    short, long = run(16), run(16_000)
    prefill = long[1] - short[1]
    assert prefill > 0.1
    if lockstep:
        assert long[0] - short[0] > 0.5 * prefill and long[2] > short[2]
    else:
        assert long[0] == pytest.approx(short[0], rel=1e-9) and long[2] == short[2] == 0


def test_reads_lose_bandwidth_only_where_parallelism_narrows_a_kv_head_group_or_an_experts_columns():
    # Dense layers' weights read at one rate whatever TP; a GQA cache's reads slow as TP splits its 8 KV heads (no
    # further once each GPU holds one); MLA's latent cache is whole on every rank; experts slice over dp x tp
    # without EP, and stay whole with it.
    dense = {tp: _cost("Llama-3.1-70B", Layout(tp=tp), tp) for tp in (1, 2, 8, 16)}
    assert dense[8].weight_bw == dense[1].weight_bw
    assert dense[1].kv_bw > dense[2].kv_bw > dense[8].kv_bw == dense[16].kv_bw
    mla = {tp: _cost("DeepSeek-R1", Layout(tp=tp), tp) for tp in (2, 8)}
    assert mla[8].kv_bw == mla[2].kv_bw == mla[8].bw
    assert mla[8].expert_share < mla[2].expert_share < 1.0
    assert _cost("DeepSeek-R1", Layout(dp=4, tp=2), 8).expert_share == mla[8].expert_share
    assert _cost("DeepSeek-R1", Layout(tp=8, ep=8), 8).expert_share == 1.0
    assert dense[8].expert_share == 1.0


def test_tp_speeds_a_single_stream_up_sub_linearly():
    # TP divides the weights but not the kernels, the all-reduces or the sampling: TP8 is far from 8x TP1.
    itl = {tp: _cost("Llama-3.1-8B", Layout(tp=tp), tp).step_time(1, 1000)[0] for tp in (1, 2, 4, 8)}
    assert itl[1] > itl[2] > itl[4] > itl[8] > itl[1] / 4


def _decode_tok_s(make_scenario, layout, gpus, concurrency=64, knobs=EngineKnobs()):
    from autotune.spec.workload import LengthDist, Workload
    w = Workload("decode", LengthDist("fixed", value=128), LengthDist("fixed", value=1024), mode="concurrency",
                 concurrency=concurrency, num_requests=3 * concurrency)
    sc = make_scenario("DeepSeek-R1-Distill-Qwen-14B", gpu="H100-SXM", gpus=gpus)
    return predict(type(sc)(sc.model, sc.cluster, w), layout, knobs).get("output_tok_s")


@pytest.mark.parametrize("n", [2, 4])
def test_pp_decodes_at_a_third_to_two_thirds_of_tp_on_the_same_gpus(make_scenario, n):
    # vLLM issue #15330 (Qwen2.5-14B, 4 GPUs: TP4 decodes ~3x PP4), #6826, #9176: PP runs at 0.3-0.7x of TP.
    ratio = _decode_tok_s(make_scenario, Layout(pp=n), n) / _decode_tok_s(make_scenario, Layout(tp=n), n)
    assert 0.3 <= ratio <= 0.72, ratio


def test_a_batch_holds_up_to_max_num_seqs_over_pp_so_small_loads_leave_stages_idle(make_scenario):
    cost = _cost("Llama-3.1-70B", Layout(pp=4), 4)
    assert cost.batch_cap == 1      # unresolved knobs: a batch per sequence, the balanced pipeline
    m = load_model("Llama-3.1-70B")
    capped = StepCost(m, Cluster.of(load_gpu("H200"), 4), Layout(pp=4), stage_shape(m, Layout(pp=4), "bf16"), DEFAULT,
                      EngineKnobs(max_num_seqs=256))
    assert [capped.batches(n) for n in (1, 64, 65, 200, 1000)] == [1, 1, 2, 4, 4]
    # 64 running sequences in one batch of a PP4 pipeline: a smaller max_num_seqs spreads them over the stages. The
    # stages then read the KV cache in parallel; each batch still re-reads its stage's weights, so the gain is modest.
    one = _decode_tok_s(make_scenario, Layout(pp=4), 4, knobs=EngineKnobs(max_num_seqs=256))
    four = _decode_tok_s(make_scenario, Layout(pp=4), 4, knobs=EngineKnobs(max_num_seqs=64))
    assert 1.1 * one < four < 2 * one


def test_fp8_weights_speed_the_weight_gemms_only_and_block_scales_cost_what_the_kernels_cost():
    """FP8 weights halve the bytes and double the tensor rate of the weight GEMMs, not of attention; block-scaled
    FP8 (Qwen3-8B-FP8) reaches a smaller share of both rooflines, so on one H100 it is about as fast as BF16, as
    vLLM #25915 measured (0.98x and 1.09x in two versions), where per-tensor FP8 of the same shape is faster."""
    from dataclasses import replace

    from autotune.spec.workload import LengthDist, Workload

    bf16, block = load_model("Qwen3-8B"), load_model("Qwen3-8B-FP8")
    assert block.weight_dtype == "fp8" and block.block_quantized and not bf16.block_quantized
    per_tensor = replace(block, block_quantized=False)
    costs = {m: StepCost(m, Cluster.of(load_gpu("H100"), 1), Layout(), stage_shape(m, Layout(), "bf16"), DEFAULT,
                         EngineKnobs()) for m in (bf16, block, per_tensor)}
    assert costs[bf16].lines(64).c1 == costs[block].lines(64).c1          # attention stays in BF16
    assert costs[per_tensor].lines(64).m0 < 0.6 * costs[bf16].lines(64).m0   # half the bytes (the LM head in BF16)
    head = stage_shape(block, Layout(), "bf16").lm_head_bytes / costs[block].bw   # the BF16 LM head's read
    assert costs[block].lines(64).m0 - head == pytest.approx((costs[per_tensor].lines(64).m0 - head)
                                                             / DEFAULT.fp8_block_gemm)
    work = Workload("b", LengthDist("fixed", value=1024), LengthDist("fixed", value=2048), num_requests=1000)
    tput = {m: predict(Scenario(m, Cluster.of(load_gpu("H100"), 1), work), Layout()).get("output_tok_s")
            for m in costs}
    # Block scales cost what their kernels cost: about BF16's speed, where per-tensor FP8 is clearly faster.
    assert 0.9 < tput[block] / tput[bf16] < 1.2 and tput[per_tensor] > 1.1 * tput[block]


def test_attention_left_in_bf16_by_an_fp8_checkpoint_multiplies_at_the_bf16_rate():
    """An FP8 checkpoint whose attention projections stay BF16 (its ignore list) prefills slower than one quantized
    throughout, by those weights' FLOPs at the BF16 rate instead of the FP8 one, and reads their second byte."""
    from dataclasses import replace

    fp8 = load_model("Llama-3.1-70B-FP8")
    mixed = replace(fp8, unquantized_attention_layers=fp8.num_layers)
    cost = {m: StepCost(m, Cluster.of(load_gpu("H100"), 4), Layout(tp=4), stage_shape(m, Layout(tp=4), "bf16"),
                        DEFAULT, EngineKnobs()) for m in (fp8, mixed)}
    tokens = 2048
    attention = fp8.num_layers * fp8.attention_params_per_layer / 4     # on each of the 4 GPUs
    flops = 2 * attention * (tokens + DEFAULT.gemm_ramp_tokens)
    extra = flops / cost[mixed].bf16_rate - flops / cost[mixed].gemm_rate
    assert cost[mixed].lines(0, tokens).c0 - cost[fp8].lines(0, tokens).c0 == pytest.approx(extra)
    assert cost[mixed].lines(64).m0 - cost[fp8].lines(64).m0 == pytest.approx(attention / cost[fp8].weight_bw)


@pytest.mark.parametrize("name, as_bf16, read_share", [
    ("gpt-oss-120b", {"expert_dtype": None}, 0.5),                               # 4.25-bit experts read, not 16
    # 8-bit weights read, not 16, at `fp8_block_gemm` of the bandwidth (block-scaled kernels read slower)
    ("DeepSeek-R1", {"weight_dtype": "bf16", "block_quantized": False}, 0.9),
])
def test_quantised_experts_cost_more_per_prefilled_row_but_decode_reads_fewer_bytes(name, as_bf16, read_share):
    """MXFP4 (gpt-oss) and FP8 (DeepSeek-R1) experts: a prefill chunk's expert GEMMs run at `mxfp4_moe_gemm` or
    `fp8_moe_gemm` of the BF16 share, below what BF16 experts of the same shape would; a decode step's few-row
    expert GEMMs (tile-bound) cost about the same and its weight reads shrink with the format."""
    from dataclasses import replace

    quantised = load_model(name)
    bf16 = replace(quantised, **as_bf16)      # the same shape priced as if it were a BF16 checkpoint
    cost = {m: StepCost(m, Cluster.of(load_gpu("H100"), 8), Layout(tp=8), stage_shape(m, Layout(tp=8), "bf16"),
                        DEFAULT, EngineKnobs()) for m in (quantised, bf16)}
    experts = {m: c.expert_row_cost for m, c in cost.items()}
    assert experts[bf16] == 1.0 and experts[quantised] > 1.0
    prefill = {m: c.lines(0, 8192).c0 for m, c in cost.items()}
    decode = {m: c.lines(8).c0 for m, c in cost.items()}
    assert prefill[quantised] > 1.2 * prefill[bf16]
    assert decode[quantised] < 1.1 * decode[bf16]
    assert cost[quantised].lines(8).m0 < read_share * cost[bf16].lines(8).m0


def test_a_decode_step_reads_the_lm_head_whole_but_gathers_from_the_input_embedding():
    untied, tied = load_model("Llama-3.1-8B"), load_model("Gemma-3-27B")
    assert tied.tie_word_embeddings and not untied.tie_word_embeddings
    for m in (untied, tied):
        shape = stage_shape(m, Layout(), "bf16")
        assert shape.lm_head_bytes == pytest.approx(m.vocab_size * m.hidden_size * 2)   # one matrix when tied
        assert shape.non_expert_bytes == pytest.approx(shape.layer_bytes + m.embedding_bytes)   # both held
        cost = _cost(m.name)
        assert cost.lines(1).m0 == pytest.approx((shape.layer_bytes + shape.lm_head_bytes) / cost.bw)


def test_the_compiled_cache_is_dropped_when_any_simulator_source_changes(tmp_path):
    """numba checks only a cached function's own file: the compiled engine must not outlive an edit of costs.py."""
    import autotune
    src = tmp_path / "src"
    shutil.copytree(os.path.dirname(autotune.__file__), src / "autotune",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(PYTHONPATH=str(src), XDG_CACHE_HOME=str(tmp_path / "cache"))

    def cache_dir():
        out = subprocess.run([sys.executable, "-c", "import os, autotune.sim; print(os.environ['NUMBA_CACHE_DIR'])"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
        return tmp_path / out.strip()

    marker = cache_dir() / "engine.compiled"
    marker.write_text("compiled against the old costs")
    assert cache_dir() == marker.parent and marker.exists()          # sources unchanged: the cache is kept
    with open(src / "autotune" / "sim" / "costs.py", "a") as f:
        f.write("\n# an edit\n")
    assert cache_dir() == marker.parent and not marker.exists()      # costs.py edited: emptied


def test_under_async_scheduling_a_request_arriving_mid_step_waits_for_the_step_after_next():
    """vLLM's engine core with async scheduling decides step k+1 while step k runs (step_with_batch_queue,
    vllm/v1/engine/core.py): a request that reaches a busy engine mid-step joins one step later than a synchronous
    engine would take it, so its TTFT is one decode step longer; an idle engine takes it at once either way. The
    CPU overheads are zeroed so that both engines' steps take the same time."""
    from dataclasses import replace

    from autotune.sim.engine import EngineLimits, simulate

    m, layout = load_model("Llama-3.1-8B"), Layout()
    eff = replace(DEFAULT, step_overhead_s=0.0, seq_overhead_s=0.0)
    costs = {on: StepCost(m, Cluster.of(load_gpu("H200"), 1), layout, stage_shape(m, layout, "bf16"), eff,
                          EngineKnobs(async_scheduling=on)) for on in (True, False)}
    limits = EngineLimits(max_num_seqs=64, max_num_batched_tokens=2048, kv_capacity_tokens=1_000_000, block_size=16,
                          kv_tokens_per_seq=0.0)

    def ttft(cost, arrival, background):
        n = background + 1
        prompt, output = np.full(n, 128), np.full(n, 4000)
        output[-1] = 8
        times = np.zeros(n)
        times[-1] = arrival
        r = simulate(cost, limits, 1, prompt, output, times, None, 0, "poisson", 0, "least-loaded", 0)
        return r.first_token[-1] - r.arrival[-1]

    first = costs[True].step_time(4, 4 * 128)[0]
    for at in (0.3, 0.5117, 0.77):      # mid-decode of 4 running requests
        # The step it waits: that of 4 decoding requests, each about at / first tokens in by then.
        step = costs[True].step_time(4, 4 * (128 + at / first))[0]
        extra = ttft(costs[True], at, 4) - ttft(costs[False], at, 4)
        assert extra == pytest.approx(step, rel=0.05)
    assert ttft(costs[True], 0.5, 0) == pytest.approx(ttft(costs[False], 0.5, 0), abs=1e-12)   # idle engine
