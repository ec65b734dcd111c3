"""Independent decompression of an export with the compressed-tensors library.

Which scheme covers which Linear is decided by CT's own name matcher from the exported
``quantization_config``; each layer's tensors go through the CT compressor registered for
the group's format.  Nothing of qadpipe's unpacking or dequantization is used.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.utils.match import match_name
from safetensors.torch import load_file


def load_export(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, all tensors) of an export directory (single file or shards)."""
    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return json.loads((directory / "config.json").read_text()), tensors


def ct_decompress(directory: Path, linear_names: list[str]) -> dict[str, torch.Tensor]:
    """Dequantized weight of every quantized Linear, in the dtype CT's decompressor returns."""
    config, tensors = load_export(directory)
    qconfig = QuantizationConfig.model_validate(config["quantization_config"])
    out = {}
    for scheme in qconfig.config_groups.values():
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        params = compressor.compression_param_names(scheme)
        for name in linear_names:
            targeted = "Linear" in scheme.targets or any(match_name(name, t) for t in scheme.targets)
            if not targeted or any(match_name(name, i) for i in qconfig.ignore):
                continue
            assert name not in out, f"{name} matched by two config groups"
            state = {p: tensors[f"{name}.{p}"] for p in params if f"{name}.{p}" in tensors}
            out[name] = compressor.decompress(state, scheme)["weight"]
    return out
