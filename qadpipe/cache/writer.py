"""CacheWriter: buffered rows -> zstd Parquet shards committed through a task manifest.

One writer per cluster task, and one live run per task (``task_lock``).  Order of a commit:
encode the buffered rows, write the shard (temp name, fsync, rename), then replace the task
manifest.  A kill at any point leaves the manifest listing only complete shards; a rerun of
the same task resumes from :meth:`CacheWriter.done_ids` and overwrites any unlisted leftover.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import time
from dataclasses import replace
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from qadpipe.cache.encoding import encode_rows, validate_row
from qadpipe.cache.manifest import (MANIFEST_DIR, SHARD_DIR, ShardEntry, TaskManifest, load_manifests, manifest_path,
                                    meta_difference, shard_path)
from qadpipe.cache.reader import checksum_problem, shard_problem
from qadpipe.cache.schema import CacheMeta
from qadpipe.cache.store import Store
from qadpipe.cache.task_lock import lock_task
from qadpipe.errors import CacheError, folded
from qadpipe.provenance import package_versions
from qadpipe.targets import SequenceTargets

log = logging.getLogger(__name__)

#: Rows per Parquet row group: the unit a rank skips to when it reads its slice of a shard.
ROW_GROUP_ROWS = 128

#: Entries (top-k slots or distinct sampled ids, or tokens where more) one shard may buffer
#: before it is committed, whatever ``rows_per_shard`` says.  Long rows at a large k would
#: otherwise fill a column past the 2^31 one shard can hold (``COLUMN_CAPACITY``; a compact
#: rank plane takes up to 4 bytes an entry): 1024 rows of 8,192 tokens at k=128 are 2^30
#: entries, and the flush failed after the teacher had made them all.  2^28 also bounds a
#: flush's memory (about 3x the ~8 bytes an entry the buffered rows hold); the default 1024
#: rows of 2,048 tokens at k=64 stay under it.
SHARD_ENTRY_BUDGET = 2**28


def row_entries(row: SequenceTargets) -> int:
    """What ``row`` adds to its shard's fullest column (see :data:`SHARD_ENTRY_BUDGET`)."""
    targets = np.asarray(row.topk_ids if row.kind == "topk" else row.sample_ids).size
    return max(int(targets), int(np.asarray(row.input_ids).size))


def shard_bytes(table: pa.Table, zstd_level: int) -> bytes:
    """One encoded table -> the bytes of a Parquet shard.

    The table's schema metadata (cache meta, id table) goes into the Parquet key-value
    metadata once; the serialized Arrow schema is not stored (it would repeat the metadata,
    and the Parquet logical types already restore uint8/uint16/uint32)."""
    sink = io.BytesIO()
    with pq.ParquetWriter(sink, table.schema, compression="zstd", compression_level=zstd_level,
                          write_statistics=False, use_dictionary=False, store_schema=False) as out:
        out.write_table(table, row_group_size=ROW_GROUP_ROWS)
        out.add_key_value_metadata(table.schema.metadata)
    return sink.getvalue()


