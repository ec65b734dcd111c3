"""How close a student is to its teacher, measured on the full vocabulary.

The figures every QAD report needs, accumulated over batches without ever holding more
than one chunk of positions in fp32:

* KL(teacher ‖ student) per position, in nats (the forward KL QAD minimises);
* top-1 agreement: how often the student's argmax equals the teacher's;
* the student's negative log-likelihood of the data's actual next tokens (→ perplexity).

Logits at position t are the distribution of token t+1; ``mask`` marks the positions to
score (padding and undistilled prompt positions excluded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class AgreementTotals:
    """Running sums; ``result()`` turns them into per-token means."""

    positions: int = 0
    kl_sum: float = 0.0
    top1_matches: int = 0
    nll_sum: float = 0.0
    nll_positions: int = 0
    _chunk: int = field(default=1024, repr=False)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor,
               next_tokens: torch.Tensor | None, mask: torch.Tensor) -> None:
        """Add a batch: logits ``[B, T, V]`` (any float dtype), ``next_tokens`` ``[B, T]`` or
        None (no perplexity, e.g. random-token data), ``mask`` ``[B, T]`` bool."""
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} vs student "
                             f"{tuple(student_logits.shape)}: vocabularies or lengths differ")
        selected = mask.reshape(-1).nonzero().squeeze(-1)
        vocab = teacher_logits.shape[-1]
        teacher_flat = teacher_logits.reshape(-1, vocab)
        student_flat = student_logits.reshape(-1, vocab)
        tokens_flat = next_tokens.reshape(-1) if next_tokens is not None else None
        for start in range(0, selected.numel(), self._chunk):
            index = selected[start:start + self._chunk]
            teacher_lp = torch.log_softmax(teacher_flat[index].float(), dim=-1)
            student_lp = torch.log_softmax(student_flat[index].float(), dim=-1)
            kl = (teacher_lp.exp() * (teacher_lp - student_lp)).sum(-1)
            self.kl_sum += float(kl.double().sum())
            self.top1_matches += int((teacher_lp.argmax(-1) == student_lp.argmax(-1)).sum())
            self.positions += int(index.numel())
            if tokens_flat is not None:
                nll = -student_lp.gather(-1, tokens_flat[index].unsqueeze(-1)).squeeze(-1)
                self.nll_sum += float(nll.double().sum())
                self.nll_positions += int(index.numel())

    def result(self) -> dict[str, float]:
        if self.positions == 0:
            raise ValueError("no scored positions: every mask was empty")
        out = {
            "kl": self.kl_sum / self.positions,
            "top1_agreement": self.top1_matches / self.positions,
            "positions": float(self.positions),
        }
        if self.nll_positions:
            nll = self.nll_sum / self.nll_positions
            out["nll"] = nll
            out["ppl"] = math.exp(nll)
        return out
