"""HF teacher: chunked top-k equals a full fp64 log_softmax reference; alignment is exact."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from qadpipe.data.sequences import TokenSequence
from qadpipe.errors import TeacherError
from qadpipe.teacher.base import SamplingSpec, TargetSpec
from qadpipe.teacher.hf_backend import HFTeacher


def _sequences(vocab: int, lengths: list[int], prompt_len: int = 3) -> list[TokenSequence]:
    rng = np.random.default_rng(0)
    return [TokenSequence(f"seq{i}", rng.integers(0, vocab, size=n).astype(np.int32), prompt_len)
            for i, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def tiny_fp32(tiny_llama_dir: Any) -> Any:
    from qadpipe.models import load_causal_lm

    return load_causal_lm(str(tiny_llama_dir), "float32", "cpu")


def test_topk_matches_full_log_softmax_of_the_same_batch(tiny_fp32: Any) -> None:
    teacher = HFTeacher(tiny_fp32, batch_size=3, chunk_tokens=7)
    seqs = _sequences(teacher.vocab_size, [20, 35, 9])
    got = teacher.score(seqs, TargetSpec(k=16))
    ids = torch.zeros((3, 35), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        ids[row, :len(s.input_ids)] = torch.from_numpy(s.input_ids.astype(np.int64))
        mask[row, :len(s.input_ids)] = 1
    with torch.no_grad():
        reference = torch.log_softmax(tiny_fp32(input_ids=ids, attention_mask=mask).logits.double(), dim=-1)
    for row, (s, targets) in enumerate(zip(seqs, got)):
        values, index = reference[row, :len(s.input_ids) - 1].topk(16)
        assert targets.target_start == 0 and targets.num_target_rows == len(s.input_ids) - 1
        assert np.array_equal(targets.topk_ids, index.numpy())
        np.testing.assert_allclose(targets.topk_logprobs, values.numpy(), atol=2e-5)
        np.testing.assert_allclose(targets.tail_mass, 1 - values.exp().sum(-1).numpy(), atol=1e-5)


def test_scoring_builds_no_kv_cache(tiny_fp32: Any) -> None:
    """A one-pass score never reads a KV cache; built by default, it is GBs per 8 x 2048 batch
    of a 1.7B teacher, GPU memory that bounds the batch."""
    teacher = HFTeacher(tiny_fp32, batch_size=2)
    caches = []
    hook = teacher.body.register_forward_hook(lambda module, args, output: caches.append(output.past_key_values))
    try:
        teacher.score(_sequences(teacher.vocab_size, [12, 7]), TargetSpec(k=4))
    finally:
        hook.remove()
    assert caches == [None]


def test_tail_mass_is_clipped_at_zero_when_fp32_topk_logprobs_sum_past_one() -> None:
    """Guards the [0, 1] clip of tail_mass_from_logprobs: with k = V the fp32 log-softmax's
    exp-sum overshoots 1 (here 1 + 2.3e-8), and the tail must read exactly 0, never negative."""
    from qadpipe.targets import tail_mass_from_logprobs

    lps = torch.log_softmax(torch.tensor([[5.0, 1.0, 0.5, -2.0]]), -1).numpy()
    assert lps.dtype == np.float32 and np.exp(lps.astype(np.float64)).sum() > 1.0   # the premise
    assert tail_mass_from_logprobs(lps).tolist() == [0.0]
    rows = torch.log_softmax(torch.from_numpy(np.random.default_rng(0).standard_normal((2000, 16), np.float32) * 3),
                             -1).numpy()
    tails = tail_mass_from_logprobs(rows)
    assert (tails >= 0).all() and (tails <= 1).all()


def test_a_tail_of_a_billionth_keeps_its_digits() -> None:
    """1 − Σ exp(top-k) is summed in float64: in fp32 the sum's rounding (~6e-8) is 50 times a
    tail of 1e-9, which the compact encoding then stores to a relative precision.  Reference:
    math.fsum of the same fp32 log-probs' exponentials."""
    import math

    from qadpipe.targets import tail_mass_from_logprobs

    logits = torch.tensor([[4.0, 3.0, 2.5, 1.0, 0.0, -18.0], [1.0, 1.0, 1.0, 1.0, 1.0, -19.5]])
    lps = torch.log_softmax(logits, -1)[:, :5].numpy()   # the top 5; the 6th is the tail
    expected = [1.0 - math.fsum(math.exp(float(v)) for v in row) for row in lps]
    assert 1e-10 < min(expected) and max(expected) < 1e-7   # the premise: tails of ~1e-9 to 1e-8
    np.testing.assert_allclose(tail_mass_from_logprobs(lps), expected, rtol=1e-6)


