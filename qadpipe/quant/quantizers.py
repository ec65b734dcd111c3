"""nn.Modules around the pure formats: fake-quantization with straight-through gradients.

A :class:`Quantizer` holds one :class:`~qadpipe.quant.formats.QuantSpec` and the state that
spec needs, all in its ``state_dict`` so training checkpoints save it and export reads it:

* ``amax`` (buffer) -- static tensor-level range: the NVFP4 global amax (weights: set from
  the weight by ``apply_recipe``, shared across a fused group; inputs: from calibration) and
  static per-tensor FP8 scales;
* ``step`` (parameter) -- the LSQ step size (Esser et al. 2019, arXiv:1902.08153);
* ``clip_logit`` (parameter) -- learned weight clipping, ``amax_eff = sigmoid(clip_logit) *
  amax`` per group (OmniQuant-style LWC, Shao et al. 2023, arXiv:2308.13137).

Learnable parameters are initialised from the weights (MSE-optimal clip ratio per group),
never from a constant.  Gradients:

* identity STE (default): ``d fake_quant(x) / dx = 1`` exactly (ModelOpt pass-through);
* clipped STE: the gradient is zeroed where the clamp, not the rounding, changed x;
* learnable quantizers use LSQ's gradient (round is the identity, clamp is not), which also
  reaches the step / clip parameter.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qadpipe.errors import QuantError
from qadpipe.quant.compiled import Compile, forward_for
from qadpipe.quant.formats import (
    Kind, QuantizedTensor, QuantSpec, _groups, _groups_like_scale, dequantize, exact_quotient, mse_best_scale, quantize,
    round_to_storage, w4a8_served_values,
)

Ste = Literal["identity", "clipped"]
Learnable = Literal["none", "lsq", "clip"]


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: ``dequantize(quantize(x))`` (eager or compiled, the same bits; see
    :mod:`qadpipe.quant.compiled`).  Backward: the incoming gradient unchanged (identity) or
    masked to the unclipped elements (clipped)."""

    @staticmethod
    def forward(ctx, x: Tensor, spec: QuantSpec, amax: Optional[Tensor], clipped: bool,
                compile_mode: Compile, per_slice: bool = False) -> Tensor:
        out, mask = forward_for(spec, clipped, compile_mode, x.device, per_slice)(x, amax)
        ctx.clipped = clipped
        if clipped:
            ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.clipped:
            (mask,) = ctx.saved_tensors
            grad = grad * mask
        return grad, None, None, None, None, None


class _RoundSTE(torch.autograd.Function):
    """round() forward (half to even), identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


class _CastSTE(torch.autograd.Function):
    """Round to a storage dtype (the bf16 an exported scale is written in), identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor, dtype: torch.dtype) -> Tensor:
        return round_to_storage(x, dtype).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _grad_scale(x: Tensor, factor: float) -> Tensor:
    """Value of ``x``, gradient times ``factor`` (LSQ's step-gradient scaling)."""
    return (x - x * factor).detach() + x * factor


def lsq_fake_quantize(x: Tensor, spec: QuantSpec, scale: Tensor) -> Tensor:
    """Integer fake-quant differentiable in ``scale`` (shaped like ``QuantizedTensor.scale``):
    ``round_ste(clamp(x / s, qmin, qmax)) * s`` with ``s`` rounded to bf16 (straight through),
    clamp before round as in LSQ (eq. 1-3).  Forward values equal
    ``dequantize(quantize(x, spec, scale=scale))`` bit for bit (integer bounds commute with
    rounding).  W4A8: the codes are taken against the bf16 scale, the values are what vLLM serves
    (:func:`~qadpipe.quant.formats.w4a8_served_values`), whose FP8 roundings the gradients pass
    straight through."""
    qmin, qmax = spec.code_range
    s = _CastSTE.apply(scale.float(), spec.scale_dtype)
    s = torch.where(s == 0, torch.finfo(spec.scale_dtype).eps, s)
    xg = _groups(x.float(), spec)
    codes = _RoundSTE.apply(torch.clamp(xg / _groups_like_scale(s, spec), qmin, qmax))
    out = codes * _groups_like_scale(s, spec)
    if spec.fp8_group_scales:
        out = out + (w4a8_served_values(codes.detach(), s.detach(), spec) - out).detach()
    return out.reshape(x.shape).to(x.dtype)


