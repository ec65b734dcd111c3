"""``--format compressed-tensors``: real packed checkpoints vLLM loads, from qadpipe's own codes.

Every quantized layer is written from ``QuantLinear.quantized_weight()`` -- the very codes and
scales its fake-quant forward dequantizes -- packed in the layouts of the compressed-tensors
(CT) spec, so the served weights equal the trained ones bit for bit (the round-trip test
decompresses with the CT library itself).  CT is not imported here: the layouts are plain
safetensors plus a ``quantization_config`` in config.json (``shared/notes/
export-formats-vllm-cpu.md`` section 3):

=====================  ===============================================  ======================
CT format              tensors per Linear                               qadpipe formats
=====================  ===============================================  ======================
pack-quantized         weight_packed i32 [N, K*b/32], weight_scale      INT/LSQ/ternary
                       (bf16 [N, K/g] or [N, 1]), weight_shape i64 [2],  weight-only (and
                       weight_zero_point i32 [N*b/32, K/g] (asym)        w4a8_fp8)
int-quantized          weight i8 [N, K], weight_scale [N, 1]             INT W8A8 / W4A8
float-quantized        weight f8e4m3 [N, K], weight_scale f32 [N,1]|[1]  FP8 (+ input_scale)
nvfp4-pack-quantized   weight_packed u8 [N, K/2], weight_scale f8 [N,    NVFP4 W4A16 / W4A4
                       K/16], weight_global_scale f32 [1] (448*6/amax),
                       input_global_scale f32 [1] (W4A4)
mxfp4-pack-quantized   weight_packed u8 [N, K/2], weight_scale u8 E8M0   MXFP4
mxfp8-quantized        weight f8e4m3 [N, K], weight_scale u8 E8M0        MXFP8
=====================  ===============================================  ======================

Integer codes narrower than 4 bits (ternary, int2/int3) are stored as 4-bit: vLLM's WNA16
kernels take 4 or 8 bits and compute ``(stored - 2**(b-1)) * scale``, which reproduces any
code in range exactly.  Everything vLLM could not load as trained is refused before a byte
is written: a quantized LM head outside WNA16 (or tied to the embeddings), group sizes that
do not divide in-features, fused q/k/v or gate/up members with different schemes or
different per-tensor scales (vLLM would silently take the max).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from qadpipe.errors import ExportError, QuantError
from qadpipe.export.model_tensors import (
    checkpoint_names, checkpoint_tensors, export_tensors, quant_experts, quant_linears, tied_quantized_layers,
    ties_word_embeddings,
)
from qadpipe.export.writer import read_config, write_checkpoint
from qadpipe.models import output_head_name
from qadpipe.quant.experts import ExpertWeightQuantizer, QuantExperts
from qadpipe.quant.formats import (Granularity, Kind, QuantizedTensor, QuantSpec, pack_fp4, pack_int32, quantize,
                                   round_to_fp8)
from qadpipe.quant.kv_cache import kv_cache_scales
from qadpipe.quant.quantizers import QuantLinear, Quantizer
from qadpipe.quant.recipe import sibling_groups

log = logging.getLogger(__name__)

PACK = "pack-quantized"
INT_Q = "int-quantized"
FLOAT_Q = "float-quantized"
NVFP4_PACK = "nvfp4-pack-quantized"
MXFP4_PACK = "mxfp4-pack-quantized"
MXFP8_Q = "mxfp8-quantized"
MIXED = "mixed-precision"

_INT_CODES = (Kind.INT, Kind.LSQ, Kind.TWN, Kind.ABSMEAN, Kind.SHERRY)
_STRATEGY = {Granularity.TENSOR: "tensor", Granularity.CHANNEL: "channel",
             Granularity.TOKEN: "token", Granularity.GROUP: "group"}
# Tensors that hold one value for the whole layer: vLLM keeps one per fused GEMM.
_PER_TENSOR = ("weight_global_scale", "input_global_scale", "input_scale")


@dataclass(frozen=True)
class Scheme:
    """One CT config group: the format and the QuantizationArgs of weights and inputs."""

    format: str
    weights: dict[str, Any]
    input_activations: Optional[dict[str, Any]]

    def key(self) -> str:
        return json.dumps([self.format, self.weights, self.input_activations], sort_keys=True)


def _args(num_bits: int, type_: str, strategy: str, *, symmetric: bool = True,
          group_size: Optional[int] = None, dynamic: Any = False,
          scale_dtype: Optional[str] = None, zp_dtype: Optional[str] = None) -> dict[str, Any]:
    """A CT ``QuantizationArgs`` as JSON (the fields vLLM and CT read)."""
    return {"num_bits": num_bits, "type": type_, "symmetric": symmetric, "group_size": group_size,
            "strategy": strategy, "block_structure": None, "dynamic": dynamic, "actorder": None,
            "scale_dtype": scale_dtype, "zp_dtype": zp_dtype, "observer": None, "observer_kwargs": {}}


def scheme_for(name: str, weight: QuantSpec, inputs: Optional[QuantSpec]) -> Scheme:
    """The CT scheme that serves ``weight``/``inputs`` exactly, or ExportError saying why none does."""
    kind = weight.kind
    if kind in _INT_CODES:
        if weight.granularity not in (Granularity.GROUP, Granularity.CHANNEL):
            raise ExportError(f"{name}: int weights with {weight.granularity.value} scales; vLLM's "
                              "int kernels take per-channel or per-group scales")
        stored_bits = 4 if weight.bits <= 4 else 8
        group = weight.group_size if weight.granularity is Granularity.GROUP else None
        w_args = _args(stored_bits, "int", _STRATEGY[weight.granularity], symmetric=weight.symmetric,
                       group_size=group, zp_dtype=None if weight.symmetric else "torch.int8")
        if inputs is None and not weight.fp8_group_scales:
            return Scheme(PACK, w_args, None)
        if weight.fp8_group_scales and inputs is not None and inputs.kind is Kind.FP8 \
                and inputs.granularity is Granularity.TOKEN:
            return Scheme(PACK, w_args, _input_args(name, inputs))
        if inputs is not None and inputs.kind is Kind.INT and kind in (Kind.INT, Kind.LSQ) \
                and weight.bits == 8 and weight.granularity is Granularity.CHANNEL \
                and weight.symmetric and not weight.fp8_group_scales:
            w_args.update(num_bits=weight.bits)
            return Scheme(INT_Q, w_args, _input_args(name, inputs))
    elif kind is Kind.FP8 and (inputs is None or inputs.kind is Kind.FP8):
        w_args = _args(8, "float", _STRATEGY[weight.granularity])
        return Scheme(FLOAT_Q, w_args, None if inputs is None else _input_args(name, inputs))
    elif kind is Kind.NVFP4 and (inputs is None or inputs.kind is Kind.NVFP4):
        w_args = _args(4, "float", "tensor_group", group_size=16, scale_dtype="torch.float8_e4m3fn")
        return Scheme(NVFP4_PACK, w_args, None if inputs is None else _input_args(name, inputs))
    elif kind in (Kind.MXFP4, Kind.MXFP8) and (inputs is None or inputs.kind is kind):
        bits = 4 if kind is Kind.MXFP4 else 8
        w_args = _args(bits, "float", "group", group_size=32, scale_dtype="torch.uint8")
        fmt = MXFP4_PACK if kind is Kind.MXFP4 else MXFP8_Q
        return Scheme(fmt, w_args, None if inputs is None else _input_args(name, inputs))
    shown = "none" if inputs is None else f"{inputs.kind.value} {inputs.granularity.value}"
    raise ExportError(f"{name}: no compressed-tensors scheme vLLM loads for {kind.value} "
                      f"{weight.granularity.value} weights with inputs {shown}; use --format fake")


def _input_args(name: str, spec: QuantSpec) -> dict[str, Any]:
    if spec.kind is Kind.NVFP4:
        if spec.dynamic:
            raise ExportError(f"{name}: NVFP4 inputs without a calibrated global amax; vLLM needs "
                              "a static input_global_scale (use an input spec with dynamic=False)")
        return _args(4, "float", "tensor_group", group_size=16, dynamic="local",
                     scale_dtype="torch.float8_e4m3fn")
    if spec.kind in (Kind.MXFP4, Kind.MXFP8):
        return _args(4 if spec.kind is Kind.MXFP4 else 8, "float", "group", group_size=32,
                     dynamic=True, scale_dtype="torch.uint8")
    if spec.kind in (Kind.INT, Kind.FP8) and spec.granularity in (Granularity.TOKEN, Granularity.TENSOR):
        if spec.granularity is Granularity.TOKEN and not spec.dynamic:
            raise ExportError(f"{name}: static per-token input scales do not exist in vLLM")
        if not spec.symmetric and not spec.dynamic:
            raise ExportError(f"{name}: static asymmetric inputs have no calibrated zero point")
        type_ = "int" if spec.kind is Kind.INT else "float"
        return _args(spec.bits, type_, _STRATEGY[spec.granularity], symmetric=spec.symmetric,
                     dynamic=spec.dynamic)
    raise ExportError(f"{name}: {spec.kind.value} {spec.granularity.value} input quantization has "
                      "no compressed-tensors equivalent in vLLM")


def layer_tensors(name: str, layer: QuantLinear, scheme: Scheme) -> dict[str, torch.Tensor]:
    """One layer's CT tensors (local names) from the codes and scales its forward uses."""
    out = weight_tensors(layer.quantized_weight(), scheme)
    out.update(_input_tensors(name, layer.input_quantizer))
    return {k: v.contiguous() for k, v in out.items()}


