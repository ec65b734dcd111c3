"""Stage one end to end on tiny models with the HF backend: cache contents, task split,
resume after SIGKILL, SIGTERM, and the bad-input table (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from qadpipe.cache import CacheReader
from qadpipe.cli import cli
from qadpipe.config import build_config
from qadpipe.errors import ConfigError, DataError
from qadpipe.generate import resolve_task, run_generate

TARGET_FIELDS = ("input_ids", "target_start", "topk_ids", "topk_logprobs", "tail_mass", "sample_offsets",
                 "sample_ids", "sample_counts")


def _rows(cache: Path) -> dict[str, Any]:
    return {row.id: row for row in CacheReader(str(cache)).iter_sequences(0, 1)}


def _assert_same_cache(a: Path, b: Path) -> None:
    rows_a, rows_b = _rows(a), _rows(b)
    assert sorted(rows_a) == sorted(rows_b)
    for key, row in rows_a.items():
        for name in TARGET_FIELDS:
            x, y = getattr(row, name), getattr(rows_b[key], name)
            assert (x is None and y is None) or np.array_equal(x, y), (key, name)


def _overrides(model: Path, cache: Path, **extra: Any) -> list[str]:
    base = {"model.path": model, "teacher.backend": "hf", "teacher.dtype": "float32", "teacher.batch_size": 2,
            "cache.path": cache, "cache.k": 8, "cache.encoding": "plain", "data.random.num_sequences": 12,
            "data.random.length": 24}
    return [f"{key}={value}" for key, value in {**base, **extra}.items()]


def _config(model: Path, cache: Path, **extra: Any) -> Any:
    from qadpipe.config import load_config

    return load_config(None, _overrides(model, cache, **extra))


def _teacher_that(action: Callable[[], None], on_call: int) -> Callable[..., Any]:
    """A ``teacher_factory`` whose teacher runs ``action`` at its ``on_call``-th score call,
    then scores the batch (unless ``action`` raised)."""
    from qadpipe.teacher import make_teacher

    class Wrapped:
        def __init__(self, teacher: Any) -> None:
            self.teacher, self.calls = teacher, 0

        def score(self, batch: Any, spec: Any) -> Any:
            self.calls += 1
            if self.calls == on_call:
                action()
            return self.teacher.score(batch, spec)

        def close(self) -> None:
            self.teacher.close()

    return lambda *args, **kwargs: Wrapped(make_teacher(*args, **kwargs))


def test_cache_holds_what_the_teacher_returned(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from qadpipe.data import load_sequences
    from qadpipe.models import load_causal_lm, load_tokenizer
    from qadpipe.teacher.base import TargetSpec
    from qadpipe.teacher.hf_backend import HFTeacher

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}?", "completion": f" Answer {i}."}) + "\n"
                            for i in range(5)))
    cfg = _config(tiny_llama_dir, tmp_path / "cache", **{"data.source": data, "data.field": "prompt",
                                                         "generate.include_prompt": "false"})
    summary = run_generate(cfg)
    assert (summary.written, summary.skipped, summary.stopped_by) == (5, 0, None)
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    seqs = load_sequences(cfg.data, cfg.generate, tokenizer, len(tokenizer)).sequences
    expected = HFTeacher(load_causal_lm(str(tiny_llama_dir), "float32")).score(seqs, TargetSpec(k=8, include_prompt=False))
    rows = _rows(tmp_path / "cache")
    for seq, want in zip(seqs, expected):
        got = rows[seq.id]
        assert got.target_start == seq.prompt_len - 1  # first row predicts the first completion token
        assert np.array_equal(got.input_ids, seq.input_ids) and np.array_equal(got.topk_ids, want.topk_ids)
        np.testing.assert_allclose(got.topk_logprobs, want.topk_logprobs, atol=1e-6)
    record = (tmp_path / "cache" / "runs" / "task-00000" / "qadpipe_run.yaml").read_text()
    assert "stage: generate" in record and "transformers" in record
    again = run_generate(cfg)  # a rerun finds everything done and loads no teacher
    assert (again.written, again.skipped) == (0, 5)


def test_tasks_split_the_records_and_add_up_to_one_run(small_vocab_model: Path, tmp_path: Path) -> None:
    run_generate(_config(small_vocab_model, tmp_path / "one", **{"cache.target": "sampled", "cache.num_samples": 16}))
    for index in range(3):
        summary = run_generate(_config(small_vocab_model, tmp_path / "three", **{"cache.target": "sampled",
                                       "cache.num_samples": 16}), num_shards=3, shard_index=index)
        assert summary.task == f"task-{index:05d}" and summary.written == 4
    _assert_same_cache(tmp_path / "one", tmp_path / "three")


def test_a_sampled_cache_refuses_a_task_drawing_with_another_seed(small_vocab_model: Path, tmp_path: Path) -> None:
    """In score mode the seed shapes only the draws, not the data: it used to be in no part of the
    cache's identity, so a resume or a second task with another seed mixed two runs' draws."""
    from qadpipe.errors import CacheError

    sampled = {"cache.target": "sampled", "cache.num_samples": 16}
    cache = tmp_path / "cache"
    run_generate(_config(small_vocab_model, cache, **sampled), num_shards=2, shard_index=0)
    assert CacheReader(str(cache)).meta.draw_seed == 0
    with pytest.raises(CacheError, match=r"cache was written with draw_seed=0, this writer has draw_seed=7"):
        run_generate(_config(small_vocab_model, cache, **sampled, **{"generate.seed": 7}), num_shards=2, shard_index=1)
    top_k = tmp_path / "top-k"   # top-k targets draw nothing: the seed does not split their caches
    run_generate(_config(small_vocab_model, top_k), num_shards=2, shard_index=0)
    run_generate(_config(small_vocab_model, top_k, **{"generate.seed": 7}), num_shards=2, shard_index=1)
    assert CacheReader(str(top_k)).meta.draw_seed == -1


def test_a_task_of_an_array_whose_records_are_all_dropped_commits_empty(small_vocab_model: Path,
                                                                        tmp_path: Path) -> None:
    """Records alternate long and 1-token: task 1 of 2 gets only 1-token ones.  It used to fail
    (and fail again on every rerun), leaving the array's cache incomplete for good."""
    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for text in ["a b c d e f", "a"] * 2))
    settings = {"data.source": source, "data.max_length": 64}
    assert run_generate(_config(small_vocab_model, tmp_path / "c", **settings), num_shards=2, shard_index=0).written == 2
    assert run_generate(_config(small_vocab_model, tmp_path / "c", **settings), num_shards=2, shard_index=1).written == 0
    view = CacheReader(str(tmp_path / "c")).view
    assert view.missing_tasks == [] and view.incomplete_tasks == [] and len(view.shards) == 1
    short = tmp_path / "short.jsonl"   # a run of one task with nothing to do is a mistake, said as one
    short.write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"all 2 records of this task were dropped \(2 shorter than 2 tokens "
                                        r"\(first: record 0, line 1\)\); nothing to generate"):
        run_generate(_config(small_vocab_model, tmp_path / "alone", **{**settings, "data.source": short}))


