"""Peak memory of the fused head loss (forward + backward) with a plain Linear LM head, added
chunk by chunk into one fp32 gradient, vs the general path (the same head behind a wrapper, so
``autograd.grad`` returns each chunk's vocab × hidden gradient as a new tensor), side by side.

Each path runs in its own process, so its peak is its own: CUDA max_memory_allocated on a GPU
(bf16 autocast, as the trainer runs), peak RSS on a CPU (fp32; it counts the Python/torch
baseline too, printed on its own).  Default sizes: Qwen3-1.7B's head (151936 × 2048, fp32
master weight) on 4 × 1024 positions, chunks of 1024 (``distill.loss_chunk_tokens``).

    .venv/bin/python bench/head_loss_memory.py [--positions 4096] [--vocab 151936] [--hidden 2048]
    python bench/head_loss_memory.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qadpipe.distill.head_loss import LossSpec, PositionTargets, head_loss  # noqa: E402

GIB = 2 ** 30


def peak_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB   # Linux: KiB


def run_path(path: str, args: argparse.Namespace) -> dict[str, float]:
    """One fused-head-loss step in this process; ``path`` 'linear' or 'general'."""
    device, k = args.device, 64
    gen = torch.Generator(device=device).manual_seed(0)
    head = nn.Linear(args.hidden, args.vocab, bias=False, device=device)
    hidden = torch.randn(args.positions, args.hidden, device=device, generator=gen, requires_grad=True)
    values = torch.randn(args.positions, k, device=device, generator=gen).log_softmax(-1).sort(-1, descending=True).values
    ids = torch.randint(0, args.vocab, (args.positions, k), device=device, generator=gen)
    targets = PositionTargets(next_tokens=ids[:, 0], topk_ids=ids, topk_logprobs=values - 0.1,
                              tail_mass=torch.full((args.positions,), 0.0952, dtype=torch.float64, device=device))
    baseline = peak_gib(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    module = head if path == "linear" else nn.Sequential(head)
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        total, _ = head_loss(hidden, module, targets, LossSpec(), args.chunk)
    total.backward()
    return {"path": path, "peak_gib": peak_gib(device), "before_gib": baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--positions", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--child", choices=["linear", "general"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_path(args.child, args)))
        return
    rows = {}
    for path in ("general", "linear"):
        command = [sys.executable, __file__, "--child", path] + sys.argv[1:]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows[path] = json.loads(done.stdout.strip().splitlines()[-1])
    weight_gib = args.vocab * args.hidden * 4 / GIB
    print(f"{args.positions} positions, head {args.vocab} x {args.hidden} (fp32 weight {weight_gib:.2f} GiB), "
          f"chunks of {args.chunk}, {args.device}{' (bf16 autocast)' if args.device.startswith('cuda') else ''}")
    print("| path | peak GiB | before the step GiB |\n|---|---|---|")
    for path, row in rows.items():
        print(f"| {path} | {row['peak_gib']:.2f} | {row['before_gib']:.2f} |")
    saved = rows["general"]["peak_gib"] - rows["linear"]["peak_gib"]
    print(f"linear head saves {saved:.2f} GiB ({saved / weight_gib:.2f}x the fp32 weight), "
          f"peak ratio {rows['linear']['peak_gib'] / rows['general']['peak_gib']:.2f}")


if __name__ == "__main__":
    main()
