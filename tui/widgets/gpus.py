from __future__ import annotations

from rich.table import Table
from textual.widgets import Static

from tui.widgets.render import bar

GIB = 1024**3


class GpuPanel(Static):
    """Memory used/total as bars, utilisation and power, per node and GPU."""

    def show(self, gpus: list[dict], note: str = "no GPU telemetry in this study yet") -> None:
        if not gpus:
            self.update(f"[dim]{note}[/dim]")
            return
        t = Table.grid(padding=(0, 1))
        for _ in range(5):
            t.add_column()
        for g in gpus:
            used, total = g["mem_used_bytes"] or 0.0, g["mem_total_bytes"] or 1.0
            util = "-" if g["util"] is None else f"{g['util']:.0%}"
            power = "-" if g["power_w"] is None else f"{g['power_w']:.0f} W"
            t.add_row(f"{g['node']}/{g['gpu']}", bar(used / total, 16),
                      f"{used / GIB:6.1f}/{total / GIB:.0f} GiB", f"util {util}", power)
        self.update(t)