def test_a_cache_refuses_another_split_and_inspect_names_the_tasks_not_yet_in_it(small_vocab_model: Path,
                                                                               tmp_path: Path) -> None:
    """Tasks skip only the ids of their own manifest, so a second run that split the records
    another way would store rows twice; the split is recorded and a different one refused."""
    cache = tmp_path / "cache"
    for index in (0, 2):   # task 1 of 3 has not run (still queued, failed, never submitted)
        run_generate(_config(small_vocab_model, cache), num_shards=3, shard_index=index)
    shown = CliRunner().invoke(cli, ["inspect", str(cache)])
    assert shown.exit_code == 0 and "tasks       2 of 3 (no manifest yet: task-00001)" in shown.output
    before = sorted(p.name for p in (cache / "shards").iterdir())
    for count, index in ((1, 0), (2, 1)):
        result = CliRunner().invoke(cli, ["generate", *[a for o in _overrides(small_vocab_model, cache)
                                                        for a in ("--set", o)],
                                          "--num-shards", str(count), "--shard-index", str(index)])
        assert result.exit_code == 2
        assert result.stderr.strip().splitlines()[-1] == (
            f"qadpipe: error: {cache}/manifests/task-00000.json: written by a run that split the records 3 ways, this "
            f"one splits them {count} ways (tasks would hold the same rows twice); rerun with --num-shards 3, or use "
            "a new cache path")
    assert sorted(p.name for p in (cache / "shards").iterdir()) == before
    run_generate(_config(small_vocab_model, cache), num_shards=3, shard_index=1)
    assert "tasks       3\n" in CliRunner().invoke(cli, ["inspect", str(cache)]).output
    run_generate(_config(small_vocab_model, tmp_path / "one"))
    _assert_same_cache(cache, tmp_path / "one")


