"""``qadpipe eval`` end to end on a tiny peaked teacher: defaults, named models, data files, refusals."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from distill_fixtures import settings
from qadpipe.cache.reader import CacheReader
from qadpipe.cli import cli
from qadpipe.config import load_config
from qadpipe.distill.trainer import run_distill
from qadpipe.errors import ConfigError
from qadpipe.eval.evaluate import run_eval


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, peaky_llama_dir: Path, topk_cache: Path) -> list[str]:
    out = tmp_path_factory.mktemp("student")
    overrides = settings(peaky_llama_dir, topk_cache, "distill.max_steps=3", f"distill.output_dir={out}",
                         "distill.eval_every=3", "distill.save_every=3")
    run_distill(load_config(None, overrides))
    return overrides


def test_default_models_are_ptq_and_qad_on_the_held_out_cache_rows(trained, tmp_path: Path, topk_cache: Path,
                                                                   monkeypatch):
    from qadpipe.eval import evaluate

    write_report, curves = evaluate.write_report, []
    monkeypatch.setattr(evaluate, "write_report", lambda *a, **kw: curves.append(kw["metrics_files"])
                        or write_report(*a, **kw))
    config = load_config(None, [*trained, f"eval.output_dir={tmp_path}"])
    results = run_eval(config)
    assert list(curves[0]) == ["qad"]   # the run's curve once, not again as "ptq" (same metrics.jsonl)
    assert list(results) == ["teacher", "ptq", "qad"]
    held_out = list(itertools.islice(CacheReader(str(topk_cache)).iter_sequences(), config.distill.eval_rows))
    for metrics in results.values():
        assert metrics["positions"] == sum(row.num_target_rows for row in held_out)
    assert results["teacher"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert results["teacher"]["tail_kl"] < 1e-3  # only the compact codec's rounding separates them
    assert results["ptq"]["kl"] > 1e-4  # int4 group-32 moves a peaked teacher measurably
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["results"]["qad"]["kl"] == pytest.approx(results["qad"]["kl"])
    assert "| ptq |" in (tmp_path / "report.md").read_text()
    assert saved["context"]["data"].endswith(f"of the cache {topk_cache} (never trained on)")
    scored = sum(row.num_target_rows for row in held_out)
    assert f"- positions: {scored} scored per model: those a student trains on" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "kl_by_model.png").is_file() and (tmp_path / "qadpipe_run.yaml").is_file()
    # distill's last held-out eval scored the same student on the same rows: eval's tail-bucket column
    student_dir = Path(next(item.split("=", 1)[1] for item in trained if item.startswith("distill.output_dir=")))
    rows = [json.loads(line) for line in (student_dir / "metrics.jsonl").read_text().splitlines()]
    last = [row for row in rows if row.get("tag") == "eval"][-1]
    assert last["eval_kl"] == pytest.approx(results["qad"]["tail_kl"], rel=1e-4)
    assert last["eval_top1"] == pytest.approx(results["qad"]["top1_agreement"], rel=1e-6)


def test_one_student_at_a_time_sits_beside_the_teacher(trained, tmp_path: Path, peaky_llama_dir: Path,
                                                       monkeypatch):
    """Every student in fp32 at once would not fit beside an 8B teacher.  Scored one by one,
    the figures are the ones a joint pass over all of them gives."""
    import weakref

    from qadpipe.eval import evaluate
    from qadpipe.eval.runner import compare_to_teacher
    from qadpipe.models import load_causal_lm, load_tokenizer

    loaded, alive_at_load, load_model = [], [], evaluate.load_model

    def tracked(path: str, device, trained=None):
        alive_at_load.append(sum(ref() is not None for ref in loaded))
        model = load_model(path, device, trained)
        loaded.append(weakref.ref(model))
        return model

    monkeypatch.setattr(evaluate, "load_model", tracked)
    student_dir = Path(next(item.split("=", 1)[1] for item in trained if item.startswith("distill.output_dir=")))
    models = {"copy": peaky_llama_dir, "qad": student_dir / "final", "ptq": student_dir / "ptq"}
    config = load_config(None, [*trained, f"eval.output_dir={tmp_path}",
                                *[f"eval.models.{name}={path}" for name, path in models.items()]])
    results = run_eval(config)
    assert list(results) == ["teacher", "copy", "qad", "ptq"]
    assert alive_at_load == [0, 0, 0]

    tokenizer = load_tokenizer(str(peaky_llama_dir))
    data = evaluate.held_out(config, tokenizer, 49152, config.distill.eval_rows)
    joint = compare_to_teacher(load_causal_lm(str(peaky_llama_dir), dtype="float32"),
                               {name: load_model(str(path), torch.device("cpu")) for name, path in models.items()},
                               data.sequences, pad_id=0,   # any id: padding changes no figure (test_runner.py)
                               starts=data.starts, cache_rows=data.cache_rows, batch_size=config.eval.batch_size,
                               with_perplexity=False)   # random tokens: no text to have a perplexity on
    assert data.random_tokens and all("ppl" not in figures for figures in results.values())
    assert results.keys() == joint.keys()
    for name in joint:
        assert results[name] == pytest.approx(joint[name], rel=1e-9), name


def test_eval_data_that_is_the_training_data_is_said_not_unseen(trained, tmp_path: Path, caplog):
    """A copy of the file the cache was made from scores sequences the students trained on."""
    from qadpipe.eval import evaluate
    from qadpipe.models import load_tokenizer

    records = "\n".join(json.dumps({"text": f"Sentence number {i} about the sea."}) for i in range(4))
    (tmp_path / "train.jsonl").write_text(records)
    (tmp_path / "copy.jsonl").write_text(records)
    (tmp_path / "other.jsonl").write_text(records.replace("sea", "sky"))
    model_dir = next(item.split("=", 1)[1] for item in trained if item.startswith("model.path="))
    tokenizer = load_tokenizer(model_dir)
    for data, flagged in (("copy.jsonl", True), ("train.jsonl", True), ("other.jsonl", False)):
        caplog.clear()
        config = load_config(None, [*trained, f"data.source={tmp_path / 'train.jsonl'}",
                                    f"eval.data={tmp_path / data}"])
        description = evaluate.held_out(config, tokenizer, len(tokenizer), 4).description
        assert (f"(NOT unseen: the same records as the training data {tmp_path / 'train.jsonl'})" in description) \
            is flagged, data
        assert ("the students trained on them" in caplog.text) is flagged, data


def test_scoring_fewer_rows_than_distill_held_out_is_said(trained, tmp_path: Path, caplog):
    from qadpipe.eval import evaluate
    from qadpipe.models import load_tokenizer

    config = load_config(None, [*trained, "eval.max_sequences=2"])
    tokenizer = load_tokenizer(config.model.path)
    assert len(evaluate.held_out(config, tokenizer, len(tokenizer), 4).sequences) == 2
    assert "scoring 2 of the 4 held-out cache rows (eval.max_sequences=2)" in caplog.text


def test_named_hf_model_and_a_data_file(trained, tmp_path: Path, peaky_llama_dir: Path):
    data = tmp_path / "held_out.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Sentence number {i} about the sea and the sky."})
                              for i in range(5)))
    config = load_config(None, [*trained, f"eval.output_dir={tmp_path / 'out'}", f"eval.data={data}",
                                f"eval.models.copy={peaky_llama_dir}"])
    results = run_eval(config)
    assert list(results) == ["teacher", "copy"]
    assert results["copy"]["kl"] == pytest.approx(0.0, abs=1e-6) and results["copy"]["top1_agreement"] == 1.0
    assert "tail_kl" not in results["copy"]  # no cached targets for a data file


def test_a_data_file_without_prompt_positions_scores_every_completion_token(trained, tmp_path: Path,
                                                                           peaky_llama_dir: Path):
    """generate.include_prompt=false: the last prompt position predicts the first completion token
    and is scored, as the cache scores it (one-token completions left nothing to score before)."""
    from qadpipe.models import load_tokenizer

    records = [{"prompt": "What is 2+2?", "completion": " 4"}, {"prompt": "Say hi", "completion": " hi there"}]
    data = tmp_path / "answers.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    tokenizer = load_tokenizer(str(peaky_llama_dir))
    answer_tokens = sum(len(tokenizer(r["completion"], add_special_tokens=False).input_ids) + 1   # + EOS
                        for r in records)
    config = load_config(None, [*trained, f"eval.output_dir={tmp_path / 'out'}", f"eval.data={data}",
                                "data.field=prompt", "generate.include_prompt=false",
                                f"eval.models.copy={peaky_llama_dir}"])
    assert run_eval(config)["copy"]["positions"] == answer_tokens


def test_a_student_of_another_vocabulary_is_one_line_naming_it(trained, tmp_path: Path, peaky_llama_dir: Path):
    from qadpipe.models import load_causal_lm

    padded = load_causal_lm(str(peaky_llama_dir), dtype="float32")
    padded.resize_token_embeddings(49152 + 64)
    padded.save_pretrained(tmp_path / "padded")
    overrides = [*trained, f"eval.output_dir={tmp_path / 'out'}", f"eval.models.padded={tmp_path / 'padded'}"]
    result = CliRunner().invoke(cli, ["eval", *[arg for item in overrides for arg in ("--set", item)]])
    errors = [line for line in result.stderr.splitlines() if line.startswith("qadpipe: error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output   # beside transformers' loading bars
    assert errors[0].startswith(f"qadpipe: error: eval.models.padded: {tmp_path / 'padded'} has 49216 output "
                                f"logits, the teacher {peaky_llama_dir} 49152")


def test_eval_without_a_student_is_one_line(tmp_path: Path, peaky_llama_dir: Path, topk_cache: Path):
    overrides = settings(peaky_llama_dir, topk_cache, f"distill.output_dir={tmp_path}")
    result = CliRunner().invoke(cli, ["eval", *[arg for item in overrides for arg in ("--set", item)]])
    assert result.exit_code == 2
    assert result.stderr.startswith("qadpipe: error: eval.models: empty and ") and result.stderr.count("\n") == 1


def test_an_output_dir_another_stage_wrote_is_refused(trained, tmp_path: Path):
    from qadpipe.provenance import save_run_record

    export_dir = tmp_path / "export"
    export_dir.mkdir()
    record = save_run_record(load_config(None, trained), "export", export_dir).read_bytes()
    with pytest.raises(ConfigError, match=rf"^eval.output_dir: {export_dir} holds the output of qadpipe export; "):
        run_eval(load_config(None, [*trained, f"eval.output_dir={export_dir}"]))
    assert (export_dir / "qadpipe_run.yaml").read_bytes() == record


def test_a_missing_model_is_named_before_any_model_loads(trained, tmp_path: Path, peaky_llama_dir: Path,
                                                        monkeypatch):
    from qadpipe.eval import evaluate

    loads = []
    monkeypatch.setattr(evaluate, "load_model", lambda path, device: loads.append(path))
    config = load_config(None, [*trained, f"eval.output_dir={tmp_path}", f"eval.models.copy={peaky_llama_dir}",
                                f"eval.models.zbad={tmp_path / 'nonexist'}"])
    with pytest.raises(ConfigError, match=rf"^eval.models.zbad: {tmp_path / 'nonexist'} is not a directory"):
        run_eval(config)
    assert loads == []


def test_a_run_stopped_before_final_is_said_to_be_evaluated_as_ptq_only(trained, tmp_path: Path, caplog):
    import shutil

    student = Path(next(item.split("=", 1)[1] for item in trained if item.startswith("distill.output_dir=")))
    stopped = tmp_path / "stopped"
    shutil.copytree(student / "ptq", stopped / "ptq")
    config = load_config(None, [*trained, f"distill.output_dir={stopped}", f"eval.output_dir={tmp_path / 'out'}"])
    assert list(run_eval(config)) == ["teacher", "ptq"]
    assert f"{stopped} has no final/ yet" in caplog.text


def test_a_larger_eval_rows_than_the_students_held_out_scores_only_what_they_never_saw(trained, tmp_path: Path,
                                                                                       caplog):
    trained_rows = load_config(None, trained).distill.eval_rows
    config = load_config(None, [*trained, f"eval.output_dir={tmp_path}", f"distill.eval_rows={trained_rows + 2}"])
    results = run_eval(config)
    assert f"held out only the first {trained_rows} cache rows when it trained" in caplog.text
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["context"]["data"].startswith(f"{trained_rows} held-out rows of the cache")
    default = run_eval(load_config(None, [*trained, f"eval.output_dir={tmp_path / 'default'}"]))
    assert results["qad"]["positions"] == default["qad"]["positions"]


def test_a_cache_the_students_did_not_train_on_or_of_another_teacher_is_said(trained, tmp_path: Path,
                                                                           tiny_llama_dir: Path, caplog):
    """Its first rows need not be the ones the students held out, and its targets come from
    another model than eval's teacher: the report must not claim the rows unseen, and both are
    said in the log."""
    from distill_fixtures import make_cache

    other = make_cache(tmp_path / "other", tiny_llama_dir, "data.random.seed=99")   # the unpeaked model
    config = load_config(None, [*trained, f"cache.path={other}", f"eval.output_dir={tmp_path / 'out'}"])
    run_eval(config)
    claim = json.loads((tmp_path / "out" / "report.json").read_text())["context"]["data"]
    assert claim.endswith("(NOT verified unseen: ptq, qad trained on other cache contents)")
    assert "eval: ptq, qad trained on other cache contents than the" in caplog.text
    assert f"was written by the teacher {tiny_llama_dir}" in caplog.text


def test_a_cache_of_another_tokenizer_is_one_line(trained, tmp_path: Path):
    from cache_rows import cache_meta, random_rows, write_cache

    meta = cache_meta(tokenizer_fingerprint="sha256:other")
    cache = write_cache(tmp_path / "cache", meta, random_rows(meta, 4))
    result = CliRunner().invoke(cli, ["eval", *[arg for item in [*trained, f"cache.path={cache}",
                                                                 f"eval.output_dir={tmp_path / 'out'}"]
                                                for arg in ("--set", item)]])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("qadpipe: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"qadpipe: error: {cache}: cache tokenizer_fingerprint='sha256:other', but the reader expects "
        "tokenizer_fingerprint=")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_bad_eval_data_names_eval_data(trained, tmp_path: Path):
    """The data reader's refusals named data.source whatever field pointed it there."""
    (tmp_path / "empty").mkdir()
    overrides = [*trained, f"eval.output_dir={tmp_path / 'out'}", f"eval.data={tmp_path / 'empty'}"]
    result = CliRunner().invoke(cli, ["eval", *[arg for item in overrides for arg in ("--set", item)]])
    errors = [line for line in result.stderr.splitlines() if line.startswith("qadpipe: error:")]
    assert result.exit_code == 2 and errors == [
        f"qadpipe: error: eval.data '{tmp_path / 'empty'}': a directory, but not one written by datasets.save_to_disk"]


