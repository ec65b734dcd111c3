"""A vLLM plugin: prompt top-k log-probs without a full-vocabulary fp32 ``log_softmax``.

vLLM scores prompt positions (``GPUModelRunner._get_prompt_logprobs_dict``) by running the LM
head over all of a request's prompt positions at once, writing ``log_softmax(logits)`` for
every position and the whole vocabulary in fp32, then taking its top-k, gathering the actual
token and counting its rank -- three more passes over that tensor.  A log-softmax is the
logits minus one logsumexp per position, so the same numbers come from the logits directly:

* the LM head runs over blocks of positions (``rows_per_chunk``), each consumed while still in
  cache; on CPU into one logits block kept between calls (:class:`ReusedLogitsBlock`);
* on CPU, one native pass per block (:mod:`qadpipe.kernels.topk_logprobs`) yields the
  logsumexp, the actual token's log-prob and rank, and the top-k, taken from the few 64-entry
  blocks whose maximum can reach it instead of a partial sort of every row;
* on GPU, one compiled pass yields the logsumexp, the token's logit and rank, then
  ``torch.topk``; on a CPU where the kernel cannot be built (logged once), the same ops eagerly.

In the process holding the ``LLM``, vLLM's per-position Python loop that fills ``FlatLogprobs``
becomes a few bulk list extends (same lists).  Values are ``logit - logsumexp`` in fp32 (within
a few fp32 ulps of vLLM's); ids identical except where entries tie (the CPU kernel keeps the
lowest ids among equal values, in id order; vLLM's ``torch.topk`` leaves that open); ranks
counted on the logits.  Measured on a 2-core CPU (SmolLM2, 49k vocab):
``bench/capture_throughput.py``.

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

from qadpipe.kernels import topk_logprobs as native_topk
from qadpipe.kernels.build import KernelBuildError, load_kernel

# A child of vLLM's logger: its handlers print this in the engine processes' logs.
log = logging.getLogger("vllm.qadpipe_fused_logprobs")

ENV = "QADPIPE_VLLM_FUSED_LOGPROBS"
ENTRY_POINT = "qadpipe_fused_prompt_logprobs"
# Logits per LM-head call.  CPU: each call streams the whole head weight again, and the block is
# then read by the top-k pass while it is still in cache; 170 rows of a 49k bf16 vocabulary.
# GPU: only bounds memory; smaller blocks would cost kernel launches.
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


def _row_statistics(logits: torch.Tensor, token_ids: torch.Tensor):
    """The logsumexp, the token's logit and its rank (vLLM's rule: how many entries are >= it,
    so ties count and the best is 1); compiled on GPU into one loop over [positions, vocab]."""
    x = logits.float()
    row_max = x.amax(-1, keepdim=True)
    shift = torch.where(row_max.isinf(), 0.0, row_max)      # all -inf or +inf: as torch.logsumexp
    token = x.gather(-1, token_ids.unsqueeze(-1))
    lse = shift + (x - shift).exp().sum(-1, keepdim=True).log()
    return lse, token, (x >= token).sum(-1, dtype=torch.int32).long()


# Not on CPU: there the native kernel runs, and where it cannot be built, inductor (which needs
# the same C++ compiler) could not build this either.
_compiled_row_statistics = torch.compile(_row_statistics, dynamic=True)


def _topk_logprobs(logits: torch.Tensor, num_logprobs: int,
                   token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    refusal = native_topk.refusal(logits, num_logprobs)
    if refusal is None and _native_kernel_builds():
        return native_topk.topk_logprobs(logits, num_logprobs, token_ids)
    if refusal is not None and logits.device.type == "cpu":
        _say_the_kernel_does_not_take(refusal)
    statistics = _row_statistics if logits.device.type == "cpu" else _compiled_row_statistics
    lse, token_logit, ranks = statistics(logits, token_ids)
    top_logits, top_ids = torch.topk(logits, num_logprobs, dim=-1)
    ids = torch.cat((token_ids.unsqueeze(-1), top_ids), dim=1).to(torch.int32)
    return ids, torch.cat((token_logit, top_logits.float()), dim=1) - lse, ranks


@functools.cache
def _say_the_kernel_does_not_take(refusal: str) -> None:
    """Once per reason: CPU logits the native kernel does not take run on torch ops."""
    log.warning("qadpipe: the native top-k kernel does not take %s; prompt log-probs run on torch ops (same "
                "values, slower; tied log-probs may come in another id order)", refusal)


@functools.cache
def _native_kernel_builds() -> bool:
    """Whether the CPU kernel loads; if not, said once, and the torch ops compute the same."""
    try:
        load_kernel(native_topk.SOURCE)
    except KernelBuildError as exc:
        log.warning("qadpipe: %s; prompt log-probs fall back to torch ops (same values, slower)", exc)
        return False
    return True


def topk_logprobs_from_logits(logits: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor) -> Any:
    """What vLLM's ``Sampler.gather_logprobs(log_softmax(logits), k, token_ids)`` returns:
    ``[token, top-1..top-k]`` ids (int32) and log-probs (fp32), and the token's rank."""
    from vllm.v1.outputs import LogprobsTensors

    return LogprobsTensors(*_topk_logprobs(logits, num_logprobs, token_ids))


