"""Every way a cache can be broken gives one CacheError line naming the file and the problem."""

from __future__ import annotations

import json
import shutil

import pytest

from cache_rows import cache_meta, random_rows, write_cache
from qadpipe.cache import CacheReader, CacheWriter
from qadpipe.errors import CacheError

SHARD0 = "shards/task-00000-000000.parquet"
MANIFEST = "manifests/task-00000.json"


@pytest.fixture
def cache(tmp_path):
    meta = cache_meta("topk", k=8)
    return write_cache(tmp_path / "cache", meta, random_rows(meta, 4), rows_per_shard=2)


def refused(root, pattern, action=lambda reader: None):
    with pytest.raises(CacheError, match=pattern) as info:
        action(CacheReader(str(root)))
    assert "\n" not in str(info.value)
    return str(info.value)


def edit_manifest(root, change):
    path = root / MANIFEST
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_truncated_shard(cache):
    path = cache / SHARD0
    path.write_bytes(path.read_bytes()[:-100])
    refused(cache, rf"{SHARD0}: truncated or overwritten: \d+ bytes on storage, manifest says \d+")


def test_flipped_byte_fails_the_checksum(cache):
    path = cache / SHARD0
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x40
    path.write_bytes(bytes(data))
    refused(cache, rf"{SHARD0}: checksum mismatch", lambda reader: list(reader.iter_sequences()))
    refused(cache, rf"{SHARD0}: checksum mismatch", lambda reader: reader.verify_all())


def test_missing_shard(cache):
    (cache / SHARD0).unlink()
    refused(cache, rf"{SHARD0}: missing \(listed in the manifest, absent on storage\)")


def test_unknown_format_version(cache):
    edit_manifest(cache, lambda data: data.update(format_version=99))
    refused(cache, rf"{MANIFEST}: format_version=99, this qadpipe reads format_version=1")


def test_unknown_meta_version(cache):
    edit_manifest(cache, lambda data: data["meta"].update(format_version=2))
    refused(cache, rf"{MANIFEST}: cache format_version=2, this qadpipe reads format_version=1")


@pytest.mark.parametrize("field,value", [("tokenizer_fingerprint", "sha256:other"), ("vocab_size", 32000),
                                         ("target_kind", "sampled")])
def test_student_mismatch(cache, field, value):
    wanted = {"tokenizer_fingerprint": "sha256:synthetic", "vocab_size": 49152, field: value}
    cached = {"tokenizer_fingerprint": "'sha256:synthetic'", "vocab_size": "49152", "target_kind": "'topk'"}[field]
    refused(cache, rf"cache {field}={cached}, but the reader expects {field}={value!r}",
            lambda reader: reader.check_compatible(**wanted))


def test_k_mismatch_between_shards(tmp_path, cache):
    other = cache_meta("topk", k=16)
    write_cache(tmp_path / "other", other, random_rows(other, 2, prefix="x"))
    stranger = tmp_path / "other" / SHARD0
    shutil.copy(stranger, cache / "shards/task-00000-000002.parquet")
    entry = json.loads((tmp_path / "other" / MANIFEST).read_text())["shards"][0]
    edit_manifest(cache, lambda data: data["shards"].append({**entry, "name": "shards/task-00000-000002.parquet"}))
    refused(cache, r"task-00000-000002.parquet: shard has k=16, the cache manifest says k=8")


def test_k_mismatch_between_tasks(tmp_path, cache):
    other = cache_meta("topk", k=16)
    write_cache(tmp_path / "other", other, random_rows(other, 2, prefix="x"), task="task-00001")
    shutil.copytree(tmp_path / "other", cache, dirs_exist_ok=True)
    refused(cache, r"manifests/task-00001.json: disagrees with .*manifests/task-00000.json: k=16 vs k=8")


def test_empty_cache_and_paths_that_are_no_cache(tmp_path):
    (tmp_path / "started" / "manifests").mkdir(parents=True)      # a writer that committed nothing yet
    refused(tmp_path / "started", r"started/manifests: empty cache \(no committed shards\)")
    refused(tmp_path / "never-written", r"never-written: no cache here \(the path does not exist\)")
    refused(tmp_path, r": not a cache \(no manifests/ directory\)")
    (tmp_path / "file").write_text("x")
    refused(tmp_path / "file", r"file: a file, expected a cache directory")


