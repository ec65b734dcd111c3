"""Modes of what qadpipe writes: what the user's umask allows, as for any file they create.

``mkstemp``/``mkdtemp`` create private entries (0600/0700), and so does the safetensors
writer; but a cache, a checkpoint or an export lives on a shared cluster filesystem and is
read by other jobs and users.  Every staged output goes through here before its atomic
rename, so the rename publishes it with ordinary modes.
"""

from __future__ import annotations

import functools
import itertools
import os
from pathlib import Path

from qadpipe.errors import ConfigError


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (no race with threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~_umask()


def dir_mode() -> int:
    return 0o777 & ~_umask()


def share_tree(root: Path) -> None:
    """Give ``root`` and everything under it the umask's modes (a staged output, before its rename)."""
    root.chmod(dir_mode())
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod(dir_mode() if path.is_dir() else file_mode())


def missing_dirs(path: Path) -> list[Path]:
    """The directories of ``path`` that do not exist yet, ``path`` first: what ``mkdir -p``
    would create (and a refused run may remove again, in that order)."""
    chain = (path, *path.parents)
    return list(itertools.takewhile(lambda p: not p.exists() and p != Path(p.anchor), chain))


def check_writable_dir(path: Path, field: str) -> Path:
    """Check this user can create (or write in) the directory config ``field`` names, before
    hours of work rather than when the first result is saved; creates nothing, so a refused
    run leaves no empty directory behind."""
    path = Path(path).absolute()
    existing = (path, *path.parents)[len(missing_dirs(path))]
    if not existing.is_dir():
        what = "exists and is not a directory" if existing == path else f"cannot be created ({existing} is a file)"
        raise ConfigError(f"{field}: {path} {what}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}: {path} cannot be written ({existing} is not writable by this user)")
    return path
