"""Cache rows -> shuffled micro-batches, deterministic, rank-split and resumable.

The order of rows is a pure function of (seed, epoch, rank): rows stream from the cache
reader through a fixed-size shuffle buffer driven by a seeded generator.  Resuming after a
kill therefore needs only ``(epoch, batches_done)``: the loader replays the same order and
skips what was already trained, without collating the skipped rows.

The first ``holdout_rows`` rows of the cache (in reader order, identical on every rank)
are never trained on: they are the held-out split for periodic evaluation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Protocol

import torch

from qadpipe.errors import DistillError
from qadpipe.targets import SequenceTargets


class SequenceSource(Protocol):
    """What the loader needs from a cache reader."""

    def iter_sequences(self, rank: int = 0, world_size: int = 1) -> Iterator[SequenceTargets]: ...


@dataclass
class LoaderPosition:
    epoch: int = 0
    batches_done: int = 0


class TargetLoader:
    """Endless iterator of collated micro-batches for one rank (epochs roll over)."""

    def __init__(self, source: SequenceSource, collate: Callable[[list[SequenceTargets]], Any], *,
                 batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 256, holdout_rows: int = 0) -> None:
        self.source = source
        self.collate = collate
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.holdout_rows = holdout_rows
        self.position = LoaderPosition()
        self._holdout_ids: set[str] | None = None

    def holdout(self) -> list[SequenceTargets]:
        """The held-out rows (the same on every rank)."""
        rows = []
        if self.holdout_rows:
            for row in self.source.iter_sequences(0, 1):
                rows.append(row)
                if len(rows) == self.holdout_rows:
                    break
        self._holdout_ids = {row.id for row in rows}
        return rows

    def state_dict(self) -> dict[str, int]:
        return asdict(self.position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = LoaderPosition(**state)

    def __iter__(self) -> Iterator[Any]:
        if self._holdout_ids is None:
            self.holdout()
        while True:
            skip = self.position.batches_done
            yielded_any = False
            for index, rows in enumerate(self._epoch_batches(self.position.epoch)):
                yielded_any = True
                if index < skip:
                    continue
                self.position.batches_done = index + 1
                yield self.collate(rows)
            if not yielded_any:
                raise DistillError(
                    f"rank {self.rank} of {self.world_size}: no cache rows to train on "
                    f"(after holding out {self.holdout_rows} rows for eval); use a bigger cache, fewer "
                    "ranks or a smaller distill.eval_rows"
                )
            self.position = LoaderPosition(epoch=self.position.epoch + 1, batches_done=0)

    def _epoch_batches(self, epoch: int) -> Iterator[list[SequenceTargets]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 7919 + self.rank)
        batch: list[SequenceTargets] = []
        for row in self._shuffled(generator):
            batch.append(row)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _shuffled(self, generator: torch.Generator) -> Iterator[SequenceTargets]:
        buffer: list[SequenceTargets] = []
        holdout = self._holdout_ids or set()
        for row in self.source.iter_sequences(self.rank, self.world_size):
            if row.id in holdout:
                continue
            buffer.append(row)
            if len(buffer) >= self.shuffle_buffer:
                yield _pop_random(buffer, generator)
        while buffer:
            yield _pop_random(buffer, generator)


def _pop_random(buffer: list[SequenceTargets], generator: torch.Generator) -> SequenceTargets:
    pick = int(torch.randint(len(buffer), (1,), generator=generator))
    buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
    return buffer.pop()
