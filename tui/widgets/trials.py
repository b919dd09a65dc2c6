from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from tui.view import KNOB_COLUMNS

# (title, key, width): fixed widths, so a refresh never re-measures the table.
COLUMNS = (("#", "number", 4), ("state", "state", 8), ("layout", "label", 16), *KNOB_COLUMNS,
           ("tok/s/GPU", "output_tok_s_per_gpu", 9), ("TPOT99 ms", "tpot_p99_s", 9), ("TTFT99 s", "ttft_p99_s", 9),
           ("preempt", "preemptions", 8), ("SLO", "feasible_slo", 3), ("reason", "reason", 28))


def _cell(key: str, t: dict) -> str:
    v = t.get(key)
    if v is None:
        return "-"
    if key == "output_tok_s_per_gpu":
        return f"{v:,.0f}"
    if key == "tpot_p99_s":
        return f"{v * 1e3:,.1f}"
    if key == "ttft_p99_s":
        return f"{v:,.1f}"
    if key == "feasible_slo":
        return "ok" if v else "no"
    if key == "preemptions":
        return f"{v:,}"
    return str(v)


class TrialsPanel(DataTable):
    """Every trial: state, layout, knobs, metrics, failure reason. Sorted by the study's first objective, best first,
    until `s` (from anywhere on the dashboard) cycles the column or `r` reverses it; the header shows an arrow."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.sort_key = "number"
        self.reverse = False
        self._chosen = False        # the user picked a sort: the study's objective no longer sets it
        self._signature = None
        self._trials: list[dict] = []

    def on_mount(self) -> None:
        for title, key, width in COLUMNS:
            self.add_column(title, key=key, width=max(width, len(title) + 2))    # room for the sort arrow
        self._label()

    def sort_by_objective(self, metric: str, direction: str) -> None:
        """Start on the study's objective when it is a column (best first), until the user sorts otherwise."""
        key = "output_tok_s_per_gpu" if metric in ("output_tok_s", "total_tok_s") else metric
        if self._chosen or key not in {k for _, k, _ in COLUMNS} or (key, direction == "maximize") == (
                self.sort_key, self.reverse):
            return
        self.sort_key, self.reverse = key, direction == "maximize"
        self._label()
        self._fill()

    def show(self, trials: list[dict]) -> None:
        signature = tuple((t["number"], t["state"], t["seq"]) for t in trials)
        if signature == self._signature:
            return
        self._signature = signature
        self._trials = trials
        self._fill()

    def _label(self) -> None:
        for title, key, _ in COLUMNS:
            arrow = (" ▼" if self.reverse else " ▲") if key == self.sort_key else ""
            self.columns[key].label = Text(title + arrow)
        self.refresh()

    def _fill(self) -> None:
        keep = self.cursor_row
        self.clear()
        have = [t for t in self._trials if t.get(self.sort_key) is not None]
        # Trials without the value (failed, still running) come last whichever way the column sorts.
        missing = [t for t in self._trials if t.get(self.sort_key) is None]
        for t in sorted(have, key=lambda t: t[self.sort_key], reverse=self.reverse) + missing:
            self.add_row(*(_cell(key, t) for _, key, _ in COLUMNS), key=str(t["number"]))
        if self.row_count:
            self.move_cursor(row=min(keep, self.row_count - 1))

    def cycle_sort(self) -> None:
        keys = [k for _, k, _ in COLUMNS]
        self.sort_key = keys[(keys.index(self.sort_key) + 1) % len(keys)]
        self._chosen = True
        self._label()
        self._fill()

    def reverse_sort(self) -> None:
        self.reverse = not self.reverse
        self._chosen = True
        self._label()
        self._fill()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        self.reverse = (not self.reverse) if self.sort_key == event.column_key.value else False
        self.sort_key = event.column_key.value
        self._chosen = True
        self._label()
        self._fill()