def test_manifest_entry_escaping_the_cache_is_refused(cache):
    edit_manifest(cache, lambda data: data["shards"][0].update(name="shards/../../x.parquet"))
    refused(cache, r"shard name 'shards/../../x.parquet' is not a file directly under shards/")
    edit_manifest(cache, lambda data: data["shards"][0].update(name="/etc/passwd"))
    refused(cache, r"shard name '/etc/passwd' is not a file directly under shards/")


def test_corrupt_manifest_json(cache):
    (cache / MANIFEST).write_text("{not json")
    refused(cache, rf"{MANIFEST}: not valid JSON")
    (cache / MANIFEST).write_text("[" * 5000 + "]" * 5000)   # was a RecursionError traceback
    refused(cache, rf"{MANIFEST}: not a manifest \(JSON nested too deeply to read\)")


def test_unlisted_and_temp_files_are_invisible_and_replaced(cache):
    """What a writer killed between shard rename and manifest replace leaves behind."""
    orphan = cache / "shards/task-00000-000002.parquet"
    orphan.write_bytes(b"half a shard")
    temp = cache / "shards/.task-00000-000002.parquet.abc.tmp"
    temp.write_bytes(b"torn")
    # a kill inside an atomic manifest or run-record write (and another task's, left alone)
    (cache / "runs/task-00000").mkdir(parents=True)
    ours = [temp, cache / "manifests/.task-00000.json.k3x9.tmp", cache / "runs/task-00000/.qadpipe_run.yaml.q1.tmp"]
    theirs = cache / "manifests/.task-00001.json.z7.tmp"
    for path in ours[1:] + [theirs]:
        path.write_bytes(b"torn")
    assert CacheReader(str(cache)).num_rows == 4
    meta = cache_meta("topk", k=8)
    with CacheWriter(str(cache), meta, rows_per_shard=2) as writer:
        assert not any(path.exists() for path in ours) and theirs.exists()
        for row in random_rows(meta, 2, prefix="late"):
            writer.write(row)
    reader = CacheReader(str(cache))
    assert reader.num_rows == 6 and len(list(reader.iter_sequences())) == 6


def test_id_table_outside_the_vocab_is_refused():
    """A compact shard's id table is the only source of its top-k ids: range-checked once."""
    import numpy as np
    import pyarrow as pa

    from qadpipe.cache import compact
    from qadpipe.cache.encoding import shard_id_order
    from qadpipe.cache.schema import ID_ORDER_KEY

    meta = cache_meta("topk", k=8)
    schema = pa.schema([]).with_metadata({ID_ORDER_KEY: compact.pack_order(np.array([3, meta.vocab_size]))})
    with pytest.raises(CacheError, match=r"^s.parquet: id table: ids span \[3, 49152\], expected \[0, 49152\)$"):
        shard_id_order(schema, meta, "s.parquet")


def test_a_manifest_under_another_tasks_name_is_refused(cache):
    """A manifest copied by hand to the next task's name would list its shards twice over."""
    shutil.copy(cache / MANIFEST, cache / "manifests" / "task-00001.json")
    refused(cache, r"task-00001\.json: names task 'task-00000', expected 'task-00001'")


def test_a_shard_holding_one_id_twice_is_refused(tmp_path):
    """A shard another writer made (the writer refuses the repeat) with one row id twice: ids
    are what resume skips and eval holds out, so the reader refuses it by name."""
    meta = cache_meta("topk", k=8)
    rows = random_rows(meta, 2)
    rows[1].id = rows[0].id
    with CacheWriter(str(tmp_path), meta, rows_per_shard=2) as writer:
        writer._buffered_ids = type("Forgetful", (set,), {"__contains__": lambda self, item: False})()
        for row in rows:
            writer.write(row)
    refused(tmp_path, rf"{SHARD0}: duplicate row ids within the shard", lambda reader: list(reader.iter_sequences()))


