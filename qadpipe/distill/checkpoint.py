"""Training checkpoints that survive kills: a whole step directory or nothing.

Layout under ``<output_dir>/checkpoints``::

    step-00000050/model.safetensors     student weights + quantizer parameters
    step-00000050/trainer_state.pt      optimizer, scheduler, step, RNG, loader position
    step-00000050/qadpipe_run.yaml      config + versions
    LATEST                              name of the newest complete step directory

With ``distill.checkpoint_format: sharded`` the student and the optimizer state are instead
``model/`` and ``optimizer/``, each rank's shards written by that rank (see
:mod:`qadpipe.distill.sharded_checkpoint`), and ``trainer_state.pt`` holds the rest.

A step directory is written under a temp name, fsync'd and renamed; ``LATEST`` is then
replaced atomically — it is the commit point, so a kill at any moment leaves the previous
checkpoint intact and loadable.  ``trainer_state.pt`` is read with ``weights_only=True``:
loading a checkpoint never unpickles arbitrary objects.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file

from qadpipe.distill.sharded_checkpoint import MODEL_SHARDS, missing_shards
from qadpipe.errors import DistillError
from qadpipe.provenance import atomic_write_text, fsync_path, replace_dir, save_run_record, seal_tree
from qadpipe.tensor_files import save_tensors, save_torch

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "LATEST"
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"


@dataclass
class TrainerState:
    """Everything besides weights that an exact resume needs."""

    step: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    loader: dict[str, Any]
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    cache_fingerprint: str = ""  # CacheView.fingerprint of the cache trained on ("" without one)
    # every rank's sums over the log interval under way, so the first row logged after a
    # resume averages the same steps an uninterrupted run's does
    log_window: dict[str, Any] = field(default_factory=dict)


def capture_rng() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def unique_tensors(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop aliases of shared storage (tied embeddings), which safetensors refuses to save:
    returns the unique tensors and ``{alias: kept_name}``."""
    kept: dict[tuple[int, int, tuple[int, ...]], str] = {}
    unique, aliases = {}, {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in kept:
            aliases[name] = kept[key]
            continue
        kept[key] = name
        unique[name] = tensor.detach().contiguous().cpu()
    return unique, aliases


def write_student_dir(parent: Path, name: str, model_state: dict[str, torch.Tensor], config: Any,
                      cache_fingerprint: str, facts: Optional[dict[str, Any]] = None) -> Path:
    """Write ``<parent>/<name>/`` whole or not at all: the student's tensors (tied aliases
    dropped, listed in the metadata) and the run record.  The ``final/`` and ``ptq/``
    students and full checkpoints share the layout, so all three are read back the same way."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=parent))
    return _commit_dir(tmp, name, config, cache_fingerprint, lambda: _save_student_tensors(tmp, model_state), facts)


def _save_student_tensors(directory: Path, model_state: dict[str, torch.Tensor]) -> None:
    tensors, aliases = unique_tensors(model_state)
    save_tensors(tensors, directory / MODEL_FILE, {"aliases": repr(sorted(aliases.items()))})


def _commit_dir(tmp: Path, name: str, config: Any, cache_fingerprint: str, write: Callable[[], None],
                facts: Optional[dict[str, Any]]) -> Path:
    """``write()`` into the temp dir ``tmp`` and add the run record; then fsync it all and rename
    ``tmp`` to ``<tmp's parent>/<name>``.  ``tmp`` is removed on any failure.

    An older ``<name>`` (``final/`` of an earlier run, a step re-run after a crash between its
    rename and ``LATEST``) is replaced by :func:`~qadpipe.provenance.replace_dir`: a failure
    puts it back, and a kill between the renames leaves it aside for
    :func:`remove_stale_temps` to put back -- never neither copy."""
    final = tmp.parent / name
    try:
        write()
        save_run_record(config, "distill", tmp, cache_fingerprint=cache_fingerprint, **(facts or {}))
        seal_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final, f".{name}{_ASIDE}")
    return final


def save_checkpoint(output_dir: Path, model_state: dict[str, torch.Tensor], state: TrainerState,
                    config: Any, keep: int = 2, **facts: Any) -> Path:
    """Write step ``state.step`` (a full checkpoint) and make it the latest; keep the newest
    ``keep`` steps.  ``facts`` go into its run record (a resumed run's history)."""
    tmp = staged_step_dir(output_dir, state.step)

    def write() -> None:
        _save_student_tensors(tmp, model_state)
        save_torch(state.__dict__, tmp / STATE_FILE)

    return _commit_checkpoint(tmp, state, config, keep, write, facts)


def staged_step_dir(output_dir: Path, step: int) -> Path:
    """A new temp directory for step ``step``'s checkpoint (rank 0 makes it; in a sharded
    checkpoint every rank then writes its shards into it, see :func:`commit_sharded_checkpoint`)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".step-{step:08d}.", dir=root))


def commit_sharded_checkpoint(staged: Path, state: TrainerState, config: Any, keep: int = 2, **facts: Any) -> Path:
    """Rank 0, once every rank's shards are in ``staged`` (:func:`staged_step_dir`): add the
    trainer state (``state.optimizer`` empty: the shards hold it) and the run record, rename it
    into place and make it the latest, as :func:`save_checkpoint` does."""
    return _commit_checkpoint(staged, state, config, keep, lambda: save_torch(state.__dict__, staged / STATE_FILE),
                              facts)


def _commit_checkpoint(tmp: Path, state: TrainerState, config: Any, keep: int, write: Callable[[], None],
                       facts: dict[str, Any]) -> Path:
    root, name = tmp.parent, f"step-{state.step:08d}"
    try:
        final = _commit_dir(tmp, name, config, state.cache_fingerprint, write, facts)
    except OSError as exc:  # a full disk mid-checkpoint: the previous LATEST stays the commit point
        raise DistillError(f"{root / name}: cannot write the checkpoint ({exc.strerror or exc}); "
                           f"{LATEST} still names the previous one") from exc
    atomic_write_text(root / LATEST, name + "\n")
    _prune(root, keep)
    return final


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The committed checkpoint directory named by ``LATEST``, or None when there is none.

    Without ``LATEST`` (a kill between the first step directory's rename and its pointer, or
    a hand-made copy), the newest complete ``step-N`` directory: each is renamed into place
    whole, so it is a checkpoint -- starting from step 0 would write over it."""
    root = Path(output_dir) / CHECKPOINT_DIR
    pointer = root / LATEST
    if not pointer.is_file():
        steps = sorted(path for path in root.glob("step-*") if not _missing_file(path))
        if steps:
            log.warning("%s is missing; the newest complete checkpoint there is %s", pointer, steps[-1].name)
        return steps[-1] if steps else None
    name = pointer.read_text(errors="replace").strip()   # not text: refused as any other bad name
    if not name.startswith("step-") or "/" in name or name in (".", ".."):
        raise DistillError(f"{pointer}: expected a step directory name, got {name!r}")
    path = root / name
    missing = _missing_file(path)
    if missing:
        raise DistillError(f"{path}: checkpoint named by LATEST lacks {missing}")
    return path


def _missing_file(path: Path) -> str | None:
    """The first file a checkpoint needs that ``path`` lacks (None: it has them all): the
    trainer state, and the student whole or as shards."""
    if not (path / STATE_FILE).is_file():
        return STATE_FILE
    if (path / MODEL_SHARDS).is_dir():
        return missing_shards(path)
    return None if (path / MODEL_FILE).is_file() else MODEL_FILE


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], TrainerState]:
    """Model tensors and trainer state of one checkpoint directory (no pickle execution)."""
    return load_checkpoint_weights(path), load_trainer_state(path)


