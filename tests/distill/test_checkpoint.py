"""Checkpoints: exact round trip, LATEST as the commit point, no pickle execution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qadpipe.config import load_config
from qadpipe.distill.checkpoint import (
    TrainerState, capture_rng, latest_checkpoint, load_checkpoint, save_checkpoint, unique_tensors,
)
from qadpipe.errors import DistillError

from sync_events import record_syncs_and_renames


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def _state(step: int, model: torch.nn.Module) -> TrainerState:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return TrainerState(step=step, optimizer=opt.state_dict(), scheduler={"last_epoch": step},
                        loader={"epoch": 0, "position": 7 * step}, rng=capture_rng())


def test_round_trip_with_tied_weights(tmp_path: Path):
    model = Tied()
    tensors, aliases = unique_tensors(model.state_dict())
    assert aliases == {"head.weight": "embed.weight"}
    path = save_checkpoint(tmp_path, model.state_dict(), _state(5, model), load_config(None))
    assert latest_checkpoint(tmp_path) == path
    loaded, state = load_checkpoint(path)
    assert torch.equal(loaded["embed.weight"], model.embed.weight)
    assert state.step == 5 and state.loader == {"epoch": 0, "position": 35}
    assert torch.equal(state.rng["torch"], capture_rng()["torch"])


def test_a_checkpoints_run_record_keeps_its_cache_fingerprint_as_final_does(tmp_path: Path):
    """eval (and an export of step-N) read it to say whether the scored cache rows were unseen."""
    from qadpipe.distill.student import trained_cache_fingerprint

    model = Tied()
    state = _state(5, model)
    state.cache_fingerprint = "f" * 64
    path = save_checkpoint(tmp_path, model.state_dict(), state, load_config(None))
    assert trained_cache_fingerprint(path) == "f" * 64


def test_full_state_keeps_ties_when_offloading_copies_each_tensor(monkeypatch):
    """From a GPU, cpu_offload returns a separate CPU copy per entry (on a CPU it returns the
    tensors themselves, so the copy is simulated): the head must still alias the embedding."""
    from qadpipe.distill import distributed

    offload = distributed.get_model_state_dict
    monkeypatch.setattr(distributed, "get_model_state_dict",
                        lambda module, options: {k: v.clone() for k, v in offload(module, options=options).items()})
    for model in (Tied(), torch.nn.Sequential(Tied())):
        tensors, aliases = unique_tensors(distributed.full_model_state(model))
        assert list(aliases.values()) == [next(iter(tensors))] and len(tensors) == 1


def test_latest_is_the_commit_point_and_old_steps_are_pruned(tmp_path: Path):
    model = torch.nn.Linear(3, 3)
    config = load_config(None)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model.state_dict(), _state(step, model), config, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-00000002", "step-00000003"]
    # A writer killed mid-checkpoint leaves a temp dir: invisible, and cleaned by the next save.
    (root / ".step-00000004.abc").mkdir()
    (root / "step-00000004").mkdir()  # renamed but LATEST not yet replaced
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    save_checkpoint(tmp_path, model.state_dict(), _state(4, model), config, keep=2)
    assert latest_checkpoint(tmp_path).name == "step-00000004"
    assert not list(root.glob(".step-*"))


def test_without_latest_the_newest_complete_step_is_the_checkpoint(tmp_path: Path, caplog):
    """A lost LATEST (a kill right after the first step directory's rename, a hand-made copy)
    made --resume start from step 0 and write over the checkpoints there."""
    model = torch.nn.Linear(3, 3)
    for step in (1, 2):
        save_checkpoint(tmp_path, model.state_dict(), _state(step, model), load_config(None), keep=2)
    root = tmp_path / "checkpoints"
    (root / "LATEST").unlink()
    (root / "step-00000003").mkdir()                      # not a checkpoint: no trainer state
    (root / "step-00000003" / "model.safetensors").write_bytes(b"")
    with caplog.at_level("WARNING", logger="qadpipe.distill.checkpoint"):
        assert latest_checkpoint(tmp_path) == root / "step-00000002"
    assert "LATEST is missing; the newest complete checkpoint there is step-00000002" in caplog.text


def test_no_checkpoint_and_corrupt_checkpoint(tmp_path: Path):
    assert latest_checkpoint(tmp_path) is None
    model = torch.nn.Linear(3, 3)
    path = save_checkpoint(tmp_path, model.state_dict(), _state(1, model), load_config(None))
    (path / "trainer_state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DistillError, match=r"step-00000001: unreadable checkpoint"):
        load_checkpoint(path)
    (tmp_path / "checkpoints" / "LATEST").write_text("../../etc\n")
    with pytest.raises(DistillError, match=r"LATEST: expected a step directory name"):
        latest_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "LATEST").write_bytes(b"\xff\xfe")   # not text: was a UnicodeDecodeError
    with pytest.raises(DistillError, match=r"LATEST: expected a step directory name"):
        latest_checkpoint(tmp_path)



@pytest.mark.parametrize("lost", ["trainer_state.pt", "model.safetensors"])
def test_a_checkpoint_named_by_latest_that_lacks_a_file_is_refused_by_name(tmp_path: Path, lost: str):
    """A step directory damaged by hand (or a sync that dropped a file) would resume from a
    traceback deep in torch.load or safetensors, or not at all."""
    model = torch.nn.Linear(3, 3)
    path = save_checkpoint(tmp_path, model.state_dict(), _state(1, model), load_config(None))
    (path / lost).unlink()
    with pytest.raises(DistillError, match=rf"^{path}: checkpoint named by LATEST lacks {lost}$"):
        latest_checkpoint(tmp_path)


def test_pickled_code_is_refused(tmp_path: Path):
    model = torch.nn.Linear(3, 3)
    path = save_checkpoint(tmp_path, model.state_dict(), _state(1, model), load_config(None))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"step": 1, "optimizer": Evil()}, path / "trainer_state.pt")
    with pytest.raises(DistillError, match="unreadable checkpoint"):
        load_checkpoint(path)


def test_what_a_killed_run_left_mid_write_is_removed_and_nothing_else(tmp_path: Path):
    from qadpipe.distill.checkpoint import remove_stale_temps

    model = Tied()
    path = save_checkpoint(tmp_path, model.state_dict(), _state(1, model), load_config(None))
    stale = [tmp_path / "checkpoints" / ".LATEST.a1b2.tmp", tmp_path / ".metrics.jsonl.c3.tmp"]
    for file in stale:
        file.write_text("torn")
    staging = [tmp_path / ".final.x7", tmp_path / ".ptq.y8", tmp_path / "checkpoints" / ".step-00000002.z9"]
    for directory in staging:
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"half")
    kept = sorted(p for p in tmp_path.rglob("*") if not any(p == s or s in p.parents for s in stale + staging))
    remove_stale_temps(tmp_path)
    assert sorted(tmp_path.rglob("*")) == kept
    assert latest_checkpoint(tmp_path) == path


def _student_dir(parent: Path, value: float) -> Path:
    from qadpipe.distill.checkpoint import write_student_dir

    return write_student_dir(parent, "final", {"w": torch.full((2,), value)}, load_config(None), "")


def _weight(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))["w"]


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_a_failure_while_replacing_a_student_keeps_the_old_one(tmp_path: Path, monkeypatch, failure):
    """final/ is replaced by renames; a failure at the rename into place puts the old one back."""
    import os

    from qadpipe.distill import checkpoint

    _student_dir(tmp_path, 1.0)
    real = os.replace

    def interrupted(src, dst):
        if Path(dst).name == "final" and ".aside." not in str(src):   # the new one's rename
            raise failure()
        return real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", interrupted)
    with pytest.raises(failure):
        _student_dir(tmp_path, 2.0)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    assert torch.equal(_weight(tmp_path / "final"), torch.ones(2))
    _student_dir(tmp_path, 2.0)   # and replacing it works, leaving nothing aside
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    assert torch.equal(_weight(tmp_path / "final"), torch.full((2,), 2.0))


@pytest.mark.parametrize("replaced", [False, True], ids=["killed_between_renames", "killed_after"])
def test_a_student_a_kill_left_aside_is_put_back_unless_replaced(tmp_path: Path, replaced):
    from qadpipe.distill.checkpoint import remove_stale_temps

    old = _student_dir(tmp_path, 1.0)
    aside = tmp_path / ".final.aside.k1"
    aside.mkdir()
    old.rename(aside / "final")
    (tmp_path / "elsewhere").mkdir()
    new = _student_dir(tmp_path / "elsewhere", 2.0)
    new.rename(tmp_path / ("final" if replaced else ".final.n2"))   # in place, or still staged
    (tmp_path / "elsewhere").rmdir()
    remove_stale_temps(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    assert torch.equal(_weight(tmp_path / "final"), torch.full((2,), 2.0 if replaced else 1.0))


FULL_DISK_CHECKPOINT = """
import resource, signal, sys, torch
from pathlib import Path
from qadpipe.config import load_config
from qadpipe.distill import checkpoint as ckpt
from qadpipe.errors import DistillError
out, config = Path(sys.argv[1]), load_config(None)
state = lambda step, n: ckpt.TrainerState(step=step, optimizer={"exp_avg": torch.zeros(n)}, scheduler={},
                                          loader={"ranks": [{}]})
ckpt.save_checkpoint(out, {"w": torch.zeros(8)}, state(1, 8), config)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)            # the write then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 18, resource.RLIM_INFINITY))
try:
    ckpt.save_checkpoint(out, {"w": torch.ones(8)}, state(2, 1 << 18), config)   # 1 MiB of optimizer state
