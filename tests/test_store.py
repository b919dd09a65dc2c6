"""The store with a real DuckDB: segments, compaction, consolidation, and a reader in another process."""

import json
import subprocess
import sys
import time

import duckdb
import pytest

from autotune.errors import UserError
from store import writer as writer_mod
from store.queries import best, export, pareto
from store.reader import StudyReader
from store.writer import StudyWriter, consolidate


def _trial(number, state, **extra):
    return {"number": number, "state": state, "dp": 1, "tp": 1, "pp": 1, "ep": 1, "label": "TP1",
            "max_num_seqs": 64, "gpus": 1, **extra}


def _metrics(number, tok, tpot):
    return {"number": number, "source": "backend", "output_tok_s": tok, "output_tok_s_per_gpu": tok,
            "tpot_p99_s": tpot, "ttft_p99_s": 1.0, "e2e_p99_s": 10.0, "preemptions": 0}


def make_study(path, n=5):
    w = StudyWriter(path)
    w.write_header({"name": "s", "objectives": [{"metric": "output_tok_s_per_gpu", "direction": "maximize"}]})
    for i in range(n):
        w.add("trials", _trial(i, "RUNNING"))
        w.add("trials", _trial(i, "COMPLETE", feasible_slo=i != 2))
        w.add("trial_metrics", _metrics(i, 100.0 * (i + 1), 0.01 * (5 - i)))
        w.add_many("trial_series", [{"number": i, "engine": 0, "t": t, "kv_frac": t / 10} for t in range(10)])
        w.flush()
    return w


def test_latest_state_per_trial_and_queries(tmp_path):
    make_study(tmp_path).close()
    r = StudyReader(tmp_path)
    trials = r.trials()
    assert [t["state"] for t in trials] == ["COMPLETE"] * 5
    assert best(r)["number"] == 4
    # Trial 4 has both the highest throughput and the lowest latency: it alone is the front.
    assert [t["number"] for t in pareto(r, "tpot_p99_s")] == [4]
    snap = r.snapshot()
    assert snap.count("COMPLETE") == 5 and len(snap.series[4]) == 10


def test_compaction_keeps_every_row(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_mod, "COMPACT_AFTER", 3)
    make_study(tmp_path, n=8).close()
    files = list((tmp_path / "segments" / "trials").glob("*.parquet"))
    assert len(files) <= 4
    assert len(StudyReader(tmp_path).trials()) == 8
    assert len(StudyReader(tmp_path).query("SELECT * FROM trial_series")) == 80


def test_consolidate_and_export(tmp_path):
    make_study(tmp_path).close()
    db = consolidate(tmp_path)
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM trials_latest").fetchone()[0] == 5
    assert con.execute("SELECT count(*) FROM trials").fetchone()[0] == 10
    con.close()
    for fmt in ("parquet", "csv", "json"):
        paths = export(StudyReader(tmp_path), fmt, tmp_path / f"out-{fmt}")
        assert {p.name for p in paths} == {f"trials.{fmt}", f"trial_metrics.{fmt}", f"trial_series.{fmt}",
                                           f"gpu_samples.{fmt}"}
    rows = json.loads((tmp_path / "out-json" / "trials.json").read_text())
    assert len(rows) == 5


def test_not_a_study_directory(tmp_path):
    with pytest.raises(UserError, match="not a study directory"):
        StudyReader(tmp_path)


READER = """
import sys, time, json
from store.reader import StudyReader
counts, errors = [], 0
deadline = time.time() + 12
while time.time() < deadline:
    try:
        counts.append(len(StudyReader(sys.argv[1]).trials()))
    except Exception as exc:
        errors += 1
        print(repr(exc), file=sys.stderr)
    time.sleep(0.1)
print(json.dumps({"counts": counts, "errors": errors}))
"""


