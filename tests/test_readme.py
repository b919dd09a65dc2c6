"""The README's examples run as printed: every `autotune` command of its bash blocks that needs no GPU, no
placeholder and no terminal, in the order the README gives them, from a fresh directory; where the README shows
the output (`$ ` blocks), the lines it shows appear."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
# Synopses name what the user fills in, and the Slurm example a cluster's shared path: such a line is documentation,
# not a command. Optional parts in [brackets] are left out, the rest runs.
PLACEHOLDER = re.compile(r"\b(SPACE\.yaml|D|DIR|FILE|N|K|X)\b|/shared/|\|")
OPTIONAL = re.compile(r"\s*\[[^\]]*\]")


def commands() -> list[tuple[str, list[str]]]:
    """(command, the output lines shown under it) for each runnable command, in README order."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            shown = line.startswith("$ ")
            cmd = OPTIONAL.sub("", line.removeprefix("$ ").split("   #")[0].split("  #")[0]).strip()
            if not cmd.startswith("autotune ") or cmd.startswith("autotune tui") or PLACEHOLDER.search(cmd):
                continue
            expected = []
            if shown:
                for follow in lines[i + 1:]:
                    if follow.startswith("$ "):
                        break
                    expected.append(follow)
            out.append((cmd, expected))
    return out


def key_of(line: str) -> str | None:
    """What an output line shown in the README must match: an explanation's lead, or a table row's first cells."""
    text = line.strip()
    if text.startswith("- "):
        return " ".join(text[2:].split(":")[0].split())
    if text.startswith("│"):
        cells = [c.strip() for c in text.strip("│").split("│")]
        return " ".join(cells[:3]) if len(cells) >= 3 and cells[1] != "-" else None
    return None


def normalise(text: str) -> str:
    rows = [" ".join(c.strip() for c in line.strip("│ ").split("│")) if "│" in line else line
            for line in text.splitlines()]
    return " ".join(" ".join(rows).split())


def test_readme_commands_run_as_printed(tmp_path):
    shutil.copytree(README.parent / "search_spaces", tmp_path / "search_spaces")
    found = commands()
    assert len(found) >= 10, [c for c, _ in found]
    failures = []
    for cmd, expected in found:
        argv = cmd.split()[1:]
        out = subprocess.run([sys.executable, "-m", "autotune.cli", *argv], capture_output=True, text=True,
                             cwd=tmp_path, timeout=600)
        if out.returncode != 0 or "Traceback" in out.stderr:
            failures.append(f"{cmd}: exit {out.returncode}: {out.stderr.strip()[-300:]}")
            continue
        text = normalise(out.stdout)
        for line in expected:
            key = key_of(line)
            if key and key.rstrip(". ") not in text:
                failures.append(f"{cmd}: README shows {key!r}, the command does not")
    assert not failures, "\n".join(failures)
