"""Outputs carry the exact config and versions that made them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qadpipe.config import build_config, load_config
from qadpipe.provenance import RUN_FILE, json_field, save_run_record


def test_run_record_round_trips_to_the_same_config(tmp_path: Path):
    config = load_config("configs/demo.yaml", ["distill.lr=3e-5", "cache.k=16"])
    path = save_run_record(config, "distill", tmp_path / "out")
    assert path == tmp_path / "out" / RUN_FILE
    record = yaml.safe_load(path.read_text())
    assert record["stage"] == "distill"
    assert record["versions"]["torch"] and record["versions"]["qadpipe"]
    assert build_config(record["config"]) == config  # the saved config re-runs the same job
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_rewriting_replaces_whole_file(tmp_path: Path):
    config = load_config(None)
    save_run_record(config, "generate", tmp_path)
    save_run_record(load_config(None, ["cache.k=8"]), "generate", tmp_path)
    assert yaml.safe_load((tmp_path / RUN_FILE).read_text())["config"]["cache"]["k"] == 8


def test_atomic_write_syncs_each_directory_it_creates_in_its_parent(tmp_path, monkeypatch):
    """A power loss after the first commit into a new cache must not lose shards/ itself: the
    new directories' entries are fsynced too, not only the file's."""
    from qadpipe import provenance

    synced = []
    monkeypatch.setattr(provenance, "fsync_path", lambda directory: synced.append(Path(directory)))
    provenance.atomic_write_bytes(tmp_path / "cache" / "shards" / "a.parquet", b"x")
    assert synced == [tmp_path, tmp_path / "cache", tmp_path / "cache" / "shards"]
    assert (tmp_path / "cache" / "shards" / "a.parquet").read_bytes() == b"x"


def test_a_cache_whose_first_entry_is_its_task_lock_syncs_the_directories_the_lock_made(tmp_path, monkeypatch):
    """generate takes its task lock before the first write: the lock's mkdir made the cache root
    and manifests/, which the first atomic write then found existing and did not sync."""
    from qadpipe import provenance
    from qadpipe.errors import CacheError
    from qadpipe.file_lock import lock_for_one_run

    synced = []
    monkeypatch.setattr(provenance, "fsync_path", lambda directory: synced.append(Path(directory)))
    held = lock_for_one_run(tmp_path / "new" / "cache" / "manifests" / "task-00000.lock", where="cache.path",
                            error=CacheError, busy=str, unguarded="")
    assert synced == [tmp_path, tmp_path / "new", tmp_path / "new" / "cache"]
    held.release()


@pytest.mark.parametrize("content", [None, b"{not json", b"\xff\xfe{}", b"[1, 2]", b'{"key": 5}', b"{}"])
def test_json_field_is_none_for_a_record_it_cannot_use(tmp_path: Path, content):
    path = tmp_path / "record.json"
    if content is not None:
        path.write_bytes(content)
    assert json_field(path, "key", str) is None


def test_json_field_returns_a_value_of_the_asked_type(tmp_path: Path):
    path = tmp_path / "record.json"
    path.write_text('{"key": "value", "files": ["a", "b"]}')
    assert json_field(path, "key", str) == "value"
    assert json_field(path, "files", list) == ["a", "b"]
    assert json_field(path, "files", dict) is None


def test_a_run_from_a_checkout_records_its_commit():
    """__version__ stays 0.1.0 while the code changes: the record must name the commit."""
    import subprocess

    from qadpipe.provenance import package_versions

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert package_versions()["qadpipe_git"].startswith(head)


def _dir_with(path: Path, text: str) -> Path:
    path.mkdir()
    (path / "f.txt").write_text(text)
    return path


def test_replace_dir_swaps_a_directory_in_and_leaves_nothing_beside_it(tmp_path: Path):
    from qadpipe.provenance import replace_dir

    replace_dir(_dir_with(tmp_path / ".staged1", "one"), tmp_path / "out", ".out.aside.")
    replace_dir(_dir_with(tmp_path / ".staged2", "two"), tmp_path / "out", ".out.aside.")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "f.txt").read_text() == "two"


def test_replace_dir_failing_after_the_swap_puts_the_old_one_back(tmp_path: Path, monkeypatch):
    """The parent's fsync fails once the new directory is renamed in: the rename is not
    durable, so the old directory goes back and the caller's error means nothing changed."""
    from qadpipe import provenance

    _dir_with(tmp_path / "out", "old")
    real_fsync = provenance.fsync_path
    monkeypatch.setattr(provenance, "fsync_path",
                        lambda p: (_ for _ in ()).throw(OSError(5, "EIO")) if Path(p) == tmp_path else real_fsync(p))
    with pytest.raises(OSError):
        provenance.replace_dir(_dir_with(tmp_path / ".staged", "new"), tmp_path / "out", ".out.aside.")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "f.txt").read_text() == "old"


def test_replace_dir_keeps_the_old_copy_aside_when_putting_it_back_fails(tmp_path: Path, monkeypatch, caplog):
    """The rename in fails and so does the put-back: the old copy stays aside, named in the log,
    rather than being deleted with the aside directory (the only copy left)."""
    import os

    from qadpipe import provenance

    _dir_with(tmp_path / "out", "old")
    real_replace = os.replace

    def replace(src, dst):
        if ".staged" in str(src) or ".aside." in str(src):   # the rename in, then the put-back
            raise OSError(30, "Read-only file system")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Read-only"):
        provenance.replace_dir(_dir_with(tmp_path / ".staged", "new"), tmp_path / "out", ".out.aside.")
    monkeypatch.undo()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".out.aside.")]
    assert len(aside) == 1 and (aside[0] / "out" / "f.txt").read_text() == "old"
    assert f"the previous copy is kept at {aside[0] / 'out'}" in caplog.text


def test_sealing_a_staged_directory_syncs_every_entry_below_it_after_its_modes(tmp_path, monkeypatch):
    """A sharded checkpoint's files lie in subdirectories: syncing only the staged directory's
    own entries left them (and the modes share_tree gives them) to the page cache when the
    rename made the checkpoint look whole.  Links are not followed."""
    import os
    import stat

    from qadpipe import provenance
    from qadpipe.file_modes import new_entry_modes

    staged = tmp_path / "staged"
    (staged / "shards" / "model").mkdir(parents=True)
    (staged / "a.safetensors").write_bytes(b"a")
    (staged / "shards" / "model" / "0.distcp").write_bytes(b"b")
    (tmp_path / "elsewhere").write_bytes(b"not ours")
    os.symlink(tmp_path / "elsewhere", staged / "link")
    (staged / "shards" / "model" / "0.distcp").chmod(0o600)
    synced = []

    def fsync(path):   # the mode a synced entry has must be its final one
        synced.append((Path(path), stat.S_IMODE(Path(path).stat().st_mode)))

    monkeypatch.setattr(provenance, "fsync_path", fsync)
    file_mode, dir_mode = new_entry_modes(tmp_path)
    provenance.seal_tree(staged)
    assert sorted(synced) == sorted([(staged, dir_mode), (staged / "a.safetensors", file_mode),
                                     (staged / "shards", dir_mode), (staged / "shards" / "model", dir_mode),
                                     (staged / "shards" / "model" / "0.distcp", file_mode)])
    assert synced[-1][0] == staged   # the directory itself last: its entries' inodes are durable first