def load_checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's student tensors (in a sharded build rank 0 alone reads them: the other
    ranks receive their shards from it)."""
    try:
        return load_file(str(path / MODEL_FILE))
    except Exception as exc:  # safetensors' errors carry no file name
        raise DistillError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None


def load_trainer_state(path: Path) -> TrainerState:
    """A checkpoint's trainer state (every rank's), unpickling nothing but tensors and plain values."""
    try:
        # mmap: the ranks of a node share the file's pages instead of each holding its own copy
        # of the full optimizer state (twice the fp32 weights: ~64 GB per rank for an 8B student)
        raw = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # unpickler errors carry no file name
        raise DistillError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    try:
        return TrainerState(**raw)
    except TypeError as exc:
        raise DistillError(f"{path / STATE_FILE}: unexpected trainer state layout ({exc})") from None


#: In the name of the directory an older ``final/``, ``ptq/`` or step is moved aside to while its
#: replacement is renamed into place.
_ASIDE = ".aside."


def _put_back(aside: Path, directory: Path) -> None:
    for moved in aside.iterdir():
        if moved.is_dir() and not (directory / moved.name).exists():
            os.replace(moved, directory / moved.name)
            fsync_path(directory)
            log.warning("%s: put back %s, moved aside by a run killed while replacing it",
                        directory, moved.name)


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    remove_stale_temps(root.parent)


def remove_stale_temps(output_dir: Path) -> None:
    """Delete what a killed run left mid-write in ``output_dir``: checkpoint and student
    staging dirs (``.step-*``, ``.final.*``, ``.ptq.*``) and atomic-write temps (``.*.tmp``,
    e.g. ``checkpoints/.LATEST.*.tmp``).  One run writes a distill output dir at a time.

    A directory a kill left moved aside (see :func:`_commit_dir`) goes back to its name when
    nothing took its place, and is deleted only when its replacement is there."""
    output_dir = Path(output_dir)
    for directory in (output_dir, output_dir / CHECKPOINT_DIR):
        if not directory.is_dir():
            continue
        for stale in directory.glob(".*"):
            if stale.is_dir() and stale.name.startswith((".step-", ".final.", ".ptq.")):
                if _ASIDE in stale.name:
                    _put_back(stale, directory)
                shutil.rmtree(stale, ignore_errors=True)
            elif stale.is_file() and stale.name.endswith(".tmp"):
                stale.unlink(missing_ok=True)
