"""The typed config: defaults, overrides, and one clear line for every bad value."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from qadpipe.cli import cli
from qadpipe.config import load_config
from qadpipe.errors import ConfigError


def run_cli(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_defaults_resolve_without_a_file():
    config = load_config(None)
    assert config.model.path == "smollm2-135m"
    assert config.teacher_path == "smollm2-135m"
    assert config.distill.lr == pytest.approx(1e-5)


def test_override_applies_and_yaml_1_1_exponent_is_a_number(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("distill:\n  lr: 1e-4\n  max_steps: 7\n")
    config = load_config(path, ["distill.lr=2e-5", "model.path=/x"])
    assert config.distill.lr == pytest.approx(2e-5)  # the override wins over the file
    assert isinstance(config.distill.lr, float)
    assert config.distill.max_steps == 7  # the file wins over the default
    assert config.teacher_path == "/x"


def test_override_keeps_a_hash_that_is_not_a_yaml_comment():
    """A '#' inside a word or a quoted value is data, as YAML reads it."""
    config = load_config(None, ["data.source=runs/a#1.jsonl", "model.path='runs/a #2'",
                                'quant.ignore=[lm_head, "#x"]'])
    assert (config.data.source, config.model.path, config.quant.ignore) == ("runs/a#1.jsonl", "runs/a #2",
                                                                             ["lm_head", "#x"])


def test_config_show_prints_the_resolved_config_with_the_override():
    result = run_cli("config", "show", "-c", "configs/demo.yaml", "--set", "distill.lr=2e-5")
    assert result.exit_code == 0, result.output
    assert "lr: 2.0e-05" in result.output
    assert "model:" in result.output and "distill:" in result.output


# (file contents or None, --set overrides, the exact message after "qadpipe: error: ")
BAD_CONFIGS = [
    pytest.param("distil:\n  lr: 1.0e-5\n", [],
                 "distil: unknown key; did you mean 'distill'?", id="typo-section"),
    pytest.param("distill:\n  lrr: 1.0e-5\n", [],
                 "distill.lrr: unknown key; did you mean 'distill.lr'?", id="typo-field"),
    pytest.param("model:\n  colour: red\n", [],
                 "model.colour: unknown key; expected one of path, dtype, trust_remote_code",
                 id="unknown-field-no-close-match"),
    pytest.param("distill:\n  max_steps: ten\n", [],
                 "distill.max_steps: got 'ten' (str), expected an integer", id="int-from-string"),
    pytest.param("distill:\n  max_steps: true\n", [],
                 "distill.max_steps: got True (bool), expected an integer", id="int-from-bool"),
    pytest.param("distill:\n  max_steps: 2.5\n", [],
                 "distill.max_steps: got 2.5 (float), expected an integer", id="int-from-float"),
    pytest.param("distill:\n  lr: fast\n", [],
                 "distill.lr: got 'fast' (str), expected a number", id="float-from-word"),
    pytest.param("distill:\n  lr: .nan\n", [],
                 "distill.lr: got nan (float), expected a finite number", id="float-nan"),
    pytest.param("distill:\n  lr: -1\n", [],
                 "distill.lr: got -1.0 (float), expected a value > 0.0", id="float-out-of-range"),
    pytest.param("eval:\n  max_sequences: 0\n", [],
                 "eval.max_sequences: got 0 (int), expected a value >= 1", id="int-out-of-range"),
    pytest.param("distill:\n  mode: qadd\n", [],
                 "distill.mode: got 'qadd' (str), expected one of 'qad', 'qat', 'online'; did you mean 'qad'?",
                 id="choice-typo"),
    pytest.param("model:\n  dtype: int3\n", [],
                 "model.dtype: got 'int3' (str), expected one of 'bfloat16', 'float16', 'float32'",
                 id="choice-no-close-match"),
    pytest.param("model:\n  trust_remote_code: maybe\n", [],
                 "model.trust_remote_code: got 'maybe' (str), expected true or false", id="bool-from-word"),
    pytest.param("distill: 5\n", [],
                 "distill: got 5 (int), expected a mapping of fields", id="section-not-mapping"),
    pytest.param(None, ["distill.lr"],
                 "--set 'distill.lr': expected KEY=VALUE, e.g. distill.lr=2e-5", id="override-without-value"),
    pytest.param(None, ["distill.lr.x=1"],
                 "distill.lr: got {'x': 1} (dict), expected a number", id="override-into-a-value"),
    pytest.param("distill:\n  lr: 1.0e-5\n", ["distill.lr.x=1"],
                 "--set 'distill.lr.x=1': 'distill.lr' is not a section", id="override-into-a-file-value"),
    pytest.param(None, ["data.source=runs/a #1.jsonl"],
                 "--set 'data.source=runs/a #1.jsonl': YAML reads '#1.jsonl' as a comment and drops it; "
                 "quote the value to keep it: data.source='runs/a #1.jsonl'", id="override-with-a-yaml-comment"),
    pytest.param(None, ["distill.mode=online", "distill.loss=jsd"],
                 "distill.loss: got 'jsd', but mode=online trains the full-vocabulary forward KL (the other losses "
                 "are for a cache's targets); expected 'forward_kl'", id="online-with-a-cache-loss"),
    pytest.param(None, ["distill.seed=010"],
                 "distill.seed: got '010' (str), expected an integer", id="yaml-1.1-octal-stays-a-string"),
    pytest.param(None, ["distill.seed=1:30"],
                 "distill.seed: got '1:30' (str), expected an integer", id="yaml-1.1-base-60-stays-a-string"),
    pytest.param(None, ["distill.max_steps=-3"],
                 "distill.max_steps: got -3 (int), expected a value >= 1", id="override-out-of-range"),
    pytest.param(None, ["data.random.seed=-1"],
                 "data.random.seed: got -1 (int), expected a value >= 0", id="negative-seed"),
    pytest.param(None, ["distill.seed=99999999999999999999999"],
                 "distill.seed: got 99999999999999999999999 (int), expected a value < 4294967296", id="seed-too-big"),
    pytest.param(None, ["cache.num_samples=100000000"],
                 "cache.num_samples: got 100000000 (int), expected a value <= 4096", id="draws-too-many"),
    pytest.param(None, ["distill.output_dir="],   # $OUT unset in `--set distill.output_dir=$OUT`: not the cwd
                 "distill.output_dir: must not be empty", id="empty-output-dir"),
    pytest.param(None, ["teacher.path="],
                 "teacher.path: must not be empty", id="empty-optional-path"),
    pytest.param(None, ["quant.preset=nvfp5"],
                 "quant.preset: unknown preset 'nvfp5'; expected one of nvfp4, nvfp4_a16, mxfp4, mxfp4_a16, "
                 "mxfp8, mxfp8_a16, fp8, fp8_static, w4a16_int, w4a16_int_asym, w8a16_int, w8a8_int, w4a8_fp8, "
                 "ternary_twn, bitnet_absmean, sherry_3of4, lsq_int4, lsq_int2; did you mean 'nvfp4'?",
                 id="unknown-preset-before-any-model"),
    pytest.param(None, ["quant.preset=mxfp4", "quant.group_size=64"],
                 "quant.group_size: 64 cannot apply to preset 'mxfp4' (its mxfp4 blocks are 32 by the format); "
                 "set group_size: null", id="group-size-on-a-fixed-block-format"),
    pytest.param(None, ["quant.rules=[{targets: down_proj, preset: w4a8_fp8, group_size: 64}]"],
                 "quant.rules[0].group_size: 64 cannot apply to preset 'w4a8_fp8' (vLLM's W4A8-FP8 kernel takes int4 "
                 "in groups of 128 only); set group_size: null", id="w4a8-fp8-outside-group-128"),
    pytest.param(None, ["quant.rules=[{targets: down_proj, preset: fp8, group_size: 32}]"],
                 "quant.rules[0].group_size: 32 cannot apply to preset 'fp8' (its weights have channel scales); "
                 "set group_size: null", id="group-size-in-a-rule"),
    pytest.param(None, ["distill.lr=1:30.5"],
                 "distill.lr: got '1:30.5' (str), expected a number", id="yaml-1.1-base-60-float-stays-a-string"),
    pytest.param("distill:\n  lr: 1:30.5\n", [],
                 "distill.lr: got '1:30.5' (str), expected a number", id="yaml-1.1-base-60-float-in-a-file"),
    pytest.param(None, ['quant.ignore=["lm_head", "mlp.(up"]'],
                 "quant.ignore[1]: 'mlp.(up' is not a valid regex (missing ), unterminated subpattern at position 4)",
                 id="bad-ignore-regex-before-any-model"),
    pytest.param(None, ['quant.rules=[{targets: "a[", preset: fp8}]'],
                 "quant.rules[0].targets: 'a[' is not a valid regex (unterminated character set at position 1)",
                 id="bad-rule-regex-before-any-model"),
    pytest.param(None, ['quant.rules=[{preset: nvfp4}]'],   # its empty default regex matched every layer
                 "quant.rules[0].targets: missing, expected regex searched in the dotted module name, e.g. 'mlp\\.down_proj'",
                 id="rule-without-targets"),
    pytest.param(None, ["distill.kd_loss_weight=0"],
                 "distill.kd_loss_weight and lm_loss_weight: both 0, so mode=qad would train on a zero loss; "
                 "expected one of them > 0", id="nothing-to-train"),
    pytest.param("data:\n  chat_date: 2026-13-01\n", [],
                 "data.chat_date: got '2026-13-01' (str), expected a date as YYYY-MM-DD",
                 id="yaml-1.1-date-stays-a-string-the-field-refuses"),
    pytest.param(None, ["data.chat_date=2026-W49-1"],
                 "data.chat_date: got '2026-W49-1' (str), expected a date as YYYY-MM-DD", id="chat-date-iso-week"),
    pytest.param(None, ["data.chat_date=7 Dec 2026"],
                 "data.chat_date: got '7 Dec 2026' (str), expected a date as YYYY-MM-DD", id="chat-date-not-iso"),
    pytest.param(None, ["distill={[a]: 1}"],
                 "distill: got '{[a]: 1}' (str), expected a mapping of fields", id="override-with-a-list-key"),
    # each bound one step past the value it still takes (see test_bounds_take_their_own_endpoint)
    pytest.param(None, ["cache.k=0"], "cache.k: got 0 (int), expected a value >= 1", id="k-zero"),
    pytest.param(None, ["cache.k=4097"], "cache.k: got 4097 (int), expected a value <= 4096", id="k-past-4096"),
    pytest.param(None, ["distill.lr=0"], "distill.lr: got 0.0 (float), expected a value > 0.0", id="lr-zero"),
    pytest.param(None, ["distill.seed=4294967296"],
                 "distill.seed: got 4294967296 (int), expected a value < 4294967296", id="seed-2-to-the-32"),
    pytest.param(None, ["eval.batch_size=0"], "eval.batch_size: got 0 (int), expected a value >= 1",
                 id="eval-batch-zero"),
    pytest.param(None, ["model.trust_remote_code=1"],
                 "model.trust_remote_code: got 1 (int), expected true or false", id="bool-from-int"),
    pytest.param(None, ["distill.lr=true"], "distill.lr: got True (bool), expected a number", id="float-from-bool"),
    pytest.param(None, ["generate.num_shards=2", "generate.shard_index=2"],
                 "generate.shard_index: got 2, expected a value < num_shards (2)", id="shard-index-equals-num-shards"),
    pytest.param(None, ["distill.mode=online", "distill.kd_loss_weight=0"],
                 "distill.kd_loss_weight and lm_loss_weight: both 0, so mode=online would train on a zero loss; "
                 "expected one of them > 0", id="nothing-to-train-online"),
]


@pytest.mark.parametrize("content, overrides, message", BAD_CONFIGS)
def test_bad_config_is_one_line_and_exit_2(tmp_path: Path, content, overrides, message):
    args = ["config", "show"]
    if content is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(content)
        args += ["-c", str(path)]
    for item in overrides:
        args += ["--set", item]
    result = run_cli(*args)
    assert result.exit_code == 2
    assert result.stderr == f"qadpipe: error: {message}\n"
    assert result.stdout == ""


def test_yaml_merge_keys_reuse_a_block_and_the_keys_written_beside_them_win(tmp_path: Path):
    """`<<: *rule` was refused as 'not valid YAML' (no constructor for the merge tag): the
    duplicate-key check built every key node, the merge key among them."""
    path = tmp_path / "merged.yaml"
    path.write_text("distill:\n  <<: {lr: 3.0e-5, max_steps: 7}\n  max_steps: 9\n"
                    "quant:\n  group_size: 32\n  rules:\n    - &int8 {targets: down_proj, preset: w8a16_int}\n"
                    "    - <<: *int8\n      targets: up_proj\n")
    config = load_config(path)
    assert (config.distill.lr, config.distill.max_steps) == (3.0e-5, 9)
    assert [(r.targets, r.preset) for r in config.quant.rules] == [("down_proj", "w8a16_int"), ("up_proj", "w8a16_int")]


def test_an_unquoted_date_in_a_file_is_the_text_a_string_field_takes(tmp_path: Path):
    path = tmp_path / "dated.yaml"
    path.write_text("data:\n  chat_date: 2026-12-07\n")
    assert load_config(path).data.chat_date == "2026-12-07"   # PyYAML alone gives a datetime.date


def test_file_level_problems_name_the_file(tmp_path: Path):
    missing = tmp_path / "nope.yaml"
    assert run_cli("config", "show", "-c", str(missing)).stderr == f"qadpipe: error: {missing}: config file not found\n"

    as_list = tmp_path / "list.yaml"
    as_list.write_text("- a\n- b\n")
    result = run_cli("config", "show", "-c", str(as_list))
    assert result.exit_code == 2
    assert result.stderr == f"qadpipe: error: {as_list}: expected a YAML mapping of sections, got list\n"

    broken = tmp_path / "broken.yaml"
    broken.write_text("distill:\n  lr: [1, 2\n")
    result = run_cli("config", "show", "-c", str(broken))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"qadpipe: error: {broken}: not valid YAML at line ")
    assert result.stderr.count("\n") == 1

    twice = tmp_path / "twice.yaml"   # PyYAML alone would keep the second block and drop lr silently
    twice.write_text("distill:\n  lr: 2.0e-5\nquant:\n  preset: fp8\ndistill:\n  max_steps: 5\n")
    result = run_cli("config", "show", "-c", str(twice))
    assert result.exit_code == 2
    assert result.stderr == (f"qadpipe: error: {twice}: not valid YAML at line 5 (key 'distill' given twice in one "
                             "mapping (YAML would keep only the last))\n")

    list_key = tmp_path / "list_key.yaml"   # crashed: unhashable type 'list'
    list_key.write_text("distill: {[a]: 1}\n")
    result = run_cli("config", "show", "-c", str(list_key))
    assert result.exit_code == 2
    assert result.stderr == (f"qadpipe: error: {list_key}: not valid YAML at line 1 (a key must be a plain name, "
                             "got list ['a'])\n")

    binary = tmp_path / "garbage.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81garbage")
    result = run_cli("config", "show", "-c", str(binary))
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and str(binary) in result.stderr


def test_set_reaches_a_section_whose_fields_are_all_commented_out(tmp_path: Path):
    path = tmp_path / "sparse.yaml"
    path.write_text("distill:\n  # lr: 1.0e-5\nquant:\n  preset: fp8\n")
    config = load_config(path, ["distill.lr=2e-5", "distill.seed=0x10", "distill.max_steps=1_000"])
    assert (config.distill.lr, config.distill.seed, config.distill.max_steps) == (2e-5, 16, 1000)
    assert config.quant.preset == "fp8"


def test_library_callers_get_a_config_error(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"^distill\.lr: got 'x' \(str\), expected a number$"):
        load_config(None, ["distill.lr=x"])


def test_a_data_file_only_generate_reads_need_not_exist_where_later_stages_run(tmp_path: Path):
    """Generate on one cluster, distill or export elsewhere from the same config: the data
    file is checked where it is read (tests/test_generate.py), not when the config loads."""
    config = load_config(None, ["data.source=/no/such/data.jsonl", "eval.data=/no/such/held_out.jsonl"])
    assert config.data.source == "/no/such/data.jsonl" and config.eval.data == "/no/such/held_out.jsonl"


@pytest.mark.parametrize("text, expected", [("off", "off"), ("on", "on"), ("no", "off"), ("'on'", "on"),
                                            ("auto", "auto")])
def test_unquoted_on_off_reach_an_on_off_field_as_written(tmp_path: Path, text: str, expected: str):
    """YAML 1.1 reads on/off/yes/no as booleans; quant.compile documents on | off."""
    path = tmp_path / "c.yaml"
    path.write_text(f"quant:\n  compile: {text}\n")
    assert load_config(str(path)).quant.compile == expected
    assert load_config(None, [f"quant.compile={text}"]).quant.compile == expected


def test_set_takes_a_mapping_key_with_dots_and_names_yaml_reads_as_other_types():
    config = load_config(None, ["eval.models.qwen3-1.7b-int4=/m/a", "model.path=yes", "export.output_dir=2024",
                                "teacher.path=null", "eval.data=null"])
    assert config.eval.models == {"qwen3-1.7b-int4": "/m/a"}
    assert (config.model.path, config.export.output_dir) == ("yes", "2024")
    assert config.teacher.path is None and config.eval.data is None


def test_path_fields_expand_home_as_a_shell_does(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "c.yaml"
    path.write_text("eval:\n  output_dir: ~/eval\n  models: {qad: ~/final}\n")
    config = load_config(path, ["distill.output_dir=~/student", "cache.path=s3://bucket/~x", "data.source=~/d.jsonl"])
    assert config.eval.output_dir == f"{tmp_path}/eval" and config.eval.models == {"qad": f"{tmp_path}/final"}
    assert config.distill.output_dir == f"{tmp_path}/student" and config.data.source == f"{tmp_path}/d.jsonl"
    assert config.cache.path == "s3://bucket/~x"
    assert load_config(None, ["distill.lr=2e-5"]).distill.output_dir == "runs/student"   # relative stays relative


def test_an_error_line_keeps_the_spaces_of_a_path():
    result = run_cli("config", "show", "-c", "two  spaces.yaml")
    assert result.exit_code == 2
    assert result.stderr.strip() == "qadpipe: error: two  spaces.yaml: config file not found"


def test_yaml_nested_past_the_recursion_limit_is_one_line(tmp_path: Path):
    path = tmp_path / "deep.yaml"
    path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match=rf"^{path}: YAML nested too deeply to be a config$"):
        load_config(path)


def test_off_for_an_optional_choice_says_null_is_none():
    """YAML 1.1 reads off as false: the error named a False the user never typed."""
    with pytest.raises(ConfigError, match=r"^quant.kv_cache: got False \(bool\), expected one of 'fp8', 'fp8_cpu'; "
                                          r"for none, null \(YAML reads off and no as false\)$"):
        load_config(None, ["quant.kv_cache=off"])
    assert load_config(None, ["quant.kv_cache=null"]).quant.kv_cache is None


def test_bounds_take_their_own_endpoint():
    """The inclusive ends of the ranges BAD_CONFIGS refuses one step past."""
    config = load_config(None, ["cache.k=4096", "generate.top_p=1.0", "teacher.gpu_memory_utilization=1",
                                "distill.seed=4294967295", "generate.num_shards=2", "generate.shard_index=1",
                                "distill.max_grad_norm=0", "quant.activation_percentile=100"])
    assert (config.cache.k, config.generate.top_p, config.teacher.gpu_memory_utilization) == (4096, 1.0, 1.0)
    assert (config.distill.seed, config.generate.shard_index) == (2**32 - 1, 1)
    assert load_config(None, ["cache.k=1"]).cache.k == 1


def test_the_last_set_of_a_field_wins(tmp_path: Path):
    """`--set` overrides apply in order, as a shell script appending one expects."""
    config = load_config(None, ["distill.lr=1e-4", "distill.max_steps=3", "distill.lr=2e-5"])
    assert config.distill.lr == pytest.approx(2e-5) and config.distill.max_steps == 3
