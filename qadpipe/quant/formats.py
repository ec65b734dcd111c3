"""Number formats as pure tensor functions: quantize -> codes + scales, dequantize, fake-quantize.

One code path for everything: the STE forward of training (``fake_quantize``), the weights
the exporter packs (``quantize``) and the dequantized values vLLM computes all come from the
functions here, so what is trained is what is served.  All arithmetic runs in fp32 whatever
the input dtype (bf16 division rounds near half-steps); scales are rounded to the dtype they
are stored in *before* the codes are computed from them.

Conventions (compressed-tensors, vLLM; see ``shared/notes/export-formats-vllm-cpu.md``):

* the last dimension is the reduction dimension (in-features of a weight ``[out, in]``, the
  hidden size of an activation ``[..., hidden]``); groups/blocks are consecutive runs of it;
* INT: scale bf16, ``W = (code - zp) * scale``.  Symmetric narrow range by default
  (int4 codes in [-7, 7], scale = amax/7, as ModelOpt); ``narrow_range=False`` is the
  compressed-tensors convention (codes in [-8, 7], scale = amax/7.5);
* FP8 E4M3: scale fp32 = amax/448, ``W = fp8(clamp(x/scale, ±448)) * scale``;
* NVFP4: E2M1 codes in blocks of 16, FP8 E4M3 block scales and an fp32 per-tensor global
  scale stored the compressed-tensors way, as a *divisor*: ``global_scale = 448*6/amax``,
  ``W = e2m1 * scale_fp8 / global_scale``;
* MXFP4 / MXFP8: E2M1 / E4M3 elements in blocks of 32 with an E8M0 (power of two) scale
  stored as the uint8 biased exponent.  The exponent rule is :class:`MXScaleRule`; the default
  CEIL never clips (ModelOpt's rule), FLOOR is the OCP MX v1.0 spec's.

Zero scales become the smallest step of their storage dtype (0.125 for FP8 block scales,
``finfo(dtype).eps`` otherwise), as compressed-tensors does, so an all-zero block dequantizes to
exact zeros and nothing divides by zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Optional

import torch
from torch import Tensor

from qadpipe.errors import QuantError
from qadpipe.quant import constants as C
from qadpipe.quant.packing import nibble_to_e2m1, pack_fp4, pack_int32, unpack_fp4, unpack_int32

__all__ = [
    "Kind", "Granularity", "MXScaleRule", "QuantSpec", "QuantizedTensor",
    "quantize", "dequantize", "fake_quantize", "representable_bounds", "mse_best_scale",
    "round_to_e2m1", "round_to_fp8", "pack_int32", "unpack_int32", "pack_fp4", "unpack_fp4",
    "nibble_to_e2m1",
]


class Kind(str, Enum):
    """The element format (or, for the special low-bit methods, how codes are chosen)."""

    INT = "int"          # uniform integer grid, symmetric or asymmetric
    FP8 = "fp8"          # E4M3 elements, fp32 scale
    NVFP4 = "nvfp4"      # E2M1 elements, FP8 block-16 scales, fp32 global scale
    MXFP4 = "mxfp4"      # E2M1 elements, E8M0 block-32 scales
    MXFP8 = "mxfp8"      # E4M3 elements, E8M0 block-32 scales
    TWN = "twn"          # ternary weight networks
    ABSMEAN = "absmean"  # BitNet b1.58 ternary
    SHERRY = "sherry"    # N:M sparse ternary
    LSQ = "lsq"          # learned step size (integer grid, scale is a parameter)


TERNARY = (Kind.TWN, Kind.ABSMEAN, Kind.SHERRY)
INTEGER_CODES = (Kind.INT, Kind.LSQ) + TERNARY   # int8 codes; exportable as pack-quantized


class Granularity(str, Enum):
    """Which elements share one scale."""

    TENSOR = "tensor"    # the whole tensor
    CHANNEL = "channel"  # one row of a weight [out, in] (per output channel)
    TOKEN = "token"      # one row of an activation [..., hidden] (dynamic per token)
    GROUP = "group"      # group_size consecutive elements of the last dimension (a "block")


class MXScaleRule(str, Enum):
    """How an MX block's shared exponent ``e`` (scale ``2**e``) follows from its amax.

    CEIL:  ``e = ceil(log2(amax / elem_max))`` -- the smallest scale that clips nothing
           (ModelOpt ``compute_scale_e8m0_NV``, AngelSlim, AutoRound ``rceil``).  Default.
    FLOOR: ``e = floor(log2(amax)) - emax_elem`` -- OCP Microscaling spec v1.0 section 6.3;
           elements above ``elem_max * 2**e`` saturate.
    Both are computed exactly from ``frexp`` (no float log2 at binade edges).
    """

    CEIL = "ceil"
    FLOOR = "floor"


@dataclass(frozen=True)
class QuantSpec:
    """A complete description of one quantizer's numerics (frozen: hashable, compile-friendly).

    ``dynamic``: scales come from the live tensor at every call.  When False, the tensor-level
    amax comes from calibration: the static per-tensor FP8 input scale, and the NVFP4 global
    scale (block scales are always computed from the live tensor).
    ``fp8_group_scales``: W4A8 -- vLLM turns bf16 int4 group scales into FP8 times a
    per-channel fp32 factor at load (``convert_bf16_scales_to_fp8``); emulate it.
    ``sparsity``: (N, M) for Sherry, keep the N largest of every M consecutive weights.
    ``fp8_toward_zero``: FP8 codes rounded toward zero instead of to nearest-even -- what
    vLLM-CPU 0.32's FP8 KV-cache kernels do (measured byte for byte in tests/quant/test_kv_cache.py).
    ``reciprocal``: activation codes from ``x * fp32(1/s)`` instead of ``x / s`` (FP8 and INT) --
    how vLLM's activation quantizers compute them: FP8's ``QuantFP8.forward_native`` (vLLM-CPU,
    and the GPU's default compiled graph; only CUDA's eager per-token kernel divides) and int8's
    ``scaled_int8_quant`` on CPU (CUDA's dynamic int8 kernel multiplies by ``fp32(127/amax)``
    instead).  The two roundings differ by one step on ~3-5e-4 of activation codes; weights
    keep ``x / s``, as the compressed-tensors library quantizes them (and export stores those
    codes).
    """

    kind: Kind
    bits: int = 4
    granularity: Granularity = Granularity.GROUP
    group_size: Optional[int] = None
    symmetric: bool = True
    narrow_range: bool = True
    dynamic: bool = True
    mx_rule: MXScaleRule = MXScaleRule.CEIL
    fp8_group_scales: bool = False
    sparsity: tuple[int, int] = (3, 4)
    fp8_toward_zero: bool = False
    reciprocal: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))
        object.__setattr__(self, "granularity", Granularity(self.granularity))
        object.__setattr__(self, "mx_rule", MXScaleRule(self.mx_rule))
        fixed_block = {Kind.NVFP4: C.NVFP4_BLOCK, Kind.MXFP4: C.MX_BLOCK, Kind.MXFP8: C.MX_BLOCK}
        fixed_bits = {Kind.FP8: 8, Kind.NVFP4: 4, Kind.MXFP4: 4, Kind.MXFP8: 8,
                      Kind.TWN: 2, Kind.ABSMEAN: 2, Kind.SHERRY: 2}
        if self.kind in fixed_bits:
            object.__setattr__(self, "bits", fixed_bits[self.kind])
        if self.kind in fixed_block:
            block = fixed_block[self.kind]
            if self.group_size not in (None, block):
                raise QuantError(f"{self.kind.value}: group_size {self.group_size} is not allowed; "
                                 f"the format fixes blocks of {block}")
            object.__setattr__(self, "group_size", block)
            object.__setattr__(self, "granularity", Granularity.GROUP)
        if self.kind in (Kind.INT, Kind.LSQ) and not 2 <= self.bits <= 8:
            raise QuantError(f"{self.kind.value}: bits {self.bits} out of range, expected 2..8")
        if self.granularity is Granularity.GROUP and (self.group_size is None or self.group_size < 1):
            raise QuantError(f"{self.kind.value}: granularity 'group' needs a positive group_size, "
                             f"got {self.group_size}")
        if self.granularity is not Granularity.GROUP:
            object.__setattr__(self, "group_size", None)
        if self.kind is Kind.FP8 and self.granularity is Granularity.GROUP:
            raise QuantError("fp8: granularity 'group' is not supported, expected tensor, channel or token")
        if not self.symmetric and self.kind is not Kind.INT:
            raise QuantError(f"{self.kind.value}: asymmetric quantization is only defined for int")
        if self.fp8_toward_zero and self.kind is not Kind.FP8:
            raise QuantError(f"{self.kind.value}: fp8_toward_zero applies to fp8 codes only")
        if self.fp8_group_scales and not (self.kind in (Kind.INT, Kind.LSQ) and self.symmetric
                                          and self.granularity is Granularity.GROUP):
            raise QuantError("fp8_group_scales (W4A8) needs symmetric int weights with group scales")
        if self.kind is Kind.SHERRY:
            n, m = self.sparsity
            if not 0 < n < m:
                raise QuantError(f"sherry: sparsity {n}:{m} invalid, expected 0 < N < M")
            if self.group_size is not None and self.group_size % m:
                raise QuantError(f"sherry: group_size {self.group_size} must be a multiple of M={m}")

    @property
    def scale_dtype(self) -> torch.dtype:
        """The dtype the scale is stored (and exported) in; fake-quant uses exactly this value.
        Per-token scales are never stored: vLLM's dynamic kernels compute them in fp32."""
        if self.kind is Kind.FP8 or self.granularity is Granularity.TOKEN:
            return torch.float32
        if self.kind is Kind.NVFP4:
            return C.FP8_E4M3_DTYPE
        if self.kind in (Kind.MXFP4, Kind.MXFP8):
            return torch.uint8
        return torch.bfloat16

    @property
    def code_range(self) -> tuple[int, int]:
        """(qmin, qmax) of the integer codes."""
        if self.kind in TERNARY:
            return -1, 1
        half = 1 << (self.bits - 1)
        if self.kind in (Kind.INT, Kind.LSQ) and self.symmetric and self.narrow_range:
            return -(half - 1), half - 1
        return -half, half - 1

    @property
    def elem_max(self) -> float:
        """Largest magnitude an element code represents (before the scale)."""
        if self.kind in (Kind.FP8, Kind.MXFP8):
            return C.FP8_E4M3_MAX
        if self.kind in (Kind.NVFP4, Kind.MXFP4):
            return C.E2M1_MAX
        qmin, qmax = self.code_range
        return float(max(-qmin, qmax))

    @property
    def elem_saturates_above(self) -> float:
        """Float formats: the element magnitude beyond which the saturating clamp, not the
        rounding, decides the code (halfway to the next value past ``elem_max``)."""
        if self.fp8_toward_zero:
            return C.FP8_E4M3_TOWARD_ZERO_SATURATES_ABOVE
        if self.kind in (Kind.FP8, Kind.MXFP8):
            return C.FP8_E4M3_SATURATES_ABOVE
        if self.kind in (Kind.NVFP4, Kind.MXFP4):
            return C.E2M1_SATURATES_ABOVE
        raise QuantError(f"{self.kind.value}: integer codes saturate at qmax + 1/2 steps, not at a float bound")

    def check_shape(self, shape: tuple[int, ...], name: str = "tensor") -> None:
        """Raise QuantError unless a tensor of ``shape`` can be quantized with this spec."""
        k = shape[-1]
        if self.granularity is Granularity.GROUP and k % self.group_size:
            raise QuantError(f"{name}: last dimension {k} is not divisible by the "
                             f"{self.kind.value} group size {self.group_size}")
        if self.kind is Kind.SHERRY and k % self.sparsity[1]:
            raise QuantError(f"{name}: last dimension {k} is not divisible by sherry M={self.sparsity[1]}")


