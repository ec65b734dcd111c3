"""Sampled targets (Sparse Logit Sampling): N draws per position, stored as ids + counts.

Draws are inverse-CDF lookups of uniforms from a numpy generator seeded by (seed,
sequence id), so a sequence gets the same draws whichever batch, task or rerun scores it
(resume must reproduce a cache exactly).
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import torch

from qadpipe.errors import TeacherError


def sequence_seed(seed: int, sequence_id: str) -> int:
    """A 63-bit seed that depends only on the run seed and the sequence id."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{sequence_id}".encode()).digest()[:8], "little") >> 1


def draw_indices(probs: torch.Tensor, uniforms: np.ndarray,
                 where: Callable[[int], str] = lambda row: f"target row {row}") -> np.ndarray:
    """One draw per column of ``uniforms`` ``[n, N]`` (values in [0, 1)) from each row of
    ``probs`` ``[n, m]`` (non-negative, rows summing to ~1): int64 column indices ``[n, N]``.

    The CDF is built in float64 and the uniforms are scaled by each row's total, so rounding
    in the row sums never skews the last bucket; a zero-probability column is never drawn.
    A row with NaN/inf or no mass is refused (``where(row)`` names it): its lookups would all
    run off the end and be stored as N draws of the last column, a target nothing flags.
    """
    cdf = torch.cumsum(probs.to(torch.float64), dim=-1)
    usable = torch.isfinite(cdf[:, -1]) & (cdf[:, -1] > 0)
    if not bool(usable.all()):
        row = int((~usable).nonzero()[0])
        raise TeacherError(f"{where(row)}: the teacher's probabilities are NaN/inf or all zero (its logits are not "
                           "finite); no sampled target can be drawn from them")
    scaled = torch.from_numpy(np.ascontiguousarray(uniforms, dtype=np.float64)).to(cdf.device) * cdf[:, -1:]
    index = torch.searchsorted(cdf, scaled, right=True)
    return index.clamp_(max=probs.shape[1] - 1).cpu().numpy()


def counts_by_row(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws ``[n, N]`` -> (offsets int64 ``[n+1]``, unique values ``[total]``, counts int32
    ``[total]``), values ascending within each row; no Python loop over rows."""
    n, width = draws.shape
    ordered = np.sort(draws, axis=1)
    new = np.ones_like(ordered, dtype=bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    starts = np.flatnonzero(new.ravel())
    counts = np.diff(np.append(starts, n * width)).astype(np.int32)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(new.sum(axis=1), out=offsets[1:])
    return offsets, ordered.ravel()[starts], counts