def test_chunking_and_batching_do_not_change_the_result(tiny_fp32: Any) -> None:
    seqs = _sequences(49152, [30, 12])
    a = HFTeacher(tiny_fp32, batch_size=2, chunk_tokens=5).score(seqs, TargetSpec(k=8))
    b = HFTeacher(tiny_fp32, batch_size=1, chunk_tokens=4096).score(seqs, TargetSpec(k=8))
    for x, y in zip(a, b):
        assert np.array_equal(x.topk_ids, y.topk_ids)
        np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, atol=1e-5)


def test_alignment_row_j_predicts_token_start_plus_j_plus_1(successor: Any) -> None:
    teacher = HFTeacher(successor, batch_size=2, chunk_tokens=6)
    vocab = teacher.vocab_size
    consecutive = TokenSequence("run", np.arange(100, 120, dtype=np.int32), prompt_len=5)
    scattered = TokenSequence("rand", np.random.default_rng(3).integers(0, vocab, 25).astype(np.int32), 5)
    for include_prompt in (True, False):
        for targets, seq in zip(teacher.score([consecutive, scattered], TargetSpec(k=4, include_prompt=include_prompt)),
                                [consecutive, scattered]):
            start = 0 if include_prompt else 4
            assert targets.target_start == start
            rows = np.arange(targets.num_target_rows)
            assert targets.num_target_rows == len(seq.input_ids) - 1 - start
            # the successor model puts its mass on input_ids[p] + 1 at position p = start + j
            assert np.array_equal(targets.topk_ids[:, 0], (seq.input_ids[start + rows] + 1) % vocab)
            assert (targets.topk_logprobs[:, 0] > np.log(0.9)).all()
    (run,) = teacher.score([consecutive], TargetSpec(k=1))
    assert np.array_equal(run.topk_ids[:, 0], consecutive.input_ids[1:])  # ... which is the next token here


def test_sampled_targets_are_seeded_per_sequence(tiny_fp32: Any) -> None:
    teacher = HFTeacher(tiny_fp32, batch_size=4)
    seqs = _sequences(teacher.vocab_size, [12, 30, 17])
    spec = TargetSpec(kind="sampled", num_samples=50, seed=7)
    together = teacher.score(seqs, spec)
    alone = teacher.score(seqs[1:2], spec)[0]
    for name in ("sample_offsets", "sample_ids", "sample_counts"):
        assert np.array_equal(getattr(together[1], name), getattr(alone, name))
    other_seed = teacher.score(seqs[1:2], TargetSpec(kind="sampled", num_samples=50, seed=8))[0]
    assert not np.array_equal(other_seed.sample_ids, alone.sample_ids)
    for t, s in zip(together, seqs):
        assert t.num_target_rows == len(s.input_ids) - 1
        assert (np.add.reduceat(t.sample_counts, t.sample_offsets[:-1]) == 50).all()
        # a near-uniform random model over 49152 ids: almost every draw is a different id
        assert np.diff(t.sample_offsets).mean() > 45


def test_a_batch_without_target_rows_scores_to_empty_targets(tiny_fp32: Any) -> None:
    """One-token sequences have no next token; both kinds give rows of length 0, not a crash."""
    teacher = HFTeacher(tiny_fp32)
    seqs = _sequences(teacher.vocab_size, [1, 1])
    for spec in (TargetSpec(kind="sampled", num_samples=50, seed=7), TargetSpec(kind="topk", k=4)):
        assert [t.num_target_rows for t in teacher.score(seqs, spec)] == [0, 0]


