"""SequenceTargets <-> Arrow record batches, in the plain and compact encodings.

Pure functions.  Encoding concatenates whole rows into flat list columns; decoding works on
a whole record batch with numpy (one cumsum / cast / exp per column), and only the final
split into per-sequence views loops in Python, once per *row*, never per position.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from qadpipe.cache import compact
from qadpipe.cache.schema import ID_ORDER_KEY, CacheMeta, arrow_schema, compact_dtypes
from qadpipe.errors import CacheError
from qadpipe.targets import TAIL_ID, SequenceTargets


def validate_row(row: SequenceTargets, meta: CacheMeta) -> None:
    """Refuse a row that does not fit the cache (CacheError naming the row and the field)."""
    where = f"cache row {row.id!r}"
    if not isinstance(row.id, str) or not row.id:
        raise CacheError(f"cache row id {row.id!r}: expected a non-empty string")
    ids = np.asarray(row.input_ids)
    if ids.ndim != 1 or ids.size < 1 or not np.issubdtype(ids.dtype, np.integer):
        raise CacheError(f"{where}: input_ids must be a non-empty 1-D integer array, got {ids.dtype} {ids.shape}")
    _check_ids(ids, meta.vocab_size, f"{where}: input_ids")
    n = row.num_target_rows
    if row.target_start < 0 or n < 0:
        raise CacheError(f"{where}: target_start={row.target_start} outside [0, {ids.size - 1}]")
    if row.kind != meta.target_kind:
        raise CacheError(f"{where}: has {row.kind} targets, the cache holds {meta.target_kind} targets")
    if meta.target_kind == "topk":
        _validate_topk(row, meta, n, where)
    else:
        _validate_sampled(row, meta, n, where)


def _check_ids(ids: np.ndarray, vocab_size: int, what: str, allow_tail: bool = False) -> None:
    if not np.issubdtype(ids.dtype, np.integer):   # floats would be truncated, or break a whole shard
        raise CacheError(f"{what}: expected integer token ids, got {ids.dtype}")
    if ids.size == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if high >= vocab_size or (low < 0 and not (allow_tail and low == TAIL_ID)):
        raise CacheError(f"{what}: ids span [{low}, {high}], expected [0, {vocab_size})")


def _validate_topk(row: SequenceTargets, meta: CacheMeta, n: int, where: str) -> None:
    for name in ("topk_ids", "topk_logprobs"):
        shape = np.shape(getattr(row, name))
        if shape != (n, meta.k):
            raise CacheError(f"{where}: {name} has shape {shape}, expected ({n}, {meta.k}) = (target rows, k)")
    if np.shape(row.tail_mass) != (n,):
        raise CacheError(f"{where}: tail_mass has shape {np.shape(row.tail_mass)}, expected ({n},)")
    _check_ids(np.asarray(row.topk_ids), meta.vocab_size, f"{where}: topk_ids")
    lp = np.asarray(row.topk_logprobs)
    if np.isnan(lp).any() or (lp > 1e-3).any():
        raise CacheError(f"{where}: topk_logprobs has NaN or positive values; expected log-probs <= 0")
    if n and (np.diff(lp, axis=1) > 0).any():
        raise CacheError(f"{where}: topk_logprobs is not sorted by descending log-prob along k")
    tail = np.asarray(row.tail_mass)
    if np.isnan(tail).any() or (tail < 0).any() or (tail > 1).any():
        raise CacheError(f"{where}: tail_mass outside [0, 1]")


def _validate_sampled(row: SequenceTargets, meta: CacheMeta, n: int, where: str) -> None:
    offsets = np.asarray(row.sample_offsets)
    ids, counts = np.asarray(row.sample_ids), np.asarray(row.sample_counts)
    if offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != ids.size or ids.shape != counts.shape:
        raise CacheError(
            f"{where}: sample_offsets {offsets.shape} must run from 0 to len(sample_ids)={ids.size} "
            f"over {n} target rows, with sample_counts of the same length ({counts.shape})"
        )
    if n and (np.diff(offsets) < 1).any():
        raise CacheError(f"{where}: a target row has no samples (sample_offsets not strictly increasing)")
    _check_ids(ids, meta.vocab_size, f"{where}: sample_ids", allow_tail=True)
    if n and ((counts < 1).any() or (np.add.reduceat(counts, offsets[:-1]) != meta.num_samples).any()):
        raise CacheError(f"{where}: sample_counts must be >= 1 and sum to num_samples={meta.num_samples} per row")


#: Entries (list columns) or bytes (byte-plane columns) one shard's column may hold: Arrow's
#: list and binary offsets are int32.
COLUMN_CAPACITY = 2**31 - 1


def _check_capacity(total: int, unit: str) -> None:
    """Refuse a shard too large for an int32-offset column (it would wrap, not fail)."""
    if total > COLUMN_CAPACITY:
        raise CacheError(f"cache shard: a column would hold {total} {unit}, over Arrow's {COLUMN_CAPACITY} per "
                         "column of one shard; write fewer or shorter rows to a shard")


def _list(values: list[np.ndarray], dtype: pa.DataType) -> pa.ListArray:
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(np.fromiter((v.size for v in values), dtype=np.int64, count=len(values)), out=offsets[1:])
    _check_capacity(int(offsets[-1]), "list entries")
    flat = np.concatenate([v.ravel() for v in values]) if values else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                    pa.array(flat.astype(dtype.to_pandas_dtype(), copy=False)))


def _planes(values: list[np.ndarray], dtype: np.dtype) -> pa.BinaryArray:
    blobs = [compact.pack_planes(v, dtype) for v in values]
    _check_capacity(sum(len(blob) for blob in blobs), "bytes")
    return pa.array(blobs, pa.binary())


def encode_rows(rows: list[SequenceTargets], meta: CacheMeta) -> pa.Table:
    """Rows (already validated) -> one Arrow table with the cache's explicit schema (a
    compact top-k table carries its shard's id table in the schema metadata)."""
    schema = arrow_schema(meta)
    columns: dict[str, pa.Array] = {
        "id": pa.array([r.id for r in rows], pa.string()),
        "input_ids": _list([np.asarray(r.input_ids) for r in rows], schema.field("input_ids").type.value_type),
        "target_start": pa.array([r.target_start for r in rows], pa.int32()),
    }
    if meta.encoding == "plain" and meta.target_kind == "topk":
        columns["topk_ids"] = _list([np.asarray(r.topk_ids) for r in rows], pa.int32())
        columns["topk_logprobs"] = _list([np.asarray(r.topk_logprobs) for r in rows], pa.float32())
        columns["tail_mass"] = _list([np.asarray(r.tail_mass) for r in rows], pa.float64())
    elif meta.encoding == "plain":
        columns["sample_unique"] = _list([np.diff(np.asarray(r.sample_offsets)) for r in rows], pa.int32())
        columns["sample_ids"] = _list([np.asarray(r.sample_ids) for r in rows], pa.int32())
        columns["sample_counts"] = _list([np.asarray(r.sample_counts) for r in rows], pa.int32())
    elif meta.target_kind == "topk":
        dtypes = compact_dtypes(meta)
        order = compact.id_order(np.concatenate([np.asarray(r.topk_ids).ravel() for r in rows]))
        ranks_of = np.zeros(meta.vocab_size, dtype=np.int64)
        ranks_of[order] = np.arange(order.size)
        encoded = [compact.encode_topk(np.asarray(r.topk_ids), r.topk_logprobs, ranks_of) for r in rows]
        columns["topk_ranks"] = _planes([ranks for ranks, _ in encoded], dtypes["topk_ranks"])
        columns["topk_code_steps"] = _planes([steps for _, steps in encoded], dtypes["topk_code_steps"])
        columns["tail_codes"] = _planes([compact.tail_codes(r.tail_mass) for r in rows], dtypes["tail_codes"])
        schema = schema.with_metadata({**schema.metadata, ID_ORDER_KEY: compact.pack_order(order)})
    else:
        dtypes = compact_dtypes(meta)
        columns["sample_unique"] = _planes([np.diff(np.asarray(r.sample_offsets)) for r in rows],
                                           dtypes["sample_unique"])
        columns["sample_ids"] = _planes([np.where(np.asarray(r.sample_ids) == TAIL_ID, meta.vocab_size, r.sample_ids)
                                         for r in rows], dtypes["sample_ids"])
        columns["sample_counts"] = _planes([np.asarray(r.sample_counts) for r in rows], dtypes["sample_counts"])
    return pa.table(columns, schema=schema)


