"""Ternary weight quantizers (AngelSlim's special list): codes in {-1, 0, +1} times one scale
per group (or channel, or tensor).  Each is a pure function of the group's weights ``x``
(a slice of the last dimension, ``n`` elements).

* TWN -- Ternary Weight Networks (Li, Zhang & Liu 2016, arXiv:1605.04711):
  ``delta = 0.7 * mean|x|``, the paper's rule of thumb between the thresholds it derives
  for uniform (2/3) and Gaussian (3/4) weights, and the one TWN implementations use;
  ``t = sign(x) * [|x| > delta]``;
  ``alpha = mean(|x| over t != 0)``; ``W = alpha * t``.
* ABSMEAN -- BitNet b1.58 (Ma et al. 2024, arXiv:2402.17764, eq. 1-3):
  ``gamma = mean|x|``; ``t = clamp(round(x / gamma), -1, 1)``; ``W = gamma * t``.
  The paper divides by ``gamma + eps``; here by the stored (bf16) gamma, whose zero is
  replaced by bf16's eps, so the codes are exactly what the exported scale reproduces.
* SHERRY -- N:M sparse ternary (AngelSlim ``special_quantizer.py``, method ``sherry``):
  in every run of M consecutive weights keep the N largest |x| (3:4 by default, about 1.25
  bits a weight); ``t = sign(x) * keep``; ``alpha = sum|x * keep| / (n * N / M)`` (the mean
  magnitude of the kept weights); ``W = alpha * t``.

All scales are rounded to bf16 (the export dtype) before use.  LSQ (learned step size) lives
with the other integer formats in :mod:`qadpipe.quant.formats` and its learnable step in
:mod:`qadpipe.quant.quantizers`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qadpipe.quant.formats import Kind, QuantSpec, _store


def ternary_codes(xg: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """``xg``: fp32 ``[..., G, n]`` groups -> (int8 codes like ``xg``, bf16 scale ``[..., G, 1]``)."""
    magnitude = xg.abs()
    if spec.kind is Kind.TWN:
        keep = magnitude > 0.7 * _mean(magnitude, xg.shape[-1])
        count = keep.sum(-1, keepdim=True).clamp(min=1)
        scale = _store(_mean(magnitude * keep, count), spec.scale_dtype)
        codes = torch.sign(xg) * keep
    elif spec.kind is Kind.ABSMEAN:
        scale = _store(_mean(magnitude, xg.shape[-1]), spec.scale_dtype)
        codes = torch.round(xg / scale.float()).clamp(-1, 1)
    elif spec.kind is Kind.SHERRY:
        keep = _n_of_m_mask(magnitude, *spec.sparsity)
        n_keep, m = spec.sparsity
        scale = _store(_mean(magnitude * keep, xg.shape[-1] * n_keep / m), spec.scale_dtype)
        codes = torch.sign(xg) * keep
    else:
        raise ValueError(f"ternary_codes: {spec.kind} is not a ternary kind")
    return codes.to(torch.int8), scale


def _mean(values: Tensor, count: Tensor | float) -> Tensor:
    """Sum of the last dimension over ``count``, in fp64: an fp32 sum depends on the order it
    is taken in, which differs between CPU and CUDA (and between kernels), and near a bf16
    rounding boundary that changed the stored scale -- a student trained on one device and
    exported on the other got another.  fp64's error is far below a bf16 step."""
    return values.sum(-1, keepdim=True, dtype=torch.float64) / count


def _n_of_m_mask(magnitude: Tensor, n: int, m: int) -> Tensor:
    """True for the ``n`` largest of every ``m`` consecutive elements of the last dimension,
    ties broken by position, lowest index first.  A stable sort, not ``topk``: topk's order
    among equal values is unspecified and differs between CPU and CUDA, and bf16 weights tie
    at the boundary in a fifth of SmolLM2's runs -- a student trained on CUDA and exported on
    the CPU would drop a different weight than it was trained without."""
    runs = magnitude.unflatten(-1, (magnitude.shape[-1] // m, m))
    top = runs.argsort(dim=-1, descending=True, stable=True)[..., :n]
    mask = torch.zeros_like(runs, dtype=torch.bool).scatter_(-1, top, True)
    return mask.flatten(-2)
