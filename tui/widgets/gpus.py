from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from tui.widgets.render import bar

GIB = 1024**3
PER_GPU_ROWS = 8      # up to this many GPUs, a row each; beyond, a row per node with a cell per GPU


class GpuPanel(Static):
    """Memory used/total as bars, utilisation and power, per node and GPU."""

    def show(self, gpus: list[dict], note: str = "no GPU telemetry in this study yet") -> None:
        if not gpus:
            self.update(f"[dim]{note}[/dim]", layout=False)
            return
        t = Table.grid(padding=(0, 1))
        for _ in range(5):
            t.add_column(no_wrap=True)
        if len(gpus) <= PER_GPU_ROWS:
            for g in gpus:
                used, total = g["mem_used_bytes"] or 0.0, g["mem_total_bytes"] or 1.0
                t.add_row(f"{g['node']}/{g['gpu']}", bar(used / total, 16), f"{used / GIB:6.1f}/{total / GIB:.0f} GiB",
                          f"util {_pct(g['util'])}", _watts(g["power_w"]))
        else:
            nodes: dict[str, list[dict]] = {}
            for g in gpus:
                nodes.setdefault(g["node"], []).append(g)
            for node, row in nodes.items():
                used = sum(g["mem_used_bytes"] or 0.0 for g in row)
                total = sum(g["mem_total_bytes"] or 0.0 for g in row) or 1.0
                cells = Text()
                for g in row:
                    cells += bar((g["mem_used_bytes"] or 0.0) / (g["mem_total_bytes"] or 1.0), 1)
                utils = [g["util"] for g in row if g["util"] is not None]
                power = [g["power_w"] for g in row if g["power_w"] is not None]
                t.add_row(node, cells, f"{used / GIB:7.0f}/{total / GIB:.0f} GiB",
                          f"util {_pct(sum(utils) / len(utils) if utils else None)}",
                          _watts(sum(power) if power else None))
        self.update(t, layout=False)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def _watts(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f} W"
