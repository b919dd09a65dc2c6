from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

HELP = """\
[b]reasoning-autotune dashboard[/b]

tab / shift+tab   move between panels
enter             open the selected trial (trials table or Pareto cursor)
left / right      move the Pareto cursor between trials
m                 Pareto latency metric: p99 TPOT, p99 TTFT, p99 E2E
s / r             trials table: next sort column / reverse, from anywhere (or click a header); it opens
                  sorted on the study's first objective, best first
g                 this node's GPUs from NVML
?                 this help        escape  back        q  quit

The dashboard follows the study's store (refreshed every second). A red "capacity trap" on a KV row means
that engine's KV cache filled and vLLM preempted requests: more concurrency there only costs recompute.
Yellow x points on the Pareto plot violate the study's SLOs; failed trials are listed in the table.
"""


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,q,question_mark", "app.pop_screen", "close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Static(HELP)
