"""SequenceTargets <-> Arrow record batches, in the plain and compact encodings.

Pure functions.  Encoding concatenates whole rows into flat list columns; decoding works on
a whole record batch with numpy (one cumsum / cast / exp per column), and only the final
split into per-sequence views loops in Python, once per *row*, never per position.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from qadpipe.cache.schema import (LOGPROB_STEP, TAIL_STEP, ZERO_PROB_CODE, CacheMeta, arrow_schema)
from qadpipe.errors import CacheError
from qadpipe.targets import TAIL_ID, SequenceTargets

_MAX_FINITE_CODE = ZERO_PROB_CODE - 1


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


def _list(values: list[np.ndarray], dtype: pa.DataType) -> pa.ListArray:
    lengths = np.fromiter((v.size for v in values), dtype=np.int64, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([v.ravel() for v in values]) if values else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(dtype.to_pandas_dtype(), copy=False)))


def logprob_codes(logprobs: np.ndarray) -> np.ndarray:
    """Log-probs -> uint16 codes round(-lp / LOGPROB_STEP); -inf -> ZERO_PROB_CODE."""
    lp = np.asarray(logprobs, dtype=np.float64)
    codes = np.clip(np.rint(-lp / LOGPROB_STEP), 0, _MAX_FINITE_CODE)
    codes[np.isneginf(lp)] = ZERO_PROB_CODE
    return codes.astype(np.uint16)


def tail_codes(tail_mass: np.ndarray) -> np.ndarray:
    """Tail mass -> uint16 codes round(-log(tail) / TAIL_STEP); 0 -> ZERO_PROB_CODE."""
    tail = np.asarray(tail_mass, dtype=np.float64)
    with np.errstate(divide="ignore"):
        codes = np.clip(np.rint(-np.log(tail) / TAIL_STEP), 0, _MAX_FINITE_CODE)
    codes[tail <= 0] = ZERO_PROB_CODE
    return codes.astype(np.uint16)


def decode_logprob_codes(codes: np.ndarray) -> np.ndarray:
    lp = codes.astype(np.float32) * np.float32(-LOGPROB_STEP)
    lp[codes == ZERO_PROB_CODE] = -np.inf
    return lp


def decode_tail_codes(codes: np.ndarray) -> np.ndarray:
    tail = np.exp(codes.astype(np.float64) * -TAIL_STEP)
    tail[codes == ZERO_PROB_CODE] = 0.0
    return tail


def encode_rows(rows: list[SequenceTargets], meta: CacheMeta) -> pa.Table:
    """Rows (already validated) -> one Arrow table with the cache's explicit schema."""
    schema = arrow_schema(meta)
    types = {f.name: f.type.value_type for f in schema if pa.types.is_list(f.type)}
    columns: dict[str, pa.Array] = {
        "id": pa.array([r.id for r in rows], pa.string()),
        "input_ids": _list([np.asarray(r.input_ids) for r in rows], types["input_ids"]),
        "target_start": pa.array([r.target_start for r in rows], pa.int32()),
    }
    plain = meta.encoding == "plain"
    if meta.target_kind == "topk":
        columns["topk_ids"] = _list([np.asarray(r.topk_ids) for r in rows], types["topk_ids"])
        if plain:
            columns["topk_logprobs"] = _list([np.asarray(r.topk_logprobs) for r in rows], pa.float32())
            columns["tail_mass"] = _list([np.asarray(r.tail_mass) for r in rows], pa.float64())
        else:
            columns["topk_lp_deltas"] = _list([_delta(logprob_codes(r.topk_logprobs)) for r in rows], pa.uint16())
            columns["tail_codes"] = _list([tail_codes(r.tail_mass) for r in rows], pa.uint16())
    else:
        columns["sample_unique"] = _list([np.diff(np.asarray(r.sample_offsets)) for r in rows],
                                         types["sample_unique"])
        sample_ids = [np.asarray(r.sample_ids) for r in rows]
        if not plain:
            sample_ids = [np.where(ids == TAIL_ID, meta.vocab_size, ids) for ids in sample_ids]
        columns["sample_ids"] = _list(sample_ids, types["sample_ids"])
        columns["sample_counts"] = _list([np.asarray(r.sample_counts) for r in rows], types["sample_counts"])
    return pa.table(columns, schema=schema)


def _delta(codes: np.ndarray) -> np.ndarray:
    """Codes are non-decreasing along k (log-probs sorted descending): store the steps."""
    out = codes.copy()
    out[:, 1:] = np.diff(codes, axis=1)
    return out


def _flat(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, row offsets into values) of a list column, zero-copy where Arrow allows."""
    column = batch.column(name)
    return column.values.to_numpy(zero_copy_only=False), column.offsets.to_numpy()


def decode_batch(batch: pa.RecordBatch, meta: CacheMeta) -> list[SequenceTargets]:
    """One record batch -> SequenceTargets (numpy views into per-batch decoded arrays)."""
    ids = batch.column("id").to_pylist()
    starts = batch.column("target_start").to_numpy()
    tokens, token_offsets = _flat(batch, "input_ids")
    tokens = tokens.astype(np.int64, copy=False)
    if meta.target_kind == "topk":
        fields = _decode_topk(batch, meta)
    else:
        fields = _decode_sampled(batch, meta)
    return [
        SequenceTargets(id=ids[i], input_ids=tokens[token_offsets[i]:token_offsets[i + 1]],
                        target_start=int(starts[i]), **{name: make(i) for name, make in fields.items()})
        for i in range(len(ids))
    ]


def _decode_topk(batch: pa.RecordBatch, meta: CacheMeta) -> dict:
    k = meta.k
    topk_ids, _ = _flat(batch, "topk_ids")
    topk_ids = topk_ids.astype(np.int32, copy=False).reshape(-1, k)
    if meta.encoding == "plain":
        logprobs = _flat(batch, "topk_logprobs")[0].reshape(-1, k)
        tail, pos = _flat(batch, "tail_mass")
    else:
        deltas = _flat(batch, "topk_lp_deltas")[0].reshape(-1, k)
        logprobs = decode_logprob_codes(np.cumsum(deltas, axis=1, dtype=np.int32))
        codes, pos = _flat(batch, "tail_codes")
        tail = decode_tail_codes(codes)
    return {
        "topk_ids": lambda i: topk_ids[pos[i]:pos[i + 1]],
        "topk_logprobs": lambda i: logprobs[pos[i]:pos[i + 1]],
        "tail_mass": lambda i: tail[pos[i]:pos[i + 1]],
    }


def _decode_sampled(batch: pa.RecordBatch, meta: CacheMeta) -> dict:
    unique, pos = _flat(batch, "sample_unique")
    sample_ids, entry = _flat(batch, "sample_ids")
    sample_ids = sample_ids.astype(np.int32, copy=False)
    if meta.encoding == "compact":
        sample_ids = np.where(sample_ids == meta.vocab_size, TAIL_ID, sample_ids).astype(np.int32)
    counts = _flat(batch, "sample_counts")[0].astype(np.int32, copy=False)
    cumulative = np.zeros(unique.size + 1, dtype=np.int64)
    np.cumsum(unique, out=cumulative[1:])

    def offsets(i: int) -> np.ndarray:
        window = cumulative[pos[i]:pos[i + 1] + 1]
        return window - window[0]

    return {
        "sample_offsets": offsets,
        "sample_ids": lambda i: sample_ids[entry[i]:entry[i + 1]],
        "sample_counts": lambda i: counts[entry[i]:entry[i + 1]],
    }
