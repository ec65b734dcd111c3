"""The loader: deterministic order, exact resume, disjoint rank split, held-out rows unseen --
the same whether batches are read in the loop or ahead by a background thread."""

from __future__ import annotations

import itertools
import pickle
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import pytest

from qadpipe.distill.loader import TargetLoader, state_on_other_ranks
from qadpipe.errors import DistillError
from qadpipe.targets import SequenceTargets


class ListSource:
    """A stand-in for the cache reader: rows by position, in groups of ``group`` rows of which
    those ``needed`` does not want come as None, as the reader's row groups do."""

    def __init__(self, n: int, group: int = 4):
        self.rows = [SequenceTargets(id=f"r{i}", input_ids=np.arange(4, dtype=np.int32), target_start=0)
                     for i in range(n)]
        self.num_rows = n
        self.group = group
        self.decoded: list[range] = []   # the groups read

    def iter_rows(self, start: int, end: int, needed=None):
        for lo in range(start, end, self.group):
            hi = min(lo + self.group, end)
            if needed is None or needed(lo, hi):
                self.decoded.append(range(lo, hi))
                yield from self.rows[lo:hi]
            else:
                yield from [None] * (hi - lo)


def ids(batch):
    return [row.id for row in batch]


def take(loader, n):
    return [ids(b) for b in itertools.islice(iter(loader), n)]


@pytest.fixture(params=[0, 2], ids=["in-loop", "read-ahead"])
def make(request):
    def build(source, **kw):
        args = dict(batch_size=3, seed=1, shuffle_buffer=5, holdout_rows=2, prefetch=request.param)
        args.update(kw)
        return TargetLoader(source, list, **args)
    return build


def test_same_seed_same_order_other_seed_other_order(make):
    source = ListSource(20)
    assert take(make(source), 8) == take(make(source), 8)
    assert take(make(source), 8) != take(make(source, seed=2), 8)


def test_the_buffer_size_bounds_how_far_a_row_moves(make):
    """A buffer of 1 keeps the cache's order (its documented meaning); of 2, the first row out
    is one of the first two, whatever the seed (the buffer pops once it holds its size)."""
    source = ListSource(20)
    assert [i for b in take(make(source, shuffle_buffer=1), 6) for i in b] == [f"r{i}" for i in range(2, 20)]
    firsts = {take(make(source, shuffle_buffer=2, seed=seed), 1)[0][0] for seed in range(40)}
    assert firsts == {"r2", "r3"}


def test_ranks_shuffle_their_rows_independently(make):
    """Each rank's order comes from its own generator: ranks holding as many rows would
    otherwise visit them in the same pattern (row i of every range in the same step)."""
    source = ListSource(22)   # 20 training rows, 10 a rank

    def pattern(rank):
        rows = [int(i[1:]) for i in first_epoch(make(source, rank=rank, world_size=2))]
        return [row - min(rows) for row in rows]

    assert sorted(pattern(0)) == sorted(pattern(1)) and pattern(0) != pattern(1)


def test_each_epoch_is_shuffled_anew(make):
    loader = make(ListSource(20))
    epochs = [[i for b in take(loader, 6) for i in b] for _ in range(2)]   # 18 training rows / 3, twice
    assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]


def test_epoch_covers_every_training_row_once_and_never_the_holdout(make):
    loader = make(ListSource(20))
    assert ids(loader.holdout()) == ["r0", "r1"]
    first_epoch = take(loader, 6)  # 18 training rows / 3
    flat = [i for b in first_epoch for i in b]
    assert sorted(flat) == sorted(f"r{i}" for i in range(2, 20))
    assert loader.state_dict() == {"epoch": 0, "batches_done": 6, "split": "contiguous-after-holdout",
                                  "batch_size": 3}


def test_resume_continues_exactly_across_an_epoch_boundary(make):
    source = ListSource(20)
    straight = take(make(source), 15)
    first = make(source)
    part = take(first, 9)
    resumed = make(source)
    resumed.load_state_dict(first.state_dict())
    assert part + take(resumed, 6) == straight


