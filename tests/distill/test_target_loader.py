"""The loader: deterministic order, exact resume, disjoint rank split, held-out rows unseen."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from qadpipe.distill.loader import TargetLoader
from qadpipe.errors import DistillError
from qadpipe.targets import SequenceTargets


class ListSource:
    """A stand-in for the cache reader: rows split across ranks by index."""

    def __init__(self, n: int):
        self.rows = [SequenceTargets(id=f"r{i}", input_ids=np.arange(4, dtype=np.int32), target_start=0)
                     for i in range(n)]

    def iter_sequences(self, rank: int = 0, world_size: int = 1):
        return iter(self.rows[rank::world_size])


def ids(batch):
    return [row.id for row in batch]


def take(loader, n):
    return [ids(b) for b in itertools.islice(iter(loader), n)]


def make(source, **kw):
    args = dict(batch_size=3, seed=1, shuffle_buffer=5, holdout_rows=2)
    args.update(kw)
    return TargetLoader(source, list, **args)


def test_same_seed_same_order_other_seed_other_order():
    source = ListSource(20)
    assert take(make(source), 8) == take(make(source), 8)
    assert take(make(source), 8) != take(make(source, seed=2), 8)


def test_epoch_covers_every_training_row_once_and_never_the_holdout():
    loader = make(ListSource(20))
    assert ids(loader.holdout()) == ["r0", "r1"]
    first_epoch = take(loader, 6)  # 18 training rows / 3
    flat = [i for b in first_epoch for i in b]
    assert sorted(flat) == sorted(f"r{i}" for i in range(2, 20))
    assert loader.state_dict() == {"epoch": 0, "batches_done": 6}


def test_resume_continues_exactly_across_an_epoch_boundary():
    source = ListSource(20)
    straight = take(make(source), 15)
    first = make(source)
    part = take(first, 9)
    resumed = make(source)
    resumed.load_state_dict(first.state_dict())
    assert part + take(resumed, 6) == straight


def test_ranks_are_disjoint_and_an_empty_rank_is_one_clear_error():
    source = ListSource(20)
    rank_rows = [set(i for b in take(make(source, rank=r, world_size=2), 3) for i in b) for r in (0, 1)]
    assert not rank_rows[0] & rank_rows[1]
    with pytest.raises(DistillError, match=r"^rank 2 of 3: no cache rows to train on"):
        take(make(ListSource(2), rank=2, world_size=3, holdout_rows=0), 1)
