"""Questions asked of a finished or running study: the best trial, the Pareto front, an export."""

from __future__ import annotations

from pathlib import Path

from autotune.errors import UserError
from autotune.spec import objectives
from autotune.spec.metrics import LATENCY_METRICS
from autotune.spec.objectives import DEFAULT_LATENCY
import duckdb

from store import schema
from store.reader import StudyReader
from store.writer import consolidate


def completed(reader: StudyReader) -> list[dict]:
    return [t for t in reader.trials() if t["state"] == "COMPLETE" and t["output_tok_s"] is not None]


def best(reader: StudyReader) -> dict | None:
    """The study's best completed trial by its objectives (spec/objectives.best): among those meeting the SLOs,
    or the best violator when none does (its feasible_slo says so)."""
    return objectives.best(completed(reader), objectives.objectives_of(reader.header()), dict.get, lambda t: bool(t["feasible_slo"]))


def pareto(reader: StudyReader, latency: str = DEFAULT_LATENCY) -> list[dict]:
    """Completed trials no other beats on both throughput per GPU and `latency` (spec/objectives.pareto_front)."""
    if latency not in LATENCY_METRICS:
        raise UserError(f"unknown latency metric '{latency}' ({', '.join(LATENCY_METRICS)})")
    return objectives.pareto_front(completed(reader), latency, dict.get)


def export(reader: StudyReader, fmt: str, out: Path) -> list[Path]:
    """Every table (trials as their latest state) as parquet, csv or json files in `out`; also refreshes
    the study's DuckDB file."""
    if fmt not in ("parquet", "csv", "json"):
        raise UserError(f"unknown export format '{fmt}' (parquet, csv, json)")
    reader.header()     # a directory without a study header is not exported
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write the export to {out} ({exc.strerror})") from None
    consolidate(reader.dir)
    written = []
    con = duckdb.connect(str(reader.dir / "study.duckdb"), read_only=True)
    try:
        for table in schema.TABLES:
            source = "trials_latest" if table == "trials" else table
            path = out / f"{table}.{fmt}"
            option = {"parquet": "FORMAT parquet", "csv": "FORMAT csv, HEADER", "json": "FORMAT json, ARRAY true"}[fmt]
            con.execute(f"COPY (SELECT * FROM {source}) TO {schema.sql_string(path)} ({option})")
            written.append(path)
    finally:
        con.close()
    return written


def list_studies(root: Path) -> list[tuple[Path, StudyReader]]:
    """The study directories directly under `root`, each with its reader."""
    if not root.is_dir():
        return []
    return [(d, StudyReader(d)) for d in sorted(root.iterdir()) if (d / "study.json").is_file()]
