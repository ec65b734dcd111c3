"""Logit rows that break a careless top-k (block pre-selection, tie order, masked entries):
``from logit_rows import adversarial_rows``."""

from __future__ import annotations

import torch

from qadpipe.kernels.topk_logprobs import BLOCK


def adversarial_rows(vocab: int, k: int) -> torch.Tensor:
    """14 fp64 rows of ``vocab`` logits; every top-k under test is checked against a whole-row sort."""
    g = torch.Generator().manual_seed(2)
    rows = (torch.randn(14, vocab, generator=g) * 3).double()
    rows[0, 3 * BLOCK:3 * BLOCK + k] += 50.0                  # the whole top-k inside one block
    rows[1, torch.arange(k) * BLOCK + 5] += 50.0              # one per block, k blocks
    rows[2] = rows[2].round()                                 # integer logits: ties everywhere
    rows[3] = 0.0                                             # one value: every block maximum ties
    rows[4, -1] = 99.0                                        # the maximum in the partial last block
    rows[5, vocab - vocab % BLOCK:] = 80.0                    # the partial block holds several of the best
    rows[6, : vocab // 2] = float("-inf")                     # half the vocabulary masked
    rows[7, torch.arange(2 * k) * BLOCK] = 40.0               # 2k blocks tie at the k-th block maximum
    rows[8, : 5 * BLOCK] = float("-inf")
    rows[8, 7 * BLOCK] = 60.0                                 # one dominant entry after masked blocks
    rows[9, torch.arange(k // 2) * BLOCK] = 30.0
    rows[9, 10 * BLOCK:10 * BLOCK + k] = 20.0                 # the rest of the top-k within one block
    rows[10, 11] = 300.0                                      # the k-th block maximum ~300 nats down
    rows[11, 1::2] = -0.0                                     # -0 and +0 tie (the rest +0)
    rows[11, 0::2] = 0.0
    rows[12] = rows[12] * 1e-6                                # every entry within ~1e-5: one bin
    rows[13, : vocab - 3] = float("-inf")                     # fewer finite entries than k
    return rows
