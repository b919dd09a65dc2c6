"""The fault suite: hostile and mistaken inputs get one line on stderr and exit code 2 (never a traceback, a hang
or a silent answer), two runners never share a study, a resume never mixes studies, and names never become SQL."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from autotune.cli import main

GOOD_CONFIG = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 128, "vocab_size": 1000}
PREDICT = ["predict", "--gpu", "H200", "--gpus", "1", "--layout", "tp=1", "--requests", "20"]
RECOMMEND = ["recommend", "--model", "Llama-3.1-8B", "--gpu", "H200", "--requests", "20"]
SPACE = ("name: {name}\ncluster: {{gpu: H200, nodes: 1, gpus_per_node: 2}}\nmodel: Llama-3.1-8B\n"
         "workload: {{preset: chat, num_requests: 30}}\n"
         "dimensions: {{max_num_seqs: [64], {extra}}}\nbudget: {{trials: 2, parallel: 1}}\nbackend: sim\n")


def config_case(tmp: Path, name: str, **changes) -> list[str]:
    d = tmp / name
    d.mkdir()
    cfg = {k: v for k, v in {**GOOD_CONFIG, **changes}.items() if v is not ...}
    (d / "config.json").write_text(json.dumps(cfg))
    return [*PREDICT, "--model", str(d)]


def file_case(tmp: Path, name: str, content: str | bytes) -> Path:
    p = tmp / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


def space_case(tmp: Path, label: str, name: str = "s", extra: str = "gpu_memory_utilization: [0.9]") -> list[str]:
    p = file_case(tmp, f"{label}.yaml", SPACE.format(name=name, extra=extra))
    return ["run", str(p), "--study-dir", str(tmp / f"study-{label}")]


def hostile_inputs(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(label, argv, a phrase the one-line error must contain)."""
    cases = [
        ("heads 0", config_case(tmp, "c1", num_attention_heads=0), "num_attention_heads"),
        ("kv heads 0", config_case(tmp, "c2", num_key_value_heads=0), "must be positive"),
        ("head_dim 0", config_case(tmp, "c3", head_dim=0), "must be positive"),
        ("hidden negative", config_case(tmp, "c4", hidden_size=-64), "must be positive"),
        ("vocab negative", config_case(tmp, "c5", vocab_size=-1), "must be positive"),
        ("layers string", config_case(tmp, "c6", num_hidden_layers="two"), "must be an integer"),
        ("hidden list", config_case(tmp, "c7", hidden_size=[64]), "must be an integer"),
        ("hidden NaN", config_case(tmp, "c8", hidden_size=math.nan), "must be an integer"),
        ("hidden inf", config_case(tmp, "c9", hidden_size=math.inf), "must be an integer"),
        ("hidden float", config_case(tmp, "c10", hidden_size=64.5), "must be an integer"),
        ("hidden bool", config_case(tmp, "c11", hidden_size=True), "must be an integer"),
        ("quant string", config_case(tmp, "c12", quantization_config="fp8"), "quantization_config"),
        ("text_config number", config_case(tmp, "c13", text_config=3), "text_config"),
        ("uneven kv heads", config_case(tmp, "c14", num_key_value_heads=3), "evenly"),
        ("experts > total", config_case(tmp, "c15", num_local_experts=4, num_experts_per_tok=8), "experts_per_token"),
        ("layer_types number", config_case(tmp, "c16", layer_types=5), "layer_types"),
        ("missing vocab", config_case(tmp, "c17", vocab_size=...), "missing required"),
        ("json array", [*PREDICT, "--model", str(file_case(tmp, "arr.json", "[1, 2]"))], "not a JSON object"),
        ("json binary", [*PREDICT, "--model", str(file_case(tmp, "bin.json", b"\x00\xff\xfe"))], "not valid JSON"),
        ("gpus huge", [*RECOMMEND[:-2], "--gpus", "800000000"], "1..65536"),
        ("gpus zero", ["predict", "--gpu", "H200", "--gpus", "0", "--layout", "tp=1", "--model", "Llama-3.1-8B"],
         "at least 1"),
        ("gpus per node 0", [*PREDICT, "--model", "Llama-3.1-8B", "--gpus-per-node", "0"], "per node"),
        ("layout arabic digit", [*PREDICT[:6], "dp=٣", "--model", "Llama-3.1-8B"], "cannot parse layout"),
        ("layout huge", [*PREDICT[:6], "dp=9999999", "--model", "Llama-3.1-8B"], "cannot parse layout"),
        ("rate inf", [*PREDICT, "--model", "Llama-3.1-8B", "--mode", "poisson", "--rate", "inf"], "finite"),
        ("rate nan", [*PREDICT, "--model", "Llama-3.1-8B", "--mode", "poisson", "--rate", "nan"], "finite"),
        ("rate negative", [*PREDICT, "--model", "Llama-3.1-8B", "--rate", "-1"], "finite number"),
        ("requests huge", [*PREDICT[:-1], "1000000000", "--model", "Llama-3.1-8B"], "1..1,000,000"),
        ("requests zero", [*PREDICT[:-1], "0", "--model", "Llama-3.1-8B"], "1..1,000,000"),
        ("seed negative", [*PREDICT, "--model", "Llama-3.1-8B", "--seed", "-1"], "seed"),
        ("concurrency zero", [*PREDICT, "--model", "Llama-3.1-8B", "--mode", "concurrency", "--concurrency", "0"],
         "concurrency"),
        ("mem util 1.5", [*PREDICT, "--model", "Llama-3.1-8B", "--gpu-memory-utilization", "1.5"], "(0, 1]"),
        ("mem util 0", [*PREDICT, "--model", "Llama-3.1-8B", "--gpu-memory-utilization", "0"], "(0, 1]"),
        ("batched tokens 0", [*PREDICT, "--model", "Llama-3.1-8B", "--max-num-batched-tokens", "0"], "an integer in 1.."),
        ("seqs negative", [*PREDICT, "--model", "Llama-3.1-8B", "--max-num-seqs", "-3"], "an integer in 1.."),
        ("api servers 0", [*PREDICT, "--model", "Llama-3.1-8B", "--api-server-count", "0"], "an integer in 1.."),
        ("top -1", [*RECOMMEND, "--gpus", "1", "--top", "-1"], "--top"),
        ("tolerance 2", [*RECOMMEND, "--gpus", "1", "--tolerance", "2"], "--tolerance"),
        ("slo negative", [*RECOMMEND, "--gpus", "1", "--slo-tpot-ms", "-1"], "positive"),
        ("slo nan", [*RECOMMEND, "--gpus", "1", "--slo-ttft-ms", "nan"], "positive"),
        ("goodput without slo", [*RECOMMEND, "--gpus", "1", "--goal", "goodput"], "needs an SLO"),
        ("size rate nan", ["size", "--model", "Llama-3.1-8B", "--rate", "nan"], "--rate"),
        ("size rate inf", ["size", "--model", "Llama-3.1-8B", "--rate", "inf"], "--rate"),
        ("size max gpus 0", ["size", "--model", "Llama-3.1-8B", "--rate", "1", "--max-gpus", "0"], "--max-gpus"),
        ("unknown gpu", [*PREDICT[:1], "--gpu", "H900", *PREDICT[3:], "--model", "Llama-3.1-8B"], "unknown GPU"),
        ("unknown model", [*PREDICT, "--model", "Lama-3.1-8B"], "did you mean"),
    ]
    for i, (label, body, phrase) in enumerate([
            ("length 0", "name: w\nprompt: 0\noutput: 10\n", "fixed length"),
            ("length negative", "name: w\nprompt: {kind: fixed, value: -5}\noutput: 10\n", "fixed length"),
            ("length NaN", "name: w\nprompt: {kind: lognormal, median: .nan, sigma: 1, max: 10}\noutput: 10\n",
             "finite"),
            ("sigma inf", "name: w\nprompt: {kind: lognormal, median: 10, sigma: .inf, max: 10}\noutput: 10\n",
             "finite"),
            ("bins bad", "name: w\nprompt: {kind: bins, bins: [[1, 5, 2]]}\noutput: 10\n", "each bin"),
            ("bins not lists", "name: w\nprompt: {kind: bins, bins: 7}\noutput: 10\n", "w"),
            ("preset list", "preset: [a]\n", "unknown preset"),
            ("stage inf", "name: w\nprompt: 10\noutput: 10\nmode: poisson\nstages: [{rate: .inf, duration_s: 1}]\n",
             "finite rate"),
            ("stages huge", "name: w\nprompt: 10\noutput: 10\nmode: poisson\n"
                            "stages: [{rate: 1000000, duration_s: 1000000}]\n", "requests"),
            ("requests string", "name: w\nprompt: 10\noutput: 10\nnum_requests: many\n", "w"),
            ("not a mapping", "- 1\n- 2\n", "mapping"),
            ("binary", "\x00\x01\x02", "YAML"),
            ("billion laughs", "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
                               "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n", "w"),
    ]):
        wl = file_case(tmp, f"w{i}.yaml", body)
        cases.append((f"workload {label}", [*PREDICT, "--model", "Llama-3.1-8B", "--workload", str(wl)], phrase))
    files = {"--calibration": [("calibration list", "- 1\n", "mapping"),
                               ("calibration unknown", "efficiency: {hbm_speed: 1}\n", "unknown efficiency"),
                               ("calibration range", "efficiency: {hbm: 7}\n", "out of range"),
                               ("calibration string", "efficiency: {hbm: fast}\n", "numbers"),
                               ("calibration binary", "\x00\xff", "YAML")],
             "--prices": [("prices negative", "H200: -1\n", "positive"),
                          ("prices unknown gpu", "H900: 1\n", "unknown GPU"),
                          ("prices list", "- 1\n", "mapping"),
                          ("prices string", "H200: {usd_per_gpu_hour: cheap}\n", "positive"),
                          ("prices binary", "\x00\xff", "YAML")]}
    for flag, flag_cases in files.items():
        for i, (label, body, phrase) in enumerate(flag_cases):
            f = file_case(tmp, f"{flag.strip('-')}{i}.yaml", body)
            cases.append((label, [*PREDICT, "--model", "Llama-3.1-8B", flag, str(f)], phrase))
    cases += [
        ("space mem util 1.5", space_case(tmp, "s1", extra="gpu_memory_utilization: [1.5]"), "(0, 1]"),
        ("space batched 0", space_case(tmp, "s2", extra="max_num_batched_tokens: [0]"), "max_num_batched_tokens"),
        ("space blocks 0", space_case(tmp, "s3", extra="num_gpu_blocks_override: [0]"), "num_gpu_blocks_override"),
        ("space name path", space_case(tmp, "s4", name="../../x"), "study name"),
        ("space name empty", space_case(tmp, "s5", name='""'), "study name"),
        ("space name quote", space_case(tmp, "s6", name="\"x'); COPY (SELECT 1) TO '/tmp/pwn' --\""), "study name"),
        ("space unknown key", space_case(tmp, "s7", extra="max_num_seq: [64]"), "did you mean max_num_seqs?"),
        ("real trials over two nodes", ["run", str(file_case(tmp, "s12.yaml", SPACE.format(name="s", extra="").replace(
            "nodes: 1", "nodes: 2").replace("backend: sim", "backend: vllm"))), "--study-dir", str(tmp / "study-s12")],
         "backend vllm runs each trial on one node"),
        ("pace nan", [*space_case(tmp, "s8"), "--pace", "nan"], "--pace"),
        ("trials 0", [*space_case(tmp, "s9"), "--trials", "0"], "--trials"),
    ]
    study_file = file_case(tmp, "a-file", "not a directory")
    empty_header = tmp / "empty-header"
    empty_header.mkdir()
    (empty_header / "study.json").write_text("{}")
    list_header = tmp / "list-header"
    list_header.mkdir()
    (list_header / "study.json").write_text("[]")
    cases += [
        ("best on a file", ["best", str(study_file)], "study"),
        ("best on {} study.json", ["best", str(empty_header)], "study"),
        ("pareto on [] study.json", ["pareto", str(list_header)], "study"),
        ("export on [] study.json", ["export", str(list_header)], "study"),
        ("run into a file", [*space_case(tmp, "s10")[:2], "--study-dir", str(study_file)], "is a file"),
        ("resume nothing", [*space_case(tmp, "s11"), "--resume"], "no study.json"),
    ]
    return cases


