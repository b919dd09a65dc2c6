"""The dashboard under Textual's run_test (Pilot), SVG snapshots, and the import boundaries."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from textual.widgets import DataTable

from autotune.telemetry import NvmlUnavailable
from tests.fake_study import add_trial, build
from tui.app import AutotuneApp, Dashboard
from tui.screens.detail import TrialDetail
from tui.screens.gpus import LocalGpus
from tui.screens.help import HelpScreen
from tui.widgets.gpus import GpuPanel
from tui.widgets.header import StudyHeader
from tui.widgets.kv import KvPanel
from tui.widgets.pareto import ParetoPanel


@pytest.fixture
def study(tmp_path):
    build(tmp_path).close()
    return tmp_path


async def wait_until(pilot, condition, what: str, timeout_s: float = 120.0):
    """Let the app run until `condition()` holds (however long a busy machine takes, up to timeout_s), then one more
    pause so that what it shows has settled."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await pilot.pause(0.05)
    await pilot.pause()


async def wait_loaded(pilot, refreshes=1):
    await wait_until(pilot, lambda: pilot.app.refreshes >= refreshes, "the dashboard's first snapshot")


def text_of(widget) -> str:
    """What a Static panel shows, as plain text."""
    from rich.console import Console
    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    console.print(widget.content)
    return console.export_text()


async def test_dashboard_shows_every_panel(study):
    app = AutotuneApp(study, interval=0.1)
    async with app.run_test(size=(160, 48)) as pilot:
        await wait_loaded(pilot)
        screen = app.screen
        assert isinstance(screen, Dashboard)
        header = text_of(screen.query_one(StudyHeader))
        assert "fixture-study" in header and "12/20 done" in header
        assert "1 failed" in header
        trials = screen.query_one("#trials", DataTable)
        assert trials.row_count == 12
        pareto = screen.query_one(ParetoPanel)
        assert len(pareto.points) == 11 and any(p.on_front for p in pareto.points)
        assert any(not p.meets_slo for p in pareto.points)
        assert "capacity trap" in text_of(screen.query_one(KvPanel))
        assert "node-a/0" in text_of(screen.query_one(GpuPanel))


async def test_navigation_detail_help_metric_and_sort(study):
    app = AutotuneApp(study, interval=0.1)
    async with app.run_test(size=(160, 48)) as pilot:
        await wait_loaded(pilot)
        pareto = app.screen.query_one(ParetoPanel)
        pareto.focus()
        await pilot.press("m")
        assert pareto.metric == "ttft_p99_s"
        first = pareto.selected.number
        await pilot.press("right")
        assert pareto.selected.number != first
        await pilot.press("enter")
        await pilot.pause(0.5)
        assert isinstance(app.screen, TrialDetail) and app.screen.trial["number"] == pareto.selected.number
        assert "vllm serve" in text_of(app.screen.query_one("#detail-command"))
        assert "done" in text_of(app.screen.query_one("#detail-log"))
        await pilot.press("escape")
        assert isinstance(app.screen, Dashboard)
        table = app.screen.query_one("#trials", DataTable)
        # It opens sorted on the study's objective, best first, and the header says so.
        assert (table.sort_key, table.reverse) == ("output_tok_s_per_gpu", True)
        assert str(table.columns["output_tok_s_per_gpu"].label).endswith("▼")
        rates = [t["output_tok_s_per_gpu"] for t in table._trials if t["output_tok_s_per_gpu"] is not None]
        first = table.get_row_at(0)[0]
        assert int(first) == max(table._trials, key=lambda t: t["output_tok_s_per_gpu"] or -1)["number"] and rates
        await pilot.press("s")              # from the dashboard, whatever has the focus
        assert table.sort_key == "tpot_p99_s" and str(table.columns["tpot_p99_s"].label).endswith("▼")
        await pilot.press("r")
        assert not table.reverse and str(table.columns["tpot_p99_s"].label).endswith("▲")
        table.focus()
        await pilot.press("down", "enter")
        await pilot.pause(0.5)
        assert isinstance(app.screen, TrialDetail)
        await pilot.press("escape", "question_mark")
        assert isinstance(app.screen, HelpScreen)


