"""Every output qadpipe stages (cache shards and manifests, run records, checkpoints, the
student, an export) is published with the modes the umask allows, like any file the user
creates -- not mkstemp's, mkdtemp's or safetensors' private 0600/0700: on a shared cluster
filesystem other jobs and users read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from cache_rows import cache_meta, random_rows, write_cache
from qadpipe import file_modes
from qadpipe.config import load_config
from qadpipe.distill.checkpoint import TrainerState, save_checkpoint
from qadpipe.distill.student import save_student
from qadpipe.export.writer import staged_dir, write_safetensors


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=["umask022", "umask077", "umask002"])
def umask(request):
    previous = os.umask(request.param)
    file_modes._umask.cache_clear()
    yield request.param
    os.umask(previous)
    file_modes._umask.cache_clear()


def write_everything(root: Path) -> None:
    config = load_config(None)
    write_cache(root / "cache", cache_meta("topk"), random_rows(cache_meta("topk"), 3))
    state = {"w": torch.zeros(4)}
    save_checkpoint(root / "run", state, TrainerState(step=1, optimizer={}, scheduler={}, loader={}, rng={}), config)
    save_student(root / "run", state, config)
    with staged_dir(root / "export") as tmp:
        write_safetensors({"w": torch.zeros(4)}, tmp)


def test_outputs_get_the_umask_modes(tmp_path, umask):
    write_everything(tmp_path)
    entries = [p for p in tmp_path.rglob("*") if not p.name.endswith(".lock")]
    assert len([p for p in entries if p.is_file()]) >= 8
    for path in entries:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path.relative_to(tmp_path)
