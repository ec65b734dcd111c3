"""``qadpipe eval`` end to end on a tiny peaked teacher: defaults, named models, data files, refusals."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from distill_fixtures import settings
from qadpipe.cache.reader import CacheReader
from qadpipe.cli import cli
from qadpipe.config import load_config
from qadpipe.distill.trainer import run_distill
from qadpipe.eval.evaluate import run_eval


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, peaky_llama_dir: Path, topk_cache: Path) -> list[str]:
    out = tmp_path_factory.mktemp("student")
    overrides = settings(peaky_llama_dir, topk_cache, "distill.max_steps=3", f"distill.output_dir={out}",
                         "distill.eval_every=3", "distill.save_every=3")
    run_distill(load_config(None, overrides))
    return overrides


def test_default_models_are_ptq_and_qad_on_the_held_out_cache_rows(trained, tmp_path: Path, topk_cache: Path):
    config = load_config(None, [*trained, f"eval.output_dir={tmp_path}"])
    results = run_eval(config)
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
    assert (tmp_path / "kl_by_model.png").is_file() and (tmp_path / "qadpipe_run.yaml").is_file()


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


def test_eval_without_a_student_is_one_line(tmp_path: Path, peaky_llama_dir: Path, topk_cache: Path):
    overrides = settings(peaky_llama_dir, topk_cache, f"distill.output_dir={tmp_path}")
    result = CliRunner().invoke(cli, ["eval", *[arg for item in overrides for arg in ("--set", item)]])
    assert result.exit_code == 2
    assert result.stderr.startswith("qadpipe: error: eval.models: empty and ") and result.stderr.count("\n") == 1
