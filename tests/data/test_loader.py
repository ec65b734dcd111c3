"""Config -> one task's sequences: deterministic split, limits, packing, fingerprints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qadpipe.config import build_config
from qadpipe.data import load_sequences
from qadpipe.data.loader import data_fingerprint
from qadpipe.errors import ConfigError, DataError


def _config(tmp_path: Path, records: list[dict], **data: Any) -> Any:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    generate = data.pop("generate", {})
    return build_config({"data": {"source": str(path), **data}, "generate": generate})


TEXTS = [{"text": f"Record number {i} says something {'long ' * i}"} for i in range(10)]


def test_task_split_is_a_partition(tmp_path: Path, tokenizer: Any) -> None:
    cfg = _config(tmp_path, TEXTS)
    whole = load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer))
    parts = [load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer), shard_index=i, num_shards=3)
             for i in range(3)]
    assert sorted(s.id for p in parts for s in p.sequences) == sorted(s.id for s in whole.sequences)
    assert [s.source_position for s in parts[1].sequences] == [1, 4, 7]
    assert {p.fingerprint for p in parts} == {whole.fingerprint}  # describes the whole source


def test_limit_truncate_and_drop(tmp_path: Path, tokenizer: Any) -> None:
    lengths = [len(tokenizer.encode(r["text"])) for r in TEXTS]
    cut = sorted(lengths)[5]
    truncated = _config(tmp_path, TEXTS, max_length=cut, limit=8)
    got = load_sequences(truncated.data, truncated.generate, tokenizer, len(tokenizer)).sequences
    assert [len(s.input_ids) for s in got] == [min(n, cut) for n in lengths[:8]]
    dropped = _config(tmp_path, TEXTS, max_length=cut, overflow="drop")
    kept = load_sequences(dropped.data, dropped.generate, tokenizer, len(tokenizer))
    assert [len(s.input_ids) for s in kept.sequences] == [n for n in lengths if n <= cut]
    assert kept.dropped == sum(n > cut for n in lengths)
    first = next(i for i, n in enumerate(lengths) if n > cut)
    assert kept.drop_summary() == (f"{kept.dropped} longer than {cut} tokens with data.overflow=drop "
                                   f"(first: record {first}, line {first + 1})")


def test_pack_concatenates_every_record(tmp_path: Path, tokenizer: Any) -> None:
    cfg = _config(tmp_path, TEXTS, max_length=16, overflow="pack")
    windows = load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer)).sequences
    stream = [t for r in TEXTS for t in tokenizer.encode(r["text"]) + [tokenizer.eos_token_id]]
    remainder = len(stream) % 16
    expected = stream if remainder != 1 else stream[:-1]  # a 1-token last window has no target
    assert np.concatenate([w.input_ids for w in windows]).tolist() == expected
    assert all(len(w.input_ids) == 16 for w in windows[:-1]) and all(w.prompt_len == 0 for w in windows)


def test_packed_windows_split_across_tasks_add_up_to_one_run(tmp_path: Path, tokenizer: Any) -> None:
    """Windows are cut from the whole stream, then dealt to the tasks: packing each task's own
    records would give other windows (and, cut apart, lose their ends)."""
    cfg = _config(tmp_path, TEXTS, max_length=16, overflow="pack")
    whole = load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer)).sequences
    parts = [load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer), shard_index=i, num_shards=3).sequences
             for i in range(3)]
    assert sorted(s.id for part in parts for s in part) == sorted(s.id for s in whole)


def test_packed_chats_follow_each_other_as_the_template_ends_them(tmp_path: Path, tokenizer: Any) -> None:
    """A chat record ends with its end of turn ("<|im_end|>\n" in ChatML); an EOS appended after
    it put "<|im_end|>\n<|im_end|>" in every window, once per conversation.  One without an
    answer ends there too: its open assistant turn ("<|im_start|>assistant\n") was followed by
    the next conversation, which the student learned as the answer."""
    chats = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"A{i}."}]}
             for i in range(4)]
    chats[1]["messages"].pop()
    chats[2]["messages"].pop()
    cfg = _config(tmp_path, chats, field="messages", max_length=32, overflow="pack")
    windows = load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer)).sequences
    assert "assistant\n<|im_start|>" not in tokenizer.decode(np.concatenate([w.input_ids for w in windows]))
    stream = [t for chat in chats for t in tokenizer.encode(
        tokenizer.apply_chat_template(chat["messages"], tokenize=False), add_special_tokens=False)]
    expected = stream if len(stream) % 32 != 1 else stream[:-1]   # a 1-token last window has no target
    assert np.concatenate([w.input_ids for w in windows]).tolist() == expected


def test_prompt_only_records_are_dropped_when_the_prompt_is_not_distilled(tmp_path: Path, tokenizer: Any) -> None:
    records = [{"prompt": "a question", "completion": " an answer"}, {"prompt": "no answer here"}]
    cfg = _config(tmp_path, records, field="prompt", generate={"include_prompt": False})
    got = load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer))
    assert len(got.sequences) == 1 and got.dropped == 1
    assert got.drop_summary() == ("1 with no completion tokens to distil (generate.include_prompt=false) "
                                  "(first: record 1, line 2)")
    assert got.sequences[0].prompt_len == len(tokenizer.encode("a question"))


def test_generate_mode_leaves_room_for_the_completion(tmp_path: Path, tokenizer: Any) -> None:
    cfg = _config(tmp_path, [{"prompt": "word " * 50}], field="prompt", max_length=30,
                  generate={"mode": "generate", "max_new_tokens": 10})
    (seq,) = load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer)).sequences
    assert len(seq.input_ids) == 20 and seq.prompt_len == 20


def test_raw_prompts_for_a_teacher_with_a_chat_template_are_said(tmp_path: Path, tokenizer: Any, caplog) -> None:
    cfg = _config(tmp_path, [{"prompt": "Name a colour."}], field="prompt", generate={"mode": "generate"})
    load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer))
    assert "data.chat_template=false: the prompts reach the teacher as raw text" in caplog.text
    caplog.clear()
    cfg = _config(tmp_path, [{"prompt": "Name a colour."}], field="prompt", chat_template=True,
                  generate={"mode": "generate"})
    load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer))
    assert "raw text" not in caplog.text


def test_a_long_chat_prompt_keeps_its_end_with_the_assistant_header(tmp_path: Path, tokenizer: Any) -> None:
    """Cut at its end, the prompt would lose '<|im_start|>assistant' and the teacher would go on
    with the user's words instead of answering them."""
    cfg = _config(tmp_path, [{"prompt": "word " * 60 + "What is the sea?"}], field="prompt", chat_template=True,
                  max_length=80, generate={"mode": "generate", "max_new_tokens": 20})
    (seq,) = load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer)).sequences
    text = tokenizer.decode(seq.input_ids.tolist())
    assert len(seq.input_ids) == 60 and text.endswith("What is the sea?<|im_end|>\n<|im_start|>assistant\n"), text
    # and its start, the template's system turn and user header, as the teacher is always prompted
    start = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False).split("<|im_start|>user")[0]
    assert text.startswith(start + "<|im_start|>user\n word word"), text   # the cut falls in the user's text