#: The experts' input quantizer each per-expert projection vLLM loads takes its scale from.
_EXPERT_INPUTS = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}


def experts_tensors(name: str, experts: QuantExperts, scheme: Scheme) -> dict[str, torch.Tensor]:
    """Fused MoE experts as vLLM loads a quantized MoE: one layer per expert and projection,
    named ``<e>.gate_proj.weight_packed``, ... (local to the experts module).  A static input
    scale is the experts module's one range, written for every expert: vLLM serves the max
    over them, which is then that range."""
    scales = {source: _input_tensors(f"{name}.{source}", quantizer)
              for source, quantizer in experts.input_quantizers().items()}
    out: dict[str, torch.Tensor] = {}
    for projection, matrices in experts.expert_matrices().items():
        inputs = scales.get(_EXPERT_INPUTS[projection], {})
        for expert, q in enumerate(matrices):
            for local, tensor in {**weight_tensors(q, scheme), **inputs}.items():   # copied: storage is shared
                out[f"{expert}.{projection}.{local}"] = tensor.clone(memory_format=torch.contiguous_format)
    return out


def weight_tensors(q: QuantizedTensor, scheme: Scheme) -> dict[str, torch.Tensor]:
    """One weight's CT tensors (local names) from its codes and scales."""
    out: dict[str, torch.Tensor] = {}
    if scheme.format == PACK:
        bits = scheme.weights["num_bits"]
        out["weight_packed"] = pack_int32(q.codes, bits, dim=1)
        out["weight_scale"] = q.scale
        out["weight_shape"] = torch.tensor(list(q.codes.shape), dtype=torch.int64)
        if q.zero_point is not None:
            out["weight_zero_point"] = pack_int32(q.zero_point, bits, dim=0)
    elif scheme.format in (NVFP4_PACK, MXFP4_PACK):
        out["weight_packed"] = pack_fp4(q.codes)
        out["weight_scale"] = q.scale
        if q.global_scale is not None:
            out["weight_global_scale"] = q.global_scale
    else:  # int-quantized, float-quantized, mxfp8-quantized: unpacked codes
        out["weight"] = q.codes
        out["weight_scale"] = q.scale
    return out


