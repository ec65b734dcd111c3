"""compare_to_teacher on a tiny model: padding never changes a figure, identity agrees fully."""

from __future__ import annotations

import copy
import math

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


def _teacher_rows(teacher, sequences, start, k):
    """Cache rows as stage one would write them: exact top-k of the teacher + float64 tail."""
    import numpy as np

    from qadpipe.targets import SequenceTargets, tail_mass_from_logprobs

    rows = []
    for i, seq in enumerate(sequences):
        with torch.no_grad():
            logp = torch.log_softmax(teacher(input_ids=torch.tensor([seq])).logits[0].float(), -1)
        lp, ids = logp[start:len(seq) - 1].topk(k, dim=-1)
        rows.append(SequenceTargets(id=f"r{i}", input_ids=np.asarray(seq, np.int32), target_start=start,
                                    topk_ids=ids.numpy().astype(np.int32), topk_logprobs=lp.numpy(),
                                    tail_mass=tail_mass_from_logprobs(lp.numpy())))
    return rows


def test_cache_rows_score_only_targets_and_add_the_tail_bucket_kl(models):
    teacher, student = models
    sequences = [list(range(100, 130)), list(range(200, 221))]
    rows = _teacher_rows(teacher, sequences, start=3, k=16)
    result = compare_to_teacher(teacher, {"noisy": student}, sequences, pad_id=0, cache_rows=rows, batch_size=2)
    assert result["noisy"]["positions"] == sum(r.num_target_rows for r in rows) == 26 + 17
    assert result["teacher"]["tail_kl"] == pytest.approx(0.0, abs=1e-6)  # its own top-k + exact tail
    # Independent reference, one position at a time in float64: KL over the k+1 buckets S ∪ {tail}.
    total, count = 0.0, 0
    for seq, row in zip(sequences, rows):
        with torch.no_grad():
            logp = torch.log_softmax(student(input_ids=torch.tensor([seq])).logits[0].double(), -1)
        for j in range(row.num_target_rows):
            t = torch.from_numpy(row.topk_logprobs[j]).double().exp()
            p = logp[row.target_start + j, torch.from_numpy(row.topk_ids[j]).long()].exp()
            t_tail, p_tail = float(row.tail_mass[j]), 1.0 - float(p.sum())
            total += float((t * (t / p).log()).sum()) + t_tail * math.log(t_tail / p_tail)
            count += 1
    assert result["noisy"]["tail_kl"] == pytest.approx(total / count, rel=1e-3)
    assert 0 < result["noisy"]["tail_kl"] <= result["noisy"]["kl"] + 1e-6  # coarsening never adds KL


def test_small_chunks_give_the_same_figures_without_any_whole_batch_logits(models, monkeypatch):
    """The LM head runs on chunks of scored positions; the models' own forward (which would
    return [batch, seq, vocab] logits) is never called."""
    teacher, student = models
    sequences = [list(range(100, 130)), list(range(200, 221)), list(range(300, 305))]
    rows = _teacher_rows(teacher, sequences, start=2, k=8)
    reference = compare_to_teacher(teacher, {"noisy": student}, sequences, pad_id=0, cache_rows=rows, batch_size=3)
    monkeypatch.setattr(type(teacher), "forward", lambda *args, **kwargs: pytest.fail("whole-batch logits"))
    chunked = compare_to_teacher(teacher, {"noisy": student}, sequences, pad_id=0, cache_rows=rows, batch_size=3,
                                 chunk_tokens=7)
    for name in reference:   # abs: the teacher's KL to itself is rounding noise (~1e-11) either way
        assert chunked[name] == pytest.approx(reference[name], rel=1e-6, abs=1e-9), name
    assert chunked["noisy"]["positions"] == 27 + 18 + 2


def test_each_sequence_keeps_its_own_start_in_every_batch(models):
    """starts[i] belongs to sequence i whatever batch it lands in (eval.data with
    generate.include_prompt=false gives every record its own start).  Against a float64
    reference, one full forward per sequence, scoring positions start..len-2 by hand."""
    teacher, student = models
    sequences = [list(range(100, 130)), list(range(200, 212)), list(range(300, 321)), list(range(400, 409))]
    starts = [0, 7, 3, 5]
    kl_sum, matches, nll_sum, count = 0.0, 0, 0.0, 0
    for seq, start in zip(sequences, starts):
        with torch.no_grad():
            t = torch.log_softmax(teacher(input_ids=torch.tensor([seq])).logits[0].double(), -1)
            s = torch.log_softmax(student(input_ids=torch.tensor([seq])).logits[0].double(), -1)
        for pos in range(start, len(seq) - 1):
            kl_sum += float((t[pos].exp() * (t[pos] - s[pos])).sum())
            matches += int(t[pos].argmax() == s[pos].argmax())
            nll_sum += -float(s[pos, seq[pos + 1]])
            count += 1
    assert count == 29 + 4 + 17 + 3
    for batch_size in (1, 3, 4):
        result = compare_to_teacher(teacher, {"noisy": student}, sequences, pad_id=0, starts=starts,
                                    batch_size=batch_size)["noisy"]
        assert result["positions"] == count, batch_size
        assert result["kl"] == pytest.approx(kl_sum / count, rel=1e-4), batch_size
        assert result["top1_agreement"] == matches / count, batch_size
        assert result["nll"] == pytest.approx(nll_sum / count, rel=1e-5), batch_size
