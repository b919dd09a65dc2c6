"""What a GPU-hour costs: the built-in table of public on-demand prices (catalog/prices.yaml, each with its source
and date), or a user's file in the same shape."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from autotune.errors import UserError
from autotune.spec.files import read_yaml
from autotune.spec.hardware import load_gpu

CATALOG = Path(__file__).parent / "catalog" / "prices.yaml"


@dataclass(frozen=True)
class Price:
    usd_per_gpu_hour: float
    source: str = ""
    date: str = ""


def _parse(data: object, where: str) -> dict[str, Price]:
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of GPU name to a price (usd_per_gpu_hour, source, date)")
    prices = {}
    for name, entry in data.items():
        gpu = load_gpu(str(name)).name
        if isinstance(entry, (int, float)) and not isinstance(entry, bool):
            entry = {"usd_per_gpu_hour": entry}
        if not isinstance(entry, dict) or set(entry) - {"usd_per_gpu_hour", "source", "date"} \
                or "usd_per_gpu_hour" not in entry:
            raise UserError(f"{where}: {name}: expected a number or {{usd_per_gpu_hour, source, date}}")
        try:
            usd = float(entry["usd_per_gpu_hour"])
        except (TypeError, ValueError):
            usd = -1.0
        if not 0 < usd < float("inf"):
            raise UserError(f"{where}: {name}: usd_per_gpu_hour must be a positive number")
        prices[gpu] = Price(usd, str(entry.get("source", "")), str(entry.get("date", "")))
    return prices


BUILTIN: dict[str, Price] = _parse(yaml.safe_load(CATALOG.read_text()), str(CATALOG))


def load_prices(path: str | Path | None = None) -> dict[str, Price]:
    """The built-in prices, with a file's entries in their place."""
    if path is None:
        return dict(BUILTIN)
    p = Path(path)
    return {**BUILTIN, **_parse(read_yaml(p, "prices file"), str(p))}
