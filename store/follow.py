"""Follow a live study cheaply: segment files never change once written, so each refresh reads only the files
it has not read yet and merges them into its state. Every merge is idempotent (latest by seq, keyed rows), so
reading a compacted file whose rows were already seen changes nothing."""

from __future__ import annotations

import time
from pathlib import Path

import duckdb

from store import schema
from store.reader import StudyReader, StudySnapshot
from store.segments import list_segments

SERIES_KEEP = 600     # samples kept per trial and engine for the live panels (the detail screen reads them all)


class StudyFollower:
    def __init__(self, study_dir: str | Path):
        self.reader = StudyReader(study_dir)      # raises for a directory that is not a study
        self.dir = self.reader.dir
        self._read: set[str] = set()
        self._con = duckdb.connect()
        self.trials: dict[int, dict] = {}
        self.metrics: dict[tuple[int, str], dict] = {}
        self.series: dict[tuple[int, int], dict[float, dict]] = {}
        self.gpus: dict[tuple[str, int], dict] = {}
        self.problems: list[str] = []       # files skipped, each told once

    def _new_rows(self, table: str, keep: str = "") -> list[dict]:
        """Rows of the files not read yet; `keep` is a QUALIFY clause that leaves the rest in the file."""
        rows = []
        cols = schema.columns(table)
        for _, _, path in list_segments(self.dir, table):
            key = str(path)
            if key in self._read:
                continue
            try:
                cur = self._con.execute(f"{schema.select_sql(table, 'read_parquet(?)')} {keep}", [key])
                got = cur.fetchall()
            except duckdb.IOException:
                if Path(key).exists():
                    self._unreadable(key, "cannot be read")
                continue      # compacted away between listing and reading: its rows are in the new file
            except duckdb.Error as exc:
                # A truncated or foreign file (the writer never leaves one: it renames whole files): skip it, say so
                # once, and keep following the rest.
                self._unreadable(key, str(exc).splitlines()[0][:120])
                continue
            rows += [dict(zip(cols, r)) for r in got]
            self._read.add(key)
        return rows

    def _unreadable(self, key: str, why: str) -> None:
        self._read.add(key)
        self.problems.append(f"skipped {Path(key).relative_to(self.dir)}: {why}")

    def refresh(self) -> StudySnapshot:
        for row in self._new_rows("trials"):
            old = self.trials.get(row["number"])
            if old is None or row["seq"] > old["seq"]:
                self.trials[row["number"]] = row
        for row in self._new_rows("trial_metrics"):
            self.metrics[(row["number"], row["source"])] = row
        for row in self._new_rows("trial_series", "QUALIFY row_number() OVER (PARTITION BY number, engine "
                                                  f"ORDER BY t DESC) <= {SERIES_KEEP}"):
            per = self.series.setdefault((row["number"], row["engine"]), {})
            per[row["t"]] = row
            if len(per) > 2 * SERIES_KEEP:
                for t in sorted(per)[:-SERIES_KEEP]:
                    del per[t]
        for row in self._new_rows("gpu_samples", "QUALIFY row_number() OVER (PARTITION BY node, gpu "
                                                 "ORDER BY wall DESC) = 1"):
            key = (row["node"], row["gpu"])
            if key not in self.gpus or row["wall"] >= self.gpus[key]["wall"]:
                self.gpus[key] = row
        return self._snapshot()

    def _snapshot(self) -> StudySnapshot:
        trials = []
        for number in sorted(self.trials):
            t = dict(self.trials[number])
            measured = self.metrics.get((number, "backend"), {})
            predicted = self.metrics.get((number, "simulator"), {})
            for c in schema.METRIC_COLUMNS:
                t[c] = measured.get(c)
            for c in schema.PREDICTED_COLUMNS:
                t[f"predicted_{c}"] = predicted.get(c)
            trials.append(t)
        running = [t["number"] for t in trials if t["state"] == "RUNNING"]
        finished = [t["number"] for t in trials if t["state"] != "RUNNING"]
        shown = set(running or finished[-1:])
        series: dict[int, list[dict]] = {}
        for (number, engine), per in sorted(self.series.items()):
            if number in shown:
                series.setdefault(number, []).extend(per[t] for t in sorted(per)[-SERIES_KEEP:])
        problems, self.problems = tuple(self.problems), []
        return StudySnapshot(self.reader.header(), tuple(trials), {k: tuple(v) for k, v in series.items()},
                             tuple(self.gpus[k] for k in sorted(self.gpus)), time.time(), problems)

    def close(self) -> None:
        self._con.close()
