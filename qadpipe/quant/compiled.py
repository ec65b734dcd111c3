"""The fake-quant forward, eager or through ``torch.compile``, with the same bits either way.

Eager fake-quantization is a dozen elementwise kernels per tensor (scale, divide, round,
clamp, cast, multiply ...), each reading and writing the whole weight or activation; on a GPU
that, not the matmul, is what makes a W4A4 step slow.  Inductor fuses them into one or two
kernels.  Training must still round exactly as export packs, so the compiled path is only
used because it returns the *same* values as the eager one (``tests/quant/test_compiled.py``
checks every preset's formats on random and adversarial tensors):

* ``emulate_precision_casts``: by default inductor keeps low-precision intermediates in fp32
  and drops a round trip such as ``scale.to(bfloat16).float()`` -- the stored-scale rounding
  every INT format depends on.  Measured without it on a SmolLM2 MLP weight: 0.3% of the
  INT4 codes off by one.  With it inductor rounds where eager rounds.
* ``dynamic=True``: one graph per format serves every weight and activation shape, so a
  model's many shapes do not exhaust dynamo's recompile limit (past which it would fall back
  to eager without saying so).

``quant.compile: auto`` compiles on CUDA only: on a CPU the compile time (tens of seconds
per format) outweighs what a short run saves.
"""

from __future__ import annotations

import functools
from typing import Callable, Literal, Optional

import torch
from torch import Tensor

from qadpipe.quant.formats import QuantSpec, dequantize, inside_range, quantize

Compile = Literal["auto", "on", "off"]

FakeQuantForward = Callable[[Tensor, Optional[Tensor]], tuple[Tensor, Optional[Tensor]]]


def fake_quant_forward(x: Tensor, amax: Optional[Tensor], *, spec: QuantSpec,
                       clipped: bool) -> tuple[Tensor, Optional[Tensor]]:
    """``(dequantize(quantize(x)), mask of the unclipped elements or None)``."""
    q = quantize(x, spec, amax=amax)
    return dequantize(q), (inside_range(x, q) if clipped else None)


@functools.cache
def compiled_fake_quant_forward(spec: QuantSpec, clipped: bool) -> FakeQuantForward:
    """:func:`fake_quant_forward` for one spec, compiled once per process.

    Each spec gets a function with its *own* code object: dynamo keeps compiled graphs per
    code object and stops compiling one after ``recompile_limit`` (8) variants -- with one
    shared wrapper the ninth spec would silently run eager."""
    def forward(x: Tensor, amax: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        return fake_quant_forward(x, amax, spec=spec, clipped=clipped)

    name = f"fake_quant_{spec.kind.value}_{spec.granularity.value}{'_clipped' if clipped else ''}"
    forward.__code__ = forward.__code__.replace(co_name=name)
    return torch.compile(forward, dynamic=True, options={"emulate_precision_casts": True})


def forward_for(spec: QuantSpec, clipped: bool, mode: Compile, device: torch.device) -> FakeQuantForward:
    """The fake-quant forward ``mode`` asks for on ``device`` (auto: compiled on CUDA)."""
    if mode == "on" or (mode == "auto" and device.type == "cuda"):
        return compiled_fake_quant_forward(spec, clipped)
    return functools.partial(fake_quant_forward, spec=spec, clipped=clipped)
