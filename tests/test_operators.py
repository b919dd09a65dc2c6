"""The operators' questions: goodput under SLOs, how many GPUs, what it costs, and a recommend that does not crown a
configuration that thrashes."""

import json
import subprocess
import sys
import types

import pytest

from autotune.sim.goodput import LoadShape, erlang_c, goodput
from autotune.sim.predict import predict
from autotune.sim.recommend import recommend
from autotune.sim.size import gpu_counts, size
from autotune.sim.slo import Slo
from autotune.spec.hardware import load_gpu
from autotune.spec.layout import EngineKnobs, Layout
from tests.conftest import scenario


def autotune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autotune.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def small():
    sc = scenario("Llama-3.1-8B", gpu="H100-SXM", gpus=2)
    return sc, LoadShape.of(sc.workload.sample())


def test_goodput_falls_as_each_slo_tightens(small):
    sc, load = small
    layout, knobs = Layout(dp=2), EngineKnobs(max_num_seqs=256)
    by_tpot = [goodput(sc, layout, knobs, Slo(tpot_p99_s=t), load).rate for t in (0.2, 0.03, 0.02, 0.015)]
    by_ttft = [goodput(sc, layout, knobs, Slo(tpot_p99_s=0.2, ttft_p99_s=t), load).rate for t in (600, 30, 2)]
    assert all(a > b for a, b in zip(by_tpot, by_tpot[1:])), by_tpot
    assert all(a > b for a, b in zip(by_ttft, by_ttft[1:])), by_ttft
    assert by_tpot[0] >= by_ttft[0]
    # Below what one sequence alone can do, no rate is served, and the answer says why.
    none = goodput(sc, layout, knobs, Slo(tpot_p99_s=0.001), load)
    assert none.rate is None and "one sequence alone" in none.binding


def test_goodput_is_served_in_the_simulation_at_that_rate(small):
    sc, load = small
    slo = Slo(tpot_p99_s=0.03, ttft_p99_s=5)
    g = goodput(sc, Layout(dp=2), EngineKnobs(max_num_seqs=128), slo, load)
    assert g.rate and g.at_rate is not None
    assert slo.miss_under_load(g.at_rate) is None
    assert g.at_rate.get("offered_rate") == pytest.approx(g.rate)
    assert g.tok_s == pytest.approx(g.rate * load.mean_output)


def test_erlang_c_matches_the_textbook_values():
    # M/M/1: P(wait) = utilisation; M/M/2 at a = 1: 1/3 (Kleinrock, Queueing Systems I).
    assert erlang_c(1, 0.5) == pytest.approx(0.5)
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(1000, 1200) == 1.0 and erlang_c(4, 0.0) == 0.0


def test_goodput_grows_with_the_gpus():
    rates = []
    for gpus in (1, 2, 4):
        rec = recommend(scenario("Llama-3.1-8B", gpu="H100-SXM", gpus=gpus), Slo(tpot_p99_s=0.03, ttft_p99_s=10),
                        goal="goodput")
        rates.append(rec.goodput_of(rec.winner).rate)
    assert rates[0] < rates[1] < rates[2], rates
    assert rates[2] > 3 * rates[0]


def test_goodput_ranking_explains_the_winner_and_what_binds():
    rec = recommend(scenario("Llama-3.1-8B", gpu="H100-SXM", gpus=4), Slo(tpot_p99_s=0.03, ttft_p99_s=10),
                    goal="goodput")
    text = "\n".join(rec.explanation)
    assert "req/s" in text and "what stops a higher rate" in text and "guard" in text
    # Every configuration shown runs at its own goodput rate, best first.
    rates = [rec.goodput_of(p).rate for p in rec.ranked]
    assert rates[0] >= 0.95 * max(rates)
    assert all(p.get("offered_rate") == pytest.approx(rec.goodput_of(p).rate) for p in rec.ranked)


def test_size_needs_more_gpus_for_more_rate_and_never_misses_its_own_slo():
    sc = scenario("Llama-3.1-8B", gpu="H100-SXM", gpus=1)
    slo = Slo(tpot_p99_s=0.04, ttft_p99_s=10)
    gpu = load_gpu("H100-SXM")
    answers = [size(sc, gpu, rate, slo, 32, 2.0) for rate in (0.3, 1.5, 4.0)]
    counts = [a.gpus for a in answers]
    assert all(counts) and counts[0] < counts[1] < counts[2], counts
    for a, rate in zip(answers, (0.3, 1.5, 4.0)):
        p = a.prediction
        assert p.get("offered_rate") == pytest.approx(rate) and not p.get("overloaded")
        assert p.get("tpot_p99_s") <= slo.tpot_p99_s and p.get("ttft_p99_s") <= slo.ttft_p99_s
        assert p.layout.world_size == a.gpus
        assert a.usd_per_hour == pytest.approx(2.0 * a.gpus)
    # Beyond the largest count, the answer is none, with the reason.
    none = size(sc, gpu, 50.0, slo, 2, 2.0)
    assert none.gpus is None and "req/s" in none.reason


