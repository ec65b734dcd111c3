"""Checkpoints written on a thread while every rank trains on: a full one by rank 0, a
sharded one by every rank (its own shards, staged on the host first).

Why: a checkpoint's cost is mostly the disk, not the gather.  An 8B student's (fp32 weights
and AdamW's two moments, ~100 GB) reaches rank 0's host memory in seconds, then takes one to
two minutes to write at 1-2 GB/s, and with a synchronous save every GPU of the job waits for
that write.  Here the training loop waits only for the snapshot; the write overlaps the next
steps.  The checkpoint's commit point is unchanged (``LATEST``, replaced once the step
directory is whole), so a kill mid-write leaves the previous checkpoint, as before.

Rules that keep it exact:

* The snapshot is the step's state: every tensor in it that shares memory with the live
  model or optimizer (a world of one on CPU returns its parameters themselves; AdamW keeps its
  ``step`` counters on the host even on a GPU) is copied first, since the optimizer updates
  those in place during the write (:func:`detached_snapshot`).  A sharded checkpoint's
  snapshot is a host copy of all of the rank's shards
  (:func:`qadpipe.distill.sharded_checkpoint.staged_on_host`).
* One write at a time: the next save, a stop signal, the last step and ``final/`` first wait
  for the write under way (:meth:`BackgroundWriter.finish`), so host memory holds at most one
  snapshot -- what a synchronous full save holds while it writes.  (A synchronous sharded save
  holds none: DCP copies the shards out of GPU memory as it writes them.)
* The ranks' shard writes exchange DCP's plans and results on a gloo group of their own
  (:func:`qadpipe.distill.distributed.writer_group`), never on one the training threads use.
* A failed write (a full disk) stops the run at the end of the step during which it is seen
  (every rank: see ``DistillRecipe._stop_requested``), raised on every rank naming the
  checkpoint, and ``LATEST`` still names the previous one.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterable, Optional

import torch

from qadpipe.distill.distributed import control_group, raise_if_any_failed
from qadpipe.errors import first_line

log = logging.getLogger(__name__)


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor   # FSDP2's DTensors: this rank's shard
    return str(local.device), local.untyped_storage().data_ptr()


def detached_snapshot(state: Any, live: Iterable[torch.Tensor]) -> Any:
    """``state`` (nested dicts/lists of tensors and plain values) with every tensor that shares
    storage with one of ``live`` replaced by a copy; tensors that were already copies (the GPU's
    state offloaded to the host) are kept as they are.  Tensors that alias each other (tied
    embeddings) still alias each other's copy, so the checkpoint stores them once."""
    live_storages = {_storage_key(tensor) for tensor in live}
    copies: dict[tuple[Any, ...], torch.Tensor] = {}

    def visit(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            storage = _storage_key(value)
            if storage not in live_storages:
                return value
            key = (*storage, value.storage_offset(), tuple(value.shape), value.stride())
            if key not in copies:
                copies[key] = value.detach().clone()
            return copies[key]
        if isinstance(value, dict):
            return {name: visit(item) for name, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(visit(item) for item in value)
        return value

    return visit(state)


def live_tensors(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """What training updates in place: parameters, buffers and the optimizer's state."""
    tensors = [*module.parameters(), *module.buffers()]
    for per_param in optimizer.state.values():
        tensors.extend(value for value in per_param.values() if isinstance(value, torch.Tensor))
    return tensors


class BackgroundWriter:
    """Runs checkpoint writes one at a time on a thread: rank 0's (a full checkpoint) or every
    rank's (its shards).  :meth:`start` and :meth:`finish` are collective (every rank calls
    them at the same steps)."""

    def __init__(self, is_main: bool) -> None:
        self.is_main = is_main
        self._thread: Optional[threading.Thread] = None
        self._written = threading.Event()   # the write under way has ended (see _join)
        self._failure: Optional[BaseException] = None
        self._pending = False   # every rank: a write was started and not yet finished
        self._label = ""

    def start(self, write: Callable[[], Any], label: str, every_rank: bool = False) -> None:
        """Begin ``write()`` on rank 0, or on ``every_rank`` (after :meth:`finish` of any earlier one)."""
        if self._pending:
            raise RuntimeError("BackgroundWriter.start: the previous write was not finished")
        self._pending, self._label = True, label
        control_group()   # connected now, by every rank: made in finish(), it would wait for rank 0's write
        if self.is_main or every_rank:
            self._failure = None
            self._written.clear()
            # not a daemon: an interpreter exiting on an error elsewhere still completes the write
            self._thread = threading.Thread(target=self._run, args=(write,), name="qadpipe-checkpoint-writer")
            self._thread.start()

    def _run(self, write: Callable[[], Any]) -> None:
        started = time.perf_counter()
        try:
            write()
        except BaseException as exc:   # re-raised on the training thread, see finish()
            log.error("%s was not written: %s", self._label, first_line(exc))
            self._failure = exc
            return
        finally:
            self._written.set()
        log.info("%s written in the background in %.1f s", self._label, time.perf_counter() - started)

    def finish(self) -> None:
        """Wait for the write under way; a failure raises on every rank."""
        if not self._pending:
            return
        self._pending = False
        raise_if_any_failed(self._join())

    @property
    def failed(self) -> bool:
        """Whether this rank's write under way has failed (seen by the training loop at its
        next step: the stop it makes raises the failure through :meth:`finish`)."""
        return self._failure is not None

    @property
    def unconfirmed(self) -> Optional[str]:
        """On a rank other than 0, the write rank 0 may still be making or committing (its
        label): this rank cannot wait for it, so the checkpoint directory it sees may not show
        it yet."""
        return self._label if self._pending and not self.is_main else None

    def wait(self) -> None:
        """Let this rank's write under way end, on this rank alone (no collective: for a run
        stopping on an error, which may be this rank's only); a failure was logged."""
        self._join()

    def _join(self) -> Optional[BaseException]:
        if self._thread is not None:
            if not self._written.is_set():
                log.info("waiting for %s to be written", self._label)
            # Not Thread.join alone: on CPython 3.11-3.12 a Ctrl-C interrupting join() marks the
            # running thread stopped, so a later wait (cleanup's) and interpreter exit no longer
            # wait for it and the write dies half done.  An interrupted Event.wait leaves no trace.
            while not self._written.wait(0.5):
                pass
            self._thread.join()
            self._thread = None
        failure, self._failure = self._failure, None
        return failure
