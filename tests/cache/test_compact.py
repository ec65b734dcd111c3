"""The compact top-k codec against hand-worked values and an independent KL computation."""

from __future__ import annotations

import numpy as np
import pytest

from qadpipe.cache import compact


def test_hand_worked_codes():
    # Below the knee the step is exactly 1/48 nat: -1 nat is code 48, -4 nats (the knee) code 192.
    assert compact.logprob_codes(np.array([0.0, -1.0, -4.0])).tolist() == [0, 48, 192]
    assert compact.logprob_codes(np.array([-np.inf]))[0] == compact.ZERO_PROB_CODE
    table = compact.logprob_table()
    assert table[48] == pytest.approx(-1.0) and table[192] == pytest.approx(-4.0)
    assert table[compact.ZERO_PROB_CODE] == -np.inf
    # Far below the knee the step is the coarse 1/4 nat: consecutive codes differ by 0.25.
    far = compact.logprob_codes(np.array([-30.0]))[0]
    assert table[far] - table[far + 1] == pytest.approx(0.25)


def test_compand_is_monotone_and_inverted_by_expand():
    x = np.linspace(0, 60, 100_001)
    codes = compact.compand(x)
    assert (np.diff(codes) > 0).all()
    np.testing.assert_allclose(compact.expand(codes), x, atol=1e-9)


@pytest.mark.parametrize("x_max,bound", [(compact.KNEE, compact.FINE_STEP / 2), (80.0, compact.COARSE_STEP / 2)])
def test_rounding_error_bounded_by_half_the_local_step(x_max, bound):
    lp = -np.random.default_rng(0).uniform(0, x_max, 200_000)
    decoded = compact.logprob_table()[compact.logprob_codes(lp)]
    assert np.abs(decoded - lp).max() <= bound + 1e-5


def _random_distributions(rng, n, k, vocab=5000):
    logits = rng.standard_t(3, size=(n, vocab)) * 2.5
    logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argsort(-logprobs, axis=1)[:, :k]
    top = np.take_along_axis(logprobs, ids, axis=1)
    return ids.astype(np.int32), top.astype(np.float32), logprobs


@pytest.mark.parametrize("chunk_rows", [7, compact.DECODE_CHUNK_ROWS])
def test_tie_groups_roundtrip_the_id_to_logprob_map(monkeypatch, chunk_rows):
    # chunk_rows=7: 200 rows decode in 29 chunks, the last one short; each must match the map.
    monkeypatch.setattr(compact, "DECODE_CHUNK_ROWS", chunk_rows)
    rng = np.random.default_rng(1)
    ids, lp, _ = _random_distributions(rng, 200, 64)
    order = compact.id_order(ids)
    ranks_of = np.zeros(5000, np.int64)
    ranks_of[order] = np.arange(order.size)
    rank_column, steps = compact.encode_topk(ids, lp, ranks_of)
    assert (steps[:, 1:] == 0).mean() > 0.2, "coarse codes should produce tie groups"
    got_ids, got_lp = compact.decode_topk(rank_column, steps, order)
    assert (np.diff(got_lp, axis=1) <= 0).all()
    for row in range(ids.shape[0]):
        want = dict(zip(ids[row].tolist(), lp[row].tolist()))
        assert sorted(got_ids[row].tolist()) == sorted(want)
        for token, value in zip(got_ids[row].tolist(), got_lp[row].tolist()):
            assert abs(value - want[token]) <= compact.COARSE_STEP / 2 + 1e-5


def test_decode_kl_below_target_at_k64():
    """KL(exact || decoded) over top-64 + tail bucket, computed independently with float64."""
    rng = np.random.default_rng(2)
    _, lp, _ = _random_distributions(rng, 300, 64)
    tail = np.clip(1.0 - np.exp(lp.astype(np.float64)).sum(1), 0, 1)
    decoded_lp = compact.logprob_table()[compact.logprob_codes(lp)].astype(np.float64)
    decoded_tail = compact.decode_tail_codes(compact.tail_codes(tail))
    p = np.concatenate([np.exp(lp.astype(np.float64)), tail[:, None]], axis=1)
    q = np.concatenate([np.exp(decoded_lp), decoded_tail[:, None]], axis=1)
    q /= q.sum(axis=1, keepdims=True)
    mask = p > 0
    kl = (p * (np.log(np.where(mask, p, 1)) - np.log(np.where(mask, q, 1)))).sum(axis=1)
    assert kl.mean() < 1e-4
    np.testing.assert_allclose(decoded_tail, tail, rtol=compact.TAIL_STEP)


