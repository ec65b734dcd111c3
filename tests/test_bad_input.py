"""Bad input, table-driven, through the real CLI: one line, exit 2, nothing changed.

One small pipeline (tiny random Llama, HF teacher: cache -> 2 distill steps -> fake export)
is built once; every case then feeds the CLI one broken config, data file, cache,
checkpoint or argument and checks that

* the exit code is 2 and stderr is exactly one line ``qadpipe: error: ...`` that names the
  field or file (a regex per case),
* nothing that existed before changed: the whole workspace (cache, checkpoints, final/,
  export) hashes the same before and after.

Per-stage basics (config typos, missing data file, truncated shard ...) are tested in
their own modules (tests/test_config.py, tests/test_generate.py, tests/cache/test_faults.py);
these cases cross stage boundaries or feed files other people wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from cache_rows import cache_meta, random_rows, write_cache
from qadpipe.cli import cli

SHARD0 = "shards/task-00000-000000.parquet"
MANIFEST = "manifests/task-00000.json"


def _base_config(root: Path, model: Path) -> dict:
    return {
        "model": {"path": str(model), "dtype": "float32"},
        "teacher": {"backend": "hf", "dtype": "float32", "device": "cpu", "batch_size": 4},
        "data": {"source": "random", "random": {"num_sequences": 8, "length": 16, "seed": 1}},
        "cache": {"path": str(root / "cache"), "k": 8, "rows_per_shard": 4, "encoding": "plain"},
        "quant": {"group_size": 32, "calibration_batches": 1},
        "distill": {"output_dir": str(root / "student"), "max_steps": 2, "batch_size": 2, "eval_rows": 2,
                    "save_every": 1, "eval_every": 100, "device": "cpu", "warmup_steps": 0,
                    "loss_chunk_tokens": 32},
        "export": {"format": "fake", "output_dir": str(root / "export")},
        "eval": {"output_dir": str(root / "eval"), "device": "cpu", "max_sequences": 2},
    }


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(cli, list(args), env=env)


@pytest.fixture(scope="module")
def light(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """Only config.yaml (no outputs yet): enough for config, argument and data cases."""
    root = tmp_path_factory.mktemp("bad-input-light")
    (root / "config.yaml").write_text(yaml.safe_dump(_base_config(root, tiny_llama_dir)))
    return root


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """A finished small pipeline: config.yaml, cache/, student/ (checkpoints + final/), export/."""
    root = tmp_path_factory.mktemp("bad-input-ws")
    (root / "config.yaml").write_text(yaml.safe_dump(_base_config(root, tiny_llama_dir)))
    for stage in (["generate"], ["distill"], ["export"]):
        result = invoke(*stage, "-c", str(root / "config.yaml"))
        assert result.exit_code == 0, (stage, result.output, result.exception)
    return root


def tree_hash(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (empty directories do not count)."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


@dataclass
class Case:
    """args may use {ws} (the shared workspace), {tmp} (this case's scratch dir), {cfg}
    (the workspace config); ``setup(ws, tmp)`` prepares the broken input in ``tmp``."""

    args: list[str]
    message: str
    setup: Callable[[Path, Path], None] = lambda ws, tmp: None
    env: dict = field(default_factory=dict)
    pipeline: bool = False  # needs the finished pipeline (cache, checkpoints, export): slow


def write(rel: str, content: bytes | str) -> Callable[[Path, Path], None]:
    def setup(ws: Path, tmp: Path) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return setup


def copy_cache(change: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    """A copy of the workspace cache at {tmp}/cache, then ``change`` applied to it."""
    def setup(ws: Path, tmp: Path) -> None:
        shutil.copytree(ws / "cache", tmp / "cache")
        change(tmp / "cache")
    return setup


def copy_student(change: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    """A copy of the workspace distill output at {tmp}/student, then ``change`` applied."""
    def setup(ws: Path, tmp: Path) -> None:
        shutil.copytree(ws / "student", tmp / "student")
        change(tmp / "student")
    return setup


def reseal(cache: Path) -> None:
    """Make the manifest match the shard bytes (a writer that hashed bad bytes)."""
    data = json.loads((cache / MANIFEST).read_text())
    body = (cache / SHARD0).read_bytes()
    data["shards"][0].update(bytes=len(body), sha256=hashlib.sha256(body).hexdigest())
    (cache / MANIFEST).write_text(json.dumps(data))


def wrong_checksums(cache: Path) -> None:
    """Every shard's manifest sha256 no longer its bytes' (sizes still right)."""
    data = json.loads((cache / MANIFEST).read_text())
    for shard in data["shards"]:
        shard["sha256"] = "0" * 64
    (cache / MANIFEST).write_text(json.dumps(data))


def rewrite_shard(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    """Re-encode shard 0 of a plain cache with ``edit`` applied to its columns, resealed."""
    def change(cache: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = cache / SHARD0
        table = pq.read_table(path)
        columns = {name: table.column(name).to_pylist() for name in table.column_names}
        edit(columns)
        fields = [table.schema.field(name) for name in table.column_names]
        new = pa.table({f.name: pa.array(columns[f.name], f.type) for f in fields},
                       schema=table.schema)
        pq.write_table(new, path, compression="zstd")
        reseal(cache)
    return change


def nan_logprob(columns: dict) -> None:
    columns["topk_logprobs"][0][3] = float("nan")


def huge_token_id(columns: dict) -> None:
    columns["input_ids"][1][2] = 2_000_000_000


def huge_topk_id(columns: dict) -> None:
    columns["topk_ids"][0][0] = 10_000_000


def synthetic_cache(ws: Path, tmp: Path) -> None:
    """A valid cache from another teacher and tokenizer (fingerprint 'sha256:synthetic')."""
    meta = cache_meta("topk", k=8, encoding="plain")
    write_cache(tmp / "cache", meta, random_rows(meta, 8, seq_len=16), rows_per_shard=4)


def sampled_cache(ws: Path, tmp: Path) -> None:
    meta = cache_meta("sampled", num_samples=20, encoding="compact")
    write_cache(tmp / "cache", meta, random_rows(meta, 8, seq_len=16), rows_per_shard=4)


def latest(name: str) -> Callable[[Path], None]:
    return lambda student: (student / "checkpoints" / "LATEST").write_text(name)


def damage_checkpoint(file: str, how: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def change(student: Path) -> None:
        step = (student / "checkpoints" / "LATEST").read_text().strip()
        path = student / "checkpoints" / step / file
        path.write_bytes(how(path.read_bytes()))
    return change


def small_vocab_student(ws: Path, tmp: Path) -> None:
    """A student with 512 output logits but the same tokenizer files as the teacher."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    teacher = yaml.safe_load((ws / "config.yaml").read_text())["model"]["path"]
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp / "small")
    AutoTokenizer.from_pretrained(teacher).save_pretrained(tmp / "small")