def _input_tensors(name: str, quantizer: Optional[Quantizer]) -> dict[str, torch.Tensor]:
    """Static input scales, computed by ``quantize`` itself from the calibrated amax."""
    if quantizer is None or quantizer.spec.dynamic:
        return {}
    spec = quantizer.spec
    if not quantizer.calibrated:
        raise ExportError(f"{name}: static input quantizer was never calibrated (amax unset); "
                          "calibrate before export")
    probe = torch.zeros(1, spec.group_size or 1)
    q = quantize(probe, spec, amax=quantizer.amax)
    if spec.kind is Kind.NVFP4:
        return {"input_global_scale": q.global_scale}
    return {"input_scale": q.scale.reshape(1)}


def plan_schemes(model: nn.Module) -> dict[str, Scheme]:
    """The scheme of every quantized layer; refuses what vLLM could not serve as trained."""
    layers = quant_linears(model)
    schemes = {}
    for name, layer in layers.items():
        spec = layer.weight_quantizer.spec
        try:
            spec.check_shape(tuple(layer.weight.shape), name)
        except QuantError as exc:
            raise ExportError(str(exc)) from None
        schemes[name] = _layer_scheme(name, layer)
    experts = quant_experts(model)
    for name, module in experts.items():
        schemes[name] = _experts_scheme(name, module)
    if experts:
        log.warning("%s", _EXPERTS_ON_VLLM_CPU)
    if any(module.input_spec is not None for module in experts.values()):
        log.warning("%s", _EXPERTS_WITH_QUANTIZED_INPUTS)
    head = output_head_name(model)
    if head is not None and head in schemes:
        if schemes[head].format != PACK or schemes[head].input_activations is not None:
            raise ExportError(f"{head}: quantized LM head in {schemes[head].format}; vLLM serves a "
                              "quantized head only as weight-only int (pack-quantized) -- keep it in "
                              "quant.ignore or use --format fake")
    tied = tied_quantized_layers(model)
    if tied:
        raise ExportError(f"{', '.join(tied)}: quantized but tied to the input embeddings; vLLM "
                          "would re-tie them to one tensor -- keep it in quant.ignore or use --format fake")
    caveats = {say(s) for n, s in schemes.items() if n not in experts
               for say in (_served_as_trained_only_on, _no_gpu_kernel_for_its_groups)}
    for caveat in sorted(caveats - {""}):
        log.warning("%s", caveat)
    return schemes