def test_gpu_counts_fill_a_node_then_whole_nodes():
    assert gpu_counts(load_gpu("H200"), 32) == [1, 2, 4, 8, 16, 24, 32]
    assert gpu_counts(load_gpu("H200"), 6) == [1, 2, 4]


def test_thrashing_winner_is_guarded():
    """The issue's case: 64 sequences make 3% more tokens than 32 at 12,575 preemptions and a p99 TPOT three
    times as long; within the tolerance the lower latency wins, and the output says so."""
    rec = recommend(scenario("Llama-3.1-8B", gpu="L40S", gpus=1))
    fastest = max(rec.ranked, key=lambda p: p.get("output_tok_s"))
    w = rec.winner
    assert w.get("tpot_p99_s") < fastest.get("tpot_p99_s") or w is fastest
    assert w.get("output_tok_s") >= 0.95 * fastest.get("output_tok_s")
    assert any(line.startswith("guard: within 5%") for line in rec.explanation)
    strict = recommend(scenario("Llama-3.1-8B", gpu="L40S", gpus=1), tolerance=0.0)
    assert strict.winner.get("output_tok_s") == fastest.get("output_tok_s")


def test_a_layout_whose_first_values_break_the_tpot_slo_is_tried_smaller():
    sc = scenario("Llama-3.1-8B", gpus=8, num_requests=600)
    slo = Slo(tpot_p99_s=0.012)
    rec = recommend(sc, slo)
    tried = {p.knobs.max_num_seqs for p in rec.evaluated if p.layout == Layout(dp=8)}
    small = predict(sc, Layout(dp=8), EngineKnobs(max_num_seqs=min(tried)))
    assert slo.violation(small) is None and len(tried) >= 3
    assert slo.violation(rec.best_per_layout()[Layout(dp=8)]) is None


def test_recommend_rows_are_distinct_layouts():
    out = autotune("recommend", "--model", "Llama-3.1-8B", "--gpu", "H200", "--gpus", "4", "--requests", "300",
                   "--json")
    rows = json.loads(out.stdout)["ranked"]
    labels = [r["label"] for r in rows]
    assert out.returncode == 0 and len(labels) == len(set(labels)) > 1
    assert all(r["usd_per_mtok"] > 0 and r["joules_per_token"] > 0 for r in rows)


def test_cost_and_energy_follow_their_definitions(tmp_path):
    sc = scenario("Llama-3.1-8B", gpus=2, num_requests=300)
    p = predict(sc, Layout(dp=2))
    tokens = p.get("output_tok_s") * p.get("makespan_s")
    assert p.get("usd_per_mtok") == pytest.approx(2 * sc.cluster.usd_per_gpu_hour * p.get("makespan_s") / 3600
                                                  / tokens * 1e6)
    # Energy sits between every GPU idling and every GPU at its TDP for the whole run.
    gpu_seconds_tdp = 2 * sc.cluster.gpu.tdp_w * p.get("makespan_s") / tokens
    assert 0.1 * gpu_seconds_tdp < p.get("joules_per_token") < gpu_seconds_tdp
    (tmp_path / "prices.yaml").write_text("H200: 10\n")
    out = autotune("predict", "--model", "Llama-3.1-8B", "--gpu", "H200", "--gpus", "2", "--layout", "dp=2",
                   "--requests", "300", "--prices", str(tmp_path / "prices.yaml"), "--json")
    row = json.loads(out.stdout)[0]
    assert row["usd_per_mtok"] == pytest.approx(p.get("usd_per_mtok") * 10 / sc.cluster.usd_per_gpu_hour, rel=1e-6)


