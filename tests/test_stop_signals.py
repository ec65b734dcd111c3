"""Stop signals: the first waits for a safe point, a second Ctrl-C aborts, whatever came first."""

from __future__ import annotations

import logging
import os
import signal

import pytest

from qadpipe.stop_signals import StopSignals


def test_a_second_ctrl_c_aborts_and_so_does_one_after_a_sigterm_and_a_ctrl_c(caplog, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with caplog.at_level(logging.WARNING), StopSignals("saving") as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert "SIGINT: saving, then stopping; Ctrl-C again aborts now" in caplog.text
    # SIGTERM first (a scheduler), then the user's Ctrl-C says "again aborts": the next one did not
    with StopSignals("saving") as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGTERM"


def test_under_torchrun_a_ctrl_c_promises_what_torchrun_does(caplog, monkeypatch):
    """A second Ctrl-C reaches torchrun, which sends the ranks SIGTERM, not SIGINT."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with caplog.at_level(logging.WARNING), StopSignals("saving"):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
    assert "SIGINT: saving, then stopping; a second Ctrl-C makes torchrun kill the ranks after its shutdown " \
           "timeout" in caplog.text
    assert "Ctrl-C again aborts now" not in caplog.text


def test_the_handlers_before_are_back_after_the_loop(caller_stop_handlers):
    """After the loop (generate's batches, distill's steps) a SIGTERM must do again what it did
    before: here reach the caller's own handler, not a StopSignals no one polls any more."""
    with StopSignals("saving") as stop:
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.received == "SIGTERM" and caller_stop_handlers == []
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)
    assert caller_stop_handlers == [signal.SIGTERM, signal.SIGINT]
