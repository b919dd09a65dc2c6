from __future__ import annotations

import subprocess
from dataclasses import dataclass
import sys
import time
from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Input, Static

from autotune.errors import UserError
from store.queries import list_studies


@dataclass
class StartedStudy:
    """A study this dashboard launched: its runner process, where it writes, where its output goes."""

    proc: subprocess.Popen
    study_dir: Path
    output: Path

    @property
    def running(self) -> bool:
        return self.proc.poll() is None


def start_simulated_study(space: str, root: Path, pace: float = 100.0) -> StartedStudy:
    """Launch `autotune run SPACE --pace` in its own process (the TUI never imports Ray)."""
    study_dir = root / f"{Path(space).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    root.mkdir(parents=True, exist_ok=True)
    output = root / f"{study_dir.name}.out"
    with open(output, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "autotune.cli", "run", space, "--study-dir", str(study_dir),
                                 "--pace", str(pace)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return StartedStudy(proc, study_dir, output)


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
        started = start_simulated_study(space, self.root)
        self.app.started.append(started)
        self.notify(f"started {started.study_dir} (output in {started.output})")
        self.app.open_study(started.study_dir, wait=True)


class QuitWhileRunning(ModalScreen[str]):
    """Quitting while a study this dashboard started still runs: stop it, leave it running, or stay."""

    BINDINGS = [Binding("s", "dismiss('stop')", "stop it and quit"), Binding("l", "dismiss('leave')", "leave it, quit"),
                Binding("escape", "dismiss('stay')", "stay")]

    def __init__(self, started: list[StartedStudy]) -> None:
        super().__init__()
        self.started = started

    def compose(self) -> ComposeResult:
        lines = "\n".join(f"  {s.study_dir}  (pid {s.proc.pid}, output in {s.output})" for s in self.started)
        yield Static(f"[b]A study you started here is still running:[/b]\n{lines}\n\n"
                     "[b]s[/b] stop it and quit   [b]l[/b] leave it running and quit   [b]escape[/b] stay",
                     id="quit-prompt")
        yield Footer()
