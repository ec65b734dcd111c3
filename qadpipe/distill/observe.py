"""What a training run tells its operator: metrics.jsonl, optional TensorBoard, memory figures.

``metrics.jsonl`` gets one JSON object per log interval (``step``, ``loss``, ``kl``,
``top1``, ``lr``, ``tokens_per_s``, ``loader_wait`` -- the share of the interval rank 0's loop
spent waiting for micro-batches --, memory) and one per held-out evaluation (``eval_kl``,
``eval_top1``, ...).  Each line is flushed as written, so ``tail -f`` and the eval report's
training curves see it live; on ``--resume`` rows past the restored step (written by the
killed run after its last checkpoint) are dropped, so the file holds one curve.
"""

from __future__ import annotations

import json
import logging
import resource
from pathlib import Path
from typing import Any, Optional

import torch

from qadpipe.errors import DistillError
from qadpipe.provenance import atomic_write_text, finite_or_none

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
#: Where TensorBoard event files go (distill.tensorboard).
TENSORBOARD_DIR = "tensorboard"


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA ``max_memory_allocated`` on GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class MetricsLog:
    """Append-only JSONL metrics (rank 0 only), mirrored to TensorBoard when asked."""

    def __init__(self, output_dir: Path, *, enabled: bool, tensorboard: bool = False) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled
        if enabled and self.path.exists() and not self.path.is_file():   # not at the first log step, steps in
            raise DistillError(f"{self.path}: not a file; move it away (distill writes its metrics there)")
        self._writer: Optional[Any] = None
        self._tensorboard_dir = Path(output_dir) / TENSORBOARD_DIR if enabled and tensorboard else None
        self._purge_from: Optional[int] = None

    def truncate_after(self, step: int) -> None:
        """Keep only rows up to ``step`` (a resumed run rewrites what came after); TensorBoard's
        events past it are purged when its writer opens."""
        self._purge_from = step + 1
        if not self.enabled or not self.path.is_file():
            return
        kept, dropped = [], 0
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a torn last line of a killed writer
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("step", 0), int):   # not a line distill wrote
                dropped += bool(line.strip())
                continue
            if row.get("step", 0) <= step:
                kept.append(line)
        if dropped > 1:   # more than a killed writer's torn last line
            log.warning("%s: dropped %d lines that are not metrics rows", self.path, dropped)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            # a diverged run's NaN figures as null: NaN is not JSON
            handle.write(json.dumps({key: finite_or_none(value) for key, value in row.items()}, sort_keys=True,
                                    allow_nan=False) + "\n")
        if self._tensorboard_dir is not None and self._writer is None:
            # the trainer refused a missing tensorboard package before any run began
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(str(self._tensorboard_dir), purge_step=self._purge_from)
        if self._writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, row.get("step", 0))
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