GARBAGE = bytes(np.random.default_rng(9).integers(0, 256, size=3000, dtype=np.uint8))
GEN = ["generate", "-c", "{cfg}"]
DIS = ["distill", "-c", "{cfg}"]
TMP_CACHE = ["--set", "cache.path={tmp}/cache"]
TMP_STUDENT = ["--set", "distill.output_dir={tmp}/student"]
DATA = ["--set", "data.source={tmp}/d.jsonl"]
READ_ONLY = "/sys/qadpipe-out" if os.geteuid() == 0 else "{tmp}/ro/out"  # root ignores mode bits; /sys refuses


def read_only_dir(ws: Path, tmp: Path) -> None:
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)


def truncated_model(ws: Path, tmp: Path) -> None:
    """The workspace's model with its weights cut short (a copy interrupted mid-file)."""
    shutil.copytree(yaml.safe_load((ws / "config.yaml").read_text())["model"]["path"], tmp / "m")
    weights = tmp / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])


def final_copy(change: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    def setup(ws: Path, tmp: Path) -> None:
        shutil.copytree(ws / "student" / "final", tmp / "final")
        change(tmp / "final")
    return setup


CASES = {
    # --- configs
    "config-binary-garbage": Case(["generate", "-c", "{tmp}/c.yaml"], r"c\.yaml: not a text file, expected YAML",
                                  write("c.yaml", GARBAGE)),
    "config-wrong-json-type": Case(["generate", "-c", "{tmp}/c.json"], r"cache\.k: got 'eight' \(str\)",
                                   write("c.json", '{"cache": {"k": "eight"}}')),
    "config-missing-file": Case(["export", "-c", "{tmp}/nope.yaml"], r"nope\.yaml: config file not found"),
    "negative-k": Case(GEN + ["--set", "cache.k=-4"], r"cache\.k: got -4"),
    "huge-k": Case(GEN + ["--set", "cache.k=100000"], r"cache\.k: got 100000"),
    "wrong-dtype": Case(GEN + ["--set", "teacher.dtype=int4"], r"teacher\.dtype: got 'int4'"),
    "rows-per-shard-zero": Case(GEN + ["--set", "cache.rows_per_shard=0"], r"cache\.rows_per_shard: got 0"),
    "unknown-encoding": Case(GEN + ["--set", "cache.encoding=fp8"], r"cache\.encoding: got 'fp8'"),
    "nan-lr": Case(DIS + ["--set", "distill.lr=nan"], r"distill\.lr: got 'nan' \(str\), expected a number"),
    "export-unknown-format": Case(["export", "-c", "{cfg}", "--set", "export.format=gguf"],
                                  r"export\.format: got 'gguf'"),
    # --- command-line arguments and environment
    "num-shards-zero": Case(GEN + ["--num-shards", "0"], r"generate\.num_shards: got 0"),
    "shard-index-out-of-range": Case(GEN + ["--num-shards", "2", "--shard-index", "2"],
                                     r"generate\.shard_index: got 2"),
    "slurm-task-id-garbage": Case(GEN, r"generate\.shard_index: got 'abc'",
                                  env={"SLURM_ARRAY_TASK_ID": "abc", "SLURM_ARRAY_TASK_COUNT": "4"}),
    "slurm-task-id-without-count": Case(GEN, r"generate\.num_shards: SLURM_ARRAY_TASK_ID is set but neither",
                                        env={"SLURM_ARRAY_TASK_ID": "0"}),
    "set-without-value": Case(DIS + ["--set", "distill.lr"], r"--set 'distill\.lr': expected KEY=VALUE"),
    # --- data files
    "data-empty-file": Case(GEN + DATA + TMP_CACHE, r"d\.jsonl': no records \(empty source\)",
                            write("d.jsonl", "")),
    "data-broken-json-line": Case(GEN + DATA + TMP_CACHE, r"d\.jsonl:2: not valid JSON",
                                  write("d.jsonl", '{"text": "a"}\n{"text": \n')),
    "data-binary-garbage": Case(GEN + DATA + TMP_CACHE, r"d\.jsonl:1: not UTF-8 text",
                                write("d.jsonl", GARBAGE)),
    "data-json-not-a-list": Case(GEN + ["--set", "data.source={tmp}/d.json"] + TMP_CACHE,
                                 r"d\.json: expected a JSON list", write("d.json", '{"text": "x"}')),
    "data-garbage-parquet": Case(GEN + ["--set", "data.source={tmp}/d.parquet"] + TMP_CACHE,
                                 r"d\.parquet: not a readable Parquet file", write("d.parquet", GARBAGE)),
    "data-text-is-a-number": Case(GEN + DATA + TMP_CACHE, r"d\.jsonl record 0, line 1: field 'text' must be a string",
                                  write("d.jsonl", '{"text": 5}\n')),
    "data-unsupported-suffix": Case(GEN + ["--set", "data.source={tmp}/d.csv"] + TMP_CACHE,
                                    r"unsupported file type '\.csv'", write("d.csv", "text\nhello\n")),
    "data-messages-not-a-list": Case(GEN + DATA + TMP_CACHE + ["--set", "data.field=messages"],
                                     r"d\.jsonl record 0", write("d.jsonl", '{"messages": "hi"}\n')),
    "generate-model-with-truncated-weights": Case(GEN + TMP_CACHE + ["--set", "model.path={tmp}/m"],
                                                  r"m: cannot load model \(SafetensorError: ", truncated_model),
    # --- output locations
    "distill-output-dir-is-a-file": Case(DIS + ["--set", "distill.output_dir={tmp}/out.txt"],
                                         r"distill\.output_dir: .*out\.txt exists and is not a directory",
                                         write("out.txt", "keep me")),
    "eval-output-dir-is-a-file": Case(["eval", "-c", "{cfg}", "--set", "eval.output_dir={tmp}/out.txt"],
                                      r"eval\.output_dir: .*out\.txt exists and is not a directory",
                                      write("out.txt", "keep me")),
    "distill-output-dir-read-only": Case(DIS + ["--set", f"distill.output_dir={READ_ONLY}"],
                                         r"distill\.output_dir: .*(qadpipe-out|ro/out) cannot be",
                                         read_only_dir),
    "user-cache-dir-cannot-be-created": Case(GEN + TMP_CACHE + ["--set", "model.path=smollm2-135m"],
                                             r"/proc/qadpipe-cache: No such file or directory \(FileNotFoundError; ",
                                             env={"QADPIPE_CACHE_DIR": "/proc/qadpipe-cache"}),
    # --- caches
    "generate-into-another-teachers-cache": Case(GEN + TMP_CACHE, r"task-00000\.json: cache was written with teacher_revision=",
                                                 synthetic_cache),
    "cache-path-is-a-file": Case(GEN + TMP_CACHE, r"cache\.path: .*/cache exists and is not a directory",
                                 write("cache", GARBAGE)),
    "cache-path-under-a-file": Case(GEN + ["--set", "cache.path={tmp}/afile/cache"],
                                    r"cache\.path: .*/afile/cache cannot be created \(.*/afile is a file\)",
                                    write("afile", GARBAGE)),
    "distill-cache-of-another-tokenizer": Case(DIS + TMP_CACHE + TMP_STUDENT, r"cache tokenizer_fingerprint=",
                                               synthetic_cache, pipeline=True),
    "distill-sampled-cache-with-kl-loss": Case(DIS + TMP_CACHE + TMP_STUDENT, r"cache holds sampled targets",
                                               sampled_cache, pipeline=True),
    "distill-missing-cache": Case(DIS + ["--set", "cache.path={tmp}/none"] + TMP_STUDENT,
                                  r"none: no cache here \(the path does not exist\)", pipeline=True),
    "distill-manifest-not-json": Case(DIS + TMP_CACHE + TMP_STUDENT, r"task-00000\.json: not valid JSON",
                                      copy_cache(lambda c: (c / MANIFEST).write_text("{not json")), pipeline=True),
    "distill-garbage-shard": Case(DIS + TMP_CACHE + TMP_STUDENT, r"task-00000-000000\.parquet: .*not a readable Parquet shard",
                                  copy_cache(lambda c: (write(SHARD0, GARBAGE)(c, c), reseal(c))), pipeline=True),
    "distill-checksum-mismatch": Case(DIS + TMP_CACHE + TMP_STUDENT,   # a same-size rewrite in place
                                      r"task-00000-000000\.parquet: checksum mismatch: sha256 [0-9a-f]+\.\.\., "
                                      r"manifest says 0000", copy_cache(wrong_checksums), pipeline=True),
    "distill-nan-in-cache": Case(DIS + TMP_CACHE + TMP_STUDENT, r"task-00000-000000\.parquet.*NaN",
                                 copy_cache(rewrite_shard(nan_logprob)), pipeline=True),
    "distill-huge-token-id": Case(DIS + TMP_CACHE + TMP_STUDENT, r"task-00000-000000\.parquet.*input_ids",
                                  copy_cache(rewrite_shard(huge_token_id)), pipeline=True),
    "distill-huge-topk-id": Case(DIS + TMP_CACHE + TMP_STUDENT, r"task-00000-000000\.parquet.*topk_ids",
                                 copy_cache(rewrite_shard(huge_topk_id)), pipeline=True),
    "distill-student-of-another-vocab": Case(DIS + TMP_STUDENT + ["--set", "model.path={tmp}/small"],
                                             r"cache vocab_size=49152, but the student", small_vocab_student, pipeline=True),
    "distill-model-not-an-hf-dir": Case(DIS + TMP_STUDENT + ["--set", "model.path={tmp}/empty"],
                                        r"empty: no config\.json", write("empty/notes.txt", "hi"), pipeline=True),
    "inspect-not-a-cache": Case(["inspect", "{ws}/student"], r"student: not a cache \(no manifests/ directory\)",
                                pipeline=True),
    "inspect-garbage-shard": Case(["inspect", "{tmp}/cache"], r"1 of 2 shards failed",
                                  copy_cache(lambda c: write(SHARD0, GARBAGE)(c, c)), pipeline=True),
    # --- checkpoints
    "resume-latest-escapes": Case(DIS + TMP_STUDENT + ["--resume"], r"LATEST: expected a step directory name",
                                  copy_student(latest("../../../etc")), pipeline=True),
    "resume-latest-names-a-missing-step": Case(DIS + TMP_STUDENT + ["--resume"], r"step-00000099: checkpoint named "
                                               r"by LATEST lacks", copy_student(latest("step-00000099")), pipeline=True),
    "resume-garbage-trainer-state": Case(DIS + TMP_STUDENT + ["--resume"], r"unreadable checkpoint",
                                         copy_student(damage_checkpoint("trainer_state.pt", lambda b: GARBAGE)), pipeline=True),
    "resume-truncated-weights": Case(DIS + TMP_STUDENT + ["--resume"], r"unreadable checkpoint",
                                     copy_student(damage_checkpoint("model.safetensors", lambda b: b[:len(b) // 2])), pipeline=True),
    "resume-run-record-not-a-mapping": Case(DIS + TMP_STUDENT + ["--resume"],
                                            r"qadpipe_run\.yaml: not a qadpipe run record with a config \(config: int,",
                                            copy_student(damage_checkpoint("qadpipe_run.yaml", lambda b: b"config: 3\n")),
                                            pipeline=True),
    "resume-run-record-garbage": Case(DIS + TMP_STUDENT + ["--resume"],
                                      r"qadpipe_run\.yaml: not a qadpipe run record with a config",
                                      copy_student(damage_checkpoint("qadpipe_run.yaml", lambda b: b"::\n")), pipeline=True),
    "export-run-record-config-not-a-mapping": Case(
        ["export", "-c", "{cfg}", "--checkpoint", "{tmp}/final", "--output", "{tmp}/o"],
        r"final/qadpipe_run\.yaml: not a qadpipe run record with a config",
        final_copy(lambda f: (f / "qadpipe_run.yaml").write_text("config: 3\n")), pipeline=True),
    "export-missing-checkpoint": Case(["export", "-c", "{cfg}", "--checkpoint", "{tmp}/nope", "--output", "{tmp}/o"],
                                      r"--checkpoint .*nope: expected a distill final/", pipeline=True),
    "export-garbage-weights": Case(["export", "-c", "{cfg}", "--checkpoint", "{tmp}/final", "--output", "{tmp}/o"],
                                   r"final/model\.safetensors: unreadable weights",
                                   final_copy(lambda f: (f / "model.safetensors").write_bytes(GARBAGE)), pipeline=True),
    "export-over-the-cache": Case(["export", "-c", "{cfg}", "--output", "{ws}/cache"],
                                  r"cache: a non-empty directory that is not a qadpipe export", pipeline=True),
    "export-output-is-a-file": Case(["export", "-c", "{cfg}", "--output", "{tmp}/out.txt"],
                                    r"out\.txt: exists and is not a directory", write("out.txt", "keep me"), pipeline=True),
    "export-read-only-dir": Case(["export", "-c", "{cfg}", "--output", READ_ONLY],
                                 r"(qadpipe-out|ro/out): cannot create a directory",
                                 read_only_dir, pipeline=True),
}


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.slow] if case.pipeline else [])
                                  for name, case in CASES.items()])
def test_bad_input_is_refused_in_one_line(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    case = CASES[name]
    ws = request.getfixturevalue("ws" if case.pipeline else "light")
    case.setup(ws, tmp_path)
    fill = {"ws": ws, "tmp": tmp_path, "cfg": ws / "config.yaml"}
    before_ws, before_tmp = tree_hash(ws), tree_hash(tmp_path)
    result = invoke(*[arg.format(**fill) for arg in case.args], env=case.env)
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.stderr
    # stderr also carries tqdm progress bars; the error itself is one line, and the last
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("qadpipe:")]
    assert len(errors) == 1 and errors[0] == lines[-1] and errors[0].startswith("qadpipe: error: "), result.stderr
    assert re.search(case.message, errors[0]), errors[0]
    assert tree_hash(ws) == before_ws, "a pre-existing output changed"
    assert tree_hash(tmp_path) == before_tmp, "the refused command left files behind"
