"""Cache rows -> shuffled micro-batches, deterministic, rank-split and resumable.

The order of rows is a pure function of (seed, epoch, rank): rows stream from the cache
reader through a fixed-size shuffle buffer driven by a seeded generator.  Resuming after a
kill therefore needs only ``(epoch, batches_done)``: the loader replays the same order and
skips what was already trained.  The order is drawn on row indices (the same draws a buffer
of rows takes), so the rows trained before the checkpoint are known before any is read, and
the reader does not decode them: a requeued job a million rows into its epoch used to decode
them all again (~3 ms a row at k=128), its GPU idle.

The first ``holdout_rows`` rows of the cache (in reader order, identical on every rank)
are never trained on: they are the held-out split for periodic evaluation.  The rows after
them are split into contiguous, near-equal ranges, one per rank (holding out from one rank's
range would starve that rank).  Ranges differ by at most one row, and every rank draws one
micro-batch per step, so a rank with n rows where another has n + 1 sees its rows (n + 1) / n
as often -- 1e-3 at a thousand rows a rank -- and the ranks' epoch counters drift apart.

A resume on another number of ranks (a requeued job given fewer nodes), or with another
micro-batch size (a run that ran out of memory), cannot continue each rank's own order.  Its
ranks first share out the *remainder*: what the saved ranks had left to train up to the end
of the furthest epoch any of them had reached -- the rest of each one's epoch, and whole
epochs of its range for a rank that epoch drift left behind -- recomputed from the saved
positions (each saved order is a pure function of seed, epoch, rank and the rank split; a
position counts batches of the saved size).  The remainder is sorted, split into contiguous
near-equal parts and each part shuffled anew (a row left twice, by a rank an epoch behind,
comes twice); then every rank starts the next epoch on its new range.  So by the end of that
epoch every row is trained as often as in an uninterrupted run, in another order.

With ``prefetch > 0`` a background thread reads, shuffles and collates that many
micro-batches ahead (pinning them for an asynchronous copy to the GPU), so the training
loop does not wait on Parquet decoding and collation between steps.  The position the
loader reports is always that of the batches *handed out*, never of those read ahead, so a
checkpoint resumes at the next batch the loop has not seen.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable, Generator, Iterator, Optional, Protocol, Sequence

import numpy as np
import torch

from qadpipe.errors import DistillError
from qadpipe.targets import SequenceTargets

log = logging.getLogger(__name__)

#: How rows are assigned to ranks (saved with a loader position, so a resume can tell).
ROW_SPLIT = "contiguous-after-holdout"


class SequenceSource(Protocol):
    """What the loader needs from a cache reader."""

    num_rows: int

    def iter_rows(self, start: int, end: int,
                  needed: Optional[Callable[[int, int], bool]] = None) -> Iterator[Optional[SequenceTargets]]:
        """Rows ``[start, end)`` in reader order; rows in a stretch ``[lo, hi)`` for which
        ``needed(lo, hi)`` is False may come as None (not decoded)."""
        ...


@dataclass
class LoaderPosition:
    epoch: int = 0
    batches_done: int = 0
    #: Set while this rank trains its part of the remainder, up to the end of ``epoch``, that
    #: ranks of another number or batch size left (see the module docstring): ``{"world_size":
    #: W, "ranks": [their W saved states, each saying whether it was "in_remainder"], "inner":
    #: the remainder those were in, or None}``.
    remainder: Optional[dict[str, Any]] = None


def state_on_other_ranks(saved: list[dict[str, Any]], batch_size: int, where: str) -> dict[str, Any]:
    """The loader state every rank of a resume starts from when ``saved`` (one state per rank,
    counting batches of ``batch_size`` where a state does not say) came from another number of
    ranks or another batch size: the remainder up to the end of the furthest epoch any of them
    was in.  ``where`` names the checkpoint in the refusal of positions saved by several ranks
    before they split rows this way, whose untrained rows cannot be told (one rank's range was
    the same then)."""
    if len(saved) == 1 and isinstance(saved[0], dict):
        saved = [{"split": ROW_SPLIT, **saved[0]}]
    if not saved or any(not isinstance(state, dict) or state.get("split") != ROW_SPLIT for state in saved):
        raise DistillError(f"{where}: its loader positions were saved before ranks split the rows after the held-out "
                           f"ones (2026-12), so which rows are left cannot be told; resume with the number of "
                           f"processes ({len(saved)}) and distill.batch_size ({batch_size}) it was saved with")
    # The saved ranks still in a remainder all hold the same one (they moved together): kept
    # once, not once per rank, or each move inside an epoch would multiply its size by the ranks.
    inner = [state["remainder"] for state in saved if "remainder" in state]
    if any(other != inner[0] for other in inner):
        raise DistillError(f"{where}: its ranks' loader positions are inside different remainders; resume with the "
                           f"number of processes ({len(saved)}) and distill.batch_size ({batch_size}) it was saved with")
    ranks = [{"batch_size": batch_size, **{key: value for key, value in state.items() if key != "remainder"},
              "in_remainder": "remainder" in state} for state in saved]
    return {"epoch": max(int(state["epoch"]) for state in saved), "batches_done": 0, "split": ROW_SPLIT,
            "remainder": {"world_size": len(saved), "ranks": ranks, "inner": inner[0] if inner else None}}


class TargetLoader:
    """Endless iterator of collated micro-batches for one rank (epochs roll over)."""

    def __init__(self, source: SequenceSource, collate: Callable[[list[SequenceTargets]], Any], *,
                 batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 256, holdout_rows: int = 0, prefetch: int = 0,
                 pin_for: Optional[torch.device] = None) -> None:
        self.source = source
        self.collate = collate
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.holdout_rows = holdout_rows
        self.prefetch = prefetch
        self.pin_for = pin_for if pin_for is not None and pin_for.type == "cuda" else None
        self.position = LoaderPosition()
        _rank_range(source.num_rows, holdout_rows, rank, world_size)   # a rank left without rows: refused now
        self._remainders: dict[str, np.ndarray] = {}   # see _remainder_rows

    def holdout(self) -> list[SequenceTargets]:
        """The held-out rows (the same on every rank)."""
        return list(self.source.iter_rows(0, min(self.holdout_rows, self.source.num_rows)))

    def state_dict(self) -> dict[str, Any]:
        state = {**asdict(self.position), "split": ROW_SPLIT, "batch_size": self.batch_size}
        if state["remainder"] is None:
            del state["remainder"]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``, saved by this rank with this batch size (else see
        :func:`state_on_other_ranks`)."""
        state = dict(state)
        saved_batch = state.pop("batch_size", self.batch_size)
        if saved_batch != self.batch_size:
            raise DistillError(f"a loader position counting batches of {saved_batch} rows, loaded by a loader of "
                               f"{self.batch_size}; move it with state_on_other_ranks")
        if state.pop("split", None) != ROW_SPLIT and self.world_size > 1:
            log.warning("--resume: the checkpoint's loader position was saved before ranks split the rows after the "
                        "held-out ones (2026-12); this run's ranks continue on other rows than it trained on")
        self.position = LoaderPosition(**state)

    def __iter__(self) -> Iterator[Any]:
        batches = self._positioned_batches(self.position)
        if self.prefetch > 0:
            batches = _read_ahead(batches, self.prefetch)
        for position, batch in batches:
            self.position = position
            yield batch

    def _positioned_batches(self, start: LoaderPosition) -> Generator[tuple[LoaderPosition, Any], None, None]:
        """Collated batches from ``start`` on, each with the position just after it (pinned
        for ``pin_for``'s copy when that is a GPU)."""
        if self.pin_for is not None:
            # A new thread's current GPU is 0: pinning from there would open a CUDA context on
            # GPU 0 for every rank (what torch's DataLoader pin thread avoids the same way).
            torch.cuda.set_device(self.pin_for)
        epoch, skip, remainder = start.epoch, start.batches_done, start.remainder
        while True:   # a pass: the remainder of an epoch (a resume on other ranks), or a whole epoch
            rows = self._pass_rows(self.rank, self.world_size, epoch, remainder)
            for index, batch_rows in enumerate(self._pass_batches(rows, epoch, skip), start=skip):
                batch = self.collate(batch_rows)
                yield (LoaderPosition(epoch, index + 1, remainder),
                       batch.pin_memory() if self.pin_for is not None else batch)
            epoch, skip, remainder = epoch + 1, 0, None
            self._remainders.clear()

    def _pass_rows(self, rank: int, world_size: int, epoch: int,
                   remainder: Optional[dict[str, Any]]) -> Sequence[int]:
        """The rows ``rank`` of ``world_size`` trains in a pass of ``epoch``, as ascending cache
        positions: its range, or its part of ``remainder`` (where a row left twice is listed twice)."""
        if remainder is None:
            return self._range(rank, world_size)
        left = self._remainder_rows(epoch, remainder)
        return left[rank * len(left) // world_size:(rank + 1) * len(left) // world_size]

    def _range(self, rank: int, world_size: int) -> range:
        return range(*_rank_range(self.source.num_rows, self.holdout_rows, rank, world_size))

    def _remainder_rows(self, epoch: int, remainder: dict[str, Any]) -> np.ndarray:
        """What the saved ranks of ``remainder`` left to train up to the end of ``epoch``, sorted.
        Kept per remainder: each saved rank of a resume inside a remainder takes its part of the
        same inner one, which would otherwise be replayed once per saved rank, on every rank."""
        key = repr((epoch, remainder))
        if key not in self._remainders:
            saved, inner = remainder["ranks"], remainder["inner"]
            self._remainders[key] = np.sort(np.concatenate(
                [self._untrained_rows(state, saved_rank, len(saved), epoch, inner if state["in_remainder"] else None)
                 for saved_rank, state in enumerate(saved)]))
        return self._remainders[key]

    def _untrained_rows(self, state: dict[str, Any], rank: int, world_size: int, through: int,
                        remainder: Optional[dict[str, Any]]) -> np.ndarray:
        """What saved rank ``rank`` had left to train up to the end of epoch ``through``: the
        rows of its pass (its range, or its part of ``remainder``) its ``state`` had not yet
        trained, then its whole range for each epoch it had not begun."""
        epoch = int(state["epoch"])
        rows = self._pass_rows(rank, world_size, epoch, remainder)
        order = _shuffle_order(len(rows), self.shuffle_buffer, self._generator(epoch, rank))
        untrained = np.ones(len(rows), dtype=bool)
        untrained[np.fromiter(itertools.islice(order, int(state["batches_done"]) * int(state["batch_size"])),
                              dtype=np.int64)] = False
        later = [np.asarray(self._range(rank, world_size), dtype=np.int64)] * (through - epoch)
        return np.concatenate([np.asarray(rows, dtype=np.int64)[untrained], *later])

    def _generator(self, epoch: int, rank: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7919 + rank)

    def _pass_batches(self, rows: Sequence[int], epoch: int, skip: int) -> Iterator[list[SequenceTargets]]:
        """The pass's batches after its first ``skip`` (only the last batch may be short)."""
        batch: list[SequenceTargets] = []
        for row in self._shuffled(rows, self._generator(epoch, self.rank), skip * self.batch_size):
            batch.append(row)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _shuffled(self, rows: Sequence[int], generator: torch.Generator, skip: int) -> Iterator[SequenceTargets]:
        """``rows`` through the shuffle buffer, after the first ``skip`` it pops.

        The pops are drawn on indices; rows are read as the order reaches them and held
        until their turn (as many as the buffer holds).  The first ``skip`` pops are drawn
        before any row is read, and the reader leaves the shards and row groups that hold only
        those, or rows of no pass of this rank (a remainder's gaps), unread and undecoded."""
        order = _shuffle_order(len(rows), self.shuffle_buffer, generator)
        if not len(rows):
            return
        first = int(rows[0])
        pending = np.ones(len(rows), dtype=bool)   # by index into rows: not yet trained
        for index in itertools.islice(order, skip):
            pending[index] = False
        if isinstance(rows, range):
            def needed(lo: int, hi: int) -> bool:
                return bool(pending[lo - first:hi - first].any())
        else:   # sorted, perhaps with a row twice: the indices of positions [lo, hi) by bisection
            def needed(lo: int, hi: int) -> bool:
                below, above = np.searchsorted(rows, (lo, hi))
                return bool(pending[below:above].any())
        stream = self.source.iter_rows(first, int(rows[-1]) + 1, needed=needed)
        held: dict[int, SequenceTargets] = {}
        reached = 0        # rows[:reached] have been streamed
        streamed = first   # the cache position the stream yields next
        row = None
        try:
            for index in order:
                while reached <= index:
                    position = int(rows[reached])
                    if position >= streamed:   # else a row left twice: the one just read again
                        for _ in range(position - streamed):   # a gap between a remainder's rows
                            next(stream)
                        row, streamed = next(stream), position + 1
                    if pending[reached]:
                        # a row held for later gets arrays of its own: a view kept its record batch alive
                        held[reached] = row.owned() if reached < index else row
                    reached += 1
                yield held.pop(index)
        finally:   # a cache reader's threads end now, not whenever its generator is collected
            getattr(stream, "close", lambda: None)()


def _rank_range(num_rows: int, holdout_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, end)`` ``rank`` trains on: the rows after the held-out ones, split into
    contiguous ranges whose sizes differ by at most one.  Refuses, identically on every rank
    (all compute it from the same sizes), a split that leaves any rank without rows."""
    first = min(holdout_rows, num_rows)
    train = num_rows - first
    if train < world_size:
        raise DistillError(
            f"not enough cache rows to train on: {train} left after holding out {first} of {num_rows} for "
            f"eval (distill.eval_rows={holdout_rows}), for {world_size} rank(s); use a bigger cache, fewer ranks "
            "or a smaller distill.eval_rows")
    return first + rank * train // world_size, first + (rank + 1) * train // world_size


def _shuffle_order(count: int, size: int, generator: torch.Generator) -> Iterator[int]:
    """Indices ``0..count-1`` in the order a buffer of ``size`` pops them: each arrival is
    appended, and once the buffer holds ``size`` a uniformly drawn entry leaves (swapped to
    the end and popped); at the end of the stream the rest leave the same way."""
    buffer: list[int] = []
    for index in range(count):
        buffer.append(index)
        if len(buffer) >= size:
            yield _pop_random(buffer, generator)
    while buffer:
        yield _pop_random(buffer, generator)


def _pop_random(buffer: list[int], generator: torch.Generator) -> int:
    pick = int(torch.randint(len(buffer), (1,), generator=generator))
    buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
    return buffer.pop()


_FAILED, _DONE = object(), object()


def _read_ahead(items: Generator[Any, None, None], depth: int) -> Iterator[Any]:
    """``items`` produced by a thread up to ``depth`` ahead.  An exception in the thread is
    raised here at its turn.  Closing this generator stops the thread and waits for it: a
    thread still inside torch or Arrow code when the interpreter exits is torn down mid-C++
    frame, and the process aborts ("terminate called without an active exception")."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(entry: tuple[Any, Any]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer((None, item)):
                    return
            offer((_DONE, None))
        except BaseException as exc:  # handed to the consumer, raised there
            offer((_FAILED, exc))
        finally:
            items.close()   # the reader's own threads end here, in the thread that ran it

    thread = threading.Thread(target=produce, name="qadpipe-loader", daemon=True)
    thread.start()
    try:
        while True:
            tag, item = ready.get()
            if tag is _DONE:
                return
            if tag is _FAILED:
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
