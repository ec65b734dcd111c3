"""What the teacher said about one token sequence: the contract between stage one
(teacher backends), the cache (which stores it) and stage two (which trains on it).

Alignment, the one thing every consumer must agree on: target row ``j`` describes the
teacher's distribution of token ``input_ids[target_start + j + 1]`` given the tokens
``input_ids[: target_start + j + 1]``.  A sequence of ``T`` tokens has at most ``T - 1``
target rows; ``target_start > 0`` leaves a prompt undistilled.

Log-probs are the teacher's *raw* distribution (temperature 1, no sampling filters).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np


#: ``sample_ids`` entry for a draw that landed outside the teacher's captured top-K set.
TAIL_ID = -1


@dataclass
class SequenceTargets:
    """Teacher targets for one sequence, as numpy arrays (no per-entry Python objects).

    Exactly one of the two target kinds is present:

    * top-k: ``topk_ids`` int32 ``[n, k]`` and ``topk_logprobs`` float32 ``[n, k]``, sorted by
      descending log-prob, plus ``tail_mass`` float64 ``[n]`` = 1 − Σ exp(topk_logprobs),
      computed in float64 from the teacher's fp32 log-probs and clamped to ``[0, 1]``.
    * sampled: ``sample_offsets`` int64 ``[n + 1]``, ``sample_ids`` int32 ``[total]`` and
      ``sample_counts`` int32 ``[total]`` — row ``j`` drew ``sample_ids[o_j:o_{j+1}]`` with those
      counts, which sum to ``num_samples`` (the draws per position, recorded with the cache).
      A draw that fell in the mass outside the captured top-K (possible when sampling from a
      top-K ∪ tail distribution, as the vLLM backend does) is recorded as :data:`TAIL_ID`.
    """

    id: str
    input_ids: np.ndarray
    target_start: int
    topk_ids: Optional[np.ndarray] = None
    topk_logprobs: Optional[np.ndarray] = None
    tail_mass: Optional[np.ndarray] = None
    sample_offsets: Optional[np.ndarray] = None
    sample_ids: Optional[np.ndarray] = None
    sample_counts: Optional[np.ndarray] = None

    @property
    def num_target_rows(self) -> int:
        return int(self.input_ids.shape[0]) - 1 - self.target_start

    @property
    def kind(self) -> str:
        return "topk" if self.topk_ids is not None else "sampled"

    def owned(self) -> "SequenceTargets":
        """This row with arrays of its own.  A decoded row's arrays are views into its whole
        record batch's, so a row held in a shuffle buffer kept the batch alive: 2.6x the held
        rows' bytes at a buffer of 256 (a scale review)."""
        return dataclasses.replace(self, **{field.name: np.array(value) for field in dataclasses.fields(self)
                                            if isinstance(value := getattr(self, field.name), np.ndarray)})


def tail_mass_from_logprobs(topk_logprobs: np.ndarray) -> np.ndarray:
    """1 − Σ_k exp(lp) per row, in float64, clamped to [0, 1] (fp32 sums can overshoot 1)."""
    mass = np.exp(topk_logprobs.astype(np.float64)).sum(axis=-1)
    return np.clip(1.0 - mass, 0.0, 1.0)
