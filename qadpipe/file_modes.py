"""Modes of what qadpipe writes: those any file the user creates there gets.

``mkdtemp`` creates private directories (0700), and so does the safetensors writer its files
(0600); but a cache, a checkpoint or an export lives on a shared cluster filesystem and is
read by other jobs and users.  Every staged output goes through here before its atomic
rename, so the rename publishes it with ordinary modes: the umask's, or, in a directory with a
default ACL (which the kernel applies instead of the umask), the ACL's -- whose group bits are
the mask that lets the ACL's named groups in, so a mode computed from the umask alone would
shut a project group out.
"""

from __future__ import annotations

import itertools
import os
import secrets
from pathlib import Path

from qadpipe.errors import ConfigError


def create_exclusive(directory: Path, prefix: str, suffix: str = "") -> tuple[int, Path]:
    """A new file ``<prefix><random><suffix>`` in ``directory``, open for writing: (fd, path).
    ``mkstemp`` with the ordinary create mode 0666, so the kernel applies the umask or the
    directory's default ACL, as to any file the user creates."""
    while True:
        path = Path(directory) / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
        except FileExistsError:
            continue


def new_entry_modes(directory: Path) -> tuple[int, int]:
    """(file mode, directory mode) that a file created with 0666 and a directory with 0777 get
    in ``directory``: measured on a probe of each, as the kernel decides (umask or default ACL).
    The probes are removed at once; a kill in between leaves them in ``directory``."""
    fd, probe = create_exclusive(directory, ".qadpipe-mode-probe-")
    try:
        file_mode = os.fstat(fd).st_mode & 0o7777
    finally:
        os.close(fd)
        probe.unlink()
    probe_dir = Path(directory) / f".qadpipe-mode-probe-{secrets.token_hex(4)}"
    probe_dir.mkdir(0o777)
    try:
        return file_mode, probe_dir.stat().st_mode & 0o7777
    finally:
        probe_dir.rmdir()


def share_tree(root: Path) -> None:
    """Give ``root`` and everything under it the modes new entries get in its parent (a staged
    output, before its rename).  On an ACL the chmod sets the mask and the owner and other
    entries; the named entries the default ACL gave each entry at creation stay.  Measured in
    ``root`` itself, which inherited its parent's default ACL as its own (as every new
    directory does): a kill mid-probe leaves the probes inside the staged directory, which the
    stages' stale-temp sweeps remove whole."""
    file_mode, dir_mode = new_entry_modes(Path(root))
    root.chmod(dir_mode)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod(dir_mode if path.is_dir() else file_mode)


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
