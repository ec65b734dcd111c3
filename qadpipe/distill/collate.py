"""Cache rows -> one padded (or packed) micro-batch of tensors.

Alignment (see :mod:`qadpipe.targets`): target row ``j`` of a sequence describes the token
at ``target_start + j + 1``, so it belongs to input position ``i = target_start + j``.
``target_mask[b, i]`` marks exactly those positions; the flattened targets are in the
row-major order of ``target_mask`` (what ``hidden[target_mask]`` yields), so the student's
hidden states and the teacher's targets line up without any index bookkeeping.

Padding: rows are right-padded; ``attention_mask`` is 0 on padding.  Packing
(``pack_length``): rows are laid end to end into windows of ``pack_length`` tokens and
``position_ids`` restart at 0 for each row; with ``attention_mask=None`` transformers
derives a block-diagonal causal mask from those restarts, so a row never attends to its
neighbour (tests/distill/test_collate.py checks packed logits equal unpacked ones) -- for
models that build their mask through ``masking_utils``; the student and an online teacher
are probed before training and refused otherwise (``check_packed_rows_are_isolated``).

Sampled targets become ``sample_ids`` ``[N, m]`` (−1 padded) and ``sample_weights`` =
count / (draws that named a token).  Draws recorded as :data:`~qadpipe.targets.TAIL_ID`
(mass outside the teacher's captured top-K, whose members a sampled cache does not store)
cannot be attributed to any token and are left out; the weights are renormalized over the
rest.  A position whose draws were all tail draws has no target and is not trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from qadpipe.distill.head_loss import PositionTargets
from qadpipe.errors import DistillError
from qadpipe.targets import TAIL_ID, SequenceTargets


@dataclass
class Batch:
    """One micro-batch: model inputs, the positions that carry targets, and the targets."""

    input_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    position_ids: Optional[torch.Tensor]
    target_mask: torch.Tensor
    targets: PositionTargets
    num_sequences: int
    num_tokens: int

    @property
    def num_positions(self) -> int:
        return len(self.targets)

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for the HF model; ``use_cache=False`` because transformers only
        derives the packed block-diagonal mask when no KV cache is in play."""
        inputs: dict[str, Any] = {"input_ids": self.input_ids, "use_cache": False}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        return inputs

    def to(self, device: torch.device | str) -> "Batch":
        return self._apply(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "Batch":
        """In page-locked host memory, so ``to(cuda)`` copies asynchronously (the loader's
        read-ahead thread pins while the GPU trains)."""
        return self._apply(torch.Tensor.pin_memory)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Batch":
        def each(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return fn(t) if t is not None else None

        targets = PositionTargets(**{k: each(v) for k, v in self.targets.__dict__.items()})
        return Batch(each(self.input_ids), each(self.attention_mask), each(self.position_ids),
                     each(self.target_mask), targets, self.num_sequences, self.num_tokens)


def _layout(rows: Sequence[SequenceTargets], pack_length: Optional[int]) -> list[list[int]]:
    """Which rows share a window: one row each, or first-fit in order into ``pack_length`` windows."""
    if pack_length is None:
        return [[index] for index in range(len(rows))]
    windows: list[list[int]] = []
    used: list[int] = []
    for index, row in enumerate(rows):
        length = len(row.input_ids)
        if length > pack_length:
            raise DistillError(f"cache row {row.id!r} has {length} tokens, more than distill.pack_length="
                               f"{pack_length}; raise pack_length or set it to null (pad instead of pack): --resume takes "
                               "either")
        for window, filled in enumerate(used):
            if filled + length <= pack_length:
                windows[window].append(index)
                used[window] += length
                break
        else:
            windows.append([index])
            used.append(length)
    return windows


def collate(rows: Sequence[SequenceTargets], *, pad_id: int, pack_length: Optional[int] = None,
            with_targets: bool = True) -> Batch:
    """Tensors for ``rows`` (all of one target kind); ``with_targets=False`` keeps only the
    tokens and positions (QAT, online mode, calibration)."""
    if not rows:
        raise ValueError("collate: no rows")
    windows = _layout(rows, pack_length)
    width = pack_length or max(len(row.input_ids) for row in rows)
    shape = (len(windows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention = torch.zeros(shape, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    target_mask = torch.zeros(shape, dtype=torch.bool)
    ordered: list[SequenceTargets] = []
    for b, window in enumerate(windows):
        offset = 0
        for index in window:
            row = rows[index]
            length = len(row.input_ids)
            input_ids[b, offset:offset + length] = torch.from_numpy(row.input_ids.astype(np.int64))
            attention[b, offset:offset + length] = 1
            positions[b, offset:offset + length] = torch.arange(length)
            start = offset + row.target_start
            target_mask[b, start:start + row.num_target_rows] = True
            ordered.append(row)
            offset += length
        if pack_length is not None:  # padding after the last row: its own segment, never scored
            positions[b, offset:] = torch.arange(width - offset)
    next_tokens = torch.roll(input_ids, shifts=-1, dims=1)[target_mask]
    targets = PositionTargets(next_tokens=next_tokens)
    if with_targets:
        _fill_targets(targets, ordered)
        if targets.sample_weights is not None:  # positions whose draws all fell in the tail
            keep = targets.sample_weights.sum(-1) > 0
            if not bool(keep.all()):
                target_mask[target_mask.clone()] = keep
                targets = targets.select(keep)
    packed = pack_length is not None
    # No mask when no row is padded: the causal mask alone is the same attention, and
    # transformers would otherwise check the mask on the GPU (a host sync) every forward.
    unpadded = packed or bool(attention.all())
    return Batch(input_ids, None if unpadded else attention, positions if packed else None, target_mask,
                 targets, len(rows), sum(len(row.input_ids) for row in rows))


def _fill_targets(targets: PositionTargets, rows: Sequence[SequenceTargets]) -> None:
    kinds = {row.kind for row in rows}
    if len(kinds) != 1:
        raise DistillError(f"collate: rows mix target kinds {sorted(kinds)}")
    if kinds == {"topk"}:
        targets.topk_ids = torch.from_numpy(np.concatenate([r.topk_ids for r in rows]).astype(np.int64))
        targets.topk_logprobs = torch.from_numpy(np.concatenate([r.topk_logprobs for r in rows]).astype(np.float32))
        targets.tail_mass = torch.from_numpy(np.concatenate([r.tail_mass for r in rows]).astype(np.float32))
        return
    targets.sample_ids, targets.sample_weights = _sampled_dense(rows)


def _sampled_dense(rows: Sequence[SequenceTargets]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, m]`` ids (−1 padded) and weights = count / non-tail draws, for all target rows."""
    positions, ids, counts, total_rows = [], [], [], 0
    for row in rows:
        n = row.num_target_rows
        positions.append(total_rows + np.repeat(np.arange(n), np.diff(row.sample_offsets)))
        ids.append(row.sample_ids)
        counts.append(row.sample_counts)
        total_rows += n
    pos, entry_ids, entry_counts = (np.concatenate(x) for x in (positions, ids, counts))
    keep = entry_ids != TAIL_ID
    pos, entry_ids, entry_counts = pos[keep], entry_ids[keep], entry_counts[keep].astype(np.float64)
    totals = np.bincount(pos, weights=entry_counts, minlength=total_rows)
    per_row = np.bincount(pos, minlength=total_rows)
    column = np.arange(pos.size) - (np.cumsum(per_row) - per_row)[pos]
    width = max(1, int(per_row.max(initial=0)))
    dense_ids = np.full((total_rows, width), -1, dtype=np.int64)
    dense_weights = np.zeros((total_rows, width), dtype=np.float32)
    dense_ids[pos, column] = entry_ids
    dense_weights[pos, column] = entry_counts / totals[pos]
    return torch.from_numpy(dense_ids), torch.from_numpy(dense_weights)