def _experts_scheme(name: str, experts: QuantExperts) -> Scheme:
    """The scheme of fused MoE experts, or ExportError when vLLM could not load them as trained."""
    layout = experts.layout
    if not layout.servable_layout:
        how = ", ".join(what for what, present in (("transposed", layout.transposed), ("biased", layout.biased),
                                                  ("gate/up interleaved", not layout.concatenated),
                                                  ("ungated", not layout.gated)) if present)
        raise ExportError(f"{name}: {type(experts._experts).__name__} experts are {how}; qadpipe writes quantized "
                          "experts only in the concatenated gate/up layout vLLM loads per expert (Qwen-MoE, "
                          "Mixtral, OLMoE) -- use --format fake, or quant.moe_experts: dense")
    spec = experts.spec
    for weight in layout.weight_names:
        try:
            spec.check_shape(tuple(experts.in_last(weight).shape[1:]), f"{name}.{weight}")
        except QuantError as exc:
            raise ExportError(str(exc)) from None
    if spec.fp8_group_scales:   # W4A8: CompressedTensorsW4A8Fp8MoEMethod.create_weights asserts these
        hidden, intermediate = experts.in_last("down_proj").shape[1:]
        if hidden % 256 or intermediate % 256:
            raise ExportError(f"{name}: vLLM 0.32 loads W4A8 experts only with hidden and intermediate sizes that are "
                              f"multiples of 256 (per tensor-parallel rank), these are {hidden} and {intermediate}; "
                              "use another preset for the experts (a quant.rules entry) or --format fake")
    return scheme_for(name, spec, experts.input_spec)


def _served_as_trained_only_on(scheme: Scheme) -> str:
    """What vLLM 0.32 runs in place of ``scheme`` on some machines ("" when none)."""
    w_bits, quantized_inputs = scheme.weights["num_bits"], scheme.input_activations is not None
    known = _KERNEL_CHOICES.get((scheme.format, w_bits, quantized_inputs))
    if known is None:
        return ""
    how, where = known
    trained = f"W{w_bits}A{scheme.input_activations['num_bits'] if quantized_inputs else 16}"
    return f"{scheme.format} {trained}: {how}; this {trained} student is served as trained only on {where}"


