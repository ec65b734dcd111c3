"""Prompt top-k log-probs on CPU from one native pass over the logits (``topk_logprobs.cpp``).

Per position: the top-k log-probs (descending; equal values in ascending id order) with their
ids, and the given token's log-prob and rank (how many entries are >= it).  Values are
``logit - logsumexp`` in fp32; the logsumexp uses a ~1-ulp exp and fp64 accumulation of fp32
partial sums, so it agrees with ``torch.logsumexp`` to a few fp32 ulps (tests compare them).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Callable, Optional

import torch

from qadpipe.kernels.build import load_kernel

SOURCE = Path(__file__).with_name("topk_logprobs.cpp")
BLOCK = 64          # the kernel's block of vocabulary entries; k may be at most vocab // BLOCK
_ENTRY = {torch.bfloat16: "qadpipe_topk_logprobs_bf16", torch.float32: "qadpipe_topk_logprobs_fp32"}


def refusal(logits: torch.Tensor, k: int) -> Optional[str]:
    """Why the kernel does not take these logits (None: it does): it takes CPU, bf16 or fp32,
    2-D logits and ``1 <= k <= vocab // 64``."""
    if logits.device.type != "cpu":
        return f"{logits.device.type} logits"
    if logits.dtype not in _ENTRY:
        return f"{logits.dtype} logits (it takes bf16 and fp32)"
    if logits.dim() != 2:
        return f"{logits.dim()}-D logits"
    if not 1 <= k <= logits.shape[1] // BLOCK:
        return f"k above vocab // {BLOCK}" if k >= 1 else f"k={k}"
    return None


def supports(logits: torch.Tensor, k: int) -> bool:
    """Whether the kernel takes these logits (see :func:`refusal`)."""
    return refusal(logits, k) is None


def topk_logprobs(logits: torch.Tensor, k: int,
                  token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[token, top-1..top-k]`` ids (int32) and log-probs (fp32), [positions, k + 1], and the
    token's rank (int64, [positions]) -- the tensors vLLM's ``LogprobsTensors`` holds."""
    if not supports(logits, k):
        raise ValueError(f"topk_logprobs: expected 2-D bf16/fp32 CPU logits and 1 <= k <= vocab // {BLOCK}, "
                         f"got {tuple(logits.shape)} {logits.dtype} on {logits.device}, k={k}")
    logits = logits.contiguous()
    tokens = token_ids.to(torch.int64).contiguous()
    rows, vocab = logits.shape
    if tokens.shape != (rows,) or (rows and not (0 <= int(tokens.min()) and int(tokens.max()) < vocab)):
        raise ValueError(f"topk_logprobs: expected {rows} token ids in [0, {vocab}), got shape {tuple(tokens.shape)}")
    ids = torch.empty(rows, k + 1, dtype=torch.int32)
    logprobs = torch.empty(rows, k + 1, dtype=torch.float32)
    ranks = torch.empty(rows, dtype=torch.int64)
    if rows:
        _entry(logits.dtype)(logits.data_ptr(), rows, vocab, k, tokens.data_ptr(), ids.data_ptr(),
                             logprobs.data_ptr(), ranks.data_ptr(), torch.get_num_threads())
    return ids, logprobs, ranks


@functools.cache
def _entry(dtype: torch.dtype) -> Callable[..., None]:
    entry = getattr(load_kernel(SOURCE), _ENTRY[dtype])
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    entry.argtypes = [pointer, size, size, size, pointer, pointer, pointer, pointer, ctypes.c_int]
    entry.restype = None
    return entry
