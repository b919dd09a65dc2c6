"""The one writer of a study: buffers rows and flushes them as Parquet segments (at most every `flush_s`), so a
reader in another process or on another node follows with about that lag, and a crash loses at most that much."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import duckdb

from autotune.errors import UserError
from autotune.spec.layout import EngineKnobs
from autotune.spec.trial import TrialSpec
from store import schema
from store.segments import list_segments, next_seq, segment_path, table_dir

COMPACT_AFTER = 32   # small segments per table before they are merged into one


class StudyWriter:
    def __init__(self, study_dir: str | Path, flush_s: float = 1.0):
        self.dir = Path(study_dir)
        self.flush_s = flush_s
        self._buffers: dict[str, list[tuple]] = {t: [] for t in schema.TABLES}
        self._lock = threading.Lock()
        self._con = duckdb.connect()      # in memory: the writer never holds a file lock a reader would hit
        for t in schema.TABLES:
            self._con.execute(schema.create_sql(t))
            table_dir(self.dir, t).mkdir(parents=True, exist_ok=True)
        self._seq = next_seq(self.dir, schema.TABLES)
        self._event_seq = time.time_ns()
        self._last_flush = 0.0

    # ---- header -----------------------------------------------------------------------
    def write_header(self, header: dict) -> None:
        """study.json: what the study is (the space, the backend) and its status, replaced whole or not at all."""
        doc = {"schema_version": schema.SCHEMA_VERSION, "host": socket.gethostname(), "pid": os.getpid(), **header}
        tmp = self.dir / f".study.json.{os.getpid()}"
        try:
            tmp.write_text(json.dumps(doc, indent=2))
            os.replace(tmp, self.dir / "study.json")
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot write {self.dir / 'study.json'} ({exc.strerror or exc}); the previous one is "
                            "kept") from None

    def update_header(self, **changes) -> None:
        doc = json.loads((self.dir / "study.json").read_text())
        doc.update(changes)
        self.write_header({k: v for k, v in doc.items() if k not in ("schema_version", "host", "pid")})

    # ---- rows -----------------------------------------------------------------------------
    def add(self, table: str, row: dict) -> None:
        cols = schema.columns(table)
        if table == "trials":
            self._event_seq += 1
            row = {**row, "seq": self._event_seq, "updated_at": time.time()}
        with self._lock:
            self._buffers[table].append(tuple(row.get(c) for c in cols))

    def add_many(self, table: str, rows: list[dict]) -> None:
        cols = schema.columns(table)
        with self._lock:
            self._buffers[table].extend(tuple(r.get(c) for c in cols) for r in rows)

    # ---- a study's records, as rows ---------------------------------------------------------
    def record_trial(self, spec: TrialSpec, state: str, **extra) -> None:
        """A trial's latest state: its layout, its knobs, and the `extra` columns (times, reason, commands)."""
        k, layout = spec.knobs, spec.layout
        self.add("trials", {"number": spec.number, "state": state, "dp": layout.dp, "tp": layout.tp, "pp": layout.pp,
                            "ep": layout.ep, "label": layout.label(),
                            **{name: getattr(k, name) for name in EngineKnobs.tunable()}, "gpus": spec.gpus,
                            "origin": spec.origin, **extra})

    def record_stale(self, trial: dict) -> None:
        """A trial the store holds as RUNNING from a runner that is gone."""
        self.add("trials", {**{k: trial[k] for k in schema.columns("trials")}, "state": "FAIL",
                            "finished_at": time.time(), "reason": "stale: the runner stopped while the trial ran"})

    def record_metrics(self, number: int, source: str, metrics: dict) -> None:
        """A trial's figures from `source` (the backend's measurement, or the simulator's prediction of it)."""
        intervals = metrics.get("intervals") or {}
        bounds = {f"{k}_{end}": intervals[k][i] for k in schema.INTERVAL_KEYS if k in intervals
                  for i, end in enumerate(("lo", "hi"))}
        reasons = metrics.get("finish_reasons")
        extra = {**bounds, "finish_reasons": json.dumps({str(k): v for k, v in reasons.items()}, sort_keys=True)
                 if reasons else None}
        self.add("trial_metrics", {"number": number, "source": source,
                                   **{c: extra.get(c, metrics.get(c)) for c in schema.METRIC_COLUMNS}})

    def maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as new segments. When a write fails (a full disk, a read-only directory) the rows
        not yet written go back into the buffer, every segment written before stays, and the error is one line."""
        with self._lock:
            pending = {t: rows for t, rows in self._buffers.items() if rows}
            self._buffers = {t: [] for t in schema.TABLES}
        tables = list(pending)
        for i, table in enumerate(tables):
            try:
                self._write_segment(table, pending[table])
            except (duckdb.Error, OSError) as exc:
                with self._lock:
                    for t in tables[i:]:
                        self._buffers[t][:0] = pending[t]
                raise UserError(f"cannot write the study's segments in {self.dir} ({_first_line(exc)}); the rows "
                                "are kept to retry and every segment written before is intact") from None
            if len(list_segments(self.dir, table)) > COMPACT_AFTER:
                try:
                    self._compact(table)
                except (duckdb.Error, OSError):
                    pass    # the small segments still hold every row; the next flush tries again
        self._last_flush = time.monotonic()

    def _write_segment(self, table: str, rows: list[tuple]) -> None:
        con = self._con
        marks = ", ".join("?" * len(rows[0]))
        con.execute(f"DELETE FROM {table}")
        con.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)
        self._copy_out(f"SELECT * FROM {table}", table, self._seq, self._seq)
        self._seq += 1

    def _copy_out(self, query: str, table: str, lo: int, hi: int) -> None:
        final = segment_path(self.dir, table, lo, hi)
        tmp = final.with_name(f".{final.name}.tmp")
        try:
            self._con.execute(f"COPY ({query}) TO {schema.sql_string(tmp)} (FORMAT parquet)")
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)     # a half-written file never becomes a segment

    def _compact(self, table: str) -> None:
        segs = list_segments(self.dir, table)
        files = schema.sql_list(p for _, _, p in segs)
        self._copy_out(f"SELECT * FROM read_parquet({files}, union_by_name=true)", table, segs[0][0], segs[-1][1])
        for _, _, path in segs:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._con.close()


def consolidate(study_dir: str | Path) -> Path:
    """Write every segment into `study.duckdb` (replaced atomically), for plain SQL on a finished study."""
    d = Path(study_dir)
    final = d / "study.duckdb"
    tmp = d / f".study.duckdb.{os.getpid()}.tmp"
    wal = tmp.with_name(tmp.name + ".wal")
    try:
        tmp.unlink(missing_ok=True)
        _fill(duckdb.connect(str(tmp)), d)
        os.replace(tmp, final)
    except (duckdb.Error, OSError) as exc:
        raise UserError(f"cannot write {final} ({_first_line(exc)}); the segments hold every row and the previous "
                        "file, if any, is kept") from None
    finally:
        tmp.unlink(missing_ok=True)
        wal.unlink(missing_ok=True)
    return final


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _fill(con: duckdb.DuckDBPyConnection, d: Path) -> None:
    """Every table from its segments, the latest-trials view and the header, checkpointed into the file."""
    try:
        for table in schema.TABLES:
            files = [str(p) for _, _, p in list_segments(d, table)]
            con.execute(schema.create_sql(table))
            if files:
                con.execute(f"INSERT INTO {table} {schema.select_sql(table, 'read_parquet(?, union_by_name=true)')}",
                            [files])
        con.execute("CREATE VIEW trials_latest AS SELECT * FROM trials QUALIFY "
                    "row_number() OVER (PARTITION BY number ORDER BY seq DESC) = 1")
        con.execute("CREATE TABLE meta AS SELECT ? AS schema_version, ? AS study_json",
                    [schema.SCHEMA_VERSION, (d / "study.json").read_text()])
        con.execute("CHECKPOINT")     # all in the file, nothing left in a WAL beside it
    finally:
        con.close()
