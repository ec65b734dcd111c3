"""Warm worker processes that run one ``qadpipe`` command when told, so a kill can land at a
seeded random moment of the command itself rather than of Python's start-up.

A worker imports torch, transformers and every stage module, writes a ready file, then waits
for its argv on stdin.  :class:`Workers` always keeps the next worker warming while the
current one runs (import time overlaps the previous run).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

WORKER = """
import json, os, sys, pathlib
import torch, transformers
import qadpipe.cli, qadpipe.generate, qadpipe.distill.trainer, qadpipe.export
pathlib.Path(os.environ["QADPIPE_READY_FILE"]).write_text("ready")
sys.argv = ["qadpipe", *json.loads(sys.stdin.readline())]
qadpipe.cli.main()
"""


class Workers:
    """A supply of warm workers; each :meth:`run` uses one and starts warming the next."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.count = 0
        self.spare = self._spawn()

    def _spawn(self) -> tuple[subprocess.Popen, Path, Path]:
        self.count += 1
        ready = self.scratch / f"worker-{self.count}.ready"
        log = self.scratch / f"worker-{self.count}.log"
        proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=log.open("wb"),
                                stderr=subprocess.STDOUT, env={**os.environ, "QADPIPE_READY_FILE": str(ready)})
        return proc, ready, log

    def run(self, args: list[str], kill: tuple[int, float] | None = None, timeout: float = 300,
            after: Callable[[], bool] | None = None) -> tuple[int, float, str]:
        """Run ``qadpipe ARGS`` in a warm worker; with ``kill=(signal, seconds)`` send the
        signal that long after the command started (or, with ``after``, that long after
        ``after()`` first holds).  Returns (exit code, seconds, output)."""
        proc, ready, log = self.spare
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.spare = self._spawn()
        started = time.monotonic()
        proc.stdin.write((json.dumps(args) + "\n").encode())
        proc.stdin.close()
        while after is not None and kill is not None and proc.poll() is None and not after():
            time.sleep(0.02)
        if kill is not None:
            try:
                proc.wait(timeout=kill[1])
            except subprocess.TimeoutExpired:
                proc.send_signal(kill[0])
        code = proc.wait(timeout=timeout)
        return code, time.monotonic() - started, log.read_text(errors="replace")

    def close(self) -> None:
        proc = self.spare[0]
        proc.kill()
        proc.wait()


def temp_files(root: Path) -> list[str]:
    """Leftovers of an interrupted atomic write under ``root`` (qadpipe's temp names)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.endswith(".tmp") or p.name.startswith((".tmp-", ".old-", ".step-")))


SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM}
