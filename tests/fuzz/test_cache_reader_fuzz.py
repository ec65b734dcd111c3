"""Fuzz the cache reader: whatever bytes a shard or manifest holds, reading it may only
raise :class:`CacheError` (never another exception, never hang).

Each example copies a small valid cache, damages it, then opens it, streams every row and
re-hashes every shard.  "Resealed" damage also rewrites the manifest's size and sha256 so
the bytes get past the checksum and reach the Parquet and compact decoders — the case of a
writer that hashed already-corrupt bytes.  Example counts are bounded (``EXAMPLES``) so the
whole module runs in seconds; raise them locally with ``QADPIPE_FUZZ_EXAMPLES=5000``, and
draw new examples each run with ``QADPIPE_FUZZ_EXPLORE=1`` (by default every run draws the same).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cache_rows import cache_meta, random_rows, write_cache
from qadpipe.cache import CacheReader
from qadpipe.cache.compact import pack_planes, unpack_planes
from qadpipe.cache.writer import shard_bytes
from qadpipe.errors import CacheError

EXAMPLES = int(os.environ.get("QADPIPE_FUZZ_EXAMPLES", "60"))
#: Seconds one example may take before it counts as a hang (a clean read takes milliseconds).
HANG_SECONDS = 10
SHARD0 = "shards/task-00000-000000.parquet"
MANIFEST = "manifests/task-00000.json"
#: The same examples in every run unless QADPIPE_FUZZ_EXPLORE is set: CI fails on what a change
#: broke, not on a case one run happened to draw (exploring runs print the failing example).
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=not os.environ.get("QADPIPE_FUZZ_EXPLORE"),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

#: (kind, encoding): the three decoders a shard can reach.
LAYOUTS = [("topk", "compact"), ("topk", "plain"), ("sampled", "compact")]


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """One valid 2-shard cache per layout (rows of 6-12 tokens, k=4)."""
    out = {}
    for kind, encoding in LAYOUTS:
        meta = cache_meta(kind, k=4, num_samples=20, encoding=encoding)
        root = tmp_path_factory.mktemp(f"{kind}-{encoding}") / "cache"
        out[(kind, encoding)] = write_cache(root, meta, random_rows(meta, 4, seq_len=12), rows_per_shard=2)
    return out


def _timeout(signum, frame):
    raise TimeoutError(f"cache reader still running after {HANG_SECONDS}s: treated as a hang")


def read_everything(root: Path) -> None:
    """Open (verified and unverified), stream every row, re-hash every shard."""
    previous = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(HANG_SECONDS)
    try:
        for verify in (True, False):
            reader = CacheReader(str(root), verify=verify)
            for row in reader.iter_sequences():
                assert_sane(row, reader.meta)
            reader.verify_all()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def assert_sane(row, meta) -> None:
    """What a reader may hand a trainer, whatever the bytes: ids inside the vocab, one target
    row per position after target_start, log-probs <= 0, tails in [0, 1], draws adding up."""
    n = row.input_ids.size - 1 - row.target_start
    assert row.input_ids.size >= 1 and n >= 0 and 0 <= row.input_ids.min() and row.input_ids.max() < meta.vocab_size
    if meta.target_kind == "topk":
        assert row.topk_ids.shape == row.topk_logprobs.shape == (n, meta.k) and row.tail_mass.shape == (n,)
        assert (row.topk_ids < meta.vocab_size).all() and not np.isnan(row.topk_logprobs).any()
        assert (row.topk_logprobs <= 1e-3).all() and ((row.tail_mass >= 0) & (row.tail_mass <= 1)).all()
    else:
        assert row.sample_offsets.shape == (n + 1,) and row.sample_offsets[-1] == row.sample_ids.size
        assert (row.sample_ids < meta.vocab_size).all() and (row.sample_counts >= 1).all()
        if n:
            assert (np.add.reduceat(row.sample_counts, row.sample_offsets[:-1]) == meta.num_samples).all()


def only_cache_errors(source: Path, damage: Callable[[Path], None]) -> None:
    """Copy ``source``, apply ``damage`` to the copy, read it: success or CacheError only."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "cache"
        shutil.copytree(source, root)
        damage(root)
        try:
            read_everything(root)
        except CacheError as exc:
            assert "\n" not in str(exc), f"CacheError spans lines: {exc!r}"


def reseal(root: Path, shard: str = SHARD0) -> None:
    """Make the manifest agree with the shard's current bytes (size and sha256)."""
    path = root / MANIFEST
    data = json.loads(path.read_text())
    body = (root / shard).read_bytes()
    for entry in data["shards"]:
        if entry["name"] == shard:
            entry.update(bytes=len(body), sha256=hashlib.sha256(body).hexdigest())
    path.write_text(json.dumps(data))


def mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    """Apply (op, position, value) edits: flip a byte, truncate, insert a byte, delete a span."""
    out = bytearray(data)
    for op, position, value in edits:
        at = position % (len(out) + 1)
        if op == "flip" and out:
            out[at % len(out)] ^= value or 1
        elif op == "truncate":
            del out[at:]
        elif op == "insert":
            out[at:at] = bytes([value])
        elif op == "delete":
            del out[at:at + value % 64 + 1]
    return bytes(out)