except DistillError as exc:
    print(exc)
"""


def test_optimizer_state_the_disk_refuses_is_one_distill_error(tmp_path: Path):
    """torch.save reports a refused write as RuntimeError ('unexpected pos'), which escaped the
    one-line 'cannot write the checkpoint' as a traceback."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", FULL_DISK_CHECKPOINT, str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("step-00000002: cannot write the checkpoint (File too large); "
                                       "LATEST still names the previous one"), run.stdout
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["LATEST", "step-00000001"]


def test_every_file_of_a_checkpoint_is_synced_before_its_rename_and_the_rename_before_latest(tmp_path: Path,
                                                                                             monkeypatch):
    """The rename and LATEST promise a whole checkpoint: after a power loss the step directory
    must not name truncated files, nor LATEST a step directory the rename did not make durable.
    Every file and directory staged is fsynced before the rename; checkpoints/ between it and
    LATEST's own rename."""
    events = record_syncs_and_renames(monkeypatch)
    model = Tied()
    path = save_checkpoint(tmp_path, model.state_dict(), _state(3, model), load_config(None))
    monkeypatch.undo()
    renames = {event[1].name: index for index, event in enumerate(events) if event[0] == "rename"}
    step, latest = renames[path.name], renames["LATEST"]
    staged = events[step][2]
    assert len(staged) >= 4   # the directory, the weights, the trainer state, the run record
    assert staged <= {event[1] for event in events[:step] if event[0] == "fsync"}
    assert path.parent.stat().st_ino in {event[1] for event in events[step:latest] if event[0] == "fsync"}