@pytest.mark.parametrize("batches_done", [1, 7, 20, 39])
def test_a_resume_does_not_decode_the_rows_trained_before_it(make, batches_done):
    """The rows popped before the resume point are drawn on indices first: the source decodes
    no group that holds only those, and the batches after the point are as before."""
    straight = take(make(ListSource(404, group=8), shuffle_buffer=16), 40)
    source = ListSource(404, group=8)
    resumed = make(source, shuffle_buffer=16)
    resumed.load_state_dict({"epoch": 0, "batches_done": batches_done})
    assert take(resumed, 40 - batches_done) == straight[batches_done:]
    trained = {int(row_id[1:]) for batch in straight[:batches_done] for row_id in batch}
    decoded = [group for group in source.decoded if group[0] < 404 - 2]   # this epoch's (read-ahead reaches on)
    assert not [group for group in decoded if trained.issuperset(group)]
    undecoded = trained - {row for group in decoded for row in group}
    if batches_done == 39:   # well past the buffer's 16 stragglers: most were never decoded (measured 88-97 of 117)
        assert len(undecoded) > len(trained) / 2


def test_rows_held_in_the_shuffle_buffer_own_their_arrays(make):
    """Decoded rows are views into their record batch's arrays; a held one kept the whole batch
    alive.  Rows are read as the order reaches them, so a row is held when a later one was
    popped first; only a row popped as it is read stays a view (no copy needed)."""
    source = ListSource(20)
    batch_arrays = np.arange(4 * 20, dtype=np.int32)
    for index, row in enumerate(source.rows):
        row.input_ids = batch_arrays[4 * index:4 * index + 4]
    rows = [row for batch in itertools.islice(iter(make(source)), 6) for row in batch]   # the 18 training rows
    popped = [int(row.id[1:]) for row in rows]
    held = [max(popped[:turn], default=-1) > index for turn, index in enumerate(popped)]
    assert 0 < sum(held) < len(rows)
    for row, was_held in zip(rows, held):
        assert np.shares_memory(row.input_ids, batch_arrays) != was_held, row.id
        assert np.array_equal(row.input_ids, batch_arrays[4 * int(row.id[1:]):][:4])


def first_epoch(loader) -> list[str]:
    """The row ids one rank trains on in its first epoch."""
    rows = []
    for batch in loader:
        if loader.state_dict()["epoch"] > 0:
            return rows
        rows += ids(batch)
    raise AssertionError("unreachable: the loader is endless")


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_share_the_rows_after_the_holdout_evenly(make, world_size):
    """The held-out rows are the cache's first; taking them out of rank 0's range (as a
    per-rank split of the whole cache does) left rank 0 fewer rows, or none, and it then
    trained each of its rows several times as often as the other ranks."""
    source = ListSource(23)
    seen = [first_epoch(make(source, rank=r, world_size=world_size)) for r in range(world_size)]
    sizes = [len(rows) for rows in seen]
    assert max(sizes) - min(sizes) <= 1
    assert sorted(i for rows in seen for i in rows) == sorted(f"r{i}" for i in range(2, 23))  # each once


def test_too_few_rows_for_the_ranks_is_one_clear_error_on_every_rank(make):
    for rank in range(3):
        with pytest.raises(DistillError, match=r"^not enough cache rows to train on: 2 left after holding out "
                                               r"2 of 4 for eval \(distill.eval_rows=2\), for 3 rank\(s\)"):
            make(ListSource(4), rank=rank, world_size=3)


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "qadpipe-loader"]


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_read_ahead_collates_the_next_batches_while_the_loop_holds_one_and_stops_when_closed():
    collated = []
    loader = TargetLoader(ListSource(30), lambda rows: collated.append(ids(rows)) or rows, batch_size=3, seed=1,
                          prefetch=2)
    batches = iter(loader)
    first = ids(next(batches))
    # the thread fills the queue (2) and collates one more that waits for room
    assert wait_for(lambda: len(collated) == 4), collated
    assert collated[0] == first
    assert loader.state_dict() == {"epoch": 0, "batches_done": 1, "split": "contiguous-after-holdout", "batch_size": 3}
    assert len(loader_threads()) == 1
    batches.close()
    assert not loader_threads()   # joined: a thread left inside C++ code at exit aborts the process


def test_read_ahead_pins_on_this_ranks_gpu_from_its_own_thread(monkeypatch):
    """A thread starts on GPU 0: pinning there without set_device would open a context on GPU 0
    for every rank.  (No GPU here: set_device and pin_memory are observed, not run.)"""
    calls = []

    class Pinnable(list):
        def pin_memory(self):
            calls.append(("pin", threading.current_thread().name))
            return self

    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append((str(device),
                                                                                threading.current_thread().name)))
    loader = TargetLoader(ListSource(12), Pinnable, batch_size=3, seed=1, prefetch=2,
                          pin_for=torch.device("cuda:1"))
    batches = iter(loader)
    next(batches)
    batches.close()
    assert calls[0] == ("cuda:1", "qadpipe-loader") and ("pin", "qadpipe-loader") in calls
    assert TargetLoader(ListSource(12), Pinnable, batch_size=3, seed=1, pin_for=torch.device("cpu")).pin_for is None


