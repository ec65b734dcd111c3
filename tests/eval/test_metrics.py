"""Agreement metrics against independent references (torch.distributions, F.cross_entropy)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

from qadpipe.eval.metrics import AgreementTotals


def _batch(seed: int, vocab: int = 97):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(3, 11, vocab, generator=gen) * 3
    student = teacher + torch.randn(3, 11, vocab, generator=gen)
    tokens = torch.randint(0, vocab, (3, 11), generator=gen)
    mask = torch.rand(3, 11, generator=gen) > 0.3
    return teacher, student, tokens, mask


def test_matches_reference_over_two_batches_of_positions():
    totals = AgreementTotals()
    refs = {"kl": [], "top1": [], "nll": []}
    for seed in (0, 1):
        teacher, student, tokens, mask = _batch(seed)
        totals.update(teacher.bfloat16()[mask], student.bfloat16()[mask], tokens[mask])
        t, s = teacher.bfloat16().float()[mask], student.bfloat16().float()[mask]
        refs["kl"].append(kl_divergence(Categorical(logits=t), Categorical(logits=s)))
        refs["top1"].append((t.argmax(-1) == s.argmax(-1)).float())
        refs["nll"].append(F.cross_entropy(s, tokens[mask], reduction="none"))
    result = totals.result()
    ref = {k: torch.cat(v).double().mean().item() for k, v in refs.items()}
    assert result["kl"] == pytest.approx(ref["kl"], rel=1e-5)
    assert result["top1_agreement"] == pytest.approx(ref["top1"])
    assert result["nll"] == pytest.approx(ref["nll"], rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(ref["nll"]), rel=1e-5)
    assert result["positions"] == sum(len(v) for v in refs["kl"])


def test_identical_models_agree_perfectly():
    teacher, _, tokens, mask = _batch(2)
    totals = AgreementTotals()
    totals.update(teacher[mask], teacher.clone()[mask], None)
    result = totals.result()
    assert result["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["top1_agreement"] == 1.0
    assert "ppl" not in result  # no next tokens, no perplexity


def test_refuses_mismatched_vocab_and_empty_masks():
    teacher, student, tokens, mask = _batch(3)
    with pytest.raises(ValueError, match="vocabularies or lengths differ"):
        AgreementTotals().update(teacher[mask], student[mask][..., :-1], tokens[mask])
    totals = AgreementTotals()
    none = torch.zeros_like(mask)
    totals.update(teacher[none], student[none], tokens[none])
    with pytest.raises(ValueError, match="no scored positions"):
        totals.result()


def test_a_teacher_masking_tokens_and_a_broken_student_still_give_numbers():
    """A −inf teacher logit (a masked or padded vocabulary) made the KL NaN (0 · −inf); a
    student with a mean NLL above ~709 overflowed exp() and the eval died with no report."""
    teacher = torch.randn(4, 10)
    teacher[:, 7:] = float("-inf")
    student = torch.randn(4, 10)
    student[:, 0] = 900.0                       # every other token ~900 nats away
    tokens = torch.tensor([3, 4, 5, 6])
    totals = AgreementTotals()
    totals.update(teacher, student, tokens)
    result = totals.result()
    t = teacher.softmax(-1).double()
    s = student.log_softmax(-1).double()
    reference = (t[:, :7] * (t[:, :7].log() - s[:, :7])).sum(-1).mean().item()
    assert result["kl"] == pytest.approx(reference, rel=1e-5)
    assert result["nll"] > 800 and result["ppl"] == math.exp(700.0)
