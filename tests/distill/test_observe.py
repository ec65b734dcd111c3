"""metrics.jsonl on --resume: rows past the restored step dropped, and lines distill did not
write (a damaged or hand-edited file) skipped instead of stopping the resume with a traceback."""

from __future__ import annotations

import json
import logging

import pytest

from qadpipe.distill.observe import METRICS_FILE, MetricsLog
from qadpipe.errors import DistillError


def test_a_resume_keeps_the_rows_up_to_its_step_and_skips_lines_that_are_not_rows(tmp_path, caplog):
    rows = [json.dumps({"step": step, "loss": 1.0 / step}) for step in (1, 2, 3)]
    (tmp_path / METRICS_FILE).write_bytes("\n".join([rows[0], "[1, 2]", rows[1], '{"step": "x"}', rows[2]]).encode()
                                          + b"\n\xff\xfe garbage\n{\"step\": 4, \"lo")   # and a torn last line
    with caplog.at_level(logging.WARNING):
        MetricsLog(tmp_path, enabled=True).truncate_after(2)
    assert (tmp_path / METRICS_FILE).read_text() == rows[0] + "\n" + rows[1] + "\n"
    assert "dropped 4 lines that are not metrics rows" in caplog.text


def test_a_metrics_path_that_is_a_directory_is_refused_before_training(tmp_path):
    (tmp_path / METRICS_FILE).mkdir()
    with pytest.raises(DistillError, match=rf"^{tmp_path / METRICS_FILE}: not a file; move it away"):
        MetricsLog(tmp_path, enabled=True)
