"""Records -> token ids: fields, chat templates, the prompt boundary, length limits."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from qadpipe.data.sequences import fit_length, pack, prompt_head, random_sequences, render_record
from qadpipe.errors import DataError


def _render(record: dict, field: str, tokenizer: Any, chat: bool = False, gen: bool = False) -> tuple[list[int], int]:
    return render_record(record, "src record 0", field, tokenizer, chat_template=chat, for_generation=gen)


def test_text_is_all_target(tokenizer: Any) -> None:
    ids, prompt_len = _render({"text": "Hello world"}, "text", tokenizer)
    assert ids == tokenizer.encode("Hello world") and prompt_len == 0


def test_prompt_completion_boundary_is_exact(tokenizer: Any) -> None:
    ids, prompt_len = _render({"prompt": "Q: two plus two?", "completion": " A: four."}, "prompt", tokenizer)
    assert ids[:prompt_len] == tokenizer.encode("Q: two plus two?")
    assert ids[prompt_len:] == tokenizer.encode(" A: four.") + [tokenizer.eos_token_id]   # the end is taught too
    gen_ids, gen_len = _render({"prompt": "Q: two plus two?", "completion": " A: four."}, "prompt", tokenizer, gen=True)
    assert gen_ids == ids[:prompt_len] and gen_len == prompt_len  # generate mode: the teacher writes the completion


@pytest.fixture(scope="module")
def sentencepiece_style_tokenizer() -> Any:
    """A Llama-2/Mistral-style tokenizer (Metaspace, "▁" prepended to the first word, BOS added),
    trained on a few sentences: a text encoded on its own starts with a word boundary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    core.train_from_iterator(["The answer is 4.", "Q: what is two plus two? A: four.", "2+2=4"] * 50,
                             trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("prompt, completion", [("Q: what is two plus two? A:", " four."), ("2+2=", "4")])
def test_a_completion_gets_no_space_the_data_does_not_have(sentencepiece_style_tokenizer, prompt, completion):
    """Encoded on its own, the completion "4" became "▁4": the student learned "2+2= 4"."""
    tokenizer = sentencepiece_style_tokenizer
    ids, prompt_len = _render({"prompt": prompt, "completion": completion}, "prompt", tokenizer)
    assert tokenizer.decode(ids, skip_special_tokens=True) == prompt + completion
    assert ids[-1] == tokenizer.eos_token_id and ids[:prompt_len] == tokenizer.encode(prompt)[:prompt_len]
    assert tokenizer.decode(ids[prompt_len:-1]).endswith(completion.strip())


def test_a_plain_prompt_to_complete_keeps_its_bos_when_cut(sentencepiece_style_tokenizer):
    tokenizer = sentencepiece_style_tokenizer
    record = {"prompt": "The answer is 4. " * 20 + "Q: what is two plus two? A:"}
    ids, _ = _render(record, "prompt", tokenizer, gen=True)
    head = prompt_head(record, "src record 0", "prompt", tokenizer, ids, chat_template=False, room=12)
    cut = fit_length(ids, 12, "truncate", keep_end=True, head=head)
    assert head == 1 and cut[0] == tokenizer.bos_token_id and cut[1:] == ids[-11:]


def test_a_long_history_leaves_the_cut_in_it_and_keeps_the_last_turn(tokenizer: Any) -> None:
    """The head of a multi-turn chat runs to its last turn: when that takes more than half the
    room, the cut keeps the BOS it starts with (SmolLM2 calls <|im_start|> its BOS) and the end."""
    messages = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "ok " * 40},
                {"role": "user", "content": "Name a colour."}]
    record = {"messages": messages}
    ids, _ = _render(record, "messages", tokenizer, gen=True)
    head = prompt_head(record, "r", "messages", tokenizer, ids, chat_template=False, room=400)
    assert tokenizer.decode(ids[:head]).endswith("ok <|im_end|>\n<|im_start|>user\n")
    assert tokenizer.decode(ids[head:]) == "Name a colour.<|im_end|>\n<|im_start|>assistant\n"
    assert ids[0] == tokenizer.bos_token_id
    assert prompt_head(record, "r", "messages", tokenizer, ids, chat_template=False, room=60) == 1
    for room in (1, 2, 3, 60, 400):   # never over half the room, which fit_length needs for the end
        head = prompt_head(record, "r", "messages", tokenizer, ids, chat_template=False, room=room)
        assert head <= room // 2 and len(fit_length(ids, room, "truncate", keep_end=True, head=head)) == min(room, len(ids))


def test_a_completion_ending_with_eos_gets_no_second_one(tokenizer: Any) -> None:
    ids, _ = _render({"prompt": "Q?", "completion": " A.<|im_end|>\n"}, "prompt", tokenizer)
    assert ids.count(tokenizer.eos_token_id) == 1


