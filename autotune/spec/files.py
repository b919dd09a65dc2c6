"""Reading the user's files: one clear line for a file that is missing, unreadable or not YAML, or for a count
that is not one."""

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


def integer(value: object, what: str) -> int:
    """A count as a file wrote it: an integer, or an integral float (YAML's 16.0, some config.json exporters); a
    bool, a string, 1.5, NaN or infinity is refused, never truncated."""
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise UserError(f"{what} must be an integer, got {value!r}")
    return int(value)
