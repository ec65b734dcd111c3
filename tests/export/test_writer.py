"""Export directories: staged and renamed whole, never half-written, never over user data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qadpipe.errors import ExportError
from qadpipe.export.writer import EXPORT_INFO, read_config, staged_dir, write_safetensors
from qadpipe.provenance import RUN_FILE

from sync_events import record_syncs_and_renames


def _previous_export(tmp_path):
    """An earlier, complete export holding old.txt (and, as every export, the list of its files)."""
    out = tmp_path / "export"
    with staged_dir(out) as tmp:
        (tmp / "old.txt").write_text("old")
        (tmp / RUN_FILE).write_text("stage: export\n")
        (tmp / EXPORT_INFO).write_text(json.dumps({"files": ["old.txt", RUN_FILE, EXPORT_INFO]}))
    return out


def test_output_appears_only_when_complete(tmp_path):
    out = tmp_path / "export"
    with staged_dir(out) as tmp:
        (tmp / "a.txt").write_text("x")
        assert not out.exists() and tmp.parent == tmp_path
    assert (out / "a.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_an_output_named_dot_is_the_current_directory(tmp_path, monkeypatch):
    """Was always refused after the whole export was built: Path(".").parent is ".", so the
    staging dir went inside the output and the final rename failed."""
    out = tmp_path / "export"
    out.mkdir()
    monkeypatch.chdir(out)
    with staged_dir(Path(".")) as tmp:
        (tmp / "a.txt").write_text("x")
        assert tmp.parent == tmp_path
    assert (out / "a.txt").read_text() == "x"


def test_an_output_that_is_a_symlink_replaces_its_target_and_stays_a_link(tmp_path):
    """A link to an export elsewhere (another filesystem, say) was replaced by a new directory
    staged beside the link, leaving the old export at the target."""
    target = _previous_export(tmp_path)
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "current"
    link.symlink_to(target)
    with staged_dir(link) as tmp:
        (tmp / "new.txt").write_text("new")
        assert tmp.parent == tmp_path
    assert link.is_symlink() and link.resolve() == target
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_a_failure_leaves_the_previous_export_untouched(tmp_path):
    out = _previous_export(tmp_path)
    with pytest.raises(RuntimeError, match="killed"):
        with staged_dir(out) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in out.iterdir()) == sorted(["old.txt", RUN_FILE, EXPORT_INFO])
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_a_previous_export_is_replaced_whole(tmp_path):
    out = _previous_export(tmp_path)
    with staged_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_staging_dirs_of_killed_exports_are_removed_once_a_new_export_is_in_place(tmp_path):
    host = socket.gethostname()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)           # a pid that has exited: a SIGKILLed export's
    stale = [f".tmp-export-{host}-{dead}-ab12cd_x", f".old-export-{host}-{dead}-zz9"]
    kept = [f".tmp-export-{host}-{os.getpid()}-live0001",      # a live export on this host
            f".tmp-export-node-7-{dead}-remote01",             # another node of a shared FS
            ".tmp-export-legacy99", ".tmp-other-" + f"{host}-{dead}-x1"]  # no owner tag / other output
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half")
    with staged_dir(tmp_path / "export") as tmp:
        (tmp / "a.txt").write_text("x")
        assert tmp.name.startswith(f".tmp-export-{host}-{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", *kept])


@pytest.mark.parametrize("content, said", [("notes.txt", r"that is not a qadpipe export \(it holds notes.txt\)"),
                                           (RUN_FILE, "holding the output of qadpipe distill, not an export")])
def test_refuses_a_directory_that_is_not_an_export(tmp_path, content, said):
    out = tmp_path / "mine"
    out.mkdir()
    (out / content).write_text("stage: distill\n")
    with pytest.raises(ExportError, match=said):
        with staged_dir(out):
            pytest.fail("must refuse before staging")
    assert [p.name for p in out.iterdir()] == [content]


def test_shards_past_the_limit_with_an_index(tmp_path):
    tensors = {f"layer{i}.weight": torch.full((4, 4), float(i)) for i in range(5)}  # 64 bytes each
    paths = write_safetensors(tensors, tmp_path, max_shard_bytes=150)
    assert [p.name for p in paths] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 64
    loaded = {}
    for path in paths:
        part = load_file(str(path))
        assert all(index["weight_map"][name] == path.name for name in part)
        loaded.update(part)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items()) and loaded.keys() == tensors.keys()


def test_a_failed_swap_puts_the_previous_export_back(tmp_path, monkeypatch):
    import os

    out = _previous_export(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if str(src).startswith(str(tmp_path / ".tmp-")):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(ExportError, match="writing failed, nothing was changed"):
        with staged_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == sorted(["old.txt", RUN_FILE, EXPORT_INFO])
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


@pytest.mark.parametrize("previous", [True, False], ids=["replacing", "new"])
def test_a_directory_sync_failing_after_the_swap_changes_nothing(tmp_path, monkeypatch, previous):
    """The new export was in place when the parent's fsync failed: the previous one was
    deleted, and the error said nothing had changed."""
    from qadpipe import provenance

    out = _previous_export(tmp_path) if previous else tmp_path / "export"
    real_fsync = provenance.fsync_path

    def fsync(path):
        if Path(path) == tmp_path:
            raise OSError(5, "Input/output error")
        return real_fsync(path)

    monkeypatch.setattr(provenance, "fsync_path", fsync)
    with pytest.raises(ExportError, match="writing failed, nothing was changed"):
        with staged_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
    if previous:
        assert sorted(p.name for p in out.iterdir()) == sorted(["old.txt", RUN_FILE, EXPORT_INFO])
    assert [p.name for p in tmp_path.iterdir()] == (["export"] if previous else [])


FULL_DISK_EXPORT = """
import resource, signal, sys, torch
from pathlib import Path
from qadpipe.errors import ExportError
from qadpipe.export.writer import staged_dir, write_safetensors
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)            # the write then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    with staged_dir(Path(sys.argv[1])) as tmp:
        write_safetensors({"w": torch.zeros(1 << 19)}, tmp)   # 2 MiB: past the limit