@dataclass(frozen=True)
class QuantizedTensor:
    """Codes and scales of one quantized tensor, in the dtypes export writes.

    codes: int8 (INT, LSQ, ternary), float32 E2M1 values (NVFP4, MXFP4; pack with
    :func:`pack_fp4`), float8_e4m3fn (FP8, MXFP8); same shape as the input.
    scale: ``spec.scale_dtype``; shape ``[..., K/group]`` (group), ``[..., 1]`` (channel/token)
    or ``[1]`` (tensor).  MX scales are uint8 biased exponents ``e + 127``.
    zero_point: int8 like ``scale`` (asymmetric INT only).  global_scale: NVFP4 only, fp32
    ``[1]``, the compressed-tensors divisor ``448*6/amax``.  dtype: what ``dequantize`` returns.
    """

    codes: Tensor
    scale: Tensor
    zero_point: Optional[Tensor]
    global_scale: Optional[Tensor]
    spec: QuantSpec
    dtype: torch.dtype


# ----------------------------------------------------------------------------- elements

def round_to_e2m1(y: Tensor) -> Tensor:
    """Round fp32 values to the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} (sign kept), nearest,
    ties to even, saturating at ±6.  The grid step is 0.5 below 2, 1 in [2, 4) and 2 above,
    so scaling by the inverse step makes ``torch.round`` (half-to-even) do the work exactly."""
    a = y.abs()
    inv_step = torch.where(a < 2, 2.0, torch.where(a < 4, 1.0, 0.5))
    q = (torch.round(a * inv_step) / inv_step).clamp(max=C.E2M1_MAX)
    return torch.copysign(q, y)


