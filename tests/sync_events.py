"""The order in which a write makes its fsyncs and renames, for the durability tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def record_syncs_and_renames(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Patch ``os.fsync`` and ``os.replace`` (both still act) to log, in order, ``("fsync",
    inode)`` and ``("rename", destination, inodes of everything under a renamed directory)``:
    inodes, because a staged tree's paths change with the rename that publishes it.  Call
    ``monkeypatch.undo()`` before reading the results' own inodes."""
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        staged = {p.stat().st_ino for p in [Path(src), *Path(src).rglob("*")]} if Path(src).is_dir() else set()
        events.append(("rename", Path(dst), staged))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events
