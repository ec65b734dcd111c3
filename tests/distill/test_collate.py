"""Collate: masks and alignment by hand-worked rows, sampled-target weights, packing that
gives the model exactly the unpacked logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cache_rows import cache_meta, random_rows
from qadpipe.distill.collate import collate
from qadpipe.errors import DistillError
from qadpipe.targets import TAIL_ID, SequenceTargets, tail_mass_from_logprobs

PAD = 0


def topk_row(row_id: str, tokens: list[int], target_start: int, k: int = 2) -> SequenceTargets:
    n = len(tokens) - 1 - target_start
    ids = np.array([[100 + 10 * j + c for c in range(k)] for j in range(n)], dtype=np.int32)
    lps = np.log(np.full((n, k), 0.3, dtype=np.float32))
    return SequenceTargets(id=row_id, input_ids=np.array(tokens, dtype=np.int32), target_start=target_start,
                           topk_ids=ids, topk_logprobs=lps, tail_mass=tail_mass_from_logprobs(lps))


def test_padded_masks_and_alignment_by_hand():
    rows = [topk_row("a", [5, 6, 7, 8, 9], target_start=2), topk_row("b", [11, 12, 13], target_start=0)]
    batch = collate(rows, pad_id=PAD)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [11, 12, 13, PAD, PAD]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # row a: targets at positions 2, 3 (describing tokens 8, 9); row b: positions 0, 1 (tokens 12, 13)
    assert batch.target_mask.tolist() == [[False, False, True, True, False], [True, True, False, False, False]]
    assert batch.targets.next_tokens.tolist() == [8, 9, 12, 13]
    assert batch.targets.topk_ids[:, 0].tolist() == [100, 110, 100, 110]
    torch.testing.assert_close(batch.targets.tail_mass, torch.full((4,), 0.4))
    assert batch.position_ids is None and batch.num_positions == 4 and batch.num_sequences == 2
    assert batch.num_tokens == 8   # the rows' own tokens (5 + 3): tokens/s counts no padding


def test_targets_follow_the_mask_order_for_random_rows():
    rows = random_rows(cache_meta("topk", k=4), 5, seq_len=12, target_start=3, seed=2)
    batch = collate(rows, pad_id=PAD)
    flat = 0
    for b, row in enumerate(rows):
        for i in batch.target_mask[b].nonzero().squeeze(-1).tolist():
            j = i - row.target_start
            assert batch.targets.next_tokens[flat] == int(row.input_ids[i + 1])
            assert batch.targets.topk_ids[flat].tolist() == row.topk_ids[j].tolist()
            assert batch.targets.topk_logprobs[flat].tolist() == row.topk_logprobs[j].tolist()
            assert batch.targets.tail_mass[flat] == float(row.tail_mass[j])
            flat += 1
    assert flat == sum(row.num_target_rows for row in rows) == batch.num_positions


def test_sampled_weights_drop_tail_draws_and_positions_with_only_tail_draws():
    row = SequenceTargets(id="s", input_ids=np.array([1, 2, 3, 4], dtype=np.int32), target_start=0,
                          sample_offsets=np.array([0, 2, 3, 5]),
                          sample_ids=np.array([7, 9, TAIL_ID, 9, TAIL_ID], dtype=np.int32),
                          sample_counts=np.array([30, 20, 50, 10, 40], dtype=np.int32))
    batch = collate([row], pad_id=PAD)
    # position 1 drew only the tail: no target, not trained on
    assert batch.target_mask.tolist() == [[True, False, True, False]]
    assert batch.targets.next_tokens.tolist() == [2, 4]
    assert batch.targets.sample_ids.tolist() == [[7, 9], [9, -1]]
    torch.testing.assert_close(batch.targets.sample_weights, torch.tensor([[0.6, 0.4], [1.0, 0.0]]))


def test_without_targets_keeps_tokens_only():
    batch = collate(random_rows(cache_meta("sampled"), 2, seed=1), pad_id=PAD, with_targets=False)
    assert batch.targets.sample_ids is None and batch.targets.topk_ids is None
    assert batch.num_positions == int(batch.target_mask.sum())


def test_pack_layout_and_position_restarts():
    rows = [topk_row("a", [5, 6, 7], 0), topk_row("b", [8, 9, 10, 11], 1), topk_row("c", [12, 13], 0)]
    batch = collate(rows, pad_id=PAD, pack_length=6)
    # first fit: a (3) + c (2) share a window, b (4) gets its own
    assert batch.input_ids.tolist() == [[5, 6, 7, 12, 13, PAD], [8, 9, 10, 11, PAD, PAD]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert batch.attention_mask is None
    assert batch.target_mask.tolist() == [[True, True, False, True, False, False],
                                          [False, True, True, False, False, False]]
    # targets in mask order: a's rows, c's row, then b's rows
    assert batch.targets.next_tokens.tolist() == [6, 7, 13, 10, 11]
    assert batch.num_tokens == 9 and batch.num_sequences == 3   # 12 slots, 3 of them padding
    # rows that fill a window exactly share it
    exact = collate([topk_row("a", [5, 6, 7], 0), topk_row("d", [1, 2, 3], 0)], pad_id=PAD, pack_length=6)
    assert exact.input_ids.tolist() == [[5, 6, 7, 1, 2, 3]]


def test_a_row_longer_than_the_pack_window_is_one_clear_error():
    with pytest.raises(DistillError, match=r"cache row 'a' has 5 tokens, more than distill.pack_length=4"):
        collate([topk_row("a", [1, 2, 3, 4, 5], 0)], pad_id=PAD, pack_length=4)


def test_packed_logits_equal_unpacked_logits(tiny_llama_dir):
    from qadpipe.models import load_causal_lm

    model = load_causal_lm(str(tiny_llama_dir), dtype="float32")
    rows = random_rows(cache_meta("topk", k=2), 4, seq_len=24, target_start=1, seed=3)
    with torch.no_grad():
        padded = collate(rows, pad_id=PAD)
        packed = collate(rows, pad_id=PAD, pack_length=48)
        assert packed.input_ids.shape[0] < len(rows)
        a = model(**padded.model_inputs()).logits[padded.target_mask]
        b = model(**packed.model_inputs()).logits[packed.target_mask]
    assert a.shape == b.shape
    # both orders are row-major over their layouts; match positions by (next token, topk ids) rows
    key_a = [tuple(r) for r in torch.cat([padded.targets.topk_ids, padded.targets.next_tokens[:, None]], 1).tolist()]
    key_b = [tuple(r) for r in torch.cat([packed.targets.topk_ids, packed.targets.next_tokens[:, None]], 1).tolist()]
    perm = [key_a.index(k) for k in key_b]
    torch.testing.assert_close(b, a[perm], rtol=1e-4, atol=1e-4)


def test_an_unpadded_batch_carries_no_attention_mask_and_scores_the_same(tiny_llama_dir):
    """No row padded: no mask, the causal mask alone (transformers would otherwise check an
    all-ones mask on the GPU, a host sync per forward); the logits are those of the explicit mask."""
    from qadpipe.models import load_causal_lm

    model = load_causal_lm(str(tiny_llama_dir), dtype="float32")
    tokens = torch.randint(1, 200, (3, 16), generator=torch.Generator().manual_seed(4)).tolist()
    rows = [topk_row(f"r{i}", row, target_start=1) for i, row in enumerate(tokens)]
    batch = collate(rows, pad_id=PAD)
    assert batch.attention_mask is None and "attention_mask" not in batch.model_inputs()
    with torch.no_grad():
        unmasked = model(**batch.model_inputs()).logits
        masked = model(**batch.model_inputs(), attention_mask=torch.ones_like(batch.input_ids)).logits
    assert torch.equal(unmasked, masked)
    assert collate(rows[:2] + [topk_row("short", [1, 2, 3], target_start=0)], pad_id=PAD).attention_mask is not None