def weight_groups_no_gpu_serves(model: nn.Module) -> list[str]:
    """The export's warnings about weight groups no vLLM GPU kernel takes, for distill to say
    before training rather than the export after it.  Layers the export would refuse for
    another reason are the export's to refuse."""
    caveats = set()
    for name, layer in quant_linears(model).items():
        try:
            caveats.add(_no_gpu_kernel_for_its_groups(_layer_scheme(name, layer)))
        except ExportError:
            continue
    return sorted(caveats - {""})


def _layer_scheme(name: str, layer: QuantLinear) -> Scheme:
    """:func:`scheme_for` a quantized Linear's weight and input specs."""
    inputs = layer.input_quantizer.spec if layer.input_quantizer is not None else None
    return scheme_for(name, layer.weight_quantizer.spec, inputs)


def _no_gpu_kernel_for_its_groups(scheme: Scheme) -> str:
    """Why no vLLM 0.32 GPU kernel serves ``scheme``'s weight groups ("" when one does)."""
    w_bits, group = scheme.weights["num_bits"], scheme.weights["group_size"]
    if scheme.format != PACK or scheme.input_activations is not None or scheme.weights["strategy"] != "group" \
            or group in _GPU_INT_GROUPS.get(w_bits, ()):
        return ""
    return (f"{scheme.format} int{w_bits} in groups of {group}: vLLM 0.32's GPU kernels for grouped int weights "
            f"(Machete, Marlin, Conch, Triton) take groups of {', '.join(map(str, _GPU_INT_GROUPS[w_bits]))} only "
            "(read from its kernel selection, not run here), so a GPU finds no kernel for this student unless the "
            "optional humming package is installed; vLLM-CPU takes any even group size")


#: weight bits -> the group sizes some vLLM 0.32 CUDA kernel takes for grouped int weights with
#: bf16/fp16 activations: Marlin's 32, 64, 128 (Machete's and Conch's are among them), and
#: 256 for int4 through its Triton W4A16 kernel.
_GPU_INT_GROUPS = {4: (32, 64, 128, 256), 8: (32, 64, 128)}


_MX_KERNELS = ("vLLM 0.32 quantizes MX activations only on SM100+ GPUs with FlashInfer, whatever input_activations "
               "says (other GPUs get its weight-only Marlin kernel, or, without Marlin and with amd-quark installed, "
               "an emulation that quantizes activations with AMD Quark's 'even' scale rule: for an MXFP4 block whose "
               "amax has a mantissa in (1.5, 1.75) it picks one exponent less than qadpipe's ceil rule and "
               "saturates the largest values; vLLM-CPU has no MX kernel)")