def test_sampled_targets_follow_the_distribution(successor: Any) -> None:
    teacher = HFTeacher(successor)
    (seq,) = _sequences(teacher.vocab_size, [40])
    (t,) = teacher.score([seq], TargetSpec(kind="sampled", num_samples=50, include_prompt=False))
    assert t.target_start == 2 and t.num_target_rows == 37
    # ~all the mass sits on input_id + 1: one id per row, drawn 50 times
    assert np.array_equal(t.sample_offsets, np.arange(38))
    assert np.array_equal(t.sample_ids, (seq.input_ids[2:-1] + 1) % teacher.vocab_size)
    assert (t.sample_counts == 50).all()


def test_sampled_targets_refuse_a_teacher_with_non_finite_logits_naming_the_position() -> None:
    """A NaN embedding row poisons every position of the sequence holding that token (masked
    attention still multiplies its NaN value by 0), never another sequence of the batch: the
    first target row of that sequence, in the second chunk of positions, is the one named."""
    from conftest import successor_model

    model = successor_model()
    with torch.no_grad():
        model.model.embed_tokens.weight[511] = float("nan")
    teacher = HFTeacher(model, chunk_tokens=2)
    clean = TokenSequence("clean", np.arange(10, 16, dtype=np.int32), 3)        # target rows: positions 2-4
    poisoned = TokenSequence("poisoned", np.array([20, 21, 22, 23, 24, 511, 26, 27, 28], dtype=np.int32), 3)
    with pytest.raises(TeacherError, match=r"^sequence 'poisoned' position 2: the teacher's probabilities are NaN"):
        teacher.score([clean, poisoned], TargetSpec(kind="sampled", num_samples=50, include_prompt=False))


def test_greedy_completion_follows_the_model_and_is_seeded(successor: Any) -> None:
    teacher = HFTeacher(successor, eos_ids=(1,), pad_id=0)
    prompt = TokenSequence("p", np.array([10, 11, 12], dtype=np.int32), 3)
    (greedy,) = teacher.complete([prompt], SamplingSpec(temperature=0.0, max_new_tokens=6))
    assert greedy.token_ids.tolist() == [13, 14, 15, 16, 17, 18]
    hot = SamplingSpec(temperature=50.0, top_p=1.0, max_new_tokens=8, seed=1)
    first, again = teacher.complete([prompt], hot), teacher.complete([prompt], hot)
    assert np.array_equal(first[0].token_ids, again[0].token_ids)
    assert not np.array_equal(first[0].token_ids, greedy.token_ids[:len(first[0].token_ids)])


def test_completions_ignore_the_sampling_defaults_a_checkpoint_ships(successor: Any) -> None:
    """Instruct checkpoints ship generation_config.json defaults (repetition_penalty, ...) that
    transformers would apply to every field left at its default; vLLM's SamplingParams apply
    none.  The successor model's greedy answer to [13, 10, 11, 12] is 13, already in the prompt:
    a repetition penalty of 1e6 would turn it away."""
    teacher = HFTeacher(successor, eos_ids=(1,), pad_id=0)
    shipped = successor.generation_config
    before, shipped.repetition_penalty = shipped.repetition_penalty, 1e6
    try:
        prompt = TokenSequence("p", np.array([13, 10, 11, 12], dtype=np.int32), 4)
        (greedy,) = teacher.complete([prompt], SamplingSpec(temperature=0.0, max_new_tokens=3))
        assert greedy.token_ids.tolist() == [13, 14, 15]
        assert successor.generation_config is shipped   # set aside for the call only
    finally:
        shipped.repetition_penalty = before


def test_a_logit_transform_the_backend_does_not_apply_is_refused(tiny_fp32: Any) -> None:
    """Soft-capping and logit scaling are applied (tests/test_logit_transforms.py); Falcon-H1's
    lm_head_multiplier is not."""
    tiny_fp32.config.lm_head_multiplier = 0.5
    try:
        with pytest.raises(TeacherError, match="lm_head_multiplier=0.5"):
            HFTeacher(tiny_fp32)
    finally:
        del tiny_fp32.config.lm_head_multiplier


