"""What the exact off-S student mass costs: forward-KL-with-tail, log_softmax + loss + backward.

The loss sums the student's mass over the complement of S (the teacher's cached top-k)
wherever 1 - P < losses.EXACT_REST_BELOW, because log(1 - P) from fp32 log-probs has no
correct digit there.  This prints its time per position side by side with the cheap formula
alone (a threshold no row reaches: the pre-fix behaviour), on SmolLM2-sized rows, for chunks with
0 %, 50 % and 100 % confident rows; interleaved rounds, medians.

    .venv/bin/python bench/tail_loss_cost.py [--rows 512] [--vocab 49152] [--k 64] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qadpipe.distill import losses

#: A threshold no row's 1 - P reaches (the loss floors it at 1e-8): the cheap formula everywhere.
CHEAP_ONLY = 1e-30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows, vocab, k = args.rows, args.vocab, args.k
    ids = torch.randint(0, vocab, (rows, k))
    teacher_lp = torch.log_softmax(torch.randn(rows, k), -1) - 0.1
    tail = torch.full((rows,), 1 - torch.exp(torch.tensor(-0.1)).item(), dtype=torch.float64)
    exact_below = losses.EXACT_REST_BELOW

    def step(logits: torch.Tensor, threshold: float) -> float:
        losses.EXACT_REST_BELOW = threshold
        x = logits.clone().requires_grad_()
        start = time.perf_counter()
        losses.forward_kl_tail(torch.log_softmax(x, -1), ids, teacher_lp, tail).sum().backward()
        return time.perf_counter() - start

    print(f"rows {rows}, vocab {vocab}, k {k}, threads {torch.get_num_threads()}")
    print("confident rows | cheap only (us/pos) | exact where needed (us/pos) | ratio")
    for fraction in (0.0, 0.5, 1.0):
        logits = torch.randn(rows, vocab)
        confident = int(rows * fraction)
        logits[:confident].scatter_(1, ids[:confident], 25.0)   # all but ~1e-6 of the mass on S
        times: dict[float, list[float]] = {CHEAP_ONLY: [], exact_below: []}
        for round_ in range(args.rounds + 2):
            order = list(times) if round_ % 2 == 0 else list(times)[::-1]   # neither always runs first
            for threshold in order:
                seconds = step(logits, threshold)
                if round_ >= 2:   # two warm-up rounds
                    times[threshold].append(seconds)
        cheap, exact = (statistics.median(times[t]) / rows * 1e6 for t in (CHEAP_ONLY, exact_below))
        print(f"{fraction:>14.0%} | {cheap:>19.0f} | {exact:>27.0f} | {exact / cheap:.2f}x")
    losses.EXACT_REST_BELOW = exact_below


if __name__ == "__main__":
    main()
