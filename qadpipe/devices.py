"""Which torch device a ``*.device`` setting names, checked against this node."""

from __future__ import annotations

import re

import torch

from qadpipe.errors import ConfigError


def resolve_device(device: str, field: str, local_rank: int = 0, local_world_size: int = 1) -> torch.device:
    """``auto`` -> this rank's GPU when there is one, else CPU; ``cuda`` -> ``cuda:<local_rank>``.
    A GPU this node lacks, or one ``cuda:N`` for the ``local_world_size`` processes torchrun
    starts on each node (all of them on one GPU), is refused in one line naming ``field``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    named = re.fullmatch(r"cuda(?::(\d+))?", device)
    if named is None:
        raise ConfigError(f"{field}: got '{device}', expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"{field}: got '{device}', but no CUDA device is available")
    if named.group(1) is not None and local_world_size > 1:
        raise ConfigError(f"{field}: got '{device}' for all {local_world_size} processes of this node, which would "
                          "share that one GPU; use cuda (each process takes the GPU of its LOCAL_RANK)")
    index = local_rank if named.group(1) is None else int(named.group(1))
    count = torch.cuda.device_count()
    if index >= count:
        whose = f"'{device}'" if named.group(1) is not None else f"'{device}' for local rank {local_rank}"
        raise ConfigError(f"{field}: got {whose}, but this node has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device(f"cuda:{index}")
