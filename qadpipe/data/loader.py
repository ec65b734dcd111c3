"""The data section of the config -> this task's token sequences.

Records are split across tasks by position (``position % num_shards == shard_index``)
before tokenization, so each task only tokenizes its own slice; packing works on the
token stream of all records, so there the split is over windows instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from qadpipe.config.schema import DataConfig, GenerateConfig
from qadpipe.data.records import SourceRecord, iter_records, record_id, source_fingerprint
from qadpipe.data.sequences import (TokenSequence, content_id, fit_length, pack, prompt_head, random_sequences,
                                    render_record, template_prints_date)
from qadpipe.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class DataSlice:
    """One task's sequences, plus what describes the whole source (same in every task)."""

    sequences: list[TokenSequence]
    fingerprint: str
    drop_reasons: dict[str, int] = field(default_factory=dict)  # why (first record's index) -> how many

    @property
    def dropped(self) -> int:
        return sum(self.drop_reasons.values())

    def drop_summary(self) -> str:
        """``"2 longer than 8 tokens with data.overflow=drop (first: record 0), 1 ..."``: each
        reason with the setting to change and a record to look at."""
        return ", ".join(f"{n} {why}" for why, n in self.drop_reasons.items())


def check_data_config(data: DataConfig, gen: GenerateConfig, source_name: str = "data.source") -> None:
    """Combinations the data section cannot serve, refused before anything is read.  The
    source's existence is checked here, where it is read, not when the config loads: a
    shared config names a data file that the machines of later stages need not have."""
    source = Path(data.source).expanduser()
    if data.source != "random" and not source.exists():
        where = "" if source.is_absolute() else f" (relative paths are read from the current directory, {Path.cwd()})"
        raise ConfigError(f"{source_name}: got '{data.source}' (str), expected an existing file or directory{where}")
    if data.overflow == "pack":
        if gen.mode == "generate":
            raise ConfigError("data.overflow: got 'pack', expected truncate or drop in generate mode "
                              "(prompts are not packed)")
        if not gen.include_prompt:
            raise ConfigError("data.overflow: got 'pack', expected truncate or drop when "
                              "generate.include_prompt is false (packed windows have no prompt/completion split)")
    if data.chat_template and data.field == "text" and data.source != "random":
        log.warning("data.chat_template=true does nothing for data.field=text: texts are scored as written "
                    "(it renders prompt records; messages records always use the template)")
    if gen.mode == "generate" and data.max_length - gen.max_new_tokens < 1:
        raise ConfigError(f"data.max_length: got {data.max_length}, expected more than generate.max_new_tokens "
                          f"({gen.max_new_tokens}) so prompt + completion fit in it")


def data_fingerprint(data: DataConfig, gen: GenerateConfig, vocab_size: int, chat_template: str | None = None,
                     source_name: str = "data.source", *, prints_date: bool = False) -> str:
    """Hash of the source bytes and every setting that shapes the sequences or their
    completions (the chat template that renders them included): two tasks writing one cache
    must agree on it, and a rerun with other settings must not silently mix into an existing
    cache.  The source counts by its bytes and file name (a directory's: each file's relative
    path), not by where it lies (each task may read its own copy), and ``data.random`` only
    when it is the source; ``data.chat_date`` only when the rendered template prints it
    (``prints_date``, see :func:`~qadpipe.data.sequences.template_prints_date`)."""
    shaping = asdict(data)
    del shaping["source"]
    if shaping["chat_date"] is None or not prints_date:
        # the date counts only where a template prints it (and fingerprints from before the
        # field existed stay as they were): a task setting it for a template that ignores it
        # renders the same tokens and must not be refused as another data source
        del shaping["chat_date"]
    if data.source != "random":
        del shaping["random"]
    settings: dict[str, Any] = {"data": shaping, "vocab_size": vocab_size, "mode": gen.mode,
                                "include_prompt": gen.include_prompt}
    if data.field == "prompt" and not data.chat_template and gen.mode == "score":
        # prompt + completion: one text, then EOS (before 2026-12 tokenized apart, no EOS: other rows)
        settings["completion_rendering"] = "joint+eos"
    if data.overflow == "pack" and (data.field == "messages" or (data.field == "prompt" and data.chat_template)):
        # before 2026-12: EOS after each; before 2026-12-07 an unanswered chat ended with an open
        # assistant turn, the next record after it (other windows)
        settings["pack_separator"] = "none after a chat, which ends at its last turn"
    if chat_template is not None:
        settings["chat_template"] = hashlib.sha256(chat_template.encode()).hexdigest()
    if gen.mode == "generate":
        # prompt_cut: long prompts keep their head (BOS, the template's start) and their end (before
        # 2026-12: their start, then their end alone: other rows)
        settings.update(temperature=gen.temperature, top_p=gen.top_p, max_new_tokens=gen.max_new_tokens,
                        seed=gen.seed, prompt_cut="head+end")
        if data.field == "messages":   # before 2026-12-07 a prompt ending in an assistant turn was not asked
            settings["chat_prompt"] = "always asked"
    source = "random" if data.source == "random" else source_fingerprint(data.source, source_name)
    payload = json.dumps({"source": source, "settings": settings}, sort_keys=True)
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()[:32]


