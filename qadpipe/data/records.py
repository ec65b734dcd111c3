"""Raw records from a local data source, each with a stable id.

A record is a plain dict (one JSON object, Parquet row or ``datasets`` row).  Its id is a
hash of its content *and* its position in the source, so a rerun over the same source
gives the same ids (resume skips what a task already committed) while two identical
records at different positions stay distinct rows.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import hashlib
import json
import re
import uuid
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

from qadpipe.errors import DataError, first_line

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet",)
TEXT_SUFFIXES = (".txt", ".text", ".md")
ID_HEX_CHARS = 20
PARQUET_BATCH_ROWS = 1024


def record_id(record: dict[str, Any], position: int) -> str:
    """sha256 of the canonical JSON of the record and its position (first 80 bits, hex).
    Every field counts, used or not; a lone UTF-16 surrogate in one is hashed as it is
    (``surrogatepass``), and a value with no stable text form is refused, not ``str()``-ed:
    an object's default ``str`` holds its memory address, and a rerun would write every
    record again under new ids."""
    try:
        payload = f"{position}\n" + _canonical_json(record)
    except TypeError:
        column = next((name for name in sorted(record, key=str) if not _has_stable_form(record[name])), None)
        if column is None:
            raise DataError("the record's keys are not all strings, so it has no stable form to give it an id") \
                from None
        raise DataError(f"column '{column}' holds a {type(record[column]).__name__} value (or one nested in it), "
                        "which has no stable form to give the record an id; drop or convert that column") from None
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()[:ID_HEX_CHARS]


#: Non-JSON values of Parquet and ``datasets`` rows whose ``str()`` depends on the value alone;
#: hashed as ``str()``, as ids always hashed them (a cache being resumed keeps its ids).
_STABLE_STR_TYPES = (bytes, bytearray, datetime.date, datetime.time, datetime.timedelta, decimal.Decimal, uuid.UUID)


def _stable_str(value: Any) -> str:
    if isinstance(value, _STABLE_STR_TYPES):
        return str(value)
    raise TypeError(type(value).__name__)


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=_stable_str)


def _has_stable_form(value: Any) -> bool:
    try:
        _canonical_json(value)
    except TypeError:
        return False
    return True


class SourceRecord(NamedTuple):
    """A record, its position among the source's records (what its id hashes), and for a
    line-based file the line it is on: blank lines are skipped, so record 2 may be line 4."""

    position: int
    record: dict[str, Any]
    line: Optional[int] = None

    @property
    def label(self) -> str:
        return record_label(self.position, self.line)

    def where(self, source: str) -> str:
        return f"{source} {self.label}"


def record_label(position: int, line: Optional[int]) -> str:
    """How an error names a record: its position, and its line where the file has lines."""
    return f"record {position}" + (f", line {line}" if line is not None else "")


def iter_records(source: str, text_field: str = "text", source_name: str = "data.source"
                 ) -> Iterator[SourceRecord]:
    """Every record of ``source``, in file order (``source_name``: the config field errors name).

    Text files hold one record per non-empty line, stored under ``text_field`` (so a
    ``.txt`` of prompts works with ``data.field: prompt``).
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{source_name} '{source}': no such file or directory")
    suffix = path.suffix.lower()
    if path.is_dir():
        yield from _iter_saved_dataset(path, source_name)
    elif suffix in JSONL_SUFFIXES:
        yield from _iter_jsonl(path)
    elif suffix in JSON_SUFFIXES:
        yield from _iter_json(path)
    elif suffix in PARQUET_SUFFIXES:
        yield from _iter_parquet(path)
    elif suffix in TEXT_SUFFIXES:
        yield from _iter_text(path, text_field)
    else:
        expected = ", ".join(JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES + TEXT_SUFFIXES)
        raise DataError(f"{source_name} '{source}': unsupported file type '{path.suffix}', expected {expected} "
                        "or a datasets.save_to_disk directory")


def source_fingerprint(source: str, source_name: str = "data.source") -> str:
    """A hash of the bytes records are read from: the file, or a ``save_to_disk`` directory's
    metadata and the data files of the split read (not its cache-*.arrow files that a
    ``Dataset.map`` leaves there, nor other splits: they change nothing qadpipe reads)."""
    path = Path(source).expanduser()
    files = _saved_dataset_files(path, source_name) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        # before 2026-12-07 a text file was also split at a lone "\r" (other records, other ids)
        scan = file.suffix.lower() in TEXT_SUFFIXES
        lone_carriage_return, carried = False, b""
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
                if scan and not lone_carriage_return:
                    window = carried + block   # a run of "\r" split between two blocks
                    lone_carriage_return = _LONE_CARRIAGE_RETURN.search(window) is not None
                    carried = window[len(window.rstrip(b"\r")):]
        if lone_carriage_return:
            digest.update(b"\0lines end at \\n only")
    return "sha256:" + digest.hexdigest()[:32]


# "\r" that ends no line: not followed by "\n" once the "\r" of a CRLF converted twice are skipped
_LONE_CARRIAGE_RETURN = re.compile(rb"\r+[^\r\n]")