def test_fit_to_tail_leaves_a_row_without_top_k_mass_alone():
    """A tail of 1 leaves no mass to scale the entries to (log 0 made them all -inf), and a row
    of -inf entries has none to scale: both stay as decoded; the row beside them is fitted."""
    rows = np.array([[np.log(0.5), np.log(0.25)], [-np.inf, -np.inf], [np.log(0.5), np.log(0.2)]], dtype=np.float32)
    tails = np.array([1.0, 0.3, 0.3])
    fitted = compact.fit_to_tail(rows.copy(), tails)
    assert np.array_equal(fitted[:2], rows[:2])
    np.testing.assert_allclose(np.exp(fitted[2].astype(np.float64)), [0.5, 0.2], rtol=1e-6)


def test_fit_to_tail_makes_each_decoded_row_a_distribution_that_reads_as_a_kl():
    """Entries and tail are rounded independently: decoded rows sum to 1 ± 1 %.  After
    fit_to_tail they sum to exactly 1 with the (untouched) tail, and the forward-KL-with-tail
    loss at student == teacher equals KL(true || decoded) over the k+1 buckets, computed
    here in float64: >= 0 at every position, ~2.6e-5 on average (unfitted, the loss read a
    mean of 2.6e-4 with single positions at -9e-3)."""
    import torch

    from qadpipe.distill.losses import forward_kl_tail

    rng = np.random.default_rng(0)
    vocab, k, n = 8192, 64, 200
    logits = rng.standard_normal((n, vocab)) * 3 + rng.gumbel(size=(n, vocab))
    full_lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argsort(-full_lp, axis=1)[:, :k]
    lp = np.take_along_axis(full_lp, ids, axis=1).astype(np.float32)
    tail = np.clip(1.0 - np.exp(lp.astype(np.float64)).sum(1), 0, 1)
    decoded_lp = compact.logprob_table()[compact.logprob_codes(lp)]
    decoded_tail = compact.decode_tail_codes(compact.tail_codes(tail))
    drift = np.exp(decoded_lp.astype(np.float64)).sum(1) + decoded_tail
    assert np.abs(drift - 1).max() > 1e-3                    # what the fit is for
    fitted = compact.fit_to_tail(decoded_lp.copy(), decoded_tail)
    np.testing.assert_allclose(np.exp(fitted.astype(np.float64)).sum(1) + decoded_tail, 1.0, atol=1e-6)
    shift = fitted.astype(np.float64) - decoded_lp
    np.testing.assert_allclose(shift, shift[:, :1].repeat(k, 1), atol=1e-6)   # one scale per row
    student = torch.tensor(full_lp, dtype=torch.float32, requires_grad=True)
    loss = forward_kl_tail(torch.log_softmax(student, -1), torch.from_numpy(ids), torch.from_numpy(fitted),
                           torch.from_numpy(decoded_tail))
    true_buckets = np.concatenate([np.exp(lp.astype(np.float64)), tail[:, None]], axis=1)
    decoded_buckets = np.concatenate([np.exp(fitted.astype(np.float64)), decoded_tail[:, None]], axis=1)
    decode_kl = (true_buckets * (np.log(true_buckets) - np.log(decoded_buckets))).sum(1)
    np.testing.assert_allclose(loss.detach().numpy(), decode_kl, atol=2e-6)
    assert loss.min() > 0 and loss.mean() < 1e-4


def test_tail_codes_keep_the_smaller_of_tail_and_topk_mass_precise():
    """Peaked positions (tail ~ 1e-6) and flat ones (tail ~ 1 − 6e-4, random-token data) alike:
    the relative error of min(tail, 1 − tail) stays within half a tail step."""
    tail = np.array([0.0, 1e-30, 1e-6, 0.01, 0.3, 0.5, 0.5000001, 0.9, 1 - 6e-4, 1 - 1e-9, 1.0])
    decoded = compact.decode_tail_codes(compact.tail_codes(tail))
    assert decoded[0] == 0.0
    small, small_decoded = np.minimum(tail, 1 - tail)[1:-1], np.minimum(decoded, 1 - decoded)[1:-1]
    np.testing.assert_allclose(small_decoded, small, rtol=compact.TAIL_STEP / 2 * 1.01)
    assert 1 - decoded[-1] < 1e-50  # a tail of exactly 1 (no top-k mass) stays ~1


def test_tail_codes_sweep_keeps_half_a_step_on_the_smaller_side_across_0_to_1():
    """Guards the 0.5 switch between storing tail and 1 − tail: over the whole of (0, 1) the
    decoded min(tail, 1 − tail) is within half a log step of the true one, i.e. a relative
    error <= e^(TAIL_STEP/2) − 1 (hand-derived from code = rint(−log(small) / TAIL_STEP)).
    Storing −log(tail) up to 0.9 instead would give 1 − tail ~9x that error near 0.9."""
    near = np.array([1e-50, 1e-30, 1e-12, 1e-6, 1e-3, 0.4999, 0.5, 0.5001, 1 - 1e-3, 1 - 1e-6, 1 - 1e-9])
    tail = np.concatenate([np.linspace(0.01, 0.99, 197), near])
    decoded = compact.decode_tail_codes(compact.tail_codes(tail))
    small, small_decoded = np.minimum(tail, 1 - tail), np.minimum(decoded, 1 - decoded)
    bound = np.expm1(compact.TAIL_STEP / 2)
    slack = tail * 2.0 ** -53   # the decoded tail's float64 rounding (2^-53 absolute near tail = 1)
    off = np.abs(small_decoded - small) > small * bound * (1 + 1e-9) + slack
    assert not off.any(), tail[off]