def column_values(batch: pa.RecordBatch, name: str, meta: CacheMeta) -> tuple[np.ndarray, np.ndarray]:
    """(values, row offsets into values) of a list column or a byte-plane column."""
    column = batch.column(name)
    if not pa.types.is_binary(column.type):
        return column.values.to_numpy(zero_copy_only=False), column.offsets.to_numpy()
    dtype = compact_dtypes(meta)[name]
    _, offset_buffer, data = column.buffers()
    offsets = np.frombuffer(offset_buffer, dtype=np.int32)[column.offset:column.offset + len(column) + 1]
    raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    if (np.diff(offsets) % dtype.itemsize).any():
        raise ValueError(f"{name}: a row's bytes are not a whole number of {dtype.itemsize}-byte values")
    blobs = [raw[offsets[i]:offsets[i + 1]] for i in range(len(column))]
    return compact.unpack_planes(blobs, dtype), (offsets - offsets[0]) // dtype.itemsize   # a sliced batch too


def decode_batch(batch: pa.RecordBatch, meta: CacheMeta, id_order: np.ndarray | None = None) -> list[SequenceTargets]:
    """One record batch -> SequenceTargets (numpy views into per-batch decoded arrays).

    ``id_order`` is the shard's id table (compact top-k only, see :func:`shard_id_order`)."""
    ids = batch.column("id").to_pylist()
    starts = batch.column("target_start").to_numpy()
    tokens, token_offsets = column_values(batch, "input_ids", meta)
    tokens = tokens.astype(np.int64, copy=False)
    _check_decoded_ids(tokens, meta.vocab_size, "input_ids")
    if meta.target_kind == "topk":
        fields, positions = _decode_topk(batch, meta, id_order)
    else:
        fields, positions = _decode_sampled(batch, meta)
    expected = np.diff(token_offsets) - 1 - starts
    if (np.diff(positions) != expected).any() or (starts < 0).any():
        raise ValueError("target rows per sequence differ from len(input_ids) - 1 - target_start")
    return [
        SequenceTargets(id=ids[i], input_ids=tokens[token_offsets[i]:token_offsets[i + 1]],
                        target_start=int(starts[i]), **{name: make(i) for name, make in fields.items()})
        for i in range(len(ids))
    ]


