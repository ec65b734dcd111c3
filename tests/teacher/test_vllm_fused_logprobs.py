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


def test_the_wrapped_prompt_path_runs_the_head_chunk_wise_and_restores_everything(monkeypatch):
    """Drive the wrapper the way vLLM's ``_get_prompt_logprobs_dict`` calls it (head, then
    log-probs, then gather); blocks of 3 rows must give what one full log_softmax gives."""
    from types import SimpleNamespace

    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from qadpipe.teacher import vllm_fused_logprobs

    g = torch.Generator().manual_seed(1)
    weight = torch.randn(50, 16, generator=g)
    hidden = torch.randn(10, 16, generator=g)
    token_ids = torch.randint(0, 50, (10,), generator=g)
    head_rows = []

    class Model:
        def compute_logits(self, h):
            head_rows.append(h.shape[0])
            return h.double() @ weight.double().T

    def vllm_prompt_path(self, hidden_states, num_scheduled_tokens):   # the calls vLLM makes, in order
        scores = self.sampler.compute_logprobs(self.model.compute_logits(hidden_states))
        return self.sampler.gather_logprobs(scores, 4, token_ids)

    monkeypatch.setenv(ENV, "1")
    monkeypatch.setattr(GPUModelRunner, "_get_prompt_logprobs_dict", vllm_prompt_path)
    monkeypatch.setattr(vllm_fused_logprobs, "CPU_CHUNK_BYTES", 3 * 4 * 50)   # 3 fp32 rows of a 50-token vocab
    register()
    runner = SimpleNamespace(model=Model(), sampler=Sampler(),
                             model_config=SimpleNamespace(logprobs_mode="raw_logprobs", get_vocab_size=lambda: 50,
                                                          dtype=torch.float32, head_dtype=torch.float32))
    got = GPUModelRunner._get_prompt_logprobs_dict(runner, hidden, {})

    assert head_rows == [3, 3, 3, 1]
    reference = torch.log_softmax(hidden.double() @ weight.double().T, dim=-1)
    top, top_ids = torch.topk(reference, 4, dim=-1)
    assert torch.equal(got.logprob_token_ids, torch.cat((token_ids[:, None], top_ids), 1).to(torch.int32))
    torch.testing.assert_close(got.logprobs.double(), torch.cat((reference.gather(-1, token_ids[:, None]), top), 1),
                               atol=2e-6, rtol=1e-6)                   # fp32 out, as vLLM's
    assert torch.equal(got.selected_token_ranks, (reference >= reference.gather(-1, token_ids[:, None])).sum(-1))
    # The shadowing attributes are gone: the model's head and the sampler are vLLM's again.
    assert "compute_logits" not in vars(runner.model)
    assert not {"compute_logprobs", "gather_logprobs"} & set(vars(runner.sampler))


def test_an_fp32_head_off_cuda_runs_once_per_request():
    """vLLM casts the head weight to fp32 on each call there: blocks would repeat the cast."""
    from types import SimpleNamespace

    from qadpipe.teacher.vllm_fused_logprobs import rows_per_chunk

    hidden = torch.zeros(512, 8, dtype=torch.bfloat16)
    config = SimpleNamespace(dtype=torch.bfloat16, head_dtype=torch.bfloat16, get_vocab_size=lambda: 49152)
    assert rows_per_chunk(config, hidden) == (16 << 20) // (2 * 49152) == 170
    config.head_dtype = torch.float32
    assert rows_per_chunk(config, hidden) == 512