EXIT_AFTER_ONE_BATCH = """
import sys
sys.path.insert(0, {tests!r})
from cache_rows import cache_meta, random_rows, write_cache
from qadpipe.cache import CacheReader
from qadpipe.distill.collate import collate
from qadpipe.distill.loader import TargetLoader, state_on_other_ranks
meta = cache_meta("topk", k=64, vocab_size=151936)
write_cache({cache!r}, meta, random_rows(meta, 24, seq_len=2048, seed=1), rows_per_shard=4)
loader = TargetLoader(CacheReader({cache!r}), lambda rows: collate(rows, pad_id=0), batch_size=1, seed=0,
                      shuffle_buffer=1, prefetch=2)
batches = iter(loader)
next(batches)
batches.close()
"""


def test_a_process_that_closes_the_read_ahead_exits_cleanly(tmp_path):
    """Before the thread was joined on close, this exited with SIGABRT 5 times in 6: the thread,
    mid-way through collating, was torn down inside C++ code at interpreter exit (what a
    2-process FSDP2 run hit after writing its final student)."""
    tests = str(Path(__file__).resolve().parents[1])
    for attempt in range(3):
        script = EXIT_AFTER_ONE_BATCH.format(tests=tests, cache=str(tmp_path / f"cache{attempt}"))
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "terminate" not in done.stderr, done.stderr[-2000:]


def test_a_position_saved_before_the_split_changed_resumes_with_a_warning(make, caplog):
    """Multi-rank positions saved before ranks split the rows after the held-out ones point
    into other rows now: the resume goes on, and says so."""
    loader = make(ListSource(20), rank=1, world_size=2)
    loader.load_state_dict({"epoch": 0, "batches_done": 2})
    assert "saved before ranks split the rows" in caplog.text
    assert loader.state_dict()["batches_done"] == 2
    caplog.clear()
    loader.load_state_dict(loader.state_dict())
    assert "saved before" not in caplog.text



def trained_rows(loader, batches: int) -> list[int]:
    """The cache positions of the rows ``loader`` hands out in its next ``batches`` batches."""
    return [int(row_id[1:]) for batch in itertools.islice(iter(loader), batches) for row_id in ids(batch)]


def passes(loader, count: int) -> list[list[int]]:
    """The rows (cache positions) ``loader`` hands out in its next ``count`` passes (an epoch's
    remainder or a whole epoch), told apart by the position after each batch."""
    done: list[list[int]] = []
    rows: list[int] = []
    key = None
    for batch in loader:
        state = loader.state_dict()
        now = (state["epoch"], "remainder" in state)
        if key is not None and now != key:
            done.append(rows)
            if len(done) == count:
                return done
            rows = []
        key = now
        rows += [int(row_id[1:]) for row_id in ids(batch)]
    raise AssertionError("unreachable: the loader is endless")


def test_a_resume_on_other_ranks_trains_the_rest_of_the_epoch_once_then_the_new_split(make):
    """2 ranks trained 4 batches each of their epoch; 3 ranks resume from their positions:
    between them they train each row the 2 had not, exactly once, shuffled anew, then start
    the next epoch on the 3-way split."""
    source = ListSource(53)   # 2 held out, 51 to train: 25 + 26 rows on 2 ranks, 17 each on 3
    old = [make(source, rank=rank, world_size=2) for rank in range(2)]
    before = [row for loader in old for row in trained_rows(loader, 4)]
    saved = [loader.state_dict() for loader in old]
    resumed = [make(source, rank=rank, world_size=3) for rank in range(3)]
    for loader in resumed:
        loader.load_state_dict(state_on_other_ranks(saved, 3, "step-4"))
    rest, after = zip(*(passes(loader, 2) for loader in resumed))
    assert sorted(before + [row for part in rest for row in part]) == list(range(2, 53))
    assert [len(part) for part in rest] == [9, 9, 9]   # the 27 untrained rows, split three ways
    assert any(part != sorted(part) for part in rest)   # shuffled, not read out in cache order
    assert [sorted(rows) for rows in after] == [list(range(2, 19)), list(range(19, 36)), list(range(36, 53))]
    assert all(loader.state_dict()["epoch"] == 2 for loader in resumed)