def test_the_teacher_check_resolves_the_embedded_model_alias(tiny_llama_dir: Path, monkeypatch, caplog):
    """model.path 'smollm2-135m' (make demo's) is an alias, not a directory: the cache's teacher
    revision is compared with the model it resolves to, as generate computed it."""
    import dataclasses

    from cache_rows import cache_meta
    from qadpipe import models
    from qadpipe.eval import evaluate
    from qadpipe.models import model_revision

    monkeypatch.setattr(models, "embedded_smollm2_dir", lambda: tiny_llama_dir)
    config = load_config(None, ["model.path=smollm2-135m"])
    evaluate._warn_of_another_teacher(config, cache_meta(teacher_revision=model_revision(tiny_llama_dir)))
    assert "was written by the teacher" not in caplog.text
    evaluate._warn_of_another_teacher(config, dataclasses.replace(cache_meta(), teacher_revision="sha256:other"))
    assert "was written by the teacher synthetic (revision sha256:other)" in caplog.text


def _refusal(overrides: list[str]) -> list[str]:
    result = CliRunner().invoke(cli, ["eval", *[arg for item in overrides for arg in ("--set", item)]])
    assert result.exit_code == 2 and "Traceback" not in result.stderr, result.output
    return [line for line in result.stderr.splitlines() if line.startswith("qadpipe: error:")]