def test_a_shard_listed_twice_is_refused(cache):
    edit_manifest(cache, lambda data: data["shards"].append(data["shards"][0]))
    refused(cache, rf"{MANIFEST}: shard {SHARD0} is listed twice \(its rows would be read twice\)")


def test_a_shard_listed_by_two_tasks_is_refused(cache):
    """Another task's manifest naming this task's shard (a hand-merged cache): its rows would
    be read twice, and the per-shard duplicate-id check cannot see it."""
    other = json.loads((cache / MANIFEST).read_text())
    other.update(task="task-00001", shards=other["shards"][:1])
    (cache / "manifests/task-00001.json").write_text(json.dumps(other))
    refused(cache, r"manifests/task-00001.json: lists shard shards/task-00000-000000.parquet, not one of task "
                   r"task-00001's own \(shards/task-00001-NNNNNN.parquet\)")


def test_a_shard_changed_in_place_after_the_first_epoch_is_refused(cache):
    """Each epoch re-checks the checksum: a shard damaged or rewritten in place mid-run (same
    size, so only the checksum can tell) is refused, not trained on."""
    reader = CacheReader(str(cache))
    assert len(list(reader.iter_sequences())) == 4
    path = cache / SHARD0
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=rf"{SHARD0}: checksum mismatch"):
        list(reader.iter_sequences())


def test_every_read_checks_the_checksum_not_only_the_first(cache):
    """The checksum is compared on every read of a shard: one that no longer matches (here
    the manifest's, as a same-size rewrite that still parses would leave it) is refused."""
    import dataclasses

    reader = CacheReader(str(cache))
    assert len(list(reader.iter_sequences())) == 4
    reader.shards[0] = dataclasses.replace(reader.shards[0], sha256="0" * 64)
    with pytest.raises(CacheError, match=rf"{SHARD0}: checksum mismatch"):
        list(reader.iter_sequences())


def test_a_row_count_the_manifest_misstates_is_refused(cache):
    edit_manifest(cache, lambda data: data["shards"][0].update(rows=3))
    refused(cache, rf"{SHARD0}: 2 rows, manifest says 3")


@pytest.mark.parametrize("damage, problem", [
    ("tail above 1", r"tail_mass: NaN or outside \[0, 1\]"),
    ("one token too many", r"target rows per sequence differ from len\(input_ids\) - 1 - target_start"),
])
def test_a_plain_shard_the_writer_would_have_refused_is_refused_on_read(tmp_path, monkeypatch, damage, problem):
    """Decoded bytes are untrusted: rows a writer without its checks (another tool, an older
    bug) put in a valid, correctly hashed shard are refused by the reader, naming the shard."""
    import numpy as np

    import qadpipe.cache.writer as writer

    monkeypatch.setattr(writer, "validate_row", lambda row, meta: None)
    meta = cache_meta("topk", k=8, encoding="plain")
    rows = random_rows(meta, 2)
    if damage == "tail above 1":
        rows[1].tail_mass = rows[1].tail_mass + 1.5
    else:
        rows[1].input_ids = np.concatenate([rows[1].input_ids, rows[1].input_ids[:1]])
    write_cache(tmp_path / "cache", meta, rows, rows_per_shard=2)
    refused(tmp_path / "cache", rf"{SHARD0}: .*{problem}", lambda reader: list(reader.iter_sequences()))


def test_a_manifest_write_that_fails_and_is_retried_lists_its_shard_once(tmp_path):
    """A storage error (or a second Ctrl-C) while the manifest is replaced, then the retry that
    closing the writer makes: the shard is committed once, its rows read once."""
    meta = cache_meta("topk", k=8)
    writer = CacheWriter(str(tmp_path), meta, rows_per_shard=2)
    write_atomic, failures = writer.store.write_atomic, [CacheError("manifests/task-00000.json: cannot write")]

    def flaky(rel, data):
        if rel.startswith("manifests/") and failures:
            raise failures.pop()
        write_atomic(rel, data)

    writer.store.write_atomic = flaky
    with pytest.raises(CacheError, match="cannot write"), writer:
        for row in random_rows(meta, 3):
            writer.write(row)
    assert [entry["name"] for entry in json.loads((tmp_path / MANIFEST).read_text())["shards"]] == [SHARD0]
    assert [row.id for row in CacheReader(str(tmp_path)).iter_sequences()] == ["row-00000", "row-00001"]


