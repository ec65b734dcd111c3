"""Score several students against one teacher on the same held-out token sequences.

The teacher runs once per batch and its logits are reused for every student, so adding a
model to the comparison costs one student forward, not two.  Each model's base runs to the
final hidden states; the LM head then runs on ``chunk_tokens`` scored positions at a time,
since a batch's ``[batch, seq, vocab]`` fp32 logits would be 30 GB for 4 × 12k tokens at a
150k vocabulary, per model.  When the sequences come from a
cache, each model is also scored against the cached targets with the tail-bucket KL the
trainer optimized, so "what training saw" and "what the full teacher says" sit side by side.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from qadpipe.distill.head_loss import split_lm
from qadpipe.distill.losses import forward_kl_tail
from qadpipe.eval.metrics import AgreementTotals
from qadpipe.models import logit_transform
from qadpipe.targets import SequenceTargets

log = logging.getLogger(__name__)


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int,
              starts: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad token sequences; ``score_mask`` marks positions whose next token exists and
    that lie at or after the sequence's start (a prompt the teacher did not write is skipped)."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention[row, : len(seq)] = 1
    next_tokens = torch.roll(input_ids, shifts=-1, dims=1)
    score_mask = attention.bool() & torch.roll(attention, shifts=-1, dims=1).bool()
    score_mask[:, -1] = False
    if starts is not None:
        score_mask &= torch.arange(length)[None, :] >= torch.as_tensor(starts)[:, None]
    return {"input_ids": input_ids, "attention_mask": attention, "next_tokens": next_tokens,
            "score_mask": score_mask}


class CachedTargets:
    """The cached top-k targets of one batch's rows, in scored-position order.

    The scored positions, read row-major, are exactly the rows' target rows in order (the
    caller builds the score mask from each row's ``target_start``)."""

    def __init__(self, rows: Sequence[SequenceTargets], positions: int, device: torch.device | str) -> None:
        self.ids = torch.from_numpy(np.concatenate([r.topk_ids for r in rows])).long().to(device)
        if self.ids.shape[0] != positions:
            raise ValueError(f"{positions} scored positions vs {self.ids.shape[0]} cached target rows")
        self.logprobs = torch.from_numpy(np.concatenate([r.topk_logprobs for r in rows])).float().to(device)
        self.tail = torch.from_numpy(np.concatenate([r.tail_mass for r in rows])).to(device)

    def tail_kl_sum(self, logits: torch.Tensor, start: int) -> float:
        """Σ of the tail-bucket KL(cached top-k ‖ model) over positions ``start:start + len(logits)``."""
        stop = start + logits.shape[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        kl = forward_kl_tail(logp, self.ids[start:stop], self.logprobs[start:stop], self.tail[start:stop])
        return float(kl.double().sum())


def _base_and_logits(model: torch.nn.Module) -> tuple[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """(base returning hidden states, logits of hidden states: the LM head and the
    architecture's transform after it)."""
    base, head = split_lm(model)
    transform = logit_transform(model.config)
    return base, lambda hidden: transform(head(hidden))


def scored_hidden(base: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The final hidden states ``[N, D]`` of a model's base (see ``split_lm``) at the batch's
    scored positions (row-major)."""
    hidden = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  use_cache=False).last_hidden_state
    return hidden[batch["score_mask"]]


@torch.no_grad()
def compare_to_teacher(
    teacher: torch.nn.Module,
    students: Mapping[str, torch.nn.Module],
    sequences: Sequence[Sequence[int]],
    *,
    pad_id: int,
    starts: Sequence[int] | None = None,
    cache_rows: Sequence[SequenceTargets] | None = None,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    with_perplexity: bool = True,
    chunk_tokens: int = 1024,
) -> dict[str, dict[str, float]]:
    """KL(teacher‖student), top-1 agreement and (optionally) perplexity for each student,
    plus the teacher's own figures under ``"teacher"``.

    ``starts[i]``: first scored position of sequence i (default 0).  ``cache_rows``: the
    cached targets of the same sequences (top-k caches); adds ``tail_kl`` to every model.
    Logits exist for ``chunk_tokens`` positions at a time, never for a whole batch."""
    if cache_rows is not None and starts is None:
        starts = [row.target_start for row in cache_rows]
    parts = {name: _base_and_logits(model) for name, model in {"teacher": teacher, **students}.items()}
    totals = {name: AgreementTotals() for name in parts}
    tail_sums = {name: 0.0 for name in totals}
    batches: Iterable[int] = range(0, len(sequences), batch_size)
    started, tokens = time.perf_counter(), 0
    for start in tqdm(batches, desc="eval", unit="batch", leave=False):
        stop = start + batch_size
        batch = {k: v.to(device) for k, v in
                 pad_batch(sequences[start:stop], pad_id, None if starts is None else starts[start:stop]).items()}
        hidden = {name: scored_hidden(base, batch) for name, (base, _) in parts.items()}
        positions = hidden["teacher"].shape[0]
        next_tokens = batch["next_tokens"][batch["score_mask"]] if with_perplexity else None
        cached = CachedTargets(cache_rows[start:stop], positions, device) if cache_rows is not None else None
        for first in range(0, positions, chunk_tokens):
            last = first + chunk_tokens
            teacher_logits = parts["teacher"][1](hidden["teacher"][first:last])
            for name, (_, head) in parts.items():
                logits = teacher_logits if name == "teacher" else head(hidden[name][first:last])
                totals[name].update(teacher_logits, logits, None if next_tokens is None else next_tokens[first:last])
                if cached is not None:
                    tail_sums[name] += cached.tail_kl_sum(logits, first)
        tokens += positions
    elapsed = time.perf_counter() - started
    log.info("eval: %d positions x %d models in %.1fs (%.0f positions/s)", tokens, len(totals), elapsed,
             tokens * len(totals) / max(elapsed, 1e-9))
    results = {name: total.result() for name, total in totals.items()}
    if cache_rows is not None:
        for name, result in results.items():
            result["tail_kl"] = tail_sums[name] / result["positions"]
    return results