#: (format, weight bits, activations quantized) -> (vLLM 0.32's kernel choice, the machines
#: that serve the student as trained); read from its kernel selection, not run here.  A
#: student trained W4A4 but served by a weight-only kernel keeps its activations in bf16, one
#: trained weight-only meets a kernel that quantizes them.
_KERNEL_CHOICES = {
    (NVFP4_PACK, 4, True): ("vLLM 0.32 runs FP4 activations only on SM100+/SM120 GPUs (FlashInfer or CUTLASS); "
                            "older GPUs run Marlin W4A16 with bf16 activations", "SM100+/SM120"),
    (MXFP4_PACK, 4, True): (_MX_KERNELS, "SM100+ with FlashInfer"),
    (MXFP4_PACK, 4, False): (_MX_KERNELS, "GPUs other than SM100+ with FlashInfer"),
    (MXFP8_Q, 8, True): (_MX_KERNELS, "SM100+ with FlashInfer"),
    (MXFP8_Q, 8, False): (_MX_KERNELS, "GPUs other than SM100+ with FlashInfer"),
    (FLOAT_Q, 8, True): ("vLLM 0.32 quantizes FP8 activations on SM89+ GPUs (Ada, Hopper, Blackwell); older GPUs "
                         "(A100) run W8A16, and vLLM-CPU without AMX-FP8 picks a torch fallback for dynamic FP8 (it "
                         "hung in our test) or an AMX W8A16 kernel for static FP8 (it failed at warm-up)",
                         "SM89+ GPUs"),
    (PACK, 4, True): ("vLLM 0.32 has a kernel for int4 weights with FP8 activations only on SM90 (it matches the "
                      "capability exactly): other GPUs and vLLM-CPU refuse to load the checkpoint; on SM90 a layer "
                      "whose per-GPU slice is not a multiple of 128 wide (mind tensor parallelism) falls back to "
                      "Marlin, which serves neither the FP8 activations nor the FP8 group scales",
                      "SM90 (H100/H200), every layer's per-GPU slice a multiple of 128"),
    (PACK, 4, False): ("vLLM-CPU 0.32 quantizes the activations of 4-bit int layers to int8 on AMX and RISC-V CPUs "
                       "unless VLLM_CPU_INT4_W4A8=0", "GPUs, or vLLM-CPU with VLLM_CPU_INT4_W4A8=0"),
    (PACK, 8, False): ("vLLM-CPU 0.32 has no kernel for 8-bit weight-only int (its int kernels take 4-bit weights)",
                       "GPUs"),
}


_EXPERTS_WITH_QUANTIZED_INPUTS = (
    "MoE experts with quantized activations: vLLM 0.32 serves them with the first MoE backend in its list for the "
    "format that the GPU runs, and its last resorts (Marlin; FP8's CPU backend) compute with bf16 activations -- "
    "where vLLM logs one of those, the student is served with activations it did not train with")

_EXPERTS_ON_VLLM_CPU = (
    "quantized MoE experts: vLLM-CPU 0.32 has int4 MoE kernels only -- symmetric int4 on AMX CPUs in groups "
    "other than 32, or through zentorch -- and both compute with int8 activations; on GPUs vLLM 0.32 picks an MoE "
    "kernel by format and GPU (its MXFP8 one quantizes activations too); serving a packed MoE export on a GPU is "
    "not part of qadpipe's tests")


def fused_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """Sibling Linears vLLM fuses into one GEMM (q/k/v, gate/up), quantized or not."""
    return sibling_groups(name for name, m in model.named_modules() if isinstance(m, nn.Linear))


def check_fused(groups: list[tuple[str, ...]], schemes: dict[str, Scheme],
                tensors: dict[str, torch.Tensor]) -> None:
    """Members of a fused group must share the scheme and every per-tensor scale."""
    for members in groups:
        keys = {schemes[m].key() if m in schemes else "dense" for m in members}
        if len(keys) > 1:
            raise ExportError(f"{', '.join(members)}: fused into one GEMM by vLLM but quantized "
                              "differently; give them the same preset (or ignore all of them)")
        if members[0] not in schemes:
            continue
        per_tensor = list(_PER_TENSOR)
        if schemes[members[0]].weights["strategy"] == "tensor":
            per_tensor.append("weight_scale")
        for local in per_tensor:
            values = [tensors.get(f"{m}.{local}") for m in members]
            if values[0] is None:
                continue
            if any(v is None or not torch.equal(v, values[0]) for v in values[1:]):
                shown = ", ".join(f"{m}={float(v.float().reshape(-1)[0]):.6g}"
                                  for m, v in zip(members, values) if v is not None)
                raise ExportError(f"mismatched fused scales: {local} differs across {shown}; vLLM "
                                  "applies one per fused GEMM (it would take the max and serve "
                                  "something else than was trained)")