def load_sequences(data: DataConfig, gen: GenerateConfig, tokenizer: Any, vocab_size: int, *,
                   shard_index: int = 0, num_shards: int = 1, source_name: str = "data.source") -> DataSlice:
    """Every sequence of task ``shard_index`` of ``num_shards``, validated and length-limited
    (``source_name``: the config field errors name)."""
    check_data_config(data, gen, source_name)
    rendered_by_template = data.field == "messages" or (data.field == "prompt" and data.chat_template)
    if gen.mode == "generate" and data.field == "prompt" and not data.chat_template \
            and getattr(tokenizer, "chat_template", None):
        log.warning("data.chat_template=false: the prompts reach the teacher as raw text, which an instruct "
                    "teacher continues rather than answers; its tokenizer has a chat template: set "
                    "data.chat_template: true to ask them as user turns")
    template = getattr(tokenizer, "chat_template", None) if rendered_by_template else None
    if isinstance(template, dict):   # several named templates: all of them, in a stable order
        template = json.dumps(template, sort_keys=True)
    fingerprint = data_fingerprint(data, gen, vocab_size, template if isinstance(template, str) else None,
                                   source_name, prints_date=bool(template) and template_prints_date(tokenizer))
    if data.source == "random":
        count = min(data.random.num_sequences, data.limit or data.random.num_sequences)
        # Capped like any record (overflow's truncate): by max_length, less the completion's room.
        room = data.max_length - (gen.max_new_tokens if gen.mode == "generate" else 0)
        length = min(data.random.length, room)
        if length < data.random.length and shard_index == 0:
            log.warning("data.random.length=%d is cut to %d tokens: data.max_length=%d%s", data.random.length,
                        length, data.max_length,
                        f" less generate.max_new_tokens={gen.max_new_tokens}" if gen.mode == "generate" else "")
        seqs = list(random_sequences(count, length, vocab_size, data.random.seed,
                                     range(shard_index, count, num_shards)))
        return DataSlice(seqs, fingerprint)
    if data.overflow == "pack":
        # a template-rendered record ends with its end of turn (ChatML's "<|im_end|>\n"): no EOS after it
        windows = pack((ids for _, _, ids, _ in _rendered(data, gen, tokenizer, 0, 1, source_name)), data.max_length,
                       None if rendered_by_template else tokenizer.eos_token_id)
        seqs = [TokenSequence(content_id("pack", i, arr), arr, 0)   # a window is no one record
                for i, ids in enumerate(windows) if i % num_shards == shard_index
                for arr in [np.asarray(ids, dtype=np.int32)]]
        return DataSlice(seqs, fingerprint)
    generating = gen.mode == "generate"
    limit = data.max_length - gen.max_new_tokens if generating else data.max_length
    needs_completion = gen.mode == "score" and not gen.include_prompt
    shortest = 1 if generating else 2   # a scored sequence needs a next token; a prompt, a token
    seqs: list[TokenSequence] = []
    reasons: dict[str, int] = {}
    first_dropped: dict[str, str] = {}
    for item, rid, ids, prompt_len in _rendered(data, gen, tokenizer, shard_index, num_shards, source_name):
        head = prompt_head(item.record, item.where(data.source), data.field, tokenizer, ids,
                           chat_template=data.chat_template, room=limit, chat_date=data.chat_date) \
            if generating and len(ids) > limit else 0
        fitted = fit_length(ids, limit, data.overflow, keep_end=generating, head=head)
        if fitted is None:
            reason = f"longer than {limit} tokens with data.overflow=drop"
        elif len(fitted) < shortest:
            reason = f"shorter than {shortest} tokens"
        elif needs_completion and prompt_len >= len(fitted):
            reason = "with no completion tokens to distil (generate.include_prompt=false)"
        else:
            seqs.append(TokenSequence(rid, np.asarray(fitted, dtype=np.int32), min(prompt_len, len(fitted)),
                                      item.position, item.line))
            continue
        reasons[reason] = reasons.get(reason, 0) + 1
        first_dropped.setdefault(reason, item.label)
    slice_ = DataSlice(seqs, fingerprint, {f"{why} (first: {first_dropped[why]})": n
                                           for why, n in reasons.items()})
    if reasons:
        log.warning("data: dropped %d of %d records of this task: %s", slice_.dropped, slice_.dropped + len(seqs),
                    slice_.drop_summary())
    return slice_


def _rendered(data: DataConfig, gen: GenerateConfig, tokenizer: Any, shard_index: int,
              num_shards: int, source_name: str) -> Iterator[tuple[SourceRecord, str, list[int], int]]:
    """``(record, id, token ids, prompt length)`` for the records of this task; a source
    without any record is refused (an empty file is a mistake, not an empty cache).  Records
    that start with two BOS tokens are said: text already rendered by a chat template begins
    with the BOS's text, and the tokenizer adds its own (TRL warns of the same)."""
    position = -1
    doubled: list[str] = []
    bos = tokenizer.bos_token_id
    for item in iter_records(data.source, data.field, source_name):
        position = item.position
        if data.limit is not None and position >= data.limit:
            break
        if position % num_shards != shard_index:
            continue
        ids, prompt_len = render_record(item.record, item.where(data.source), data.field, tokenizer,
                                        chat_template=data.chat_template, for_generation=gen.mode == "generate",
                                        chat_date=data.chat_date, packed=data.overflow == "pack")
        try:
            rid = record_id(item.record, position)
        except DataError as exc:
            raise DataError(f"{item.where(data.source)}: {exc}") from None
        if bos is not None and ids[:2] == [bos, bos]:
            doubled.append(item.label)
        yield item, rid, ids, prompt_len
    if position < 0:
        raise DataError(f"{source_name} '{data.source}': no records (empty source); expected at least one")
    if doubled:
        log.warning("data: %d records of this task start with two BOS tokens (first: %s): their %s already "
                    "begins with %r and the tokenizer adds one; the teacher scores them so -- remove it from the "
                    "data to score one", len(doubled), doubled[0], data.field, tokenizer.bos_token)
