"""How close a student is to its teacher, measured on the full vocabulary.

The figures every QAD report needs, accumulated chunk by chunk of positions (the caller
computes each chunk's logits from hidden states, so no ``[batch, seq, vocab]`` tensor exists):

* KL(teacher ‖ student) per position, in nats (the forward KL QAD minimises);
* top-1 agreement: how often the student's argmax equals the teacher's;
* the student's negative log-likelihood of the data's actual next tokens (→ perplexity).

Logits at position t are the distribution of token t+1; only scored positions are passed
(padding and undistilled prompt positions excluded).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qadpipe.distill.losses import full_kl


@dataclass
class AgreementTotals:
    """Running sums; ``result()`` turns them into per-token means."""

    positions: int = 0
    kl_sum: float = 0.0
    top1_matches: int = 0
    nll_sum: float = 0.0
    nll_positions: int = 0

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor,
               next_tokens: torch.Tensor | None) -> None:
        """Add positions: logits ``[N, V]`` (any float dtype; the caller bounds ``N``, since
        both are taken to fp32 here), ``next_tokens`` ``[N]`` or None (no perplexity, e.g.
        random-token data)."""
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} vs student "
                             f"{tuple(student_logits.shape)}: vocabularies or lengths differ")
        teacher_lp = torch.log_softmax(teacher_logits.float(), dim=-1)
        student_lp = torch.log_softmax(student_logits.float(), dim=-1)
        kl = full_kl(student_lp, teacher_lp)
        self.kl_sum += float(kl.double().sum())
        self.top1_matches += int((teacher_lp.argmax(-1) == student_lp.argmax(-1)).sum())
        self.positions += int(teacher_lp.shape[0])
        if next_tokens is not None:
            nll = -student_lp.gather(-1, next_tokens.unsqueeze(-1)).squeeze(-1)
            self.nll_sum += float(nll.double().sum())
            self.nll_positions += int(next_tokens.numel())

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
            out["ppl"] = perplexity(nll)
        return out


#: exp() of a mean NLL above ~709 overflows fp64: a broken student's perplexity is capped here,
#: so its report is still written (and JSON can carry the number).
MAX_LOG_PERPLEXITY = 700.0


def perplexity(mean_nll: float) -> float:
    return math.exp(min(mean_nll, MAX_LOG_PERPLEXITY))
