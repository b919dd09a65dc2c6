"""`autotune tui`: follow a study (live or finished) from any node that sees its directory."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer
from textual.worker import get_current_worker

from autotune.errors import UserError
from store.follow import StudyFollower
from store.reader import StudyReader, StudySnapshot
from tui.poller import PollFailed, SnapshotReady
from tui.screens.detail import TrialDetail
from tui.screens.gpus import LocalGpus
from tui.screens.help import HelpScreen
from tui.screens.picker import QuitWhileRunning, StartedStudy, StudyPicker
from tui.view import header_view, kv_rows, pareto_points, study_objectives
from tui.widgets.gpus import GpuPanel
from tui.widgets.header import StudyHeader
from tui.widgets.kv import KvPanel
from tui.widgets.pareto import ParetoPanel
from tui.widgets.trials import TrialsPanel

CSS = """
StudyHeader { height: 3; background: $boost; }
#middle { height: 1fr; }
#left { width: 1fr; }
GpuPanel { height: 10; border: round $primary; border-title-align: left; }
KvPanel { height: 1fr; border: round $primary; }
ParetoPanel { width: 1fr; border: round $primary; }
TrialsPanel { height: 1fr; border: round $primary; }
#detail-plots { height: 1fr; }
#detail-plots PlotextPlot { width: 1fr; }
#detail-text { height: 1fr; }
#help { width: 100; height: auto; max-height: 30; border: round $accent; background: $panel; padding: 1 2; }
HelpScreen { align: center middle; }
"""


class DetailReady(Message):
    def __init__(self, trial: dict, series: tuple, metrics: dict, log: list[str]) -> None:
        super().__init__()
        self.trial, self.series, self.metrics, self.log = trial, series, metrics, log


class Dashboard(Screen):
    BINDINGS = [Binding("question_mark", "app.push_screen('help')", "help"), Binding("g", "app.local_gpus", "GPUs"),
                Binding("s", "sort", "sort trials"), Binding("r", "reverse", "reverse sort"),
                Binding("escape", "back", "studies"), Binding("q", "app.quit", "quit")]

    def action_back(self) -> None:
        """Back to the study picker when the dashboard was opened from it (it keeps following otherwise)."""
        if any(isinstance(s, StudyPicker) for s in self.app.screen_stack):
            self.app.workers.cancel_group(self.app, "poll")
            self.app.pop_screen()

    def action_sort(self) -> None:
        self.query_one(TrialsPanel).cycle_sort()

    def action_reverse(self) -> None:
        self.query_one(TrialsPanel).reverse_sort()

    def compose(self) -> ComposeResult:
        yield StudyHeader("loading the study...", id="header")
        with Horizontal(id="middle"):
            with Vertical(id="left"):
                yield GpuPanel("", id="gpus")
                yield KvPanel("", id="kv")
            yield ParetoPanel(id="pareto")
        yield TrialsPanel(id="trials")
        yield Footer()

    def on_mount(self) -> None:
        self.app.refresh_views()       # a snapshot may have arrived while the screen was being built
        self.query_one(GpuPanel).border_title = "GPUs"
        self.query_one(KvPanel).border_title = "KV cache: use, history, running/waiting, preemptions"
        self.query_one(TrialsPanel).border_title = "trials"


class AutotuneApp(App):
    CSS = CSS
    TITLE = "reasoning-autotune"
    SCREENS = {"help": HelpScreen}
    BINDINGS = [Binding("ctrl+c", "quit", "quit", show=False)]

    def __init__(self, study_dir: Path | None = None, root: Path = Path("studies"), interval: float = 1.0,
                 gpus_only: bool = False, sampler_factory=None) -> None:
        super().__init__()
        self.study_dir = study_dir
        self.root = root
        self.interval = interval
        self.gpus_only = gpus_only
        from autotune.telemetry import NvmlSampler
        self.sampler_factory = sampler_factory or NvmlSampler
        self.snapshot: StudySnapshot | None = None
        self.refreshes = 0
        self.started: list[StartedStudy] = []     # studies launched from the picker

    def on_mount(self) -> None:
        if self.gpus_only:
            self.push_screen(LocalGpus(self.sampler_factory))
        elif self.study_dir is not None:
            self.open_study(self.study_dir)
        else:
            self.push_screen(StudyPicker(self.root))

    # ---- following a study -------------------------------------------------------------
    def open_study(self, study_dir: Path, wait: bool = False) -> None:
        self.study_dir = Path(study_dir)
        self.snapshot = None
        self.push_screen(Dashboard())
        self.poll(self.study_dir, wait)

    @work(thread=True, exclusive=True, group="poll")
    def poll(self, study_dir: Path, wait: bool) -> None:
        """The one worker that reads the store: a snapshot every `interval` seconds, posted as a message."""
        worker = get_current_worker()
        follower = None
        while not worker.is_cancelled:
            try:
                follower = follower or StudyFollower(study_dir)
                self.post_message(SnapshotReady(follower.refresh()))
            except UserError as exc:
                if not wait:
                    self.post_message(PollFailed(str(exc)))
            deadline = time.monotonic() + self.interval
            while not worker.is_cancelled and time.monotonic() < deadline:   # stay quick to cancel on exit
                time.sleep(min(0.05, self.interval))

    def on_snapshot_ready(self, message: SnapshotReady) -> None:
        self.snapshot = message.snapshot
        for problem in message.snapshot.problems:
            self.notify(problem, severity="error", timeout=10)
        self.refresh_views()

    def on_poll_failed(self, message: PollFailed) -> None:
        self.notify(message.error, severity="error", timeout=5)
        if self.snapshot is None:
            try:
                self.screen.query_one(StudyHeader).cannot_read(message.error)
            except NoMatches:     # another screen is on top
                pass

    def refresh_views(self) -> None:
        snap = self.snapshot
        screen = self.screen
        if snap is None or not isinstance(screen, Dashboard) or not screen.is_mounted:
            return
        try:
            header = screen.query_one(StudyHeader)
        except NoMatches:     # the dashboard is being torn down (quit) as a snapshot arrives
            return
        header.show(header_view(snap))
        screen.query_one(GpuPanel).show(list(snap.gpus))   # both readers sort by node, GPU
        screen.query_one(KvPanel).show(kv_rows(snap), [t["number"] for t in snap.trials if t["state"] == "RUNNING"])
        pareto = screen.query_one(ParetoPanel)
        pareto.show(pareto_points(snap, pareto.metric), snap.count("FAIL"))
        trials = screen.query_one(TrialsPanel)
        ranked = study_objectives(snap.header)
        if ranked:
            trials.sort_by_objective(ranked[0].metric, ranked[0].direction)
        trials.show(list(snap.trials))
        self.refreshes += 1

    # ---- trial detail ---------------------------------------------------------------------
    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if isinstance(event.data_table, TrialsPanel):
            self.load_detail(int(event.row_key.value))

    def on_pareto_panel_selected(self, message: ParetoPanel.Selected) -> None:
        self.load_detail(message.number)

    @work(thread=True, exclusive=True, group="detail")
    def load_detail(self, number: int) -> None:
        reader = StudyReader(self.study_dir)
        trial = next(t for t in reader.trials() if t["number"] == number)
        self.post_message(DetailReady(trial, reader.series([number]).get(number, ()), reader.metrics(number),
                                      reader.log_tail(number)))

    def on_detail_ready(self, message: DetailReady) -> None:
        self.push_screen(TrialDetail(message.trial, message.series, message.metrics, message.log))

    async def action_quit(self) -> None:
        """Quit; when a study launched from the picker still runs, ask whether to stop it (it would run on, alone)."""
        running = [s for s in self.started if s.running]
        if not running:
            self.exit()
            return

        def answer(choice: str | None) -> None:
            if choice == "stop":
                for s in running:
                    os.killpg(s.proc.pid, signal.SIGTERM)    # the runner ends its trials and exits "interrupted"
            if choice in ("stop", "leave"):
                self.exit()
        self.push_screen(QuitWhileRunning(running), answer)

    def action_local_gpus(self) -> None:
        self.push_screen(LocalGpus(self.sampler_factory))


def run_tui(study_dir: str | None, root: str = "studies", gpus_only: bool = False) -> int:
    if study_dir is not None:
        StudyReader(study_dir)     # a directory that is not a study: one line and exit 2, before the screen
    if gpus_only:
        from autotune.telemetry import NvmlSampler, NvmlUnavailable
        try:
            NvmlSampler().close()
        except NvmlUnavailable as exc:
            raise UserError(str(exc)) from None
    AutotuneApp(Path(study_dir) if study_dir else None, Path(root), gpus_only=gpus_only).run()
    return 0
