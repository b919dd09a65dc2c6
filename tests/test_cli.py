"""The commands as a user runs them: real subprocesses, stable JSON keys, one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest

PREDICT_KEYS = {"layout", "feasible", "reason", "makespan_s", "output_tok_s", "output_tok_s_per_gpu", "ttft_p50_s",
                "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "e2e_p50_s", "e2e_p99_s", "preemptions",
                "kv_capacity_tokens", "kv_peak_frac", "bottleneck"}


def autotune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autotune.cli", *args], capture_output=True, text=True, timeout=300)


def test_models_list_and_show():
    out = autotune("models", "--json")
    assert out.returncode == 0
    names = {m["name"] for m in json.loads(out.stdout)}
    assert {"Llama-3.1-8B", "DeepSeek-R1", "gpt-oss-120b"} <= names
    show = json.loads(autotune("models", "show", "DeepSeek-V3", "--json").stdout)
    assert show["derived"]["kv_bytes_per_token"] == 70272 and show["derived"]["attention"] == "MLA"
    assert "Model catalog" in autotune("models").stdout
    mla, gqa = autotune("models", "show", "DeepSeek-V3").stdout, autotune("models", "show", "Llama-3.1-8B").stdout
    assert "MLA latent 512" in mla and "│ num_kv_heads" not in mla and "│ head_dim " not in mla
    assert "│ num_kv_heads" in gqa and "kv_lora_rank" not in gqa and "num_experts" not in gqa


def test_predict_json_has_the_stable_keys():
    out = autotune("predict", "--model", "Llama-3.1-8B", "--gpu", "H200", "--gpus", "8", "--layout", "dp=8",
                   "--layout", "dp=4,tp=2", "--requests", "300", "--json", "--series")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert len(rows) == 2 and all(PREDICT_KEYS <= set(r) for r in rows)
    assert rows[0]["layout"] == {"dp": 8, "tp": 1, "pp": 1, "ep": 1} and rows[1]["layout"]["tp"] == 2
    assert rows[0]["timeseries"] and {"t", "kv_frac", "running", "waiting"} <= set(rows[0]["timeseries"][0])


def test_no_p2p_slows_a_pcie_tp_prefill_and_reaches_size_too():
    args = ("--model", "Qwen3-30B-A3B", "--gpu", "A100-PCIe-40GB", "--gpus", "4", "--layout", "tp=4",
            "--workload", "long-context", "--mode", "concurrency", "--concurrency", "4", "--requests", "16", "--json")
    ttft = {flag: json.loads(autotune("predict", *args, *flag).stdout)[0]["ttft_p50_s"] for flag in ((), ("--no-p2p",))}
    assert ttft[("--no-p2p",)] > 1.5 * ttft[()]
    # Through host memory the 4 GPUs that serve 0.5 req/s with P2P fall short: size asks for more.
    gpus = {flag: json.loads(autotune("size", "--model", "Qwen3-30B-A3B", "--gpu", "A100-PCIe-40GB", "--rate", "0.5",
                                      "--max-gpus", "8", "--json", *flag).stdout)["answers"][0]["gpus"]
            for flag in ((), ("--no-p2p",))}
    assert gpus[()] and gpus[("--no-p2p",)] > gpus[()]


def test_predict_reports_a_layout_that_does_not_fit_in_json():
    out = autotune("predict", "--model", "Llama-3.1-405B", "--gpu", "H200", "--gpus", "8", "--layout", "tp=8",
                   "--layout", "dp=2,tp=4", "--requests", "50", "--json")
    rows = json.loads(out.stdout)
    assert out.returncode == 0 and rows[0]["feasible"] and not rows[1]["feasible"]
    assert "does not fit" in rows[1]["reason"]


def test_recommend_names_a_winner_explains_and_prints_the_serve_command():
    out = autotune("recommend", "--model", "DeepSeek-R1-Distill-Qwen-14B", "--gpu", "H100", "--gpus", "4",
                   "--requests", "400", "--json")
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout)
    w = rec["winner"]
    assert PREDICT_KEYS <= set(w) and rec["ranked"][0]["output_tok_s"] == w["output_tok_s"]
    assert rec["serve_command"][0].startswith("vllm serve deepseek-ai/DeepSeek-R1-Distill-Qwen-14B")
    assert f"--tensor-parallel-size {w['layout']['tp']}" in rec["serve_command"][0]
    assert rec["pareto"] and rec["explanation"][0].startswith(w["label"])
    human = autotune("recommend", "--model", "DeepSeek-R1-Distill-Qwen-14B", "--gpu", "H100", "--gpus", "4",
                     "--requests", "400")
    assert "Deploy the winner" in human.stdout and "vllm serve" in human.stdout


def test_recommend_respects_the_slo():
    out = autotune("recommend", "--model", "Llama-3.1-8B", "--gpu", "H200", "--gpus", "2", "--requests", "300",
                   "--slo-tpot-ms", "15", "--json")
    rec = json.loads(out.stdout)
    assert all(r["tpot_p99_s"] <= 0.015 for r in rec["ranked"])


@pytest.mark.parametrize("args,message", [
    (["predict", "--model", "Lama-3.1-8B", "--gpu", "H200", "--gpus", "8", "--layout", "dp=8"], "did you mean"),
    (["predict", "--model", "Llama-3.1-8B", "--gpu", "H200", "--gpus", "8", "--layout", "dp=two"], "cannot parse"),
    (["predict", "--model", "Llama-3.1-8B", "--gpu", "H200", "--gpus", "8", "--layout", "tp=3"], "impossible"),
    (["predict", "--model", "Llama-3.1-405B", "--gpu", "H200", "--gpus", "8", "--layout", "dp=8"], "does not fit"),
    (["predict", "--model", "Llama-3.1-8B", "--gpu", "H999", "--gpus", "8", "--layout", "dp=8"], "unknown GPU"),
    (["recommend", "--model", "Llama-3.1-8B"], "required"),
    (["predict", "--model", "Llama-3.1-8B", "--gpu", "H200", "--gpus", "8", "--layout", "dp=8",
      "--workload", "nope"], "unknown workload"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    out = autotune(*args)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


def test_config_json_missing_fields(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64}')
    out = autotune("predict", "--model", str(tmp_path), "--gpu", "H200", "--gpus", "1", "--layout", "tp=1")
    assert out.returncode == 2 and "missing required field" in out.stderr and "Traceback" not in out.stderr


def test_custom_workload_yaml(tmp_path):
    (tmp_path / "w.yaml").write_text("name: short\nprompt: {kind: fixed, value: 100}\n"
                                     "output: {kind: bins, bins: [[1, 10, 20]]}\nnum_requests: 50\n")
    out = autotune("predict", "--model", "Llama-3.1-8B", "--gpu", "H200", "--gpus", "1", "--layout", "tp=1",
                   "--workload", str(tmp_path / "w.yaml"), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["num_requests"] == 50
    (tmp_path / "bad.yaml").write_text("name: x\nprompt: {kind: weird}\noutput: 5\n")
    bad = autotune("predict", "--model", "Llama-3.1-8B", "--gpu", "H200", "--gpus", "1", "--layout", "tp=1",
                   "--workload", str(tmp_path / "bad.yaml"))
    assert bad.returncode == 2 and "unknown kind 'weird'" in bad.stderr


def test_series_needs_json_and_studies_says_where_it_looked(tmp_path):
    out = autotune("predict", "--model", "Llama-3.1-8B", "--gpu", "H200", "--gpus", "1", "--layout", "tp=1",
                   "--requests", "20", "--series")
    assert out.returncode == 2 and "--json" in out.stderr and "Traceback" not in out.stderr
    empty = autotune("studies", "--root", str(tmp_path / "nowhere"))
    assert empty.returncode == 0 and "no study under" in empty.stdout and "nowhere" in empty.stdout


def test_best_says_when_no_trial_meets_the_slos_and_exits_1(tmp_path):
    from store.writer import StudyWriter
    from tests.fake_study import add_trial, build
    build(tmp_path / "ok", trials=4).close()
    out = autotune("best", str(tmp_path / "ok"), "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["feasible_slo"] is True
    w = StudyWriter(tmp_path / "none", flush_s=0.1)
    w.write_header({"name": "violators", "backend": "sim", "model": "m", "cluster": "1 x 8 H200",
                    "objectives": [{"metric": "output_tok_s_per_gpu", "direction": "maximize"}]})
    add_trial(w, 2, tmp_path / "none")      # every third fixture trial violates the SLOs
    w.close()
    out = autotune("best", str(tmp_path / "none"))
    assert out.returncode == 1 and "no completed trial meets the SLOs" in out.stderr and "Traceback" not in out.stderr


def test_multi_node_commands_paste_one_per_node():
    from autotune.deploy import serve_commands
    from autotune.spec.hardware import Cluster, load_gpu
    from autotune.spec.layout import EngineKnobs, Layout
    from autotune.spec.models import load_model

    r1, cluster = load_model("DeepSeek-R1"), Cluster.of(load_gpu("H200"), 24)
    dp = serve_commands(r1, cluster, Layout(dp=24, ep=24), EngineKnobs(max_num_seqs=64))
    assert len(dp) == 3 and "--headless" not in dp[0]
    assert [c.split("--data-parallel-start-rank ")[1].split()[0] for c in dp[1:]] == ["8", "16"]
    for command in dp:     # each line is one complete command: no arithmetic, no second command after a comment
        assert command.startswith("vllm serve deepseek-ai/DeepSeek-R1 ") and "*" not in command
        assert command.count("#") == 1 and '"$HEAD_IP"' in command
    spans = serve_commands(r1, cluster, Layout(tp=8, pp=3), EngineKnobs())
    assert spans[0].startswith("ray start --head") and spans[-1].startswith("vllm serve")
    assert len([c for c in spans if c.startswith("ray start --address")]) == 2


def test_a_config_path_model_deploys_from_its_directory_and_says_what_was_assumed(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 64,
                                                      "num_attention_heads": 4, "intermediate_size": 128,
                                                      "vocab_size": 1000}))
    out = autotune("recommend", "--model", str(tmp_path), "--gpu", "H200", "--gpus", "1", "--requests", "20",
                   "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["serve_command"][0].startswith(f"vllm serve {tmp_path.resolve()} ")
    assert "no max_position_embeddings: 131,072 tokens assumed" in out.stderr
