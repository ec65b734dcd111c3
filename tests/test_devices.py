"""A *.device setting resolves to this node's device, or one line naming the field."""

from __future__ import annotations

import pytest
import torch

from qadpipe.devices import resolve_device
from qadpipe.errors import ConfigError


@pytest.fixture
def two_gpus(monkeypatch):
    """A node with two CUDA devices, as far as resolve_device can ask (no GPU is needed)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("device, local_rank, local_world_size, expected", [
    ("cuda", 1, 2, "cuda:1"), ("cuda:1", 0, 1, "cuda:1"), ("auto", 0, 1, "cuda:0"), ("cpu", 1, 2, "cpu")])
def test_a_device_this_node_has(two_gpus, device, local_rank, local_world_size, expected):
    """cuda:1 with one process a node: a multi-node run may name its GPU (torchrun --nproc_per_node 1)."""
    assert resolve_device(device, "distill.device", local_rank, local_world_size) == torch.device(expected)


@pytest.mark.parametrize("device, local_rank, local_world_size, message", [
    ("cuda:x", 0, 1, "distill.device: got 'cuda:x', expected auto, cpu, cuda or cuda:N"),
    ("cuda:0:1", 0, 1, "distill.device: got 'cuda:0:1', expected auto, cpu, cuda or cuda:N"),
    ("mps", 0, 1, "distill.device: got 'mps', expected auto, cpu, cuda or cuda:N"),
    ("cuda:2", 0, 1, "distill.device: got 'cuda:2', but this node has 2 CUDA device(s) (cuda:0..cuda:1)"),
    ("cuda", 2, 3, "distill.device: got 'cuda' for local rank 2, but this node has 2 CUDA device(s) "
                   "(cuda:0..cuda:1)"),
    ("cuda:0", 0, 2, "distill.device: got 'cuda:0' for all 2 processes of this node, which would share that one "
                     "GPU; use cuda (each process takes the GPU of its LOCAL_RANK)"),
], ids=["not-an-index", "two-indices", "another-kind", "past-the-last", "more-ranks-than-gpus", "one-gpu-for-all"])
def test_a_device_this_node_lacks_is_one_line(two_gpus, device, local_rank, local_world_size, message):
    """torch's 'Invalid device string' and set_device's 'invalid device ordinal' were tracebacks;
    one cuda:N for every torchrun process put them all on one GPU."""
    with pytest.raises(ConfigError) as info:
        resolve_device(device, "distill.device", local_rank, local_world_size)
    assert str(info.value) == message
