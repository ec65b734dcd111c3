"""The fused prompt log-prob gather against an independent reference (fp64 log_softmax).

vLLM's path is ``topk(log_softmax(logits))``; the fused one never forms the log-softmax.  The
slow suite compares the two inside real engines (test_vllm_backend.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm.v1.outputs")

from qadpipe.teacher.vllm_fused_logprobs import ENV, register, topk_logprobs_from_logits  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_topk_logprobs_match_a_full_log_softmax(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 1000, generator=g) * 4).to(dtype)
    logits[5, :] = 0.0                                   # a row of exact ties
    logits[6, 17] = 90.0                                 # a row with one dominant entry
    token_ids = torch.randint(0, 1000, (37,), generator=g)
    got = topk_logprobs_from_logits(logits, 8, token_ids)

    reference = torch.log_softmax(logits.double(), dim=-1)
    top, top_ids = torch.topk(reference, 8, dim=-1)
    token_lp = reference.gather(-1, token_ids[:, None])
    assert got.logprob_token_ids.dtype == torch.int32 and got.logprobs.dtype == torch.float32
    assert torch.equal(got.logprob_token_ids[:, 0], token_ids.to(torch.int32))
    untied = torch.ones(37, dtype=torch.bool)
    untied[5] = False                                    # which of 1000 equal entries: any order
    assert torch.equal(got.logprob_token_ids[untied, 1:], top_ids[untied].to(torch.int32))
    torch.testing.assert_close(got.logprobs.double(), torch.cat((token_lp, top), 1), atol=2e-6, rtol=1e-6)
    assert torch.equal(got.selected_token_ranks, (reference >= token_lp).sum(-1))
    assert got.selected_token_ranks[5] == 1000           # ties count: everyone is ">=" the token


def test_plugin_patches_only_when_asked(monkeypatch):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._get_prompt_logprobs_dict
    monkeypatch.delenv(ENV, raising=False)
    register()
    assert GPUModelRunner._get_prompt_logprobs_dict is original
    monkeypatch.setenv(ENV, "1")
    monkeypatch.setattr(GPUModelRunner, "_get_prompt_logprobs_dict", original)
    register()
    assert getattr(GPUModelRunner._get_prompt_logprobs_dict, "qadpipe_fused", False)
    register()                                           # loaded again in the same process: no double wrap
    assert GPUModelRunner._get_prompt_logprobs_dict.__wrapped__ is original


def test_plugin_leaves_an_unknown_vllm_alone(monkeypatch, caplog):
    from vllm.v1.sample.sampler import Sampler

    monkeypatch.setenv(ENV, "1")
    monkeypatch.delattr(Sampler, "gather_logprobs")
    with caplog.at_level("WARNING", logger="vllm.qadpipe_fused_logprobs"):
        register()                                       # must not raise inside vLLM's engine start
    assert "using vLLM's own log_softmax path" in caplog.text
