"""Records -> token sequences: fields, chat templates, length limits, random tokens.

A :class:`TokenSequence` is what the teacher sees.  ``prompt_len`` marks where the part
the teacher did not write ends: in score mode targets start there unless
``generate.include_prompt`` is on; in generate mode the whole sequence *is* the prompt
and the teacher appends a completion.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from qadpipe.data.records import ID_HEX_CHARS
from qadpipe.errors import DataError, first_line


@dataclass(frozen=True)
class TokenSequence:
    """One teacher input: ``input_ids`` int32 ``[T]``, of which the first ``prompt_len``
    tokens are prompt (0 for plain text)."""

    id: str
    input_ids: np.ndarray
    prompt_len: int = 0
    source_position: int = -1
    source_line: Optional[int] = None   # in a line-based file (errors name it)


def render_record(record: dict[str, Any], where: str, field: str, tokenizer: Any, *,
                  chat_template: bool, for_generation: bool, chat_date: Optional[str] = None,
                  packed: bool = False) -> tuple[list[int], int]:
    """One record -> (token ids, prompt length).

    * ``text``: the whole text, prompt length 0.
    * ``prompt`` (+ optional ``completion``): the text ``prompt + completion`` tokenized as
      one, as written (tokenized apart, a SentencePiece tokenizer's completion would start
      with a word-boundary "▁" that is no space of the data), then the tokenizer's EOS, so the
      student learns where a completion ends, as a chat template's end of turn teaches it
      (TRL's SFT appends it too); with ``chat_template`` they become a user and an assistant
      turn of the teacher's template.
    * ``messages``: a chat rendered with the teacher's template; a final assistant turn
      is the completion (in generate mode it is dropped: the teacher writes its own).

    A chat without an answer ends with the template's open assistant turn (its generation
    prompt), the teacher's cue to answer -- except when ``packed``: there the next record
    follows, and an open turn would teach that a new conversation answers it.

    A template that prints today's date renders ``chat_date`` (``data.chat_date``) instead.

    The prompt length is where the tokens of ``prompt`` alone stop matching: a token that
    straddles the boundary (``"=4"`` merged) counts as completion.
    """
    if field not in record:
        raise DataError(f"{where}: no field '{field}' (data.field), record has {sorted(record)}")
    _refuse_unencodable(record[field], where, field)
    if field == "text":
        text = _nonempty_str(record["text"], where, "text")
        return tokenizer.encode(text), 0
    if field == "prompt":
        prompt = _nonempty_str(record["prompt"], where, "prompt")
        completion = None if for_generation else record.get("completion")
        if completion is not None and not isinstance(completion, str):
            raise DataError(f"{where}: field 'completion' must be a string, got {type(completion).__name__}")
        _refuse_unencodable(completion, where, "completion")
        if chat_template:
            messages = [{"role": "user", "content": prompt}]
            if completion:
                messages.append({"role": "assistant", "content": completion})
            return _render_chat(messages, tokenizer, where, chat_date, answered=bool(completion),
                                open_turn=not packed)
        prompt_ids = tokenizer.encode(prompt)
        if not completion:
            return prompt_ids, len(prompt_ids)
        ids = tokenizer.encode(prompt + completion)
        if tokenizer.eos_token_id is not None and not completion.rstrip().endswith(tokenizer.eos_token):
            ids.append(tokenizer.eos_token_id)
        return ids, _common_prefix(ids, prompt_ids)
    messages = _messages(record["messages"], where)
    asked = messages[:-1] if messages[-1]["role"] == "assistant" else messages
    if not any(m["content"].strip() for m in asked if m["role"] != "assistant"):   # an answer to nothing
        raise DataError(f"{where}: empty prompt (field 'messages' has no non-blank turn but the assistant's "
                        "before its last answer)")
    if for_generation:   # the teacher answers after the prompt, even one ending in an assistant turn
        messages = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        return _render_chat(messages, tokenizer, where, chat_date, answered=False, open_turn=True)
    return _render_chat(messages, tokenizer, where, chat_date, answered=messages[-1]["role"] == "assistant",
                        open_turn=not packed)


def _refuse_unencodable(value: Any, where: str, field: str) -> None:
    """JSON may escape half of a UTF-16 surrogate pair (``"\\ud83d"``: an emoji cut in two by
    a scraper); Python keeps it as a string that no tokenizer or UTF-8 encoder accepts."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except TypeError:   # not JSON text at all (bytes, a date): the field's own type check says so
        return
    except UnicodeEncodeError as exc:
        raise DataError(f"{where}: field '{field}' holds {exc.object[exc.start:exc.end]!r}, half of a UTF-16 "
                        "surrogate pair, not text; fix or drop the record") from None