def test_resumes_on_other_ranks_within_one_epoch_still_train_each_row_once(make):
    """2 ranks, then 3 (a few batches into the remainder), then 1: the epoch's rows are each
    trained once across the three runs, and the remainder's own position resumes exactly."""
    source = ListSource(53)
    first = [make(source, rank=rank, world_size=2) for rank in range(2)]
    trained = [row for loader in first for row in trained_rows(loader, 3)]
    second = [make(source, rank=rank, world_size=3) for rank in range(3)]
    for loader in second:
        loader.load_state_dict(state_on_other_ranks([one.state_dict() for one in first], 3, "step-3"))
    trained += [row for loader in second for row in trained_rows(loader, 2)]
    in_remainder = [loader.state_dict() for loader in second]
    assert all("remainder" in state for state in in_remainder)
    again = make(source, rank=1, world_size=3)   # the same 3 ranks resume inside the remainder: exactly
    again.load_state_dict(in_remainder[1])
    assert passes(again, 1) == passes(second[1], 1)
    last = make(source)
    last.load_state_dict(state_on_other_ranks(in_remainder, 3, "step-5"))
    rest = passes(last, 1)[0]
    assert sorted(trained + rest) == list(range(2, 53))


def test_a_resume_with_smaller_batches_trains_the_rest_of_the_epoch_once(make):
    """Batches of 3 (a run out of memory), resumed with batches of 2: a saved position counts
    batches of the size that saved it, so the rows left are those of 5 x 3, not 5 x 2."""
    source = ListSource(53)
    saved = make(source)
    trained = trained_rows(saved, 5)
    smaller = make(source, batch_size=2)
    with pytest.raises(DistillError, match="counting batches of 3 rows, loaded by a loader of 2"):
        smaller.load_state_dict(saved.state_dict())
    smaller.load_state_dict(state_on_other_ranks([saved.state_dict()], 3, "step-5"))
    rest = passes(smaller, 1)[0]
    assert sorted(trained + rest) == list(range(2, 53))


def through_epoch(loader, epoch: int) -> list[int]:
    """The rows ``loader`` hands out until its position passes ``epoch`` (that batch left out)."""
    rows = []
    for batch in loader:
        if loader.state_dict()["epoch"] > epoch:
            return rows
        rows += [int(row_id[1:]) for row_id in ids(batch)]
    raise AssertionError("unreachable: the loader is endless")


def moved(saved_loaders, make, source, world_size, **kw):
    """Loaders for ``world_size`` ranks resuming ``saved_loaders``' positions (batch_size from kw)."""
    saved = [loader.state_dict() for loader in saved_loaders]
    loaders = [make(source, rank=rank, world_size=world_size, **kw) for rank in range(world_size)]
    for loader in loaders:
        loader.load_state_dict(state_on_other_ranks(saved, saved[0]["batch_size"], "step-N"))
    return loaders


def test_a_rank_an_epoch_ahead_of_another_leaves_no_row_short(make):
    """25 rows take rank 1 nine batches of 3, 24 take rank 0 eight: at step 9 rank 0 is a batch
    into epoch 1 while rank 1 ends epoch 0.  Resumed on one rank, each row is trained twice by
    the end of epoch 1, as without the resume (rank 1's epoch-1 rows were skipped)."""
    source = ListSource(51)
    old = [make(source, rank=rank, world_size=2) for rank in range(2)]
    trained = [row for loader in old for row in trained_rows(loader, 9)]
    assert [(state["epoch"], state["batches_done"]) for state in (loader.state_dict() for loader in old)] == \
        [(1, 1), (0, 9)]
    [one] = moved(old, make, source, 1)
    trained += through_epoch(one, 1)
    assert np.bincount(trained, minlength=51).tolist() == [0, 0] + [2] * 49


def test_nested_resumes_with_ranks_at_different_epochs_leave_no_row_short_or_over(make):
    """2 ranks, then 3 whose remainder parts differ by a row (batches of 1: the short one ends
    its part a step early and starts epoch 1), then 1: by the end of epoch 1 every row is
    trained twice (rows were trained 2 and 1 times)."""
    source = ListSource(20)
    first = [make(source, rank=rank, world_size=2, batch_size=1, shuffle_buffer=4, holdout_rows=0)
             for rank in range(2)]
    trained = [row for loader in first for row in trained_rows(loader, 3)]
    second = moved(first, make, source, 3, batch_size=1, shuffle_buffer=4, holdout_rows=0)
    trained += [row for loader in second for row in trained_rows(loader, 5)]
    assert [state["epoch"] for state in (loader.state_dict() for loader in second)] == [1, 0, 0]
    [last] = moved(second, make, source, 1, batch_size=1, shuffle_buffer=4, holdout_rows=0)
    trained += through_epoch(last, 1)
    assert np.bincount(trained, minlength=20).tolist() == [2] * 20


