"""Every source format yields the same records with the same stable ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qadpipe.data.records import iter_records, record_id, source_fingerprint
from qadpipe.errors import DataError

RECORDS = [{"text": "alpha beta"}, {"text": "gamma"}, {"text": "alpha beta"}]


def _write_all_formats(tmp_path: Path) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

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
        assert list(iter_records(str(path))) == list(enumerate(RECORDS)), kind


def test_a_leading_byte_order_mark_is_dropped_in_every_text_format(tmp_path: Path) -> None:
    """Windows editors write UTF-8 with a BOM: json.loads refused it, and a .txt kept it as text."""
    bom = "\ufeff"
    for kind, path in _write_all_formats(tmp_path).items():
        if kind in ("jsonl", "json", "txt"):
            path.write_text(bom + path.read_text(encoding="utf-8"), encoding="utf-8")
            assert list(iter_records(str(path))) == list(enumerate(RECORDS)), kind


def test_ids_are_stable_and_distinguish_position_and_content() -> None:
    ids = [record_id(r, i) for i, r in enumerate(RECORDS)]
    assert ids == [record_id(r, i) for i, r in enumerate(RECORDS)]
    assert len(set(ids)) == 3  # records 0 and 2 are equal but sit at different positions
    assert record_id({"text": "alpha beta!"}, 0) != ids[0]
    assert record_id({"b": 1, "a": 2}, 0) == record_id({"a": 2, "b": 1}, 0)  # key order is not content


def test_text_lines_land_in_the_configured_field(tmp_path: Path) -> None:
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\nsecond\n")
    assert [r for _, r in iter_records(str(path), "prompt")] == [{"prompt": "first prompt"}, {"prompt": "second"}]


def test_fingerprint_follows_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n')
    before = source_fingerprint(str(path))
    assert source_fingerprint(str(path)) == before
    path.write_text('{"text": "b"}\n')
    assert source_fingerprint(str(path)) != before


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", '{"text": "a"}\n{"text": \n', "bad.jsonl:2: not valid JSON"),
    ("list.jsonl", '[1, 2]\n', "list.jsonl:1: expected a JSON object per record, got list"),
    ("obj.json", '{"text": "a"}', "obj.json: expected a JSON list of records, got dict"),
    ("data.csv", "text\na\n", "unsupported file type '.csv'"),
    ("broken.parquet", "not parquet", "broken.parquet: not a readable Parquet file"),
])
def test_bad_sources_are_one_clear_line(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message.replace(".", r"\.").replace("[", r"\[").replace("(", r"\(")):
        list(iter_records(str(path)))


def test_missing_source_and_foreign_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or directory"):
        list(iter_records(str(tmp_path / "absent.jsonl")))
    with pytest.raises(DataError, match="not one written by datasets.save_to_disk"):
        list(iter_records(str(tmp_path)))
