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


def test_a_killed_run_s_holder_line_is_replaced_not_appended_to(tmp_path):
    """A killed run leaves its lock file (unlocked); the next run's refusal must name the live
    holder alone, not the dead one's pid and host before it."""
    path = tmp_path / ".lock"
    path.write_bytes(b"pid 999999 on a-node-long-gone since 2020-01-01 00:00:00")
    held = take_lock(path)
    try:
        assert path.read_text().startswith(f"pid {os.getpid()} on ")
        assert "999999" not in path.read_text()
        with pytest.raises(LockHeld) as refused:
            take_lock(path)
        assert "999999" not in refused.value.holder
    finally:
        held.release()


def test_a_lock_file_the_holder_unlinks_between_open_and_flock_is_not_the_one_taken(tmp_path, monkeypatch):
    """The holder releases (unlinks, then unlocks) after this run opened the old file: locking
    that orphan would let a third run create and lock a new file at the same path, beside this
    one.  take_lock must end up holding the file the path names."""
    import fcntl

    import qadpipe.file_lock as file_lock

    path = tmp_path / ".lock"
    real_flock, raced = fcntl.flock, []

    def flock(handle, operation):
        if not raced:   # the holder's release lands between our open() and our flock()
            raced.append(True)
            path.unlink()
        return real_flock(handle, operation)

    monkeypatch.setattr(file_lock.fcntl, "flock", flock)
    held = take_lock(path)
    monkeypatch.undo()
    try:
        assert raced and path.exists()
        assert os.stat(path).st_ino == os.fstat(held.handle.fileno()).st_ino
        with pytest.raises(LockHeld):
            take_lock(path)
    finally:
        held.release()


def test_release_deletes_the_lock_file_while_it_still_holds_the_lock(tmp_path):
    """Unlocking first would let another run lock the file, pass its is-this-still-the-path check,
    and then lose the path to this release's unlink: a third run could lock a new file there."""
    path = tmp_path / ".lock"
    held = take_lock(path)
    real, seen = held.handle, []

    class Handle:
        @property
        def closed(self):
            return real.closed

        def close(self):
            seen.append(path.exists())   # whether the path still named the file when the lock went
            real.close()

    held.handle = Handle()
    held.release()
    assert seen == [False] and not path.exists()


def test_the_user_cache_lock_keeps_every_other_process_out_until_the_build_ends(tmp_path):
    """One process converts the embedded model while the others wait: a shared lock would let a
    second one in to build (or read) beside the first."""
    import fcntl

    from qadpipe.user_cache import file_lock

    path = tmp_path / "models" / "smollm2.lock"
    with file_lock(path), open(path, "rb") as other:   # another open file description: another process's view
        for operation in (fcntl.LOCK_SH, fcntl.LOCK_EX):
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, operation | fcntl.LOCK_NB)
    with open(path, "rb") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
