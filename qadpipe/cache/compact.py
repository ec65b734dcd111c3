"""The compact top-k codec: pure numpy functions, measured in bench/cache_size.py.

Three ideas, each worth bytes on real SmolLM2 distributions (top-64, vocab 49152):

1. **Companded log-domain codes.**  ``code = round(g(-logprob))`` where ``g`` has a fine
   step (1/48 nat) for probable entries and a step growing like ``p^-1/2`` (capped at 1/4
   nat) below ``p = e^-4``.  The KL an entry's rounding error costs is ~ p * step^2 / 24, so
   unlikely entries tolerate coarse steps; decode KL stays ~2e-5 nat/token while codes get
   small.  Codes are non-decreasing along the descending top-k, so they are stored as deltas.
2. **Frequency-ranked ids.**  Each shard stores its distinct top-k ids ordered by how often
   they occur (``id_order``); entries store the rank, so frequent tokens get small numbers
   whose high byte is mostly zero.
3. **Tie groups.**  Entries with equal codes have equal decoded log-probs, so their order is
   free: we sort them by rank and store the rank *difference* to the previous entry of the
   group.  Coarse codes make such ties common among the unlikely entries.

Columns are stored as byte planes (:func:`pack_planes`) before zstd: the high-byte planes
are nearly constant and compress to almost nothing.
"""

from __future__ import annotations

import base64
import functools

import numpy as np
import zstandard

from qadpipe.errors import CacheError

#: Fine step of -logprob for probable entries (nats).
FINE_STEP = 1.0 / 48.0
#: Entries with -logprob above this get a step growing like exp((x - KNEE) / 2) ...
KNEE = 4.0
#: ... up to this coarsest step (nats); max |decode error| = COARSE_STEP / 2.
COARSE_STEP = 1.0 / 4.0
#: Tail mass: code = round(-log(tail) / TAIL_STEP) (relative error <= 0.2 %); see tail_codes.
TAIL_STEP = 1.0 / 256.0
#: Tail codes with this bit set store 1 − tail (the top-k mass) instead of the tail.
_HIGH_TAIL = 0x8000
#: The largest uint16 code means probability 0 (log-prob -inf).
ZERO_PROB_CODE = 0xFFFF

_X1 = KNEE + 2.0 * np.log(COARSE_STEP / FINE_STEP)          # where the step reaches COARSE_STEP
_C0 = KNEE / FINE_STEP                                          # code at the knee
_C1 = _C0 + (2.0 / FINE_STEP) * (1.0 - np.exp(-(_X1 - KNEE) / 2.0))