def test_chat_prompt_completion_matches_the_template(tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    ids, prompt_len = _render({"prompt": "Name a colour.", "completion": "Blue."}, "prompt", tokenizer, chat=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids) == full
    assert tokenizer.decode(ids[:prompt_len]) == prompt
    assert tokenizer.decode(ids[prompt_len:]).startswith("Blue.")
    assert _render({"messages": messages}, "messages", tokenizer) == (ids, prompt_len)


def test_openai_text_parts_render_as_their_text_joined_by_newlines(tokenizer: Any) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name"}, {"type": "text", "text": "a colour."}]},
             {"role": "assistant", "content": "Blue."}]
    plain = [{"role": "user", "content": "Name\na colour."}, {"role": "assistant", "content": "Blue."}]
    assert _render({"messages": parts}, "messages", tokenizer) == _render({"messages": plain}, "messages", tokenizer)


def test_messages_in_generate_mode_drop_the_final_answer(tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    ids, prompt_len = _render({"messages": messages}, "messages", tokenizer, gen=True)
    expected = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids) == expected and prompt_len == len(ids)


def test_a_prompt_ending_in_an_assistant_turn_still_asks_for_an_answer_in_generate_mode(tokenizer: Any) -> None:
    """Two assistant turns at the end: with the last one dropped, the other was taken for the
    completion and rendered closed, so the teacher continued after an end of turn, unasked."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"},
                {"role": "assistant", "content": "b"}]
    ids, prompt_len = _render({"messages": messages}, "messages", tokenizer, gen=True)
    expected = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids) == expected and prompt_len == len(ids)
    assert expected.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("record, field, message", [
    ({"content": "x"}, "text", "src record 0: no field 'text' (data.field), record has ['content']"),
    ({"prompt": "   "}, "prompt", "src record 0: empty prompt"),
    ({"prompt": 3}, "prompt", "field 'prompt' must be a string, got int"),
    ({"text": ""}, "text", "src record 0: empty text"),
    ({"messages": []}, "messages", "src record 0: empty prompt"),
    ({"messages": [{"role": "assistant", "content": "an answer to nothing"}]}, "messages",
     "src record 0: empty prompt (field 'messages' has no non-blank turn but the assistant's before its last answer)"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "A"}]}, "messages",
     "src record 0: empty prompt"),
    ({"messages": [{"role": "user", "content": "Hi \ud83d"}]}, "messages",
     "src record 0: field 'messages' holds '\\ud83d', half of a UTF-16 surrogate pair, not text"),
    ({"text": b"bytes from a parquet binary column"}, "text", "field 'text' must be a string, got bytes"),
    ({"text": "cut \ud83d"}, "text", "src record 0: field 'text' holds '\\ud83d', half of a UTF-16 surrogate pair"),
    ({"messages": [{"role": "user"}]}, "messages", "must hold {role, content} objects"),
    ({"messages": [{"role": "user", "content": None}]}, "messages",
     "src record 0: message 0: content must be a string or a list of {type: text, text} parts, got None"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 42}]}, "messages",
     "src record 0: message 1: content must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages",
     "src record 0: message 0: content must be a string or a list of {type: text, text} parts"),
    ({"messages": "hello"}, "messages", "src record 0: field 'messages' must be a list of {role, content} objects, "
                                        "got str"),
    ({"messages": [{"role": 1, "content": "hello"}]}, "messages",
     "src record 0: message 0: role must be a non-empty string, got 1"),
    ({"prompt": "fine", "completion": "cut \ud83d"}, "prompt",
     "src record 0: field 'completion' holds '\\ud83d', half of a UTF-16 surrogate pair"),
])
def test_bad_records_are_one_clear_line(tokenizer: Any, record: dict, field: str, message: str) -> None:
    with pytest.raises(DataError) as info:
        _render(record, field, tokenizer)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_chat_template_that_refuses_the_conversation_is_one_line(tokenizer: Any) -> None:
    """Gemma's and Mistral's templates raise on a system turn (jinja's raise_exception)."""
    import copy

    strict = copy.deepcopy(tokenizer)
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}"
                            "{{ m['content'] }}{% endfor %}")
    record = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    with pytest.raises(DataError) as info:
        _render(record, "messages", strict)
    assert str(info.value) == ("src record 0: the teacher's chat template refused this conversation "
                               "(TemplateError: System role not supported)")