def moved_by_fp16_requantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Which per-tensor FP8 weight codes vLLM serves otherwise: it passes every per-tensor FP8
    Linear, fused or alone, through ``requantize_with_max_scale`` (and each MoE expert's gate
    and up projections through its MoE twin), even when the scales are equal; that
    dequantizes them in fp16 (``per_tensor_dequantize``: fp16 codes times a 0-dim fp32 scale
    stay fp16) and quantizes them again with the same scale.  The round trip gives the codes
    back while ``code * scale`` is a normal fp16 number; below that (a weight amax under
    ~0.02) the smallest codes move.
    A code counts as moved when either way vLLM's kernels divide (``/ s``, ``* (1 / s)``)
    moves it."""
    scale = scale.float().reshape(())
    dequantized = (codes.to(torch.float16) * scale).float()
    moved = torch.zeros(codes.shape, dtype=torch.bool, device=codes.device)
    for requantized in (dequantized / scale, dequantized * (1 / scale)):
        moved |= round_to_fp8(requantized).view(torch.uint8) != codes.view(torch.uint8)
    return moved


def warn_fp16_requantized(tensors: dict[str, torch.Tensor], experts: list[str]) -> None:
    """Say when vLLM would serve per-tensor FP8 weights other than trained (see
    :func:`moved_by_fp16_requantize`; ``experts``: the MoE experts modules, whose down
    projections vLLM leaves alone): a warning, as only the smallest codes of unusually small
    weights move, and nothing qadpipe can write avoids vLLM's round trip."""
    moved: dict[str, tuple[int, int]] = {}
    for key, codes in tensors.items():
        layer = key.removesuffix(".weight")
        scale = tensors.get(f"{layer}.weight_scale")
        if layer == key or codes.dtype != torch.float8_e4m3fn or scale is None or scale.numel() != 1:
            continue
        if layer.endswith(".down_proj") and any(layer.startswith(f"{module}.") for module in experts):
            continue
        count = int(moved_by_fp16_requantize(codes, scale).sum())
        if count:
            moved[layer] = (count, codes.numel())
    if moved:
        log.warning("%d layers (first: %s): vLLM requantizes per-tensor FP8 weights through fp16 and serves %d of "
                    "their %d codes one step or more from those trained (weights with an amax under ~0.02: their "
                    "smallest codes fall below fp16's normal range)", len(moved), next(iter(moved)),
                    sum(count for count, _ in moved.values()), sum(total for _, total in moved.values()))


def quantization_config(model: nn.Module, schemes: dict[str, Scheme], kv_cache: bool = False) -> dict[str, Any]:
    """config.json's ``quantization_config``: one config group per distinct scheme (and the
    FP8 KV-cache scheme when the student was trained with one).  Modules are named as the
    architecture's checkpoints name them (:func:`checkpoint_names`), which is what vLLM matches."""
    renamed = checkpoint_names(model, [name for name, m in model.named_modules() if name and _holds_matrix(m)])
    by_key: dict[str, list[str]] = {}
    for name, scheme in schemes.items():
        by_key.setdefault(scheme.key(), []).append(name)
    experts = set(quant_experts(model))
    single = len(by_key) == 1
    # vLLM matches "Linear" against its own class names (QKVParallelLinear, ...); its LM head
    # is a ParallelLMHead, so a quantized head must be named or it loads as a dense layer.
    head = output_head_name(model)
    named_too = [renamed[head]] if head in schemes else []
    groups = {}
    for i, names in enumerate(by_key.values()):
        scheme = schemes[names[0]]
        groups[f"group_{i}"] = {
            "targets": ["Linear", *named_too] if single else sorted(_target(renamed[n], n in experts) for n in names),
            "weights": scheme.weights,
            "input_activations": scheme.input_activations,
            "output_activations": None,
            "format": scheme.format,
        }
    formats = {s.format for s in schemes.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else MIXED,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": dense_layers(model, schemes, renamed),
        "kv_cache_scheme": _args(8, "float", "tensor") if kv_cache else None,
        "sparsity_config": {},
        "transform_config": {},
    }


