"""The versioned schema of a study: one table per record kind, in DuckDB types."""

from __future__ import annotations

import json

from autotune.spec.layout import knob_fields, knob_kind
from autotune.spec.metrics import COST_KEYS, LATENCY_KEYS

SCHEMA_VERSION = 1
SQL_TYPES = {int: "INTEGER", float: "DOUBLE", str: "VARCHAR", bool: "BOOLEAN"}

# Trials are event-sourced: a row per state change; the latest row (by seq) is the trial's current state.
# The predicted figures stored with their interval (key_lo, key_hi: autotune/sim/uncertainty.py), for the TUI.
INTERVAL_KEYS = ("output_tok_s", "tpot_p50_s", "tpot_p99_s", "ttft_p99_s", "e2e_p99_s")

TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "trials": (
        ("number", "INTEGER"), ("seq", "BIGINT"), ("state", "VARCHAR"), ("updated_at", "DOUBLE"),
        ("started_at", "DOUBLE"), ("finished_at", "DOUBLE"), ("dp", "INTEGER"), ("tp", "INTEGER"),
        ("pp", "INTEGER"), ("ep", "INTEGER"), ("label", "VARCHAR"),
        *((f.name, SQL_TYPES[knob_kind(f)]) for f in knob_fields(tunable_only=True)),
        ("gpus", "INTEGER"), ("origin", "VARCHAR"), ("reason", "VARCHAR"),
        ("values_json", "VARCHAR"), ("feasible_slo", "BOOLEAN"), ("node", "VARCHAR"), ("log_path", "VARCHAR"),
        ("serve_command", "VARCHAR"),
    ),
    "trial_metrics": (
        ("number", "INTEGER"), ("source", "VARCHAR"), ("makespan_s", "DOUBLE"), ("output_tok_s", "DOUBLE"),
        ("output_tok_s_per_gpu", "DOUBLE"), ("total_tok_s", "DOUBLE"),
        *((key, "DOUBLE") for key in LATENCY_KEYS), ("preemptions", "BIGINT"),
        ("kv_capacity_tokens", "BIGINT"), ("kv_peak_frac", "DOUBLE"), ("kv_mean_frac", "DOUBLE"),
        ("bottleneck", "VARCHAR"), ("roofline_frac", "DOUBLE"), ("num_requests", "INTEGER"),
        ("offered_rate", "DOUBLE"), ("overloaded", "BOOLEAN"), ("sustainable_rate", "DOUBLE"),
        *((key, "DOUBLE") for key in COST_KEYS), ("failed_requests", "INTEGER"), ("finish_reasons", "VARCHAR"),
        *((f"{key}_{end}", "DOUBLE") for key in INTERVAL_KEYS for end in ("lo", "hi")), ("near_validated", "BOOLEAN"),
    ),
    "trial_series": (
        ("number", "INTEGER"), ("engine", "INTEGER"), ("t", "DOUBLE"), ("wall", "DOUBLE"), ("kv_frac", "DOUBLE"),
        ("running", "INTEGER"), ("waiting", "INTEGER"), ("preemptions", "BIGINT"), ("tok_s", "DOUBLE"),
        ("waiting_by_reason", "VARCHAR"),
    ),
    "gpu_samples": (
        ("number", "INTEGER"), ("node", "VARCHAR"), ("gpu", "INTEGER"), ("wall", "DOUBLE"),
        ("mem_used_bytes", "DOUBLE"), ("mem_total_bytes", "DOUBLE"), ("util", "DOUBLE"), ("power_w", "DOUBLE"),
    ),
}

METRIC_COLUMNS = tuple(name for name, _ in TABLES["trial_metrics"][2:])
# The simulator's prediction shown beside a measured trial, as predicted_<metric> on the trial row.
PREDICTED_COLUMNS = ("output_tok_s", "tpot_p99_s", "ttft_p99_s", "e2e_p99_s", "preemptions", "kv_peak_frac")


def commands_text(commands) -> str | None:
    """A trial's deploy commands (one per node) as the serve_command column holds them: a JSON list."""
    return json.dumps(list(commands)) if commands else None


def commands_of(text: str | None) -> list[str]:
    """The deploy commands back from the column (a study written before lists held one plain command)."""
    if not text:
        return []
    try:
        commands = json.loads(text)
    except ValueError:
        return [text]
    return [str(c) for c in commands] if isinstance(commands, list) else [text]


def sql_string(value) -> str:
    """A path or name as a DuckDB string literal (quotes doubled), where SQL cannot take a parameter (COPY ... TO,
    a view's file list): no value ever becomes SQL text."""
    return "'" + str(value).replace("'", "''") + "'"


def sql_list(values) -> str:
    return "[" + ", ".join(sql_string(v) for v in values) + "]"


def columns(table: str) -> list[str]:
    return [name for name, _ in TABLES[table]]


def select_sql(table: str, source: str) -> str:
    """The table's columns, in schema order, from Parquet `source`; a column a segment written by an older
    version lacks comes back NULL, so adding columns keeps every study readable."""
    typed = ", ".join(f"NULL::{t} AS {c}" for c, t in TABLES[table])
    return (f"SELECT {', '.join(columns(table))} FROM (SELECT {typed} WHERE false "
            f"UNION ALL BY NAME SELECT * FROM {source})")


def create_sql(table: str, name: str | None = None) -> str:
    cols = ", ".join(f"{c} {t}" for c, t in TABLES[table])
    return f"CREATE TABLE {name or table} ({cols})"
