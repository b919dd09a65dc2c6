"""Smoke test as a person would run it: `autotune run` in one terminal, the real `autotune tui` in tmux beside it."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.test_study import SPACE

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (.ci/run installs it)")


def capture(server: str) -> str:
    return subprocess.run(["tmux", "-L", server, "capture-pane", "-p", "-t", "tui"], capture_output=True,
                          text=True).stdout


def test_tui_follows_a_running_study_in_tmux(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    study = tmp_path / "study"
    run = subprocess.Popen([sys.executable, "-m", "autotune.cli", "run", str(space), "--study-dir", str(study),
                            "--trials", "30", "--pace", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    server = f"autotune-test-{uuid.uuid4().hex[:8]}"
    try:
        for _ in range(200):
            if (study / "study.json").exists():
                break
            time.sleep(0.1)
        cmd = f"{sys.executable} -m autotune.cli tui {study}; sleep 60"
        subprocess.run(["tmux", "-L", server, "new-session", "-d", "-s", "tui", "-x", "160", "-y", "48", cmd],
                       check=True, env={**os.environ, "TERM": "xterm-256color"})
        counts, screens = [], []
        deadline = time.time() + 60
        while time.time() < deadline and (len(counts) < 2 or counts[-1] <= counts[0]):
            time.sleep(2)
            screen = capture(server)
            screens.append(screen)
            m = re.search(r"trials (\d+)/30 done", screen)
            if m:
                counts.append(int(m.group(1)))
        last = screens[-1]
        assert "Traceback" not in "".join(screens)
        assert counts and counts[-1] > counts[0], f"the trial count did not rise: {counts}\n{last}"
        assert "Pareto" in last and re.search(r"[•O]", last.split("Pareto", 1)[1]), last
        assert "trials" in last and "COMPLETE" in last
    finally:
        subprocess.run(["tmux", "-L", server, "kill-server"], capture_output=True)
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=120)
