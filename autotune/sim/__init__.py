"""The simulator: memory plan, step costs and an event-driven model of vLLM v1's scheduler."""

import hashlib
import os
import shutil
from pathlib import Path


def _numba_cache_dir() -> str | None:
    """numba keys a compiled function's cache on its own file's timestamp only, so after an edit of costs.py the
    cached engine (engine.py, unchanged) would go on calling the old cost functions: a silently wrong answer. The
    cache lives instead in one directory that is emptied whenever any source of the simulator changes."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(here.glob("*.py")))).hexdigest()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "autotune" / "numba"
    stamp = root / "sources.sha256"
    try:
        if not stamp.is_file() or stamp.read_text() != digest:
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True, exist_ok=True)
            stamp.write_text(digest)
    except OSError:     # no writable cache home: numba's own default (beside the sources, or none)
        return None
    return str(root)


# Before numba is first imported (by costs.py); a cache directory the user chose is theirs to manage.
if "NUMBA_CACHE_DIR" not in os.environ and (_cache := _numba_cache_dir()):
    os.environ["NUMBA_CACHE_DIR"] = _cache