def compand(neg_logprob: np.ndarray) -> np.ndarray:
    """g(x): -logprob (>= 0, float64) -> real-valued code, monotone increasing."""
    x = np.asarray(neg_logprob, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        mid = _C0 + (2.0 / FINE_STEP) * (1.0 - np.exp(-(x - KNEE) / 2.0))
    return np.where(x <= KNEE, x / FINE_STEP, np.where(x <= _X1, mid, _C1 + (x - _X1) / COARSE_STEP))


def expand(code: np.ndarray) -> np.ndarray:
    """g^-1: code -> -logprob (float64)."""
    c = np.asarray(code, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mid = KNEE - 2.0 * np.log(1.0 - (c - _C0) * FINE_STEP / 2.0)
    return np.where(c <= _C0, c * FINE_STEP, np.where(c <= _C1, mid, _X1 + (c - _C1) * COARSE_STEP))


def logprob_codes(logprobs: np.ndarray) -> np.ndarray:
    """Log-probs -> uint16 codes; -inf -> ZERO_PROB_CODE; tiny positives (fp noise) -> 0."""
    lp = np.asarray(logprobs, dtype=np.float64)
    codes = np.clip(np.rint(compand(np.maximum(-lp, 0.0))), 0, ZERO_PROB_CODE - 1)
    codes[np.isneginf(lp)] = ZERO_PROB_CODE
    return codes.astype(np.uint16)


@functools.lru_cache(maxsize=1)
def logprob_table() -> np.ndarray:
    """Decode table: float32 log-prob for each of the 65536 codes (one gather per entry)."""
    table = (-expand(np.arange(ZERO_PROB_CODE + 1))).astype(np.float32)
    table[ZERO_PROB_CODE] = -np.inf
    table.flags.writeable = False
    return table


def tail_codes(tail_mass: np.ndarray) -> np.ndarray:
    """Tail masses -> uint16 codes, relative precision on the *smaller* of tail and 1 − tail.

    The loss reads both the tail ``1 − T`` and (through the top-k entries) ``T``; a code of
    ``-log(tail)`` alone would round a flat position's small top-k mass (random-token data:
    T ≈ 6e-4 at k=16) to zero.  So masses ≤ 0.5 store ``round(-log(tail) / TAIL_STEP)`` in
    the low half, larger ones ``0x8000 | round(-log(1 − tail) / TAIL_STEP)``; exact 0 is
    :data:`ZERO_PROB_CODE`.  Either way the relative error is ≤ TAIL_STEP / 2 (0.2 %)."""
    tail = np.asarray(tail_mass, dtype=np.float64)
    high = tail > 0.5
    small = np.where(high, 1.0 - tail, tail)
    with np.errstate(divide="ignore"):
        steps = np.rint(-np.log(small) / TAIL_STEP)
    codes = np.where(high, _HIGH_TAIL | np.clip(steps, 0, _HIGH_TAIL - 2).astype(np.int64),
                     np.clip(steps, 0, _HIGH_TAIL - 1).astype(np.int64))
    codes[tail <= 0] = ZERO_PROB_CODE
    return codes.astype(np.uint16)


def decode_tail_codes(codes: np.ndarray) -> np.ndarray:
    """Inverse of :func:`tail_codes` (float64)."""
    codes = codes.astype(np.int64)
    high = (codes & _HIGH_TAIL) != 0
    small = np.exp((codes & (_HIGH_TAIL - 1)).astype(np.float64) * -TAIL_STEP)
    tail = np.where(high, 1.0 - small, small)
    tail[codes == ZERO_PROB_CODE] = 0.0
    return tail


def fit_to_tail(logprobs: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """Shift each row's decoded log-probs so the top-k sums to ``1 − tail``, in place.

    Codes round each entry (up to 1/96 nat) and the tail independently, so a decoded row's
    mass drifts ±1 % from 1; the loss would then read a biased KL (negative at single
    positions) and a gradient that is not 0 at student == teacher.  The tail code is the
    precise one (0.2 % on the smaller of tail and top-k mass), so the entries are scaled to
    it.  Rows with no top-k mass (every entry −inf, or a tail of 1) are left alone.
    """
    mass = np.exp(logprobs).sum(axis=1, dtype=np.float64)
    target = 1.0 - tail
    fits = (mass > 0) & (target > 0)
    shift = np.zeros(mass.shape, dtype=np.float64)
    np.log(target, out=shift, where=fits)
    shift[fits] -= np.log(mass[fits])
    logprobs += shift.astype(np.float32)[:, None]
    return logprobs


def id_order(topk_ids: np.ndarray) -> np.ndarray:
    """The distinct ids of a shard, most frequent first (ties by id): rank -> id."""
    ids, counts = np.unique(topk_ids, return_counts=True)
    return ids[np.argsort(-counts, kind="stable")]


def encode_topk(topk_ids: np.ndarray, topk_logprobs: np.ndarray, ranks_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, k] ids + sorted log-probs -> (rank column, code-delta column), both [n, k].

    ``ranks_of[id]`` is the id's frequency rank in this shard.  Within a run of equal codes
    the entries are re-sorted by rank and store the rank step to their predecessor.
    """
    codes = logprob_codes(topk_logprobs).astype(np.int64)
    ranks = ranks_of[topk_ids]
    order = np.argsort(codes * (1 << 32) + ranks, axis=1, kind="stable")
    codes = np.take_along_axis(codes, order, axis=1)
    ranks = np.take_along_axis(ranks, order, axis=1)
    code_steps = np.diff(codes, axis=1, prepend=0)
    tie = np.zeros(codes.shape, dtype=bool)
    tie[:, 1:] = code_steps[:, 1:] == 0
    previous = np.zeros_like(ranks)
    previous[:, 1:] = ranks[:, :-1]
    rank_column = np.where(tie, ranks - previous, ranks)
    # the decoder sums a row's rank column in int32 (its speed): refuse here what it could not read
    if rank_column.size and int(rank_column.sum(axis=1).max()) >= 2**31:
        raise CacheError(f"a top-k row's id ranks sum past 2^31 (k={rank_column.shape[1]}, {ranks_of.size} ids), "
                         "beyond the compact encoding's range; use cache.encoding: plain")
    return rank_column, code_steps


#: Rows of [rows, k] decoded at a time: the ~8 passes of :func:`decode_topk` then run on
#: arrays that stay in L2 (1024 x 64 int32 = 256 KiB), 1.8x faster than on whole batches.
DECODE_CHUNK_ROWS = 1024


def decode_topk(rank_column: np.ndarray, code_steps: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_topk` for [m, k] arrays: (int32 ids, float32 log-probs)."""
    ids = np.empty(code_steps.shape, dtype=order.dtype)
    logprobs = np.empty(code_steps.shape, dtype=np.float32)
    for first in range(0, code_steps.shape[0], DECODE_CHUNK_ROWS):
        rows = slice(first, first + DECODE_CHUNK_ROWS)
        _decode_topk_chunk(rank_column[rows], code_steps[rows], order, ids[rows], logprobs[rows])
    return ids, logprobs


def _decode_topk_chunk(rank_column: np.ndarray, code_steps: np.ndarray, order: np.ndarray,
                       ids: np.ndarray, logprobs: np.ndarray) -> None:
    """Decodes one chunk into ``ids`` / ``logprobs`` (views of the outputs).

    The per-group rank base is forward-filled with a running maximum: the exclusive prefix
    sum of the rank column never decreases along k, so the latest group start always wins.
    """
    codes = np.cumsum(code_steps, axis=1, dtype=np.int32)
    # Every stored rank (a group's first rank, or a step within a tie group) lies below the table
    # size; checked before the int32 cast, which would wrap a corrupt uint32 rank to a negative
    # index that the clipped gather below maps to a valid id.
    if rank_column.size and int(rank_column.max()) >= order.size:
        raise CacheError(f"top-k rank {int(rank_column.max())} outside the shard's id table ({order.size} ids)")
    rank_column = rank_column.astype(np.int32)
    running = np.cumsum(rank_column, axis=1, dtype=np.int32)
    base = running - rank_column                     # exclusive prefix sum ...
    base *= code_steps.astype(bool)                  # ... kept where a group starts (5x faster than np.where)
    np.maximum.accumulate(base, axis=1, out=base)
    running -= base
    if running.size and running.max() >= order.size:
        raise CacheError(f"top-k rank {int(running.max())} outside the shard's id table ({order.size} ids)")
    if codes.size and codes[:, -1].max() > ZERO_PROB_CODE:   # steps are >= 0: the last code is the largest
        raise CacheError(f"top-k log-prob code {int(codes[:, -1].max())} outside [0, {ZERO_PROB_CODE}]")
    # np.take, not fancy indexing: the same gather at half the time per entry.  Both index
    # ranges were checked above; mode="clip" skips take's buffered bounds check on ``out``.
    np.take(order, running, out=ids, mode="clip")
    np.take(logprob_table(), codes, out=logprobs, mode="clip")


def pack_planes(values: np.ndarray, dtype: np.dtype) -> bytes:
    """A 1-D array as ``dtype`` (little-endian), split into byte planes: all byte 0s, all byte 1s, ..."""
    data = np.ascontiguousarray(values, dtype=dtype).reshape(-1)
    return data.view(np.uint8).reshape(-1, dtype.itemsize).T.tobytes()


def unpack_planes(blobs: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """Concatenation of several :func:`pack_planes` blobs (uint8 views), back as one ``dtype``
    array.  Shift-and-or of contiguous planes: ~15x faster than a strided byte transpose."""
    size = dtype.itemsize
    out = np.empty(sum(blob.size for blob in blobs) // size, dtype=dtype)
    start = 0
    for blob in blobs:
        count = blob.size // size
        target = out[start:start + count]
        target[:] = blob[:count]
        for plane in range(1, size):
            target |= np.left_shift(blob[plane * count:(plane + 1) * count], 8 * plane, dtype=dtype)
        start += count
    return out


def pack_order(order: np.ndarray) -> bytes:
    """id_order -> bytes for the shard's Parquet metadata (zstd, base64: metadata is text)."""
    return base64.b64encode(zstandard.ZstdCompressor(level=19).compress(order.astype("<u4").tobytes()))


def unpack_order(blob: bytes, where: str) -> np.ndarray:
    try:
        return np.frombuffer(zstandard.ZstdDecompressor().decompress(base64.b64decode(blob)), dtype="<u4").astype(np.int32)
    except (ValueError, zstandard.ZstdError) as exc:
        raise CacheError(f"{where}: corrupt id table in the shard metadata ({exc})") from exc
