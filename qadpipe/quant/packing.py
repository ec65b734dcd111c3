"""Bit packing in the layouts compressed-tensors writes and vLLM reads.

* ``pack-quantized`` integers: ``32 // bits`` codes per int32 word, element ``i`` at bits
  ``bits * (i % per_word)`` of word ``i // per_word`` (LSB first), stored as the unsigned
  offset ``code + 2**(bits-1)``; rows padded with zeros to a whole word.  The weight is
  packed along dim 1 (in-features), an asymmetric zero point along dim 0.
* FP4 (E2M1): two nibbles per uint8, element ``2j`` in the LOW nibble, ``2j+1`` in the high
  one; nibble = ``sign << 3 | index`` into ``E2M1_GRID`` (this is the E2M1 bit pattern).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qadpipe.quant.constants import E2M1_GRID


def pack_int32(codes: Tensor, bits: int, dim: int = 1) -> Tensor:
    """Pack signed integer ``codes`` (2-D, values in ``[-2**(bits-1), 2**(bits-1))``) into int32
    words along ``dim`` (1: rows of a weight, 0: columns, as CT packs zero points)."""
    if codes.ndim != 2 or dim not in (0, 1):
        raise ValueError(f"pack_int32 expects a 2-D tensor and dim 0 or 1, got {tuple(codes.shape)}, dim={dim}")
    if bits not in (2, 4, 8):
        raise ValueError(f"pack_int32: bits must be 2, 4 or 8, got {bits}")
    per_word = 32 // bits
    unsigned = (codes.to(torch.int32) + (1 << (bits - 1)))
    if dim == 0:
        unsigned = unsigned.t()
    rows, cols = unsigned.shape
    padded = math.ceil(cols / per_word) * per_word
    unsigned = torch.nn.functional.pad(unsigned, (0, padded - cols))
    shifts = torch.arange(per_word, dtype=torch.int64, device=codes.device) * bits
    words = (unsigned.view(rows, padded // per_word, per_word).to(torch.int64) << shifts).sum(-1)
    # two's-complement wrap of the 32-bit pattern into int32
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.t().contiguous() if dim == 0 else words


def unpack_int32(words: Tensor, bits: int, shape: tuple[int, int], dim: int = 1) -> Tensor:
    """Inverse of :func:`pack_int32`: int8 codes of the given unpacked ``shape``."""
    per_word = 32 // bits
    mask = (1 << bits) - 1
    w = words.t() if dim == 0 else words
    shifts = torch.arange(per_word, dtype=torch.int64, device=words.device) * bits
    fields = (w.to(torch.int64).unsqueeze(-1) >> shifts) & mask
    unpacked = fields.reshape(w.shape[0], -1)
    length = shape[0] if dim == 0 else shape[1]
    codes = (unpacked[:, :length] - (1 << (bits - 1))).to(torch.int8)
    return codes.t().contiguous() if dim == 0 else codes


def e2m1_to_nibble(values: Tensor) -> Tensor:
    """E2M1 values (exactly on the grid, any float dtype) -> uint8 nibbles ``sign<<3 | index``."""
    a = values.float().abs()
    index = torch.where(a < 2, a * 2, torch.where(a <= 4, a + 2, torch.full_like(a, 7)))
    return (index.to(torch.uint8) | (torch.signbit(values).to(torch.uint8) << 3))


def nibble_to_e2m1(nibbles: Tensor) -> Tensor:
    """uint8 nibbles -> E2M1 values as float32 (negative zero kept as -0.0)."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=nibbles.device)
    magnitude = grid[(nibbles & 0x7).long()]
    return torch.where((nibbles & 0x8) != 0, -magnitude, magnitude)


def pack_fp4(values: Tensor) -> Tensor:
    """E2M1 values ``[..., K]`` (K even) -> uint8 ``[..., K/2]``, even element in the low nibble."""
    if values.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dimension, got {tuple(values.shape)}")
    nib = e2m1_to_nibble(values)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_fp4(packed: Tensor) -> Tensor:
    """uint8 ``[..., K/2]`` -> E2M1 values ``[..., K]`` as float32."""
    low = packed & 0x0F
    high = packed >> 4
    return nibble_to_e2m1(torch.stack((low, high), dim=-1).flatten(-2))
