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


def test_a_killed_writers_torn_last_line_alone_is_dropped_without_a_warning(tmp_path, caplog):
    """A run killed mid-write leaves one torn line: the resume drops it quietly (only more
    than that says the file holds lines distill did not write)."""
    rows = [json.dumps({"step": step, "loss": 1.0}) for step in (1, 2)]
    (tmp_path / METRICS_FILE).write_text("\n".join(rows) + '\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        MetricsLog(tmp_path, enabled=True).truncate_after(5)
    assert (tmp_path / METRICS_FILE).read_text() == rows[0] + "\n" + rows[1] + "\n"
    assert "not metrics rows" not in caplog.text


def test_a_metrics_path_that_is_a_directory_is_refused_before_training(tmp_path):
    (tmp_path / METRICS_FILE).mkdir()
    with pytest.raises(DistillError, match=rf"^{tmp_path / METRICS_FILE}: not a file; move it away"):
        MetricsLog(tmp_path, enabled=True)


def test_a_resume_purges_tensorboard_events_past_its_step(tmp_path, monkeypatch):
    """TensorBoard kept the killed run's points beside the resumed run's for the same steps,
    where metrics.jsonl keeps one curve: its writer now opens with purge_step = the first step
    the resume writes (SummaryWriter drops the log's events from there on)."""
    import sys
    import types

    opened, scalars = [], []

    class Writer:   # tensorboard's SummaryWriter as this test needs it (the package is optional)
        def __init__(self, log_dir, purge_step=None):
            opened.append((log_dir, purge_step))

        def add_scalar(self, *args):
            scalars.append(args)

        def flush(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    first = MetricsLog(tmp_path, enabled=True, tensorboard=True)
    first.truncate_after(-1)
    first.write({"step": 1, "loss": 1.0})
    resumed = MetricsLog(tmp_path, enabled=True, tensorboard=True)
    resumed.truncate_after(3)
    resumed.write({"step": 4, "loss": 0.5})
    assert [purge for _, purge in opened] == [0, 4]
    assert scalars == [("loss", 1.0, 1), ("loss", 0.5, 4)]   # by step; the step itself is no scalar
