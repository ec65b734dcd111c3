"""Writing an export directory: staged under a temp name, renamed whole, never half-written.

Both export formats produce the same kind of directory — an HF model folder with
``config.json``, safetensors weights (sharded with an index past ``max_shard_bytes``), the
tokenizer, chat template and generation config of the source model — so the file
mechanics live here and the format modules only decide which tensors to write.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from qadpipe.errors import ExportError
from qadpipe.provenance import RUN_FILE, json_field, recorded_stage, replace_dir, seal_tree
from qadpipe.tensor_files import save_tensors

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # the HF default shard size

# Files of a source model directory that an export replaces or must not inherit.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_NOT_COPIED_NAMES = {"config.json", WEIGHTS_INDEX, "pytorch_model.bin.index.json", RUN_FILE,
                     "qadpipe_source.json", "recipe.yaml", "hf_quant_config.json"}


@contextmanager
def staged_dir(output: Path) -> Iterator[Path]:
    """Yield a fresh temp directory beside ``output``; on success fsync it and rename it to
    ``output``.  On any error the temp directory is removed and ``output`` is untouched.

    An existing ``output`` is replaced only when it is a previous qadpipe export (its
    ``qadpipe_run.yaml`` says ``stage: export``) holding only the files its record lists; the
    old one is deleted after the new one is in place.  Any other non-empty directory is
    refused, so nothing a user wrote is lost.
    """
    # "." or "x/..": the parent must be where the staging dir goes; a symlink (to a directory on
    # another filesystem, say): the export replaces its target and the link keeps naming it,
    # rather than a new directory taking the link's place
    output = Path(os.path.realpath(output))
    check_replaceable(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_staging_prefix("tmp", output) + _owner_tag(), dir=output.parent))
    except OSError as exc:
        raise ExportError(f"export output {output}: cannot create a directory in {output.parent} "
                          f"({exc.strerror or exc})") from None
    try:
        try:
            yield tmp
            seal_tree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, output, _staging_prefix("old", output) + _owner_tag())
    except OSError as exc:  # a full disk or lost permission mid-write: nothing half-written stays
        raise ExportError(f"export output {output}: writing failed, nothing was changed "
                          f"({exc.strerror or exc})") from exc
    remove_stale_staging(output)


def _staging_prefix(kind: str, output: Path) -> str:
    return f".{kind}-{output.name}-"


def _owner_tag() -> str:
    """``host-pid-``: lets a later export tell a killed run's staging dir from a live one."""
    return f"{socket.gethostname()}-{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(output: Path) -> None:
    """Delete the staging dirs (``.tmp-*``, ``.old-*``) of ``output`` that killed exports left.

    SIGKILL skips every cleanup, so a kill mid-write leaves a hidden copy of the export beside
    it.  Called once a new export is in place: a dir is removed only when its name says it
    belongs to a process of this host that no longer runs (a live export, or one on another
    node of a shared file system, is left alone)."""
    host = socket.gethostname()
    for kind in ("tmp", "old"):
        prefix = _staging_prefix(kind, output)
        for path in output.parent.glob(prefix + "*"):
            owner = path.name[len(prefix):].rsplit("-", 2)   # host (may hold '-'), pid, mkdtemp suffix
            if len(owner) != 3 or owner[0] != host or not owner[1].isdigit() or _process_alive(int(owner[1])):
                continue
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left by a killed export (pid %s)", path, owner[1])


#: The export's record (format, sizes, layers, and the files it wrote), next to its qadpipe_run.yaml.
EXPORT_INFO = "qadpipe_export.json"


def check_replaceable(output: Path) -> None:
    """ExportError unless ``output`` is absent, empty, or a previous qadpipe export holding
    only the files it wrote (replacing it must not delete a user's notes or logs)."""
    if not output.exists():
        return
    if not output.is_dir():
        raise ExportError(f"export output {output}: exists and is not a directory")
    try:
        if not any(output.iterdir()):
            return
        stage = recorded_stage(output)
        if stage != "export":
            what = (f"holding the output of qadpipe {stage}, not an export" if stage
                    else f"that is not a qadpipe export (it holds {_some_entries(output)})")
            raise ExportError(f"export output {output}: a non-empty directory {what}; expected a new or empty "
                              "directory (or a previous export to replace)")
        written = _files_written(output / EXPORT_INFO)
        if written is None:    # without the list, a file the user added cannot be told apart
            raise ExportError(f"export output {output}: {EXPORT_INFO}, the previous export's list of the files it "
                              "wrote, is missing or unreadable, so replacing it could delete files of yours; "
                              "delete the directory yourself, or export to another directory")
        added = sorted(str(p.relative_to(output)) for p in output.rglob("*")
                       if (p.is_file() or p.is_symlink()) and str(p.relative_to(output)) not in written)
    except OSError as exc:
        raise ExportError(f"export output {output}: cannot read what it holds ({exc.strerror or exc})") from None
    if added:
        more = f" and {len(added) - 1} more" if len(added) > 1 else ""
        raise ExportError(f"export output {output}: holds {added[0]}{more}, which the previous export did not "
                          "write and replacing it would delete; move it, or export to another directory")


def _some_entries(directory: Path) -> str:
    names = sorted(p.name for p in directory.iterdir())
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _files_written(info: Path) -> set[str] | None:
    """The files a previous export listed in its record (None: absent or unreadable)."""
    files = json_field(info, "files", list)
    return set(files) if files is not None and all(isinstance(name, str) for name in files) else None


def write_safetensors(tensors: dict[str, torch.Tensor], directory: Path,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write ``tensors`` as ``model.safetensors``, or as numbered shards plus the HF index
    when they exceed ``max_shard_bytes``.  Tensors keep their order and dtype."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        path = Path(directory) / WEIGHTS_NAME
        save_tensors(shards[0], path, metadata)
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        path = Path(directory) / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_tensors(shard, path, metadata)
        paths.append(path)
        weight_map.update({name: path.name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (Path(directory) / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return paths


def read_config(model_dir: Path) -> dict[str, Any]:
    """The source model's ``config.json`` as a dict."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:   # ValueError: not JSON, or not UTF-8
        raise ExportError(f"{path}: cannot read the source model config ({exc})") from None
    if not isinstance(config, dict):
        raise ExportError(f"{path}: expected a JSON object (an HF model config), got {type(config).__name__}")
    return config


def write_checkpoint(tensors: dict[str, torch.Tensor], config: dict[str, Any], source_dir: Path,
                     directory: Path, dtype: torch.dtype, max_shard_bytes: int | None = None) -> None:
    """Weights, ``config.json`` (its dtype set to ``dtype``) and the source's side files."""
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    write_safetensors(tensors, directory, max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    (Path(directory) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copy_side_files(source_dir, directory)


def copy_side_files(source_dir: Path, directory: Path) -> list[str]:
    """Copy what a serving engine needs besides weights and config (tokenizer, chat
    template, generation config, model card) from the source model directory."""
    copied = []
    for path in sorted(Path(source_dir).iterdir()):
        if not path.is_file() or path.name in _NOT_COPIED_NAMES or path.suffix in _NOT_COPIED_SUFFIXES:
            continue
        shutil.copy2(path, Path(directory) / path.name)
        copied.append(path.name)
    return copied


def weights_bytes(model_dir: Path) -> int:
    """On-disk bytes of a model directory's weight files (``*.safetensors``)."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
