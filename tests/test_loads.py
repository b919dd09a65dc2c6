"""Loads as clients send them: closed loops, constant and staged rates, shared prefixes, means, overload."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from autotune.errors import UserError
from autotune.sim.predict import Scenario, predict
from autotune.spec.hardware import Cluster, load_gpu
from autotune.spec.layout import EngineKnobs, Layout
from autotune.spec.metrics import LATENCY_KEYS
from autotune.spec.models import load_model
from autotune.spec.workload import LengthDist, SharedPrefix, Stage, Workload, workload_from_dict


def _fixed(prompt=512, output=256, **kw) -> Workload:
    return Workload("t", LengthDist("fixed", value=prompt), LengthDist("fixed", value=output), **kw)


def _scenario(workload: Workload, model="Llama-3.1-8B", gpu="H100-SXM", gpus=1) -> Scenario:
    return Scenario(load_model(model), Cluster.of(load_gpu(gpu), gpus), workload)


@pytest.mark.parametrize("router", ["least-loaded", "round-robin"])
def test_closed_loop_ttft_is_what_a_slot_limited_client_sees(router):
    """16 clients on a layout that runs 16 sequences at once: no request queues, so TTFT is about one prefill
    (plus the frontend's hop), never the time the client waited for a free slot. Outputs vary in length, so
    completions (and the follow-ups they trigger) are staggered as in a real run. Whichever engine a follow-up goes
    to, it has not run ahead of it (the engines' runs stop where another's completion may send one)."""
    w = Workload("t", LengthDist("fixed", value=512), LengthDist("lognormal", median=256, sigma=0.5, low=16, high=2048),
                 mode="concurrency", concurrency=16, num_requests=200)
    p = predict(replace(_scenario(w, "Llama-3.1-70B", gpus=16), router=router), Layout(dp=4, tp=4))
    one_prefill = predict(_scenario(_fixed(mode="concurrency", concurrency=1, num_requests=4), "Llama-3.1-70B",
                                    gpus=4), Layout(tp=4))
    assert p.get("ttft_p90_s") < 2 * one_prefill.get("ttft_p50_s")
    # The worst are the 16 sent together at t=0: four prompts prefilled in one step on each replica.
    assert p.get("ttft_p99_s") < 5 * one_prefill.get("ttft_p50_s")


def test_a_trickle_of_short_requests_goes_round_idle_dp_engines():
    """vLLM's DP balancer starts each scan one engine further, so ties between idle engines go round them (and it
    sees counts up to 100 ms old): requests that each finish before the next arrives do not all land on engine 0."""
    w = _fixed(64, 4, mode="constant", rate=5.0, num_requests=20)
    p = predict(_scenario(w, gpus=2), Layout(dp=2))
    assert all(len(rows) > 1 for rows in p.engine_series)
    assert p.get("ttft_p99_s") < 0.1


def test_closed_loop_sends_each_follow_up_when_a_request_completes():
    """A closed loop's arrivals are completion times: the one-pass drain must not finish a whole wave first."""
    w = Workload("t", LengthDist("fixed", value=256), LengthDist("lognormal", median=300, sigma=0.6, low=16, high=2000),
                 mode="concurrency", concurrency=8, num_requests=120)
    p = predict(_scenario(w), Layout(), EngineKnobs(max_num_seqs=64))
    e2e = p.get("e2e_mean_s")
    # Each client runs its requests back to back: 120 / 8 = 15 in a row, so the run lasts ~15 mean E2Es, and the
    # server never holds more than 8: throughput is 8 requests per mean E2E.
    assert p.get("makespan_s") == pytest.approx(15 * e2e, rel=0.25)
    assert max(pt["running"] + pt["waiting"] for pt in p.series) <= 8


def test_constant_and_staged_arrivals():
    w = _fixed(mode="constant", stages=(Stage(2.0, 10.0), Stage(5.0, 4.0)), num_requests=40)
    reqs = w.sample()
    assert len(reqs) == 40
    gaps = np.diff(reqs.arrival)
    assert np.allclose(gaps[:19], 0.5) and np.allclose(gaps[20:], 0.2)
    assert reqs.arrival[20] == pytest.approx(10.2)
    poisson = _fixed(mode="poisson", rate=4.0, num_requests=4000).sample()
    assert np.mean(np.diff(poisson.arrival)) == pytest.approx(0.25, rel=0.05)


