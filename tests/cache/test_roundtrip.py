"""Write -> read: exact for plain and sampled rows, within the codec's bound for compact top-k;
rank splits, several writer tasks, resume."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from cache_rows import cache_meta, random_rows, write_cache
from qadpipe.cache import CacheReader, CacheWriter, compact
from qadpipe.cli import cli
from qadpipe.errors import CacheError


def assert_same_targets(written, read, encoding):
    assert read.id == written.id and read.target_start == written.target_start
    np.testing.assert_array_equal(read.input_ids, written.input_ids)
    if written.kind == "sampled":
        for name in ("sample_offsets", "sample_ids", "sample_counts"):
            np.testing.assert_array_equal(getattr(read, name), getattr(written, name))
        return
    assert read.topk_ids.shape == written.topk_ids.shape and read.topk_ids.dtype == np.int32
    if encoding == "plain":
        np.testing.assert_array_equal(read.topk_ids, written.topk_ids)
        np.testing.assert_array_equal(read.topk_logprobs, written.topk_logprobs)
        np.testing.assert_array_equal(read.tail_mass, written.tail_mass)
        return
    # Compact: same id set per position, still sorted descending; each id's log-prob within
    # half a coarse step of the written one, up to one shift per position (the decoded row
    # is scaled to its tail), so the differences spread over at most one coarse step; the
    # row then sums to exactly 1 with its tail, which is within the tail code's relative step.
    assert (np.diff(read.topk_logprobs, axis=1) <= 0).all()
    for position in range(written.topk_ids.shape[0]):
        want = dict(zip(written.topk_ids[position].tolist(), written.topk_logprobs[position].tolist()))
        got = dict(zip(read.topk_ids[position].tolist(), read.topk_logprobs[position].tolist()))
        assert got.keys() == want.keys()
        differences = [got[t] - want[t] for t in want]
        assert max(differences) - min(differences) <= compact.COARSE_STEP + 1e-5
    np.testing.assert_allclose(np.exp(read.topk_logprobs.astype(np.float64)).sum(1) + read.tail_mass, 1.0, atol=1e-6)
    np.testing.assert_allclose(read.tail_mass, written.tail_mass, rtol=compact.TAIL_STEP)


@pytest.mark.parametrize("kind", ["topk", "sampled"])
@pytest.mark.parametrize("encoding", ["plain", "compact"])
@pytest.mark.parametrize("target_start", [0, 3])
def test_roundtrip(tmp_path, kind, encoding, target_start):
    meta = cache_meta(kind, encoding=encoding, k=16)
    rows = random_rows(meta, 9, seq_len=24, target_start=target_start)
    write_cache(tmp_path, meta, rows, rows_per_shard=4)
    reader = CacheReader(str(tmp_path))
    assert reader.meta == meta
    assert reader.num_rows == 9 and reader.num_tokens == sum(r.num_target_rows for r in rows)
    assert len(reader.shards) == 3
    read = list(reader.iter_sequences())
    assert [r.id for r in read] == [r.id for r in rows]
    for written, got in zip(rows, read):
        assert_same_targets(written, got, encoding)


def test_tail_id_survives_compact_sampled(tmp_path):
    meta = cache_meta("sampled", encoding="compact")
    rows = random_rows(meta, 3)
    assert any((r.sample_ids == -1).any() for r in rows)
    write_cache(tmp_path, meta, rows)
    for written, got in zip(rows, CacheReader(str(tmp_path)).iter_sequences()):
        np.testing.assert_array_equal(got.sample_ids, written.sample_ids)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 13])
def test_rank_split_is_a_contiguous_balanced_partition(tmp_path, world_size):
    meta = cache_meta("topk", encoding="compact")
    rows = random_rows(meta, 11, seq_len=8)
    write_cache(tmp_path, meta, rows, rows_per_shard=3)
    reader = CacheReader(str(tmp_path), batch_rows=2)
    parts = [[r.id for r in reader.iter_sequences(rank, world_size)] for rank in range(world_size)]
    assert [i for part in parts for i in part] == [r.id for r in rows]
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    again = [[r.id for r in CacheReader(str(tmp_path)).iter_sequences(rank, world_size)] for rank in range(world_size)]
    assert again == parts
    with pytest.raises(CacheError, match="rank=3, world_size=3"):
        next(reader.iter_sequences(3, 3))


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_rank_range_starting_in_a_later_row_group_reads_its_own_rows(tmp_path, monkeypatch, world_size):
    """Shards hold 128-row Parquet row groups: a rank's range that starts inside a later
    group must be read from that group's first row on, not from the shard's."""
    import qadpipe.cache.writer as writer

    monkeypatch.setattr(writer, "ROW_GROUP_ROWS", 2)
    meta = cache_meta("topk", encoding="compact")
    rows = random_rows(meta, 11, seq_len=8)
    write_cache(tmp_path, meta, rows, rows_per_shard=11)
    reader = CacheReader(str(tmp_path), batch_rows=3)
    ids = [r.id for r in rows]
    for rank in range(world_size):
        first, last = rank * len(ids) // world_size, (rank + 1) * len(ids) // world_size
        assert [r.id for r in reader.iter_sequences(rank, world_size)] == ids[first:last]
    assert [r.id for r in reader.iter_rows(5, 9)] == ids[5:9]


def test_row_groups_nobody_needs_are_not_decoded_and_come_as_none(tmp_path, monkeypatch):
    """``needed`` is asked about each shard, then each row group of the shards it wants, over
    the range, in cache-wide row numbers; a shard it turns down is never read, a group never
    decoded (a resumed loader's trained rows)."""
    from qadpipe.cache import encoding as encoding_module
    from qadpipe.cache import reader as reader_module
    from qadpipe.cache import writer as writer_module

    monkeypatch.setattr(writer_module, "ROW_GROUP_ROWS", 4)
    meta = cache_meta("topk", k=4)
    rows = random_rows(meta, 30, seq_len=8)
    write_cache(tmp_path, meta, rows, rows_per_shard=10)   # shards of 10 rows: groups 4 + 4 + 2
    decoded = []
    monkeypatch.setattr(reader_module, "decode_batch",
                        lambda batch, *args: decoded.extend(batch.column("id").to_pylist()) or
                        encoding_module.decode_batch(batch, *args))
    asked = []

    def needed(lo: int, hi: int) -> bool:
        asked.append((lo, hi))
        return not (6 <= lo and hi <= 24)

    opened = []
    open_verified = CacheReader._open_verified
    monkeypatch.setattr(CacheReader, "_open_verified", lambda self, shard: opened.append(shard.name) or
                        open_verified(self, shard))
    got = list(CacheReader(str(tmp_path)).iter_rows(3, 27, needed))
    assert asked == [(3, 10), (10, 20), (20, 27), (3, 4), (4, 8), (8, 10), (20, 24), (24, 27)]   # shards, then groups
    assert [name.rsplit("-", 1)[1] for name in opened] == ["000000.parquet", "000002.parquet"]
    wanted = [i for i in range(3, 27) if not 8 <= i < 24]
    assert [row.id if row is not None else None for row in got] == \
        [rows[i].id if i in wanted else None for i in range(3, 27)]
    assert sorted(decoded) == sorted(rows[i].id for i in [*range(0, 8), *range(24, 28)])   # whole row groups
    for i, row in zip(range(3, 27), got):
        if row is not None:
            assert_same_targets(rows[i], row, "compact")


def test_long_rows_are_decoded_fewer_at_a_time(tmp_path, monkeypatch):
    """A record batch holds at most BATCH_TOKENS input tokens (by the shard's longest row), so
    long rows do not decode batch_rows at once; the rows read are the same."""
    from qadpipe.cache import encoding as encoding_module
    from qadpipe.cache import reader as reader_module

    meta = cache_meta("topk", k=4)
    rows = random_rows(meta, 12, seq_len=40)
    write_cache(tmp_path, meta, rows, rows_per_shard=12)
    sizes = []
    monkeypatch.setattr(reader_module, "decode_batch",
                        lambda batch, *args: sizes.append(batch.num_rows) or encoding_module.decode_batch(batch, *args))
    monkeypatch.setattr(reader_module, "BATCH_TOKENS", 130)    # 3 rows of 40 tokens
    got = list(CacheReader(str(tmp_path), batch_rows=8).iter_rows(0, 12))
    assert sizes == [3, 3, 3, 3]
    monkeypatch.setattr(reader_module, "BATCH_TOKENS", 64 * 2048)
    sizes.clear()
    assert [row.id for row in CacheReader(str(tmp_path), batch_rows=8).iter_rows(0, 12)] == [row.id for row in got]
    assert sizes == [8, 4]    # short rows: batch_rows as asked
    for written, read in zip(rows, got):
        assert_same_targets(written, read, "compact")


def test_rows_of_array_likes_are_written(tmp_path):
    """validate_row and the encoders take array-likes (nested lists); the shard budget's
    entry count does too, and counts a row before it is buffered."""
    meta = cache_meta("topk", k=4, encoding="plain")
    rows = random_rows(meta, 3, seq_len=8)
    listed = [dataclasses.replace(row, topk_ids=row.topk_ids.tolist(), topk_logprobs=row.topk_logprobs.tolist())
              for row in rows]
    write_cache(tmp_path, meta, listed)
    for written, read in zip(rows, CacheReader(str(tmp_path)).iter_sequences()):
        assert_same_targets(written, read, "plain")


def test_several_tasks_merge_into_one_view_in_task_order(tmp_path):
    """Tasks merge in name order, whatever order the directory lists them in (ext4's hash
    order returned two names sorted, six as 2, 3, 0, 1, ...): the order decides the ranks'
    ranges, the cache fingerprint and resume positions."""
    meta = cache_meta("topk", encoding="compact")
    rows = {task: random_rows(meta, 2 + task % 2, prefix=f"t{task}", seed=task) for task in range(6)}
    for task in reversed(range(6)):
        write_cache(tmp_path, meta, rows[task], task=f"task-{task:05d}")
    reader = CacheReader(str(tmp_path))
    assert [r.id for r in reader.iter_sequences()] == [r.id for task in range(6) for r in rows[task]]


def test_duplicate_ids_across_tasks_are_refused(tmp_path):
    meta = cache_meta("topk")
    write_cache(tmp_path, meta, random_rows(meta, 2), task="task-00000")
    write_cache(tmp_path, meta, random_rows(meta, 2, seed=5), task="task-00001")
    with pytest.raises(CacheError, match=r"task-00001-000000.parquet: duplicate row id 'row-00000' \(also in "
                                         r"shards/task-00000-000000.parquet\)"):
        CacheReader(str(tmp_path))


def test_resume_skips_done_ids_and_appends_shards(tmp_path):
    meta = cache_meta("sampled")
    rows = random_rows(meta, 7)
    write_cache(tmp_path, meta, rows[:3], rows_per_shard=2)
    with CacheWriter(str(tmp_path), meta, rows_per_shard=2) as writer:
        assert writer.done_ids() == {r.id for r in rows[:3]}
        with pytest.raises(CacheError, match="'row-00001': already written by task task-00000"):
            writer.write(rows[1])
        for row in rows[3:]:
            writer.write(row)
    assert [r.id for r in CacheReader(str(tmp_path)).iter_sequences()] == [r.id for r in rows]


def test_an_id_committed_earlier_in_the_same_run_is_refused_by_the_writer(tmp_path):
    """A shard committed by this writer adds its ids to the done ones: a repeat after the flush
    was accepted and left a cache every reader refuses."""
    meta = cache_meta("topk")
    rows = random_rows(meta, 2)
    with CacheWriter(str(tmp_path), meta, rows_per_shard=2) as writer:
        writer.write(rows[0])
        writer.write(rows[1])   # the shard is committed here
        with pytest.raises(CacheError, match="'row-00000': already written by task task-00000"):
            writer.write(rows[0])
    assert [r.id for r in CacheReader(str(tmp_path)).iter_sequences()] == ["row-00000", "row-00001"]


def test_writer_refuses_a_cache_made_differently(tmp_path, monkeypatch):
    write_cache(tmp_path, cache_meta("topk", k=8), random_rows(cache_meta("topk", k=8), 2))
    with pytest.raises(CacheError, match=r"task-00000.json: cache was written with k=8, this writer has k=16; "
                                         r"use a new cache path$"):
        CacheWriter(str(tmp_path), cache_meta("topk", k=16), task="task-00001")
    manifest = tmp_path / "manifests" / "task-00000.json"   # versions edited away by hand: the same line
    manifest.write_text(manifest.read_text().replace('"versions": {', '"versions": null, "was": {'))
    with pytest.raises(CacheError, match=r"this writer has k=16; use a new cache path$"):
        CacheWriter(str(tmp_path), cache_meta("topk", k=16), task="task-00001")
    write_cache(tmp_path, cache_meta("topk", k=8), [], task="task-00000")
    # a task of another qadpipe: said, as a refusal whose settings all match may come from its rules
    from qadpipe.cache import writer as writer_module

    now = writer_module.package_versions()
    monkeypatch.setattr(writer_module, "package_versions",
                        lambda: {**now, "qadpipe_git": "0123456789ab", "qadpipe": "9.9"})
    then, later = (now["qadpipe_git"], "0123456789ab") if now.get("qadpipe_git") else (now["qadpipe"], "9.9")
    with pytest.raises(CacheError, match=rf"this writer has k=16; that task ran qadpipe {then}, this is {later}; "
                                         r"use a new"):
        CacheWriter(str(tmp_path), cache_meta("topk", k=16), task="task-00001")


def test_sampled_tasks_drawn_from_different_distributions_do_not_mix(tmp_path):
    """HF draws from the full vocabulary, vLLM from its top-k and a tail bucket: a task that
    fell back to the other backend must not add its rows to the same cache."""
    from_vllm = cache_meta("sampled", sampled_from="topk+tail")
    write_cache(tmp_path, from_vllm, random_rows(from_vllm, 2))
    with pytest.raises(CacheError, match=r"cache was written with sampled_from='topk\+tail', this writer has "
                                         r"sampled_from='vocab'"):
        CacheWriter(str(tmp_path), cache_meta("sampled", sampled_from="vocab"), task="task-00001")


def test_tasks_may_differ_in_a_setting_their_targets_do_not_depend_on(tmp_path):
    """A top-k cache's num_samples, and the k of one sampled from the full vocabulary, do not
    change a row: tasks that set them differently fill one cache.  The k of draws from vLLM's
    top-k does."""
    topk = cache_meta("topk", k=8, num_samples=50)
    write_cache(tmp_path / "topk", topk, random_rows(topk, 2))
    CacheWriter(str(tmp_path / "topk"), cache_meta("topk", k=8, num_samples=20), task="task-00001").close()
    def sampled(sampled_from: str, k: int):   # cache_meta gives a sampled cache k=0
        return dataclasses.replace(cache_meta("sampled", sampled_from=sampled_from), k=k)

    write_cache(tmp_path / "vocab", sampled("vocab", 64), random_rows(sampled("vocab", 64), 2))
    CacheWriter(str(tmp_path / "vocab"), sampled("vocab", 32), task="task-00001").close()
    write_cache(tmp_path / "top", sampled("topk+tail", 64), random_rows(sampled("topk+tail", 64), 2))
    with pytest.raises(CacheError, match=r"cache was written with k=64, this writer has k=32"):
        CacheWriter(str(tmp_path / "top"), sampled("topk+tail", 32), task="task-00001")
    with pytest.raises(CacheError, match=r"cache was written with sampled_from='topk\+tail', this writer has "
                                         r"sampled_from='vocab'"):
        CacheWriter(str(tmp_path / "top"), sampled("vocab", 32), task="task-00001")


def _with_entry(values: np.ndarray, index: tuple[int, int], value: float) -> np.ndarray:
    changed = values.copy()
    changed[index] = value
    return changed


@pytest.mark.parametrize("field,make,message", [
    ("topk_ids", lambda row: np.zeros((3, 8), np.int32), r"topk_ids has shape \(3, 8\), expected \(\d+, 8\)"),
    ("topk_logprobs", lambda row: row.topk_logprobs[:, ::-1].copy(),
     "topk_logprobs is not sorted by descending log-prob along k"),
    # one inversion of 1e-4 between neighbours
    ("topk_logprobs", lambda row: _with_entry(row.topk_logprobs, (0, 3), row.topk_logprobs[0, 2] + 1e-4),
     "topk_logprobs is not sorted by descending log-prob along k"),
    ("topk_logprobs", lambda row: _with_entry(row.topk_logprobs, (0, 0), 0.5),
     "topk_logprobs has NaN or positive values"),
    ("topk_logprobs", lambda row: _with_entry(row.topk_logprobs, (1, 0), np.nan),
     "topk_logprobs has NaN or positive values"),
    ("tail_mass", lambda row: row.tail_mass + 2.0, r"tail_mass outside \[0, 1\]"),
    ("tail_mass", lambda row: row.tail_mass - 2.0, r"tail_mass outside \[0, 1\]"),   # the reader refuses it
    ("input_ids", lambda row: np.concatenate([np.array([0, 49152, 5]), row.input_ids[3:]]),
     r"input_ids: ids span \[0, 49152\], expected \[0, 49152\)"),
    # broke a whole compact shard
    ("topk_ids", lambda row: row.topk_ids.astype(np.float64), r"topk_ids: expected integer token ids, got float64"),
])
def test_writer_refuses_bad_rows(tmp_path, field, make, message):
    meta = cache_meta("topk")
    row = random_rows(meta, 1, seq_len=8)[0]
    setattr(row, field, make(row))
    with CacheWriter(str(tmp_path), meta) as writer, pytest.raises(CacheError, match=f"cache row 'row-00000': {message}"):
        writer.write(row)


def test_writer_refuses_sampled_counts_that_do_not_sum_to_the_draws(tmp_path):
    meta = cache_meta("sampled")
    row = random_rows(meta, 1, seq_len=8)[0]
    row.sample_counts = row.sample_counts.copy()
    row.sample_counts[0] += 1          # the first position now holds num_samples + 1 draws
    with CacheWriter(str(tmp_path), meta) as writer, pytest.raises(
            CacheError, match=r"sample_counts must be >= 1 and sum to num_samples=50 per row"):
        writer.write(row)


def test_writer_refuses_a_sampled_id_drawn_zero_times(tmp_path):
    """A count of 0 keeps the row's sum at num_samples but lists an id never drawn: the reader
    refuses such a shard ("a count is < 1"), so the writer must refuse the row first."""
    meta = cache_meta("sampled")
    row = random_rows(meta, 1, seq_len=8)[0]
    counts = row.sample_counts.copy()
    assert row.sample_offsets[1] >= 2          # the first position drew at least two distinct ids
    counts[1] += counts[0]
    counts[0] = 0
    row.sample_counts = counts
    with CacheWriter(str(tmp_path), meta) as writer, pytest.raises(
            CacheError, match=r"sample_counts must be >= 1 and sum to num_samples=50 per row"):
        writer.write(row)


def test_file_uri_and_plain_path_name_the_same_cache(tmp_path):
    meta = cache_meta("topk")
    write_cache(f"file://{tmp_path}", meta, random_rows(meta, 3))
    assert CacheReader(str(tmp_path)).num_rows == 3


@pytest.mark.parametrize("decode_threads", [1, 3])
def test_decode_threads_yield_the_same_rows_in_order(tmp_path, decode_threads):
    meta = cache_meta("topk", k=16)
    rows = random_rows(meta, 23, seq_len=24)
    write_cache(tmp_path, meta, rows, rows_per_shard=10)
    reader = CacheReader(str(tmp_path), batch_rows=2, decode_threads=decode_threads)
    read = list(reader.iter_sequences())
    assert [r.id for r in read] == [r.id for r in rows]
    for written, got in zip(rows, read):
        assert_same_targets(written, got, "compact")


def test_decode_threads_must_be_positive(tmp_path):
    meta = cache_meta("topk")
    write_cache(tmp_path, meta, random_rows(meta, 2))
    with pytest.raises(CacheError, match="decode_threads=0: expected >= 1"):
        CacheReader(str(tmp_path), decode_threads=0)


def test_a_task_is_complete_once_marked_and_a_later_commit_clears_the_mark(tmp_path):
    """A task stopped at a time limit commits its rows like a finished one; only its manifest's
    ``complete`` tells them apart (inspect and distill say so)."""
    meta = cache_meta("topk", k=8)
    rows = random_rows(meta, 5)
    manifest = tmp_path / "manifests" / "task-00000.json"
    with CacheWriter(str(tmp_path), meta, rows_per_shard=2) as writer:   # stopped early: never marked
        for row in rows[:3]:
            writer.write(row)
    assert json.loads(manifest.read_text())["complete"] is False
    assert CacheReader(str(tmp_path)).view.incomplete_tasks == ["task-00000"]
    shown = CliRunner().invoke(cli, ["inspect", str(tmp_path)]).output
    assert "tasks       1 (not marked complete: still running, or stopped before their last record: task-00000)" in shown
    with CacheWriter(str(tmp_path), meta, rows_per_shard=2) as writer:   # the rerun finishes it
        for row in rows[3:]:
            writer.write(row)
        writer.mark_complete()
    assert json.loads(manifest.read_text())["complete"] is True
    assert CacheReader(str(tmp_path)).view.incomplete_tasks == []
    with CacheWriter(str(tmp_path), meta, rows_per_shard=2) as writer:   # more rows: not complete any more
        writer.write(random_rows(meta, 1, prefix="late")[0])
    assert json.loads(manifest.read_text())["complete"] is False
    data = json.loads(manifest.read_text())
    del data["complete"]                                                 # a manifest older than the field
    manifest.write_text(json.dumps(data))
    assert CacheReader(str(tmp_path)).view.incomplete_tasks == []


@pytest.mark.parametrize("kind", ["topk", "sampled"])
@pytest.mark.parametrize("encoding", ["plain", "compact"])
def test_a_sliced_record_batch_decodes_to_its_own_rows(kind, encoding):
    """Offsets of a sliced batch do not start at 0: each encoding must decode it all the same."""
    import pyarrow as pa

    from qadpipe.cache.encoding import decode_batch, encode_rows, shard_id_order

    meta = cache_meta(kind, encoding=encoding, k=8)
    rows = random_rows(meta, 9, seq_len=12)
    table = encode_rows(rows, meta)
    batch = pa.RecordBatch.from_arrays([column.combine_chunks() for column in table.columns], schema=table.schema)
    order = shard_id_order(table.schema, meta, "test") if encoding == "compact" else None
    for read, written in zip(decode_batch(batch.slice(5, 3), meta, order), decode_batch(batch, meta, order)[5:8]):
        assert_same_targets(written, read, "plain")   # decoded twice by one codec: exactly equal


@pytest.mark.parametrize("encoding", ["plain", "compact"])
def test_a_shard_beyond_arrows_int32_offsets_is_refused_before_anything_is_written(tmp_path, monkeypatch, encoding):
    """Arrow's list and binary offsets are int32: past 2**31 - 1 they would wrap silently.  The
    writer's entry budget keeps its shards far below (next test); this is the encoder's own
    guard, the limit lowered here to one below the rows' top-k entries (a plain column's
    entries, a compact one's bytes at one byte or more each)."""
    from qadpipe.cache import encoding as encoding_module

    meta = cache_meta("topk", encoding=encoding, k=8)
    rows = random_rows(meta, 4, seq_len=16)
    monkeypatch.setattr(encoding_module, "COLUMN_CAPACITY", sum(row.num_target_rows for row in rows) * 8 - 1)
    with pytest.raises(CacheError, match=r"cache shard: a column would hold \d+ (list entries|bytes), over Arrow's "
                                         r"\d+ per column of one shard; write fewer or shorter rows to a shard"):
        write_cache(tmp_path, meta, rows, rows_per_shard=4)
    assert not list((tmp_path / "shards").glob("*.parquet")) and not list((tmp_path / "manifests").glob("*.json"))


@pytest.mark.parametrize("kind", ["topk", "sampled"])
@pytest.mark.parametrize("encoding", ["plain", "compact"])
def test_long_rows_close_a_shard_before_its_columns_overflow(tmp_path, monkeypatch, kind, encoding):
    """rows_per_shard counts rows, but a column's limit counts entries: 1024 rows of 8k tokens
    at k=128 overflowed it, and the flush failed with every row the teacher made for that shard
    (a scale review).  Here the limit is lowered until 4 rows overflow one shard, and the
    writer's entry budget to what 2 rows hold: the writer closes shards of 2 rows."""
    from qadpipe.cache import encoding as encoding_module
    from qadpipe.cache import writer as writer_module
    from qadpipe.cache.schema import compact_dtypes

    meta = cache_meta(kind, encoding=encoding, k=8, num_samples=8)
    rows = random_rows(meta, 4, seq_len=16)
    per_row = [writer_module.row_entries(row) for row in rows]
    entry_bytes = max(d.itemsize for d in compact_dtypes(meta).values()) if encoding == "compact" else 1
    monkeypatch.setattr(encoding_module, "COLUMN_CAPACITY", sum(per_row) * entry_bytes - 1)
    monkeypatch.setattr(writer_module, "SHARD_ENTRY_BUDGET", sum(per_row[:2]))
    write_cache(tmp_path, meta, rows, rows_per_shard=1024)
    reader = CacheReader(str(tmp_path))
    assert [shard.rows for shard in reader.shards] == [2, 2]
    for written, got in zip(rows, reader.iter_sequences()):
        assert_same_targets(written, got, encoding)


def test_tasks_that_split_the_records_different_ways_are_flagged(tmp_path):
    """Two arrays with different --num-shards that start together each open before the other's
    first manifest exists, so neither writer sees the other's split; the cache then misses
    records (4-way task 1 and 2-way task 0 leave records 3, 7, ... in no task), and inspect
    reported it complete."""
    meta = cache_meta("topk", k=8)
    rows = random_rows(meta, 4)
    with CacheWriter(str(tmp_path), meta, task="task-00000", num_tasks=2) as halves, \
            CacheWriter(str(tmp_path), meta, task="task-00001", num_tasks=4) as quarters:
        for writer, row in zip((halves, quarters, halves, quarters), rows):
            writer.write(row)
        halves.mark_complete()
        quarters.mark_complete()
    view = CacheReader(str(tmp_path)).view
    assert view.split_ways == [2, 4] and view.incomplete_tasks == []
    shown = CliRunner().invoke(cli, ["inspect", str(tmp_path)]).output
    assert ("tasks       2 (written by runs that split the records 2 and 4 ways: some records are in no task; "
            "regenerate into a new cache with one --num-shards)") in shown
    assert json.loads(CliRunner().invoke(cli, ["inspect", str(tmp_path), "--json"]).output)["tasks"]["split_ways"] \
        == [2, 4]
    write_cache(tmp_path / "consistent", meta, rows)
    assert CacheReader(str(tmp_path / "consistent")).view.split_ways == []


@pytest.mark.parametrize("task", ["../escape", "a/b", "..", ".hidden", "", "task 1", "task-00001/../../x"])
def test_a_task_name_that_could_escape_the_cache_directory_is_refused(tmp_path, task):
    """Task names become file names (manifests/<task>.json, shards/<task>-N.parquet, the lock)."""
    from qadpipe.cache.manifest import manifest_path, shard_path

    with pytest.raises(CacheError, match="cache task name .*expected letters, digits"):
        manifest_path(task)
    with pytest.raises(CacheError, match="cache task name"):
        shard_path(task, 0)
    meta = cache_meta("topk", k=8)
    with pytest.raises(CacheError, match="cache task name"):
        CacheWriter(str(tmp_path / "cache"), meta, task=task)
    assert not (tmp_path / "escape").exists() and not list(tmp_path.rglob("*.json"))


def test_a_well_formed_task_name_is_accepted():
    from qadpipe.cache.manifest import manifest_path, shard_path

    assert manifest_path("task-00003") == "manifests/task-00003.json"
    assert shard_path("my_run.2", 7) == "shards/my_run.2-000007.parquet"


def test_a_rerun_after_a_shard_was_taken_out_by_hand_writes_past_the_last_listed_one(tmp_path):
    """A user drops one bad shard (its manifest entry and file) to regenerate its rows.  The next
    shard was named after the count of listed ones, so the rerun wrote over shard 2 (still listed):
    its rows were lost and the manifest listed it twice, which no reader opens."""
    import json

    meta = cache_meta("topk")
    rows = random_rows(meta, 6)
    write_cache(tmp_path, meta, rows, rows_per_shard=2)
    manifest = tmp_path / "manifests" / "task-00000.json"
    raw = json.loads(manifest.read_text())
    dropped = raw["shards"].pop(1)
    raw["complete"] = False
    manifest.write_text(json.dumps(raw))
    (tmp_path / dropped["name"]).unlink()
    with CacheWriter(str(tmp_path), meta, task="task-00000", rows_per_shard=2) as writer:
        for row in rows:
            if row.id not in writer.done_ids():
                writer.write(row)
        writer.mark_complete()
    reader = CacheReader(str(tmp_path))
    assert sorted(r.id for r in reader.iter_sequences()) == sorted(r.id for r in rows)
    assert [s.name.rsplit("-", 1)[1] for s in reader.view.tasks[0].shards] == ["000000.parquet", "000002.parquet",
                                                                            "000003.parquet"]
