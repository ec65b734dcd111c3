"""Writing safetensors files with the error every other write raises.

``safetensors.torch.save_file`` reports a full disk, a file-size limit or a vanished directory
as ``SafetensorError``, not ``OSError``; the stages turn ``OSError`` into one line that says
what was kept, so a weights file that fails to write must raise one too.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

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
