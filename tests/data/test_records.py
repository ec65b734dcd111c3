"""Every source format yields the same records with the same stable ids."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qadpipe.data.records import iter_records, record_id, source_fingerprint
from qadpipe.errors import DataError

RECORDS = [{"text": "alpha beta"}, {"text": "gamma"}, {"text": "alpha beta"}]


def _write_all_formats(tmp_path: Path) -> dict[str, Path]:
    paths = {"jsonl": tmp_path / "d.jsonl", "json": tmp_path / "d.json", "parquet": tmp_path / "d.parquet",
             "txt": tmp_path / "d.txt", "saved": tmp_path / "saved"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + "\n")
    paths["json"].write_text(json.dumps(RECORDS))
    pq.write_table(pa.Table.from_pylist(RECORDS), paths["parquet"])
    paths["txt"].write_text("\n".join(r["text"] for r in RECORDS) + "\n\n")
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(paths["saved"]))
    return paths


def test_every_format_gives_the_same_records(tmp_path: Path) -> None:
    for kind, path in _write_all_formats(tmp_path).items():
        assert [(r.position, r.record) for r in iter_records(str(path))] == list(enumerate(RECORDS)), kind


def test_a_leading_byte_order_mark_is_dropped_in_every_text_format(tmp_path: Path) -> None:
    """Windows editors write UTF-8 with a BOM: json.loads refused it, and a .txt kept it as text."""
    bom = "\ufeff"
    for kind, path in _write_all_formats(tmp_path).items():
        if kind in ("jsonl", "json", "txt"):
            path.write_text(bom + path.read_text(encoding="utf-8"), encoding="utf-8")
            assert [(r.position, r.record) for r in iter_records(str(path))] == list(enumerate(RECORDS)), kind


def test_lines_end_at_a_newline_only_and_windows_line_ends_read_as_unix_ones(tmp_path: Path) -> None:
    """Universal newlines ended a line at a lone carriage return: a text record was split in
    two (other ids, line numbers past the file's), a JSON object using one as whitespace was
    "not valid JSON"."""
    for kind, path in _write_all_formats(tmp_path).items():
        if kind in ("jsonl", "txt"):   # CRLF line ends: the same records, the same ids
            path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
            assert [(r.position, r.record) for r in iter_records(str(path))] == list(enumerate(RECORDS)), kind
    text = tmp_path / "cr.txt"
    text.write_bytes(b"one record\rwith a carriage return\nsecond\n")
    assert [(r.record["text"], r.line) for r in iter_records(str(text))] == [
        ("one record\rwith a carriage return", 1), ("second", 2)]
    twice = tmp_path / "crcr.txt"   # CRLF converted twice: the records of the text, no carriage return in them
    twice.write_bytes(b"first line\r\r\nsecond\r\r\n")
    assert [(r.record["text"], r.line) for r in iter_records(str(twice))] == [("first line", 1), ("second", 2)]
    lines = tmp_path / "cr.jsonl"
    lines.write_bytes(b'{"text": "hello",\r "meta": 1}\n')
    assert [r.record for r in iter_records(str(lines))] == [{"text": "hello", "meta": 1}]


def _bytes_hash(path: Path) -> str:
    """The fingerprint of a file as it was before the line-end change: its name, then its bytes."""
    return "sha256:" + hashlib.sha256(path.name.encode() + path.read_bytes()).hexdigest()[:32]


@pytest.mark.parametrize("content, read_as_before", [
    (b"a\nb\n", True), (b"a\r\nb\r\n", True), (b"a\r\r\nb\r\r\n", True), (b"end without a newline\r", True),
    (b"a\rb\n", False), (b"a\r \n", False), (b"a\r\r\r", True), (b"a\r\r\rx\n", False),
])
def test_a_text_file_that_a_lone_carriage_return_used_to_split_has_another_fingerprint(
        tmp_path: Path, content: bytes, read_as_before: bool) -> None:
    """Its records changed with the line ends (see above): a cache of the old records must not
    take the new ones under the same fingerprint.  Files read as before keep theirs."""
    path = tmp_path / "d.txt"
    path.write_bytes(content)
    assert (source_fingerprint(str(path)) == _bytes_hash(path)) == read_as_before
    lines = tmp_path / "d.jsonl"   # a lone "\r" there reads the same records or is refused: nothing mixes
    lines.write_bytes(b'{"text": "a"}\r ' + content.replace(b"\n", b" ") + b"\n")
    assert source_fingerprint(str(lines)) == _bytes_hash(lines)


def test_a_run_of_carriage_returns_split_between_two_read_blocks_is_judged_whole(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    for tail, lone in ((b"\r\n", False), (b"x\n", True)):
        path.write_bytes(b"x" * ((1 << 20) - 3) + b"\r\r\r" + tail)   # the first block ends with the run
        assert (source_fingerprint(str(path)) != _bytes_hash(path)) == lone


def test_ids_are_stable_and_distinguish_position_and_content() -> None:
    ids = [record_id(r, i) for i, r in enumerate(RECORDS)]
    assert ids == [record_id(r, i) for i, r in enumerate(RECORDS)]
    assert len(set(ids)) == 3  # records 0 and 2 are equal but sit at different positions
    assert record_id({"text": "alpha beta!"}, 0) != ids[0]
    assert record_id({"b": 1, "a": 2}, 0) == record_id({"a": 2, "b": 1}, 0)  # key order is not content


def test_ids_of_values_json_lacks_are_stable_and_an_unstable_one_is_refused() -> None:
    """Parquet and datasets rows hold bytes, dates, decimals; a lone surrogate may sit in a field
    qadpipe does not read.  An object's str() holds its address: it would change every run."""
    import datetime
    import decimal

    record = {"text": "a", "raw": b"\x00\x01", "when": datetime.date(2026, 12, 5), "price": decimal.Decimal("1.50"),
              "note": "cut \udc80 here"}
    assert record_id(record, 3) == record_id(dict(record), 3)
    assert record_id(record, 3) != record_id({**record, "raw": b"\x00\x02"}, 3)
    with pytest.raises(DataError, match="column 'image' holds a list value .or one nested in it., which has no "
                                        "stable form"):
        record_id({"text": "a", "image": [object()]}, 3)


def test_ids_are_those_earlier_qadpipe_gave_so_a_resumed_cache_skips_its_rows() -> None:
    """Ids hash str() of non-JSON values, as before 2026-12-05 (a datetime with a space, bytes as
    their repr): another form would make a resumed cache write every record again."""
    import datetime
    import decimal

    record = {"text": "a", "when": datetime.datetime(2026, 12, 5, 8, 30), "raw": b"\x00\x01",
              "price": decimal.Decimal("1.50"), "nested": {"list": [1, None, 2.5]}}
    earlier = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    assert record_id(record, 7) == hashlib.sha256(f"7\n{earlier}".encode()).hexdigest()[:20]


def test_a_saved_dataset_reads_its_rows_as_stored(tmp_path: Path) -> None:
    """A format saved with the dataset (here pandas) handed over Series; an Image column was
    decoded to PIL objects, whose str() -- and so every record id -- changed from run to run."""
    import io

    Image = pytest.importorskip("PIL.Image")

    png = io.BytesIO()
    Image.new("RGB", (2, 2)).save(png, format="PNG")
    image = {"bytes": png.getvalue(), "path": None}
    features = datasets.Features({"text": datasets.Value("string"), "image": datasets.Image(),
                                  "pages": datasets.List(datasets.Image())})   # nested, as VLM sets store them
    saved = datasets.Dataset.from_dict({"text": ["alpha", "beta"], "image": [image] * 2, "pages": [[image]] * 2},
                                       features=features)
    saved.with_format("pandas").save_to_disk(str(tmp_path / "ds"))
    first = [record_id(r.record, r.position) for r in iter_records(str(tmp_path / "ds"))]
    again = [record_id(r.record, r.position) for r in iter_records(str(tmp_path / "ds"))]
    assert first == again and [r.record["text"] for r in iter_records(str(tmp_path / "ds"))] == ["alpha", "beta"]


def test_a_saved_dataset_fingerprint_ignores_what_qadpipe_does_not_read(tmp_path: Path) -> None:
    """Dataset.map leaves cache-*.arrow files in the directory, and other splits may change:
    neither changes the records read, and a resume was refused over them."""
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS),
                                   "test": datasets.Dataset.from_list(RECORDS[:1])})
    splits.save_to_disk(str(tmp_path / "dd"))
    before = source_fingerprint(str(tmp_path / "dd"))
    (tmp_path / "dd" / "train" / "cache-0123.arrow").write_bytes(b"written by Dataset.map")
    datasets.Dataset.from_list(RECORDS[1:]).save_to_disk(str(tmp_path / "test-split"))
    for name in ("test/data-00000-of-00001.arrow",):
        (tmp_path / "dd" / name).write_bytes((tmp_path / "test-split" / "data-00000-of-00001.arrow").read_bytes())
    assert source_fingerprint(str(tmp_path / "dd")) == before
    datasets.Dataset.from_list(RECORDS[:2]).save_to_disk(str(tmp_path / "dd" / "train"))
    assert source_fingerprint(str(tmp_path / "dd")) != before


