"""A cache root on local disk or in an object store pyarrow.fs reaches (``s3://bucket/prefix``,
``gs://`` ...; object stores have no directories, so none are created there).

Writes are all-or-nothing: locally a temp name in the same directory, fsync, rename, fsync
of the directory; on an object store a single PUT (objects appear whole or not at all).
Credentials for object stores come only from the environment (``AWS_ACCESS_KEY_ID`` ...,
``AWS_ENDPOINT_URL``) or the URI's query (``?endpoint_override=host:port&scheme=http``);
qadpipe never writes them anywhere.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.fs as pafs

from qadpipe.errors import CacheError, first_line
from qadpipe.provenance import atomic_write_bytes

TEMP_SUFFIX = ".tmp"


class Store:
    """Relative-path file access under one cache root."""

    def __init__(self, root: str, filesystem: pafs.FileSystem | None = None) -> None:
        self.root = str(root)
        self.local = filesystem is None and ("://" not in self.root or self.root.startswith("file://"))
        if self.local:
            path = self.root.removeprefix("file://")
            self.fs, self.base = None, Path(path).expanduser().absolute()
        elif filesystem is not None:
            self.fs, self.base = filesystem, self.root.rstrip("/")
        else:
            _refuse_credentials(self.root)
            _probe_gcs(self.root)
            try:
                self.fs, path = pafs.FileSystem.from_uri(self.root)
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise CacheError(f"{self.root}: cannot open cache location ({first_line(exc)})") from exc
            self.base = path.rstrip("/")

    def describe(self, rel: str) -> str:
        """How to name ``rel`` in a message: the full path or URI."""
        if self.local:
            return str(self.base / rel)
        return f"{self.root.split('?')[0].rstrip('/')}/{rel}"

    def _path(self, rel: str) -> str:
        return str(self.base / rel) if self.local else f"{self.base}/{rel}"

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Replace ``rel`` with ``data``: readers see the old content or the new, never a torn file."""
        try:
            if self.local:
                atomic_write_bytes(self.base / rel, data)
            else:
                with self.fs.open_output_stream(self._path(rel)) as out:
                    out.write(data)
        except (OSError, pa.ArrowException) as exc:
            raise CacheError(f"{self.describe(rel)}: cannot write ({first_line(exc)})") from exc

    def read_bytes(self, rel: str) -> bytes:
        return self.buffer(rel).to_pybytes()

    def buffer(self, rel: str) -> pa.Buffer:
        """The whole file, read into memory.  Not memory-mapped: a file truncated or replaced
        while mapped (a generate task rerun over a shard distill is reading; NFS's stale handles)
        would kill the process with SIGBUS at the next page, where a read fails as an error."""
        try:
            if self.local:
                with pa.OSFile(self._path(rel)) as source:
                    return source.read_buffer()
            with self.fs.open_input_file(self._path(rel)) as source:
                return source.read_buffer()
        except FileNotFoundError as exc:
            raise CacheError(f"{self.describe(rel)}: missing") from exc
        except (OSError, pa.ArrowException) as exc:
            raise CacheError(f"{self.describe(rel)}: cannot read ({first_line(exc)})") from exc

    def open_input(self, rel: str) -> pa.NativeFile:
        """A random-access handle (positioned reads, not a memory map: see :meth:`buffer`):
        reading a Parquet footer or one column this way does not fetch the whole file."""
        try:
            if self.local:
                return pa.OSFile(self._path(rel))
            return self.fs.open_input_file(self._path(rel))
        except FileNotFoundError as exc:
            raise CacheError(f"{self.describe(rel)}: missing") from exc
        except (OSError, pa.ArrowException) as exc:
            raise CacheError(f"{self.describe(rel)}: cannot read ({first_line(exc)})") from exc

    def size(self, rel: str) -> int | None:
        """Size in bytes, or None when the file does not exist."""
        try:
            if self.local:
                return (self.base / rel).stat().st_size
            info = self.fs.get_file_info(self._path(rel))
        except FileNotFoundError:
            return None
        except (OSError, pa.ArrowException) as exc:
            raise CacheError(f"{self.describe(rel)}: cannot stat ({first_line(exc)})") from exc
        return info.size if info.type == pafs.FileType.File else None

    def list(self, rel_dir: str) -> list[str]:
        """File names directly under ``rel_dir`` (sorted; empty when it does not exist)."""
        try:
            if self.local:
                directory = self.base / rel_dir
                return sorted(p.name for p in directory.iterdir() if p.is_file()) if directory.is_dir() else []
            infos = self.fs.get_file_info(pafs.FileSelector(self._path(rel_dir), allow_not_found=True))
        except (OSError, pa.ArrowException) as exc:
            raise CacheError(f"{self.describe(rel_dir)}: cannot list ({first_line(exc)})") from exc
        return sorted(info.base_name for info in infos if info.type == pafs.FileType.File)

    def remove_temps(self, rel_dir: str, owned: Callable[[str], bool]) -> None:
        """Delete leftover temp files of a killed local writer (object stores leave none):
        those whose target name (``.<target>.<random>.tmp``) ``owned`` claims.  Matching the
        whole target keeps task ``a`` off the temps of a running task ``a-b``."""
        if not self.local:
            return
        for name in self.list(rel_dir):
            target = name[1:-len(TEMP_SUFFIX)].rpartition(".")[0]
            if name.startswith(".") and name.endswith(TEMP_SUFFIX) and owned(target):
                (self.base / rel_dir / name).unlink(missing_ok=True)


