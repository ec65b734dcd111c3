"""Student forward+backward step time with each quant preset vs plain bf16, side by side.

All models live at once and every round times one step of each, in rotating order, so a
noisy shared machine slows them alike; the table reports the median step time and its ratio
to the unquantized bf16 model of the same round.  The first step of each (compilation
included) is left out of both and printed on its own; a variant that runs out of GPU memory
is dropped and listed, the others still measured.

Fake-quant runs as ``quant.compile`` says (auto: compiled on CUDA, eager on CPU);
``--fake-quant both`` times every preset both ways, side by side (the compiled rows are
marked ``+c``; their values are bit-identical to eager, see tests/quant/test_compiled.py).

    .venv/bin/python bench/quant_overhead.py                      # CPU, embedded SmolLM2
    .venv/bin/python bench/quant_overhead.py --fake-quant both --presets nvfp4 w4a16_int
    python bench/quant_overhead.py --device cuda --model qwen3-1.7b-random --fake-quant both
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qadpipe.config import build_config  # noqa: E402
from qadpipe.quant.calibrate import calibrate  # noqa: E402
from qadpipe.quant.recipe import PRESETS, apply_recipe  # noqa: E402
from random_models import QWEN3_SHAPES, random_qwen3  # noqa: E402

DEFAULT_PRESETS = ["w4a16_int", "nvfp4", "nvfp4_a16", "mxfp4", "fp8", "w8a8_int", "lsq_int4"]


def build_base(name: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    if name in ("smollm2", "smollm2-135m"):   # the other benches call it by its alias
        from qadpipe.models import load_causal_lm
        return load_causal_lm("smollm2-135m", dtype=str(dtype).split(".")[-1], device=device)
    if name in QWEN3_SHAPES:
        return random_qwen3(name, device, dtype)
    raise SystemExit(f"--model: unknown {name!r}; expected smollm2, smollm2-135m or one of {', '.join(QWEN3_SHAPES)}")


def make_student(base: torch.nn.Module, preset: str, group_size: int | None,
                 batch: dict[str, torch.Tensor], fake_quant: str = "auto") -> torch.nn.Module:
    model = copy.deepcopy(base)
    if preset != "bf16":
        configurable = PRESETS[preset].weight.group_size == 128
        quant = build_config({"quant": {"preset": preset, "compile": fake_quant,
                                        "group_size": group_size if configurable else None}}).quant
        apply_recipe(model, quant)
        calibrate(model, [batch], 1)
    return model.train()


def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                             batch["input_ids"][:, 1:].flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="smollm2", help="smollm2 (or smollm2-135m) | " + " | ".join(QWEN3_SHAPES))
    parser.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS)
    parser.add_argument("--group-size", type=int, default=64, help="for the group-128 presets (SmolLM2: 576)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="torch.compile every whole model")
    parser.add_argument("--fake-quant", choices=["auto", "eager", "compiled", "both"], default="auto",
                        help="quant.compile for the fake-quant functions (auto: compiled on CUDA only)")
    args = parser.parse_args()

    cuda = args.device.startswith("cuda")
    batch_size = args.batch or (4 if cuda else 2)
    seq = args.seq or (2048 if cuda else 256)
    base = build_base(args.model, args.device, torch.bfloat16)
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, vocab, (batch_size, seq), generator=g).to(args.device),
             "attention_mask": torch.ones(batch_size, seq, dtype=torch.long, device=args.device)}
    modes = {"auto": ["auto"], "eager": ["off"], "compiled": ["on"], "both": ["off", "on"]}[args.fake_quant]
    variants = {"bf16": ("bf16", "off")}
    for preset in (p for p in args.presets if p != "bf16"):
        for mode in modes:
            variants[preset + ("+c" if mode == "on" else "")] = (preset, mode)
    names = list(variants)
    models = {}
    for name, (preset, mode) in variants.items():
        models[name] = make_student(base, preset, args.group_size, batch, mode)
        if args.compile:
            models[name] = torch.compile(models[name])
    del base

    def timed(model: torch.nn.Module) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(model, batch)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first: dict[str, float] = {}
    out_of_memory: list[str] = []

    def attempt(name: str) -> float | None:
        """One timed step; a variant that runs out of GPU memory is dropped (and said), so
        the others' rows still print -- all but the bf16 baseline, which every ratio needs."""
        try:
            return timed(models[name])
        except torch.OutOfMemoryError:
            if name == "bf16":
                raise SystemExit("the bf16 baseline ran out of GPU memory; use a smaller --batch or --seq") from None
            out_of_memory.append(name)
        names.remove(name)   # outside the handler: its traceback no longer holds the step's tensors
        del models[name]
        torch.cuda.empty_cache()
        print(f"{name}: out of memory; left out", file=sys.stderr, flush=True)
        return None

    for name in list(names):                # warm-up: the first step compiles (its time is printed)
        seconds = attempt(name)
        if seconds is not None:
            first[name] = seconds
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            seconds = attempt(name)
            if seconds is not None:
                times[name].append(seconds)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names),
              file=sys.stderr, flush=True)

    print(f"\nstep = forward + backward, batch {batch_size} x {seq} tokens, {args.model} bf16 on "
          f"{args.device}{', torch.compile' if args.compile else ''}, fake-quant {args.fake_quant}; "
          f"median of {args.rounds} rounds, "
          f"group {args.group_size} for group-128 presets; torch {torch.__version__}\n")
    print("| preset | ms / step (median) | x bf16 (median of each round's ratio) | first step s (compile) |")
    print("|---|---|---|---|")
    for name in names:
        paired = statistics.median(mine / base for mine, base in zip(times[name], times["bf16"]))
        print(f"| {name} | {statistics.median(times[name]) * 1e3:.0f} | {paired:.2f} | {first[name]:.1f} |")
    for name in out_of_memory:
        print(f"| {name} | out of memory | | |")


if __name__ == "__main__":
    main()