def test_a_gpu_without_a_price_has_no_cost_and_cannot_be_a_cost_objective(tmp_path):
    p = predict(scenario("Llama-3.1-8B", gpu="A100-40GB", gpus=1, num_requests=50), Layout())
    assert p.get("usd_per_mtok") is None and p.get("joules_per_token") > 0
    space = tmp_path / "space.yaml"
    space.write_text("name: s\ncluster: {gpu: A100-40GB, gpus_per_node: 1}\nmodel: Llama-3.1-8B\n"
                     "objectives: [{metric: usd_per_mtok}]\n")
    from autotune.errors import UserError
    from autotune.search.space import load_space
    with pytest.raises(UserError, match="usd_per_mtok needs a price"):
        load_space(space)
    space.write_text("name: s\ncluster: {gpu: A100-40GB, gpus_per_node: 1, usd_per_gpu_hour: 1.1}\n"
                     "model: Llama-3.1-8B\nobjectives: [{metric: usd_per_mtok}, {metric: joules_per_token}]\n")
    loaded = load_space(space)
    assert loaded.scenario.cluster.usd_per_gpu_hour == 1.1
    assert [o.direction for o in loaded.objectives] == ["minimize", "minimize"]


def test_nvml_energy_and_samples_count_the_trials_gpus_only(monkeypatch):
    """NVML without a GPU here: a stand-in module with NVML's energy counter (millijoules per device)."""
    energy_mj = {0: 1_000_000, 1: 2_000_000, 2: 4_000_000}

    class NVMLError(Exception):
        pass
    fake = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 3,
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetName=lambda h: "NVIDIA H100 80GB HBM3",
        nvmlDeviceGetTotalEnergyConsumption=lambda h: energy_mj[h])
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=h * 2**30, total=80 * 2**30)
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=50)
    fake.nvmlDeviceGetPowerUsage = lambda h: 300_000
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    from autotune.telemetry import NvmlSampler
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,2")
    assert NvmlSampler().energy_j() == pytest.approx(6000.0)
    assert [r["gpu"] for r in NvmlSampler().sample()] == [1, 2]      # the trial's GPUs, not the node's
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert NvmlSampler().energy_j() == pytest.approx(7000.0)

    def unsupported(h):
        raise NVMLError("Not Supported")
    fake.nvmlDeviceGetTotalEnergyConsumption = unsupported
    assert NvmlSampler().energy_j() is None

    def lost(h):        # a GPU fallen off the bus mid-trial: that GPU's sample is missed, the others still come
        if h == 1:
            raise NVMLError("GPU is lost")
        return types.SimpleNamespace(used=h * 2**30, total=80 * 2**30)
    fake.nvmlDeviceGetMemoryInfo = lost
    assert [r["gpu"] for r in NvmlSampler().sample()] == [0, 2]