def _positive_steps(steps: Tensor, spec: QuantSpec) -> Tensor:
    """LSQ steps with an all-zero group's 0 replaced by the layer's smallest step (the scale
    dtype's eps when every group is zero): at 0 the step's gradient is 0 (``|s|``'s, and the
    forward's substitute for a zero scale), so it could never grow once the weights move off
    zero."""
    if steps.is_meta:   # a sharded build's skeleton: shapes only (see build_student_skeleton)
        return steps
    live = steps[steps > 0]
    floor = live.min() if live.numel() else torch.tensor(torch.finfo(spec.scale_dtype).eps)
    return torch.where(steps > 0, steps, floor)


class Quantizer(nn.Module):
    """Fake-quantizes one tensor (a weight or a Linear's input) with one spec."""

    def __init__(self, spec: QuantSpec, *, ste: Ste = "identity", learnable: Learnable = "none",
                 weight: Optional[Tensor] = None, compile_mode: Compile = "off") -> None:
        super().__init__()
        self.spec = spec
        self.ste = ste
        self.compile_mode = compile_mode
        self.learnable = learnable
        self.calibrated = spec.dynamic
        # A weight's range is its own (from_linear sets it): even an all-zero weight's 0 is one.
        self.for_weight = weight is not None
        if not spec.dynamic:
            self.register_buffer("amax", torch.zeros(()))
        if learnable != "none":
            if weight is None:
                raise QuantError(f"learnable '{learnable}' quantizes weights only")
            self._init_learnable(weight)

    def _init_learnable(self, weight: Tensor) -> None:
        spec = self.spec
        if spec.kind not in (Kind.INT, Kind.LSQ) or not spec.symmetric:
            raise QuantError(f"learnable '{self.learnable}': needs a symmetric integer weight format, "
                             f"got {spec.kind.value}{'' if spec.symmetric else ' asymmetric'}")
        best = mse_best_scale(weight, spec)
        if self.learnable == "lsq":
            self.step = nn.Parameter(_positive_steps(best.float(), spec))
        else:
            qmin, qmax = spec.code_range
            live = _groups(weight.detach().float(), spec).abs().amax(-1).reshape(best.shape)
            # the ratio of the weights' own scale, whatever their size (an all-zero group: none to clip)
            ratio = torch.where(live > 0, best * ((qmax - qmin) / 2) / live, 1.0).clamp(1e-3, 0.995)
            self.clip_logit = nn.Parameter(torch.logit(ratio))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # An input's initial 0 is no range (calibration refuses all-zero data): such a state
        # was saved before calibration.
        if prefix + "amax" in state_dict and not self.for_weight:
            self.calibrated = bool((state_dict[prefix + "amax"] > 0).all())

    def set_amax(self, amax: Tensor) -> None:
        """Fix the static range (calibration, or a fused group's shared weight amax)."""
        if self.spec.dynamic:
            raise QuantError(f"{self.spec.kind.value}: a dynamic quantizer has no static amax")
        self.amax.copy_(amax.detach().float().reshape(()))
        self.calibrated = True

    def _learned_scale(self, x: Tensor) -> Tensor:
        """The learned scale shaped like ``QuantizedTensor.scale`` (differentiable)."""
        if self.learnable == "lsq":
            qmin, qmax = self.spec.code_range
            per_scale = x.numel() // self.step.numel()
            return _grad_scale(self.step.abs(), (per_scale * qmax) ** -0.5)
        qmin, qmax = self.spec.code_range
        live = _groups(x.float(), self.spec).abs().amax(-1).reshape(self.clip_logit.shape)
        # In fp64, rounded once to fp32 (exact_quotient): in fp32 the export (on the CPU) would
        # round scales a GPU trained otherwise -- CUDA divides by a constant as a multiply by its
        # reciprocal, and sigmoid may differ by an ulp.  An fp64 value lands within those few
        # fp64 ulps of an fp32 rounding boundary with probability ~2**-29.
        return exact_quotient(torch.sigmoid(self.clip_logit.double()) * live.double(), (qmax - qmin) / 2)

    def forward(self, x: Tensor) -> Tensor:
        if not self.calibrated:
            raise QuantError(f"{self.spec.kind.value} quantizer used before calibration: "
                             "run qadpipe.quant.calibrate.calibrate() (or load a calibrated state_dict)")
        if self.learnable != "none":
            return lsq_fake_quantize(x, self.spec, self._learned_scale(x))
        amax = None if self.spec.dynamic else self.amax
        return _FakeQuantSTE.apply(x, self.spec, amax, self.ste == "clipped", self.compile_mode)

    @torch.no_grad()
    def quantize(self, x: Tensor) -> QuantizedTensor:
        """The exact codes and scales ``forward`` uses for ``x``."""
        if self.learnable != "none":
            return quantize(x, self.spec, scale=self._learned_scale(x))
        return quantize(x, self.spec, amax=None if self.spec.dynamic else self.amax)

    def extra_repr(self) -> str:
        spec = self.spec
        group = f", group={spec.group_size}" if spec.group_size else ""
        return (f"{spec.kind.value}{spec.bits if spec.kind in (Kind.INT, Kind.LSQ) else ''}, "
                f"{spec.granularity.value}{group}, ste={self.ste}, learnable={self.learnable}")