class CacheWriter:
    """Writes one task's rows into a cache (local path or URI); use as a context manager."""

    def __init__(self, root: str, meta: CacheMeta, *, task: str = "task-00000", rows_per_shard: int = 1024,
                 zstd_level: int = 3, filesystem: pafs.FileSystem | None = None,
                 num_tasks: int | None = None) -> None:
        if rows_per_shard < 1:
            raise CacheError(f"cache rows_per_shard={rows_per_shard}: expected >= 1")
        self.store = Store(root, filesystem)
        self.meta = meta
        self.rows_per_shard = rows_per_shard
        self.zstd_level = zstd_level
        self.num_tasks = num_tasks
        self._manifest_rel = manifest_path(task)
        self._lock = lock_task(self.store, task)   # before the manifest is read: it is this run's from here on
        try:
            self._manifest = self._open_manifest(task)
            self._done = self._committed_ids()
        except BaseException:
            self._release_lock()
            raise
        self._buffer: list[SequenceTargets] = []
        self._buffered_ids: set[str] = set()
        self._buffered_entries = 0
        # past the highest listed shard, not their count: a manifest with a shard taken out by
        # hand (to regenerate its rows) would have the next one written over a listed one
        self._next_index = max((int(shard.name[-len("000000.parquet"):-len(".parquet")])
                                for shard in self._manifest.shards), default=-1) + 1
        self._closed = False
        self._marked_complete = False
        # Temp files a killed run of this task left mid-write (only this task writes these names).
        own_shard = re.compile(rf"{re.escape(task)}-\d{{6}}\.parquet")
        self.store.remove_temps(SHARD_DIR, lambda target: own_shard.fullmatch(target) is not None)
        self.store.remove_temps(MANIFEST_DIR, lambda target: target == f"{task}.json")
        self.store.remove_temps(f"runs/{task}", lambda target: True)

    def _open_manifest(self, task: str) -> TaskManifest:
        """This task's manifest (resume) or a new one; refuse a cache made differently."""
        own = None
        for existing in load_manifests(self.store):
            difference = meta_difference(existing.meta, self.meta)
            if difference:
                raise CacheError(
                    f"{self.store.describe(manifest_path(existing.task))}: cache was written with "
                    f"{difference[0]}, this writer has {difference[1]}{_another_qadpipe(existing.versions)}; "
                    "use a new cache path"
                )
            if None not in (existing.num_tasks, self.num_tasks) and existing.num_tasks != self.num_tasks:
                raise CacheError(
                    f"{self.store.describe(manifest_path(existing.task))}: written by a run that split the records "
                    f"{existing.num_tasks} ways, this one splits them {self.num_tasks} ways (tasks would hold the "
                    f"same rows twice); rerun with --num-shards {existing.num_tasks}, or use a new cache path"
                )
            if existing.task == task:
                own = existing
        if own is None:
            return TaskManifest(task=task, meta=self.meta, versions=package_versions(), num_tasks=self.num_tasks)
        own.meta, own.versions, own.num_tasks = self.meta, package_versions(), self.num_tasks
        return own

    def _committed_ids(self) -> set[str]:
        """Ids in this task's committed shards, each checked against its manifest entry first:
        a resumed task builds on them, so a damaged one must stop it, in one line."""
        done: set[str] = set()
        for shard in self._manifest.shards:
            where = self.store.describe(shard.name)
            problem = shard_problem(self.store, shard)
            data = b"" if problem else self.store.read_bytes(shard.name)
            problem = problem or checksum_problem(shard, data)
            if problem:
                raise CacheError(f"{where}: committed shard of task {self._manifest.task}: {problem}; this task "
                                 f"cannot resume on it: delete {self.store.describe(self._manifest_rel)} and this "
                                 "task's shards to regenerate the task, or use a new cache path")
            try:
                table = pq.read_table(io.BytesIO(data), columns=["id"])
            except (pa.ArrowException, ValueError) as exc:
                raise CacheError(f"{where}: committed shard matches its checksum but has no readable id column "
                                 f"({folded(exc)})") from None
            ids = table.column("id").to_pylist()
            if len(ids) != shard.rows:   # the manifest's counts add up to what readers index by
                raise CacheError(f"{where}: committed shard of task {self._manifest.task} holds {len(ids)} rows, its "
                                 f"manifest says {shard.rows}; delete {self.store.describe(self._manifest_rel)} and "
                                 "this task's shards to regenerate the task, or use a new cache path")
            repeated = next((row_id for row_id in ids if row_id in done), None)
            if repeated is not None:   # a reader would refuse the cache: resuming must not build on it
                raise CacheError(f"{where}: row id {repeated!r} is already in another committed shard of task "
                                 f"{self._manifest.task}; delete {self.store.describe(self._manifest_rel)} and this "
                                 "task's shards to regenerate the task, or use a new cache path")
            done.update(ids)
        return done

    def done_ids(self) -> set[str]:
        """Ids this task has already committed: a resumed run skips them."""
        return set(self._done)

    def write(self, row: SequenceTargets) -> None:
        """Buffer one row; a shard is committed every ``rows_per_shard`` rows, or sooner once
        its rows hold :data:`SHARD_ENTRY_BUDGET` entries."""
        if self._closed or self._marked_complete:   # a row after that would sit beside complete: true
            state = "marked complete" if self._marked_complete else "closed"
            raise CacheError(f"{self.store.describe(self._manifest_rel)}: writer already {state}")
        validate_row(row, self.meta)
        if row.id in self._done or row.id in self._buffered_ids:
            raise CacheError(f"cache row id {row.id!r}: already written by task {self._manifest.task}")
        entries = row_entries(row)
        self._buffer.append(row)
        self._buffered_ids.add(row.id)
        self._buffered_entries += entries
        if len(self._buffer) >= self.rows_per_shard or self._buffered_entries >= SHARD_ENTRY_BUDGET:
            self.flush()

    def flush(self) -> None:
        """Commit the buffered rows as one shard now (e.g. on SIGTERM before preemption)."""
        if not self._buffer:
            return
        started = time.perf_counter()
        table = encode_rows(self._buffer, self.meta)
        data = shard_bytes(table, self.zstd_level)
        name = shard_path(self._manifest.task, self._next_index)
        self.store.write_atomic(name, data)
        tokens = sum(row.num_target_rows for row in self._buffer)
        rows = len(self._buffer)
        updated = self._with_manifest(ShardEntry(name=name, rows=rows, tokens=tokens, bytes=len(data),
                                                 sha256=hashlib.sha256(data).hexdigest(),
                                                 longest_row=max(len(row.input_ids) for row in self._buffer)))
        self._write_manifest(updated)
        # All bookkeeping of the commit in one assignment, which no signal handler (a second
        # Ctrl-C's KeyboardInterrupt) can split: retried after a partial update, the flush in
        # close() listed the shard twice, or wrote its rows again as the next shard.
        self._manifest, self._next_index, self._done, self._buffer, self._buffered_ids, self._buffered_entries = (
            updated, self._next_index + 1, self._done | self._buffered_ids, [], set(), 0)
        seconds = time.perf_counter() - started
        # The shard's own cost (encode, compress, write, manifest), not the teacher's speed.
        log.info("cache: committed %s (%d rows, %d target positions, %.1f B/position; encoded and written in "
                 "%.2f s)", name, rows, tokens, len(data) / max(tokens, 1), seconds)

    def _write_manifest(self, manifest: TaskManifest) -> None:
        """Replace the task manifest file; the in-memory one changes only after this returns,
        so a commit that fails (a storage error) and is retried lists its shard once."""
        self.store.write_atomic(self._manifest_rel, manifest.to_json().encode())

    def _with_manifest(self, entry: ShardEntry | None = None, complete: bool = False) -> TaskManifest:
        """The task manifest with ``entry`` listed and ``complete`` set (not yet written)."""
        shards = self._manifest.shards + ([entry] if entry else [])
        return replace(self._manifest, shards=shards, complete=complete)

    def mark_complete(self) -> None:
        """Commit what is buffered and record that the task holds every row it was given, so a
        reader can tell a finished task from one stopped early (SIGTERM at a time limit)."""
        self.flush()
        updated = self._with_manifest(complete=True)
        self._write_manifest(updated)
        self._manifest, self._marked_complete = updated, True

    def close(self) -> None:
        """Commit what is buffered; the writer takes no more rows, and another run may take the task."""
        if not self._closed:
            self.flush()   # a failed flush keeps the lock: close() may be retried, else process exit drops it
            self._closed = True
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # Rows buffered before an error are complete and valid: keep them.
        self.close()


def _another_qadpipe(versions: dict[str, Any]) -> str:
    """'; that task ran qadpipe <commit>, this is <commit>' when they differ: a refusal whose
    settings all match may then come from a rule the newer qadpipe computes otherwise."""
    if not isinstance(versions, dict):   # a manifest edited by hand: nothing to say
        return ""
    now = package_versions()
    for key in ("qadpipe_git", "qadpipe"):
        if versions.get(key) and now.get(key):
            if versions[key] != now[key]:
                return f"; that task ran qadpipe {versions[key]}, this is {now[key]}"
            return ""
    return ""
