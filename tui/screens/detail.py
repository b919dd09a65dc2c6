from __future__ import annotations

from rich.markup import escape
from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual_plotext import PlotextPlot

from store.schema import commands_of
from tui.view import KNOB_COLUMNS

PREDICTED_VS_MEASURED = (("output tok/s", "output_tok_s", 1, ",.0f"), ("TPOT p50 ms", "tpot_p50_s", 1e3, ",.1f"),
                         ("TPOT p99 ms", "tpot_p99_s", 1e3, ",.1f"), ("TTFT p99 s", "ttft_p99_s", 1, ",.1f"),
                         ("E2E p99 s", "e2e_p99_s", 1, ",.1f"), ("preemptions", "preemptions", 1, ",.0f"),
                         ("KV peak %", "kv_peak_frac", 100, ".0f"), ("failed requests", "failed_requests", 1, ",.0f"),
                         ("finish reasons", "finish_reasons", None, ""), ("bound by", "bottleneck", None, ""))


class TrialDetail(Screen):
    """One trial: KV and queue time series, predicted against measured, the vllm serve command, its log."""

    BINDINGS = [Binding("escape,q", "app.pop_screen", "back")]

    def __init__(self, trial: dict, series: tuple[dict, ...], metrics: dict[str, dict], log: list[str]) -> None:
        super().__init__()
        self.trial, self.series, self.metrics, self.log_lines = trial, series, metrics, log

    def compose(self) -> ComposeResult:
        t = self.trial
        knobs = "  ".join(f"{title} {t[key]}" for title, key, _ in KNOB_COLUMNS)
        title = (f"trial #{t['number']}  {t['label']}  {knobs}  [{t['state']}]"
                 + (f"  {t['reason']}" if t["reason"] else ""))
        yield Static(title, id="detail-title")
        with Horizontal(id="detail-plots"):
            yield PlotextPlot(id="kv-plot")
            yield PlotextPlot(id="queue-plot")
        with VerticalScroll(id="detail-text"):
            yield Static(self._metrics_table(), id="detail-metrics")
            commands = commands_of(t.get("serve_command"))
            yield Static("[b]deploy[/b] " + ("\n       ".join(escape(c) for c in commands) or "-"), id="detail-command")
            yield Static("log:\n" + ("\n".join(self.log_lines) or "(empty)"), id="detail-log", markup=False)
        yield Footer()

    def _metrics_table(self) -> Table:
        measured = self.metrics.get("backend", {})
        predicted = self.metrics.get("simulator", {})
        # A simulated trial is its own prediction: one column, no empty "predicted" beside it.
        sources = (measured, predicted) if predicted else (measured,)
        table = Table(title="predicted against measured" if predicted else "metrics", show_edge=False)
        table.add_column("metric")
        table.add_column("measured (backend)" if predicted else "value", justify="right")
        if predicted:
            table.add_column("predicted (simulator)", justify="right")
        for label, key, scale, fmt in PREDICTED_VS_MEASURED:
            cells = []
            for src in sources:
                v = src.get(key)
                cells.append("-" if v is None else str(v) if scale is None else format(v * scale, fmt))
            lo, hi = predicted.get(f"{key}_lo"), predicted.get(f"{key}_hi")
            if predicted and lo is not None and hi is not None:
                cells[1] += f" ({format(lo * scale, fmt)}-{format(hi * scale, fmt)})"
            table.add_row(label, *cells)
        if predicted.get("near_validated") is False:
            table.caption = "* the simulator extrapolates here (no validated runs like it): a wider range"
            table.title = "predicted against measured *"
        elif any(predicted.get(f"{k}_lo") is not None for _, k, _, _ in PREDICTED_VS_MEASURED):
            table.caption = "predicted (range): the simulator's 90% interval from its validation residuals"
        return table

    def on_mount(self) -> None:
        engines = sorted({s["engine"] for s in self.series})
        kv, queue = self.query_one("#kv-plot", PlotextPlot).plt, self.query_one("#queue-plot", PlotextPlot).plt
        kv.title("KV cache use per DP engine")
        kv.xlabel("s")
        kv.ylim(0, 1)
        queue.title("running (solid) / waiting per engine")
        queue.xlabel("s")
        for e in engines[:8]:
            pts = [s for s in self.series if s["engine"] == e]
            t = [s["t"] for s in pts]
            kv.plot(t, [s["kv_frac"] or 0 for s in pts], label=f"e{e}")
            queue.plot(t, [s["running"] or 0 for s in pts], label=f"run e{e}")
            queue.plot(t, [s["waiting"] or 0 for s in pts], marker="dot")
        if not engines:
            kv.title("no time series recorded")