def chunked_topk_logprobs(compute_logits: Callable[[torch.Tensor], torch.Tensor], rows_per_chunk: int,
                          hidden_states: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor) -> Any:
    """:func:`topk_logprobs_from_logits` of ``compute_logits(hidden_states)``, with the LM head
    run over as few blocks of at most ``rows_per_chunk`` positions as can be, of equal size (a
    511-position prompt in 170-row blocks: 4 x 128, not 3 x 170 and a 1-row call that streams
    the whole head weight for one position)."""
    from vllm.v1.outputs import LogprobsTensors

    blocks = max(1, -(-hidden_states.shape[0] // rows_per_chunk))
    parts = [_topk_logprobs(compute_logits(hidden), num_logprobs, tokens)
             for hidden, tokens in zip(hidden_states.tensor_split(blocks), token_ids.tensor_split(blocks))]
    return LogprobsTensors(*(torch.cat(field) for field in zip(*parts)))


class ReusedLogitsBlock:
    """vLLM-CPU's ``onednn_mm`` with its output written into one block kept between calls.

    vLLM's own allocates a fresh [rows, vocab] tensor per LM-head call; writing into memory
    already touched made the head ~1.5x faster (SmolLM2, 170 rows: 48 -> 33 us per row).  The
    logits returned alias the block, so each must be used up before the next call -- as
    :func:`chunked_topk_logprobs` does; only its head calls are routed here."""

    def __init__(self) -> None:
        self.block = torch.empty(0)

    def onednn_mm(self, handler: Any, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.numel() // handler.k
        if self.block.dtype != x.dtype or self.block.shape[-1] != handler.n or self.block.shape[0] < rows:
            self.block = torch.empty(rows, handler.n, dtype=x.dtype)
        out = self.block[:rows]
        torch.ops._C.onednn_mm(out, x.reshape(-1, handler.k), bias, handler.handler_tensor)
        return out.view(*x.shape[:-1], handler.n)

    def around(self, compute_logits: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``compute_logits`` with vLLM's ``onednn_mm`` (the op its CPU LM head calls) routed
        here for the call; a head on another kernel never meets it and runs as before."""
        from vllm import _custom_ops

        def compute(hidden_states: torch.Tensor) -> torch.Tensor:
            original = _custom_ops.onednn_mm
            _custom_ops.onednn_mm = self.onednn_mm
            try:
                return compute_logits(hidden_states)
            finally:
                _custom_ops.onednn_mm = original

        return compute


# One per engine process: its LM head's logits block, kept between requests.
_CPU_LOGITS = ReusedLogitsBlock()


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
        head = _CPU_LOGITS.around(model.compute_logits) if hidden_states.device.type == "cpu" else model.compute_logits
        gather = functools.partial(chunked_topk_logprobs, head, rows_per_chunk(self.model_config, hidden_states))
        model.compute_logits = _unchanged
        sampler.compute_logprobs = _unchanged
        sampler.gather_logprobs = gather
        try:
            return original(self, hidden_states, num_scheduled_tokens)
        finally:
            del model.compute_logits, sampler.compute_logprobs, sampler.gather_logprobs

    prompt_logprobs_fused.qadpipe_fused = True
    GPUModelRunner._get_prompt_logprobs_dict = prompt_logprobs_fused
    _register_bulk_prompt_logprobs()
    log.info("qadpipe: vLLM's V1 model runner patched: prompt log-probs from the logits, chunk-wise (on CPU one "
             "native logsumexp/rank/top-k pass, on GPU a compiled logsumexp pass and torch.topk; FlatLogprobs "
             "filled in bulk)")


def _register_bulk_prompt_logprobs() -> None:
    """In the process that holds the ``LLM``: vLLM turns each request's prompt log-prob tensors
    into ``FlatLogprobs`` one position at a time, in Python (``append_fast``: ~50 us a position
    at k=64 on 2 cores, a sixth of the forward).  Where nothing is decoded (``detokenize=False``,
    as qadpipe scores) the same lists come from a few bulk ``extend`` calls.  Output identical
    to vLLM's (a test compares every list); any other case runs vLLM's own loop."""
    import itertools

    from vllm.logprobs import FlatLogprobs
    from vllm.v1.engine.logprobs import LogprobsProcessor

    original = getattr(LogprobsProcessor, "_update_prompt_logprobs", None)
    if original is None or getattr(original, "qadpipe_bulk", False):
        return

    @functools.wraps(original)
    def update_prompt_logprobs_bulk(self, prompt_logprobs_tensors):
        token_ids, logprobs, ranks, *_ = prompt_logprobs_tensors
        flat = self.prompt_logprobs
        positions, width = logprobs.shape
        if self.tokenizer is not None or not isinstance(flat, FlatLogprobs) or width != self.num_prompt_logprobs + 1:
            return original(self, prompt_logprobs_tensors)
        # Per position, as vLLM's append_logprobs_for_next_position: the prompt token's entry
        # (its own rank), then the top-k with ranks 1..k.
        entry_ranks = torch.empty(positions, width, dtype=torch.int64)
        entry_ranks[:, 0] = torch.as_tensor(ranks)
        entry_ranks[:, 1:] = torch.arange(1, width)
        start = len(flat.logprobs)
        flat.start_indices.extend(range(start, start + positions * width, width))
        flat.end_indices.extend(range(start + width, start + (positions + 1) * width, width))
        flat.token_ids.extend(torch.as_tensor(token_ids).flatten().tolist())
        flat.logprobs.extend(torch.as_tensor(logprobs).flatten().tolist())
        flat.ranks.extend(entry_ranks.flatten().tolist())
        flat.decoded_tokens.extend(itertools.repeat(None, positions * width))

    update_prompt_logprobs_bulk.qadpipe_bulk = True
    LogprobsProcessor._update_prompt_logprobs = update_prompt_logprobs_bulk


def plugin_installed() -> bool:
    """Whether vLLM will find the entry point (qadpipe installed, not just on sys.path)."""
    from importlib.metadata import entry_points

    return any(ep.name == ENTRY_POINT for ep in entry_points(group="vllm.general_plugins"))
