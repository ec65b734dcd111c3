"""``--format fake``: an ordinary HF checkpoint whose quantized weights hold Q(W).

Every quantized Linear's weight is ``QuantLinear.fake_quantized_weight()`` -- the exact value
the fake-quant forward multiplies with -- cast once to the export dtype (fused MoE experts:
``QuantExperts.fake_quantized``, in their 3-D layout); everything else is
the student's own weights.  Any engine that loads an HF model loads it (no quantization
config), so it is the reference for what a real packed export must reproduce, and the way
to serve formats no kernel implements.  Activation quantization is *not* baked in: a fake
checkpoint of a W8A8/W4A4 recipe runs with full-precision activations.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qadpipe.export.model_tensors import (
    checkpoint_tensors, export_tensors, quant_experts, quant_linears, tied_quantized_layers, ties_word_embeddings,
)
from qadpipe.export.writer import read_config, write_checkpoint
from qadpipe.quant.experts import QuantExperts
from qadpipe.quant.formats import Kind
from qadpipe.quant.kv_cache import has_kv_quantizers
from qadpipe.quant.quantizers import QuantLinear

log = logging.getLogger(__name__)


def _fake_layer(dtype: torch.dtype):
    def layer_fn(name: str, layer: QuantLinear) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"weight": layer.fake_quantized_weight().to(dtype)}
    return layer_fn


def _fake_experts(dtype: torch.dtype):
    def experts_fn(name: str, experts: QuantExperts) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {weight: experts.fake_quantized(weight).to(dtype) for weight in experts.layout.weight_names}
    return experts_fn


def _say_rounded_int8(model: nn.Module, dtype: torch.dtype) -> None:
    """An 8-bit integer weight (codes up to 127) times its scale is no bf16 value: the cast
    moves it by up to ~0.4 of a quantization step (a 4-bit code's or an FP8 value's by
    < 0.02), where vLLM's int8 kernels multiply the exact codes."""
    wide = [name for name, layer in quant_linears(model).items()
            if layer.weight_quantizer.spec.kind in (Kind.INT, Kind.LSQ) and layer.weight_quantizer.spec.bits >= 8
            and layer.weight.dtype.itemsize > dtype.itemsize]
    if wide:
        log.warning("fake export: %d layers hold 8-bit integer weights (%s ...), which %s rounds by up to ~0.4 of "
                    "a quantization step; --format compressed-tensors keeps the exact codes the student trained "
                    "with", len(wide), wide[0], str(dtype).removeprefix("torch."))


def write_fake(model: nn.Module, source_dir: Path, directory: Path,
               dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int | None = None) -> dict[str, Any]:
    """Write the fake-quant checkpoint of ``model`` into ``directory`` (an empty staging dir).

    ``source_dir`` is the HF directory the student was built from: its config, tokenizer,
    chat template and generation config are carried over.  Returns the written config.
    """
    config = read_config(source_dir)
    config.pop("quantization_config", None)
    tie = ties_word_embeddings(model)
    broken = tied_quantized_layers(model)
    if tie and broken:
        # The head serves Q(W) while the embedding keeps W: two different matrices now.
        log.warning("untying %s from the input embeddings: the quantized head differs from them",
                    ", ".join(broken))
        tie = False
        config["tie_word_embeddings"] = False
    if has_kv_quantizers(model):
        log.warning("fake export: the student was trained with an FP8 KV cache, but a fake BF16 "
                    "checkpoint carries no KV-cache scales; use --format compressed-tensors to serve "
                    "the KV cache as trained")
    _say_rounded_int8(model, dtype)
    tensors = checkpoint_tensors(model, export_tensors(model, _fake_layer(dtype), dtype, tie_word_embeddings=tie,
                                                       experts_fn=_fake_experts(dtype)))
    write_checkpoint(tensors, config, source_dir, directory, dtype, max_shard_bytes)
    log.info("fake export: %d quantized Linear layers and %d MoE experts modules baked as Q(W) in %s",
             len(quant_linears(model)), len(quant_experts(model)), dtype)
    return config