async def test_updates_while_the_study_grows(study):
    writer = build(study / "live", trials=3)
    app = AutotuneApp(study / "live", interval=0.1)
    async with app.run_test(size=(160, 48)) as pilot:
        await wait_loaded(pilot)
        table = app.screen.query_one("#trials", DataTable)
        assert table.row_count == 3
        for n in range(3, 9):
            add_trial(writer, n, study / "live")
        writer.flush()
        await wait_loaded(pilot, app.refreshes + 2)
        assert table.row_count == 9
    writer.close()


class FakeSampler:
    """NVML faked: this machine has no GPU."""

    def sample(self):
        return [{"node": "here", "gpu": i, "wall": 0.0, "mem_used_bytes": 2**34, "mem_total_bytes": 2**36,
                 "util": 0.25, "power_w": 300.0} for i in range(2)]

    def close(self):
        pass


def no_nvml():
    raise NvmlUnavailable("no GPU telemetry: NVML is unavailable (NVML Shared Library Not Found)")


@pytest.mark.parametrize("factory,expected", [(FakeSampler, "here/1"), (no_nvml, "NVML is unavailable")])
async def test_local_gpu_view(factory, expected):
    app = AutotuneApp(gpus_only=True, sampler_factory=factory)
    async with app.run_test(size=(120, 20)) as pilot:
        await pilot.pause(0.2)
        assert isinstance(app.screen, LocalGpus)
        assert expected in text_of(app.screen.query_one(GpuPanel))


def test_snapshot_main_screen(study, snap_compare):
    async def loaded(pilot):
        await wait_loaded(pilot)
    assert snap_compare(AutotuneApp(study, interval=3600), terminal_size=(160, 48), run_before=loaded)


def test_snapshot_trial_detail(study, snap_compare):
    async def detail(pilot):
        await wait_loaded(pilot)
        pilot.app.load_detail(4)
        await wait_until(pilot, lambda: isinstance(pilot.app.screen, TrialDetail), "the trial detail")
    assert snap_compare(AutotuneApp(study, interval=3600), terminal_size=(160, 48), run_before=detail)