def round_to_fp8(y: Tensor, toward_zero: bool = False) -> Tensor:
    """Saturating cast to float8_e4m3fn (a plain cast above 448 gives NaN); round to
    nearest-even, or ``toward_zero``: where the nearest code overshoots |y|, take the next
    smaller magnitude (e4m3 is sign-magnitude, so that is the byte minus one)."""
    y = y.clamp(-C.FP8_E4M3_MAX, C.FP8_E4M3_MAX)
    codes = y.to(C.FP8_E4M3_DTYPE)
    if not toward_zero:
        return codes
    over = codes.float().abs() > y.float().abs()
    return torch.where(over, codes.view(torch.uint8) - 1, codes.view(torch.uint8)).view(C.FP8_E4M3_DTYPE)


def round_to_bf16(x: Tensor) -> Tensor:
    """fp32 values rounded to the nearest bfloat16 (ties to even), still fp32: what
    ``x.to(torch.bfloat16).float()`` gives for finite ``x`` (inf and NaN pass through).

    Written as integer arithmetic on the bits because a compiler may drop a cast round trip as
    a no-op: torch 2.11's inductor on CPU does, even with ``emulate_precision_casts``, and every
    INT scale then kept fp32 precision the exported bf16 scale does not have.  bf16 is fp32's
    top 16 bits, so rounding is adding half a step (plus the kept part's last bit, for ties to
    even) and clearing the low 16; done in int64 so no finite value can overflow."""
    bits = x.float().view(torch.int32).to(torch.int64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & ~0xFFFF
    return torch.where(x.isfinite(), rounded.to(torch.int32).view(torch.float32), x.float())


def round_to_storage(x: Tensor, dtype: torch.dtype) -> Tensor:
    """fp32 values rounded to ``dtype``'s grid, as fp32 (bf16 by :func:`round_to_bf16`)."""
    if dtype == torch.bfloat16:
        return round_to_bf16(x)
    return x.to(dtype).float()


def exact_quotient(numerator: Tensor | float, denominator: Tensor | float) -> Tensor:
    """``numerator / denominator`` (fp32 values; one side a Python constant) rounded once to
    fp32: the same bits on CPU and CUDA, eager and compiled.  Done directly in fp32 it is not:
    CUDA eager divides by a Python scalar as a multiply by its reciprocal (two roundings), and
    inductor lowers ``constant / x`` to a reciprocal, approximate in Triton.  In fp64 any of
    those is off by a few fp64 ulps at most, while a quotient of fp32 values is never within
    2**-49 (relative) of an fp32 rounding boundary, so the final rounding to fp32 is the correct
    one however the fp64 division was done.  Scales only: a few values per group or row."""
    if isinstance(numerator, Tensor):
        return (numerator.double() / denominator).float()
    return (numerator / denominator.double()).float()


def _store(scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Round a scale (fp32; fp64 for the ternary means) to its storage dtype; zeros become the
    dtype's smallest step."""
    eps = torch.finfo(dtype).eps
    stored = round_to_storage(scale, dtype).to(dtype)
    return torch.where(stored == 0, torch.tensor(eps, dtype=dtype, device=scale.device), stored)


# ----------------------------------------------------------------------------- grouping

def _groups(x: Tensor, spec: QuantSpec) -> Tensor:
    """View ``x`` as ``[..., G, n]``: each slice along the last dim shares one scale."""
    if spec.granularity is Granularity.GROUP:
        return x.unflatten(-1, (x.shape[-1] // spec.group_size, spec.group_size))
    if spec.granularity is Granularity.TENSOR:
        return x.reshape(1, 1, -1)
    return x.unsqueeze(-2)


def _scale_shape(x_shape: torch.Size, spec: QuantSpec) -> tuple[int, ...]:
    if spec.granularity is Granularity.GROUP:
        return (*x_shape[:-1], x_shape[-1] // spec.group_size)
    if spec.granularity is Granularity.TENSOR:
        return (1,)
    return (*x_shape[:-1], 1)


# ----------------------------------------------------------------------------- quantize

def quantize(x: Tensor, spec: QuantSpec, *, amax: Optional[Tensor] = None,
             scale: Optional[Tensor] = None) -> QuantizedTensor:
    """Quantize ``x`` (any float dtype) to codes + scales.

    amax: a calibrated amax instead of the live one -- the tensor-level amax for
    static per-tensor formats and the NVFP4 global scale, or a per-group/-channel amax shaped
    like the scale (learned clipping).  scale: an explicit scale shaped like the result's
    scale (INT/LSQ: a learned step); it is rounded to ``spec.scale_dtype`` first.
    """
    spec.check_shape(tuple(x.shape))
    xg = _groups(x.float(), spec)
    out_shape = _scale_shape(x.shape, spec)
    zero_point = global_scale = None
    if amax is not None:
        amax = amax.float().reshape(_scale_shape(x.shape, spec) if amax.numel() > 1 else (1,))
        amax = _groups_like_scale(amax, spec)
    if scale is not None:
        scale = _groups_like_scale(scale.float().reshape(out_shape), spec)

    if spec.kind in (Kind.INT, Kind.LSQ):
        codes, s, zero_point = _quantize_int(xg, spec, amax, scale)
    elif spec.kind in TERNARY:
        from qadpipe.quant.special import ternary_codes
        codes, s = ternary_codes(xg, spec)
    elif spec.kind is Kind.FP8:
        a = amax if amax is not None else xg.abs().amax(-1, keepdim=True)
        s = _store(exact_quotient(a, C.FP8_E4M3_MAX), torch.float32)
        if spec.granularity is Granularity.TOKEN:   # dynamic per token, floored as vLLM floors it
            s = s.clamp_min(C.FP8_MIN_DYNAMIC_SCALE)
        scaled = _scaled(xg, s, spec)
        codes = round_to_fp8(scaled, spec.fp8_toward_zero)
    elif spec.kind is Kind.NVFP4:
        codes, s, global_scale = _quantize_nvfp4(xg, amax)
    else:
        codes, s = _quantize_mx(xg, spec)
    scale_out = s.reshape(out_shape)
    zp_out = zero_point.reshape(out_shape) if zero_point is not None else None
    return QuantizedTensor(codes.reshape(x.shape), scale_out, zp_out, global_scale, spec, x.dtype)


def _groups_like_scale(t: Tensor, spec: QuantSpec) -> Tensor:
    """A scale/amax shaped like ``QuantizedTensor.scale`` -> broadcastable against ``_groups``."""
    if spec.granularity is Granularity.TENSOR or t.numel() == 1:
        return t.reshape(1, 1, 1)
    return t.unsqueeze(-1)


def _scaled(xg: Tensor, s: Tensor, spec: QuantSpec) -> Tensor:
    """``x / s``, or ``x * fp32(1/s)`` where the serving kernel multiplies (``spec.reciprocal``)."""
    return xg * exact_quotient(1.0, s) if spec.reciprocal else xg / s


def _quantize_int(xg: Tensor, spec: QuantSpec, amax: Optional[Tensor],
                  scale: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    qmin, qmax = spec.code_range
    if spec.symmetric:
        if scale is None:
            a = amax if amax is not None else xg.abs().amax(-1, keepdim=True)
            scale = exact_quotient(a, (qmax - qmin) / 2)
        s = _store(scale, spec.scale_dtype).float()
        codes = torch.round(_scaled(xg, s, spec)).clamp(qmin, qmax)
        return codes.to(torch.int8), s.to(spec.scale_dtype), None
    lo = xg.amin(-1, keepdim=True).clamp(max=0)
    hi = xg.amax(-1, keepdim=True).clamp(min=0)
    s = _store(exact_quotient(hi - lo, qmax - qmin), spec.scale_dtype).float()
    zp = torch.round(qmin - lo / s).clamp(qmin, qmax)
    codes = torch.round(_scaled(xg, s, spec) + zp).clamp(qmin, qmax)
    return codes.to(torch.int8), s.to(spec.scale_dtype), zp.to(torch.int8)


def _quantize_nvfp4(xg: Tensor, amax: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    a = amax.reshape(()) if amax is not None else xg.abs().amax()
    tiny = torch.finfo(torch.float32).tiny
    # 2688 / amax as torch (and compressed-tensors) evaluate it: reciprocal, then multiply
    global_scale = exact_quotient(1.0, a.clamp(min=tiny)) * (C.FP8_E4M3_MAX * C.E2M1_MAX)
    global_scale = torch.nan_to_num(global_scale, nan=1.0, posinf=1.0, neginf=1.0).reshape(1)
    block_amax = xg.abs().amax(-1, keepdim=True)
    s8 = round_to_fp8(global_scale * exact_quotient(block_amax, C.E2M1_MAX)).float()
    # An all-zero (or underflowed) block gets the smallest nonzero scale.  Done in fp32 and cast
    # back (exact: the value is an E4M3 code) because inductor cannot lower a where() on float8.
    s8 = torch.where(s8 == 0, C.FP8_ZERO_SCALE, s8)
    effective = s8 / global_scale
    s8 = s8.to(C.FP8_E4M3_DTYPE)
    codes = round_to_e2m1((xg / effective).clamp(-C.E2M1_MAX, C.E2M1_MAX))
    return codes, s8, global_scale


def _mx_exponent(block_amax: Tensor, spec: QuantSpec) -> Tensor:
    """Integer shared exponent per block (see :class:`MXScaleRule`), clamped to E8M0's range."""
    mant, exp = torch.frexp(block_amax)            # amax = mant * 2**exp, mant in [0.5, 1)
    if spec.mx_rule is MXScaleRule.FLOOR:
        emax_elem = C.E2M1_EMAX if spec.kind is Kind.MXFP4 else C.FP8_E4M3_EMAX
        e = (exp - 1) - emax_elem
    else:
        elem_mant, elem_exp = math.frexp(spec.elem_max)   # constants, not a CPU tensor in a CUDA graph
        e = torch.where(mant <= elem_mant, exp - elem_exp, exp - elem_exp + 1)
    e = torch.where(block_amax > 0, e, torch.zeros_like(e))
    return e.clamp(C.E8M0_MIN_EXP, C.E8M0_MAX_EXP)


def _quantize_mx(xg: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """A block holding an inf or a NaN gets the NaN scale (E8M0 0xFF), which makes every value
    of the block NaN (OCP MX v1.0, 5.3): an overflowing activation shows up instead of being
    rounded to a finite number and taking the block's other values with it."""
    block_amax = xg.abs().amax(-1, keepdim=True)
    e = _mx_exponent(block_amax, spec)
    y = xg * torch.pow(2.0, (-e).float())
    if spec.kind is Kind.MXFP4:
        codes = round_to_e2m1(y.clamp(-C.E2M1_MAX, C.E2M1_MAX))
    else:
        codes = round_to_fp8(y)
    scale = torch.where(block_amax.isfinite(), e + C.E8M0_BIAS, C.E8M0_NAN)
    return codes, scale.to(torch.uint8)


# ----------------------------------------------------------------------------- dequantize

def effective_scale(q: QuantizedTensor) -> Tensor:
    """The fp32 multiplier of each group, shaped like ``q.scale``: what dequantize applies."""
    spec = q.spec
    if spec.kind is Kind.NVFP4:
        return q.scale.float() / q.global_scale
    if spec.kind in (Kind.MXFP4, Kind.MXFP8):
        exponent = torch.where(q.scale == C.E8M0_NAN, math.nan, q.scale.float() - C.E8M0_BIAS)
        return torch.pow(2.0, exponent)
    if spec.fp8_group_scales:   # no per-group multiplier: see w4a8_served_values
        raise QuantError("W4A8 weights are served as fp8(code x s8) x 8c, not code x scale: use dequantize")
    return q.scale.float()


def w4a8_served_factors(scale: Tensor) -> tuple[Tensor, Tensor]:
    """vLLM ``convert_bf16_scales_to_fp8`` (quant_utils.py) of the bf16 group scales: per
    output row ``c = max(max_g(s_g)/448, 1/(448*512))`` (its per-token FP8 quant, floor
    included), group scales ``s8 = fp8(fp8(s_g * (1/c))/8)`` (fp32 values on the E4M3 grid)
    and the row factor ``8c`` (its ``chan_scales``), shaped ``[..., 1]``."""
    s = scale.float()
    c = exact_quotient(s.abs().amax(-1, keepdim=True), C.FP8_E4M3_MAX).clamp_min(C.FP8_MIN_DYNAMIC_SCALE)
    s8 = round_to_fp8(s * exact_quotient(1.0, c))    # QuantFP8: x * scale.reciprocal()
    s8 = round_to_fp8(s8.float() / 8.0)
    return s8.float(), c * 8.0


def w4a8_served_values(codes: Tensor, scale: Tensor, spec: QuantSpec) -> Tensor:
    """The weights vLLM's CUTLASS W4A8 kernel multiplies FP8 activations by, from grouped
    ``codes`` ``[..., G, n]`` and bf16 group scales ``[..., G]``.  vLLM packs each FP8 group
    scale as a table of its products with the codes' magnitudes 1..8, each rounded to E4M3
    (``ops.cutlass_pack_scale_fp8``, CUTLASS's ``packed_scale_t``), which the mainloop looks
    codes up in; the row factor 8c comes after the accumulation.  So a weight is
    ``fp8(code * s8) * 8c``: the products with codes 3, 5, 6 and 7 can need more than E4M3's
    3 mantissa bits, and round (17% of a random weight's elements), which ``code * s8 * 8c``
    missed.
    Formula-level emulation from vLLM's and CUTLASS's sources (the kernel needs a Hopper
    GPU; not bit-verified against it here)."""
    s8, row = w4a8_served_factors(scale)
    looked_up = round_to_fp8(codes * _groups_like_scale(s8, spec)).float()   # code * s8 is exact in fp32
    return looked_up * _groups_like_scale(row, spec)


def dequantize(q: QuantizedTensor) -> Tensor:
    """Codes x scales, in fp32, cast to the dtype that was quantized."""
    spec = q.spec
    values = q.codes.float()
    if q.zero_point is not None:
        values = _groups(values, spec) - _groups_like_scale(q.zero_point.float(), spec)
    else:
        values = _groups(values, spec)
    if spec.fp8_group_scales:
        out = w4a8_served_values(values, q.scale, spec)
    else:
        out = values * _groups_like_scale(effective_scale(q), spec)
    return out.reshape(q.codes.shape).to(q.dtype)


def fake_quantize(x: Tensor, spec: QuantSpec, *, amax: Optional[Tensor] = None,
                  scale: Optional[Tensor] = None) -> Tensor:
    """``dequantize(quantize(x))``: the value the deployed kernel computes with, in x's dtype."""
    return dequantize(quantize(x, spec, amax=amax, scale=scale))


def representable_bounds(q: QuantizedTensor) -> tuple[Tensor, Tensor]:
    """(lo, hi) per group, shaped like ``q.scale``: inputs outside are changed by the clamp,
    not just rounded -- integer codes saturate beyond ``qmax + 1/2`` steps, float elements
    beyond halfway to the next value past their largest (7 for E2M1, 464 for E4M3: an NVFP4
    block maximum sits up to ~6.4 steps out when its FP8 scale rounds down, and rounds to 6
    on its own).  The clipped STE zeroes the gradient outside."""
    spec = q.spec
    # Integer codes saturate against the scale they were divided by: W4A8's bf16 group scale,
    # not the FP8-converted one dequantize multiplies by.
    s = q.scale.float() if spec.fp8_group_scales else effective_scale(q)
    if spec.kind in INTEGER_CODES:
        qmin, qmax = spec.code_range
        zp = q.zero_point.float() if q.zero_point is not None else torch.zeros_like(s)
        return (qmin - 0.5 - zp) * s, (qmax + 0.5 - zp) * s
    return -spec.elem_saturates_above * s, spec.elem_saturates_above * s


def inside_range(x: Tensor, q: QuantizedTensor) -> Tensor:
    """Boolean mask of the elements of ``x`` the quantizer ``q`` does not clip."""
    lo, hi = representable_bounds(q)
    xg = _groups(x, q.spec)
    lo, hi = _groups_like_scale(lo, q.spec), _groups_like_scale(hi, q.spec)
    lo_kept, hi_kept = _bounds_round_inside(q.spec)
    inside = (xg >= lo if lo_kept else xg > lo) & (xg <= hi if hi_kept else xg < hi)
    return inside.reshape(x.shape)


def _bounds_round_inside(spec: QuantSpec) -> tuple[bool, bool]:
    """Whether an element exactly on the lower / upper bound of :func:`representable_bounds`
    rounds to the last code (kept) or past it into the clamp (clipped).  The bound is a tie,
    and half-to-even picks the last code when it is even: int4's -8 and E4M3's 448 (mantissa
    110) keep it; int4's 7, narrow -7 and E2M1's 6 (mantissa 1) go past.  Toward zero, the
    bound itself is past the last code."""
    if spec.kind in INTEGER_CODES:
        qmin, qmax = spec.code_range
        return qmin % 2 == 0, qmax % 2 == 0
    kept = spec.kind in (Kind.FP8, Kind.MXFP8) and not spec.fp8_toward_zero
    return kept, kept


def mse_best_scale(x: Tensor, spec: QuantSpec, ratios: Optional[Tensor] = None) -> Tensor:
    """Per-group scale minimising the squared fake-quant error of ``x`` over a grid of clip
    ratios of the max scale (symmetric INT/LSQ).  The data-driven initialisation of learned
    steps and clips (AngelSlim starts them at a constant 1.0)."""
    if spec.kind not in (Kind.INT, Kind.LSQ) or not spec.symmetric:
        raise QuantError(f"{spec.kind.value}: MSE scale search needs a symmetric integer format")
    if ratios is None:
        ratios = torch.linspace(0.3, 1.0, 29)
    qmin, qmax = spec.code_range
    xf = x.detach().float()
    xg = _groups(xf, spec)
    amax = xg.abs().amax(-1)
    base = exact_quotient(amax, (qmax - qmin) / 2).reshape(_scale_shape(x.shape, spec))
    # errors relative to the group's range: squared in absolute terms, those of a group of tiny
    # weights (amax < ~1e-19) underflow to 0 and tie every ratio
    unit = torch.where(amax > 0, amax, 1.0).unsqueeze(-1)
    best_err = best = None
    for r in ratios.tolist():
        candidate = base * r
        err = (_groups(fake_quantize(xf, spec, scale=candidate) - xf, spec) / unit).square().sum(-1)
        err = err.reshape(candidate.shape)
        if best is None:
            best, best_err = candidate, err
        else:
            better = err < best_err
            best = torch.where(better, candidate, best)
            best_err = torch.where(better, err, best_err)
    return best
