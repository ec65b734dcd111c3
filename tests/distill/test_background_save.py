"""Checkpoints written in the background hold the step they name, whatever training does
meanwhile, and a background write that fails stops the run in one line with LATEST intact."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from qadpipe.config import load_config
from qadpipe.distill import trainer
from qadpipe.distill.background_save import BackgroundWriter, detached_snapshot, live_tensors
from qadpipe.distill.checkpoint import CHECKPOINT_DIR, LATEST, MODEL_FILE, STATE_FILE
from qadpipe.errors import DistillError

from distill_fixtures import settings


def test_a_snapshot_keeps_its_values_through_the_next_optimizer_step():
    """The state dict of a model on the CPU is the live parameters, and AdamW updates them and
    its moments in place: the snapshot copies exactly those, and keeps tied weights tied."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8, bias=False))
    model[1].weight = model[0].weight   # tied, as an LM head and its embeddings
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)

    def step() -> None:
        optimizer.zero_grad()
        model(torch.arange(8)).square().sum().backward()
        optimizer.step()

    step()
    unrelated = torch.ones(3)   # already a copy (what a GPU's state offloaded to the host is)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "other": unrelated}
    expected = {"weight": model[0].weight.detach().clone(),
                "exp_avg": optimizer.state[model[0].weight]["exp_avg"].clone(),
                "step": optimizer.state[model[0].weight]["step"].clone()}
    snapshot = detached_snapshot(state, live_tensors(model, optimizer))
    step()

    assert not torch.equal(model[0].weight, expected["weight"]), "the second step should move the weights"
    assert torch.equal(snapshot["model"]["0.weight"], expected["weight"])
    assert snapshot["model"]["1.weight"] is snapshot["model"]["0.weight"]
    moments = snapshot["optimizer"]["state"][0]
    assert torch.equal(moments["exp_avg"], expected["exp_avg"]) and torch.equal(moments["step"], expected["step"])
    assert snapshot["other"] is unrelated
    assert snapshot["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]


_CONFIG = ("distill.max_steps=4", "distill.save_every=1", "distill.eval_every=100", "distill.shuffle_buffer=4",
           "distill.lr=1e-3")


def config(model_dir, cache, out, *extra):
    return load_config(None, settings(model_dir, cache, f"distill.output_dir={out}", *_CONFIG, *extra))


def lagging_writes(monkeypatch, last_step: int, fail_at: int = 0) -> list[int]:
    """Hold each checkpoint write until the next step has trained (the optimizer has updated
    the weights and moments the snapshot was taken from), and fail the one of step
    ``fail_at`` as a full disk does; returns the steps whose write began."""
    write, train_step = trainer.save_checkpoint, trainer.DistillRecipe._train_step
    trained, began = [], []

    def step_then_record(self, micro, window):
        train_step(self, micro, window)
        trained.append(self.step + 1)

    def lagging(output_dir, model_state, state, config, **facts):
        began.append(state.step)
        deadline = time.monotonic() + 120
        while state.step < last_step and state.step + 1 not in trained and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state.step == last_step or state.step + 1 in trained, "the write should overlap the next step"
        if state.step == fail_at:
            raise DistillError(f"{output_dir}/checkpoints/step-{fail_at:08d}: cannot write the checkpoint "
                               "(No space left on device); LATEST still names the previous one")
        return write(output_dir, model_state, state, config, **facts)

    monkeypatch.setattr(trainer.DistillRecipe, "_train_step", step_then_record)
    monkeypatch.setattr(trainer, "save_checkpoint", lagging)
    return began


def checkpoint(out, step):
    path = out / CHECKPOINT_DIR / f"step-{step:08d}"
    return load_file(str(path / MODEL_FILE)), torch.load(path / STATE_FILE, weights_only=True)


def test_a_checkpoint_written_while_training_goes_on_is_the_one_a_synchronous_save_writes(
        peaky_llama_dir, topk_cache, tmp_path, monkeypatch):
    trainer.run_distill(config(peaky_llama_dir, topk_cache, tmp_path / "sync", "distill.save_in_background=false"))
    with monkeypatch.context() as patch:
        began = lagging_writes(patch, last_step=4)
        result = trainer.run_distill(config(peaky_llama_dir, topk_cache, tmp_path / "background"))
    assert (result.status, began) == ("done", [1, 2, 3, 4])
    for step in (3, 4):   # the two kept
        weights, state = checkpoint(tmp_path / "sync", step)
        weights_bg, state_bg = checkpoint(tmp_path / "background", step)
        assert weights.keys() == weights_bg.keys()
        for name in weights:
            assert torch.equal(weights[name], weights_bg[name]), (step, name)
        moments, moments_bg = state["optimizer"]["state"], state_bg["optimizer"]["state"]
        assert moments.keys() == moments_bg.keys()
        for name in moments:
            for key in moments[name]:
                assert torch.equal(moments[name][key], moments_bg[name][key]), (step, name, key)
        assert state["loader"] == state_bg["loader"] and state["scheduler"] == state_bg["scheduler"]
        assert all(torch.equal(state["rng"][key], state_bg["rng"][key]) for key in state["rng"])


def test_a_background_write_that_fails_stops_the_run_and_leaves_latest_on_the_previous_step(
        peaky_llama_dir, topk_cache, tmp_path, monkeypatch):
    lagging_writes(monkeypatch, last_step=4, fail_at=2)
    with pytest.raises(DistillError) as stopped:
        trainer.run_distill(config(peaky_llama_dir, topk_cache, tmp_path))
    assert "step-00000002: cannot write the checkpoint (No space left on device)" in str(stopped.value)
    assert (tmp_path / CHECKPOINT_DIR / LATEST).read_text().strip() == "step-00000001"
    assert not (tmp_path / "final").exists()


def test_a_write_failure_stops_the_run_at_the_step_it_is_seen(peaky_llama_dir, topk_cache, tmp_path, monkeypatch):
    """Not at the next save, save_every steps later: those steps would be trained for nothing."""
    write, train_step = trainer.save_checkpoint, trainer.DistillRecipe._train_step
    trained = []

    def failing(output_dir, model_state, state, config, **facts):
        if state.step == 2:
            raise DistillError(f"{output_dir}/checkpoints/step-00000002: cannot write the checkpoint (No space left "
                               "on device); LATEST still names the previous one")
        return write(output_dir, model_state, state, config, **facts)

    def step_seeing_the_failure(self, micro, window):
        deadline = time.monotonic() + 60
        while self.step == 2 and not self.writer.failed and time.monotonic() < deadline:
            time.sleep(0.01)
        train_step(self, micro, window)
        trained.append(self.step + 1)

    monkeypatch.setattr(trainer, "save_checkpoint", failing)
    monkeypatch.setattr(trainer.DistillRecipe, "_train_step", step_seeing_the_failure)
    with pytest.raises(DistillError, match="step-00000002: cannot write the checkpoint"):
        trainer.run_distill(config(peaky_llama_dir, topk_cache, tmp_path, "distill.save_every=2",
                                   "distill.max_steps=8"))
    assert trained in ([1, 2], [1, 2, 3]), trained   # seen right after the save, or at step 3's end (not 4's save)


def test_a_run_stopping_on_an_error_commits_the_checkpoint_being_written(peaky_llama_dir, topk_cache, tmp_path,
                                                                        monkeypatch):
    write, train_step = trainer.save_checkpoint, trainer.DistillRecipe._train_step

    def slow(output_dir, model_state, state, config, **facts):
        time.sleep(1.0)
        return write(output_dir, model_state, state, config, **facts)

    def failing_third_step(self, micro, window):
        if self.step == 2:
            raise RuntimeError("a failure of step 3")
        train_step(self, micro, window)

    monkeypatch.setattr(trainer, "save_checkpoint", slow)
    monkeypatch.setattr(trainer.DistillRecipe, "_train_step", failing_third_step)
    with pytest.raises(RuntimeError, match="a failure of step 3"):
        trainer.run_distill(config(peaky_llama_dir, topk_cache, tmp_path))
    assert (tmp_path / CHECKPOINT_DIR / LATEST).read_text().strip() == "step-00000002"


def test_a_sigterm_while_the_last_checkpoint_is_written_lets_it_and_final_be_written(peaky_llama_dir, topk_cache,
                                                                                     tmp_path):
    """After the last step the stop handlers were gone: a SIGTERM killed the write under way."""
    import subprocess
    import sys

    sets = settings(peaky_llama_dir, topk_cache, *_CONFIG, f"distill.output_dir={tmp_path / 'out'}")
    script = tmp_path / "stopped_while_writing.py"
    script.write_text(
        "import os, signal, time\n"
        "from qadpipe.config import load_config\n"
        "from qadpipe.distill import trainer\n"
        "from qadpipe.distill.background_save import BackgroundWriter\n"
        "write, finish = trainer.save_checkpoint, BackgroundWriter.finish\n"
        "def slow(*args, **kwargs):\n"
        "    time.sleep(2)\n"
        "    return write(*args, **kwargs)\n"
        "def signalled_finish(self):\n"
        "    if self._pending and self._label == 'checkpoint step 4':\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return finish(self)\n"
        "trainer.save_checkpoint, BackgroundWriter.finish = slow, signalled_finish\n"
        f"result = trainer.run_distill(load_config(None, {sets!r}))\n"
        "print('RESULT', result.status, result.step, flush=True)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "RESULT done 4" in done.stdout, done.stderr[-2000:]
    assert (tmp_path / "out" / CHECKPOINT_DIR / LATEST).read_text().strip() == "step-00000004"
    assert (tmp_path / "out" / "final" / MODEL_FILE).is_file()


def test_a_rank_that_cannot_wait_for_rank_0s_write_names_it_beside_the_last_checkpoint_it_sees(tmp_path):
    """A rank stopping on its own error (an OOM) cannot wait for rank 0's write, so the
    checkpoint directory may not show it yet: the message names both."""
    other_rank = BackgroundWriter(is_main=False)
    recipe = SimpleNamespace(writer=other_rank, output_dir=tmp_path)
    assert trainer.DistillRecipe._kept_checkpoint(recipe, "last") == ("no checkpoint was written before it", False)
    other_rank.start(lambda: None, "checkpoint step 40")
    assert trainer.DistillRecipe._kept_checkpoint(recipe, "last") == (
        "no checkpoint was written before it (or checkpoint step 40, if rank 0 finished writing it)", True)
    rank_0 = BackgroundWriter(is_main=True)
    rank_0.start(lambda: None, "checkpoint step 40")
    assert rank_0.unconfirmed is None   # rank 0 waits for its own write and reads the directory after it
    other_rank.finish()
    rank_0.finish()
    assert other_rank.unconfirmed is None


def test_a_ctrl_c_during_the_wait_for_a_write_leaves_the_next_wait_waiting(tmp_path):
    """On CPython 3.11-3.12 a KeyboardInterrupt in Thread.join marks the running thread stopped:
    cleanup's wait then returned at once and the interpreter exited mid-write (a second Ctrl-C
    during the stop's wait left no checkpoint)."""
    import os
    import signal
    import threading

    written = tmp_path / "written"
    writer = BackgroundWriter(is_main=True)
    writer.start(lambda: (time.sleep(1.5), written.write_text("whole")), "checkpoint step 2")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        with pytest.raises(KeyboardInterrupt):
            writer.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not written.exists()
    writer.wait()   # what cleanup does, under its own stop handlers
    assert written.read_text() == "whole"


def test_a_second_write_is_refused_until_the_first_is_finished():
    """One write at a time: host memory holds one snapshot, and two writes of one directory
    would race.  A save that skipped finish() must fail loudly, not start beside it."""
    import threading

    release = threading.Event()
    writer = BackgroundWriter(is_main=True)
    writer.start(release.wait, "checkpoint step 1")
    try:
        with pytest.raises(RuntimeError, match="previous write was not finished"):
            writer.start(lambda: None, "checkpoint step 2")
    finally:
        release.set()
        writer.finish()
    writer.start(lambda: None, "checkpoint step 2")
    writer.finish()


def test_an_interpreter_exiting_on_an_error_still_completes_the_write_under_way(tmp_path):
    """The main thread dies (an error elsewhere, sys.exit) while the checkpoint is written: the
    process must not end with the write half done."""
    import subprocess
    import sys

    written = tmp_path / "written"
    script = ("import pathlib, sys, time\n"
              "from qadpipe.distill.background_save import BackgroundWriter\n"
              "writer = BackgroundWriter(is_main=True)\n"
              "writer.start(lambda: (time.sleep(1.0), pathlib.Path(sys.argv[1]).write_text('whole')), 'step 3')\n"
              "raise SystemExit(3)\n")
    done = subprocess.run([sys.executable, "-c", script, str(written)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    assert written.read_text() == "whole"