@pytest.fixture
def studies_here(tmp_path, monkeypatch):
    """Two studies of one name and a broken one under ./studies, with UTC clocks: paths and times that a snapshot
    can hold."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    for name in ("dense-a", "dense-b"):
        build(tmp_path / "studies" / name).close()
    (tmp_path / "studies" / "broken").mkdir()
    (tmp_path / "studies" / "broken" / "study.json").write_text("[]")
    yield Path("studies")
    monkeypatch.undo()      # TZ back as it was, then the C library told so
    time.tzset()


def test_snapshot_picker(studies_here, snap_compare):
    async def shown(pilot):
        await wait_until(pilot, lambda: pilot.app.screen.query("#studies")
                         and pilot.app.screen.query_one("#studies").row_count == 3, "the picker's three studies")
    assert snap_compare(AutotuneApp(None, root=studies_here, interval=3600), terminal_size=(160, 30),
                        run_before=shown)


def test_snapshot_error_on_a_broken_study(studies_here, snap_compare):
    async def failed(pilot):
        await wait_until(pilot, lambda: pilot.app._notifications, "the error notification")
    assert snap_compare(AutotuneApp(studies_here / "broken", interval=3600), terminal_size=(160, 30),
                        run_before=failed)


def test_the_tui_imports_neither_ray_nor_vllm_and_the_runner_not_textual():
    tui = subprocess.run([sys.executable, "-c", "import sys, tui.app, autotune.cli; "
                          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'vllm')))"],
                         capture_output=True, text=True, check=True)
    assert tui.stdout.strip() == "[]"
    runner = subprocess.run([sys.executable, "-c", "import sys, autotune.cli, autotune.study, autotune.trials.runner, "
                             "autotune.trials.sim_backend, store.writer; "
                             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'textual'))"],
                            capture_output=True, text=True, check=True)
    assert runner.stdout.strip() == "[]"


async def test_detail_shows_the_simulators_range_and_flags_an_extrapolation(study):
    from store.writer import StudyWriter
    w = StudyWriter(study, flush_s=0.1)
    w.add("trial_metrics", {"number": 4, "source": "simulator", "output_tok_s": 5000.0, "output_tok_s_lo": 3000.0,
                            "output_tok_s_hi": 9000.0, "tpot_p99_s": 0.05, "tpot_p99_s_lo": 0.03,
                            "tpot_p99_s_hi": 0.08, "near_validated": False})
    w.flush()
    w.close()
    app = AutotuneApp(study, interval=3600)
    async with app.run_test(size=(160, 48)) as pilot:
        await wait_loaded(pilot)
        app.load_detail(4)
        await wait_until(pilot, lambda: isinstance(app.screen, TrialDetail) and app.screen.query("#detail-metrics"),
                         "the trial detail's metrics")
        text = text_of(app.screen.query_one("#detail-metrics"))
        assert "5,000 (3,000-9,000)" in text and "50.0 (30.0-80.0)" in text
        assert "extrapolates" in text


async def test_a_junk_segment_is_reported_and_the_dashboard_keeps_following(study):
    from store.segments import table_dir
    bad = table_dir(study, "trials") / "99999998-99999998.parquet"
    bad.write_bytes(b"PAR1 this is not a parquet file")
    app = AutotuneApp(study, interval=0.1)
    async with app.run_test(size=(160, 48)) as pilot:
        await wait_loaded(pilot)
        assert app.screen.query_one("#trials", DataTable).row_count == 12     # every good row still shown
        assert any("skipped segments/trials/99999998-99999998.parquet" in str(n.message) for n in app._notifications)
        from store.writer import StudyWriter
        writer = StudyWriter(study)              # the study grows: the poller is still alive and reading
        add_trial(writer, 12, study)
        writer.close()
        table = app.screen.query_one("#trials", DataTable)
        await wait_until(pilot, lambda: table.row_count == 13, "the new trial's row")
        assert table.row_count == 13


async def test_the_picker_tells_studies_of_one_name_apart_and_escape_returns_to_it(tmp_path):
    from tui.screens.picker import StudyPicker
    for name in ("dense-a", "dense-b"):
        build(tmp_path / name).close()     # both are "fixture-study"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "study.json").write_text("[]")
    app = AutotuneApp(None, root=tmp_path, interval=0.1)
    async with app.run_test(size=(160, 48)) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, StudyPicker)
                         and app.screen.query_one(DataTable).row_count == 3, "the picker's three studies")
        assert isinstance(app.screen, StudyPicker)
        table = app.screen.query_one(DataTable)
        rows = [table.get_row_at(i) for i in range(table.row_count)]
        assert [r[0] for r in rows] == ["broken", "dense-a", "dense-b"]
        assert rows[1][1] == rows[2][1] == "fixture-study" and rows[1][5] == "12/20"
        assert "unreadable" in rows[0][2]
        table.focus()
        await pilot.press("down", "enter")
        await wait_loaded(pilot)
        assert isinstance(app.screen, Dashboard)
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, StudyPicker)


async def test_quitting_while_a_started_study_runs_asks_and_can_stop_it(tmp_path):
    from tui.screens.picker import QuitWhileRunning, StudyPicker
    space = Path(__file__).resolve().parents[1] / "search_spaces" / "dense.yaml"
    app = AutotuneApp(None, root=tmp_path, interval=0.2)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, StudyPicker)
        app.screen.query_one("#space").value = str(space)
        app.screen.query_one("#space").focus()
        await pilot.press("enter")
        await pilot.pause()
        (started,) = app.started
        assert started.running and started.output.parent == tmp_path
        await pilot.press("q")
        await pilot.pause()
        assert isinstance(app.screen, QuitWhileRunning)
        assert str(started.study_dir) in str(app.screen.query_one("#quit-prompt").render())
        await pilot.press("escape")                  # stay: nothing stopped
        await pilot.pause()
        assert not isinstance(app.screen, QuitWhileRunning) and started.running
        await pilot.press("q")
        await pilot.pause()
        await pilot.press("s")                       # stop it and quit
    # Stopped: by its runner's handler (143), or by SIGTERM itself when it landed before the runner installed one.
    assert started.proc.wait(timeout=180) in (143, -signal.SIGTERM)
