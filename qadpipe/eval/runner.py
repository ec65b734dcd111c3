"""Score several students against one teacher on the same held-out token sequences.

The teacher runs once per batch and its logits are reused for every student, so adding a
model to the comparison costs one student forward, not two.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, Mapping, Sequence

import torch
from tqdm import tqdm

from qadpipe.eval.metrics import AgreementTotals

log = logging.getLogger(__name__)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token sequences; ``score_mask`` marks positions whose next token exists."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention[row, : len(seq)] = 1
    next_tokens = torch.roll(input_ids, shifts=-1, dims=1)
    score_mask = attention.bool() & torch.roll(attention, shifts=-1, dims=1).bool()
    score_mask[:, -1] = False
    return {"input_ids": input_ids, "attention_mask": attention, "next_tokens": next_tokens,
            "score_mask": score_mask}


@torch.no_grad()
def compare_to_teacher(
    teacher: torch.nn.Module,
    students: Mapping[str, torch.nn.Module],
    sequences: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    with_perplexity: bool = True,
) -> dict[str, dict[str, float]]:
    """KL(teacher‖student), top-1 agreement and (optionally) perplexity for each student,
    plus the teacher's own perplexity under ``"teacher"``."""
    totals = {name: AgreementTotals() for name in ["teacher", *students]}
    batches: Iterable[int] = range(0, len(sequences), batch_size)
    started, tokens = time.perf_counter(), 0
    for start in tqdm(batches, desc="eval", unit="batch", leave=False):
        batch = {k: v.to(device) for k, v in pad_batch(sequences[start:start + batch_size], pad_id).items()}
        next_tokens = batch["next_tokens"] if with_perplexity else None
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        totals["teacher"].update(teacher_logits, teacher_logits, next_tokens, batch["score_mask"])
        for name, student in students.items():
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            totals[name].update(teacher_logits, logits, next_tokens, batch["score_mask"])
        tokens += int(batch["score_mask"].sum())
    elapsed = time.perf_counter() - started
    log.info("eval: %d positions x %d models in %.1fs (%.0f positions/s)", tokens, len(totals), elapsed,
             tokens * len(totals) / max(elapsed, 1e-9))
    return {name: total.result() for name, total in totals.items()}
