"""Stop the trainer at a step (SIGTERM as a preempting scheduler does, Ctrl-C), resume, and the
loss curve continues exactly as in an uninterrupted run.  kill -9 at random moments, repeatedly,
is tests/faults/test_stage_kills.py's."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill_fixtures import settings

STEPS = 6


def command(model_dir: Path, cache: Path, out: Path, *flags: str) -> list[str]:
    sets = settings(model_dir, cache, f"distill.output_dir={out}", f"distill.max_steps={STEPS}",
                    "distill.save_every=1", "distill.eval_every=3", "distill.shuffle_buffer=4")
    return [sys.executable, "-m", "qadpipe.cli", "distill", *[a for s in sets for a in ("--set", s)], *flags]


def curve(out: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


def trained_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if '"loss"' in line]
    return max(steps, default=0)


def run_until_killed(cmd: list[str], out: Path, at_step: int, sig: int) -> int:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while trained_steps(out) < at_step:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "trainer too slow to reach the kill step"
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=300)
    return proc.returncode


@pytest.fixture(scope="module")
def uninterrupted(peaky_llama_dir, topk_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    done = subprocess.run(command(peaky_llama_dir, topk_cache, out), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return curve(out)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGTERM, id="sigterm"), pytest.param(signal.SIGINT, id="ctrl-c")])
def test_resume_after_a_kill_continues_the_loss_curve_exactly(peaky_llama_dir, topk_cache, tmp_path,
                                                             uninterrupted, sig):
    at_step = random.Random(int(sig)).randint(2, STEPS - 2)   # seeded: a failure replays
    cmd = command(peaky_llama_dir, topk_cache, tmp_path)
    code = run_until_killed(cmd, tmp_path, at_step, sig)
    assert code == 128 + sig  # checkpoint saved at the end of the step, then "rerun with --resume"
    assert (tmp_path / "checkpoints" / "LATEST").is_file()
    assert not (tmp_path / "final").exists()
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    # one row per step (rows the killed run wrote after its last checkpoint are replaced), equal values
    assert curve(tmp_path) == uninterrupted, f"killed at step >= {at_step}"


@pytest.mark.slow
def test_resume_without_latest_continues_from_the_newest_step_directory(peaky_llama_dir, topk_cache, tmp_path,
                                                                        uninterrupted):
    cmd = command(peaky_llama_dir, topk_cache, tmp_path)
    assert run_until_killed(cmd, tmp_path, STEPS - 2, signal.SIGKILL) == -signal.SIGKILL
    (tmp_path / "checkpoints" / "LATEST").unlink()
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "LATEST is missing; the newest complete checkpoint there is step-" in resumed.stderr
    assert "resumed from" in resumed.stderr
    assert curve(tmp_path) == uninterrupted


@pytest.mark.slow
def test_resume_with_no_checkpoint_yet_starts_over_with_one_curve(peaky_llama_dir, topk_cache, tmp_path,
                                                                  uninterrupted):
    """A kill before the first checkpoint (stages/distill.sbatch always passes --resume): the
    rerun starts at step 0 and the metrics hold its curve alone, not the killed run's too."""
    cmd = command(peaky_llama_dir, topk_cache, tmp_path) + ["--set", f"distill.save_every={STEPS + 1}"]
    assert run_until_killed(cmd, tmp_path, 2, signal.SIGKILL) == -signal.SIGKILL
    assert not (tmp_path / "checkpoints" / "LATEST").exists()
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "no checkpoint under" in resumed.stderr
    assert curve(tmp_path) == uninterrupted
    tags = [json.loads(line).get("tag") for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert tags.count("ptq") == 1


def test_a_resume_inside_a_log_interval_logs_the_same_averages(peaky_llama_dir, topk_cache, tmp_path, monkeypatch):
    """Stopped at step 4 with log_every=3: the row at step 6 must average steps 4-6 as the
    uninterrupted run's does (the checkpoint carries the interval's sums), not 5-6 only."""
    from qadpipe.config import load_config
    from qadpipe.distill import trainer

    def config(out: Path):
        return load_config(None, settings(peaky_llama_dir, topk_cache, f"distill.output_dir={out}",
                                          "distill.max_steps=6", "distill.log_every=3", "distill.save_every=100",
                                          "distill.eval_every=100", "distill.shuffle_buffer=4"))

    trainer.run_distill(config(tmp_path / "straight"))
    asked = trainer.DistillRecipe._stop_requested
    monkeypatch.setattr(trainer.DistillRecipe, "_stop_requested",
                        lambda self: "SIGTERM" if self.step == 4 else asked(self))
    assert trainer.run_distill(config(tmp_path / "stopped")).status == "preempted"
    monkeypatch.setattr(trainer.DistillRecipe, "_stop_requested", asked)
    assert trainer.run_distill(config(tmp_path / "stopped"), resume=True).status == "done"
    straight, resumed = curve(tmp_path / "straight"), curve(tmp_path / "stopped")
    assert [row[0] for row in straight] == [3, 6]
    assert resumed == straight