@pytest.mark.parametrize("data, generate, message", [
    ({"overflow": "pack"}, {"mode": "generate"}, "data.overflow: got 'pack', expected truncate or drop in generate mode"),
    ({"overflow": "pack"}, {"include_prompt": False}, "data.overflow: got 'pack'"),
    ({"max_length": 64}, {"mode": "generate", "max_new_tokens": 64}, "data.max_length: got 64, expected more than"),
])
def test_impossible_combinations_are_config_errors(tmp_path: Path, tokenizer: Any, data: dict, generate: dict,
                                                   message: str) -> None:
    cfg = _config(tmp_path, TEXTS, **data, generate=generate)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer))


def test_fingerprint_changes_with_anything_that_shapes_the_rows(tmp_path: Path) -> None:
    base = _config(tmp_path, TEXTS)
    fp = data_fingerprint(base.data, base.generate, 100)
    assert fp == data_fingerprint(base.data, base.generate, 100)
    shorter = _config(tmp_path, TEXTS, max_length=64)
    assert data_fingerprint(shorter.data, shorter.generate, 100) != fp
    assert data_fingerprint(base.data, base.generate, 101) != fp
    assert data_fingerprint(base.data, base.generate, 100, chat_template="{{ messages }}") != fp
    edited = _config(tmp_path, TEXTS[:-1])
    assert data_fingerprint(edited.data, edited.generate, 100) != fp
    dated = _config(tmp_path, TEXTS, chat_date="2031-05-17")
    assert data_fingerprint(dated.data, dated.generate, 100, chat_template=DATED_TEMPLATE, prints_date=True) \
        != data_fingerprint(base.data, base.generate, 100, chat_template=DATED_TEMPLATE, prints_date=True)
    # a date no template prints renders nothing: the tasks setting it and those not agree
    assert data_fingerprint(dated.data, dated.generate, 100) == fp
    assert data_fingerprint(dated.data, dated.generate, 100, chat_template="{{ messages }}") \
        == data_fingerprint(base.data, base.generate, 100, chat_template="{{ messages }}")


