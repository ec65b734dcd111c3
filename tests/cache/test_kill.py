"""kill -9 of a writer mid-shard: the manifest stays intact, the rerun completes, and the final
rows equal an uninterrupted run's."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from qadpipe.cache import CacheReader

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "cache_writer.py"


def run_writer(root: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), str(root), *extra], stdout=subprocess.PIPE, text=True)


def test_kill_mid_shard_then_resume_equals_uninterrupted(tmp_path):
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    child = run_writer(killed, "--hang-after", "2")
    try:
        assert child.stdout.readline().strip() == "HANGING"
        # A second run of the task while the first lives (a requeue racing its own job) is
        # refused, and touches nothing: its shard names would replace the live run's.
        second = subprocess.run([sys.executable, str(SCRIPT), str(killed)], capture_output=True, text=True,
                                timeout=120)
        assert second.returncode != 0 and "DONE" not in second.stdout
        assert f"task task-00000 is being written by pid {child.pid} on " in second.stderr
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL

    manifest = json.loads((killed / "manifests/task-00000.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [2, 2]
    assert CacheReader(str(killed)).num_rows == 4          # the buffered 5th row is not visible

    assert (killed / "manifests/task-00000.lock").exists()   # left by the kill, unlocked: no obstacle
    for root in (killed, clean):
        done = run_writer(root)
        assert done.communicate(timeout=120)[0].strip() == "DONE" and done.returncode == 0
        assert not (root / "manifests/task-00000.lock").exists()   # a run that ends takes its lock away

    resumed, reference = CacheReader(str(killed)), CacheReader(str(clean))
    assert resumed.num_rows == reference.num_rows == 9
    for got, want in zip(resumed.iter_sequences(), reference.iter_sequences(), strict=True):
        assert got.id == want.id
        for name in ("input_ids", "topk_ids", "topk_logprobs", "tail_mass"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