class QuantLinear(nn.Linear):
    """nn.Linear whose forward is ``F.linear(input_q(x), weight_q(W), bias)``.

    Built from an existing Linear by :meth:`from_linear`, keeping the very same weight and
    bias Parameters (optimizer state, tying and FSDP wrapping are unaffected).

    ``weight_q(W)`` and ``input_q(x)`` are exactly the codes times the scales export writes.
    Under bf16 autocast (the GPU default) ``F.linear`` then rounds both to bf16, a relative
    2^-9 per element, whereas vLLM's kernels multiply the codes exactly and apply the scales
    to fp32 sums.  For FP8 values and 4-bit codes that is under 2^-5 of a quantization step,
    the order of the kernels' own accumulation order; for 8-bit integer codes (up to 127) it
    is up to ~0.4 of a step: a W8A8-int student trained under bf16 autocast saw weights a
    fraction of a step off the codes vLLM serves (fp32 on CPU: none).
    """

    weight_quantizer: Quantizer
    input_quantizer: Optional[Quantizer]

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_spec: QuantSpec, input_spec: Optional[QuantSpec],
                    *, ste: Ste = "identity", learnable: Learnable = "none",
                    compile_mode: Compile = "off") -> "QuantLinear":
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        new.weight_quantizer = Quantizer(weight_spec, ste=ste, learnable=learnable, weight=linear.weight,
                                         compile_mode=compile_mode)
        new.weight_quantizer.to(linear.weight.device)
        new.input_quantizer = None
        if input_spec is not None:
            new.input_quantizer = Quantizer(input_spec, ste=ste, compile_mode=compile_mode).to(linear.weight.device)
        if not weight_spec.dynamic:
            new.weight_quantizer.set_amax(linear.weight.detach().abs().amax())
        return new

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.weight_quantizer(self.weight), self.bias)

    def quantized_weight(self) -> QuantizedTensor:
        """The codes/scales the fake forward uses: what export packs."""
        return self.weight_quantizer.quantize(self.weight.detach())

    def fake_quantized_weight(self) -> Tensor:
        """Q(W) dequantized, in the weight's dtype (the "fake" BF16 export)."""
        return dequantize(self.quantized_weight())