def test_completions_stop_at_every_end_of_sequence_id_the_checkpoint_lists(successor: Any) -> None:
    """vLLM stops at each eos_token_id of generation_config.json, not only the tokenizer's EOS:
    instruct models list their end-of-turn token there (Gemma's <end_of_turn>). The HF backend
    wrote on to max_new_tokens, and the two backends cached different data."""
    from types import SimpleNamespace

    from qadpipe.teacher.hf_backend import end_of_sequence_ids

    shipped = successor.generation_config
    before, shipped.eos_token_id = shipped.eos_token_id, [1, 15]
    try:
        eos = end_of_sequence_ids(successor, SimpleNamespace(eos_token_id=1))
    finally:
        shipped.eos_token_id = before
    assert eos == (1, 15)
    for listed in (torch.tensor([1, 15]), np.int64(15)):   # GenerationConfig keeps what it is given
        shipped.eos_token_id = listed
        try:
            assert end_of_sequence_ids(successor, SimpleNamespace(eos_token_id=1)) == (1, 15)
        finally:
            shipped.eos_token_id = before
    teacher = HFTeacher(successor, eos_ids=eos, pad_id=0)
    prompt = TokenSequence("p", np.array([10, 11, 12], dtype=np.int32), 3)
    (greedy,) = teacher.complete([prompt], SamplingSpec(temperature=0.0, max_new_tokens=6))
    assert greedy.token_ids.tolist() == [13, 14, 15]


def test_a_pad_token_the_embedding_has_no_row_for_pads_nothing(tiny_llama_dir: Any, tmp_path: Any) -> None:
    """A [PAD] added to the tokenizer after training (Llama 2's id 32000 of 32000 rows): the
    first batch of mixed lengths failed the embedding lookup with an IndexError traceback.
    Padded positions are masked, so any id the model embeds pads them."""
    import shutil

    from transformers import AutoTokenizer

    from qadpipe.config import build_config
    from qadpipe.models import padding_id

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.save_pretrained(str(model_dir))
    teacher = HFTeacher.from_config(str(model_dir), build_config({"teacher": {"device": "cpu"}}).teacher)
    rows = teacher.model.get_input_embeddings().num_embeddings
    assert tokenizer.pad_token_id == rows and padding_id(tokenizer, teacher.model) == 0 == teacher.pad_id
    seqs = _sequences(rows, [9, 4, 6])
    together = teacher.score(seqs, TargetSpec(k=8))
    alone = [row for seq in seqs for row in teacher.score([seq], TargetSpec(k=8))]
    for a, b in zip(together, alone):
        assert np.array_equal(a.topk_ids, b.topk_ids) and np.allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-5)
    tokenizer.pad_token = tokenizer.eos_token   # one it has a row for is kept
    assert padding_id(tokenizer, teacher.model) == tokenizer.eos_token_id


def _inverse_cdf_draws(probs: np.ndarray, uniforms: np.ndarray) -> list[dict[int, int]]:
    """A second, plain implementation of the sampled targets: per row the float64 CDF, each
    uniform scaled by the row's total and looked up with side='right' (a uniform on a CDF step
    belongs to the next column); returns {column: count} per row."""
    out = []
    for p, u in zip(probs.astype(np.float64), uniforms):
        cdf = np.cumsum(p)
        cols = np.searchsorted(cdf, u * cdf[-1], side="right")
        out.append(dict(zip(*(x.tolist() for x in np.unique(cols, return_counts=True)))))
    return out


def _as_rows(targets: Any) -> list[dict[int, int]]:
    o = targets.sample_offsets
    return [dict(zip(targets.sample_ids[a:b].tolist(), targets.sample_counts[a:b].tolist()))
            for a, b in zip(o[:-1], o[1:])]


