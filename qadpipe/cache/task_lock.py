"""One live writer per cache task: an exclusive ``flock`` on ``manifests/<task>.lock``.

Two runs of the same task -- a requeued array task whose first run is still alive, a manual
rerun beside the job -- would both name their next shard from the same manifest and replace
each other's committed shards, leaving a task that neither a reader nor a resume accepts.
The lock (:mod:`qadpipe.file_lock`) refuses the second run in one line; a killed run leaves
no stale lock.

Object stores have no locks: there, running each task once at a time is the user's job (the
README says so).  A local filesystem that refuses ``flock`` (Lustre mounted without
``-o flock``) gets a warning that names the risk, and the run goes on unlocked.
"""

from __future__ import annotations

from qadpipe.cache.manifest import MANIFEST_DIR, check_task_name
from qadpipe.cache.store import Store
from qadpipe.errors import CacheError
from qadpipe.file_lock import HeldLock, lock_for_one_run


def lock_task(store: Store, task: str) -> HeldLock | None:
    """Take task ``task``'s lock until :meth:`HeldLock.release` (or the process's end); None
    where the store cannot lock (object stores, filesystems without flock)."""
    if not store.local:
        return None
    rel = f"{MANIFEST_DIR}/{check_task_name(task)}.lock"
    return lock_for_one_run(store.base / rel, where=store.describe(rel), error=CacheError,
                            busy=lambda holder: f"task {task} is being written by {holder}; two runs of one task "
                                                "would overwrite each other's shards: wait for that run to end, or "
                                                "stop it, then rerun",
                            unguarded=f"nothing stops a second run of task {task} from writing beside this one; run "
                                      "each task once at a time")