def test_a_rerun_with_other_data_settings_names_them_not_just_the_fingerprint(small_vocab_model: Path,
                                                                             tiny_llama_dir: Path,
                                                                             tmp_path: Path) -> None:
    from qadpipe.errors import CacheError

    cache = tmp_path / "cache"
    run_generate(_config(small_vocab_model, cache))
    with pytest.raises(CacheError, match=r"this writer has data_fingerprint='sha256:[0-9a-f]+' "
                                         r"\(data.random.length 24 -> 20\); use a new cache path$"):
        run_generate(_config(small_vocab_model, cache, **{"data.random.length": 20}))
    text = tmp_path / "prompts.txt"
    text.write_text("one prompt\nanother prompt\n")
    run_generate(_config(tiny_llama_dir, tmp_path / "from-text", **{"data.source": text}))
    text.write_text("one prompt\nanother prompt, edited\n")
    with pytest.raises(CacheError, match=r"\(same data and generate settings: the data source's bytes, the chat "
                                         r"template, or how the qadpipe that made the cache renders them changed; "):
        run_generate(_config(tiny_llama_dir, tmp_path / "from-text", **{"data.source": text}))


def test_generate_mode_scores_prompt_plus_completion(small_vocab_model: Path, tmp_path: Path, caplog) -> None:
    from qadpipe.data import load_sequences
    from qadpipe.models import load_tokenizer

    extra = {"generate.mode": "generate", "generate.include_prompt": "false", "generate.max_new_tokens": 6,
             "generate.temperature": 1.0, "data.random.length": 8, "data.max_length": 16,
             "data.random.num_sequences": 4}
    cfg = _config(small_vocab_model, tmp_path / "gen", **extra)
    run_generate(cfg)
    prompts = load_sequences(cfg.data, cfg.generate, load_tokenizer(str(small_vocab_model)), 512).sequences
    rows = _rows(tmp_path / "gen")
    assert sorted(rows) == sorted(p.id for p in prompts)
    for prompt in prompts:
        row = rows[prompt.id]
        assert np.array_equal(row.input_ids[:8], prompt.input_ids)
        assert 1 <= len(row.input_ids) - 8 <= 6  # the teacher's completion, stopped at EOS or max_new_tokens
        assert row.target_start == 7 and row.num_target_rows == len(row.input_ids) - 8
    cut = sum(len(row.input_ids) - 8 == 6 for row in rows.values())   # a random model rarely stops
    assert cut > 0 and f"generate task-00000: {cut} of the 4 completions ran to generate.max_new_tokens=6" \
        in caplog.text
    run_generate(_config(small_vocab_model, tmp_path / "again", **extra))
    _assert_same_cache(tmp_path / "gen", tmp_path / "again")  # completions are seeded per prompt


