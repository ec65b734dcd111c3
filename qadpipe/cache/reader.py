"""CacheReader: a verified, streaming, rank-sharded view of a logit cache.

Opening a cache is cheap and strict: the task manifests are merged, every listed shard must
exist with its recorded size, and (``check_footers``, by default with ``verify``) each
shard's footer must carry the cache's metadata and its ids must be unique across the whole
cache — only the footers and the ``id`` column are read for that.  The sha256 of a shard is
checked (``verify``) every time its rows are streamed, every epoch (the bytes are read
anyway, on a read-ahead thread: a shard regenerated or damaged in place mid-run is refused,
not trained on), or for all shards at once by :meth:`CacheReader.verify_all` (``qadpipe
inspect --verify``).
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from qadpipe.cache.encoding import decode_batch, shard_id_order
from qadpipe.cache.manifest import CacheView, ShardEntry, load_view, meta_difference
from qadpipe.cache.schema import META_KEY, CacheMeta
from qadpipe.cache.store import Store
from qadpipe.errors import CacheError, folded
from qadpipe.targets import SequenceTargets

#: Threads decoding record batches (numpy releases the GIL in the decode's cumsums and gathers).
DEFAULT_DECODE_THREADS = 2
#: Input tokens one decoded record batch may hold (64 rows of 2,048): a shard of longer rows is
#: decoded fewer rows at a time.  Rows of 32k tokens at k=128 decode to ~130 MB each, so 64 of
#: them made a batch of 8 GB, and two threads keep up to four batches in flight.
BATCH_TOKENS = 64 * 2048
T = TypeVar("T")
R = TypeVar("R")


def shard_problem(store: Store, shard: ShardEntry, rehash: bool = False) -> str | None:
    """What is wrong with one listed shard (missing, truncated, checksum), or None."""
    size = store.size(shard.name)
    if size is None:
        return "missing (listed in the manifest, absent on storage)"
    if size != shard.bytes:
        return f"truncated or overwritten: {size} bytes on storage, manifest says {shard.bytes}"
    return checksum_problem(shard, memoryview(store.buffer(shard.name))) if rehash else None


def shard_meta_problem(expected: CacheMeta, schema_metadata: dict | None, where: str) -> str | None:
    """What a shard's own metadata (its Parquet schema's) says against the manifest's ``expected``
    (a manifest edited apart from its shards), or None."""
    raw = (schema_metadata or {}).get(META_KEY)
    if raw is None:
        return "shard carries no qadpipe cache metadata"
    difference = meta_difference(expected, CacheMeta.from_dict(json.loads(raw), where))
    return f"shard has {difference[1]}, the cache manifest says {difference[0]}" if difference else None


def checksum_problem(shard: ShardEntry, data: bytes | memoryview) -> str | None:
    """A mismatch of ``data`` (the shard's bytes) with the manifest's sha256, or None."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != shard.sha256:
        return f"checksum mismatch: sha256 {digest[:16]}..., manifest says {shard.sha256[:16]}..."
    return None


class CacheReader:
    """Streams :class:`SequenceTargets` from a cache (local path or URI)."""

    def __init__(self, root: str, *, verify: bool = True, filesystem: pafs.FileSystem | None = None,
                 batch_rows: int = 64, decode_threads: int = DEFAULT_DECODE_THREADS,
                 view: CacheView | None = None, check_footers: bool | None = None) -> None:
        """``verify``: check each shard's sha256 every time it is read.  ``check_footers``
        (default: ``verify``): read every shard's footer and id column now (cache metadata,
        row counts, ids unique across the cache), once per cache, not once per process.
        ``view``: the manifests as another reader loaded them (``load_view``), so that
        readers in several processes see the same committed shards of a growing cache."""
        self.root = str(root)
        self.store = Store(root, filesystem)
        self.view = view if view is not None else load_view(self.store)
        self.meta: CacheMeta = self.view.meta
        self.shards: list[ShardEntry] = self.view.shards
        self.num_rows = sum(shard.rows for shard in self.shards)
        self.num_tokens = sum(shard.tokens for shard in self.shards)
        self.verify = verify
        self.batch_rows = batch_rows
        if decode_threads < 1:
            raise CacheError(f"cache reader decode_threads={decode_threads}: expected >= 1")
        self.decode_threads = decode_threads
        for shard in self.shards:
            self._raise_if(shard, shard_problem(self.store, shard))
        if verify if check_footers is None else check_footers:
            self._check_footers_and_ids()

    def _raise_if(self, shard: ShardEntry, problem: str | None) -> None:
        if problem:
            raise CacheError(f"{self.store.describe(shard.name)}: {problem}")

    def _parquet(self, shard: ShardEntry, source: pa.NativeFile | None = None) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(source if source is not None else self.store.open_input(shard.name))
        except (pa.ArrowException, OSError, ValueError) as exc:
            problem = shard_problem(self.store, shard, rehash=True) or "bytes match the manifest checksum"
            raise CacheError(f"{self.store.describe(shard.name)}: {problem}; not a readable Parquet shard "
                             f"({folded(exc)})") from exc

    def _check_footers_and_ids(self) -> None:
        seen: dict[str, str] = {}
        for shard in self.shards:
            where = self.store.describe(shard.name)
            parquet = self._parquet(shard)
            problem, ids = self._footer_and_ids_problem(shard, parquet, where)
            if problem:   # bit rot reads as anything (another teacher, a version, a row count): say it first
                raise CacheError(f"{where}: {shard_problem(self.store, shard, rehash=True) or problem}")
            for row_id in ids:
                other = seen.setdefault(row_id, shard.name)
                if other != shard.name:
                    raise CacheError(f"{where}: duplicate row id {row_id!r} (also in {other})")

    def _footer_and_ids_problem(self, shard: ShardEntry, parquet: pq.ParquetFile, where: str
                                ) -> tuple[str | None, list[str]]:
        """What is wrong with a shard's footer and id column (None: nothing), and its ids."""
        try:
            problem = shard_meta_problem(self.meta, parquet.schema_arrow.metadata, where)
            ids = parquet.read(columns=["id"]).column("id").to_pylist()
        except (pa.ArrowException, OSError, ValueError, KeyError) as exc:
            return f"unreadable shard footer or id column ({folded(exc)})", []
        if problem:
            return problem, ids
        if parquet.metadata.num_rows != shard.rows:
            return f"{parquet.metadata.num_rows} rows, manifest says {shard.rows}", ids
        if len(set(ids)) != len(ids):
            return "duplicate row ids within the shard", ids
        return None, ids

    def verify_all(self) -> None:
        """Re-hash every shard now (sha256 against the manifest); CacheError on the first mismatch."""
        for shard in self.shards:
            self._raise_if(shard, shard_problem(self.store, shard, rehash=True))

    def check_compatible(self, *, tokenizer_fingerprint: str, vocab_size: int,
                         target_kind: str | None = None) -> None:
        """Refuse a student that would read the cached token ids differently."""
        pairs = [("tokenizer_fingerprint", self.meta.tokenizer_fingerprint, tokenizer_fingerprint),
                 ("vocab_size", self.meta.vocab_size, vocab_size)]
        if target_kind is not None:
            pairs.append(("target_kind", self.meta.target_kind, target_kind))
        for name, cached, wanted in pairs:
            if cached != wanted:
                raise CacheError(f"{self.root}: cache {name}={cached!r}, but the reader expects {name}={wanted!r}")

    def rank_range(self, rank: int, world_size: int) -> tuple[int, int]:
        """Rows [start, end) of ``rank``: contiguous, sizes differ by at most one row."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise CacheError(f"cache rank={rank}, world_size={world_size}: expected 0 <= rank < world_size")
        return rank * self.num_rows // world_size, (rank + 1) * self.num_rows // world_size

    def iter_sequences(self, rank: int = 0, world_size: int = 1) -> Iterator[SequenceTargets]:
        """This rank's rows (:meth:`rank_range`) in cache order."""
        return self.iter_rows(*self.rank_range(rank, world_size))

    def iter_rows(self, start: int, end: int,
                  needed: Callable[[int, int], bool] | None = None) -> Iterator[SequenceTargets | None]:
        """Rows ``[start, end)`` in cache order, streamed one record batch at a time.

        ``needed(lo, hi)`` says whether any of rows ``[lo, hi)`` is wanted; a shard it says
        no to is not read, a row group not decoded, and their rows come as None (a resumed
        loader passes over the rows it trained on before the checkpoint: reading and decoding
        them took ~3 ms a row at k=128).

        The next shard is read and sha256-checked on a second thread while this one decodes
        (hashlib and pyarrow release the GIL): verification costs no wall time on a 2-core
        box, at the price of holding two shards' bytes at once.  No row of a shard is yielded
        before its checksum matched."""
        spans, first = [], 0
        for shard in self.shards:
            last = first + shard.rows
            if first < end and last > start:
                lo, hi = max(start - first, 0), min(end, last) - first
                if needed is None or needed(first + lo, first + hi):
                    spans.append((shard, first, lo, hi))
                else:
                    spans.append((None, first, lo, hi))   # not read
            first = last
        to_open = iter([span[0] for span in spans if span[0] is not None])
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="qadpipe-cache-read") as pool, \
                ThreadPoolExecutor(max_workers=self.decode_threads, thread_name_prefix="qadpipe-cache-decode") as decoders:
            upcoming = next(to_open, None)
            pending = pool.submit(self._open_verified, upcoming) if upcoming is not None else None
            for shard, shard_first, lo, hi in spans:
                if shard is None:
                    yield from [None] * (hi - lo)
                    continue
                parquet = pending.result()
                upcoming = next(to_open, None)
                pending = pool.submit(self._open_verified, upcoming) if upcoming is not None else None
                wanted = None if needed is None else lambda a, b, at=shard_first: needed(at + a, at + b)
                yield from self._iter_shard(shard, parquet, lo, hi, decoders, wanted)

    def _open_verified(self, shard: ShardEntry) -> pq.ParquetFile:
        """One shard opened for reading, its bytes checked against the manifest's sha256 on
        every read: checking only the first epoch would train later epochs on whatever the
        file holds by then."""
        if not self.verify:
            return self._parquet(shard)
        buffer = self.store.buffer(shard.name)
        self._raise_if(shard, checksum_problem(shard, memoryview(buffer)))
        return self._parquet(shard, pa.BufferReader(buffer))

    def _iter_shard(self, shard: ShardEntry, parquet: pq.ParquetFile, lo: int, hi: int,
                    decoders: ThreadPoolExecutor,
                    needed: Callable[[int, int], bool] | None) -> Iterator[SequenceTargets | None]:
        """Rows [lo, hi) of one shard, reading only the row groups that hold them (and of
        those, decoding only the ones ``needed`` wants, if given; the others' rows are None).

        Record batches are decoded on ``decode_threads`` threads, at most twice that many in
        flight, and yielded in order: numpy releases the GIL in the decode's cumsums and
        gathers, so two threads decode ~1.4x faster than one on 2 cores (bench/cache_size.py)."""
        where = self.store.describe(shard.name)
        groups, row = [], 0   # (row group, its first row, its rows) over [lo, hi)
        for index in range(parquet.metadata.num_row_groups):
            size = parquet.metadata.row_group(index).num_rows
            if row < hi and row + size > lo:
                groups.append((index, row, size))
            row += size
        id_order = shard_id_order(parquet.schema_arrow, self.meta, where)
        rows_per_batch = self.batch_rows if shard.longest_row is None else \
            max(1, min(self.batch_rows, BATCH_TOKENS // max(shard.longest_row, 1)))

        def pieces() -> Iterator[pa.RecordBatch | int]:
            """Each wanted group's record batches; for a group nobody wants, its row count."""
            for index, first, size in groups:
                if needed is None or needed(max(first, lo), min(first + size, hi)):
                    yield from parquet.iter_batches(batch_size=rows_per_batch, row_groups=[index])
                else:
                    yield size

        def decode(piece: pa.RecordBatch | int) -> list[SequenceTargets | None]:
            return [None] * piece if isinstance(piece, int) else decode_batch(piece, self.meta, id_order)

        row = groups[0][1] if groups else 0
        try:
            for rows in ordered_map(decoders, decode, pieces(), ahead=2 * self.decode_threads):
                for item in rows[max(lo - row, 0):max(hi - row, 0)]:
                    yield item
                row += len(rows)
        except (pa.ArrowException, OSError, ValueError, KeyError, IndexError) as exc:
            raise CacheError(f"{where}: cannot decode shard ({folded(exc)})") from exc
        except CacheError as exc:   # a decoder's own check (e.g. a rank outside the id table): name the file
            raise CacheError(f"{where}: {exc}") from None


def ordered_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], ahead: int) -> Iterator[R]:
    """``map(fn, items)`` on ``pool`` with at most ``ahead`` calls in flight, results in input
    order (``Executor.map`` would submit every item at once: a whole shard decoded in memory).
    An exception from ``fn`` is raised here, at its item's turn."""
    in_flight: deque[Future[R]] = deque()
    for item in items:
        in_flight.append(pool.submit(fn, item))
        if len(in_flight) >= ahead:
            yield in_flight.popleft().result()
    while in_flight:
        yield in_flight.popleft().result()