def test_a_fingerprint_without_a_chat_date_is_the_one_written_before_the_field_existed(tmp_path: Path) -> None:
    """Computed by the previous qadpipe (9076001) for these very bytes: resuming an existing
    cache must not be refused as another data source."""
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) + "\n" for i in range(3)))
    cfg = build_config({"data": {"source": str(path), "field": "messages"}})
    assert data_fingerprint(cfg.data, cfg.generate, 100, chat_template="{{ messages }}") \
        == "sha256:948c9d9db5b46893c28c32d8dc755df4"


DATED_TEMPLATE = ('{{- "Today Date: " + strftime_now("%d %b %Y") + "\\n" }}{% for m in messages %}'
                  '{{ m["role"] }}: {{ m["content"] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}')


def test_a_template_that_prints_today_renders_the_chat_date_whatever_the_clock(tmp_path: Path, tokenizer: Any,
                                                                             monkeypatch) -> None:
    """Llama 3.x's template prints strftime_now's date: a task or resume on another day got other
    tokens under the same ids and fingerprint."""
    import datetime

    from transformers.utils import chat_template_utils

    monkeypatch.setattr(tokenizer, "chat_template", DATED_TEMPLATE)
    chats = [{"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]}]
    undated = _config(tmp_path, chats, field="messages")
    with pytest.raises(DataError, match=r"^data\.chat_date: the teacher's chat template prints today's date"):
        load_sequences(undated.data, undated.generate, tokenizer, len(tokenizer))
    dated = _config(tmp_path, chats, field="messages", chat_date="2031-05-17")
    rendered = []
    for today in (datetime.datetime(2026, 12, 7), datetime.datetime(2027, 1, 1)):
        clock = type("Clock", (datetime.datetime,), {"now": classmethod(lambda cls, tz=None, day=today: day)})
        monkeypatch.setattr(chat_template_utils, "datetime", clock)
        rendered.append(load_sequences(dated.data, dated.generate, tokenizer, len(tokenizer)).sequences[0].input_ids)
    assert rendered[0].tolist() == rendered[1].tolist()
    assert tokenizer.decode(rendered[0]).startswith("Today Date: 17 May 2031\nuser: Name a colour.")
    # named templates: only the one rendered (the default) decides; a dated tool_use one does not
    monkeypatch.setattr(tokenizer, "chat_template", {"default": DATED_TEMPLATE.split("}}", 1)[1],
                                                     "tool_use": DATED_TEMPLATE})
    plain = load_sequences(undated.data, undated.generate, tokenizer, len(tokenizer))
    assert tokenizer.decode(plain.sequences[0].input_ids).startswith("user: Name a colour.")
    # and the date it does not print is not in the fingerprint either: tasks setting it and not agree
    assert load_sequences(dated.data, dated.generate, tokenizer, len(tokenizer)).fingerprint == plain.fingerprint


def test_the_chat_template_counts_only_where_it_renders_the_records(tmp_path: Path, smollm2_dir: Path) -> None:
    """A text source with data.chat_template=true is not rendered by the template: editing the
    template must not make its cache refuse the next task."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))   # its own copy: the template is edited
    cfg = _config(tmp_path, TEXTS, chat_template=True)
    before = load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer)).fingerprint
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    assert load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer)).fingerprint == before


def test_fingerprint_counts_the_source_by_its_bytes_not_its_path_or_unused_settings(tmp_path: Path) -> None:
    """Tasks reading node-local copies of one file wrote fingerprints that differed by the
    path, and the cache refused the second task; so did an unused data.random.seed."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    here, there = _config(tmp_path / "a", TEXTS), _config(tmp_path / "b", TEXTS)
    reseeded = build_config({"data": {"source": here.data.source, "random": {"seed": 5}}})
    fp = data_fingerprint(here.data, here.generate, 100)
    assert data_fingerprint(there.data, there.generate, 100) == fp
    assert data_fingerprint(reseeded.data, reseeded.generate, 100) == fp
    random_a = build_config({"data": {"source": "random", "random": {"seed": 1}}})
    random_b = build_config({"data": {"source": "random", "random": {"seed": 2}}})
    assert data_fingerprint(random_a.data, random_a.generate, 100) != data_fingerprint(random_b.data,
                                                                                       random_b.generate, 100)


def test_random_source_split_and_size(tokenizer: Any, caplog: Any) -> None:
    cfg = build_config({"data": {"random": {"num_sequences": 5, "length": 12, "seed": 3}}})
    parts = [load_sequences(cfg.data, cfg.generate, tokenizer, 1000, shard_index=i, num_shards=2) for i in range(2)]
    assert [len(p.sequences) for p in parts] == [3, 2]
    assert all(len(s.input_ids) == 12 and s.input_ids.max() < 1000 for p in parts for s in p.sequences)
    assert "is cut to" not in caplog.text
    capped = build_config({"data": {"max_length": 8, "random": {"num_sequences": 2, "length": 12}}})
    with caplog.at_level("WARNING", logger="qadpipe.data.loader"):
        lengths = [len(s.input_ids) for s in load_sequences(capped.data, capped.generate, tokenizer, 1000).sequences]
    assert lengths == [8, 8] and "data.random.length=12 is cut to 8 tokens: data.max_length=8" in caplog.text


def test_a_one_token_prompt_is_kept_in_generate_mode(tmp_path: Path, tokenizer: Any) -> None:
    """A scored sequence needs two tokens (one to predict from, one to predict); a prompt the
    teacher completes needs one. Short prompts of tokenizers without a BOS were dropped."""
    assert len(tokenizer.encode("Hi")) == 1
    cfg = _config(tmp_path, [{"prompt": "Hi"}, {"prompt": "Tell me a story"}], field="prompt",
                  generate={"mode": "generate", "max_new_tokens": 8})
    data = load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer))
    assert data.dropped == 0 and [len(s.input_ids) for s in data.sequences][0] == 1


