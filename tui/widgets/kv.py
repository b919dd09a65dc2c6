from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from tui.view import KvRow
from tui.widgets.render import bar, sparkline


class KvPanel(Static):
    """KV-cache use per running trial and DP engine: gauge, sparkline, running/waiting, preemptions."""

    def show(self, rows: list[KvRow], running: list[int] | None = None) -> None:
        if not rows:
            # A trial counted as running in the header has not sent its first KV sample yet (its server starts).
            text = (f"trial {', '.join(f'#{n}' for n in running)} running: no KV samples yet (the server is starting)"
                    if running else "no trial running")
            self.update(f"[dim]{text}[/dim]", layout=False)
            return
        t = Table.grid(padding=(0, 1))
        for _ in range(6):
            t.add_column(no_wrap=True)
        for r in rows[:24]:
            flag = Text(f"capacity trap: {r.preemptions:,}", style="bold red") if r.trapped else Text("")
            t.add_row(f"#{r.number} {r.label} e{r.engine}", bar(r.kv_now, 10),
                      Text(sparkline(r.kv_history, 14), style="cyan"), f"{r.kv_now:4.0%}",
                      f"r{r.running} w{r.waiting}", flag)
        if len(rows) > 24:
            t.add_row(f"... {len(rows) - 24} more engines", "", "", "", "", "")
        self.update(t, layout=False)