def test_a_second_ctrl_c_right_after_a_shard_commits_leaves_a_readable_cache(tmp_path, monkeypatch):
    """KeyboardInterrupt just after the manifest listed the shard (here: in the log line):
    the writer's bookkeeping was half updated, and the flush in close() listed the shard
    twice or wrote its rows again as the next shard -- a cache no reader would open."""
    from qadpipe.cache import writer as writer_module

    meta = cache_meta("topk", k=8)
    interrupts = [KeyboardInterrupt()]

    def info(*args, **kwargs):
        if interrupts:
            raise interrupts.pop()

    monkeypatch.setattr(writer_module.log, "info", info)
    with pytest.raises(KeyboardInterrupt), CacheWriter(str(tmp_path), meta, rows_per_shard=2) as writer:
        for row in random_rows(meta, 3):
            writer.write(row)
    assert [row.id for row in CacheReader(str(tmp_path)).iter_sequences()] == ["row-00000", "row-00001"]
    assert CacheWriter(str(tmp_path), meta, rows_per_shard=2).done_ids() == {"row-00000", "row-00001"}


def test_no_row_is_taken_once_the_task_is_marked_complete(tmp_path):
    """A row written after mark_complete() sat uncommitted beside complete: true on disk."""
    meta = cache_meta("topk", k=8)
    rows = random_rows(meta, 2)
    writer = CacheWriter(str(tmp_path), meta)
    writer.write(rows[0])
    writer.mark_complete()
    with pytest.raises(CacheError, match="writer already marked complete"):
        writer.write(rows[1])


def test_a_task_does_not_remove_the_temp_files_of_a_task_its_name_prefixes(tmp_path):
    """Task 'a' removed the in-flight temps of a running task 'a-b' ('.a-b-000003.parquet.*.tmp'
    starts with '.a-'), whose commit then failed."""
    meta = cache_meta("topk", k=8)
    (tmp_path / "shards").mkdir(parents=True)
    (tmp_path / "manifests").mkdir(parents=True)
    theirs = [tmp_path / "shards" / ".a-b-000003.parquet.k2j.tmp", tmp_path / "manifests" / ".a.json.json.q9.tmp"]
    mine = [tmp_path / "shards" / ".a-000001.parquet.x1y.tmp", tmp_path / "manifests" / ".a.json.z7.tmp"]
    for path in theirs + mine:
        path.write_bytes(b"partial")
    CacheWriter(str(tmp_path), meta, task="a").close()
    assert [path.exists() for path in theirs + mine] == [True, True, False, False]


@pytest.mark.parametrize("damage, problem", [
    (lambda path: path.write_bytes(path.read_bytes()[:-1] + b"x"),
     r"checksum mismatch: sha256 [0-9a-f]{16}\.\.\., manifest says [0-9a-f]{16}\.\.\."),
    (lambda path: path.write_bytes(path.read_bytes()[:-1]),
     r"truncated or overwritten: \d+ bytes on storage, manifest says \d+"),
    (lambda path: path.unlink(), r"missing \(listed in the manifest, absent on storage\)"),
])
def test_resuming_a_task_on_a_damaged_shard_is_one_line_and_writes_nothing(cache, damage, problem):
    damage(cache / SHARD0)
    before = (cache / MANIFEST).read_bytes()
    expected = (rf"{SHARD0}: committed shard of task task-00000: {problem}; this task cannot resume on it: "
                rf"delete {cache / MANIFEST} and this task's shards")
    with pytest.raises(CacheError, match=expected) as info:
        CacheWriter(str(cache), cache_meta("topk", k=8), rows_per_shard=2)
    assert "\n" not in str(info.value) and (cache / MANIFEST).read_bytes() == before


