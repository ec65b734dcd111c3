"""AdamW whose weight decay reaches weight matrices only.

Decay pulls a parameter toward 0. On a linear or embedding matrix that is the usual
regulariser; on a norm's gain (1 at the teacher), an LSQ step (0 = every weight rounds to
zero) or a clip logit (0 = a 0.5 clip ratio) it is a steady drift away from the teacher and
from the calibration QAD starts at, and on a bias it buys nothing. So those get none: the
convention of HF's Trainer and nanoGPT.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def no_decay_names(model: nn.Module, exempt: Iterable[nn.Parameter]) -> set[str]:
    """Names (as ``model.named_parameters`` gives them) of the trainable parameters decay
    skips: ``exempt`` (quantizer parameters and norms) and every bias or other 1-D tensor.

    Names rather than the tensors themselves, because FSDP2 replaces each parameter when it
    shards the model; call this before wrapping and :func:`adamw` after."""
    exempt_ids = {id(p) for p in exempt}
    return {name for name, p in model.named_parameters() if id(p) in exempt_ids or p.ndim < 2}


def adamw(model: nn.Module, lr: float, weight_decay: float, no_decay: set[str]) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters. Without decay, one parameter group (the
    layout checkpoints of every qadpipe version hold); with decay, two: ``weight_decay`` on
    the matrices, 0 on ``no_decay``.  Fused: one kernel pass over each parameter's state
    where the default (foreach) makes several, ~30 ms of a 1.7B student's step on a GPU;
    CPU and DTensor (FSDP2) parameters are served too."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if weight_decay == 0.0:
        return torch.optim.AdamW([p for _, p in trainable], lr=lr, weight_decay=0.0, fused=True)
    decayed = [p for name, p in trainable if name not in no_decay]
    kept = [p for name, p in trainable if name in no_decay]
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": kept, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=True)
