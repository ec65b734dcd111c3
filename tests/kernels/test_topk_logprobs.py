"""The native CPU top-k log-prob kernel against an independent reference: an fp64
``log_softmax`` and a stable whole-row sort (equal values in id order, the kernel's promise)."""

from __future__ import annotations

import math

import pytest
import torch

from logit_rows import adversarial_rows
from qadpipe.kernels.topk_logprobs import BLOCK, supports, topk_logprobs


def reference(logits: torch.Tensor, k: int, token_ids: torch.Tensor):
    """ids [token, top-k] (ties in id order), fp64 log-probs, ranks (entries >= the token's logit)."""
    x = logits.double()
    log_probs = torch.log_softmax(x, dim=-1)
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]
    ids = torch.cat((token_ids[:, None], order), dim=1)
    ranks = (x >= x.gather(1, token_ids[:, None])).sum(-1)
    return ids.to(torch.int32), log_probs.gather(1, ids.long()), ranks


def assert_matches_reference(logits: torch.Tensor, k: int, token_ids: torch.Tensor) -> None:
    ids, logprobs, ranks = topk_logprobs(logits, k, token_ids)
    want_ids, want_logprobs, want_ranks = reference(logits, k, token_ids)
    assert ids.dtype == torch.int32 and logprobs.dtype == torch.float32 and ranks.dtype == torch.int64
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(logprobs.double(), want_logprobs, atol=2e-6, rtol=1e-6)
    assert torch.equal(ranks, want_ranks)


@pytest.mark.parametrize("vocab", [49 * BLOCK, 49 * BLOCK + 37])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_adversarial_rows_match_a_stable_whole_row_sort(vocab, dtype):
    k = 8
    logits = adversarial_rows(vocab, k).to(dtype)
    g = torch.Generator().manual_seed(5)
    token_ids = torch.randint(0, vocab, (len(logits),), generator=g)
    token_ids[4], token_ids[6] = vocab - 1, 3             # the partial block's maximum; a masked (-inf) entry
    assert_matches_reference(logits, k, token_ids)


@pytest.mark.parametrize("k", [1, 64, 128, 768])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lm_head_shaped_rows(k, dtype):
    """SmolLM2's vocabulary (49152 = 768 blocks, so k=768 is the largest the kernel takes) and
    logits shaped like a head's: a shared per-token bias plus per-position noise."""
    g = torch.Generator().manual_seed(k)
    vocab = 49152
    logits = (torch.randn(40, vocab, generator=g) * 2.5 + torch.randn(vocab, generator=g) * 1.5).to(dtype)
    token_ids = torch.randint(0, vocab, (40,), generator=g)
    token_ids[0] = int(logits[0].float().argmax())        # rank 1
    assert_matches_reference(logits, k, token_ids)


def test_the_result_does_not_depend_on_the_thread_count():
    logits = adversarial_rows(64 * 30 + 5, 8).float()
    token_ids = torch.arange(len(logits))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = topk_logprobs(logits, 8, token_ids)
        torch.set_num_threads(max(2, threads))
        many = topk_logprobs(logits, 8, token_ids)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@pytest.mark.parametrize("finite", [0, 10, 270])   # 270: more candidates than are placed by counting
def test_a_row_with_fewer_than_k_non_nan_logits_gives_nan_log_probs_at_valid_ids(finite):
    """A bf16 overflow makes whole rows NaN: fewer than k candidates survive (NaN is never >= the
    threshold), and the unfilled slots used to index the row with uninitialized ids (SIGSEGV)."""
    vocab, k = 64 * 300, 300
    torch.manual_seed(0)
    logits = torch.randn(2, vocab)
    logits[1, finite:] = float("nan")
    ids, logprobs, _ = topk_logprobs(logits, k, torch.zeros(2, dtype=torch.long))
    assert ((ids >= 0) & (ids < vocab)).all()
    assert logprobs[0].isfinite().all() and logprobs[1].isnan().all()


def test_a_nan_logit_makes_the_rows_log_probs_nan():
    """As a log_softmax does; the cache writer then refuses the row instead of storing it."""
    logits = torch.randn(2, 640, generator=torch.Generator().manual_seed(6))
    logits[1, 100] = float("nan")
    _, logprobs, _ = topk_logprobs(logits, 4, torch.tensor([0, 1]))
    assert logprobs[0].isfinite().all() and logprobs[1].isnan().all()


def test_no_rows_and_what_the_kernel_refuses():
    ids, logprobs, ranks = topk_logprobs(torch.zeros(0, 640), 4, torch.zeros(0, dtype=torch.int64))
    assert ids.shape == logprobs.shape == (0, 5) and ranks.shape == (0,)
    assert supports(torch.zeros(3, 640), 10) and not supports(torch.zeros(3, 640), 11)   # k <= vocab // 64
    assert not supports(torch.zeros(3, 640, dtype=torch.float16), 4)
    assert not supports(torch.zeros(640), 4)
    with pytest.raises(ValueError, match="k <= vocab // 64"):
        topk_logprobs(torch.zeros(3, 640), 11, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"3 token ids in \[0, 640\)"):
        topk_logprobs(torch.zeros(3, 640), 4, torch.tensor([0, 1, 640]))
    with pytest.raises(ValueError, match=r"3 token ids"):
        topk_logprobs(torch.zeros(3, 640), 4, torch.tensor([0, 1]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_long_tail_of_blocks_each_below_half_an_ulp_of_the_sum_is_counted(dtype):
    """One logit 0, 49151 at -21: each 64-entry block adds 64 e^-21 = 4.9e-8 to a running sum
    near 1, under half an fp32 ulp (6e-8), so a float sum of the blocks drops all 768 of them
    and the log-probs lose the tail's 3.7e-5 (the fp64 sum of fp32 partial sums keeps it).
    Hand-worked: logsumexp = log(1 + 49151 e^-21) = 3.7268e-5."""
    vocab = 49152
    logits = torch.full((2, vocab), -21.0)
    logits[0, 0] = logits[1, vocab - 1] = 0.0                 # the maximum in the first block / the last
    token_ids = torch.tensor([5, vocab - 1])
    assert_matches_reference(logits.to(dtype), 4, token_ids)
    _, logprobs, _ = topk_logprobs(logits.to(dtype), 4, token_ids)
    lse = math.log1p(49151 * math.exp(-21.0))
    assert abs(lse - 3.7268e-5) < 1e-9
    torch.testing.assert_close(logprobs[:, 1].double(), torch.full((2,), -lse, dtype=torch.float64),
                               atol=2e-7, rtol=0)