def test_hostile_inputs_get_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    results = []
    for label, argv, phrase in hostile_inputs(tmp_path):
        try:
            code = main(argv)
        except BaseException as exc:    # a traceback a user would see: recorded as the failure it is
            code = f"{type(exc).__name__}: {exc}"
        out, err = capsys.readouterr()
        results.append((label, code, err.strip(), phrase))
    bad = [(label, code, err) for label, code, err, phrase in results
           if code != 2 or len(err.splitlines()) != 1 or phrase.lower() not in err.lower() or "Traceback" in err]
    assert len(results) >= 60
    assert not bad, "\n".join(f"{label}: exit {code}: {err}" for label, code, err in bad)
    assert not Path("/tmp/pwn").exists()


def test_inputs_that_used_to_hang_answer_at_once(tmp_path):
    """Each bounded before work starts: as a real process, with a deadline far above the answer's time."""
    laughs = ["name: s", "cluster: {gpu: H200, nodes: 1, gpus_per_node: 2}", "model: Llama-3.1-8B", "extra:",
              "  l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    laughs += [f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 9)]
    (tmp_path / "laughs.yaml").write_text("\n".join(laughs) + "\n")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00" * 100)
    for argv in (["run", str(tmp_path / "laughs.yaml"), "--study-dir", str(tmp_path / "l")],
                 ["run", str(tmp_path / "binary.yaml"), "--study-dir", str(tmp_path / "b")],
                 ["predict", "--model", "Llama-3.1-8B", "--gpu", "H200", "--gpus", "1", "--layout", "tp=1",
                  "--mode", "poisson", "--rate", "nan"],
                 ["recommend", "--model", "Llama-3.1-8B", "--gpu", "H200", "--gpus", "800000000"]):
        out = subprocess.run([sys.executable, "-m", "autotune.cli", *argv], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, (argv, out.stderr)
    assert not (tmp_path / "l").exists() and not (tmp_path / "b").exists()


def test_a_closed_pipe_ends_quietly(tmp_path):
    # More JSON than a pipe holds (about 110 KB), so the writer meets the closed pipe.
    layouts = " ".join(f"--layout {lay}" for lay in ("dp=8", "dp=4,tp=2", "dp=2,tp=4", "tp=8", "tp=4,pp=2", "pp=8",
                                                     "dp=2,pp=4", "dp=4,pp=2"))
    cmd = (f"{sys.executable} -m autotune.cli predict --model Llama-3.1-8B --gpu H200 --gpus 8 --requests 300 "
           f"{layouts} --json --series | head -c 10")
    out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr
