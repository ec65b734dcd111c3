"""The fused prompt log-prob gather against an independent reference (fp64 log_softmax).

vLLM's path is ``topk(log_softmax(logits))``; the fused one never forms the log-softmax.  The
slow suite compares the two inside real engines (test_vllm_backend.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm.v1.outputs")

from logit_rows import adversarial_rows  # noqa: E402
from qadpipe.kernels.topk_logprobs import BLOCK  # noqa: E402
from qadpipe.teacher import vllm_fused_logprobs  # noqa: E402
from qadpipe.teacher.vllm_fused_logprobs import (  # noqa: E402
    ENV, ReusedLogitsBlock, register, topk_logprobs_from_logits)


@pytest.fixture(params=["native", "torch"])
def topk_path(request, monkeypatch):
    """Each test runs on both CPU paths: the native kernel, and the torch ops (GPU, no compiler)."""
    if request.param == "torch":
        monkeypatch.setattr(vllm_fused_logprobs, "_native_kernel_builds", lambda: False)
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_topk_logprobs_match_a_full_log_softmax(dtype, topk_path):
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
    if topk_path == "native":                            # ties in id order, every row
        in_id_order = torch.sort(logits.double(), dim=-1, descending=True, stable=True).indices[:, :8]
        assert torch.equal(got.logprob_token_ids[:, 1:], in_id_order.to(torch.int32))
    else:                                                # torch.topk: tied entries in any order
        untied = torch.ones(37, dtype=torch.bool)
        untied[5] = False                                # which of 1000 equal entries: any order
        assert torch.equal(got.logprob_token_ids[untied, 1:], top_ids[untied].to(torch.int32))
    torch.testing.assert_close(got.logprobs.double(), torch.cat((token_lp, top), 1), atol=2e-6, rtol=1e-6)
    assert torch.equal(got.selected_token_ranks, (reference >= token_lp).sum(-1))
    assert got.selected_token_ranks[5] == 1000           # ties count: everyone is ">=" the token


def test_fused_statistics_with_a_partial_block_and_masked_entries(topk_path):
    """A maximum in the partial last block, a row mostly -inf, a dominant entry: what a plain
    fp64 log_softmax gives."""
    vocab = 20 * BLOCK + 9
    logits = adversarial_rows(vocab, 8).float()
    token_ids = torch.tensor([3 * BLOCK, 64, 5, 100, vocab - 1, vocab - 2, 200, 128, 7 * BLOCK, 1, 11, 2, 3, vocab - 1])
    got = topk_logprobs_from_logits(logits, 8, token_ids)
    reference = torch.log_softmax(logits.double(), dim=-1)
    token_lp = reference.gather(-1, token_ids[:, None])
    finite = token_lp.isfinite()
    torch.testing.assert_close(got.logprobs[:, :1][finite].double(), token_lp[finite], atol=2e-6, rtol=1e-6)
    torch.testing.assert_close(got.logprobs[:, 1:].double(), torch.topk(reference, 8, dim=-1).values,
                               atol=2e-6, rtol=1e-6)
    assert torch.equal(got.selected_token_ranks, (reference >= token_lp).sum(-1))


def test_a_kernel_that_does_not_build_is_said_once_and_the_torch_ops_take_over(monkeypatch, caplog):
    from qadpipe.kernels.build import KernelBuildError

    def no_compiler(source):
        raise KernelBuildError("no C++ compiler 'c++' on PATH (set CXX): qadpipe's CPU kernels need one")

    monkeypatch.setattr(vllm_fused_logprobs, "load_kernel", no_compiler)
    vllm_fused_logprobs._native_kernel_builds.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="vllm.qadpipe_fused_logprobs"):
            for _ in range(2):
                got = topk_logprobs_from_logits(torch.zeros(3, 640), 4, torch.tensor([0, 1, 2]))
    finally:
        vllm_fused_logprobs._native_kernel_builds.cache_clear()
    assert caplog.text.count("fall back to torch ops") == 1
    assert "no C++ compiler" in caplog.text
    torch.testing.assert_close(got.logprobs, torch.full((3, 5), -torch.log(torch.tensor(640.0)).item()))


def test_the_reused_logits_block_computes_what_vllms_onednn_mm_does():
    from vllm import _custom_ops

    if not _custom_ops._supports_onednn:
        pytest.skip("this vLLM build has no oneDNN CPU GEMM")
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(300, 64, generator=g).bfloat16()
    handler = _custom_ops.create_onednn_mm(weight.t(), 32)
    reused = ReusedLogitsBlock()
    head = reused.around(lambda h: _custom_ops.onednn_mm(handler, h, None))
    for rows in (7, 5, 9):                                   # shrinking, then growing past the block
        hidden = torch.randn(rows, 64, generator=g).bfloat16()
        got = head(hidden)
        assert torch.equal(got, _custom_ops.onednn_mm(handler, hidden, None))
        assert got.data_ptr() == reused.block.data_ptr()    # written into the kept block
    assert _custom_ops.onednn_mm != reused.onednn_mm         # vLLM's op is back after each call


def test_plugin_patches_only_when_asked(monkeypatch):
    from vllm.v1.engine.logprobs import LogprobsProcessor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._get_prompt_logprobs_dict
    original_update = LogprobsProcessor._update_prompt_logprobs
    monkeypatch.delenv(ENV, raising=False)
    register()
    assert GPUModelRunner._get_prompt_logprobs_dict is original
    assert LogprobsProcessor._update_prompt_logprobs is original_update
    monkeypatch.setenv(ENV, "1")
    monkeypatch.setattr(GPUModelRunner, "_get_prompt_logprobs_dict", original)
    monkeypatch.setattr(LogprobsProcessor, "_update_prompt_logprobs", original_update)
    register()
    assert getattr(GPUModelRunner._get_prompt_logprobs_dict, "qadpipe_fused", False)
    register()                                           # loaded again in the same process: no double wrap
    assert GPUModelRunner._get_prompt_logprobs_dict.__wrapped__ is original
    assert LogprobsProcessor._update_prompt_logprobs.__wrapped__ is original_update


def test_bulk_prompt_logprobs_fill_the_lists_vllms_loop_fills(monkeypatch):
    """Two prefill chunks of one request, k=5: every FlatLogprobs list equal to vLLM's own."""
    from vllm.logprobs import create_prompt_logprobs
    from vllm.v1.engine.logprobs import LogprobsProcessor
    from vllm.v1.outputs import LogprobsTensors

    vllms = LogprobsProcessor._update_prompt_logprobs
    monkeypatch.setenv(ENV, "1")
    monkeypatch.setattr(LogprobsProcessor, "_update_prompt_logprobs", vllms)
    register()
    bulk = LogprobsProcessor._update_prompt_logprobs
    assert bulk is not vllms
    g = torch.Generator().manual_seed(4)
    processors = [LogprobsProcessor(tokenizer=None, logprobs=None, prompt_logprobs=create_prompt_logprobs(True),
                                    cumulative_logprob=None, num_logprobs=None, num_prompt_logprobs=5)
                  for _ in range(2)]
    for positions in (7, 3):
        chunk = LogprobsTensors(torch.randint(0, 100, (positions, 6), generator=g, dtype=torch.int32),
                                torch.randn(positions, 6, generator=g),
                                torch.randint(1, 100, (positions,), generator=g))
        vllms(processors[0], chunk)
        bulk(processors[1], chunk)
    own, ours = (p.prompt_logprobs for p in processors)
    assert len(ours) == 11 and ours == own                  # a dataclass: all six lists compared
    assert ours[4] == own[4] and isinstance(ours.logprobs[0], float) and isinstance(ours.ranks[1], int)


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

    assert head_rows == [3, 3, 2, 2]                     # blocks of at most 3, as even as can be
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


def test_the_compiled_statistics_of_the_gpu_path_match_fp64():
    """The GPU path compiles the statistics pass; inductor builds the same graph for CPU, so its
    maths is checked here (a GPU run checks the CUDA build)."""
    logits = adversarial_rows(20 * BLOCK + 9, 8).float()
    token_ids = torch.arange(len(logits)) * 50
    lse, token_logit, ranks = vllm_fused_logprobs._compiled_row_statistics(logits, token_ids)
    x = logits.double()
    torch.testing.assert_close(lse.double(), torch.logsumexp(x, -1, keepdim=True), atol=2e-6, rtol=1e-6)
    assert torch.equal(token_logit, logits.gather(1, token_ids[:, None]))
    assert torch.equal(ranks, (x >= x.gather(1, token_ids[:, None])).sum(-1))


def test_cpu_logits_the_kernel_does_not_take_are_said_once(caplog):
    """fp16 logits (vLLM-CPU's default dtype where bf16 is missing) and k above vocab // 64 ran
    on torch ops without a word: slower, and tied log-probs in another id order."""
    vllm_fused_logprobs._say_the_kernel_does_not_take.cache_clear()
    logits = torch.randn(3, 640)
    with caplog.at_level("WARNING", logger="vllm.qadpipe_fused_logprobs"):
        for _ in range(2):
            topk_logprobs_from_logits(logits.half(), 4, torch.tensor([0, 1, 2]))
            topk_logprobs_from_logits(logits, 11, torch.tensor([0, 1, 2]))
            topk_logprobs_from_logits(logits, 4, torch.tensor([0, 1, 2]))   # taken: nothing said
    assert caplog.text.count("does not take torch.float16 logits (it takes bf16 and fp32)") == 1
    assert caplog.text.count(f"does not take k above vocab // {BLOCK}") == 1
    assert caplog.text.count("native top-k kernel does not take") == 2
