"""The fake-quant forward, eager or through ``torch.compile``, with the same bits either way.

Eager fake-quantization is a dozen elementwise kernels per tensor (scale, divide, round,
clamp, cast, multiply ...), each reading and writing the whole weight or activation; on a GPU
that, not the matmul, is what makes a W4A4 step slow.  Inductor fuses them into one or two
kernels.  Training must still round exactly as export packs, so the compiled path is only
used because it returns the *same* values as the eager one (``tests/quant/test_compiled.py``
checks every preset's formats on random and adversarial tensors):

* casts: inductor keeps bf16/fp16 intermediates in fp32 and drops a round trip such as
  ``scale.to(bfloat16).float()`` -- the stored-scale rounding every INT format depends on
  (measured on a SmolLM2 MLP weight: 0.3% of the INT4 codes off by one).  Its
  ``emulate_precision_casts`` option keeps it on torch 2.13, not on 2.11's CPU backend, and
  crashes 2.9's; so the formats round to bf16 by integer arithmetic on the bits
  (``formats.round_to_bf16``), which no compiler drops, and no option is needed (FP8 and E8M0
  codes are real narrowing casts, never elided).  Checked on torch 2.9, 2.11 and 2.13.
* division: scales are quotients rounded once in fp64 (``formats.exact_quotient``), the same
  on every device; element divisions ``x / s`` keep IEEE rounding in Triton through
  ``eager_numerics.division_rounding`` (see ``_eager_division``).
* shapes: rows dynamic, features static (see :func:`compiled_fake_quant_forward`), so a
  model needs one graph per format and in-features size.
* per slice: MoE experts held in one 3-D tensor quantize each expert on its own range
  (NVFP4's global scale).  ``torch.vmap`` batches the same per-tensor function over the
  experts (:func:`over_slices`): compiled, one call's kernels for all of them, where a Python
  loop launched every kernel once per expert (128 experts x 48 layers in a Qwen3-30B-A3B);
  eager, in batches of experts (:data:`EAGER_SLICE_BATCH_ELEMENTS`).  vmap changes how the
  ops are dispatched, not what they compute; tests check it bit for bit against the loop,
  eager and compiled.

Those tests run on the CPU (inductor's C++ code); other backends generate other code (Triton
on CUDA), so the first tensor of each (device, dtype) a compiled forward sees is also run
eagerly: if any value differs, that forward logs an error and stays eager -- slower, never
different from what export writes.

``quant.compile: auto`` compiles on CUDA only.  On a CPU it is faster too once compiled
(``bench/quant_overhead.py --fake-quant both``, SmolLM2, 2 cores: NVFP4 W4A4 step 2.59x ->
1.47x bf16, MXFP4 2.32x -> 1.34x, INT4 1.26x -> 1.17x), but each format and in-features size
costs seconds of inductor first, so short CPU runs (tests, the demo) stay eager;
``quant.compile: on`` for long ones.
"""

from __future__ import annotations

import functools
import logging
import zlib
from typing import Callable, Literal, Optional

import torch
from torch import Tensor

from qadpipe.quant.formats import QuantSpec, dequantize, inside_range, quantize

log = logging.getLogger(__name__)

Compile = Literal["auto", "on", "off"]


def _eager_division() -> dict[str, bool]:
    """Triton lowers fp32 ``x / y`` to an approximate divide (PTX ``div.full.f32``, up to 2 ulp),
    which moves ``round(x / s)`` across a tie; this inductor option (torch >= 2.10) keeps the
    IEEE division eager uses.  Without it (torch 2.9) the compiled CUDA forward will likely
    differ from eager, and the self-check then runs eager."""
    import torch._inductor.config as inductor_config

    return {"eager_numerics.division_rounding": True} if hasattr(inductor_config, "eager_numerics") else {}


FakeQuantForward = Callable[[Tensor, Optional[Tensor]], tuple[Tensor, Optional[Tensor]]]


def fake_quant_forward(x: Tensor, amax: Optional[Tensor], *, spec: QuantSpec,
                       clipped: bool) -> tuple[Tensor, Optional[Tensor]]:
    """``(dequantize(quantize(x)), mask of the unclipped elements or None)``."""
    q = quantize(x, spec, amax=amax)
    return dequantize(q), (inside_range(x, q) if clipped else None)


