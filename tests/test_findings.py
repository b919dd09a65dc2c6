"""The study's findings (vLLM v1, 8 x H200, natural-reasoning, 2,000-request batch), reproduced by the simulator."""

import pytest

from autotune.sim.predict import predict
from autotune.sim.recommend import recommend
from autotune.spec.layout import EngineKnobs, Layout


@pytest.fixture(scope="module")
def recs():
    from tests.conftest import scenario
    cache = {}

    def get(model):
        if model not in cache:
            cache[model] = recommend(scenario(model))
        return cache[model]
    return get


def best(rec, layout):
    return rec.best_per_layout()[layout]


def test_8b_dp8_is_best(recs):
    rec = recs("DeepSeek-R1-Distill-Llama-8B")
    assert rec.winner.layout == Layout(dp=8)
    assert rec.winner.get("preemptions") == 0


def test_8b_dp_scales_near_linearly_from_1_to_8_gpus(make_scenario):
    tok_s = {g: predict(make_scenario("DeepSeek-R1-Distill-Llama-8B", gpus=g), Layout(dp=g)).get("output_tok_s")
             for g in (1, 2, 4, 8)}
    for g in (2, 4, 8):
        assert tok_s[g] > 1.5 * tok_s[g // 2]
    # The 2,000-request batch ends on its longest 32k-token outputs, which caps the last doubling a little.
    assert tok_s[8] >= 0.7 * 8 * tok_s[1]


def test_32b_small_tp_with_dp_beats_dp8_and_tp8_and_stops_preemption(recs):
    rec = recs("DeepSeek-R1-Distill-Qwen-32B")
    w = rec.winner
    assert w.layout.dp > 1 and 1 < w.layout.tp < 8 and w.layout.pp == 1
    assert w.get("output_tok_s") > best(rec, Layout(dp=8)).get("output_tok_s")
    assert w.get("output_tok_s") > best(rec, Layout(tp=8)).get("output_tok_s")
    assert w.get("preemptions") == 0
    assert best(rec, Layout(dp=8)).get("preemptions") > 0
    assert "DP8" in " ".join(rec.explanation) and "KV capacity" in " ".join(rec.explanation)


def test_405b_wants_tp8_pp8_is_several_times_slower_and_dp_does_not_fit(recs):
    rec = recs("Llama-3.1-405B")
    assert rec.winner.layout == Layout(tp=8)
    assert rec.winner.get("output_tok_s") > 3 * best(rec, Layout(pp=8)).get("output_tok_s")
    assert all(p.layout.dp == 1 for p in rec.evaluated)
    assert any(p.layout.dp > 1 and "does not fit" in p.reason for p in rec.infeasible)


def test_deepseek_r1_pp_with_low_tp_beats_tp8(recs):
    rec = recs("DeepSeek-R1")
    per_layout = rec.best_per_layout()
    tp8 = per_layout[Layout(tp=8)].get("output_tok_s")
    mixes = [p for l, p in per_layout.items() if l.pp > 1 and l.tp <= 2 and l.ep == 1 and l.dp == 1]
    assert mixes and max(p.get("output_tok_s") for p in mixes) > tp8
    assert per_layout[Layout(tp=2, pp=4)].get("output_tok_s") > tp8


@pytest.fixture(scope="module")
def seq_sweep():
    """One H200, the 8B model, 10,000 reasoning requests, max_num_seqs swept over two decades."""
    from tests.conftest import scenario
    sc = scenario("DeepSeek-R1-Distill-Llama-8B", gpus=1, num_requests=10_000)
    requests = sc.workload.sample()
    return {s: predict(sc, Layout(), EngineKnobs(max_num_seqs=s, max_num_batched_tokens=max(8192, s)), requests)
            for s in (32, 64, 128, 256, 512, 1024, 10_000)}


def test_capacity_trap_tpot_rises_several_fold_and_ttft_falls(seq_sweep):
    assert seq_sweep[1024].get("tpot_p50_s") > 3 * seq_sweep[32].get("tpot_p50_s")
    assert seq_sweep[1024].get("ttft_p50_s") < 0.8 * seq_sweep[32].get("ttft_p50_s")


def test_capacity_trap_kv_saturates_with_preemptions_at_the_top(seq_sweep):
    assert seq_sweep[32].get("preemptions") == 0 and seq_sweep[32].get("kv_peak_frac") < 0.9
    for s in (1024, 10_000):
        assert seq_sweep[s].get("kv_peak_frac") > 0.99 and seq_sweep[s].get("preemptions") > 1000
        assert seq_sweep[s].get("bottleneck") == "KV capacity"


def test_capacity_trap_e2e_has_an_interior_minimum_and_throughput_collapses(seq_sweep):
    e2e = {s: p.get("e2e_p50_s") for s, p in seq_sweep.items()}
    knee = min(e2e, key=e2e.get)
    assert min(seq_sweep) < knee < max(seq_sweep)
    tok = {s: p.get("output_tok_s") for s, p in seq_sweep.items()}
    assert max(tok, key=tok.get) == knee and tok[10_000] < tok[knee]