def test_resuming_on_a_manifest_whose_row_count_is_wrong_is_refused(cache):
    """A manifest entry claiming 3 rows for a 2-row shard passed the size and checksum checks,
    and the resumed task rewrote it as it was: readers index rows by these counts."""
    edit_manifest(cache, lambda data: data["shards"][0].update(rows=3))
    with pytest.raises(CacheError, match=rf"{SHARD0}: committed shard of task task-00000 holds 2 rows, its manifest "
                                         "says 3"):
        CacheWriter(str(cache), cache_meta("topk", k=8), rows_per_shard=2)
    assert not (cache / "manifests/task-00000.lock").exists()


def test_a_decoder_refusal_names_the_shard(cache, monkeypatch):
    """The codec's own range checks (bytes that pass the checksum, or verify=False) know no file."""
    from qadpipe.cache import reader as reader_module

    def refuses(*args):
        raise CacheError("top-k rank 9 outside the shard's id table (3 ids)")

    monkeypatch.setattr(reader_module, "decode_batch", refuses)
    refused(cache, rf"{SHARD0}: top-k rank 9 outside the shard's id table \(3 ids\)$",
            lambda reader: list(reader.iter_sequences()))


def test_a_meta_value_out_of_range_names_the_manifest(cache):
    edit_manifest(cache, lambda data: data["meta"].update(k=0))
    refused(cache, rf"{MANIFEST}: cache meta k=0: expected 1 <= k <= vocab_size")


def test_a_vocabulary_int32_ids_cannot_hold_is_refused_before_anything_is_written(tmp_path):
    """Accepted before: plain ids past 2^32 wrapped silently (4294967300 read back as 4), and
    2^31-sized vocabularies wrote shards no reader could read."""
    from qadpipe.cache import CacheWriter

    with pytest.raises(CacheError, match=r"cache meta vocab_size=2147483648: expected 1 to 2147483646"):
        CacheWriter(str(tmp_path / "c"), cache_meta("topk", vocab_size=2**31), task="task-00000")
    assert not (tmp_path / "c").exists()


def test_an_absurd_task_count_is_refused_not_listed(cache):
    """Was a hang: the reader listed the 10^12 task names it thought missing."""
    edit_manifest(cache, lambda data: data.update(num_tasks=10 ** 12))
    refused(cache, rf"{MANIFEST}: num_tasks=1000000000000, expected an integer in \[1, 100000\] or null")


def test_more_draws_than_a_stored_count_holds_are_refused():
    """Counts are uint16: 65536 draws of one id would be stored as 0."""
    with pytest.raises(CacheError, match=r"num_samples=65536: expected 1 to 65535 draws"):
        cache_meta("sampled", num_samples=65536)


def test_a_shard_truncated_while_it_is_read_is_no_crash(cache, tmp_path):
    """A generate task rerun over a shard distill is reading (or NFS dropping a replaced file)
    truncated it under a memory map, and the next page read killed the reader with SIGBUS; read
    into memory, the bytes taken stay valid and a later read is refused in one line."""
    import subprocess
    import sys

    script = tmp_path / "truncate.py"
    script.write_text(
        "import hashlib, os, sys\n"
        "from qadpipe.cache import CacheReader\n"
        "reader = CacheReader(sys.argv[1])\n"
        f"taken = reader.store.buffer({SHARD0!r})\n"
        f"os.truncate(reader.store.describe({SHARD0!r}), 0)\n"
        "print(hashlib.sha256(memoryview(taken)).hexdigest() == reader.shards[0].sha256, flush=True)\n"
        "try:\n"
        "    list(reader.iter_rows(0, 4))\n"
        "except Exception as exc:\n"
        "    print(f'{type(exc).__name__}: {exc}')\n")
    done = subprocess.run([sys.executable, str(script), str(cache)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stderr[-1000:])
    assert done.stdout.splitlines()[0] == "True"
    assert done.stdout.splitlines()[1].startswith(f"CacheError: {cache / SHARD0}: ")