def _check_decoded_ids(ids: np.ndarray, vocab_size: int, name: str, allow_tail: bool = False) -> None:
    """Decoded bytes are untrusted: an id outside the vocab would index past an embedding."""
    if ids.size and (int(ids.max()) >= vocab_size or int(ids.min()) < (TAIL_ID if allow_tail else 0)):
        raise ValueError(f"{name}: ids span [{int(ids.min())}, {int(ids.max())}], expected [0, {vocab_size})")


def _rows_of_k(batch: pa.RecordBatch, name: str, meta: CacheMeta, positions: np.ndarray) -> np.ndarray:
    """A top-k column as [entries, k], refused unless every row holds exactly k entries per
    target position: the rows are sliced by the tail column's offsets, and a row one entry
    short would shift every later row of the batch onto its neighbour's positions."""
    values, offsets = column_values(batch, name, meta)
    if not np.array_equal(offsets, meta.k * positions):
        raise ValueError(f"{name}: entries per row differ from k={meta.k} per target position")
    return values.reshape(-1, meta.k)


def _decode_topk(batch: pa.RecordBatch, meta: CacheMeta, id_order: np.ndarray | None) -> tuple[dict, np.ndarray]:
    if meta.encoding == "plain":
        tail, pos = column_values(batch, "tail_mass", meta)
        topk_ids = _rows_of_k(batch, "topk_ids", meta, pos)
        logprobs = _rows_of_k(batch, "topk_logprobs", meta, pos)
        _check_decoded_ids(topk_ids, meta.vocab_size, "topk_ids")
        if np.isnan(logprobs).any() or (logprobs > 1e-3).any():
            raise ValueError("topk_logprobs: NaN or positive values, expected log-probs <= 0")
        if not ((tail >= 0) & (tail <= 1)).all():
            raise ValueError("tail_mass: NaN or outside [0, 1]")
    else:
        # No per-entry checks needed: ids come from the shard's id table (range-checked once,
        # in shard_id_order), log-probs from the decode table and tails from exp(-code), valid
        # by construction; decode_topk checks every index it gathers with.
        if id_order is None:
            raise CacheError("compact top-k shard decoded without its id table")
        codes, pos = column_values(batch, "tail_codes", meta)
        ranks = _rows_of_k(batch, "topk_ranks", meta, pos)
        steps = _rows_of_k(batch, "topk_code_steps", meta, pos)
        topk_ids, logprobs = compact.decode_topk(ranks, steps, id_order)
        tail = compact.decode_tail_codes(codes)
        compact.fit_to_tail(logprobs, tail)
    return {
        "topk_ids": lambda i: topk_ids[pos[i]:pos[i + 1]],
        "topk_logprobs": lambda i: logprobs[pos[i]:pos[i + 1]],
        "tail_mass": lambda i: tail[pos[i]:pos[i + 1]],
    }, pos