except ExportError as exc:
    print(exc)
"""


def test_a_weights_file_the_disk_refuses_is_one_export_error(tmp_path):
    """safetensors raises SafetensorError, not OSError, for a write the OS refuses: it escaped
    the one-line ExportError as a traceback."""
    run = subprocess.run([sys.executable, "-c", FULL_DISK_EXPORT, str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().endswith("writing failed, nothing was changed (File too large)")
    assert list(tmp_path.iterdir()) == []                  # the staged directory is gone too


@pytest.mark.parametrize("record", ['{"files": [["x"]]}', '{"files": [1, 2]}', '["files"]'])
def test_a_malformed_file_list_of_a_previous_export_is_refused_in_one_line(tmp_path, record):
    """A list entry that is not a name was a TypeError traceback (unhashable list)."""
    out = _previous_export(tmp_path)
    (out / EXPORT_INFO).write_text(record)
    with pytest.raises(ExportError, match=f"{EXPORT_INFO}, the previous export's list of the files it wrote, is "
                                          "missing or unreadable"):
        with staged_dir(out):
            pass
    assert (out / "old.txt").read_text() == "old"


@pytest.mark.parametrize("content", [b"[1, 2]", b"\xff\xfe{}", b"{broken"])
def test_a_source_config_that_is_not_a_json_object_is_refused_in_one_line(tmp_path: Path, content):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ExportError, match=r"config\.json: .*") as info:
        read_config(tmp_path)
    assert "\n" not in str(info.value)


def test_every_staged_file_is_synced_before_the_export_is_renamed_into_place(tmp_path, monkeypatch):
    """vLLM or the next job may load an export right after a power loss: the rename must not
    publish a name over files (a subdirectory's too) still in the page cache."""
    out = tmp_path / "export"
    events = record_syncs_and_renames(monkeypatch)
    with staged_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "extra").mkdir()
        (tmp / "extra" / "tokenizer.json").write_text("{}")
    monkeypatch.undo()
    index = next(i for i, event in enumerate(events) if event[0] == "rename" and event[1] == out)
    assert len(events[index][2]) == 4
    assert events[index][2] <= {event[1] for event in events[:index] if event[0] == "fsync"}
    assert tmp_path.stat().st_ino in {event[1] for event in events[index:] if event[0] == "fsync"}