def _undecoded(feature: Any) -> Any:
    """``feature`` with every Image/Audio/Video in it, however nested, set to ``decode=False``:
    rows then hold the stored bytes and path instead of decoded objects."""
    if isinstance(feature, dict):
        return {name: _undecoded(inner) for name, inner in feature.items()}
    if isinstance(feature, (list, tuple)):
        return type(feature)(_undecoded(inner) for inner in feature)
    if getattr(feature, "decode", False):
        return dataclasses.replace(feature, decode=False)
    if dataclasses.is_dataclass(feature) and hasattr(feature, "feature"):   # List, LargeList, Sequence
        return dataclasses.replace(feature, feature=_undecoded(feature.feature))
    return feature


def _saved_dataset_files(path: Path, source_name: str) -> list[Path]:
    split = _saved_split(path, source_name)
    root = path / split if split is not None else path
    try:
        data_files = [entry["filename"] for entry in json.loads((root / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{source_name} '{root}/state.json': unreadable ({first_line(exc)})") from None
    metadata = [path / "dataset_dict.json"] if split is not None else []
    return metadata + [root / "dataset_info.json", root / "state.json"] + [root / name for name in data_files]


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object per record, got {type(value).__name__}")
    return value


def _utf8_lines(path: Path) -> Iterator[str]:
    """Lines of a text file, each with its line end (a leading BOM, as Windows editors write,
    dropped); a binary or non-UTF-8 file is a DataError naming it.  Lines end at "\n" only (a
    "\r\n" keeps its "\r"), as JSON Lines defines them and as the line numbers of errors count
    them: universal newlines also ended one at a lone "\r", splitting a text record in two and
    a JSON object that has one as whitespace."""
    with open(path, encoding="utf-8-sig", newline="\n") as handle:
        try:
            yield from handle
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}{_first_undecodable_line(path)}: not UTF-8 text ({exc.reason})") from None


def _first_undecodable_line(path: Path) -> str:
    """``":N"`` for the first line that is not UTF-8 (the text reader decodes ahead in chunks, so
    its error does not say where).  A 0x0A byte never sits inside a UTF-8 sequence, so lines
    decode on their own."""
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return f":{line_no}"
    return ""


def _iter_jsonl(path: Path) -> Iterator[SourceRecord]:
    position = 0
    for line_no, line in enumerate(_utf8_lines(path), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line.rstrip("\r\n"))   # error columns on the line, not past its end
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg.removesuffix(' at')} at column "
                            f"{exc.colno})") from None
        yield SourceRecord(position, _object(value, f"{path}:{line_no}"), line_no)
        position += 1


def _iter_json(path: Path) -> Iterator[SourceRecord]:
    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        hint = ("; it looks like JSON Lines (one object per line), which a .jsonl name reads"
                if exc.msg == "Extra data" and exc.lineno > 1 else "")
        raise DataError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}){hint}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason}); expected a JSON list") from None
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(value).__name__}")
    for position, item in enumerate(value):
        yield SourceRecord(position, _object(item, f"{path} record {position}"))


def _iter_parquet(path: Path) -> Iterator[SourceRecord]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError subclasses
        raise DataError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
    position = 0
    batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS)
    while True:
        try:
            batch = next(batches, None)
        except Exception as exc:  # a corrupt page: ArrowInvalid, OSError ("ZSTD decompression failed")
            raise DataError(f"{path}: cannot read records {position}..{position + PARQUET_BATCH_ROWS - 1} "
                            f"({first_line(exc)})") from None
        if batch is None:
            return
        for row in batch.to_pylist():
            yield SourceRecord(position, row)
            position += 1


def _iter_text(path: Path, text_field: str) -> Iterator[SourceRecord]:
    position = 0
    for line_no, line in enumerate(_utf8_lines(path), start=1):
        line = line.removesuffix("\n").rstrip("\r")   # a CRLF converted twice ends "\r\r\n"
        if line.strip():
            yield SourceRecord(position, {text_field: line}, line_no)
            position += 1


def _saved_split(path: Path, source_name: str) -> Optional[str]:
    """The split a ``save_to_disk`` directory is read from: None for a plain Dataset, else
    'train' or the only split of a DatasetDict."""
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{source_name} '{path}/dataset_dict.json': unreadable ({first_line(exc)})") from None
        if "train" not in splits and len(splits) != 1:
            raise DataError(f"{source_name} '{path}': a DatasetDict with splits {sorted(splits)}, expected a "
                            "'train' split or a single split")
        return "train" if "train" in splits else splits[0]
    if (path / "dataset_info.json").is_file():
        return None
    raise DataError(f"{source_name} '{path}': a directory, but not one written by datasets.save_to_disk")


def _iter_saved_dataset(path: Path, source_name: str) -> Iterator[SourceRecord]:
    import datasets
    import pyarrow as pa

    split = _saved_split(path, source_name)
    try:
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[split]
        # Rows as stored: a format saved with the dataset (pandas, arrow, numpy) would hand
        # over other types, and an Image or Audio column decoded would give objects whose
        # text form changes from run to run (and so would every record's id).
        loaded = loaded.with_format(None)
        undecoded = _undecoded(dict(loaded.features))
        if undecoded != dict(loaded.features):
            loaded = loaded.cast(datasets.Features(undecoded))
        for position, row in enumerate(loaded):
            yield SourceRecord(position, row)
    except (OSError, ValueError, pa.ArrowException) as exc:   # a truncated copy: ArrowInvalid
        raise DataError(f"{source_name} '{path}': cannot read the saved dataset ({first_line(exc)})") from None