def test_export_warns_of_a_config_section_only_when_one_was_given(trained, tmp_path: Path, caplog):
    """Without -c every section is at its defaults: export warned on every --checkpoint run
    that it used the recorded model/quant "not the one in the current config"."""
    from qadpipe.export.runner import run_export

    final = next(item for item in trained if item.startswith("distill.output_dir=")).split("=", 1)[1] + "/final"
    run_export(load_config(None, []), checkpoint=final, output=str(tmp_path / "a"), fmt="fake")
    assert "export uses the" not in caplog.text
    run_export(load_config(None, ["quant.preset=nvfp4_a16"]), checkpoint=final, output=str(tmp_path / "b"), fmt="fake")
    assert "export uses the quant section recorded in" in caplog.text
    assert "export uses the model section" not in caplog.text


def test_an_export_is_held_to_the_rows_its_checkpoint_held_out(trained, tmp_path: Path, caplog):
    """Exports are HF checkpoints: eval did not follow them to the run that trained them, so
    a larger distill.eval_rows scored rows they trained on, and the report called them held out."""
    from qadpipe.export.runner import run_export

    config = load_config(None, trained)
    run_export(config, output=str(tmp_path / "export"), fmt="fake")
    rows = config.distill.eval_rows
    results = run_eval(load_config(None, [*trained, f"eval.output_dir={tmp_path / 'out'}", "eval.models={}",
                                          f"eval.models.fake={tmp_path / 'export'}",
                                          f"distill.eval_rows={rows + 3}"]))
    assert f"held out only the first {rows} cache rows when it trained" in caplog.text
    claim = json.loads((tmp_path / "out" / "report.json").read_text())["context"]["data"]
    assert claim == f"{rows} held-out rows of the cache {config.cache.path} (never trained on)"
    assert results["fake"]["positions"] > 0


