"""One live writer per cache task: an exclusive ``flock`` on ``manifests/<task>.lock``.

Two runs of the same task -- a requeued array task whose first run is still alive, a manual
rerun beside the job -- would both name their next shard from the same manifest and replace
each other's committed shards, leaving a task that neither a reader nor a resume accepts.
The lock refuses the second run in one line.  The kernel drops a ``flock`` when its holder
dies, however it dies (SIGKILL, a node reboot on NFS once the lease expires), so there is no
stale lock to block a resume after preemption (a killed run leaves the file, unlocked; a run
that ends deletes it).

Object stores have no locks: there, running each task once at a time is the user's job (the
README says so).  A local filesystem that refuses ``flock`` (Lustre mounted without
``-o flock``) gets a warning that names the risk, and the run goes on unlocked.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import BinaryIO

from qadpipe.cache.manifest import MANIFEST_DIR, check_task_name
from qadpipe.cache.store import Store
from qadpipe.errors import CacheError, first_line

log = logging.getLogger(__name__)


class TaskLock:
    """A held task lock; :meth:`release` deletes the lock file, then drops the lock."""

    def __init__(self, path: Path, handle: BinaryIO) -> None:
        self.path, self.handle = path, handle

    def release(self) -> None:
        # Unlinked while still held: a run that opened the old file meanwhile finds, once it
        # gets the lock, that the path no longer names its file, and retries (lock_task).
        self.path.unlink(missing_ok=True)
        self.handle.close()


def lock_task(store: Store, task: str) -> TaskLock | None:
    """Take task ``task``'s lock until :meth:`TaskLock.release` (or the process's end); None
    where the store cannot lock (object stores, filesystems without flock)."""
    if not store.local:
        return None
    rel = f"{MANIFEST_DIR}/{check_task_name(task)}.lock"
    path = store.base / rel
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+b")   # created if absent, never truncated before the lock is ours
        except OSError as exc:
            raise CacheError(f"{store.describe(rel)}: cannot create the task lock ({first_line(exc)})") from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(300).decode("utf-8", "replace").strip() or "another process"
            handle.close()
            raise CacheError(f"{store.describe(rel)}: task {task} is being written by {holder}; two runs of one task "
                             "would overwrite each other's shards: wait for that run to end, or stop it, then "
                             "rerun") from None
        except OSError as exc:
            handle.close()
            log.warning("%s: cannot lock (%s): nothing stops a second run of task %s from writing beside this one; "
                        "run each task once at a time", store.describe(rel), first_line(exc), task)
            return None
        if _same_file(handle, path):
            break
        handle.close()   # the holder released (and unlinked) it between our open and our lock: again
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}".encode())
    handle.flush()
    return TaskLock(path, handle)


def _same_file(handle: BinaryIO, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False
