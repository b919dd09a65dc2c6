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
        """study.json: what the study is (the space, the backend) and its status."""
        doc = {"schema_version": schema.SCHEMA_VERSION, "host": socket.gethostname(), "pid": os.getpid(), **header}
        tmp = self.dir / f".study.json.{os.getpid()}"
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, self.dir / "study.json")

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

    def maybe_flush(self) -> None:
        if time.monotonic() - self._last_flush >= self.flush_s:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending = {t: rows for t, rows in self._buffers.items() if rows}
            self._buffers = {t: [] for t in schema.TABLES}
        for table, rows in pending.items():
            self._write_segment(table, rows)
            if len(list_segments(self.dir, table)) > COMPACT_AFTER:
                self._compact(table)
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
        self._con.execute(f"COPY ({query}) TO {schema.sql_string(tmp)} (FORMAT parquet)")
        os.replace(tmp, final)

    def _compact(self, table: str) -> None:
        segs = list_segments(self.dir, table)
        files = schema.sql_list(p for _, _, p in segs)
        self._copy_out(f"SELECT * FROM read_parquet({files}, union_by_name=true)", table, segs[0][0], segs[-1][1])
        for _, _, path in segs:
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self.flush()
        self._con.close()


def consolidate(study_dir: str | Path) -> Path:
    """Write every segment into `study.duckdb` (replaced atomically), for plain SQL on a finished study."""
    d = Path(study_dir)
    final = d / "study.duckdb"
    tmp = d / f".study.duckdb.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp))
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
    finally:
        con.close()
    os.replace(tmp, final)
    return final
