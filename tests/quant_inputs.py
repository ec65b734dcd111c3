"""Random and adversarial tensors for the quant tests (``tests/`` is on ``sys.path``)."""

from __future__ import annotations

import zlib

import torch

#: The token conftest's make_llama(loud_token=LOUD_TOKEN) makes ~100x louder than any other; the
#: calibration tests put it only at padded positions.
LOUD_TOKEN = 255


def adversarial(kind: str, rows: int = 8, cols: int = 256) -> torch.Tensor:
    """A [rows, cols] fp32 tensor of the named kind, the same in every run (crc32 seed, not
    ``hash()``, which Python salts per process)."""
    torch.manual_seed(zlib.crc32(kind.encode()))
    x = torch.randn(rows, cols)
    if kind == "zeros":
        return torch.zeros(rows, cols)
    if kind == "outlier_per_block":         # one huge value in every block of 16
        x = x * 0.01
        x[:, ::16] = 1e4 * torch.sign(torch.randn(rows, cols // 16))
    elif kind == "denormal_blocks":         # blocks far below the tensor max (scales underflow)
        x[:, :64] *= 1e-9
        x[:, 64:128] = torch.randn(rows, 64) * 1e-40     # fp32 subnormals
    elif kind == "zero_blocks":
        x[:, 32:96] = 0.0
    elif kind == "ties":                    # many values exactly on half-steps
        x = torch.randint(-30, 31, (rows, cols)).float() / 4
    elif kind == "wide_range":
        x = x * torch.logspace(-6, 6, cols)
    return x


ADVERSARIAL = ["random", "zeros", "outlier_per_block", "denormal_blocks", "zero_blocks", "ties", "wide_range"]
