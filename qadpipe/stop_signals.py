"""Stop a long loop at its next safe point on SIGTERM or Ctrl-C, instead of dying mid-write.

SLURM preempts with SIGTERM; a user at a terminal presses Ctrl-C.  Either way the loop
should end where nothing is lost -- generate commits its open shard, distill saves a
checkpoint -- and say how to resume.  A second Ctrl-C aborts at once (KeyboardInterrupt),
for a user who cannot wait for the current batch or step.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Optional

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: ``signum`` is the number of the first stop signal (0 until one)."""

    def __init__(self, action: str) -> None:
        self.action = action   # what the loop does before stopping, for the log line
        self.signum = 0
        self._interrupts = 0   # Ctrl-Cs so far, whatever signal came first
        self._previous: dict[int, Any] = {}

    @property
    def received(self) -> Optional[str]:
        """The first stop signal's name (``SIGTERM``, ``SIGINT``), None until one arrived."""
        return signal.Signals(self.signum).name if self.signum else None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = {signum: signal.signal(signum, self._handle) for signum in _SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt
        self.signum = self.signum or signum
        again = ""
        if signum == signal.SIGINT:
            # under torchrun a Ctrl-C reaches torchrun, which sends the ranks SIGINT the first time
            # and SIGTERM the second (a stop they already make), then kills them after its timeout
            again = ("; Ctrl-C again aborts now" if int(os.environ.get("WORLD_SIZE", "1")) <= 1 else
                     "; a second Ctrl-C makes torchrun kill the ranks after its shutdown timeout")
        log.warning("%s: %s, then stopping%s", signal.Signals(signum).name, self.action, again)

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