def test_records_that_start_with_two_bos_tokens_are_said(tmp_path: Path, tokenizer: Any, monkeypatch, caplog) -> None:
    """Text a chat template already rendered begins with the BOS's text; a tokenizer that adds
    BOS makes it two, which the teacher scores (and the student learns) as data."""
    monkeypatch.setattr(tokenizer, "add_bos_token", True)
    records = [{"text": "plain words"}, {"text": tokenizer.bos_token + "rendered words"},
               {"text": tokenizer.bos_token + "more rendered words"}]
    cfg = _config(tmp_path, records)
    with caplog.at_level("WARNING", logger="qadpipe.data.loader"):
        seqs = load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer)).sequences
    assert [s.input_ids[:2].tolist().count(tokenizer.bos_token_id) for s in seqs] == [1, 2, 2]
    assert f"data: 2 records of this task start with two BOS tokens (first: record 1, line 2): their text already " \
           f"begins with '{tokenizer.bos_token}'" in caplog.text
    caplog.clear()
    cfg = _config(tmp_path, records[:1])
    with caplog.at_level("WARNING", logger="qadpipe.data.loader"):
        load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer))
    assert "BOS" not in caplog.text


def test_limit_takes_the_first_records_of_the_source_whatever_the_split(tmp_path: Path, tokenizer: Any) -> None:
    """data.limit: the first N records of the source, then dealt to the tasks (not N per task)."""
    cfg = _config(tmp_path, TEXTS, limit=4)
    parts = [load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer), shard_index=i, num_shards=2)
             for i in range(2)]
    assert [[s.source_position for s in p.sequences] for p in parts] == [[0, 2], [1, 3]]


