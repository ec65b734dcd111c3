"""One live writer per output: an exclusive, non-blocking ``flock`` on a lock file.

Used for a cache task (``manifests/<task>.lock``, see :mod:`qadpipe.cache.task_lock`) and a
distill output_dir.  The kernel drops a ``flock`` when its holder dies, however it dies
(SIGKILL, a node reboot on NFS once the lease expires), so there is no stale lock to block a
resume after preemption (a killed run leaves the file, unlocked; a run that ends deletes it).
The file holds its holder's pid, host and start time, for the refusal to name.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import BinaryIO, Callable

from qadpipe.errors import QadpipeError, first_line
from qadpipe.provenance import make_dirs_durably

log = logging.getLogger(__name__)


class LockHeld(Exception):
    """Another live process holds the lock; ``holder`` is what it wrote in the file."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


class LockUnsupported(Exception):
    """The filesystem refuses ``flock`` (Lustre mounted without ``-o flock``): the caller
    decides whether to go on unlocked, and says so."""


class HeldLock:
    """A held lock; :meth:`release` deletes the lock file, then drops the lock."""

    def __init__(self, path: Path, handle: BinaryIO) -> None:
        self.path, self.handle = path, handle

    def release(self) -> None:
        # Unlinked while still held: a run that opened the old file meanwhile finds, once it
        # gets the lock, that the path no longer names its file, and retries (take_lock).
        if not self.handle.closed:
            self.path.unlink(missing_ok=True)
            self.handle.close()


def take_lock(path: Path) -> HeldLock:
    """Lock ``path`` (created if absent) until :meth:`HeldLock.release` or the process's end.
    Raises :class:`LockHeld`, :class:`LockUnsupported`, or the ``OSError`` of creating it."""
    while True:
        handle = open(path, "a+b")   # created if absent, never truncated before the lock is ours
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(300).decode("utf-8", "replace").strip() or "another process"
            handle.close()
            raise LockHeld(holder) from None
        except OSError as exc:
            handle.close()
            raise LockUnsupported(str(exc)) from None
        if _same_file(handle, path):
            break
        handle.close()   # the holder released (and unlinked) it between our open and our lock: again
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}".encode())
    handle.flush()
    return HeldLock(path, handle)


def lock_for_one_run(path: Path, *, where: str, error: type[QadpipeError], busy: Callable[[str], str],
                     unguarded: str) -> HeldLock | None:
    """:func:`take_lock` in the caller's words: ``error(f"{where}: {busy(holder)}")`` while
    another live run holds it; where the filesystem refuses ``flock``, a warning that says what
    goes ``unguarded``, and None (the run goes on unlocked)."""
    try:
        make_dirs_durably(path.parent)   # the cache or output root may be new: the lock is its first entry
        return take_lock(path)
    except LockHeld as held:
        raise error(f"{where}: {busy(held.holder)}") from None
    except LockUnsupported as exc:
        log.warning("%s: cannot lock %s (%s): %s", where, path.name, exc, unguarded)
        return None
    except OSError as exc:
        raise error(f"{where}: cannot create the lock file {path} ({first_line(exc)})") from None


def _same_file(handle: BinaryIO, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False
