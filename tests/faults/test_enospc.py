"""A full disk (ENOSPC at the write layer) mid-shard and mid-checkpoint: one clear error,
the previous committed state intact and readable, no temp file left."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cache_rows import cache_meta, random_rows
from killing import temp_files
from qadpipe.cache import CacheReader, CacheWriter
from qadpipe.config import load_config
from qadpipe.errors import CacheError, DistillError


class _FullDisk:
    """A file handle that writes half of what it is given, then fails like a full disk."""

    def __init__(self, handle) -> None:
        self.handle = handle

    def write(self, data: bytes) -> int:
        self.handle.write(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def test_enospc_mid_shard_keeps_the_committed_shards(tmp_path, monkeypatch):
    meta = cache_meta("topk", k=8)
    rows = random_rows(meta, 6)
    real_fdopen, opened = os.fdopen, []

    def fdopen(fd, *args, **kwargs):  # writes in order: shard 0, manifest, shard 1 (the disk fills here)
        opened.append(fd)
        handle = real_fdopen(fd, *args, **kwargs)
        return _FullDisk(handle) if len(opened) >= 3 else handle

    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(CacheError, match=r"shards/task-00000-000001\.parquet: cannot write \(\[Errno 28\] "
                                         r"No space left on device\)") as info:
        with CacheWriter(str(tmp_path / "cache"), meta, rows_per_shard=2) as writer:
            for row in rows:
                writer.write(row)
    assert "\n" not in str(info.value)
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    read = list(CacheReader(str(tmp_path / "cache")).iter_sequences())
    assert [r.id for r in read] == [r.id for r in rows[:2]]
    np.testing.assert_array_equal(read[1].input_ids, rows[1].input_ids)
    assert temp_files(tmp_path) == []


def test_enospc_mid_checkpoint_keeps_latest(tmp_path, monkeypatch):
    import qadpipe.distill.checkpoint as ckpt

    config = load_config(None)
    weights = {"w": torch.arange(6, dtype=torch.float32)}
    state = ckpt.TrainerState(step=1, optimizer={"lr": 0.1}, scheduler={}, loader={"ranks": [{"batches": 1}]})
    ckpt.save_checkpoint(tmp_path, weights, state, config)
    from safetensors import SafetensorError

    from qadpipe import tensor_files
    real_save = tensor_files.save_file

    def save_file(tensors, path, metadata=None):  # a partial weights file, then the disk is full, as safetensors says it
        Path(path).write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(tensor_files, "save_file", save_file)
    later = ckpt.TrainerState(step=2, optimizer={"lr": 0.2}, scheduler={}, loader={"ranks": [{"batches": 2}]})
    with pytest.raises(DistillError, match=r"step-00000002: cannot write the checkpoint \(No space left on device\); "
                                           r"LATEST still names the previous one") as info:
        ckpt.save_checkpoint(tmp_path, {"w": torch.zeros(6)}, later, config)
    assert "\n" not in str(info.value)
    monkeypatch.setattr(tensor_files, "save_file", real_save)
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step-00000001"
    tensors, restored = ckpt.load_checkpoint(latest)
    assert torch.equal(tensors["w"], weights["w"]) and restored.step == 1 and restored.optimizer == {"lr": 0.1}
    assert temp_files(tmp_path) == [] and not (tmp_path / "checkpoints" / "step-00000002").exists()