def test_packed_windows_are_dealt_to_tasks_by_index_modulo_the_task_count(tmp_path: Path, tokenizer: Any) -> None:
    cfg = _config(tmp_path, TEXTS, max_length=8, overflow="pack")
    whole = load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer)).sequences
    assert len(whole) >= 6
    for i in range(3):
        part = load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer), shard_index=i, num_shards=3)
        assert [s.id for s in part.sequences] == [s.id for s in whole[i::3]]


def test_random_sequences_follow_limit_and_leave_room_for_the_completion(tokenizer: Any) -> None:
    """data.limit caps a random source as it does a file; in generate mode a sequence is a prompt
    and gets data.max_length less generate.max_new_tokens (16 - 6 = 10), as data.random.length says."""
    full = build_config({"data": {"random": {"num_sequences": 5, "length": 12, "seed": 3}}})
    capped = build_config({"data": {"limit": 3, "random": {"num_sequences": 5, "length": 12, "seed": 3}}})
    every = load_sequences(full.data, full.generate, tokenizer, 1000).sequences
    first = load_sequences(capped.data, capped.generate, tokenizer, 1000).sequences
    assert [s.id for s in first] == [s.id for s in every[:3]]
    prompts = build_config({"data": {"max_length": 16, "random": {"num_sequences": 2, "length": 12}},
                            "generate": {"mode": "generate", "max_new_tokens": 6}})
    assert [len(s.input_ids) for s in load_sequences(prompts.data, prompts.generate, tokenizer, 1000).sequences] \
        == [10, 10]


def test_fingerprint_counts_the_sampling_settings_in_generate_mode_only(tmp_path: Path) -> None:
    """Completions sampled at another temperature, top_p, seed or length are other rows: a rerun
    with them must not mix into the cache; in score mode they shape nothing."""
    def fp(**generate: Any) -> str:
        cfg = _config(tmp_path, [{"prompt": "q"}], field="prompt", generate=generate)
        return data_fingerprint(cfg.data, cfg.generate, 100)

    base = fp(mode="generate")
    for change in ({"temperature": 0.5}, {"top_p": 0.9}, {"seed": 1}, {"max_new_tokens": 64}):
        assert fp(mode="generate", **change) != base, change
        assert fp(mode="score", **change) == fp(mode="score"), change


def test_prompts_to_complete_are_kept_when_the_prompt_is_not_distilled(tmp_path: Path, tokenizer: Any) -> None:
    """generate.include_prompt=false in generate mode: the teacher writes the completion, so a
    record that is all prompt is what is wanted, not a record with nothing to distil."""
    records = [{"prompt": "Name a colour."}, {"messages": [{"role": "user", "content": "Hi"}]}]
    for field, record in zip(("prompt", "messages"), records):
        cfg = _config(tmp_path, [record], field=field, chat_template=True,
                      generate={"mode": "generate", "include_prompt": False})
        got = load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer))
        assert got.dropped == 0 and [s.prompt_len for s in got.sequences] == [len(got.sequences[0].input_ids)]
