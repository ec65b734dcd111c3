"""What stage two says about GPU memory before it spends minutes loading: the student's fp32
weights must fit one GPU whole (a single process, or DDP's), or their 1/world shards (FSDP2's
sharded build), and the training state's lower bound is named when it will not fit.  Hand-worked figures; the CUDA
query is stood in for, so these run without a GPU."""

from __future__ import annotations

import pytest
import torch

from qadpipe.config import load_config
from qadpipe.distill.student import build_student, check_weights_fit
from qadpipe.distill.trainer import training_state_bytes
from qadpipe.errors import DistillError


def test_weights_over_the_free_memory_are_refused_in_one_line_and_those_that_fit_are_not():
    with pytest.raises(DistillError) as info:
        check_weights_fit(10 * 2**30, 8 * 2**30, torch.device("cuda:3"))
    assert str(info.value).startswith("model.path: the student's fp32 weights take 10.0 GiB, more than the 8.0 GiB "
                                      "free on cuda:3;")
    check_weights_fit(8 * 2**30, 8 * 2**30, torch.device("cuda:0"))


def test_fsdp2_needs_only_each_ranks_shard_of_the_weights_to_fit():
    # a 70B student's 280 GB: 35 GB a GPU over 8 ranks fit 40 GB free; over 4 (70 GB each) they do not
    check_weights_fit(280 * 10**9, 40 * 10**9, torch.device("cuda:0"), shards=8)
    with pytest.raises(DistillError) as info:
        check_weights_fit(280 * 10**9, 40 * 10**9, torch.device("cuda:0"), shards=4)
    assert str(info.value).startswith("model.path: the student's fp32 weights take 260.8 GiB, 65.2 GiB a GPU over 4 "
                                      "ranks, more than the 37.3 GiB free on cuda:0; run on more GPUs")


def test_a_student_too_large_for_its_gpu_is_refused_before_it_is_copied_there(peaky_llama_dir, monkeypatch):
    config = load_config(None, [f"model.path={peaky_llama_dir}", "quant.preset=w4a16_int", "quant.group_size=32"])
    weights = sum(p.numel() * 4 for p in build_student(config, torch.device("cpu")).parameters())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (weights - 1, 80 * 2**30))
    with pytest.raises(DistillError, match="fp32 weights take"):
        build_student(config, torch.device("cuda:0"))   # no CUDA here: reaching the copy would fail otherwise


def test_training_state_is_twelve_bytes_a_trained_parameter_ddp_sixteen_fsdp2_sharded():
    # an 8B student trained whole: 96 GB alone, 128 GB a GPU under DDP, 12 GB each of 8 GPUs under FSDP2
    assert training_state_bytes(8_000_000_000, "single", 1) == 96e9
    assert training_state_bytes(8_000_000_000, "ddp", 8) == 128e9
    assert training_state_bytes(8_000_000_000, "fsdp2", 8) == 12e9
