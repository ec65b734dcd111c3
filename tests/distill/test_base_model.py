"""A student is rebuilt (export, eval, --resume) on the model it was trained from, not on
whatever its recorded ``model.path`` names now: a relative path read from another working
directory, or a directory replaced in place, would take the trained weights into another
model (same shapes: quietly wrong figures)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from qadpipe.config import load_config
from qadpipe.distill.student import (FINAL_DIR, base_model_fact, build_student, save_student, trained_config)
from qadpipe.errors import DistillError
from qadpipe.export.runner import run_export

from test_trainer import distill, one_line_error


def another_model(directory: Path) -> None:
    """Same shapes, another model: what a retrained or differently configured copy looks like."""
    config = json.loads((directory / "config.json").read_text())
    config["rms_norm_eps"] = 0.5
    (directory / "config.json").write_text(json.dumps(config))


def test_a_relative_model_path_read_from_elsewhere_rebuilds_on_the_model_it_trained_from(
        tiny_llama_dir, tmp_path, monkeypatch, caplog):
    started, elsewhere = tmp_path / "started", tmp_path / "elsewhere"
    shutil.copytree(tiny_llama_dir, started / "m")
    shutil.copytree(tiny_llama_dir, elsewhere / "m")
    another_model(elsewhere / "m")
    monkeypatch.chdir(started)
    recipe = ["quant.preset=w4a16_int", "quant.group_size=32"]
    config = load_config(None, ["model.path=m", *recipe])
    student = build_student(config, torch.device("cpu"))
    (tmp_path / "run").mkdir()
    final = save_student(tmp_path / "run", student.state_dict(), config, FINAL_DIR, base_model=base_model_fact("m"))
    assert trained_config(final).model.path == "m" and "rebuilt from" not in caplog.text

    with caplog.at_level(logging.WARNING):   # the same directory spelled otherwise is the same model section
        run_export(load_config(None, [f"model.path={started}/m/", *recipe]), checkpoint=str(final),
                   output=str(tmp_path / "export-there"), fmt="fake")
    assert "export uses the model section" not in caplog.text
    from qadpipe import models

    def no_conversion():
        raise NotADirectoryError("the user cache is not writable")

    monkeypatch.setattr(models, "embedded_smollm2_dir", no_conversion)   # without -c: the default alias, not asked for
    run_export(load_config(None, []), checkpoint=str(final), output=str(tmp_path / "export-no-c"), fmt="fake")

    monkeypatch.chdir(elsewhere)
    with caplog.at_level(logging.WARNING):
        assert trained_config(final).model.path == str((started / "m").resolve())
        run_export(load_config(None, ["model.path=m", *recipe]), checkpoint=str(final),
                   output=str(tmp_path / "export-elsewhere"), fmt="fake")
    assert f"model.path 'm' names {(elsewhere / 'm').resolve()} from here, not the model the student was trained " \
           "from" in caplog.text
    exported = json.loads((tmp_path / "export-elsewhere" / "config.json").read_text())
    assert exported["rms_norm_eps"] != 0.5   # the model it trained from, not the one at ./m here

    another_model(started / "m")   # the directory it trained from, replaced in place
    with pytest.raises(DistillError) as info:
        trained_config(final)
    assert str(info.value).startswith(f"{final / 'qadpipe_run.yaml'}: the student was trained from the model at "
                                      f"{(started / 'm').resolve()} (revision sha256:")
    assert str(info.value).endswith(f"put that model back at {(started / 'm').resolve()}")


def test_resume_follows_the_model_not_its_path(tiny_llama_dir, topk_cache, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    out = tmp_path / "run"
    assert distill(model, topk_cache, out, "distill.max_steps=2", "distill.save_every=1").exit_code == 0
    copy = tmp_path / "node-local" / "model"   # the same model elsewhere resumes (it was refused: model.path differ)
    shutil.copytree(model, copy)
    assert distill(copy, topk_cache, out, "distill.max_steps=3", "distill.save_every=1", resume=True).exit_code == 0
    shutil.rmtree(copy.parent)   # the scratch copy is gone: the student is rebuilt where the run started
    assert trained_config(out / FINAL_DIR).model.path == str(model.resolve())
    another_model(model)
    line = one_line_error(distill(model, topk_cache, out, "distill.max_steps=4", resume=True))
    assert f"--resume of a run trained from the model at {model.resolve()} (revision sha256:" in line
    assert line.endswith("resume with model.path set to the model it trained from")


def test_a_model_path_linked_to_a_hub_snapshot_is_the_model_in_it(tiny_llama_dir, tmp_path, monkeypatch):
    """The fact kept the link's target but the revision of the link's name: from another
    directory the snapshot, unchanged, was refused as "put that model back"."""
    snapshot = tmp_path / "hub" / "models--x--y" / "snapshots" / "abc123"
    shutil.copytree(tiny_llama_dir, snapshot)
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "m").symlink_to(snapshot)
    monkeypatch.chdir(tmp_path / "started")
    config = load_config(None, ["model.path=m", "quant.preset=w4a16_int", "quant.group_size=32"])
    fact = base_model_fact("m")
    assert fact["dir"] == str(snapshot.resolve())
    (tmp_path / "run").mkdir()
    final = save_student(tmp_path / "run", build_student(config, torch.device("cpu")).state_dict(), config,
                         FINAL_DIR, base_model=fact)
    monkeypatch.chdir(tmp_path)   # no ./m here
    assert trained_config(final).model.path == str(snapshot.resolve())
    copy = tmp_path / "node-local"
    shutil.copytree(snapshot, copy)   # a plain copy of the snapshot is the same model
    assert base_model_fact(str(copy))["revision"] == fact["revision"]