#: URI query keys with which pyarrow would take secrets from the cache path itself.
_SECRET_KEYS = ("access_key", "secret_key", "session_token")


def _refuse_credentials(uri: str) -> None:
    """A cache path is saved in configs, manifests and logs, so it must not carry secrets."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(uri)
    if "@" in parts.netloc or any(key in parse_qs(parts.query) for key in _SECRET_KEYS):
        raise CacheError(f"cache path {parts.scheme}://{parts.hostname or ''}/...: carries credentials; they would "
                         "be saved in configs and logs. Expected them in the environment (AWS_ACCESS_KEY_ID, "
                         "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)")


#: How long the start-up probe of a gs:// cache may retry before giving up.
GCS_PROBE_SECONDS = 15.0


def _probe_gcs(uri: str) -> None:
    """Fail in seconds, not a quarter of an hour, where GCS cannot be reached or no credentials
    are found: the GCS client retries every request for 15 minutes by default, silently.  The
    probe (one metadata request) gets a short retry limit; the run itself keeps the client's
    patient default, which rides out a transient outage mid-run.  A URI that sets
    ``retry_limit_seconds`` itself is left as it is."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("gs", "gcs") or "retry_limit_seconds" in parse_qs(parts.query):
        return
    probe_uri = f"{uri}{'&' if parts.query else '?'}retry_limit_seconds={GCS_PROBE_SECONDS:g}"
    try:
        fs, path = pafs.FileSystem.from_uri(probe_uri)
        fs.get_file_info(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise CacheError(f"{uri}: cannot reach Google Cloud Storage within {GCS_PROBE_SECONDS:g} s "
                         f"({_gcs_reason(exc)}); expected network access and credentials "
                         "(GOOGLE_APPLICATION_CREDENTIALS, or a GCP machine's service account)") from exc


def _gcs_reason(exc: BaseException) -> str:
    """The gist of a google-cloud-cpp status (its message runs to a kilobyte): the code, the
    last attempt's message and the underlying transport error."""
    text = first_line(exc)
    code = re.search(r"Status\((\w+):", text)
    last = re.search(r"last message of (.+?)\.", text)
    under = re.search(r"underlying error message was: (.+?) error_info=", text)
    parts = [m.group(1) for m in (last, under) if m]
    if not code or not parts:
        return text if len(text) <= 300 else text[:300] + "..."
    return f"{code.group(1)}: {'; '.join(parts)}"
