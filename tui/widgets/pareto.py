from __future__ import annotations

from textual.binding import Binding
from textual.message import Message
from textual_plotext import PlotextPlot

from tui.view import LATENCY_CHOICES, LATENCY_LABELS, ParetoPoint


class ParetoPanel(PlotextPlot):
    """Throughput per GPU against a latency metric; the front in green, SLO violators in yellow, a cursor."""

    BINDINGS = [Binding("left", "move(-1)", "prev point"), Binding("right", "move(1)", "next point"),
                Binding("m", "cycle_metric", "latency metric"), Binding("enter", "open", "open trial")]
    can_focus = True

    class Selected(Message):
        def __init__(self, number: int) -> None:
            super().__init__()
            self.number = number

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.metric = LATENCY_CHOICES[0]
        self.points: list[ParetoPoint] = []
        self.cursor = 0
        self.failed = 0

    def show(self, points: list[ParetoPoint], failed: int) -> None:
        if points == self.points and failed == self.failed:
            return      # trials finish far less often than the dashboard refreshes
        self.points = points
        self.failed = failed
        self.cursor = min(self.cursor, max(len(points) - 1, 0))
        self.replot()

    @property
    def selected(self) -> ParetoPoint | None:
        return self.points[self.cursor] if self.points else None

    def replot(self) -> None:
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(f"Pareto: tok/s per GPU vs {LATENCY_LABELS[self.metric]}   {self.failed} failed (not plotted)")
        plt.xlabel(LATENCY_LABELS[self.metric])
        plt.ylabel("tok/s/GPU")
        # Three shapes as well as three colours: the front stands out on a monochrome terminal too.
        groups = (("front", lambda p: p.on_front and p.meets_slo, "green", "◆"),
                  ("SLO violated", lambda p: not p.meets_slo, "yellow", "x"),
                  ("dominated", lambda p: not p.on_front and p.meets_slo, "blue", "·"))
        for name, keep, color, marker in groups:
            pts = [p for p in self.points if keep(p)]
            if pts:
                plt.scatter([p.latency for p in pts], [p.throughput for p in pts], color=color, marker=marker,
                            label=name)
        front = sorted((p for p in self.points if p.on_front), key=lambda p: p.latency)
        if len(front) > 1:
            plt.plot([p.latency for p in front], [p.throughput for p in front], color="green")
        sel = self.selected
        if sel:
            plt.scatter([sel.latency], [sel.throughput], color="red", marker="O", label=f"#{sel.number} {sel.label}")
        self.refresh()

    def action_move(self, step: int) -> None:
        if self.points:
            self.cursor = (self.cursor + step) % len(self.points)
            self.replot()

    def action_cycle_metric(self) -> None:
        self.metric = LATENCY_CHOICES[(LATENCY_CHOICES.index(self.metric) + 1) % len(LATENCY_CHOICES)]
        self.points = []
        self.app.refresh_views()

    def action_open(self) -> None:
        if self.selected:
            self.post_message(self.Selected(self.selected.number))
