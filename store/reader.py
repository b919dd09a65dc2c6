"""Read a study, live or finished, from any process or node: DuckDB in memory over the segment files, never a
lock on anything the writer holds."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from autotune.errors import UserError
from store import schema
from store.segments import list_segments

LATEST_TRIALS = ("SELECT * FROM trials QUALIFY row_number() OVER (PARTITION BY number ORDER BY seq DESC) = 1")


@dataclass(frozen=True)
class StudySnapshot:
    """An immutable picture of a study at one moment: what the TUI and the commands render."""

    header: dict
    trials: tuple[dict, ...]                    # latest state of each trial, with its backend metrics
    series: dict[int, tuple[dict, ...]]         # time series of the running (and most recent) trials
    gpus: tuple[dict, ...]                      # the latest sample of each node and GPU
    taken_at: float = field(default_factory=time.time)
    problems: tuple[str, ...] = ()              # what could not be read since the last snapshot (files skipped)

    def count(self, state: str) -> int:
        return sum(1 for t in self.trials if t["state"] == state)


class StudyReader:
    def __init__(self, study_dir: str | Path):
        self.dir = Path(study_dir)
        if not (self.dir / "study.json").is_file():
            raise UserError(f"{self.dir} is not a study directory (no study.json)")

    def header(self) -> dict:
        try:
            header = json.loads((self.dir / "study.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
            raise UserError(f"{self.dir}/study.json is unreadable: {exc}") from None
        objectives = header.get("objectives") if isinstance(header, dict) else None
        if not (isinstance(objectives, list) and objectives and all(isinstance(o, dict) and "metric" in o
                                                                    for o in objectives)):
            raise UserError(f"{self.dir}/study.json is not a study header (no name and objectives)")
        return header

    def _connect(self) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect()
        for table in schema.TABLES:
            files = [str(p) for _, _, p in list_segments(self.dir, table)]
            if files:
                source = f"read_parquet({schema.sql_list(files)}, union_by_name=true)"
                con.execute(f"CREATE VIEW {table} AS {schema.select_sql(table, source)}")
            else:
                con.execute(schema.create_sql(table))
        return con

    def query(self, sql: str, params: list | None = None) -> list[dict]:
        """Run SQL over the study's tables; retried when a compaction swaps files under the reader (the file
        list is taken again, and the new compacted file holds the same rows)."""
        attempts = 5
        for attempt in range(attempts):
            con = None
            try:
                con = self._connect()
                cur = con.execute(sql, params or [])
                names = [d[0] for d in cur.description]
                return [dict(zip(names, row)) for row in cur.fetchall()]
            except duckdb.IOException:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
            except duckdb.Error as exc:
                raise UserError(f"{self.dir}: the store cannot be read ({str(exc).splitlines()[0]})") from None
            finally:
                if con is not None:
                    con.close()
        return []

    def trials(self) -> list[dict]:
        metric_cols = ", ".join(f"m.{c}" for c in schema.METRIC_COLUMNS)
        pred_cols = ", ".join(f"p.{c} AS predicted_{c}" for c in schema.PREDICTED_COLUMNS)
        return self.query(f"""
            WITH latest AS ({LATEST_TRIALS})
            SELECT latest.*, {metric_cols}, {pred_cols}
            FROM latest
            LEFT JOIN trial_metrics m ON m.number = latest.number AND m.source = 'backend'
            LEFT JOIN trial_metrics p ON p.number = latest.number AND p.source = 'simulator'
            ORDER BY latest.number""")

    def series(self, numbers: list[int]) -> dict[int, tuple[dict, ...]]:
        if not numbers:
            return {}
        rows = self.query("SELECT * FROM trial_series WHERE number IN (SELECT unnest(?)) ORDER BY number, engine, t",
                          [numbers])
        out: dict[int, list[dict]] = {}
        for r in rows:
            out.setdefault(r["number"], []).append(r)
        return {k: tuple(v) for k, v in out.items()}

    def log_tail(self, number: int, lines: int = 40) -> list[str]:
        """The last lines of a trial's log (the store records where each log lives)."""
        rows = self.query(f"SELECT log_path FROM ({LATEST_TRIALS}) WHERE number = ?", [number])
        path = Path(rows[0]["log_path"]) if rows and rows[0]["log_path"] else None
        if path is None or not path.is_file():
            return []
        return path.read_text(errors="replace").splitlines()[-lines:]

    def metrics(self, number: int) -> dict[str, dict]:
        """The trial's metrics by source: 'backend' (measured) and, beside a real trial, 'simulator'."""
        return {r["source"]: r for r in self.query("SELECT * FROM trial_metrics WHERE number = ?", [number])}

    def latest_gpu_samples(self) -> list[dict]:
        return self.query("SELECT * FROM gpu_samples QUALIFY row_number() OVER (PARTITION BY node, gpu "
                          "ORDER BY wall DESC) = 1 ORDER BY node, gpu")

    def snapshot(self, series_of: list[int] | None = None) -> StudySnapshot:
        trials = self.trials()
        if series_of is None:
            running = [t["number"] for t in trials if t["state"] == "RUNNING"]
            finished = [t["number"] for t in trials if t["state"] != "RUNNING"]
            series_of = running or finished[-1:]
        return StudySnapshot(self.header(), tuple(trials), self.series(series_of), tuple(self.latest_gpu_samples()))