def test_a_model_without_a_training_record_is_not_claimed_unseen(trained, tmp_path: Path, peaky_llama_dir: Path):
    config = load_config(None, trained)
    student = Path(config.distill.output_dir) / "final"
    run_eval(load_config(None, [*trained, f"eval.output_dir={tmp_path / 'out'}", f"eval.models.qad={student}",
                                f"eval.models.outside={peaky_llama_dir}"]))
    claim = json.loads((tmp_path / "out" / "report.json").read_text())["context"]["data"]
    assert claim.endswith("(never trained on; unknown for outside)")
    run_eval(load_config(None, [*trained, f"eval.output_dir={tmp_path / 'alone'}",
                                f"eval.models.outside={peaky_llama_dir}"]))
    claim = json.loads((tmp_path / "alone" / "report.json").read_text())["context"]["data"]
    assert claim.endswith("(whether outside trained on them is unknown)")


def test_no_held_out_rows_names_the_rows_the_students_held_out(trained, tmp_path: Path):
    """The record says how many rows the students never saw: 'retrain' was the wrong advice."""
    assert _refusal([*trained, f"eval.output_dir={tmp_path / 'a'}", "distill.eval_rows=0"]) == [
        "qadpipe: error: distill.eval_rows: 0 held-out cache rows to evaluate on, but the students held out the "
        "first 4 when they trained: set distill.eval_rows=4 to score those, or eval.data to a file"]


