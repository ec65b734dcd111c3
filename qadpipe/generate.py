"""Stage one runner: data -> teacher -> cache, as one resumable task of a batch array.

A task owns every record whose position is ``shard_index`` modulo ``num_shards`` and
writes its own shards (``task-{index:05d}``) into the shared cache.  Everything a user can
get wrong (data, field, lengths, k, backend) is checked before the cache is touched.
Records are processed in fixed batches, so a rerun after a kill recomputes a partly
committed batch exactly as the first run did; rows already in the task manifest are
skipped.  SIGTERM (SLURM preemption) or Ctrl-C commits the open shard and ends the task
cleanly (a second Ctrl-C aborts at once).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from tqdm import tqdm

from qadpipe.cache.manifest import MAX_TASKS
from qadpipe.config.schema import PipelineConfig
from qadpipe.data import DataSlice, TokenSequence, load_sequences
from qadpipe.data.records import record_label
from qadpipe.errors import ConfigError, DataError, TeacherError, first_line
from qadpipe.file_modes import check_writable_dir
from qadpipe.models import model_revision
from qadpipe.stop_signals import StopSignals
from qadpipe.teacher import (POSITIONS_AFTER_SCORED_SEQUENCE, TeacherInfo, check_teacher_can_start, make_teacher,
                             teacher_info)
from qadpipe.teacher.base import SamplingSpec, TargetSpec, with_completion

log = logging.getLogger(__name__)

#: Sequences handed to vLLM per call (it batches internally); bounds the work lost to a kill.
VLLM_SEQUENCES_PER_CALL = 64
LOG_EVERY_SECONDS = 30.0


@dataclass
class GenerateSummary:
    """What one task did."""

    task: str
    sequences: int
    written: int
    skipped: int
    tokens: int
    seconds: float
    stopped_by: Optional[str]   # "SIGTERM" / "SIGINT" when a signal ended the task early, else None


def resolve_task(gen: Any, num_shards: Optional[int] = None, shard_index: Optional[int] = None,
                 env: Optional[dict[str, str]] = None) -> tuple[int, int]:
    """(shard_index, num_shards): command line, then config, then SLURM array variables, then (0, 1)."""
    env = dict(os.environ) if env is None else env
    array_count = env.get("SLURM_ARRAY_TASK_COUNT")
    if array_count is None and "SLURM_ARRAY_TASK_MAX" in env:   # SLURM before 17.02 sets no COUNT
        array_count = str(_first_int(env["SLURM_ARRAY_TASK_MAX"], name="generate.num_shards") + 1)
    if num_shards is None and gen.num_shards is None and array_count is None and "SLURM_ARRAY_TASK_ID" in env \
            and shard_index is None and gen.shard_index is None:
        # as task 0 of 1 it would score every record, and so would every other task
        raise ConfigError("generate.num_shards: SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT "
                          "nor SLURM_ARRAY_TASK_MAX, so the number of tasks is unknown; pass --num-shards N")
    count = _first_int(num_shards, gen.num_shards, array_count, 1, name="generate.num_shards")
    index = _first_int(shard_index, gen.shard_index, env.get("SLURM_ARRAY_TASK_ID"), 0,
                       name="generate.shard_index")
    first, step = env.get("SLURM_ARRAY_TASK_MIN", "0"), env.get("SLURM_ARRAY_TASK_STEP", "1")
    if shard_index is None and gen.shard_index is None and num_shards is None and gen.num_shards is None \
            and "SLURM_ARRAY_TASK_ID" in env and (first.strip() != "0" or step.strip() != "1"):
        # --array=1-4 or 0-6:2: the tasks' ids leave out some of 0..N-1, whose records no task scores
        # (a resubmission of some tasks, --array=3,17, names the first array's size: --num-shards)
        raise ConfigError(f"generate.shard_index: the SLURM array's task ids start at {first} in steps of {step}; "
                          f"qadpipe's tasks are 0..N-1 (sbatch --array=0-{count - 1}); to run some tasks of an "
                          "array, pass --num-shards N, its size")
    if not 1 <= count <= MAX_TASKS:
        raise ConfigError(f"generate.num_shards: got {count}, expected 1 to {MAX_TASKS} tasks")
    if not 0 <= index < count:
        slurm = (f" (from SLURM_ARRAY_TASK_ID; task ids must run 0..N-1: sbatch --array=0-{count - 1})"
                 if shard_index is None and gen.shard_index is None and "SLURM_ARRAY_TASK_ID" in env else "")
        raise ConfigError(f"generate.shard_index: got {index}{slurm}, expected 0 <= shard_index < num_shards "
                          f"({count})")
    return index, count


def _first_int(*values: Any, name: str) -> int:
    value = next(v for v in values if v is not None)
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}: got {value!r} (from SLURM_ARRAY_* environment), expected an integer") from None


def check_lengths(data: DataSlice, info: TeacherInfo, extra: int, source: str, backend: str) -> int:
    """The longest sequence the teacher will see (prompt + ``extra`` new tokens); refuse one
    that, with the positions ``backend`` needs past it, goes beyond the model's context.
    Returns it."""
    if not data.sequences:
        return 0
    longest = max(data.sequences, key=lambda s: len(s.input_ids))
    needed = len(longest.input_ids) + extra
    past = POSITIONS_AFTER_SCORED_SEQUENCE[backend]
    if needed + past > info.context_length:
        what = f" + {extra} new tokens" if extra else ""
        also = f" + the {past} token {backend} generates after a scored sequence" if past else ""
        raise DataError(f"{_where(source, longest)}: {len(longest.input_ids)} tokens{what}{also} "
                        f"exceed the teacher's context of {info.context_length} (max_position_embeddings); "
                        "lower data.max_length")
    return needed


def check_token_ids(data: DataSlice, vocab_size: int, source: str) -> None:
    """Refuse a token id the teacher has no row for: a tokenizer that does not belong to the
    model.  Found here, before the cache is touched: the teacher's embedding would fail on it
    mid-run (a device-side assert on CUDA), and vLLM checks ids only against the tokenizer."""
    for sequence in data.sequences:
        largest = int(sequence.input_ids.max(initial=0))
        if largest >= vocab_size:
            raise DataError(f"{_where(source, sequence)}: token id {largest} >= the teacher's vocab size "
                            f"({vocab_size}); the tokenizer does not belong to the teacher (model.path)")


def _where(source: str, sequence: TokenSequence) -> str:
    """'d.jsonl record 3, line 4' (or '(a packed window)': packing mixes records)."""
    if sequence.source_position < 0:
        return f"{source} (a packed window)"
    return f"{source} {record_label(sequence.source_position, sequence.source_line)}"


def _refuse_a_directory_that_is_not_a_cache(path: str) -> None:
    """A cache goes into a new or empty directory, or an existing cache: not into a student,
    a model or a data directory, whose owner would find manifests/ and shards/ mixed in."""
    from qadpipe.cache.manifest import MANIFEST_DIR, SHARD_DIR

    if "://" in path:
        return
    root = check_writable_dir(Path(path).expanduser(), "cache.path")   # a file in the way: now, not after a batch
    if not root.is_dir():
        return
    foreign = sorted(entry.name for entry in root.iterdir() if entry.name not in (MANIFEST_DIR, SHARD_DIR, "runs"))
    if foreign:
        raise ConfigError(f"cache.path: {root} is a non-empty directory that is not a cache (it holds {foreign[0]}); "
                          "expected a new or empty directory, or an existing cache to extend")


def _batches(sequences: list[TokenSequence], size: int) -> list[list[TokenSequence]]:
    return [sequences[i:i + size] for i in range(0, len(sequences), size)]


def _cache_meta(config: PipelineConfig, model_dir: Path, vocab_size: int, tokenizer_fp: str, data_fp: str) -> Any:
    """What identifies the cache this task writes into (every task of a run must agree)."""
    from qadpipe.cache import CacheMeta
    from qadpipe.config import config_to_dict

    cache = config.cache
    return CacheMeta(
        teacher=str(config.teacher_path), teacher_revision=model_revision(model_dir),
        teacher_dtype=config.teacher.dtype + ("+fp32_head" if config.teacher.fp32_head else ""),
        tokenizer_fingerprint=tokenizer_fp, vocab_size=vocab_size, target_kind=cache.target, k=cache.k,
        num_samples=cache.num_samples, encoding=cache.encoding, data_fingerprint=data_fp,
        # the two backends draw from different distributions: tasks must not mix them
        sampled_from=("vocab" if config.teacher.backend == "hf" else "topk+tail") if cache.target == "sampled" else "",
        draw_seed=config.generate.seed if cache.target == "sampled" else -1,
        config=config_to_dict(config),
    )


def run_generate(config: PipelineConfig, *, num_shards: Optional[int] = None, shard_index: Optional[int] = None,
                 teacher_factory: Callable[..., Any] = make_teacher) -> GenerateSummary:
    """Run one task of stage one; returns what it did (the cache holds the result)."""
    from qadpipe.cache import CacheWriter
    from qadpipe.cache.manifest import task_name
    from qadpipe.config import dump_yaml
    from qadpipe.models import load_tokenizer, resolve_model_path, tokenizer_fingerprint
    from qadpipe.provenance import RUN_FILE, run_record

    index, count = resolve_task(config.generate, num_shards, shard_index)
    task = task_name(index)
    gen, cache = config.generate, config.cache
    model_dir = resolve_model_path(config.teacher_path, config.teacher_field)
    info = teacher_info(model_dir, config.model.trust_remote_code)
    check_teacher_can_start(config, model_dir, info)
    if cache.k > info.vocab_size:
        raise ConfigError(f"cache.k: got {cache.k}, expected <= the teacher's vocab size ({info.vocab_size})")
    if cache.encoding == "compact" and cache.target == "topk" and cache.k * info.vocab_size >= 2**31:
        # the compact decoder sums a row's id ranks in int32: a row of k rare ids could pass it
        log.warning("cache.k=%d with a vocabulary of %d: a position whose top-k are all rare ids is beyond the compact "
                    "encoding's range and stops the task when its shard is written; cache.encoding: plain has no "
                    "such limit", cache.k, info.vocab_size)
    tokenizer = load_tokenizer(str(model_dir), config.model.trust_remote_code)
    data = load_sequences(config.data, gen, tokenizer, min(len(tokenizer), info.vocab_size),
                          shard_index=index, num_shards=count)
    if data.dropped and not data.sequences:
        if count == 1:
            raise DataError(f"{config.data.source}: all {data.dropped} records of this task were dropped "
                            f"({data.drop_summary()}); nothing to generate")
        # One task of an array: its empty manifest says it is done (as a task given no records
        # does); an error here would leave the cache incomplete for good, its rerun failing too.
        log.warning("generate %s: all %d records of this task were dropped (%s); committing it empty",
                    task, data.dropped, data.drop_summary())
    new_tokens = gen.max_new_tokens if gen.mode == "generate" else 0
    longest_sequence = check_lengths(data, info, new_tokens, config.data.source, config.teacher.backend)
    check_token_ids(data, info.vocab_size, config.data.source)
    _refuse_a_directory_that_is_not_a_cache(cache.path)
    meta = _cache_meta(config, model_dir, info.vocab_size, tokenizer_fingerprint(tokenizer), data.fingerprint)
    spec = TargetSpec(cache.target, cache.k, cache.num_samples, gen.seed, gen.include_prompt)
    sampling = SamplingSpec(gen.temperature, gen.top_p, gen.max_new_tokens, gen.seed)
    per_call = config.teacher.batch_size if config.teacher.backend == "hf" else VLLM_SEQUENCES_PER_CALL

    started = time.perf_counter()
    written = tokens = completed = cut_completions = 0
    rate = 0.0  # tokens/s of the teacher loop (engine start-up excluded)
    stopped_by = None
    with CacheWriter(cache.path, meta, task=task, rows_per_shard=cache.rows_per_shard,
                     zstd_level=cache.zstd_level, num_tasks=count) as writer:
        done = writer.done_ids()
        todo = [b for b in _batches(data.sequences, per_call) if any(s.id not in done for s in b)]
        skipped = sum(s.id in done for s in data.sequences)
        log.info("generate %s (%d of %d): %d sequences, %d already in the cache, %s teacher, %s mode",
                 task, index, count, len(data.sequences), len(done), config.teacher.backend, gen.mode)
        with contextlib.ExitStack() as running:
            if todo:
                import torch

                teacher = teacher_factory(config, model_dir, k=cache.k, longest_sequence=longest_sequence)
                # From here to the teacher's close (after the last shard's commit and the run record)
                # a stop signal waits for a safe point; a kill before it costs nothing (no row is held
                # yet).  A signal after the last batch used to kill the process with rows unwritten.
                stop = running.enter_context(StopSignals("finishing the current batch and committing the open shard"))
                running.callback(teacher.close)
                total = sum(len(b) for b in todo)
                with tqdm(total=total, unit="seq", desc=f"generate {task}") as bar:
                    progress = _Progress(task, total)
                    for number, batch in enumerate(todo, start=1):
                        try:
                            if gen.mode == "generate":
                                completions = teacher.complete(batch, sampling)
                                cut_completions += sum(len(c.token_ids) >= sampling.max_new_tokens for c in completions)
                                completed += len(completions)
                                batch = [with_completion(p, c) for p, c in zip(batch, completions)]
                            for row in teacher.score(batch, spec):
                                if row.id not in done:
                                    writer.write(row)
                                    written += 1
                        except torch.OutOfMemoryError as exc:
                            raise TeacherError(_out_of_memory(config, task, batch, written, exc)) from None
                        except TeacherError as exc:
                            if not stop.received:
                                raise
                            # The scheduler's signal reaches vLLM's engine processes too, which stop
                            # mid-batch: a stop, not a teacher failure (exit 143 so a requeue follows).
                            log.warning("generate %s: the teacher stopped with %s (%s); its unfinished batch is "
                                        "recomputed on resume", task, stop.received, first_line(exc))
                            writer.flush()
                            stopped_by = stop.received
                            break
                        batch_tokens = sum(len(s.input_ids) for s in batch)
                        tokens += batch_tokens
                        bar.update(len(batch))
                        rate = progress.update(len(batch), batch_tokens)
                        bar.set_postfix(tok_s=f"{rate:.0f}")
                        if stop.received and number < len(todo):   # after the last batch: done, not stopped
                            writer.flush()
                            stopped_by = stop.received
                            break
            if stopped_by is None:
                writer.mark_complete()
            writer.store.write_atomic(f"runs/{task}/{RUN_FILE}", dump_yaml(run_record(config, "generate")).encode())
    seconds = time.perf_counter() - started
    summary = GenerateSummary(task, len(data.sequences), written, skipped, tokens, seconds, stopped_by)
    if cut_completions:
        log.warning("generate %s: %d of the %d completions ran to generate.max_new_tokens=%d, most likely cut before "
                    "their end (the student learns them so); raise it if that is many", task, cut_completions,
                    completed, gen.max_new_tokens)
    if stopped_by:
        log.warning("generate %s: stopped by %s after committing %d new sequences; rerun the same command "
                    "to resume", task, stopped_by, written)
    else:
        log.info("generate %s: done, %d sequences written (%d skipped as already cached), %d tokens at %.0f "
                 "tokens/s, %.1f s in all (teacher start-up included) -> %s", task, written, skipped, tokens, rate,
                 seconds, cache.path)
    return summary


def _out_of_memory(config: PipelineConfig, task: str, batch: list[TokenSequence], written: int,
                   exc: BaseException) -> str:
    """One line: the batch that did not fit, what is kept, and the knobs of this backend."""
    teacher = config.teacher
    if teacher.backend == "hf":
        knobs = (f"lower teacher.batch_size (now {teacher.batch_size}) or teacher.chunk_tokens "
                 f"(now {teacher.chunk_tokens})")
    else:
        knobs = (f"lower teacher.max_num_batched_tokens (now {teacher.max_num_batched_tokens}) or "
                 f"teacher.gpu_memory_utilization (now {teacher.gpu_memory_utilization})")
    return (f"generate {task}: out of memory in the {teacher.backend} teacher on {len(batch)} sequences of up to "
            f"{max(len(s.input_ids) for s in batch)} tokens ({first_line(exc)}); the {written} rows written before it are "
            f"kept and a rerun skips them; {knobs}")


class _Progress:
    """Throughput and ETA, logged every :data:`LOG_EVERY_SECONDS`."""

    def __init__(self, task: str, total: int) -> None:
        self.task, self.total = task, total
        self.done = self.tokens = 0
        self.started = self.last_log = time.perf_counter()

    def update(self, sequences: int, tokens: int) -> float:
        self.done += sequences
        self.tokens += tokens
        now = time.perf_counter()
        rate = self.tokens / max(now - self.started, 1e-9)
        if now - self.last_log >= LOG_EVERY_SECONDS:
            self.last_log = now
            eta = (self.total - self.done) * (now - self.started) / max(self.done, 1)
            log.info("generate %s: %d/%d sequences, %d tokens, %.0f tokens/s, ETA %s", self.task, self.done,
                     self.total, self.tokens, rate, time.strftime("%H:%M:%S", time.gmtime(eta)))
        return rate