def _nonempty_str(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: empty {name} (field '{name}' is blank)")
    return value


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise DataError(f"{where}: field 'messages' must be a list of {{role, content}} objects, "
                        f"got {type(value).__name__}")
    if not value:
        raise DataError(f"{where}: empty prompt (field 'messages' is an empty list)")
    turns = []
    for index, turn in enumerate(value):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise DataError(f"{where}: field 'messages' must hold {{role, content}} objects, got {turn!r:.80}")
        if not isinstance(turn["role"], str) or not turn["role"]:
            raise DataError(f"{where}: message {index}: role must be a non-empty string, got {turn['role']!r:.40}")
        turns.append({**turn, "content": _text_content(turn["content"], f"{where}: message {index}")})
    if not any(turn["content"].strip() for turn in turns):
        raise DataError(f"{where}: empty prompt (every turn of 'messages' is blank)")
    return turns


def _text_content(content: Any, where: str) -> str:
    """A turn's text: a string, or OpenAI-style text parts ``[{"type": "text", "text": ...}]``
    joined with newlines (as vLLM's chat parser joins them)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            for part in content):
        return "\n".join(part["text"] for part in content)
    raise DataError(f"{where}: content must be a string or a list of {{type: text, text}} parts, "
                    f"got {content!r:.60}")


def _render_chat(messages: list[dict[str, str]], tokenizer: Any, where: str, chat_date: Optional[str], *,
                 answered: bool, open_turn: bool) -> tuple[list[int], int]:
    """Template-render a chat: ``answered``, its final (assistant) turn is the completion;
    else all of it is the prompt, followed by the open assistant turn when ``open_turn``."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: chat records need a tokenizer with a chat template; the teacher's has none")
    text = _apply_template(tokenizer, messages, not answered and open_turn, where, chat_date)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not answered:
        return ids, len(ids)
    prompt_text = _apply_template(tokenizer, messages[:-1], True, where, chat_date)
    if not text.startswith(prompt_text):
        raise DataError(f"{where}: the chat template does not render the prompt as a prefix of the "
                        "conversation, so the completion boundary is undefined")
    # Tokens that straddle the boundary (rare) count as completion.
    return ids, _common_prefix(ids, tokenizer.encode(prompt_text, add_special_tokens=False))


def template_prints_date(tokenizer: Any) -> bool:
    """Whether the chat template ``apply_chat_template`` renders (of several named templates, the
    default one) prints today's date (transformers' ``strftime_now``): what decides whether
    ``data.chat_date`` shapes the tokens, for rendering and for the data fingerprint alike."""
    try:
        return "strftime_now" in tokenizer.get_chat_template()
    except ValueError:   # no template at all: rendering says so
        return False