def test_a_finite_logprob_far_below_the_code_range_is_not_read_as_probability_zero():
    """Guards the clip of finite log-probs to ZERO_PROB_CODE − 1: -2e4 nats companding past
    65535 must stay the smallest *finite* code, not turn into the −inf (probability 0) code."""
    code = compact.logprob_codes(np.array([-2e4, -1e9]))
    assert (code != compact.ZERO_PROB_CODE).all() and (code == compact.ZERO_PROB_CODE - 1).all()
    assert np.isfinite(compact.logprob_table()[code]).all()


def test_order_table_roundtrip_and_corruption():
    order = np.array([7, 3, 49151, 0], dtype=np.int64)
    np.testing.assert_array_equal(compact.unpack_order(compact.pack_order(order), "x"), order)
    with pytest.raises(Exception, match="corrupt id table"):
        compact.unpack_order(b"bm90IHpzdGQ=", "shard.parquet")


def test_decode_refuses_out_of_range_indices():
    """Untrusted shard bytes: a rank past the id table or a code past the decode table."""
    order = np.array([5, 9, 11], dtype=np.int32)
    steps = np.array([[1, 0, 2]], dtype=np.uint16)
    with pytest.raises(Exception, match=r"top-k rank 3 outside the shard's id table \(3 ids\)"):
        compact.decode_topk(np.array([[3, 0, 0]], dtype=np.uint16), steps, order)
    big = np.array([[0xFFFF, 0xFFFF, 0]], dtype=np.uint16)
    with pytest.raises(Exception, match=r"top-k log-prob code 131070 outside \[0, 65535\]"):
        compact.decode_topk(np.array([[0, 1, 1]], dtype=np.uint16), big, order)


def test_a_row_whose_ranks_the_int32_decoder_could_not_sum_is_refused_at_write():
    """4096 distinct codes at ranks around 2^20 sum past 2^31: decoded in int32 such a row came
    back unreadable ("rank outside the id table"), after its shard had been accepted."""
    vocab, k = 2**21, 4096
    ranks_of = np.arange(vocab, dtype=np.int64)
    ids = np.arange(vocab - k, vocab, dtype=np.int64)[None, :]
    logprobs = np.linspace(-0.5, -1200.0, k)[None, :]
    assert len(np.unique(compact.logprob_codes(logprobs))) == k   # no ties: every entry stores its whole rank
    with pytest.raises(compact.CacheError, match=r"id ranks sum past 2\^31 .*use cache.encoding: plain"):
        compact.encode_topk(ids, logprobs, ranks_of)
    rank_column, steps = compact.encode_topk(ids[:, :1024], logprobs[:, :1024], ranks_of)   # 2^31 - 2^30: fits
    order = np.arange(vocab, dtype=np.int32)
    decoded, _ = compact.decode_topk(rank_column.astype(np.uint32), steps.astype(np.uint16), order)
    np.testing.assert_array_equal(decoded, ids[:, :1024])


def test_hand_worked_tail_codes_and_their_documented_precision():
    """code = rint(-ln(tail) * 256): tail 0.01 -> rint(1178.92) = 1179, 0.5 -> rint(177.45) = 177;
    above 0.5 the top-k mass is coded and the high bit set: 0.99 -> 0x8000 | 1179.  Each decodes
    within the README's 0.2 % (half a step of 1/256 nat is 0.195 %), written out here rather than
    read from the module's own constant."""
    tail = np.array([0.01, 0.5, 0.99, 1e-6])
    codes = compact.tail_codes(tail)
    assert codes.tolist() == [1179, 177, 0x8000 | 1179, 3537]   # -ln(1e-6) * 256 = 3536.75
    decoded = compact.decode_tail_codes(codes)
    small, small_decoded = np.minimum(tail, 1 - tail), np.minimum(decoded, 1 - decoded)
    assert (np.abs(small_decoded / small - 1) <= 0.002).all()


def test_id_order_is_most_frequent_first_ties_by_id():
    """The id table behind the compact ranks: 9 occurs 3 times, 2 and 7 twice (tie: the lower id
    first), 4 once."""
    ids = np.array([[7, 9, 2], [9, 4, 2], [9, 7, 0]])
    assert compact.id_order(ids).tolist() == [9, 2, 7, 0, 4]