def test_sampled_targets_are_inverse_cdf_draws_of_the_full_softmax_whatever_the_chunking(tiny_fp32: Any) -> None:
    """Each row's N draws are the inverse CDF of that row's float64 softmax at the uniforms of
    the sequence's own generator (seeded by run seed + id), row after row: with positions cut into
    chunks of 5, each chunk must take its own rows' uniforms, not the first chunk's again."""
    from qadpipe.teacher.sampling import sequence_seed

    teacher = HFTeacher(tiny_fp32, batch_size=2, chunk_tokens=5)
    seqs = _sequences(teacher.vocab_size, [13, 9], prompt_len=4)
    spec = TargetSpec(kind="sampled", num_samples=30, seed=3, include_prompt=False)
    got = teacher.score(seqs, spec)
    for seq, targets in zip(seqs, got):
        ids = torch.from_numpy(seq.input_ids.astype(np.int64))[None]
        with torch.no_grad():
            probs = torch.softmax(tiny_fp32(input_ids=ids).logits[0].double(), -1).numpy()[3:-1]
        uniforms = np.random.default_rng(sequence_seed(3, seq.id)).random((len(probs), 30))
        assert targets.target_start == 3 and _as_rows(targets) == _inverse_cdf_draws(probs, uniforms)


def test_the_fp32_head_is_fp32_on_cpu_too(tiny_llama_dir: Any) -> None:
    """teacher.fp32_head: bf16 weights and hidden states, the head accumulated *and written* in
    fp32, so the log-probs are those of the exact product (float64 reference here), not of
    logits rounded to bf16 (~3 significant digits).  Without it, the bf16 head's rounding shows."""
    from qadpipe.models import load_causal_lm

    model = load_causal_lm(str(tiny_llama_dir), "bfloat16", "cpu")
    with torch.no_grad():
        model.lm_head.weight.mul_(40)   # logits of a few units: bf16 rounds them by ~1e-2
    seqs = _sequences(model.config.vocab_size, [12])
    ids = torch.from_numpy(seqs[0].input_ids.astype(np.int64))[None]
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0, :-1]
        exact = torch.log_softmax(hidden.double() @ model.lm_head.weight.double().t(), -1)
    values, index = exact.topk(8)
    (fp32,) = HFTeacher(model, fp32_head=True).score(seqs, TargetSpec(k=8))
    assert np.array_equal(fp32.topk_ids, index.numpy())
    np.testing.assert_allclose(fp32.topk_logprobs, values.numpy(), atol=5e-5)
    (bf16,) = HFTeacher(model, fp32_head=False).score(seqs, TargetSpec(k=8))
    assert np.abs(bf16.topk_logprobs - exact.gather(1, torch.from_numpy(bf16.topk_ids).long()).numpy()).max() > 1e-3


def test_completions_keep_to_top_p_and_the_run_seed(successor: Any) -> None:
    """At temperature 50 the successor's top token holds ~0.4% of the mass: top_p = 0.001 keeps
    that token alone (the nucleus is the smallest set reaching top_p), so the completion is the
    greedy one; another sampling.seed writes another completion of the same prompt."""
    teacher = HFTeacher(successor, eos_ids=(1,), pad_id=0)
    prompt = TokenSequence("p", np.array([10, 11, 12], dtype=np.int32), 3)
    (nucleus,) = teacher.complete([prompt], SamplingSpec(temperature=50.0, top_p=0.001, max_new_tokens=6, seed=1))
    assert nucleus.token_ids.tolist() == [13, 14, 15, 16, 17, 18]
    hot = [teacher.complete([prompt], SamplingSpec(temperature=50.0, top_p=1.0, max_new_tokens=8, seed=s))[0].token_ids
           for s in (1, 2)]
    assert not np.array_equal(hot[0], hot[1])


def test_a_sequence_without_a_prompt_is_all_targets_when_prompt_positions_are_not_distilled(successor: Any) -> None:
    """A text record has prompt_len 0: with include_prompt false there is no prompt position to
    leave out, so its targets are the same rows 0..T-2 as with include_prompt true."""
    teacher = HFTeacher(successor, batch_size=2, chunk_tokens=4)
    text = TokenSequence("text", np.arange(200, 211, dtype=np.int32), prompt_len=0)
    other = TokenSequence("other", np.arange(50, 57, dtype=np.int32), prompt_len=2)
    for spec in (TargetSpec(k=2, include_prompt=False),
                 TargetSpec(kind="sampled", num_samples=8, include_prompt=False)):
        (got, _) = teacher.score([text, other], spec)
        assert got.target_start == 0 and got.num_target_rows == 10
        ids = got.topk_ids[:, 0] if spec.kind == "topk" else got.sample_ids
        assert ids.tolist() == list(range(201, 211))   # the successor model: each next token
