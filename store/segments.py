"""Segment files: `segments/<table>/<lo>-<hi>.parquet`, written to a temporary name and renamed, so a reader on
any node sees whole files only. A compacted file covers the range lo..hi of the small ones it replaced."""

from __future__ import annotations

import os
import re
from pathlib import Path

_NAME = re.compile(r"^(\d{8})-(\d{8})\.parquet$")


def table_dir(study_dir: Path, table: str) -> Path:
    return study_dir / "segments" / table


def segment_path(study_dir: Path, table: str, lo: int, hi: int) -> Path:
    return table_dir(study_dir, table) / f"{lo:08d}-{hi:08d}.parquet"


def list_segments(study_dir: Path, table: str) -> list[tuple[int, int, Path]]:
    """The live files of a table: those not covered by a wider compacted file (a compaction in progress may leave
    both for a moment)."""
    d = table_dir(study_dir, table)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        m = _NAME.match(name)
        if m:
            found.append((int(m.group(1)), int(m.group(2)), d / name))
    found.sort(key=lambda s: (s[0], -s[1]))
    live, covered_to = [], -1
    for lo, hi, path in found:
        if hi <= covered_to:
            continue
        live.append((lo, hi, path))
        covered_to = max(covered_to, hi)
    return live


def next_seq(study_dir: Path, tables) -> int:
    return max((hi for t in tables for _, hi, _ in list_segments(study_dir, t)), default=0) + 1