def test_length_limits() -> None:
    assert fit_length([1, 2, 3], 3, "drop") == [1, 2, 3]
    assert fit_length([1, 2, 3, 4], 3, "truncate") == [1, 2, 3]
    assert fit_length([1, 2, 3, 4], 3, "drop") is None
    assert fit_length([1, 2, 3, 4], 3, "truncate", keep_end=True) == [2, 3, 4]   # a prompt keeps its end
    assert fit_length([1, 2, 3, 4, 5, 6], 4, "truncate", keep_end=True, head=1) == [1, 4, 5, 6]   # and its BOS
    with pytest.raises(ValueError, match="over half"):   # prompt_head keeps a head to half the room
        fit_length([1, 2, 3, 4, 5, 6], 4, "truncate", keep_end=True, head=3)
    assert fit_length([1, 2, 3, 4], 3, "drop", keep_end=True) is None
    windows = list(pack([[1, 2], [3, 4, 5], [6, 9]], 3, separator=9))
    # separator appended unless the record already ends with it; a last window needs 2 tokens
    assert windows == [[1, 2, 9], [3, 4, 5], [9, 6, 9]]
    assert list(pack([[1, 2, 9], [3, 4]], 4, separator=9)) == [[1, 2, 9, 3], [4, 9]]   # no second 9 after the first
    assert list(pack([[1, 2, 3, 4]], 3, separator=None)) == [[1, 2, 3]]


def test_random_tokens_are_uniform_seeded_and_sliceable() -> None:
    every = list(random_sequences(6, 4000, 50, seed=1, indices=range(6)))
    odd = list(random_sequences(6, 4000, 50, seed=1, indices=range(1, 6, 2)))
    assert [s.id for s in every[1::2]] == [s.id for s in odd]
    assert all(np.array_equal(a.input_ids, b.input_ids) for a, b in zip(every[1::2], odd))
    tokens = np.concatenate([s.input_ids for s in every])
    assert tokens.min() == 0 and tokens.max() == 49
    counts = np.bincount(tokens, minlength=50)
    expected = len(tokens) / 50
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 100  # 49 degrees of freedom: p < 1e-4 beyond ~95
    other = list(random_sequences(1, 4000, 50, seed=2, indices=range(1)))
    assert not np.array_equal(other[0].input_ids, every[0].input_ids)


def test_a_chat_prompt_without_an_answer_ends_at_its_turn_when_packed(tokenizer: Any) -> None:
    """Packed, the next record follows: an open assistant turn there would teach that a new
    conversation is the answer (prompt records with data.chat_template, as messages records)."""
    user = [{"role": "user", "content": "Name a colour."}]
    record = {"prompt": "Name a colour."}
    packed = render_record(record, "r", "prompt", tokenizer, chat_template=True, for_generation=False, packed=True)
    closed = tokenizer.encode(tokenizer.apply_chat_template(user, tokenize=False), add_special_tokens=False)
    assert packed == (closed, len(closed))
    assert tokenizer.decode(closed).endswith("Name a colour.<|im_end|>\n")
    alone = _render(record, "prompt", tokenizer, chat=True)   # unpacked: the teacher's cue to answer
    assert tokenizer.decode(alone[0]).endswith("Name a colour.<|im_end|>\n<|im_start|>assistant\n")


def test_an_empty_completion_is_no_completion_with_or_without_the_chat_template(tokenizer: Any) -> None:
    """"completion": "" is a record with no answer (as a missing one), not an empty assistant
    turn closed and then asked again."""
    for chat in (False, True):
        assert _render({"prompt": "Q?", "completion": ""}, "prompt", tokenizer, chat=chat) \
            == _render({"prompt": "Q?"}, "prompt", tokenizer, chat=chat)


def test_a_chat_head_of_exactly_half_the_room_is_kept(tokenizer: Any) -> None:
    """The template's start (system turn, user header) is kept while it takes at most half the
    room: at exactly half it stays, one token less room and only the BOS does."""
    record = {"messages": [{"role": "user", "content": "word " * 40 + "Name a colour."}]}
    ids, _ = _render(record, "messages", tokenizer, gen=True)
    head_text = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n<|im_start|>user\n")
    head = len(tokenizer.encode(head_text, add_special_tokens=False))
    assert tokenizer.decode(ids[:head]) == head_text and len(ids) > 2 * head
    assert prompt_head(record, "r", "messages", tokenizer, ids, chat_template=False, room=2 * head) == head
    assert prompt_head(record, "r", "messages", tokenizer, ids, chat_template=False, room=2 * head - 1) == 1


def test_random_sequences_of_two_seeds_share_none_and_stop_at_their_number() -> None:
    """Another data.random.seed gives other sequences, not the same ones shifted by an index."""
    one = {tuple(s.input_ids.tolist()) for s in random_sequences(8, 16, 1000, seed=1, indices=range(8))}
    two = {tuple(s.input_ids.tolist()) for s in random_sequences(8, 16, 1000, seed=2, indices=range(8))}
    assert len(one) == len(two) == 8 and not one & two
    assert [s.source_position for s in random_sequences(4, 4, 10, seed=0, indices=range(0, 100, 2))] == [0, 2]