def test_a_truncated_saved_dataset_and_a_corrupt_parquet_page_are_one_line(tmp_path: Path) -> None:
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "ds"))
    data_file = tmp_path / "ds" / "data-00000-of-00001.arrow"
    data_file.write_bytes(data_file.read_bytes()[:100])   # an interrupted copy
    with pytest.raises(DataError, match=r"data.source '.*ds': cannot read the saved dataset \("):
        list(iter_records(str(tmp_path / "ds")))
    table = pa.Table.from_pylist([{"text": f"record {i}: {i * 7919 % 10007} {i ** 3}"} for i in range(2000)])
    pq.write_table(table, tmp_path / "d.parquet", compression="zstd")
    column = pq.ParquetFile(tmp_path / "d.parquet").metadata.row_group(0).column(0)
    raw = bytearray((tmp_path / "d.parquet").read_bytes())
    inside = (column.dictionary_page_offset or column.data_page_offset) + column.total_compressed_size // 2
    raw[inside:inside + 64] = bytes(64)                   # zeroes in the compressed data page
    (tmp_path / "d.parquet").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"d\.parquet: cannot read records 0\.\.1023 \("):
        list(iter_records(str(tmp_path / "d.parquet")))


def test_a_line_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"".join(b'{"text": "line %d"}\n' % i for i in range(500)) + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:501: not UTF-8 text (invalid continuation byte)")):
        list(iter_records(str(path)))


