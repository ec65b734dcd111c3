"""``qadpipe export``: trained student in, servable checkpoint directory out.

Reads a distill ``final/`` directory (weights + quantizer state + the config it was trained
with), rebuilds the student exactly as trained, and writes it in the requested format into
a staged directory that is renamed into place only when complete.  Beside the weights go
``qadpipe_run.yaml`` (config + versions) and ``qadpipe_export.json`` (format, per-layer
recipe, source checkpoint and its hash, sizes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from qadpipe.errors import ExportError, ModelError
from qadpipe.export.compressed_tensors import write_compressed_tensors
from qadpipe.export.fake import write_fake
from qadpipe.export.model_tensors import quant_experts, quant_linears
from qadpipe.export.writer import EXPORT_INFO, check_replaceable, staged_dir, weights_bytes
from qadpipe.provenance import RUN_FILE, read_run_record, save_run_record
from qadpipe.quant.experts import has_fused_experts
from qadpipe.quant.formats import Kind

log = logging.getLogger(__name__)

FORMATS = {"fake": write_fake, "compressed-tensors": write_compressed_tensors}


@dataclass(frozen=True)
class ExportResult:
    """Where the export went and how big it is next to the same model in BF16."""

    output: Path
    format: str
    export_bytes: int
    bf16_bytes: int

    @property
    def ratio(self) -> float:
        return self.export_bytes / self.bf16_bytes

    def summary(self) -> str:
        return (f"{self.format} export: {_mb(self.export_bytes)} on disk vs {_mb(self.bf16_bytes)} "
                f"BF16 ({self.ratio:.2f}x) -> {self.output}")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def bf16_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights at 2 bytes each (tied tensors once, quantizer state excluded)."""
    return 2 * sum(p.numel() for name, p in model.named_parameters()
                   if "_quantizer." not in name)


#: QuantSpec fields that mean something for some formats only: left out of the record for the
#: others, where their defaults would read as a property of the layer (3:4 sparsity on an INT4 one).
_FORMAT_FIELDS = {"sparsity": {Kind.SHERRY}, "mx_rule": {Kind.MXFP4, Kind.MXFP8}}


