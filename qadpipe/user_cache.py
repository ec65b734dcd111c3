"""Where qadpipe keeps what it builds once per user (converted models, compiled kernels).

No side effects on import: vLLM's plugin loader imports the kernels in every engine process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator


def cache_root() -> Path:
    """``$QADPIPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/qadpipe`` (``~/.cache/qadpipe``)."""
    override = os.environ.get("QADPIPE_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qadpipe"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created): one process builds, the others wait, then reuse."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