def test_a_wrong_teacher_path_is_named_as_teacher_path(trained, tmp_path: Path):
    """It said "model '/nope'", the line a wrong model.path gives: which field was wrong?"""
    assert _refusal([*trained, f"eval.output_dir={tmp_path / 'a'}", f"teacher.path={tmp_path / 'nope'}"]) == [
        f"qadpipe: error: teacher.path '{tmp_path / 'nope'}': expected a local Hugging Face directory or the alias "
        "'smollm2-135m' (qadpipe never downloads from a hub)"]


def test_eval_data_that_cannot_be_scored_is_one_line(trained, tmp_path: Path):
    """Random tokens drawn again are the training tokens; prompt-only records with
    include_prompt=false leave nothing to score (a ValueError traceback before)."""
    assert _refusal([*trained, f"eval.output_dir={tmp_path / 'a'}", "eval.data=random"]) == [
        "qadpipe: error: eval.data: got 'random', which would draw the training sequences again (data.random.seed); "
        "leave eval.data null to score the cache's held-out rows"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a first question"}\n{"prompt": "a second question"}\n')
    assert _refusal([*trained, f"eval.output_dir={tmp_path / 'b'}", f"eval.data={prompts}", "data.field=prompt",
                     "generate.include_prompt=false"]) == [
        f"qadpipe: error: eval.data: no sequences to score in {prompts} (all 2 records dropped: 2 with no completion "
        "tokens to distil (generate.include_prompt=false) (first: record 0, line 1))"]


def test_an_export_keeps_its_training_record_when_its_checkpoint_is_replaced(trained, tmp_path: Path):
    """Eval followed an export's qadpipe_export.json to its checkpoint's path and trusted the
    run found there: a later run trained into the same directory (on every row) had its
    export called "never trained on"."""
    from qadpipe.eval.evaluate import TrainingRecord, training_record
    from qadpipe.export.runner import run_export

    config = load_config(None, trained)
    run_export(config, output=str(tmp_path / "export"), fmt="fake")
    final = Path(config.distill.output_dir) / "final"
    expected = training_record(str(final))
    assert expected is not None and expected.eval_rows == config.distill.eval_rows and expected.cache_fingerprint
    record = yaml.safe_load((final / "qadpipe_run.yaml").read_text())
    record["config"]["distill"]["eval_rows"], record["cache_fingerprint"] = 0, "f" * 64   # another run there now
    moved = tmp_path / "replaced"
    shutil.copytree(final, moved)
    (moved / "qadpipe_run.yaml").write_text(yaml.safe_dump(record))
    assert training_record(str(moved)) == TrainingRecord(0, "f" * 64)
    assert training_record(str(tmp_path / "export")) == expected   # from the export's own record


@pytest.mark.parametrize("record", ["stage: eval\n", "stage: export\n", "stage: export\ntraining: {eval_rows: x}\n",
                                    "[1, 2]\n", None])
def test_a_model_without_a_usable_training_record_is_unknown(tmp_path: Path, record):
    from qadpipe.eval.evaluate import training_record

    if record is not None:
        (tmp_path / "qadpipe_run.yaml").write_text(record)
    assert training_record(str(tmp_path)) is None


def test_model_names_and_paths_are_checked_before_any_model_loads(trained, tmp_path: Path, topk_cache: Path,
                                                                  peaky_llama_dir: Path):
    out = f"eval.output_dir={tmp_path / 'out'}"
    assert _refusal([*trained, out, f"eval.models.teacher={peaky_llama_dir}"]) == [
        "qadpipe: error: eval.models.teacher: the name of the report's reference row (eval's teacher, model.path); "
        "give this model another name"]
    assert _refusal([*trained, out, f"eval.models.a={peaky_llama_dir}", f"eval.models.b={topk_cache}"]) == [
        f"qadpipe: error: eval.models.b: {topk_cache} holds neither a distill student (model.safetensors or "
        "model/ shards, and qadpipe_run.yaml) nor an HF checkpoint (config.json)"]
    assert _refusal([*trained, out, "eval.models.a="]) == [
        "qadpipe: error: eval.models.a: empty; expected a distill final/ or ptq/ directory or an HF checkpoint"]
    assert _refusal([*trained, out, f"eval.models.a|b={peaky_llama_dir}"]) == [   # would split report.md's row
        "qadpipe: error: eval.models: name 'a|b' cannot name a report row; expected a non-empty name without '|', "
        "'`' or line breaks"]
    assert not (tmp_path / "out").exists()


def test_a_model_with_another_tokenizer_is_refused(trained, tmp_path: Path, peaky_llama_dir: Path):
    """Same vocab size, two ids swapped: eval scored it silently, distill refused it."""
    other = tmp_path / "othertok"
    shutil.copytree(peaky_llama_dir, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert _refusal([*trained, f"eval.output_dir={tmp_path / 'out'}", f"eval.models.other={other}"]) == [
        f"qadpipe: error: eval.models.other: {other} reads text with another tokenizer than the teacher ({other} vs "
        "model.path): its ids would be compared with the teacher's ids for other tokens"]


@pytest.mark.parametrize("where", ["cache root", "manifests", "new dir in cache", "model dir"])
def test_an_output_dir_inside_a_cache_or_of_other_files_is_refused(trained, tmp_path: Path, where: str,
                                                                   peaky_llama_dir: Path):
    """eval.output_dir=<cache>/manifests wrote report.json among the manifests, and every later
    read of the cache failed on it."""
    from cache_rows import cache_meta, random_rows, write_cache

    meta = cache_meta()
    cache = write_cache(tmp_path / "cache", meta, random_rows(meta, 2))
    before = sorted(str(p.relative_to(cache)) for p in Path(cache).rglob("*"))
    out = {"cache root": cache, "manifests": Path(cache) / "manifests", "new dir in cache": Path(cache) / "eval",
           "model dir": peaky_llama_dir}[where]
    errors = _refusal([*trained, f"eval.output_dir={out}"])
    if where == "model dir":
        assert errors == [f"qadpipe: error: eval.output_dir: {out} is a non-empty directory that is not an eval "
                          "output (it holds chat_template.jinja); expected a new or empty directory, or an earlier "
                          "eval output"]
    else:
        assert errors == [f"qadpipe: error: eval.output_dir: {out} is inside the cache {cache}; set another directory"]
    assert sorted(str(p.relative_to(cache)) for p in Path(cache).rglob("*")) == before


def test_a_broken_model_reads_nan_in_the_table_and_null_in_json(trained, tmp_path: Path, peaky_llama_dir: Path,
                                                                caplog):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(peaky_llama_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    name = next(key for key in weights if "down_proj" in key)
    weights[name][0, 0] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    run_eval(load_config(None, [*trained, f"eval.output_dir={out}", "eval.models={}", f"eval.models.broken={broken}"]))
    saved = json.loads((out / "report.json").read_text())   # strict JSON: no NaN token
    assert saved["results"]["broken"]["kl"] is None
    assert "| broken | nan |" in (out / "report.md").read_text()
    assert "eval.models.broken: kl" in caplog.text and "is not finite" in caplog.text


def test_a_rerun_removes_the_curves_of_models_it_no_longer_has(trained, tmp_path: Path, peaky_llama_dir: Path):
    out = tmp_path / "out"
    run_eval(load_config(None, [*trained, f"eval.output_dir={out}"]))
    assert (out / "training_curves.png").is_file()
    run_eval(load_config(None, [*trained, f"eval.output_dir={out}", "eval.models={}",
                                f"eval.models.outside={peaky_llama_dir}"]))
    assert not (out / "training_curves.png").exists()
    record = yaml.safe_load((out / "qadpipe_run.yaml").read_text())
    assert record["stage"] == "eval" and record["cache_fingerprint"]
    assert record["teacher_revision"].startswith("sha256:")


def test_a_student_whose_record_this_version_cannot_load_names_the_record(trained, tmp_path: Path):
    config = load_config(None, trained)
    student = tmp_path / "old"
    shutil.copytree(Path(config.distill.output_dir) / "final", student)
    record = yaml.safe_load((student / "qadpipe_run.yaml").read_text())
    record["config"]["distill"]["old_option"] = 1
    (student / "qadpipe_run.yaml").write_text(yaml.safe_dump(record))
    errors = _refusal([*trained, f"eval.output_dir={tmp_path / 'out'}", f"eval.models.old={student}"])
    assert len(errors) == 1 and errors[0].startswith(
        f"qadpipe: error: {student}/qadpipe_run.yaml: the recorded config does not load in this qadpipe version "
        "(distill.old_option: unknown key")


def test_a_rerun_failing_while_it_writes_leaves_no_earlier_figures_beside_its_record(trained, tmp_path: Path,
                                                                                      monkeypatch):
    from qadpipe.eval import report

    out = tmp_path / "out"
    run_eval(load_config(None, [*trained, f"eval.output_dir={out}"]))
    assert {"report.md", "kl_by_model.png", "training_curves.png"} <= {p.name for p in out.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "plot_kl_bars", full_disk)   # after report.json and report.md
    with pytest.raises(OSError):
        run_eval(load_config(None, [*trained, f"eval.output_dir={out}", "eval.models={}",
                                    f"eval.models.outside={Path(load_config(None, trained).model.path)}"]))
    assert sorted(p.name for p in out.iterdir()) == ["qadpipe_run.yaml", "report.json", "report.md"]
    assert "| outside |" in (out / "report.md").read_text()


def test_what_a_killed_eval_left_does_not_refuse_its_rerun(trained, tmp_path: Path):
    """A SIGKILL while the run record was written leaves only its temp name: the rerun took
    the directory for someone else's."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".qadpipe_run.yaml.k3x9.tmp").write_text("stage: ev")
    (out / "report.md").write_text("# qadpipe eval\n")
    run_eval(load_config(None, [*trained, f"eval.output_dir={out}"]))
    assert yaml.safe_load((out / "qadpipe_run.yaml").read_text())["stage"] == "eval"


def test_a_student_trained_online_without_a_cache_is_not_claimed_unseen_on_a_cache(trained, tmp_path: Path):
    """Its run record's empty cache fingerprint was read as "recorded before fingerprints",
    and the cache's first rows were claimed held out: it held out the first rows of its
    data.source, which a generate array's stride puts elsewhere in the cache."""
    from qadpipe.eval.evaluate import HeldOut, training_record, unseen_claim

    final = Path(load_config(None, trained).distill.output_dir) / "final"
    online = tmp_path / "online"
    shutil.copytree(final, online)
    record = yaml.safe_load((online / "qadpipe_run.yaml").read_text())
    record["cache_fingerprint"] = ""   # what distill records with no cache
    (online / "qadpipe_run.yaml").write_text(yaml.safe_dump(record))
    assert training_record(str(online)).cache_fingerprint == ""
    fingerprint = training_record(str(final)).cache_fingerprint
    rows = HeldOut([[1, 2]], [1], None, "held-out cache rows", cache_fingerprint=fingerprint)
    assert unseen_claim(rows, {"qad": str(final)}) == " (never trained on)"
    assert unseen_claim(rows, {"qad": str(final), "online": str(online)}) == \
        " (NOT verified unseen: online trained without a cache)"


def _exports_recording(root: Path, training: dict[str, str]) -> dict[str, str]:
    """An export directory per name whose run record holds only ``training`` (a YAML mapping):
    what eval reads of the runs that made its models."""
    for name, record in training.items():
        (root / name).mkdir()
        (root / name / "qadpipe_run.yaml").write_text(f"stage: export\ntraining: {record}\n")
    return {name: str(root / name) for name in training}


def test_the_fewest_rows_any_model_held_out_are_the_ones_scored(tmp_path: Path, caplog):
    """Two exports recording 5 and 3 held-out rows, distill.eval_rows 16: rows 3 and 4 trained the
    second model, so only the first 3 are unseen by both (whichever order the models come in)."""
    from qadpipe.eval.evaluate import held_out_rows

    models = _exports_recording(tmp_path, {name: f"{{eval_rows: {rows}}}"
                                           for name, rows in (("five", 5), ("three", 3), ("four", 4))})
    config = load_config(None, ["distill.eval_rows=16"])
    with caplog.at_level("WARNING", logger="qadpipe.eval.evaluate"):
        assert held_out_rows(config, models) == 3
    assert f"the run of {tmp_path / 'three'} held out only the first 3 cache rows" in caplog.text


def test_eval_data_scores_at_most_max_sequences(tiny_llama_dir: Path, tmp_path: Path):
    """eval.max_sequences caps a data file as it caps the cache's rows: 5 records, 3 scored."""
    from qadpipe.eval.evaluate import held_out
    from qadpipe.models import load_tokenizer

    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"text": f"Record {i} about the sea."}) + "\n" for i in range(5)))
    config = load_config(None, [f"model.path={tiny_llama_dir}", f"eval.data={data}", "eval.max_sequences=3",
                                f"cache.path={tmp_path / 'no-cache'}"])
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    first = tokenizer("Record 0 about the sea.").input_ids
    scored = held_out(config, tokenizer, len(tokenizer), 16)
    assert len(scored.sequences) == 3 and scored.description.startswith("3 sequences of ")
    assert scored.sequences[0][-len(first):] == first   # the file's first records, in order
    more = load_config(None, [f"model.path={tiny_llama_dir}", f"eval.data={data}", "eval.max_sequences=8",
                              f"cache.path={tmp_path / 'no-cache'}"])
    assert len(held_out(more, tokenizer, len(tokenizer), 16).sequences) == 5


def test_one_model_without_a_recorded_cache_fingerprint_weakens_the_unseen_claim(tmp_path: Path):
    """"never trained on" needs every model's record to name the cache it trained on; one that
    records only its eval_rows (an older export) leaves "held out in training by distill.eval_rows"."""
    from qadpipe.eval.evaluate import HeldOut, unseen_claim

    models = _exports_recording(tmp_path, {"new": "{eval_rows: 4, cache_fingerprint: fp}", "old": "{eval_rows: 4}"})
    data = HeldOut([[1, 2, 3]], [0], None, "1 held-out row of the cache c", cache_fingerprint="fp")
    assert unseen_claim(data, models) == " (held out in training by distill.eval_rows)"
    assert unseen_claim(data, {"new": models["new"]}) == " (never trained on)"