def layer_recipe(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per quantized layer (and MoE experts module), the weight and input specs it was trained
    with (JSON-ready)."""
    def spec_dict(spec: Any) -> Optional[dict[str, Any]]:
        if spec is None:
            return None
        return {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(spec).items()
                if spec.kind in _FORMAT_FIELDS.get(k, {spec.kind})}

    layers = {name: {"weight": spec_dict(layer.weight_quantizer.spec),
                     "input": spec_dict(layer.input_quantizer.spec if layer.input_quantizer else None)}
              for name, layer in quant_linears(model).items()}
    layers.update({name: {"weight": spec_dict(experts.spec), "input": spec_dict(experts.input_spec),
                          "per_expert": True}
                   for name, experts in quant_experts(model).items()})
    return layers


def export_model(model: nn.Module, source_dir: Path, output: Path, fmt: str, config: Any,
                 checkpoint: Optional[Path] = None, dtype: torch.dtype = torch.bfloat16) -> ExportResult:
    """Write an in-memory fake-quantized student to ``output`` (staged, renamed when complete)."""
    from qadpipe.distill.student import trained_cache_fingerprint

    if fmt not in FORMATS:
        raise ExportError(f"export.format: got {fmt!r}, expected one of {', '.join(FORMATS)}")
    if not quant_linears(model) and not quant_experts(model):
        raise ExportError("the student has no quantized Linear layer or MoE experts: nothing to export as quantized")
    start = time.perf_counter()
    with staged_dir(output) as tmp:
        FORMATS[fmt](model, Path(source_dir), tmp, dtype=dtype)
        info = {
            "format": fmt,
            "source_model": str(Path(source_dir).resolve()),
            "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
            "checkpoint_sha256": None if checkpoint is None else _weights_sha256(Path(checkpoint)),
            "export_bytes": weights_bytes(tmp),
            "bf16_bytes": bf16_bytes(model),
            "layers": layer_recipe(model),
            # what this export wrote: a later export replaces these, and refuses to delete anything else
            "files": sorted([str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()]
                            + [EXPORT_INFO, RUN_FILE]),
        }
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        # What eval needs of the training (rows held out, cache trained on), kept here: the
        # checkpoint's path may hold another run by the time the export is evaluated.
        training = {} if checkpoint is None else {"training": {
            "eval_rows": config.distill.eval_rows, "cache_fingerprint": trained_cache_fingerprint(Path(checkpoint))}}
        save_run_record(config, "export", tmp, **training)
    result = ExportResult(Path(output), fmt, info["export_bytes"], info["bf16_bytes"])
    log.info("%s (%.1f s)", result.summary(), time.perf_counter() - start)
    return result


def _weights_sha256(student_dir: Path) -> Optional[str]:
    """sha256 of a student's weights: its ``model.safetensors``, or a sharded checkpoint's model
    shard files in name order (each name hashed before its bytes)."""
    from qadpipe.distill.checkpoint import MODEL_FILE
    from qadpipe.distill.sharded_checkpoint import MODEL_SHARDS, is_sharded

    files = sorted((student_dir / MODEL_SHARDS).iterdir()) if is_sharded(student_dir) else [student_dir / MODEL_FILE]
    if not all(path.is_file() for path in files):
        return None
    digest = hashlib.sha256()
    for path in files:
        if len(files) > 1:
            digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def _same_directory(a: str, b: str) -> bool:
    from qadpipe.models import resolve_model_path

    try:
        return resolve_model_path(a).resolve() == resolve_model_path(b).resolve()
    except (ModelError, OSError):   # one names no model directory here (or the alias cannot be made): they differ
        return False


def run_export(config: Any, checkpoint: Optional[str] = None, output: Optional[str] = None,
               fmt: Optional[str] = None) -> ExportResult:
    """The ``qadpipe export`` command: load ``final/`` (default ``<distill.output_dir>/final``),
    export it as ``fmt`` (default ``export.format``) into ``output`` (default ``export.output_dir``).

    The student is rebuilt from the config recorded in the checkpoint (what was trained); a
    differing ``model``/``quant`` section in the current config is reported and not used.
    """
    from qadpipe.distill.student import has_student_weights, load_final_student
    from qadpipe.models import resolve_model_path

    final = Path(checkpoint) if checkpoint else Path(config.distill.output_dir) / "final"
    if checkpoint and (final / "config.json").is_file():   # an export (or an HF model) beside a run record
        raise ExportError(f"--checkpoint {final}: an HF checkpoint (it has config.json: an export?), expected a distill "
                          "final/, ptq/ or checkpoints/step-N directory")
    if not has_student_weights(final) or not (final / RUN_FILE).is_file():
        if checkpoint:
            raise ExportError(f"--checkpoint {final}: expected a distill final/, ptq/ or checkpoints/step-N "
                              f"directory with model.safetensors (or model/ shards) and {RUN_FILE}")
        steps = sorted((final.parent / "checkpoints").glob("step-*"))
        config_record = (read_run_record(final.parent) or {}).get("config")
        distill = config_record.get("distill") if isinstance(config_record, dict) else None
        unsaved = isinstance(distill, dict) and distill.get("save") is False
        hint = (f"finish it with `qadpipe distill --resume`, or export its last checkpoint with "
                f"--checkpoint {steps[-1]}" if steps else
                "its run had distill.save=false, so it wrote none; rerun it with distill.save=true and --resume, or "
                "into a fresh distill.output_dir" if unsaved else
                "run qadpipe distill first")
        raise ExportError(f"distill.output_dir: {final.parent} holds no finished student ({final.name}/); {hint}")
    out = Path(output) if output else Path(config.export.output_dir)
    check_replaceable(out)  # before the (slow) model load; staged_dir checks again
    model, trained = load_final_student(final)
    for section in ("model", "quant"):   # a section left at its defaults (no -c) was not asked for: no warning
        current, recorded, default = (dataclasses.asdict(x) for x in (
            getattr(config, section), getattr(trained, section), type(getattr(config, section))()))
        if section == "quant" and not has_fused_experts(model):   # an older record says dense: moot here
            for fields in (current, recorded, default):
                fields.pop("moe_experts")
        if section == "model" and current not in (recorded, default) and current["path"] != recorded["path"] \
                and _same_directory(current["path"], recorded["path"]):   # ./m and /abs/m
            current["path"] = recorded["path"]
        if current not in (recorded, default):
            log.warning("export uses the %s section recorded in %s (what was trained), not the one "
                        "in the current config", section, final / RUN_FILE)
    fmt = fmt or config.export.format
    record = dataclasses.replace(trained, export=dataclasses.replace(
        config.export, format=fmt, output_dir=str(out)))
    dtype = getattr(torch, trained.model.dtype)
    if dtype is torch.float32:   # the training master copy; vLLM's quantized kernels run 16-bit activations
        log.warning("model.dtype=float32: the export is written in bfloat16, as vLLM serves it; its unquantized "
                    "tensors (norms, embeddings, LM head) are rounded to bf16, so its figures may differ a little "
                    "from the fp32 final/ (qadpipe eval scores both)")
        dtype = torch.bfloat16
    return export_model(model, resolve_model_path(trained.model.path), out, fmt, record,
                        checkpoint=final, dtype=dtype)
