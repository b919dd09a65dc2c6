"""Whole studies as a user runs them: `autotune run` in a subprocess with a real local Ray and a real DuckDB store."""

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from store.reader import StudyReader

SPACE = """\
name: test-study
cluster: {gpu: H200, nodes: 1, gpus_per_node: 8}
model: DeepSeek-R1-Distill-Qwen-14B
workload: {preset: natural-reasoning, num_requests: 200}
dimensions:
  layout: auto
  max_num_seqs: [32, 64, 128, 256, 512]
  max_num_batched_tokens: [4096, 8192]
objectives:
  - {metric: output_tok_s_per_gpu}
  - {metric: tpot_p99_s}
constraints: {tpot_p99_ms: 60}
budget: {trials: 40, parallel: 2}
backend: sim
"""

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def autotune(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "autotune.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "autotune.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, env=ENV)


@pytest.fixture
def space(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text(SPACE)
    return f


def wait_for(study: Path, predicate, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (study / "study.json").exists():
            trials = StudyReader(study).trials()
            if predicate(trials):
                return trials
        time.sleep(0.3)
    raise AssertionError("the study did not get there in time")


def listening_off_loopback(pid: int) -> list[str]:
    """The TCP sockets that a process and everything it started (Ray's GCS, raylet, agents, workers) listen on
    at an address other than loopback."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    found = []
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.Error:
            continue
        found += [f"{proc.name()} {c.laddr.ip}:{c.laddr.port}" for c in conns if c.status == psutil.CONN_LISTEN
                  and not ipaddress.ip_address(c.laddr.ip.removeprefix("::ffff:")).is_loopback]
    assert len(procs) > 3, "Ray's processes are not children of the runner"
    return found


def params(t):
    return (t["dp"], t["tp"], t["pp"], t["ep"], t["max_num_seqs"], t["max_num_batched_tokens"])


def test_forty_trial_simulated_study_end_to_end(space, tmp_path):
    study = tmp_path / "study"
    out = autotune("run", str(space), "--study-dir", str(study))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "progress 40/40" in out.stdout
    assert "Token authentication" not in out.stderr + out.stdout     # Ray keeps it on, quietly
    reader = StudyReader(study)
    trials = reader.trials()
    assert len(trials) == 40 and [t["number"] for t in trials] == list(range(40))
    assert {t["state"] for t in trials} <= {"COMPLETE", "FAIL"}
    assert all(t["reason"] for t in trials if t["state"] == "FAIL")
    assert all(t["output_tok_s"] > 0 for t in trials if t["state"] == "COMPLETE")
    assert len({params(t) for t in trials}) == 40, "a point of the space ran twice"
    assert any(t["origin"] == "warm-start" for t in trials)
    assert reader.query("SELECT count(DISTINCT number) AS n FROM trial_series")[0]["n"] >= 30
    assert reader.query("SELECT count(*) AS n FROM gpu_samples WHERE mem_used_bytes > 0")[0]["n"] > 0
    assert reader.header()["status"] == "finished" and (study / "study.duckdb").is_file()
    best = json.loads(autotune("best", str(study), "--json").stdout)
    assert best["state"] == "COMPLETE" and best["feasible_slo"] and best["tpot_p99_s"] <= 0.06
    assert best["serve_command"][0].startswith("vllm serve deepseek-ai/DeepSeek-R1-Distill-Qwen-14B")
    front = json.loads(autotune("pareto", str(study), "--json", "--latency", "e2e_p99_s").stdout)
    assert front and all(a["e2e_p99_s"] <= b["e2e_p99_s"] for a, b in zip(front, front[1:]))
    exported = autotune("export", str(study), "--format", "parquet")
    assert exported.returncode == 0 and (study / "export" / "trials.parquet").is_file()
    listing = json.loads(autotune("studies", "--root", str(tmp_path), "--json").stdout)
    assert listing[0]["trials"] == 40 and listing[0]["status"] == "finished"
    # A simulated study holds predictions, not measurements: nothing to calibrate on.
    cal = autotune("calibrate", str(study))
    assert cal.returncode == 2 and "simulated study" in cal.stderr and not (study / "calibration.yaml").exists()


def test_kill_9_then_resume_loses_no_completed_trial(space, tmp_path):
    study = tmp_path / "study"
    run = start("run", str(space), "--study-dir", str(study), "--trials", "14", "--pace", "400")
    before = wait_for(study, lambda ts: sum(t["state"] == "COMPLETE" for t in ts) >= 4)
    os.killpg(run.pid, signal.SIGKILL)     # the job and its Ray processes, as a scheduler would kill them
    run.wait()
    before = StudyReader(study).trials()
    completed = {t["number"]: t["output_tok_s"] for t in before if t["state"] == "COMPLETE"}
    assert StudyReader(study).header()["status"] == "running"
    out = autotune("run", str(space), "--study-dir", str(study), "--trials", "14", "--resume")
    assert out.returncode == 0, out.stderr[-2000:]
    after = {t["number"]: t for t in StudyReader(study).trials()}
    assert len(after) == 14
    for number, tok in completed.items():
        assert after[number]["state"] == "COMPLETE" and after[number]["output_tok_s"] == tok
    stale = [t for t in after.values() if t["reason"] and t["reason"].startswith("stale")]
    assert all(t["state"] == "FAIL" for t in stale)
    assert not any(t["state"] == "RUNNING" for t in after.values())
    ran = [params(t) for t in after.values() if t["state"] == "COMPLETE"]
    assert len(ran) == len(set(ran))


FOLLOW = """
import json, sys, time
from store.reader import StudyReader
counts, points, errors = [], 0, 0
deadline = time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        snap = StudyReader(sys.argv[1]).snapshot()
        counts.append(snap.count("COMPLETE"))
        points = max(points, sum(len(s) for s in snap.series.values()))
    except Exception as exc:
        if "not a study directory" not in str(exc):
            errors += 1
            print(repr(exc), file=sys.stderr)
    time.sleep(0.5)
print(json.dumps({"counts": counts, "points": points, "errors": errors}))
"""


def test_a_second_process_follows_a_live_study_and_sigterm_stops_it_cleanly(space, tmp_path):
    study = tmp_path / "study"
    run = start("run", str(space), "--study-dir", str(study), "--trials", "30", "--pace", "300")
    follower = subprocess.Popen([sys.executable, "-c", FOLLOW, str(study), "25"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ENV)
    out, err = follower.communicate(timeout=120)
    seen = json.loads(out)
    assert seen["errors"] == 0, err
    assert seen["counts"][-1] > seen["counts"][0] >= 0 and seen["points"] > 0
    assert listening_off_loopback(run.pid) == []
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=120) == 143
    reader = StudyReader(study)
    assert reader.header()["status"] == "interrupted"
    trials = reader.trials()
    assert trials and not any(t["state"] == "RUNNING" for t in trials)
    assert any(t["reason"] == "interrupted" for t in trials) or all(t["state"] == "COMPLETE" for t in trials)


@pytest.mark.parametrize("change,message", [
    (("name: test-study", "name: [broken"), "invalid YAML"),
    (("{metric: tpot_p99_s}", "{metric: speed}"), "unknown objective 'speed'"),
    (("layout: auto", "layout: {tp: [3, 5]}"), "no valid layout"),
])
def test_bad_spaces_fail_with_one_line(space, change, message):
    space.write_text(SPACE.replace(*change))
    out = autotune("run", str(space), "--study-dir", str(space.parent / "s"))
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


def test_commands_refuse_a_directory_that_is_not_a_study(tmp_path, space):
    for cmd in ("best", "pareto", "export"):
        out = autotune(cmd, str(tmp_path))
        assert out.returncode == 2 and "not a study directory" in out.stderr
    out = autotune("run", str(space), "--study-dir", str(tmp_path), "--resume")
    assert out.returncode == 2 and "no study.json" in out.stderr


def test_one_runner_per_study_and_a_resume_never_mixes_two_studies(space, tmp_path):
    study = tmp_path / "stu'dy; DROP"           # a quote and SQL in the path are just a path
    run = start("run", str(space), "--study-dir", str(study), "--trials", "6", "--pace", "400")
    wait_for(study, lambda ts: any(t["state"] == "COMPLETE" for t in ts))
    second = autotune("run", str(space), "--study-dir", str(study), "--resume", timeout=120)
    assert second.returncode == 2 and "being run by another runner (pid" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    os.killpg(run.pid, signal.SIGTERM)
    run.wait(timeout=120)
    header = (study / "study.json").read_text()
    segments = sorted(p.name for p in study.rglob("*.parquet"))
    foreign = space.parent / "foreign.yaml"
    foreign.write_text(SPACE.replace("DeepSeek-R1-Distill-Qwen-14B", "Llama-3.1-8B"))
    out = autotune("run", str(foreign), "--study-dir", str(study), "--resume", timeout=120)
    assert out.returncode == 2 and "another space or backend" in out.stderr
    assert (study / "study.json").read_text() == header
    assert sorted(p.name for p in study.rglob("*.parquet")) == segments
    # The same space resumes, and the study reads back through the quoted path.
    out = autotune("run", str(space), "--study-dir", str(study), "--trials", "6", "--resume")
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(StudyReader(study).trials()) == 6
    assert autotune("best", str(study), "--json").returncode == 0
    assert autotune("export", str(study), "--format", "csv").returncode == 0


def optuna_completed(study: Path) -> set[int]:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    storage = JournalStorage(JournalFileBackend(str(study / "optuna.journal")))
    (summary,) = optuna.get_all_study_summaries(storage)
    loaded = optuna.load_study(study_name=summary.study_name, storage=storage)
    # Repeats of an evaluated point are told its values but are no trial of the study.
    return {t.user_attrs["number"] for t in loaded.get_trials()
            if t.state.name == "COMPLETE" and not t.user_attrs.get("repeat")}


def test_a_torn_or_missing_journal_is_repaired_from_the_store(space, tmp_path):
    study = tmp_path / "study"
    assert autotune("run", str(space), "--study-dir", str(study), "--trials", "4").returncode == 0
    with open(study / "optuna.journal", "ab") as f:
        f.write(b'{"op_code": 5, "worker_id": "x", "trial_id": 9, "sta')     # a kill mid-write
    out = autotune("run", str(space), "--study-dir", str(study), "--trials", "6", "--resume")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dropped a torn last record" in out.stderr
    store = {t["number"] for t in StudyReader(study).trials() if t["state"] == "COMPLETE"}
    assert len(StudyReader(study).trials()) == 6 and optuna_completed(study) == store
    (study / "optuna.journal").unlink()
    out = autotune("run", str(space), "--study-dir", str(study), "--trials", "7", "--resume")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rebuilt from the store" in out.stderr and "told to the sampler again" in out.stderr
    store = {t["number"] for t in StudyReader(study).trials() if t["state"] == "COMPLETE"}
    assert len(StudyReader(study).trials()) == 7 and optuna_completed(study) == store


def test_sigint_while_ray_starts_ends_the_study_as_interrupted(space, tmp_path):
    study = tmp_path / "study"
    run = start("run", str(space), "--study-dir", str(study), "--trials", "40", "--pace", "400")
    lock = study / "runner.lock"
    deadline = time.time() + 120
    while time.time() < deadline and not (lock.exists() and "pid" in lock.read_text()):
        time.sleep(0.05)
    assert lock.exists(), "the runner never took its study"
    os.killpg(run.pid, signal.SIGINT)        # Ray takes seconds to start: this lands during its start-up
    assert run.wait(timeout=180) == 130
    header = StudyReader(study).header()
    assert header["status"] == "interrupted"
    assert len(StudyReader(study).trials()) < 40
