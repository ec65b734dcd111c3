"""Report rendering: the table a reader sees, the JSON a script reads, the plots."""

from __future__ import annotations

import json
from pathlib import Path

from qadpipe.eval.report import kl_ratio, read_metrics, render_table, write_report

RESULTS = {
    "teacher": {"kl": 0.0, "top1_agreement": 1.0, "ppl": 10.0},
    "ptq": {"kl": 0.2, "top1_agreement": 0.8, "ppl": 12.5},
    "qad": {"kl": 0.05, "top1_agreement": 0.93, "ppl": 10.4, "tail_kl": 0.049},
}

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_table_shows_each_model_and_its_kl_relative_to_ptq():
    table = render_table(RESULTS).splitlines()
    assert table[0] == ("| model | KL(teacher‖model) nats/tok | top-1 agreement | ppl | tail-bucket KL vs cache "
                        "| KL / KL(ptq) |")
    assert table[2] == "| teacher | 0.0000 | 1.000 | 10.00 | – | – |"
    assert table[3] == "| ptq | 0.2000 | 0.800 | 12.50 | – | 1.00× |"
    assert table[4] == "| qad | 0.0500 | 0.930 | 10.40 | 0.0490 | 0.25× |"
    assert kl_ratio(RESULTS, "qad") == 0.25
    assert kl_ratio({"qad": {"kl": 0.1}}, "qad") is None  # no baseline, no ratio


def test_write_report_files(tmp_path: Path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5, "eval_kl": 0.3}\n{"step": 3, "lo')
    paths = write_report(tmp_path / "out", RESULTS, context={"data": "held-out cache rows"},
                         metrics_files={"qad": metrics})
    saved = json.loads(paths["json"].read_text())
    assert saved["results"] == RESULTS and saved["context"] == {"data": "held-out cache rows"}
    assert "| qad | 0.0500 |" in paths["md"].read_text()
    for key in ("kl_plot", "curves_plot"):
        assert paths[key].read_bytes()[:8] == PNG_MAGIC
    assert [row["step"] for row in read_metrics(metrics)] == [1, 2]  # the torn last line is skipped


def test_a_baseline_with_no_kl_gets_no_ratio_rather_than_a_crash():
    """A PTQ baseline at KL 0 (e.g. eval.models.ptq naming the teacher itself) has no ratio to
    give: the table shows '–' for every row instead of dividing by zero."""
    results = {"teacher": {"kl": 0.0}, "ptq": {"kl": 0.0}, "qad": {"kl": 0.05}}
    assert kl_ratio(results, "qad") is None
    table = render_table(results).splitlines()
    assert table[3] == "| ptq | 0.0000 | – |" and table[4] == "| qad | 0.0500 | – |"