def shard_id_order(schema: pa.Schema, meta: CacheMeta, where: str) -> np.ndarray | None:
    """The id table a compact top-k shard carries in its metadata (None for other caches)."""
    if meta.target_kind != "topk" or meta.encoding != "compact":
        return None
    blob = (schema.metadata or {}).get(ID_ORDER_KEY)
    if blob is None:
        raise CacheError(f"{where}: compact top-k shard lacks its id table metadata")
    order = compact.unpack_order(blob, where)
    try:
        _check_decoded_ids(order, meta.vocab_size, "id table")
    except ValueError as exc:
        raise CacheError(f"{where}: {exc}") from None
    return order


def _decode_sampled(batch: pa.RecordBatch, meta: CacheMeta) -> tuple[dict, np.ndarray]:
    unique, pos = column_values(batch, "sample_unique", meta)
    sample_ids, entry = column_values(batch, "sample_ids", meta)
    sample_ids = sample_ids.astype(np.int32, copy=False)
    if meta.encoding == "compact":
        sample_ids[sample_ids == meta.vocab_size] = TAIL_ID
    counts = column_values(batch, "sample_counts", meta)[0].astype(np.int32, copy=False)
    _check_decoded_ids(sample_ids, meta.vocab_size, "sample_ids", allow_tail=True)
    if sample_ids.shape != counts.shape or (counts < 1).any() or unique.sum() != sample_ids.size:
        raise ValueError("sample_ids / sample_counts / sample_unique lengths disagree or a count is < 1")
    cumulative = np.zeros(unique.size + 1, dtype=np.int64)
    np.cumsum(unique, out=cumulative[1:])
    if not np.array_equal(cumulative[pos], entry):   # each row's draws must be its own positions' draws
        raise ValueError("sample_ids: entries per row differ from the row's sample_unique counts")

    def offsets(i: int) -> np.ndarray:
        window = cumulative[pos[i]:pos[i + 1] + 1]
        return window - window[0]

    return {
        "sample_offsets": offsets,
        "sample_ids": lambda i: sample_ids[entry[i]:entry[i + 1]],
        "sample_counts": lambda i: counts[entry[i]:entry[i + 1]],
    }, pos
