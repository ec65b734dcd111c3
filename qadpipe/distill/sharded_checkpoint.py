"""Sharded checkpoints (``distill.checkpoint_format: sharded``): every rank writes its own
shards of the student and of AdamW's state, and nothing is gathered on rank 0.

Why: a full checkpoint gathers 12 bytes per trained parameter into rank 0's host memory, and
rank 0 alone writes them: ~850 GB for a 70B student, past many hosts' memory, and 10+ minutes
at 1-2 GB/s.  Sharded, each of N ranks writes its 1/N, in parallel, straight from its shards.

A sharded step directory holds two torch.distributed.checkpoint ("DCP") directories beside the
files a full one has::

    step-00000050/model/       .metadata + one __<rank>_0.distcp per rank: the student's state
                               dict (weights and quantizer state), under the trainer's names
    step-00000050/optimizer/   the same for AdamW's state (per-parameter tensors, param groups)
    step-00000050/trainer_state.pt, qadpipe_run.yaml   as in a full checkpoint (optimizer: {})

Reading reshards (DCP's planner): a checkpoint written by N ranks loads on M, under FSDP2, DDP
or in one process, and ``qadpipe export``/``eval`` read the student from it in one process.

DCP's own reader unpickles ``.metadata`` with ``pickle.load`` and its non-tensor entries with
``torch.load(weights_only=False)``: a crafted checkpoint would run code.  Here ``.metadata`` is
read by an unpickler that builds DCP's metadata classes, torch sizes and dtypes and paths only,
and the entries with ``weights_only=True`` alone, as ``trainer_state.pt`` is read.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, set_element   # the setter it uses
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.staging import BlockingAsyncStager

from qadpipe.errors import DistillError, first_line

#: The DCP directories of a sharded step directory.
MODEL_SHARDS = "model"
OPTIMIZER_SHARDS = "optimizer"
_METADATA = ".metadata"


def is_sharded(path: Path) -> bool:
    """Whether the step (or student) directory ``path`` holds its student as DCP shards."""
    return (Path(path) / MODEL_SHARDS / _METADATA).is_file()


def missing_shards(path: Path) -> str | None:
    """What a sharded step directory lacks of its shards (None: both are there)."""
    return next((f"{name}/{_METADATA}" for name in (MODEL_SHARDS, OPTIMIZER_SHARDS)
                 if not (Path(path) / name / _METADATA).is_file()), None)


def save_shards(directory: Path, model_state: dict[str, Any], optimizer_state: dict[str, Any],
                process_group: Optional[Any] = None) -> None:
    """Every rank writes its shards of ``model_state`` and ``optimizer_state`` (as
    ``get_model_state_dict`` / ``get_optimizer_state_dict`` return them) under ``directory``,
    each file fsync'd.  Collective over ``process_group``: DCP exchanges only plans and results
    there, and the ranks done first wait in it for the slowest writer, so the trainer passes
    its long-timeout gloo group (a slow shared filesystem must not trip NCCL's watchdog).  A
    failed write on any rank raises on every rank (DCP gathers the ranks' results)."""
    for name, state in ((MODEL_SHARDS, model_state), (OPTIMIZER_SHARDS, optimizer_state)):
        try:
            with _alone_said_once():
                dcp.save(state, storage_writer=FileSystemWriter(Path(directory) / name, sync_files=True),
                         process_group=process_group)
        except (Exception, CheckpointException) as exc:   # CheckpointException (a BaseException): every rank's
            raise DistillError(f"{Path(directory) / name}: cannot write the shards ({_failure(exc)})") from None


def staged_on_host(state: dict[str, Any]) -> dict[str, Any]:
    """A host copy of ``state`` (as :func:`save_shards` takes it: this rank's shards, FSDP2's
    DTensors kept DTensors) for a write that overlaps the next steps, which update the
    originals in place.  DCP's own stager (what its ``async_save`` stages with); DCP's
    ``async_save`` itself is not used: it would run the model's and the optimizer's writes on
    two threads at once, and their collectives on one group would interleave."""
    return BlockingAsyncStager().stage(state)


def load_shards(directory: Path, name: str, state: dict[str, Any], process_group: Optional[Any] = None) -> None:
    """Fill ``state`` (a state dict of this run's model or optimizer, sharded or whole) in place
    from the DCP directory ``name`` of ``directory``, resharded to this run's layout.  Every rank
    of ``process_group`` must call when a process group is up (see :func:`save_shards`); alone,
    the one process reads every rank's shards."""
    path = Path(directory) / name
    _SafeReader(path).read_metadata()   # refused here in one line, not wrapped in DCP's per-rank report
    try:
        with _alone_said_once():
            dcp.load(state, storage_reader=_SafeReader(path), planner=_SafeLoadPlanner(),
                     process_group=process_group)
    except (Exception, CheckpointException) as exc:   # CheckpointException (a BaseException): every rank's
        raise DistillError(f"{path}: unreadable sharded checkpoint ({_failure(exc)})") from None


def _failure(exc: BaseException) -> str:
    """One line for a DCP failure: the first failing rank's own error, not DCP's report of
    every rank's traceback."""
    if isinstance(exc, CheckpointException) and exc.failures:
        rank, (inner, _) = next(iter(sorted(exc.failures.items(), key=lambda item: item[0])))
        return f"rank {rank}: {type(inner).__name__}: {first_line(inner)}"
    return f"{type(exc).__name__}: {first_line(exc)}"


@contextlib.contextmanager
def _alone_said_once() -> Iterator[None]:
    """Without a process group DCP reads and writes as one process (what qadpipe means there:
    a single-process run, export, eval), and warns so at every call; the warning is dropped.
    (Not touched with a process group up: ``catch_warnings`` swaps the process's filters, and
    the ranks' shard writes run beside the training thread.)"""
    if dist.is_initialized():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class _MetadataUnpickler(pickle.Unpickler):
    """Builds what DCP's ``.metadata`` holds and nothing else."""

    _DCP = {"torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"}
    _PATHS = {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}

    def find_class(self, module: str, name: str) -> Any:
        if module in self._DCP or (module, name) == ("torch.serialization", "_get_layout"):
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module or name == "_get_layout":
                return found
        if module in ("pathlib", "pathlib._local") and name in self._PATHS:   # Python 3.13 writes the latter
            return getattr(pathlib, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


class _SafeReader(FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / _METADATA
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except Exception as exc:   # unpickling garbage raises anything from EOFError to UnicodeDecodeError
            raise DistillError(f"{path}: not a sharded checkpoint's metadata ({type(exc).__name__}: {exc})") from None
        if not isinstance(metadata, Metadata):
            raise DistillError(f"{path}: not a sharded checkpoint's metadata (a {type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor entries (the optimizer's hyperparameters) read as ``trainer_state.pt`` is
    (``weights_only``: plain values and tensors), where DCP's planner unpickles them whole; the
    value is then stored as DCP's planner stores it."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:   # its message is a page of advice; the global it refused is the news
            refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
            raise pickle.UnpicklingError(f"entry {read_item.dest_index.fqn} would unpickle "
                                         f"{refused.group(1) if refused else 'an object'}, not a tensor or plain "
                                         "value") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