@pytest.mark.parametrize("args,message", [
    (["recommend", "--model", "Llama-3.1-8B", "--gpu", "H200", "--gpus", "1", "--goal", "goodput"], "needs an SLO"),
    (["recommend", "--model", "Llama-3.1-8B", "--gpu", "H200", "--gpus", "1", "--tolerance", "1.5"], "--tolerance"),
    (["recommend", "--model", "Llama-3.1-8B", "--gpu", "H200", "--gpus", "1", "--top", "-1"], "--top"),
    (["recommend", "--model", "Llama-3.1-8B", "--gpu", "H200", "--gpus", "1", "--slo-tpot-ms", "-5"], "positive"),
    (["size", "--model", "Llama-3.1-8B", "--rate", "0"], "--rate"),
    (["size", "--model", "Llama-3.1-8B", "--rate", "1", "--gpu", "H900"], "unknown GPU"),
    (["size", "--model", "Llama-3.1-8B", "--rate", "1", "--mode", "batch"], "invalid choice"),
    (["predict", "--model", "Llama-3.1-8B", "--gpu", "H200", "--gpus", "1", "--layout", "tp=1", "--prices",
      "/nonexistent.yaml"], "does not exist"),
])
def test_bad_operator_input_is_one_line_and_exit_2(args, message):
    out = autotune(*args)
    assert out.returncode == 2, out.stdout
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_size_command_json_and_table(tmp_path):
    (tmp_path / "prices.yaml").write_text("H100-SXM: {usd_per_gpu_hour: 2.0, source: test, date: 2026-11-28}\n"
                                          "H200: 3.0\n")
    out = autotune("size", "--model", "Llama-3.1-8B", "--rate", "1", "--gpu", "H100-SXM,H200", "--slo-tpot-ms", "40",
                   "--slo-ttft-ms", "10000", "--prices", str(tmp_path / "prices.yaml"), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    answers = doc["answers"]
    assert [a["gpu"] for a in answers] == sorted((a["gpu"] for a in answers),
                                                 key=lambda g: next(a["usd_per_mtok"] for a in answers if a["gpu"] == g))
    h100 = next(a for a in answers if a["gpu"] == "H100-SXM")
    assert h100["usd_per_gpu_hour"] == 2.0 and h100["price_source"] == "test"
    assert h100["usd_per_hour"] == pytest.approx(2.0 * h100["gpus"])
    assert h100["prediction"]["tpot_p99_s"] <= 0.04 and "vllm serve" in h100["serve_command"][0]
    human = autotune("size", "--model", "Llama-3.1-8B", "--rate", "1", "--gpu", "H200", "--slo-tpot-ms", "40")
    assert human.returncode == 0 and "$/Mtok" in human.stdout and "H200" in human.stdout


def test_every_prediction_carries_intervals_and_extrapolations_are_wider():
    seen = predict(scenario("Llama-3.1-8B", gpu="H100-SXM", gpus=1, num_requests=200), Layout())
    unseen = predict(scenario("Llama-3.1-8B", gpu="L40S", gpus=1, num_requests=200), Layout())
    assert seen.get("near_validated") and not seen.get("extrapolation")
    assert not unseen.get("near_validated") and "no validated runs on L40S" in unseen.get("extrapolation")

    def spread(p, key):
        lo, hi = p.get("intervals")[key]
        return hi / lo
    for key in ("output_tok_s", "tpot_p99_s", "ttft_p99_s", "e2e_p99_s"):
        assert spread(unseen, key) > spread(seen, key) > 1, key
    assert set(seen.get("interval_coverage")) == {"throughput", "TTFT", "TPOT/ITL", "E2E"}
    # Cost per token moves against throughput.
    lo, hi = seen.get("intervals")["usd_per_mtok"]
    t_lo, t_hi = seen.get("intervals")["output_tok_s"]
    assert lo == pytest.approx(seen.get("usd_per_mtok") * seen.get("output_tok_s") / t_hi)
    # A parallelism kind no validated run of that model class used is an extrapolation too.
    pp_mla = predict(scenario("DeepSeek-R1", gpus=16, num_requests=100), Layout(dp=2, pp=8))
    assert pp_mla.get("extrapolation") == ["no validated PP runs of a mla model"]
    ep_mla = predict(scenario("DeepSeek-R1", gpus=16, num_requests=100), Layout(dp=16, ep=16))
    assert ep_mla.get("near_validated")


def test_the_intervals_cover_their_nominal_level_on_sources_left_out():
    from autotune.sim import uncertainty
    # The split-conformal margin: the ceil((n + 1) x level)-th smallest |score|, the largest when n is too small.
    assert uncertainty.conformal_margin([-5, 1, 2, -3, 4, 6, 7, 8, 9, 10], 0.5) == 6
    assert uncertainty.conformal_margin([1, -2, 3], 0.9) == 3
    # The shipped margins were chosen so that sources left out land inside about as often as the intervals claim
    # (bench/intervals.py scores that nested); the unstretched regime quantiles covered 67-79%.
    prov = uncertainty.provenance()
    assert prov["nominal_level"] == uncertainty.LEVEL
    assert set(prov["margins"]) == set(prov["coverage"]) == {"throughput", "TTFT", "TPOT/ITL", "E2E"}
    for figure, covered in prov["coverage"].items():
        assert covered >= uncertainty.LEVEL - 0.07, figure
        m90, m96 = prov["margins"][figure]
        assert 0 < m90 <= m96


def test_recommend_names_the_close_calls_and_emits_a_space_that_loads(tmp_path):
    from autotune.search.space import load_space
    out = autotune("recommend", "--model", "Llama-3.1-8B", "--gpu", "H100", "--gpus", "8", "--requests", "400",
                   "--emit-space", str(tmp_path / "space.yaml"), "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert "intervals" in doc["winner"] and doc["winner"]["near_validated"] is True
    close = [line for line in doc["explanation"] if line.startswith("too close to call")]
    space = load_space(tmp_path / "space.yaml")
    assert space.backend == "vllm" and space.scenario.workload.num_requests == 400
    winner = Layout(**doc["winner"]["layout"])
    assert winner in space.layouts and doc["winner"]["knobs"]["max_num_seqs"] in space.knob_grid["max_num_seqs"]
    if close:
        assert len(space.layouts) > 1
    bad = autotune("recommend", "--model", "Llama-3.1-8B", "--gpu", "H100", "--gpus", "1", "--requests", "50",
                   "--emit-space", str(tmp_path / "nodir" / "x.yaml"))
    assert bad.returncode == 2 and "cannot write" in bad.stderr