def test_workload_file_with_stages_and_a_shared_prefix():
    w = workload_from_dict({"prompt": 600, "output": 200, "mode": "constant",
                            "stages": [{"rate": 8, "duration_s": 60}, {"rate": 20, "duration_s": 60}],
                            "shared_prefix": {"tokens": 100, "distinct": 4}}, "w.yaml")
    assert w.num_requests == 8 * 60 + 20 * 60 and w.offered_rate == 20
    assert w.prefix == SharedPrefix(100, 4)
    reqs = w.sample()
    assert set(reqs.prefix_id.tolist()) == {0, 1, 2, 3}
    for bad, msg in (({"stages": [{"rate": 0, "duration_s": 5}]}, "rate > 0"),
                     ({"stages": [{"rate": 1}]}, "stages is a list"),
                     ({"concurency": 4}, "unknown key.*concurency"),    # a typo is never silently ignored
                     ({"mode": "concurrency", "concurrency": 1.5}, "w.yaml: concurrency must be an integer"),
                     ({"prompt": {"kind": "fixed", "value": 10, "sigma": 1}}, "prompt: unknown key.*sigma"),
                     ({"mode": "batch", "stages": [{"rate": 1, "duration_s": 5}]}, "open-loop"),
                     ({"shared_prefix": {"tokens": 700}}, "shorter than every prompt"),
                     ({"shared_prefix": {"tokens": 10, "count": 2}}, "shared_prefix: unknown key.*count"),
                     ({"rate": float("nan"), "stages": None}, "finite number of requests/s")):
        with pytest.raises(UserError, match=msg):
            workload_from_dict({"prompt": 600, "output": 200, "mode": "constant", "rate": 1, **bad}, "w.yaml")


def test_means_beside_percentiles():
    p = predict(_scenario(_fixed(mode="poisson", rate=4.0, num_requests=300)), Layout())
    for key in LATENCY_KEYS:
        assert p.get(key) is not None, key
    for name in ("ttft", "tpot", "itl", "e2e"):
        assert 0 < p.get(f"{name}_mean_s") <= p.get(f"{name}_p99_s")
    assert set(LATENCY_KEYS) <= set(p.to_json())


def test_overload_is_flagged_with_the_sustainable_rate():
    light = predict(_scenario(_fixed(mode="constant", rate=2.0, num_requests=300)), Layout())
    assert light.get("overloaded") is False and light.get("sustainable_rate") is None
    heavy = predict(_scenario(_fixed(mode="constant", rate=200.0, num_requests=3000)), Layout(),
                    EngineKnobs(max_num_seqs=64))
    assert heavy.get("overloaded") is True
    assert 1.0 < heavy.get("sustainable_rate") < 200.0
    # The layout keeps up just below the rate it was found to sustain.
    below = predict(_scenario(_fixed(mode="constant", rate=0.7 * heavy.get("sustainable_rate"), num_requests=1500)),
                    Layout(), EngineKnobs(max_num_seqs=64))
    assert below.get("overloaded") is False


def test_prefix_cache_hits_cut_prefill():
    base = dict(mode="constant", rate=1.0, num_requests=60)
    cold = predict(_scenario(_fixed(prompt=4000, output=16, **base), "Llama-3.1-70B", gpus=4), Layout(tp=4))
    warm = predict(_scenario(_fixed(prompt=4000, output=16, prefix=SharedPrefix(3500, 2), **base), "Llama-3.1-70B",
                             gpus=4), Layout(tp=4))
    # 3,488 of 4,000 prompt tokens hit the cache after the first request of each prefix: prefill shrinks ~8x.
    assert warm.get("ttft_p50_s") < 0.35 * cold.get("ttft_p50_s")
    assert warm.get("ttft_p99_s") >= cold.get("ttft_p50_s") * 0.8   # the first request of a prefix pays in full


def test_each_requests_own_cached_tokens_skip_its_prefill_on_the_engine_that_holds_them():
    """A burst of prompts whose first halves the server already cached (an earlier run sent them): one engine
    prefills half the tokens; with DP2 the load balancer, blind to the cache, finds them for about half the
    requests only, so DP2 gains less."""
    burst = dict(mode="concurrency", concurrency=64, num_requests=64)
    sc = {c: _scenario(_fixed(prompt=8192, output=16, cached_prompt_tokens=c, **burst), "Llama-3.1-70B", gpus=8)
          for c in (0, 4096)}
    tp8 = {c: predict(s, Layout(tp=8)) for c, s in sc.items()}
    dp2 = {c: predict(s, Layout(dp=2, tp=4)) for c, s in sc.items()}
    # Prefill is most of a 16-token request: the burst's last first token comes about twice as early.
    assert tp8[4096].get("ttft_p99_s") == pytest.approx(tp8[0].get("ttft_p99_s") / 2, rel=0.2)
    dp2_gain = dp2[0].get("ttft_p99_s") / dp2[4096].get("ttft_p99_s")
    assert 1.05 < dp2_gain < 0.8 * tp8[0].get("ttft_p99_s") / tp8[4096].get("ttft_p99_s")
    # The goodput estimate prefills only what is not cached either.
    from autotune.sim.goodput import LoadShape
    shape = LoadShape.of(sc[4096].workload.sample())
    assert shape.mean_prefill == 4096 and shape.mean_prompt == 8192


