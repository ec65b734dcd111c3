"""What a logit cache is: file-level metadata, the format version, and the column layout.

A cache is a directory (local path or any URI pyarrow.fs reaches, e.g. ``s3://``)::

    manifests/task-00000.json      one per writer task: meta + committed shards (the commit point)
    shards/task-00000-000000.parquet

One Parquet row = one sequence (see :class:`qadpipe.targets.SequenceTargets` for the
alignment of targets to tokens).  Per-row targets are flat (``n * k`` entries for a row
with ``n`` target positions), so a decoder turns a whole record batch into numpy arrays at
once instead of walking nested lists per position.

Two encodings (recorded in :attr:`CacheMeta.encoding`):

* ``plain``: Parquet lists of int32 ids, float32 log-probs, float64 tail mass, int32
  sample counts — readable by any Parquet tool.
* ``compact``: ids narrowed to the vocab's width; top-k entries as frequency ranks plus
  delta-coded companded log-domain codes, the tail mass as a log-domain code (see
  :mod:`qadpipe.cache.compact`); sample counts as uint8.  Each such column holds one
  ``binary`` value per row: the row's little-endian array split into byte planes (all low
  bytes, then the next ...), so zstd sees the nearly-constant high bytes together.  Binary
  values also skip Parquet's per-element list levels, which dominate read time otherwise.
  Decoded rows stay sorted by descending log-prob, but entries whose log-probs decode equal
  may come back in a different order than the teacher's (e.g. a near-tie for top-1).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from qadpipe.errors import CacheError

#: Bump on any change of the on-disk layout; readers refuse versions they do not know.
FORMAT_VERSION = 1
TARGET_KINDS = ("topk", "sampled")
#: What sampled targets were drawn from: the full vocabulary (HF teacher) or vLLM's captured
#: top-k and one tail bucket (tail draws are dropped in stage two); "" for top-k caches.
SAMPLED_FROM = ("vocab", "topk+tail")
ENCODINGS = ("plain", "compact")

#: Parquet schema-metadata key under which every shard carries its :class:`CacheMeta`.
META_KEY = b"qadpipe.cache.meta"
#: Compact top-k shards: their frequency-ordered id table (see :mod:`qadpipe.cache.compact`).
ID_ORDER_KEY = b"qadpipe.cache.id_order"


#: The largest vocabulary a cache stores: ids are int32 (plain encoding, sampled draws), and a
#: sampled cache's tail draws take the id ``vocab_size`` as their sentinel.
MAX_VOCAB = 2**31 - 2


@dataclass(frozen=True)
class CacheMeta:
    """What made a cache and how it is encoded; written into every shard and task manifest.

    Everything but ``config`` and ``teacher`` (a path; ``teacher_revision`` identifies the
    weights) identifies the cache: two writers filling one cache must agree on all of it
    (``data_fingerprint`` therefore describes the whole data source, not one task's slice).
    """

    teacher: str
    teacher_revision: str
    teacher_dtype: str
    tokenizer_fingerprint: str
    vocab_size: int
    target_kind: str
    k: int
    num_samples: int
    encoding: str
    logprobs_mode: str = "raw_logprobs"
    temperature: float = 1.0
    data_fingerprint: str = ""
    sampled_from: str = ""
    # the seed of a sampled cache's draws (-1: top-k targets, or a sampled cache written before
    # qadpipe recorded it, which a task now refuses to extend): another seed would mix draws
    draw_seed: int = -1
    config: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.target_kind not in TARGET_KINDS:
            raise CacheError(f"cache meta target_kind={self.target_kind!r}: expected one of {TARGET_KINDS}")
        if self.encoding not in ENCODINGS:
            raise CacheError(f"cache meta encoding={self.encoding!r}: expected one of {ENCODINGS}")
        if not 1 <= self.vocab_size <= MAX_VOCAB:
            raise CacheError(f"cache meta vocab_size={self.vocab_size}: expected 1 to {MAX_VOCAB} (ids are "
                             "stored as int32, with a sentinel for tail draws)")
        if self.target_kind == "topk" and not 1 <= self.k <= self.vocab_size:
            raise CacheError(f"cache meta k={self.k}: expected 1 <= k <= vocab_size ({self.vocab_size}) for top-k targets")
        if self.target_kind == "sampled" and not 1 <= self.num_samples <= 0xFFFF:
            raise CacheError(f"cache meta num_samples={self.num_samples}: expected 1 to 65535 draws for sampled "
                             "targets (counts are stored as uint16)")
        if self.sampled_from not in ("", *SAMPLED_FROM):
            raise CacheError(f"cache meta sampled_from={self.sampled_from!r}: expected one of {SAMPLED_FROM}")
        if not -1 <= self.draw_seed < 2**32:
            raise CacheError(f"cache meta draw_seed={self.draw_seed}: expected -1 (not recorded) or a seed 0 to 2**32-1")

    def identity(self) -> dict[str, Any]:
        """The fields two parts of one cache must agree on: all but ``config`` and ``teacher``.
        ``teacher`` is the path or hub id as this task's config spelled it; the weights are
        identified by ``teacher_revision``, so tasks reading a node-local copy of the teacher,
        or reaching it by another relative path, still fill one cache.  Nor a setting its
        targets do not depend on: ``num_samples`` of a top-k cache, ``k`` of one sampled from
        the full vocabulary (HF backend; vLLM samples from its top-k)."""
        out = dataclasses.asdict(self)
        out.pop("config")
        out.pop("teacher")
        if self.target_kind == "topk":
            out.pop("num_samples")
        if self.sampled_from == "vocab":
            out.pop("k")
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> "CacheMeta":
        """Parse metadata read from ``source`` (a file name, for the error message)."""
        if not isinstance(data, dict):
            raise CacheError(f"{source}: cache metadata is not a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CacheError(
                f"{source}: cache format_version={version!r}, this qadpipe reads format_version={FORMAT_VERSION}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in data and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
        if unknown or missing:
            raise CacheError(f"{source}: cache metadata has unknown fields {unknown} / lacks fields {missing}")
        for f in dataclasses.fields(cls):
            if f.name in data and not _is_json_type(data[f.name], f.type):
                raise CacheError(f"{source}: cache metadata {f.name}={data[f.name]!r}: expected a JSON {f.type}")
        try:
            return cls(**data)
        except CacheError as exc:   # a value check of __post_init__: say which file holds it
            raise CacheError(f"{source}: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


_JSON_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "dict": (dict,)}


def _is_json_type(value: Any, annotation: str) -> bool:
    """Whether a parsed JSON value has the field's type (a bool is not a number here)."""
    return isinstance(value, _JSON_TYPES[annotation]) and not isinstance(value, bool)


def id_dtype(vocab_size: int, sentinel: bool = False) -> np.dtype:
    """The narrowest unsigned type holding every token id (plus one sentinel id if asked)."""
    return np.dtype("<u2") if vocab_size + int(sentinel) <= 0xFFFF + 1 else np.dtype("<u4")


def compact_dtypes(meta: CacheMeta) -> dict[str, np.dtype]:
    """Element type of each byte-plane column of a compact cache."""
    if meta.target_kind == "topk":
        return {"topk_ranks": id_dtype(meta.vocab_size), "topk_code_steps": np.dtype("<u2"),
                "tail_codes": np.dtype("<u2")}
    count = np.dtype("u1") if meta.num_samples <= 0xFF else np.dtype("<u2")
    return {"sample_unique": count, "sample_ids": id_dtype(meta.vocab_size, sentinel=True), "sample_counts": count}


def target_columns(meta: CacheMeta) -> list[pa.Field]:
    """The per-row target columns of a cache, for its kind and encoding."""
    if meta.encoding == "compact":
        return [pa.field(name, pa.binary()) for name in compact_dtypes(meta)]
    if meta.target_kind == "topk":
        return [pa.field("topk_ids", pa.list_(pa.int32())),
                pa.field("topk_logprobs", pa.list_(pa.float32())),
                pa.field("tail_mass", pa.list_(pa.float64()))]
    return [pa.field("sample_unique", pa.list_(pa.int32())),
            pa.field("sample_ids", pa.list_(pa.int32())),
            pa.field("sample_counts", pa.list_(pa.int32()))]


def arrow_schema(meta: CacheMeta) -> pa.Schema:
    """The explicit Parquet schema of every shard of a cache, with its metadata attached."""
    input_type = pa.int32() if meta.encoding == "plain" else pa.from_numpy_dtype(id_dtype(meta.vocab_size))
    fields = [pa.field("id", pa.string(), nullable=False),
              pa.field("input_ids", pa.list_(input_type)),
              pa.field("target_start", pa.int32())]
    return pa.schema(fields + target_columns(meta), metadata={META_KEY: meta.to_json().encode()})