def _apply_template(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, where: str,
                    chat_date: Optional[str]) -> str:
    """The teacher's chat template, rendered; a template that refuses the conversation (Gemma's
    and Mistral's raise on a system turn or turns that do not alternate) is one line naming
    the record.

    A template that prints today's date (transformers' ``strftime_now``: Llama 3.x, Granite,
    SmolLM3) renders ``chat_date`` instead of the wall clock's, which would give a record other
    tokens in a task or resume run on another day, under the same id and fingerprint.  Without
    one it is refused: no date is right for every cache."""
    clock = {}
    if template_prints_date(tokenizer):
        if chat_date is None:
            raise DataError("data.chat_date: the teacher's chat template prints today's date (strftime_now), so "
                            "tasks and resumes on other days would render other tokens; set the date it renders, "
                            f"e.g. --set data.chat_date={datetime.date.today().isoformat()}")
        day = datetime.datetime.fromisoformat(chat_date)
        clock["strftime_now"] = day.strftime   # a render variable: it shadows transformers' global
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                             **clock)
    except Exception as exc:   # jinja2's TemplateError (raise_exception), TypeError, KeyError ... from the template
        raise DataError(f"{where}: the teacher's chat template refused this conversation "
                        f"({type(exc).__name__}: {first_line(exc)})") from None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def fit_length(ids: list[int], max_length: int, overflow: str, *, keep_end: bool = False,
               head: int = 0) -> Optional[list[int]]:
    """Apply the length limit to one record: truncate or drop (return ``None``).  Truncation
    keeps the first tokens of a sequence to score, the last of a prompt to complete
    (``keep_end``): a prompt cut at its end would lose the chat template's assistant header,
    and the teacher would continue the user's text instead of answering.  Its first ``head``
    tokens stay too (see :func:`prompt_head`, which decides them: the BOS and the template's
    start, which a Llama-family teacher without them answers worse, at most half the room);
    the cut falls in the text after them.  Packing works across records: see :func:`pack`."""
    if head > max_length // 2:   # prompt_head's bound: a longer head would leave the prompt's end no room
        raise ValueError(f"head={head} is over half of max_length={max_length}")
    if len(ids) <= max_length:
        return ids
    if overflow != "truncate":
        return None
    if not keep_end:
        return ids[:max_length]
    return ids[:head] + ids[len(ids) - (max_length - head):]


def prompt_head(record: dict[str, Any], where: str, field: str, tokenizer: Any, ids: list[int], *,
                chat_template: bool, room: int, chat_date: Optional[str] = None) -> int:
    """How many leading tokens of a prompt to complete (``ids``, from :func:`render_record`)
    a cut to ``room`` tokens keeps: for a chat, the template's start up to its last turn's
    text (BOS, system prompt, earlier turns, that turn's header), found by rendering the turn
    empty, while that takes at most half the room; else, and for plain text, the BOS the
    prompt starts with, if any.  Only called for a prompt too long."""
    leading = int(bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id)
    if field == "messages" or (field == "prompt" and chat_template):
        messages = ([{"role": "user", "content": record["prompt"]}] if field == "prompt"
                    else _messages(record["messages"], where))
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        last = max(i for i, message in enumerate(messages) if message["role"] != "assistant")
        emptied = [*messages[:last], {**messages[last], "content": ""}, *messages[last + 1:]]
        head = _common_prefix(ids, tokenizer.encode(_apply_template(tokenizer, emptied, True, where, chat_date),
                                                    add_special_tokens=False))
        if head <= room // 2:
            return head
    return min(leading, room // 2)


def pack(sequences: Iterable[list[int]], max_length: int, separator: Optional[int]) -> Iterator[list[int]]:
    """Concatenate records (``separator`` between them unless one already ends with it)
    and cut the stream into windows of ``max_length``; a last window keeps ≥ 2 tokens."""
    buffer: list[int] = []
    for ids in sequences:
        buffer.extend(ids)
        if separator is not None and (not ids or ids[-1] != separator):
            buffer.append(separator)
        while len(buffer) >= max_length:
            yield buffer[:max_length]
            buffer = buffer[max_length:]
    if len(buffer) >= 2:
        yield buffer


def content_id(kind: str, index: int, ids: np.ndarray) -> str:
    """Id of a sequence made by qadpipe (a packed window, a random sequence): hash of its
    kind, index and tokens."""
    digest = hashlib.sha256(f"{kind}:{index}:".encode())
    digest.update(np.ascontiguousarray(ids, dtype=np.int32).tobytes())
    return digest.hexdigest()[:ID_HEX_CHARS]


def random_sequences(num_sequences: int, length: int, vocab_size: int, seed: int,
                     indices: Iterable[int]) -> Iterator[TokenSequence]:
    """Uniform random tokens in ``[0, vocab_size)``; sequence ``i`` depends only on
    ``(seed, i)``, so any task can make its own slice without drawing the others."""
    for index in indices:
        if index >= num_sequences:
            break
        rng = np.random.default_rng([seed, index])
        ids = rng.integers(0, vocab_size, size=length, dtype=np.int64).astype(np.int32)
        yield TokenSequence(content_id(f"random-{seed}", index, ids), ids, 0, index)