def test_a_reader_in_another_process_follows_the_writer(tmp_path, monkeypatch):
    monkeypatch.setattr(writer_mod, "COMPACT_AFTER", 8)     # compactions happen while the reader reads
    w = StudyWriter(tmp_path, flush_s=0.2)
    w.write_header({"name": "live"})
    reader = subprocess.Popen([sys.executable, "-c", READER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    lag = []
    for i in range(60):
        w.add("trials", _trial(i, "COMPLETE"))
        w.flush()
        t0 = time.time()
        if i % 20 == 0:     # the writer's own view: visible to a fresh reader right after the flush
            lag.append(len(StudyReader(tmp_path).trials()) == i + 1)
        time.sleep(max(0.0, 0.15 - (time.time() - t0)))
    w.close()
    out = json.loads(reader.communicate(timeout=30)[0])
    assert out["errors"] == 0
    assert out["counts"][0] < 60 and out["counts"][-1] == 60
    assert out["counts"] == sorted(out["counts"])
    assert all(lag)


def test_segments_written_before_a_column_was_added_stay_readable(tmp_path):
    """An older version wrote trials without today's knob columns: they read back as NULL, nothing breaks."""
    make_study(tmp_path, n=2).close()
    old = tmp_path / "segments" / "trials" / "00000090-00000090.parquet"
    duckdb.sql(f"COPY (SELECT 7 AS number, 1 AS seq, 'COMPLETE' AS state, 'TP1' AS label) TO '{old}' (FORMAT parquet)")
    r = StudyReader(tmp_path)
    row = next(t for t in r.trials() if t["number"] == 7)
    assert row["state"] == "COMPLETE" and row["block_size"] is None
    from store.follow import StudyFollower
    assert 7 in {t["number"] for t in StudyFollower(tmp_path).refresh().trials}
    con = duckdb.connect(str(consolidate(tmp_path)), read_only=True)
    assert con.execute("SELECT count(*) FROM trials_latest").fetchone()[0] == 3
    con.close()


def test_a_full_disk_loses_nothing_and_says_so_in_one_line(tmp_path, monkeypatch):
    """ENOSPC injected where the machine cannot give a small tmpfs: a failed flush keeps its rows for the next one,
    leaves no half-written segment, and a failed consolidation keeps the segments and the previous study.duckdb."""
    import errno

    import duckdb

    from autotune.errors import UserError
    from store import writer as writer_mod
    from store.reader import StudyReader
    from store.writer import StudyWriter, consolidate

    w = StudyWriter(tmp_path, flush_s=0)
    w.write_header({"name": "full", "objectives": [{"metric": "output_tok_s", "direction": "maximize"}]})
    w.add("trials", {"number": 0, "state": "COMPLETE", "label": "TP1", "dp": 1, "tp": 1, "pp": 1, "ep": 1})
    w.flush()
    first = consolidate(tmp_path).read_bytes()
    real_copy = StudyWriter._copy_out

    def full(self, query, table, lo, hi):
        (tmp_path / f".partial-{table}.tmp").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(StudyWriter, "_copy_out", full)
    w.add("trials", {"number": 1, "state": "COMPLETE", "label": "TP2", "dp": 1, "tp": 2, "pp": 1, "ep": 1})
    with pytest.raises(UserError, match="No space left on device.*rows are kept"):
        w.flush()
    monkeypatch.setattr(StudyWriter, "_copy_out", real_copy)
    w.flush()                                   # space again: the kept rows are written
    assert {t["number"] for t in StudyReader(tmp_path).trials()} == {0, 1}

    def no_space(con, d):
        con.close()
        raise duckdb.IOException("No space left on device")
    monkeypatch.setattr(writer_mod, "_fill", no_space)
    with pytest.raises(UserError, match="cannot write .*study.duckdb.*segments hold every row"):
        consolidate(tmp_path)
    assert (tmp_path / "study.duckdb").read_bytes() == first
    assert not list(tmp_path.glob(".study.duckdb*"))
    with pytest.raises(UserError, match="cannot write .*study.json"):
        monkeypatch.setattr(type(tmp_path), "write_text", lambda *a, **k: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, "No space left on device")))
        w.write_header({"name": "full", "objectives": [{"metric": "output_tok_s"}]})