layouts = st.sampled_from(LAYOUTS)
edits = st.lists(st.tuples(st.sampled_from(["flip", "flip", "flip", "truncate", "insert", "delete"]),
                           st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=8)


@FUZZ
@given(layout=layouts, garbage=st.binary(max_size=4096), resealed=st.booleans())
def test_random_bytes_as_a_shard(caches, layout, garbage, resealed):
    def damage(root: Path) -> None:
        (root / SHARD0).write_bytes(garbage)
        if resealed:
            reseal(root)

    only_cache_errors(caches[layout], damage)


@FUZZ
@given(layout=layouts, changes=edits, resealed=st.booleans())
def test_mutated_valid_shard(caches, layout, changes, resealed):
    def damage(root: Path) -> None:
        path = root / SHARD0
        path.write_bytes(mutate(path.read_bytes(), changes))
        if resealed:
            reseal(root)

    only_cache_errors(caches[layout], damage)


@FUZZ
@given(layout=layouts, tail_edits=edits)
def test_mutated_shard_footer(caches, layout, tail_edits):
    """Edits aimed at the last 512 bytes, where the Parquet footer (schema, metadata,
    cache meta, id table) lives; resealed so the reader parses it."""
    def damage(root: Path) -> None:
        path = root / SHARD0
        data = path.read_bytes()
        head, tail = data[:-512], data[-512:]
        path.write_bytes(head + mutate(tail, tail_edits))
        reseal(root)

    only_cache_errors(caches[layout], damage)


@FUZZ
@given(layout=layouts, changes=edits)
def test_mutated_manifest_bytes(caches, layout, changes):
    def damage(root: Path) -> None:
        path = root / MANIFEST
        path.write_bytes(mutate(path.read_bytes(), changes))

    only_cache_errors(caches[layout], damage)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON value (dict keys and list indices)."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, prefix + (index,))
    return found


@FUZZ
@given(layout=layouts, picks=st.lists(st.tuples(st.integers(0, 10_000), json_values), min_size=1, max_size=3))
def test_mutated_manifest_values(caches, layout, picks):
    """Replace values anywhere in a valid manifest (meta, shard entries, task) by random JSON."""
    def damage(root: Path) -> None:
        path = root / MANIFEST
        data = json.loads(path.read_text())
        for index, value in picks:
            paths = _paths(data)
            where = paths[index % len(paths)]
            if not where:
                data = value
                continue
            parent = data
            for key in where[:-1]:
                parent = parent[key]
            parent[where[-1]] = value
        path.write_text(json.dumps(data))

    only_cache_errors(caches[layout], damage)


# Minimal reproducers of what the fuzz found (each once escaped as a non-CacheError).

def _refused(root: Path, pattern: str) -> None:
    with pytest.raises(CacheError, match=pattern) as info:
        read_everything(root)
    assert "\n" not in str(info.value)


def test_flipped_page_header_byte_without_reseal(caches, tmp_path):
    """Was OSError from reading the id column during open (the size still matched); then
    'unreadable shard footer or id column', where the bytes no longer match the checksum."""
    root = shutil.copytree(caches[("topk", "compact")], tmp_path / "cache")
    path = root / SHARD0
    path.write_bytes(mutate(path.read_bytes(), [("flip", 4, 1)]))
    _refused(root, r"task-00000-000000.parquet: checksum mismatch")


def test_a_flipped_footer_byte_is_said_to_be_a_checksum_mismatch(caches, tmp_path):
    """A byte flipped in the footer's cache meta read as another teacher's shard ('shard has
    tokenizer_fingerprint=...'), pointing at mixed caches rather than at damaged bytes."""
    root = shutil.copytree(caches[("topk", "plain")], tmp_path / "cache")
    path = root / SHARD0
    data = path.read_bytes()
    at = data.index(b"tokenizer_fingerprint") + len(b"tokenizer_fingerprint") + 8
    path.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
    _refused(root, r"task-00000-000000.parquet: checksum mismatch: sha256 ")


def test_garbage_cache_meta_in_a_resealed_footer(caches, tmp_path):
    """Was JSONDecodeError / UnicodeDecodeError from the footer's cache meta."""
    root = shutil.copytree(caches[("topk", "plain")], tmp_path / "cache")
    path = root / SHARD0
    data = path.read_bytes()
    start = data.index(b'"teacher"')
    path.write_bytes(data[:start] + b"\xfb" + data[start + 1:])
    reseal(root)
    _refused(root, r"task-00000-000000.parquet: unreadable shard footer or id column")


def test_truncated_resealed_shard_message_is_one_line(caches, tmp_path):
    """Was a CacheError whose text carried pyarrow's multi-line thrift message."""
    root = shutil.copytree(caches[("topk", "compact")], tmp_path / "cache")
    path = root / SHARD0
    path.write_bytes(path.read_bytes()[:-3])
    reseal(root)
    _refused(root, r"task-00000-000000.parquet: .*not a readable Parquet shard")


@pytest.mark.parametrize("field,value", [("rows", None), ("name", None), ("bytes", "12"), ("rows", -1),
                                         ("sha256", 7), ("longest_row", "9"), ("longest_row", -1),
                                         ("longest_row", True)])
def test_wrongly_typed_shard_entry(caches, tmp_path, field, value):
    """Was TypeError (sum over None) or AttributeError (None.partition)."""
    root = shutil.copytree(caches[("topk", "compact")], tmp_path / "cache")
    data = json.loads((root / MANIFEST).read_text())
    data["shards"][0][field] = value
    (root / MANIFEST).write_text(json.dumps(data))
    _refused(root, r"task-00000.json: malformed shard entry")


@pytest.mark.parametrize("field,value", [("vocab_size", "49152"), ("k", None), ("teacher", 3), ("k", True),
                                         ("config", [])])
def test_wrongly_typed_cache_meta(caches, tmp_path, field, value):
    """Was TypeError from comparing a string vocab size (or None k) in CacheMeta checks."""
    root = shutil.copytree(caches[("topk", "compact")], tmp_path / "cache")
    data = json.loads((root / MANIFEST).read_text())
    data["meta"][field] = value
    (root / MANIFEST).write_text(json.dumps(data))
    _refused(root, rf"task-00000.json: cache metadata {field}=.*: expected a JSON")


def test_shard_list_that_is_not_a_list(caches, tmp_path):
    """Was TypeError from iterating ``"shards": null``."""
    root = shutil.copytree(caches[("topk", "compact")], tmp_path / "cache")
    data = json.loads((root / MANIFEST).read_text())
    data["shards"] = None
    (root / MANIFEST).write_text(json.dumps(data))
    _refused(root, r"task-00000.json: shards=None, expected a list")


def test_footer_with_invalid_utf8_column_name(caches, tmp_path):
    """Was UnicodeDecodeError from pyarrow's ParquetFile (the case hypothesis found: one
    flipped bit in the footer's schema, size unchanged so the open-time checks reach it)."""
    root = shutil.copytree(caches[("topk", "compact")], tmp_path / "cache")
    path = root / SHARD0
    data = path.read_bytes()
    footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    name = data.index(b"topk_ranks", footer)   # the schema's column name (the metadata holds none)
    path.write_bytes(mutate(data, [("flip", name, 128)]))
    _refused(root, r"task-00000-000000.parquet: .*not a readable Parquet shard")


def _rewrite_shard(root: Path, change: Callable[[pa.Table], pa.Table]) -> None:
    """Re-encode shard 0 with ``change`` applied to its table, then reseal the manifest."""
    path = root / SHARD0
    table = pq.read_table(path)
    path.write_bytes(shard_bytes(change(table).replace_schema_metadata(table.schema.metadata), zstd_level=3))
    reseal(root)


def test_a_plain_row_one_position_short_in_its_top_k_columns_is_refused(tmp_path):
    """Was decoded silently: the next row was sliced onto this row's last position."""
    meta = cache_meta("topk", k=4, encoding="plain")
    root = write_cache(tmp_path / "cache", meta, random_rows(meta, 2, seq_len=8), rows_per_shard=2)

    def shorten_row_0(table: pa.Table) -> pa.Table:
        for name in ("topk_ids", "topk_logprobs"):
            rows = table.column(name).to_pylist()
            rows[0] = rows[0][:-meta.k]
            table = table.set_column(table.schema.get_field_index(name), name, pa.array(rows, table.schema.field(name).type))
        return table

    _rewrite_shard(root, shorten_row_0)
    _refused(root, r"task-00000-000000.parquet: cannot decode shard \(topk_ids: entries per row differ from k=4")


def test_a_compact_rank_beyond_int32_is_refused_not_clipped(tmp_path):
    """vocab > 2^16 stores ranks as uint32; 0xFFFFFFFF wrapped to -1 and the clipped gather
    decoded it as the shard's most frequent id."""
    meta = cache_meta("topk", k=4, encoding="compact", vocab_size=2 ** 17)
    root = write_cache(tmp_path / "cache", meta, random_rows(meta, 1, seq_len=4), rows_per_shard=2)

    def corrupt_rank(table: pa.Table) -> pa.Table:
        blobs = table.column("topk_ranks").to_pylist()
        ranks = unpack_planes([np.frombuffer(blobs[0], np.uint8)], np.dtype("<u4"))
        ranks[1] = 0xFFFFFFFF
        blobs[0] = pack_planes(ranks, np.dtype("<u4"))
        return table.set_column(table.schema.get_field_index("topk_ranks"), "topk_ranks", pa.array(blobs, pa.binary()))

    _rewrite_shard(root, corrupt_rank)
    _refused(root, r"task-00000-000000.parquet: top-k rank 4294967295 outside the shard's id table")
