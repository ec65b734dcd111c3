"""`qadpipe export`: distill final/ in, export + provenance out, size printed, errors one line."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from ct_reference import ct_decompress

from qadpipe.cli import cli
from qadpipe.distill.student import save_student
from qadpipe.export.model_tensors import quant_linears


@pytest.fixture
def final_dir(student, tiny_llama_dir, tmp_path):
    """A distill final/ directory of a (untrained, calibrated) w8a8 student, plus the student."""
    model, config = student(tiny_llama_dir, "w8a8_int", dtype="float32")
    with torch.no_grad():  # make the saved weights differ from the base model
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    (tmp_path / "student").mkdir()
    return save_student(tmp_path / "student", model.state_dict(), config), model


def test_cli_exports_the_trained_student(final_dir, tiny_llama_dir, tmp_path, caplog):
    final, model = final_dir
    out = tmp_path / "export"
    with caplog.at_level("WARNING", logger="qadpipe.export.runner"):
        result = CliRunner().invoke(cli, ["export", "--checkpoint", str(final), "--output", str(out),
                                          "--format", "compressed-tensors"])
    assert result.exit_code == 0, result.output
    # trained with model.dtype=float32: written in bf16 as vLLM serves it, and said
    assert "model.dtype=float32: the export is written in bfloat16" in caplog.text
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "compressed-tensors export:" in result.output and "BF16" in result.output
    decompressed = ct_decompress(out, list(quant_linears(model)))
    for name, layer in quant_linears(model).items():  # the saved weights, not the base model's
        assert torch.equal(decompressed[name].to(torch.bfloat16), layer.fake_quantized_weight().to(torch.bfloat16))

    record = yaml.safe_load((out / "qadpipe_run.yaml").read_text())
    assert record["stage"] == "export" and "torch" in record["versions"]
    assert record["config"]["export"] == {"format": "compressed-tensors", "output_dir": str(out)}
    assert record["config"]["quant"]["preset"] == "w8a8_int"
    info = json.loads((out / "qadpipe_export.json").read_text())
    assert info["checkpoint"] == str(final.resolve()) and info["checkpoint_sha256"].startswith("sha256:")
    assert info["layers"]["model.layers.0.mlp.down_proj"]["input"]["granularity"] == "token"
    weight = info["layers"]["model.layers.0.mlp.down_proj"]["weight"]
    assert weight["kind"] == "int" and "sparsity" not in weight and "mx_rule" not in weight   # not INT8's
    on_disk = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert info["export_bytes"] == on_disk
    n_params = sum(p.numel() for n, p in model.named_parameters() if "_quantizer." not in n)
    assert info["bf16_bytes"] == 2 * n_params


def test_cli_defaults_come_from_the_config(final_dir, tmp_path):
    final, _ = final_dir
    out = tmp_path / "from-config"
    result = CliRunner().invoke(cli, ["export", "--set", f"distill.output_dir={final.parent}",
                                      "--set", f"export.output_dir={out}", "--set", "export.format=fake"])
    assert result.exit_code == 0, result.output
    assert "fake export:" in result.output
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_cli_refusal_is_one_line_and_writes_nothing(final_dir, tmp_path):
    final, _ = final_dir
    out = tmp_path / "user-data"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["export", "--checkpoint", str(final), "--output", str(out)])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "not a qadpipe export" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_missing_checkpoint(tmp_path):
    result = CliRunner().invoke(cli, ["export", "--checkpoint", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "expected a distill final/, ptq/ or checkpoints/step-N directory" in result.stderr


def test_an_export_given_as_checkpoint_is_refused(final_dir, tmp_path):
    """It has model.safetensors and a run record too: it was re-exported, recording the export
    as the checkpoint that was trained."""
    final, _ = final_dir
    export = tmp_path / "export"
    assert CliRunner().invoke(cli, ["export", "--checkpoint", str(final), "--output", str(export),
                                    "--format", "fake"]).exit_code == 0
    result = CliRunner().invoke(cli, ["export", "--checkpoint", str(export), "--output", str(tmp_path / "again")])
    assert result.exit_code == 2
    assert result.stderr == (f"qadpipe: error: --checkpoint {export}: an HF checkpoint (it has config.json: an "
                             "export?), expected a distill final/, ptq/ or checkpoints/step-N directory\n")
    assert not (tmp_path / "again").exists()


def test_an_unfinished_run_without_checkpoint_names_its_last_checkpoint(final_dir, tmp_path):
    """No --checkpoint given: the message must not blame one, and should offer what is there."""
    import shutil

    final, _ = final_dir
    stopped = tmp_path / "stopped"
    shutil.copytree(final, stopped / "checkpoints" / "step-00000002")
    result = CliRunner().invoke(cli, ["export", "--set", f"distill.output_dir={stopped}",
                                      "--set", f"export.output_dir={tmp_path / 'out'}"])
    assert result.exit_code == 2
    assert result.stderr == (f"qadpipe: error: distill.output_dir: {stopped} holds no finished student (final/); "
                             "finish it with `qadpipe distill --resume`, or export its last checkpoint with "
                             f"--checkpoint {stopped / 'checkpoints' / 'step-00000002'}\n")


def test_a_run_that_saved_nothing_is_named_as_such(final_dir, tmp_path):
    """distill.save=false writes only the run record and metrics: 'run distill first' would
    send the user to rerun what they ran."""
    final, _ = final_dir
    record = yaml.safe_load((final / "qadpipe_run.yaml").read_text())
    record["config"]["distill"]["save"] = False
    unsaved = tmp_path / "unsaved"
    unsaved.mkdir()
    (unsaved / "qadpipe_run.yaml").write_text(yaml.safe_dump(record))
    result = CliRunner().invoke(cli, ["export", "--set", f"distill.output_dir={unsaved}",
                                      "--set", f"export.output_dir={tmp_path / 'out'}"])
    assert result.exit_code == 2
    assert result.stderr == (f"qadpipe: error: distill.output_dir: {unsaved} holds no finished student (final/); "
                             "its run had distill.save=false, so it wrote none; rerun it with distill.save=true and --resume, "
                             "or into a fresh distill.output_dir\n")


def test_a_previous_export_is_replaced_but_not_a_file_the_user_added_to_it(final_dir, tmp_path):
    final, _ = final_dir
    out = tmp_path / "export"
    args = ["export", "--checkpoint", str(final), "--output", str(out), "--format", "fake"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    written = set(json.loads((out / "qadpipe_export.json").read_text())["files"])
    assert written == {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert CliRunner().invoke(cli, args).exit_code == 0          # its own files: replaced
    (out / "logs").mkdir()
    (out / "logs" / "vllm.log").write_text("served fine")
    (out / "NOTES.md").write_text("keep me")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert result.stderr == (f"qadpipe: error: export output {out}: holds NOTES.md and 1 more, which the previous "
                             "export did not write and replacing it would delete; move it, or export to another "
                             "directory\n")
    assert (out / "NOTES.md").read_text() == "keep me" and (out / "logs" / "vllm.log").is_file()

    # Its records unreadable: a lost file list no longer means "replace it all" (that deleted
    # NOTES.md), and a qadpipe_run.yaml that is not a mapping no longer crashes.
    (out / "qadpipe_export.json").unlink()
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert result.stderr == (f"qadpipe: error: export output {out}: qadpipe_export.json, the previous export's list "
                             "of the files it wrote, is missing or unreadable, so replacing it could delete files "
                             "of yours; delete the directory yourself, or export to another directory\n")
    (out / "qadpipe_run.yaml").write_text("- stage\n- export\n")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert result.stderr == (f"qadpipe: error: export output {out}: a non-empty directory that is not a qadpipe "
                             "export (it holds NOTES.md, chat_template.jinja, config.json and 6 more); expected a new "
                             "or empty directory (or a previous export to replace)\n")
    assert (out / "NOTES.md").read_text() == "keep me" and (out / "logs" / "vllm.log").is_file()


def test_the_format_option_wins_over_the_config(final_dir, tmp_path):
    """`--format fake` over a config asking for compressed-tensors (the default): a BF16
    checkpoint with no quantization config, and the record says fake."""
    final, _ = final_dir
    out = tmp_path / "export"
    result = CliRunner().invoke(cli, ["export", "--checkpoint", str(final), "--output", str(out), "--format", "fake",
                                      "--set", "export.format=compressed-tensors"])
    assert result.exit_code == 0, result.output
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert yaml.safe_load((out / "qadpipe_run.yaml").read_text())["config"]["export"]["format"] == "fake"