def test_a_single_rank_position_older_than_the_split_moves_to_another_batch_size(make):
    """One rank's range was the same before ranks split the rows after the held-out ones."""
    source = ListSource(53)
    saved = make(source)
    trained = trained_rows(saved, 5)
    legacy = {key: value for key, value in saved.state_dict().items() if key not in ("split", "batch_size")}
    smaller = make(source, batch_size=2)
    smaller.load_state_dict(state_on_other_ranks([legacy], 3, "step-5"))
    assert sorted(trained + passes(smaller, 1)[0]) == list(range(2, 53))


def test_any_chain_of_resumes_trains_every_row_as_often_as_an_uninterrupted_run():
    """Random chains of up to 4 runs, each on 1-4 ranks with batches of 1-4 for 0-25 steps,
    then every rank of the last trained to the end of the furthest epoch E: each training row
    is then trained E + 1 times (whatever the ranks' epoch drift at each move), the held-out
    rows never.  Counts, not the loader's own bookkeeping, are the reference."""
    rng = random.Random(0)
    for _ in range(80):
        rows, holdout = rng.randint(8, 60), rng.choice([0, 3])
        source = ListSource(rows, group=rng.choice([1, 4, 7]))
        buffer = rng.choice([1, 2, 5, 100])
        trained: list[int] = []
        loaders: list[TargetLoader] = []
        for _ in range(rng.randint(1, 4)):
            world_size, batch_size = rng.randint(1, min(4, rows - holdout)), rng.randint(1, 4)
            saved = [loader.state_dict() for loader in loaders]
            loaders = [TargetLoader(source, list, batch_size=batch_size, seed=7, rank=rank, world_size=world_size,
                                    shuffle_buffer=buffer, holdout_rows=holdout) for rank in range(world_size)]
            same = len(saved) == world_size and saved[0]["batch_size"] == batch_size
            for rank, loader in enumerate(loaders if saved else []):
                loader.load_state_dict(saved[rank] if same else
                                       state_on_other_ranks(saved, saved[0]["batch_size"], "step-N"))
            steps = rng.randint(0, 25)
            trained += [row for loader in loaders for row in trained_rows(loader, steps)]
        furthest = max(loader.state_dict()["epoch"] for loader in loaders)
        trained += [row for loader in loaders for row in through_epoch(loader, furthest)]
        assert np.bincount(trained, minlength=rows).tolist() == [0] * holdout + [furthest + 1] * (rows - holdout)


def test_moves_inside_one_epoch_keep_the_saved_position_small():
    """Ranks still sharing out a remainder all hold the same one; kept in every rank's state, a
    move multiplied the saved position by the number of ranks (3.6 MB after 4 -> 8 ranks three
    times over, in a checkpoint that holds every rank's)."""
    source = ListSource(100_000, group=64)
    saved: list[dict] = []
    for world_size in (4, 8, 4, 8, 4, 8):
        loaders = [TargetLoader(source, list, batch_size=2, seed=0, rank=rank, world_size=world_size,
                                shuffle_buffer=64) for rank in range(world_size)]
        for loader in loaders if saved else []:
            loader.load_state_dict(state_on_other_ranks(saved, 2, "step-N"))
        for loader in loaders:
            trained_rows(loader, 1)
        moved = bool(saved)
        saved = [pickle.loads(pickle.dumps(loader.state_dict())) for loader in loaders]   # as ranks gather them
        assert all("remainder" in state for state in saved) == moved   # still inside the rows left
    assert len(pickle.dumps(saved)) < 40_000


def test_positions_saved_before_the_split_cannot_move_to_other_ranks():
    with pytest.raises(DistillError, match=r"^step-9: its loader positions were saved before ranks split .* the "
                                           r"number of processes \(2\) and distill.batch_size \(4\) it was saved "
                                           r"with$"):
        state_on_other_ranks([{"epoch": 0, "batches_done": 3}, {"epoch": 0, "batches_done": 3}], 4, "step-9")