def test_line_based_files_name_the_line_of_a_record(tmp_path: Path) -> None:
    path = tmp_path / "UPPER.JSONL"    # suffixes in any case
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    assert [(r.position, r.line, r.where("f")) for r in iter_records(str(path))] == [
        (0, 1, "f record 0, line 1"), (1, 3, "f record 1, line 3")]


def test_text_lines_land_in_the_configured_field(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\nsecond\n")
    assert [r.record for r in iter_records(str(path), "prompt")] == [{"prompt": "first prompt"}, {"prompt": "second"}]


def test_fingerprint_follows_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n')
    before = source_fingerprint(str(path))
    assert source_fingerprint(str(path)) == before
    path.write_text('{"text": "b"}\n')
    assert source_fingerprint(str(path)) != before


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "a"}\n{"text": \n', "bad.jsonl:2: not valid JSON (Expecting value at column 10)"),
    ("ctrl.jsonl", '{"text": "a\tb"}\n', "ctrl.jsonl:1: not valid JSON (Invalid control character at column 12)"),
    ("lines.json", '{"text": "a"}\n{"text": "b"}\n', "lines.json: not valid JSON at line 2 column 1 (Extra data); "
                                                       "it looks like JSON Lines"),
    ("list.jsonl", '[1, 2]\n', "list.jsonl:1: expected a JSON object per record, got list"),
    ("obj.json", '{"text": "a"}', "obj.json: expected a JSON list of records, got dict"),
    ("data.csv", "text\na\n", "unsupported file type '.csv'"),
    ("broken.parquet", "not parquet", "broken.parquet: not a readable Parquet file"),
])
def test_bad_sources_are_one_clear_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(message)):
        list(iter_records(str(path)))


def test_missing_source_and_foreign_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or directory"):
        list(iter_records(str(tmp_path / "absent.jsonl")))
    with pytest.raises(DataError, match="not one written by datasets.save_to_disk"):
        list(iter_records(str(tmp_path)))


def test_a_text_file_skips_blank_lines_as_json_lines_do_and_keeps_a_line_as_written(tmp_path: Path) -> None:
    """Blank lines are no records and take no position (a position is what an id hashes and what
    the task split deals), in a .txt as in a .jsonl; a line keeps its own spaces (indented code)."""
    path = tmp_path / "d.txt"
    path.write_text("first\n\n   \n    indented code  \t\nlast\n")
    assert [(r.position, r.line, r.record) for r in iter_records(str(path))] == [
        (0, 1, {"text": "first"}), (1, 4, {"text": "    indented code  \t"}), (2, 5, {"text": "last"})]


def test_parquet_positions_run_on_across_read_batches(tmp_path: Path) -> None:
    """Parquet is read in batches of 1024 rows: positions (and so ids) run on through all of them."""
    table = pa.Table.from_pylist([{"text": "same"}] * 2500)
    pq.write_table(table, tmp_path / "d.parquet")
    records = list(iter_records(str(tmp_path / "d.parquet")))
    assert [r.position for r in records] == list(range(2500))
    assert len({record_id(r.record, r.position) for r in records}) == 2500


def test_a_dataset_dict_is_read_from_its_train_split_whatever_its_order(tmp_path: Path) -> None:
    splits = datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": "held out"}]),
                                   "train": datasets.Dataset.from_list(RECORDS)})
    splits.save_to_disk(str(tmp_path / "dd"))
    assert [r.record for r in iter_records(str(tmp_path / "dd"))] == RECORDS
    before = source_fingerprint(str(tmp_path / "dd"))
    datasets.Dataset.from_list([{"text": "other"}]).save_to_disk(str(tmp_path / "other"))
    for name in ("data-00000-of-00001.arrow",):   # the test split changes: not what is read
        (tmp_path / "dd" / "test" / name).write_bytes((tmp_path / "other" / name).read_bytes())
    assert source_fingerprint(str(tmp_path / "dd")) == before
