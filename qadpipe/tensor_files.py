"""Writing tensor files with the error every other write raises.

``safetensors.torch.save_file`` reports a full disk, a file-size limit or a vanished directory
as ``SafetensorError``, and ``torch.save`` as a ``RuntimeError`` ("unexpected pos"), not
``OSError``; the stages turn ``OSError`` into one line that says what was kept, so a file that
fails to write must raise one too.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``save_file``, raising ``OSError`` (errno and message of the underlying I/O error where
    safetensors names one) when the file cannot be written."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        code = re.search(r"\(os error (\d+)\)", str(exc))
        number = int(code.group(1)) if code else errno.EIO
        raise OSError(number, os.strerror(number), str(path)) from exc


class _KeptWriteError:
    """A binary file whose write errors are kept: torch's zip writer swallows them."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.error: Optional[OSError] = None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path``, raising the ``OSError`` of a write the OS refused (ENOSPC,
    EFBIG) rather than torch's ``RuntimeError``, which names neither."""
    with open(path, "wb") as handle:
        writer = _KeptWriteError(handle)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise OSError(writer.error.errno, writer.error.strerror, str(path)) from writer.error
