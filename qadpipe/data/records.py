"""Raw records from a local data source, each with a stable id.

A record is a plain dict (one JSON object, Parquet row or ``datasets`` row).  Its id is a
hash of its content *and* its position in the source, so a rerun over the same source
gives the same ids (resume skips what a task already committed) while two identical
records at different positions stay distinct rows.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator

from qadpipe.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".text", ".md")
ID_HEX_CHARS = 20


def record_id(record: dict[str, Any], position: int) -> str:
    """sha256 of the canonical JSON of the record and its position (first 80 bits, hex)."""
    payload = f"{position}\n" + json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:ID_HEX_CHARS]


def iter_records(source: str, text_field: str = "text", source_name: str = "data.source"
                 ) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(position, record)`` for every record of ``source``, in file order (``source_name``:
    the config field errors name).

    Text files hold one record per non-empty line, stored under ``text_field`` (so a
    ``.txt`` of prompts works with ``data.field: prompt``).
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{source_name} '{source}': no such file or directory")
    if path.is_dir():
        yield from _iter_saved_dataset(path, source_name)
    elif path.suffix in JSONL_SUFFIXES:
        yield from _iter_jsonl(path)
    elif path.suffix in JSON_SUFFIXES:
        yield from _iter_json(path)
    elif path.suffix in PARQUET_SUFFIXES:
        yield from _iter_parquet(path)
    elif path.suffix in TEXT_SUFFIXES:
        yield from _iter_text(path, text_field)
    else:
        expected = ", ".join(JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES)
        raise DataError(f"{source_name} '{source}': unsupported file type '{path.suffix}', expected {expected} "
                        "or a datasets.save_to_disk directory")


def source_fingerprint(source: str) -> str:
    """A hash of the source's bytes (every file of a directory, in sorted order)."""
    path = Path(source).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()[:32]


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object per record, got {type(value).__name__}")
    return value


def _utf8_lines(path: Path) -> Iterator[str]:
    """Lines of a text file (a leading BOM, as Windows editors write, dropped); a binary or
    non-UTF-8 file is a DataError naming it."""
    with open(path, encoding="utf-8-sig") as handle:
        try:
            yield from handle
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    position = 0
    for line_no, line in enumerate(_utf8_lines(path), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
        yield position, _object(value, f"{path}:{line_no}")
        position += 1


def _iter_json(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON at line {exc.lineno} ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason}); expected a JSON list") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(value).__name__}")
    for position, item in enumerate(value):
        yield position, _object(item, f"{path} record {position}")


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError subclasses
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    position = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield position, row
            position += 1


def _iter_text(path: Path, text_field: str) -> Iterator[tuple[int, dict[str, Any]]]:
    position = 0
    for line in _utf8_lines(path):
        line = line.rstrip("\n")
        if line.strip():
            yield position, {text_field: line}
            position += 1


def _iter_saved_dataset(path: Path, source_name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    import datasets

    if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise DataError(f"{source_name} '{path}': a directory, but not one written by datasets.save_to_disk")
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded and len(loaded) != 1:
            raise DataError(f"{source_name} '{path}': a DatasetDict with splits {sorted(loaded)}, expected a "
                            "'train' split or a single split")
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    for position, row in enumerate(loaded):
        yield position, row
