"""The tensors an export writes, in the HF checkpoint's names, from a fake-quantized student.

Both formats walk the student the same way: every tensor of the HF model is written under
its usual name in the export dtype, except that a :class:`~qadpipe.quant.quantizers.QuantLinear`
is handed to the format (``layer_fn``), which returns that layer's tensors under local names
(``weight`` for fake, ``weight_packed``/``weight_scale``/... for compressed-tensors), and so
are fused MoE experts (``experts_fn``: ``gate_up_proj``/``down_proj`` for fake, per-expert
``<e>.gate_proj.weight_packed``/... for compressed-tensors).
Quantizer state (amax, LSQ steps, clip logits) is training state, not a serving tensor, so
it never reaches the export.  Tied embeddings are written once, as HF and vLLM expect.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from qadpipe.quant.experts import QuantExperts
from qadpipe.quant.quantizers import QuantLinear

LayerFn = Callable[[str, QuantLinear], dict[str, torch.Tensor]]
ExpertsFn = Callable[[str, QuantExperts], dict[str, torch.Tensor]]


def quant_linears(model: nn.Module) -> dict[str, QuantLinear]:
    """Every fake-quantized Linear of ``model`` by dotted name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def quant_experts(model: nn.Module) -> dict[str, QuantExperts]:
    """Every fake-quantized fused-experts module of ``model`` by dotted name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantExperts)}


def _storage_key(tensor: torch.Tensor) -> tuple[int, int, tuple[int, ...]]:
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))


def tied_quantized_layers(model: nn.Module) -> list[str]:
    """Quantized Linears whose weight is shared with another module (tied embeddings): their
    serving weight is Q(W) while the partner keeps W, so the tie cannot survive export."""
    layers = quant_linears(model)
    owners: dict[tuple[int, int, tuple[int, ...]], set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        module = name.rpartition(".")[0]
        owners.setdefault(_storage_key(param), set()).add(module)
    return sorted(name for name, layer in layers.items()
                  if len(owners.get(_storage_key(layer.weight), ())) > 1)


def ties_word_embeddings(model: nn.Module) -> bool:
    """Whether the model serves its input embeddings as its LM head, as its loaded config
    says: config.json may leave the key out and mean the architecture's default (Gemma's is
    true), which the raw JSON cannot tell."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", False))


def export_tensors(model: nn.Module, layer_fn: LayerFn, dtype: torch.dtype,
                   tie_word_embeddings: bool, experts_fn: ExpertsFn) -> dict[str, torch.Tensor]:
    """All serving tensors of ``model``, in state_dict order.

    Float tensors outside quantized layers are cast to ``dtype``; a quantized layer's weight
    (and quantizer state) is replaced by ``layer_fn``'s tensors, its bias cast like the rest;
    quantized experts' weights by ``experts_fn``'s, at the place of the first of them.
    With ``tie_word_embeddings`` a later tensor sharing storage with an earlier one (the LM
    head) is dropped, as ``save_pretrained`` does; otherwise it is written as a copy.
    """
    layers = quant_linears(model)
    experts = quant_experts(model)
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for key, tensor in model.state_dict(keep_vars=False).items():
        module, _, local = key.rpartition(".")
        # quantizer state (the KV cache's, an experts quantizer's learned steps below it): training state
        if any(part.endswith("_quantizer") for part in module.split(".")):
            continue
        if module in experts and local in experts[module].layout.weight_names:
            if local == experts[module].layout.weight_names[0]:
                for name, value in experts_fn(module, experts[module]).items():
                    out[f"{module}.{name}"] = value.detach().contiguous().cpu()
            continue
        owner = _quant_owner(module, layers)
        if owner is not None:
            if module == owner and local == "weight":
                for name, value in layer_fn(owner, layers[owner]).items():
                    out[f"{owner}.{name}"] = value.detach().contiguous().cpu()
                seen.add(_storage_key(tensor))
                continue
            if module != owner:  # weight_quantizer.* / input_quantizer.*: training state
                continue
        storage = _storage_key(tensor)
        if storage in seen:
            if tie_word_embeddings:
                continue
            out[key] = _cast(tensor, dtype).clone()   # safetensors refuses tensors sharing memory
            continue
        seen.add(storage)
        out[key] = _cast(tensor, dtype)
    return out


def checkpoint_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (state_dict names) under the names of the architecture's own checkpoints, as
    ``save_pretrained`` writes them and vLLM loads them: transformers 5 renames and fuses some
    weights on load (Mixtral's ``block_sparse_moe.experts.<e>.w1`` becomes ``mlp.experts.gate_up_proj``)
    and reverts that on save, with the function used here.  Tensors it split out of a fused one
    are copied (safetensors refuses views of one storage); renamed ones are not."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in _revert_weight_conversion(model, tensors).items():
        storage = value.untyped_storage().data_ptr()
        if storage in storages or not value.is_contiguous():
            value = value.clone(memory_format=torch.contiguous_format)
        storages.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


def checkpoint_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Module names (state_dict prefixes) -> their names in the architecture's checkpoints (see
    :func:`checkpoint_tensors`), for the quantization config's targets and ignore list.  Each
    name goes through the same conversion as a probe key that no weight converter matches."""
    probe = ".qadpipe_name_probe"
    reverted = _revert_weight_conversion(model, {f"{name}{probe}": torch.tensor([i]) for i, name in enumerate(names)})
    return {names[int(value)]: key.removesuffix(probe) for key, value in reverted.items()}


def _revert_weight_conversion(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(tensors))


def _quant_owner(module: str, layers: dict[str, Any]) -> str | None:
    """The quantized layer a state_dict key belongs to (the layer itself or a quantizer)."""
    if module in layers:
        return module
    parent = module.rpartition(".")[0]
    return parent if parent in layers else None


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    tensor = tensor.detach()
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous().cpu()
