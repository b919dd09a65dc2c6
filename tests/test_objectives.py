"""The best result and the Pareto front, defined once (autotune/spec/objectives.py): every consumer ranks alike, in each
objective's direction, on a real study store."""

import json
import subprocess
import sys

from autotune.spec.objectives import Objective, best, pareto_front
from tests.fake_study import build
from store.queries import best as study_best
from store.reader import StudyReader
from tui.view import header_view

ROWS = [{"id": 0, "thr": 100.0, "tpot": 0.05, "ok": True}, {"id": 1, "thr": 300.0, "tpot": 0.02, "ok": False},
        {"id": 2, "thr": 200.0, "tpot": 0.03, "ok": True}, {"id": 3, "thr": 200.0, "tpot": 0.01, "ok": True},
        {"id": 4, "thr": None, "tpot": 0.001, "ok": True}]


def get(row, metric):
    return row[{"output_tok_s_per_gpu": "thr", "tpot_p99_s": "tpot"}[metric]]


def test_best_follows_each_objectives_direction_and_prefers_what_meets_the_slos():
    thr, tpot = Objective.of("output_tok_s_per_gpu"), Objective.of("tpot_p99_s")
    assert (thr.direction, tpot.direction) == ("maximize", "minimize")
    ok = lambda r: r["ok"]
    # Row 1 is fastest but violates the SLOs; rows 2 and 3 tie on throughput and the second objective breaks it;
    # row 4 has no throughput measured and never wins.
    assert best(ROWS, (thr, tpot), get, ok)["id"] == 3
    assert best(ROWS, (tpot,), lambda r, m: r["tpot"], ok)["id"] == 4
    assert best(ROWS, (tpot, thr), get, ok)["id"] == 3
    # When nothing meets the SLOs the best violator comes back, flagged by its own row.
    assert best(ROWS, (thr,), get, lambda r: False)["id"] == 1
    assert best([], (thr,), get, ok) is None


def test_the_pareto_front_is_throughput_per_gpu_against_a_latency():
    assert [r["id"] for r in pareto_front(ROWS, "tpot_p99_s", get)] == [3, 1]


def test_the_store_the_cli_and_the_dashboard_agree_on_a_minimising_objective(tmp_path):
    w = build(tmp_path)
    header = json.loads((tmp_path / "study.json").read_text())
    header["objectives"] = [{"metric": "tpot_p99_s", "direction": "minimize"}]
    w.write_header({k: v for k, v in header.items() if k not in ("schema_version", "host", "pid")})
    w.close()
    reader = StudyReader(tmp_path)
    meeting = [t for t in reader.trials() if t["state"] == "COMPLETE" and t["feasible_slo"]]
    lowest = min(meeting, key=lambda t: t["tpot_p99_s"])
    assert study_best(reader)["number"] == lowest["number"]
    out = subprocess.run([sys.executable, "-m", "autotune.cli", "best", str(tmp_path), "--json"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["number"] == lowest["number"]
    view = header_view(reader.snapshot())
    assert view.best.startswith(f"{lowest['label']} s{lowest['max_num_seqs']}: p99 TPOT (ms) "
                                f"{lowest['tpot_p99_s'] * 1e3:,.1f}")