def test_cached_prompt_tokens_in_a_workload_file():
    w = workload_from_dict({"prompt": 600, "output": 200, "cached_prompt_tokens": 400}, "w.yaml")
    assert w.cached_prompt_tokens == 400 and w.sample().cached_tokens == 400
    assert workload_from_dict(w.to_dict(), "again") == w
    for bad, msg in (({"cached_prompt_tokens": 600}, "shorter than every prompt"),
                     ({"cached_prompt_tokens": -1}, "must be >= 0"),
                     ({"cached_prompt_tokens": 10.5}, "cached_prompt_tokens must be an integer"),
                     ({"cached_prompt_tokens": 100, "shared_prefix": {"tokens": 50}}, "not both")):
        with pytest.raises(UserError, match=msg):
            workload_from_dict({"prompt": 600, "output": 200, **bad}, "w.yaml")


def test_cli_constant_mode_means_and_overload_in_json():
    out = subprocess.run([sys.executable, "-m", "autotune.cli", "predict", "--model", "Llama-3.1-8B", "--gpu",
                          "H100-SXM", "--gpus", "1", "--layout", "tp=1", "--workload", "chat", "--mode", "constant",
                          "--rate", "500", "--requests", "3000", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)[0]
    assert d["overloaded"] is True and d["offered_rate"] == 500 and d["sustainable_rate"] < 500
    assert d["ttft_mean_s"] > 0 and d["e2e_mean_s"] > d["ttft_mean_s"]


def test_api_servers_put_a_floor_under_the_step_and_async_scheduling_hides_cpu_work():
    """Eight engines streaming through one API server are held to its output rate; with one per engine (vLLM's
    default) they are not. Synchronous scheduling adds the scheduler's CPU time to every step; async hides it."""
    w = _fixed(prompt=128, output=512, num_requests=4000)
    sc = _scenario(w, "Llama-3.1-8B", gpu="H200", gpus=8)
    default = predict(sc, Layout(dp=8), EngineKnobs(max_num_seqs=512))
    one = predict(sc, Layout(dp=8), EngineKnobs(max_num_seqs=512, api_server_count=1))
    ceiling = sc.calibration.for_gpu("H200").api_server_tok_s
    assert one.get("output_tok_s") <= ceiling * 1.001 < default.get("output_tok_s")
    sync = predict(sc, Layout(dp=8), EngineKnobs(max_num_seqs=512, async_scheduling=False))
    assert sync.get("tpot_mean_s") > default.get("tpot_mean_s")


def test_prompts_sent_while_the_tokeniser_is_busy_reach_the_engine_together_in_its_next_batch():
    """vLLM's API server tokenises in micro-batches on one worker: of 8 prompts sent at once, the first is tokenised
    alone and the other 7 wait for it, then go to the engine together (the grouping seen in vllm bench serve's
    per-request times). With 0.1 s of tokenising per prompt, the first reaches the engine at ~0.1 s and the rest at
    ~0.8 s; tokenised one by one they would arrive 0.1 s apart, all at once at 0.1 s."""
    from autotune.sim.calibration import Calibration, Efficiency
    w = _fixed(prompt=2000, output=16, mode="constant", rate=1e6, num_requests=8)
    cal = Calibration(Efficiency(tokenize_s_per_token=5e-5, frontend_latency_s=4e-3))
    sc = Scenario(load_model("Llama-3.1-8B"), Cluster.of(load_gpu("H100-SXM"), 1), w, cal)
    p = predict(sc, Layout())
    fast = predict(Scenario(sc.model, sc.cluster, w), Layout())
    prefill = fast.get("ttft_p99_s")        # all 8 prefilled with the default, quick tokeniser
    first, rest = 0.004 + 0.1, 0.004 + 0.1 + 0.004 + 7 * 0.1
    assert rest <= p.get("ttft_p50_s") <= rest + prefill
    assert p.get("ttft_mean_s") == pytest.approx((first + 7 * rest) / 8, abs=prefill)
    assert p.get("ttft_p99_s") - p.get("ttft_p50_s") < prefill
