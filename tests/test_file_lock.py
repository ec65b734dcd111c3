"""The one-live-run lock of cache tasks and distill output dirs (qadpipe/file_lock.py)."""

from __future__ import annotations

import errno
import logging
import os

import pytest

from qadpipe.errors import CacheError, DistillError
from qadpipe.file_lock import LockHeld, lock_for_one_run, take_lock


def test_a_held_lock_names_its_holder_and_goes_with_release(tmp_path):
    path = tmp_path / ".lock"
    held = take_lock(path)
    with pytest.raises(LockHeld) as refused:   # another open file description: what another process has
        take_lock(path)
    assert refused.value.holder.startswith(f"pid {os.getpid()} on ")
    with pytest.raises(DistillError, match=r"^where: busy pid \d+ on "):
        lock_for_one_run(path, where="where", error=DistillError, busy=lambda holder: f"busy {holder}", unguarded="")
    held.release()
    held.release()   # twice: a refused setup releases, then cleanup does
    assert not path.exists()
    take_lock(path).release()


def test_a_filesystem_without_flock_warns_what_goes_unguarded_and_runs_on(tmp_path, monkeypatch, caplog):
    """Lustre mounted without -o flock refuses flock with EOPNOTSUPP (ENOLCK on some NFS)."""
    import qadpipe.file_lock as file_lock

    def refuse(handle, operation):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(file_lock.fcntl, "flock", refuse)
    with caplog.at_level(logging.WARNING, logger="qadpipe.file_lock"):
        assert lock_for_one_run(tmp_path / "task.lock", where="manifests/task.lock", error=CacheError,
                                busy=str, unguarded="nothing stops a second run") is None
    assert "manifests/task.lock: cannot lock task.lock (" in caplog.text
    assert caplog.text.rstrip().endswith("nothing stops a second run")


def test_a_lock_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheError, match=r"^where: cannot create the lock file .*file/sub/.lock \("):
        lock_for_one_run(tmp_path / "file" / "sub" / ".lock", where="where", error=CacheError, busy=str,
                         unguarded="")
