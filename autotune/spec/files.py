"""Reading the user's YAML files: one clear line for a file that is missing, unreadable or not YAML."""

from __future__ import annotations

from pathlib import Path

import yaml

from autotune.errors import UserError


def read_yaml(path: Path, what: str) -> object:
    """The parsed document of `path` (a `what` file, for the message when it does not exist)."""
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}{at}: not valid YAML ({problem})") from None
