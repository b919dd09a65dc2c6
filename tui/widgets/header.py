from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from tui.view import HeaderView, fmt_duration


class StudyHeader(Static):
    """Study, backend, trials done/running/failed, the best so far, elapsed time and ETA."""

    def show(self, v: HeaderView) -> None:
        status_style = {"running": "bold green", "finished": "bold cyan", "interrupted": "bold yellow"}
        t = Text()
        t.append(f" {v.name} ", style="bold reverse")
        t.append(f"  {v.model} on {v.cluster}  backend {v.backend}  ")
        t.append(v.status, style=status_style.get(v.status, "bold"))
        t.append(f"\n trials {v.done}/{v.budget} done, {v.running} running, ")
        t.append(f"{v.failed} failed", style="red" if v.failed else "")
        t.append(f"   best {v.best}   elapsed {fmt_duration(v.elapsed_s)}   ETA {fmt_duration(v.eta_s)}")
        self.update(t, layout=False)

    def cannot_read(self, error: str) -> None:
        """No snapshot yet and the study cannot be read: say so where the study's name would be."""
        self.update(Text.assemble((" cannot read the study ", "bold reverse red"), f"  {error}  (retrying)"),
                    layout=False)