def test_task_defaults_come_from_slurm_array_variables() -> None:
    gen = build_config({}).generate
    assert resolve_task(gen, env={}) == (0, 1)
    assert resolve_task(gen, env={"SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_ID": "5"}) == (5, 8)
    assert resolve_task(gen, 4, 1, env={"SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_ID": "5"}) == (1, 4)
    with pytest.raises(ConfigError) as raised:   # an array submitted as --array=1-4
        resolve_task(gen, env={"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "4"})
    assert str(raised.value) == ("generate.shard_index: got 4 (from SLURM_ARRAY_TASK_ID; task ids must run 0..N-1: "
                                 "sbatch --array=0-3), expected 0 <= shard_index < num_shards (4)")
    # SLURM before 17.02 sets no COUNT: its MAX tells the size; with neither, task 0 ran as 0 of 1 (every record)
    assert resolve_task(gen, env={"SLURM_ARRAY_TASK_MAX": "7", "SLURM_ARRAY_TASK_ID": "5"}) == (5, 8)
    assert resolve_task(gen, 4, env={"SLURM_ARRAY_TASK_ID": "3"}) == (3, 4)
    # an array from 1, or in steps: some of 0..N-1 would be no task's, their records never scored
    for first, step in (("1", "1"), ("0", "2")):
        with pytest.raises(ConfigError, match=rf"^generate\.shard_index: the SLURM array's task ids start at {first} "
                                              rf"in steps of {step}; qadpipe's tasks are 0\.\.N-1"):
            resolve_task(gen, env={"SLURM_ARRAY_TASK_MAX": "4", "SLURM_ARRAY_TASK_MIN": first,
                                   "SLURM_ARRAY_TASK_STEP": step, "SLURM_ARRAY_TASK_ID": "2"})
    # a resubmission of some tasks names the first array's size
    assert resolve_task(gen, 64, env={"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "3",
                                      "SLURM_ARRAY_TASK_ID": "17"}) == (17, 64)
    with pytest.raises(ConfigError, match=r"^generate\.num_shards: SLURM_ARRAY_TASK_ID is set but neither "
                                          r"SLURM_ARRAY_TASK_COUNT nor SLURM_ARRAY_TASK_MAX"):
        resolve_task(gen, env={"SLURM_ARRAY_TASK_ID": "0"})


def _cli_process(model: Path, cache: Path, **extra: Any) -> subprocess.Popen:
    args = [sys.executable, "-m", "qadpipe.cli", "generate"]
    for item in _overrides(model, cache, **extra):
        args += ["--set", item]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _committed_shards(manifest: Path) -> int:
    try:
        return len(json.loads(manifest.read_text())["shards"])
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


def _wait_for_shards(proc: subprocess.Popen, manifest: Path, count: int) -> None:
    deadline = time.monotonic() + 120
    while _committed_shards(manifest) < count:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, f"fewer than {count} shards committed within 120 s"
        time.sleep(0.005)


def test_a_batch_committed_in_part_is_finished_on_resume(small_vocab_model: Path, tmp_path: Path) -> None:
    """A kill between two shard commits inside one teacher batch (rows_per_shard not a multiple
    of the batch, vLLM's call size, a flush by size): the rerun scores that batch again and
    keeps only its rows not yet committed.  Skipping the batch lost its other rows in a task
    marked complete; writing them all repeated the committed ones."""
    from qadpipe.cache import CacheWriter

    run_generate(_config(small_vocab_model, tmp_path / "whole"))   # 12 rows, batches of 2
    whole = CacheReader(str(tmp_path / "whole"))
    rows = list(whole.iter_sequences())
    manifest = json.loads((tmp_path / "whole" / "manifests" / "task-00000.json").read_text())
    with CacheWriter(str(tmp_path / "cut"), whole.meta, task="task-00000", rows_per_shard=3,
                     num_tasks=manifest["num_tasks"]) as writer:   # what a kill after the first shard leaves
        for row in rows[:3]:
            writer.write(row)
    rerun = run_generate(_config(small_vocab_model, tmp_path / "cut"))
    assert (rerun.skipped, rerun.written) == (3, 9)
    _assert_same_cache(tmp_path / "whole", tmp_path / "cut")


def test_sigterm_then_sigkill_then_rerun_equals_an_uninterrupted_run(small_vocab_model: Path, tmp_path: Path) -> None:
    many = {"data.random.num_sequences": 160, "data.random.length": 32, "cache.rows_per_shard": 4}
    run_generate(_config(small_vocab_model, tmp_path / "whole", **many))
    cache = tmp_path / "interrupted"
    manifest = cache / "manifests" / "task-00000.json"

    proc = _cli_process(small_vocab_model, cache, **many)
    _wait_for_shards(proc, manifest, 1)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, output   # stopped, not done: a SLURM afterok dependency must wait
    assert "stopped by SIGTERM" in output
    assert json.loads(manifest.read_text())["complete"] is False
    after_term = len(_rows(cache))
    assert 0 < after_term < 160

    proc = _cli_process(small_vocab_model, cache, **many)   # Ctrl-C: the same clean stop, exit 130
    _wait_for_shards(proc, manifest, _committed_shards(manifest) + 1)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopped by SIGINT" in output, output
    after_int = len(_rows(cache))
    assert after_term < after_int < 160

    seed = random.randrange(1 << 30)
    kill_after = _committed_shards(manifest) + random.Random(seed).randint(1, 15)  # a random point of the rerun
    proc = _cli_process(small_vocab_model, cache, **many)
    _wait_for_shards(proc, manifest, kill_after)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.kill()
    proc.communicate(timeout=60)
    after_kill = len(_rows(cache))
    assert after_int < after_kill < 160, f"kill seed {seed}"

    final = run_generate(_config(small_vocab_model, cache, **many))
    assert final.skipped == after_kill and final.written == 160 - after_kill and final.stopped_by is None
    assert json.loads(manifest.read_text())["complete"] is True
    _assert_same_cache(tmp_path / "whole", cache)


def test_out_of_memory_is_one_line_and_keeps_the_rows_written_before_it(small_vocab_model: Path,
                                                                        tmp_path: Path) -> None:
    from qadpipe.errors import TeacherError

    def run_out() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB.\nmore")

    run_generate(_config(small_vocab_model, tmp_path / "whole"))
    cache = tmp_path / "cache"
    with pytest.raises(TeacherError) as raised:
        run_generate(_config(small_vocab_model, cache),
                     teacher_factory=_teacher_that(run_out, on_call=3))
    assert str(raised.value) == ("generate task-00000: out of memory in the hf teacher on 2 sequences of up to 24 "
                                 "tokens (CUDA out of memory. Tried to allocate 1.50 GiB.); the 4 rows written before "
                                 "it are kept and a rerun skips them; lower teacher.batch_size (now 2) or "
                                 "teacher.chunk_tokens (now 1024)")
    assert len(_rows(cache)) == 4
    rerun = run_generate(_config(small_vocab_model, cache))
    assert rerun.skipped == 4 and rerun.written == 8
    _assert_same_cache(tmp_path / "whole", cache)


def test_a_teacher_that_dies_of_the_stop_signal_ends_as_a_stop_not_an_error(small_vocab_model: Path,
                                                                           tmp_path: Path) -> None:
    """SLURM's SIGTERM (and Ctrl-C) reach vLLM's engine processes too, which stop mid-batch: the
    run must commit what it has and end stopped (exit 143, resumable), not as a teacher crash."""
    from qadpipe.errors import TeacherError

    def engine_dies_of_sigterm() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        raise TeacherError("teacher: the vLLM engine died (EngineDeadError)")

    run_generate(_config(small_vocab_model, tmp_path / "whole"))
    cache = tmp_path / "cache"
    stopped = run_generate(_config(small_vocab_model, cache),
                           teacher_factory=_teacher_that(engine_dies_of_sigterm, on_call=3))
    assert (stopped.stopped_by, stopped.written) == ("SIGTERM", 4)
    assert len(_rows(cache)) == 4
    rerun = run_generate(_config(small_vocab_model, cache))
    assert rerun.skipped == 4 and rerun.written == 8 and rerun.stopped_by is None
    _assert_same_cache(tmp_path / "whole", cache)


def test_a_teacher_error_without_a_stop_signal_is_still_an_error(small_vocab_model: Path, tmp_path: Path) -> None:
    from qadpipe.errors import TeacherError

    class Broken:
        def score(self, batch: Any, spec: Any) -> Any:
            raise TeacherError("teacher: the vLLM engine died (EngineDeadError)")

        def close(self) -> None:
            pass

    with pytest.raises(TeacherError, match="engine died"):
        run_generate(_config(small_vocab_model, tmp_path / "cache"), teacher_factory=lambda *a, **kw: Broken())


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A 512-id model (with the SmolLM2 tokenizer files) for the k > vocab case."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("vocab512")
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(smollm2_dir)).save_pretrained(out)
    return out


@pytest.mark.parametrize("case, records, extra, message", [
    ("missing file", None, {"data.source": "no/such/data.jsonl"},
     "data.source: got 'no/such/data.jsonl' (str), expected an existing file or directory (relative paths are "
     "read from the current directory, {cwd})"),
    ("no field", [{"text": "fine"}, {"body": "x"}], {"data.field": "text"},
     "{tmp}/d.jsonl record 1, line 2: no field 'text' (data.field), record has ['body']"),
    ("empty prompt", [{"prompt": "ok"}, {"prompt": ""}], {"data.field": "prompt"},
     "{tmp}/d.jsonl record 1, line 2: empty prompt (field 'prompt' is blank)"),
    ("too long", [{"text": "word " * 1500}], {"data.max_length": 4096},
     "{tmp}/d.jsonl record 0, line 1: 1501 tokens exceed the teacher's context of 1024 (max_position_embeddings); "
     "lower data.max_length"),
    ("all dropped", [{"text": "word " * 50}, {"text": "more words " * 30}],
     {"data.max_length": 8, "data.overflow": "drop"},
     "{tmp}/d.jsonl: all 2 records of this task were dropped (2 longer than 8 tokens with data.overflow=drop "
     "(first: record 0, line 1)); nothing to generate"),
    ("cache into a model dir", None, {"cache.path": "{vocab512}"},
     "cache.path: {vocab512} is a non-empty directory that is not a cache (it holds {first}); expected a new "
     "or empty directory, or an existing cache to extend"),
    ("k above vocab", None, {"model.path": "{vocab512}", "cache.k": 600},
     "cache.k: got 600, expected <= the teacher's vocab size (512)"),
    pytest.param("no cuda", None, {"teacher.device": "cuda"},
                 "teacher.device: got 'cuda', but no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")),
    ("no vllm", None, {"teacher.backend": "vllm"},
     "teacher.backend: got 'vllm', but vLLM is not installed (pip install 'qadpipe[cpu]' or 'qadpipe[gpu]'), "
     "or set teacher.backend=hf"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, records: list | None, extra: dict, message: str,
                                                         tiny_llama_dir: Path, small_vocab_model: Path,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if records is not None:
        (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        extra = {"data.source": "{tmp}/d.jsonl", **extra}
    if case == "no vllm":
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    fill = {"tmp": tmp_path, "vocab512": small_vocab_model, "first": sorted(os.listdir(small_vocab_model))[0],
            "cwd": os.getcwd()}
    args = ["generate"]
    for item in _overrides(tiny_llama_dir, tmp_path / "cache", **{k: str(v).format(**fill) for k, v in extra.items()}):
        args += ["--set", item]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == "qadpipe: error: " + message.format(**fill)
    assert not (tmp_path / "cache").exists()


def test_a_vllm_teacher_keeps_a_position_for_the_token_it_generates_after_a_scored_sequence() -> None:
    """vLLM scores with max_tokens=1 and refuses max_model_len beyond the model's context: a
    sequence that fills the context fits the HF backend, not vLLM (one clear line for it)."""
    from types import SimpleNamespace

    from qadpipe.errors import DataError
    from qadpipe.generate import check_lengths

    data = SimpleNamespace(sequences=[SimpleNamespace(input_ids=np.arange(n), source_position=i, source_line=None)
                                      for i, n in enumerate((100, 1024, 7))])
    info = SimpleNamespace(context_length=1024)
    assert check_lengths(data, info, 0, "d.jsonl", "hf") == 1024
    with pytest.raises(DataError) as raised:
        check_lengths(data, info, 0, "d.jsonl", "vllm")
    assert str(raised.value) == ("d.jsonl record 1: 1024 tokens + the 1 token vllm generates after a scored sequence "
                                 "exceed the teacher's context of 1024 (max_position_embeddings); lower "
                                 "data.max_length")
    assert check_lengths(data, SimpleNamespace(context_length=1025), 0, "d.jsonl", "vllm") == 1024
    windows = SimpleNamespace(sequences=[SimpleNamespace(input_ids=np.arange(1024), source_position=-1,
                                                         source_line=None)])   # data.overflow=pack
    with pytest.raises(DataError, match=r"^d\.jsonl \(a packed window\): 1024 tokens \+ the 1 token"):
        check_lengths(windows, info, 0, "d.jsonl", "vllm")


def test_teacher_revision_tells_retrained_weights_apart_but_not_a_copy(tmp_path, monkeypatch):
    """It hashed config.json and the weight files' names and sizes: a retrained teacher of the
    same architecture had the same revision, and a rerun kept the old teacher's rows."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from qadpipe.models import model_revision

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    for seed in (0, 1):
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(tmp_path / f"seed{seed}")
    shutil.copytree(tmp_path / "seed0", tmp_path / "copy")
    assert model_revision(tmp_path / "seed0") != model_revision(tmp_path / "seed1")
    assert model_revision(tmp_path / "seed0") == model_revision(tmp_path / "copy")
    # a directory under snapshots/ is known by its name only in a hub cache's layout: elsewhere
    # two teachers' weights in same-named directories were one revision
    for seed in (0, 1):
        shutil.copytree(tmp_path / f"seed{seed}", tmp_path / f"run{seed}" / "snapshots" / "latest")
    assert model_revision(tmp_path / "run0/snapshots/latest") != model_revision(tmp_path / "run1/snapshots/latest")
    commit = "0123456789abcdef0123456789abcdef01234567"
    hub = tmp_path / "hub" / "models--org--teacher" / "snapshots" / commit
    shutil.copytree(tmp_path / "seed0", hub)
    assert model_revision(hub) == f"snapshot:{commit}"
    monkeypatch.chdir(hub.parent.parent)   # the same snapshot, reached by a relative path
    assert model_revision(Path("snapshots") / commit) == f"snapshot:{commit}"


def test_a_cache_path_under_a_file_is_refused_with_a_tilde_too(tmp_path, monkeypatch):
    """The cache store expands ~; the up-front check did not, and a file in the way was found
    only once the teacher had scored a batch."""
    from qadpipe.errors import ConfigError
    from qadpipe.generate import _refuse_a_directory_that_is_not_a_cache

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"cache\.path: .*/afile/cache cannot be created"):
        _refuse_a_directory_that_is_not_a_cache("~/afile/cache")


def test_a_tokenizer_with_ids_past_the_teachers_vocab_is_refused_before_the_cache_is_made(small_vocab_model: Path,
                                                                                      tmp_path: Path) -> None:
    """small_vocab_model has 512 rows and the SmolLM2 tokenizer: real text tokenizes past them.
    It failed inside the teacher's embedding with an IndexError (a device assert on CUDA)."""
    from qadpipe.models import load_tokenizer

    text = "Hello world, this is a test"
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": text}) + "\n")
    largest = max(load_tokenizer(str(small_vocab_model))(text)["input_ids"])
    assert largest >= 512
    with pytest.raises(DataError) as raised:
        run_generate(_config(small_vocab_model, tmp_path / "cache", **{"data.source": tmp_path / "d.jsonl"}))
    assert str(raised.value) == (f"{tmp_path}/d.jsonl record 0, line 1: token id {largest} >= the teacher's vocab "
                                 "size (512); the tokenizer does not belong to the teacher (model.path)")
    assert not (tmp_path / "cache").exists()


def test_tasks_reading_a_copy_of_the_teacher_fill_one_cache(small_vocab_model: Path, tmp_path: Path) -> None:
    """Array tasks that stage the teacher to node-local scratch name it by another path; the
    weights are the same (teacher_revision), so the cache is one.  The path used to be refused."""
    import shutil

    copy = tmp_path / "scratch" / "teacher"
    shutil.copytree(small_vocab_model, copy)
    cache = tmp_path / "cache"
    run_generate(_config(small_vocab_model, cache), num_shards=2, shard_index=0)
    run_generate(_config(copy, cache), num_shards=2, shard_index=1)
    run_generate(_config(small_vocab_model, tmp_path / "one"))
    _assert_same_cache(tmp_path / "one", cache)


def test_a_stop_signal_during_the_last_batch_still_completes_the_task(small_vocab_model: Path,
                                                                      tmp_path: Path) -> None:
    """Everything was written: the task is done (exit 0), not stopped and requeued for nothing."""
    last_batch = 6   # 12 sequences, teacher.batch_size 2
    summary = run_generate(_config(small_vocab_model, tmp_path / "cache"),
                           teacher_factory=_teacher_that(lambda: os.kill(os.getpid(), signal.SIGTERM), last_batch))
    assert (summary.written, summary.stopped_by) == (12, None)
    view = CacheReader(str(tmp_path / "cache")).view
    assert view.incomplete_tasks == [] and sum(shard.rows for shard in view.shards) == 12


def test_a_stop_signal_while_the_teacher_closes_still_commits_the_rows_held(small_vocab_model: Path,
                                                                           tmp_path: Path) -> None:
    """After the last batch the stop handlers were gone: a SIGTERM while vLLM shut down (seconds)
    killed the process with up to rows_per_shard scored rows never written.  In a process of its
    own, which the signal would kill."""
    script = tmp_path / "closing.py"
    script.write_text(
        "import os, signal, sys\n"
        "from qadpipe.config import load_config\n"
        "from qadpipe.generate import run_generate\n"
        "from qadpipe.teacher import make_teacher\n"
        "class SignalledWhileClosing:\n"
        "    def __init__(self, teacher):\n"
        "        self.teacher = teacher\n"
        "    def score(self, batch, spec):\n"
        "        return self.teacher.score(batch, spec)\n"
        "    def close(self):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        self.teacher.close()\n"
        "summary = run_generate(load_config(None, sys.argv[1:]),\n"
        "                       teacher_factory=lambda *a, **kw: SignalledWhileClosing(make_teacher(*a, **kw)))\n"
        "print('written', summary.written, 'stopped by', summary.stopped_by)\n")
    overrides = _overrides(small_vocab_model, tmp_path / "cache", **{"cache.rows_per_shard": 100})
    done = subprocess.run([sys.executable, str(script), *overrides], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-1500:])
    assert "written 12 stopped by None" in done.stdout
    view = CacheReader(str(tmp_path / "cache")).view
    assert view.incomplete_tasks == [] and sum(shard.rows for shard in view.shards) == 12


class _NoPlatform:
    """vllm.platforms whose lazy current_platform finds no platform, as vLLM says it."""

    def __getattr__(self, name: str) -> Any:
        if name == "current_platform":
            raise RuntimeError("Failed to infer device type")
        raise AttributeError(name)


@pytest.mark.parametrize("broken, said", [(None, "ModuleNotFoundError: "), (_NoPlatform(), "RuntimeError: Failed to infer")],
                         ids=["not-importable", "no-platform"])
def test_a_vllm_that_does_not_import_is_one_line_before_the_cache_is_made(tiny_llama_dir: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch, broken: Any,
                                                                         said: str) -> None:
    """Installed (find_spec sees it) but broken, e.g. built for another torch (None in
    sys.modules: `import vllm.platforms` raises ImportError), or on a machine it resolves no
    platform for: the engine's import raised a traceback, after the cache directory was made."""
    pytest.importorskip("vllm")
    monkeypatch.setitem(sys.modules, "vllm.platforms", broken)
    with pytest.raises(Exception) as raised:
        run_generate(_config(tiny_llama_dir, tmp_path / "cache", **{"teacher.backend": "vllm"}))
    assert type(raised.value).__name__ == "TeacherError"
    assert str(raised.value).startswith(f"teacher.backend: got 'vllm', but vLLM does not import ({said}")
    assert "\n" not in str(raised.value) and not (tmp_path / "cache").exists()


def test_a_token_id_equal_to_the_vocab_size_is_past_the_teachers_rows() -> None:
    """Rows run 0..vocab_size-1: the id vocab_size has none (the off-by-one an embedding meets)."""
    from types import SimpleNamespace

    from qadpipe.generate import check_token_ids

    def data(largest: int) -> Any:
        return SimpleNamespace(sequences=[SimpleNamespace(input_ids=np.array([3, largest, 1], dtype=np.int32),
                                                          source_position=2, source_line=3)])

    check_token_ids(data(511), 512, "d.jsonl")
    with pytest.raises(DataError, match=r"^d\.jsonl record 2, line 3: token id 512 >= the teacher's vocab "
                                        r"size \(512\)"):
        check_token_ids(data(512), 512, "d.jsonl")