def _target(name: str, is_experts: bool) -> str:
    """A layer's CT target by name; fused experts by the per-expert names vLLM looks their
    scheme up by: ``<experts>.<e>.<ckpt name>``, where the checkpoint names are the
    architecture's (Mixtral's ``w1``/``w3``/``w2``, most others' ``gate_proj``/``up_proj``/
    ``down_proj``) and vLLM's name mapper leaves ``re:`` targets as they are.  (One scheme
    for all needs no names: vLLM's ``Linear`` target covers its fused-MoE layers.)"""
    return f"re:^{re.escape(name)}\\.\\d+\\.(gate_proj|up_proj|down_proj|w1|w2|w3)$" if is_experts else name


def dense_layers(model: nn.Module, schemes: dict[str, Scheme], renamed: dict[str, str]) -> list[str]:
    """``ignore``: what vLLM must load dense.  Every nn.Linear left unquantized, by name, and
    every other module holding a matrix (transformers 5 fuses an MoE's experts into 3-D
    tensors and its router is no nn.Linear): vLLM builds those as its own linear and fused-MoE
    layers, matches them against the ``Linear`` target, and would look for packed weights (it
    names an expert ``<experts>.0.gate_proj``, hence the pattern over the sub-names -- only for
    a module with no quantized layer inside, which the pattern would otherwise take too).
    Names as ``renamed`` maps them (the checkpoint's)."""
    dense = sorted(renamed[name] for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in schemes)
    for name, module in sorted(model.named_modules()):
        if isinstance(module, (nn.Linear, nn.Embedding, QuantExperts)) or not _holds_matrix(module):
            continue
        holds_quantized = any(isinstance(m, (QuantLinear, QuantExperts)) for m in module.modules())
        dense.append(renamed[name] if holds_quantized else f"re:{re.escape(renamed[name])}(\\..*)?$")
    return dense


def _holds_matrix(module: nn.Module) -> bool:
    """Whether ``module`` has a weight matrix of its own (a Linear, experts, a router; not a
    quantizer, whose LSQ steps are 2-D too): what the config's targets and ignore list name."""
    return not isinstance(module, (Quantizer, ExpertWeightQuantizer)) and any(
        p.dim() >= 2 for p in module.parameters(recurse=False))


def write_compressed_tensors(model: nn.Module, source_dir: Path, directory: Path,
                             dtype: torch.dtype = torch.bfloat16,
                             max_shard_bytes: Optional[int] = None) -> dict[str, Any]:
    """Write ``model`` as a CT checkpoint into ``directory`` (an empty staging dir).

    All checks (schemes, LM head, fused scales) run on the packed tensors in memory before
    any file is written.  Returns the written config.
    """
    schemes = plan_schemes(model)
    bf16_scaled = [n for n, layer in quant_linears(model).items()
                   if layer.weight_quantizer.spec.scale_dtype is torch.bfloat16]
    bf16_scaled += [n for n, experts in quant_experts(model).items() if experts.spec.scale_dtype is torch.bfloat16]
    if bf16_scaled and dtype is not torch.bfloat16:
        raise ExportError(f"{bf16_scaled[0]}: its scales are bf16 (as trained) but the export dtype is "
                          f"{dtype}; vLLM would round them to {dtype} -- export with model.dtype bfloat16")

    def layer_fn(name: str, layer: QuantLinear) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return layer_tensors(name, layer, schemes[name])

    config = read_config(source_dir)
    tie = ties_word_embeddings(model)
    def experts_fn(name: str, experts: QuantExperts) -> dict[str, torch.Tensor]:
        return experts_tensors(name, experts, schemes[name])

    tensors = export_tensors(model, layer_fn, dtype, tie_word_embeddings=tie, experts_fn=experts_fn)
    check_fused(fused_groups(model), schemes, tensors)
    warn_fp16_requantized(tensors, list(quant_experts(model)))
    kv_scales = kv_cache_scales(model)  # <attn>.k_scale / .v_scale: vLLM maps them to <attn>.attn.*
    tensors.update(kv_scales)
    config["quantization_config"] = quantization_config(model, schemes, kv_cache=bool(kv_scales))
    write_checkpoint(checkpoint_tensors(model, tensors), config, source_dir, directory, dtype, max_shard_bytes)
    log.info("compressed-tensors export: %d layers, format %s", len(schemes),
             config["quantization_config"]["format"])
    return config
