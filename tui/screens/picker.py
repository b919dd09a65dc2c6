from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, Static

from autotune.errors import UserError
from store.queries import list_studies


def start_simulated_study(space: str, root: Path, pace: float = 100.0) -> Path:
    """Launch `autotune run SPACE --pace` in its own process (the TUI never imports Ray) and return its dir."""
    study_dir = root / f"{Path(space).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / f"{study_dir.name}.out", "w")
    subprocess.Popen([sys.executable, "-m", "autotune.cli", "run", space, "--study-dir", str(study_dir),
                      "--pace", str(pace)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return study_dir


class StudyPicker(Screen):
    """The studies under the default folder, and a space file to start a simulated study from."""

    BINDINGS = [Binding("q", "app.quit", "quit")]

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def compose(self) -> ComposeResult:
        yield Static(f"[b]studies under {self.root}[/b]  (enter opens one)")
        yield DataTable(id="studies", cursor_type="row")
        yield Static("start a simulated study from a space file (e.g. search_spaces/dense.yaml):")
        yield Input(placeholder="search_spaces/dense.yaml", id="space")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        # Several studies often share a space's name: the directory, what ran and when tell them apart.
        table.add_columns("directory", "study", "status", "model", "GPUs", "trials", "started", "backend")
        for d, reader in list_studies(self.root):
            try:
                h = reader.header()
                trials = reader.trials()
            except UserError as exc:
                table.add_row(d.name, "-", f"unreadable: {exc}"[:60], "-", "-", "-", "-", "-", key=str(d))
                continue
            done = sum(t["state"] in ("COMPLETE", "FAIL") for t in trials)
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(h["started_at"])) if h.get("started_at") else "-"
            table.add_row(d.name, h.get("name", "?"), h.get("status", "?"), h.get("model", "?"), h.get("cluster", "?"),
                          f"{done}/{h.get('budget_trials', '?')}", started, h.get("backend", "?"), key=str(d))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.app.open_study(Path(event.row_key.value))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        space = event.value.strip() or "search_spaces/dense.yaml"
        if not Path(space).is_file():
            self.notify(f"no space file {space}", severity="error")
            return
        self.app.open_study(start_simulated_study(space, self.root), wait=True)
