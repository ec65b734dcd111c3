"""compare_to_teacher on a tiny model: padding never changes a figure, identity agrees fully."""

from __future__ import annotations

import copy

import pytest
import torch

from qadpipe.eval.runner import compare_to_teacher, pad_batch
from qadpipe.models import load_causal_lm


@pytest.fixture(scope="module")
def models(tiny_llama_dir):
    teacher = load_causal_lm(str(tiny_llama_dir), dtype="float32")
    student = copy.deepcopy(teacher)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return teacher, student


def test_pad_batch_masks_the_last_real_position():
    batch = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["score_mask"].tolist() == [[True, True, False], [False, False, False]]
    assert batch["next_tokens"][0, :2].tolist() == [6, 7]


def test_batched_equals_one_by_one_and_identity_is_perfect(models):
    teacher, student = models
    sequences = [list(range(100, 130)), list(range(200, 212)), list(range(300, 321))]
    together = compare_to_teacher(teacher, {"copy": teacher, "noisy": student}, sequences, pad_id=0, batch_size=3)
    assert together["copy"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert together["copy"]["top1_agreement"] == 1.0
    assert together["noisy"]["kl"] > 1e-4
    assert together["teacher"]["ppl"] == pytest.approx(together["copy"]["ppl"])

    singles = [compare_to_teacher(teacher, {"noisy": student}, [s], pad_id=0) for s in sequences]
    positions = [r["noisy"]["positions"] for r in singles]
    assert together["noisy"]["positions"] == sum(positions) == 29 + 11 + 20
    mean_kl = sum(r["noisy"]["kl"] * n for r, n in zip(singles, positions)) / sum(positions)
    assert together["noisy"]["kl"] == pytest.approx(mean_kl, rel=1e-4)