def over_slices(forward: FakeQuantForward, clipped: bool) -> FakeQuantForward:
    """``forward`` of each ``x[i]`` with its own ``amax[i]`` (or each with no amax), stacked:
    every slice a tensor of its own, in one batched call (``torch.vmap``)."""
    def run(x: Tensor, amax: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        return torch.vmap(forward, in_dims=(0, None if amax is None else 0),
                          out_dims=(0, 0 if clipped else None))(x, amax)

    return run


#: Elements per batched eager call over slices.  Eager runs a dozen whole-size intermediates
#: per call: over all 128 experts of a Qwen3-30B-A3B gate_up (201M elements, fp32, NVFP4,
#: clipped STE, 1 CPU thread) one call took 7.9 s and +3.2 GiB transient, one expert at a
#: time 5.0 s and +0.8 GiB, batches of 4M elements 3.5 s and +0.4 GiB (1M: 4.4 s, +0.2 GiB;
#: 16M: 7.0 s); 128 small experts [96, 256] in one batch 45 ms vs 59 ms looped.  Compiled code
#: fuses the intermediates away and takes the whole tensor.
EAGER_SLICE_BATCH_ELEMENTS = 1 << 22


def _in_slice_batches(forward: FakeQuantForward, clipped: bool) -> FakeQuantForward:
    """:func:`over_slices` on batches of whole slices of about ``EAGER_SLICE_BATCH_ELEMENTS``
    (one slice at least), written into one output."""
    batched = over_slices(forward, clipped)

    def run(x: Tensor, amax: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        step = max(1, EAGER_SLICE_BATCH_ELEMENTS // max(1, x[0].numel()))
        if step >= x.shape[0]:
            return batched(x, amax)
        out = torch.empty_like(x)
        mask = torch.empty(x.shape, dtype=torch.bool, device=x.device) if clipped else None
        for start in range(0, x.shape[0], step):
            part = slice(start, start + step)
            out[part], part_mask = batched(x[part], None if amax is None else amax[part])
            if clipped:
                mask[part] = part_mask
        return out, mask

    return run


def eager_fake_quant_forward(spec: QuantSpec, clipped: bool, per_slice: bool = False) -> FakeQuantForward:
    """:func:`fake_quant_forward` for one spec; ``per_slice``: over the leading dimension's slices."""
    forward = functools.partial(fake_quant_forward, spec=spec, clipped=clipped)
    return _in_slice_batches(forward, clipped) if per_slice else forward


@functools.cache
def compiled_fake_quant_forward(spec: QuantSpec, clipped: bool, per_slice: bool) -> FakeQuantForward:
    """:func:`fake_quant_forward` for one spec, compiled once per process, unchecked: what the
    tests and ``bench/quant_compile.py`` compare with eager (training uses
    :func:`checked_fake_quant_forward`).

    Shapes: every format groups along the last dimension only, so ``x`` goes in as a
    [rows, features] view, rows dynamic (batch x sequence varies) and features static.  A
    symbolic feature size would make the group reshape symbolic too, and inductor's CPU code
    for it is ~20x slower than the static one (measured on an INT4 g64 [1536, 576] weight:
    7.5 ms vs 0.37 ms; eager 1.2 ms).  Each spec gets a function with its *own* code object:
    dynamo keeps graphs per code object and stops compiling one after ``recompile_limit`` (8)
    variants, after which it runs eager without failing.  ``per_slice`` (see :func:`over_slices`):
    ``x`` goes in as [slices, rows, features], the rows of each slice dynamic."""
    def forward(x: Tensor, amax: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        return fake_quant_forward(x, amax, spec=spec, clipped=clipped)

    traced = over_slices(forward, clipped) if per_slice else forward
    traced.__code__ = traced.__code__.replace(co_name=_name(spec, clipped, per_slice))
    compiled = torch.compile(traced, options=_eager_division())
    leading = 1 if per_slice else 0

    def run(x: Tensor, amax: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        # Detached: dynamo guards on requires_grad, and a weight (trains), an activation (trains
        # or is evaluated) and a frozen tensor would each need a graph of their own per dtype
        # and feature size, past the limit of 8.  The straight-through backward is the caller's.
        rows = x.detach().reshape(*x.shape[:leading], -1, x.shape[-1])
        torch._dynamo.maybe_mark_dynamic(rows, leading)
        torch._dynamo.mark_static(rows, leading + 1)
        out, mask = compiled(rows, None if amax is None else amax.detach())
        return out.reshape(x.shape), (None if mask is None else mask.reshape(x.shape))

    return run


@functools.cache
def checked_fake_quant_forward(spec: QuantSpec, clipped: bool, per_slice: bool) -> FakeQuantForward:
    """The compiled forward, checked against eager on its first tensor per (device, dtype,
    feature size) -- each feature size is a graph of its own, with its own generated code;
    where any value (or clip-mask entry) differs it logs an error and runs eager from then on.
    (No defaults here or in :func:`compiled_fake_quant_forward`: ``functools.cache`` would
    keep ``f(s, c)`` and ``f(s, c, False)`` apart, two compiled copies of one forward.)"""
    compiled = compiled_fake_quant_forward(spec, clipped, per_slice)
    eager = eager_fake_quant_forward(spec, clipped, per_slice)
    agrees: dict[tuple[str, torch.dtype, int], bool] = {}

    def run(x: Tensor, amax: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        key = (x.device.type, x.dtype, x.shape[-1])
        if agrees.get(key) is False:
            return eager(x, amax)
        out, mask = compiled(x, amax)
        if key not in agrees:
            want, want_mask = eager(x, amax)
            same = (out == want) | (out.isnan() & want.isnan())
            differ = int((~same).sum()) + (0 if mask is None else int((mask != want_mask).sum()))
            agrees[key] = differ == 0
            if differ:
                log.error("quant.compile: the compiled %s fake-quant differs from eager on %s %s, %d features "
                          "(%d of %d values); these tensors run eager (slower, the same bits export writes)",
                          _name(spec, clipped, per_slice), *key, differ, x.numel())
                return want, want_mask
        return out, mask

    return run


def _name(spec: QuantSpec, clipped: bool, per_slice: bool) -> str:
    """A readable name, unique per spec: dynamo keys its automatic-dynamic state by code name
    (and file and line), so two specs sharing a name share it -- after INT4 then INT2, torch
    2.11 traced ``bits`` as a symbol and failed on ``1 << (bits - 1)``."""
    tag = zlib.crc32(repr(spec).encode())
    return (f"fake_quant_{spec.kind.value}{spec.bits}_{spec.granularity.value}"
            f"{'_clipped' if clipped else ''}{'_per_slice' if per_slice else ''}_{tag:08x}")


def forward_for(spec: QuantSpec, clipped: bool, mode: Compile, device: torch.device,
                per_slice: bool = False) -> FakeQuantForward:
    """The fake-quant forward ``mode`` asks for on ``device`` (auto: compiled on CUDA)."""
    if mode == "on" or (mode == "auto" and device.type == "cuda"):
        return checked_fake_quant_forward(spec, clipped, per_slice)
    return eager_fake_quant_forward(spec, clipped, per_slice)
