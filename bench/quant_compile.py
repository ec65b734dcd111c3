"""Is a torch.compile'd fake-quant bit-exact with the eager one, and how much faster?

Training must round exactly as export packs (one code path), so a compiled fake-quant is
only usable where it returns the *same bits* as ``formats.fake_quantize``.  For each preset's
weight format this takes the compiled forward training uses (``quant.compile: on``, see
qadpipe/quant/compiled.py), feeds it and the eager one the same bf16 weights (a SmolLM2 MLP
shape, random with one outlier, at several scales), counts the tensors whose outputs differ
anywhere, and times both (best of ``--repeats``).

    .venv/bin/python bench/quant_compile.py [--device cuda] [--presets nvfp4 w4a16_int]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from qadpipe.quant.compiled import compiled_fake_quant_forward
from qadpipe.quant.formats import Granularity, fake_quantize
from qadpipe.quant.recipe import PRESETS

DEFAULT = ["nvfp4", "mxfp4", "mxfp8", "fp8", "fp8_static", "w4a16_int", "w8a16_int"]


def best_ms(fn, repeats: int, sync) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--presets", nargs="+", default=DEFAULT, choices=list(PRESETS))
    parser.add_argument("--shape", type=int, nargs=2, default=[1536, 576], help="weight [out, in]")
    parser.add_argument("--trials", type=int, default=6, help="random tensors compared per preset")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    generator = torch.Generator().manual_seed(0)

    def weight(scale: float) -> torch.Tensor:
        w = torch.randn(*args.shape, generator=generator) * scale
        w[3, 7] = 40 * scale                      # one outlier block
        return w.to(torch.bfloat16).to(args.device)

    print(f"| preset | compiled == eager | eager ms | compiled ms | speed-up |   ({args.device}, "
          f"weight {args.shape[0]}x{args.shape[1]} bf16, torch {torch.__version__})")
    print("|---|---|---|---|---|")
    for name in args.presets:
        spec = PRESETS[name].weight
        if spec.granularity is Granularity.GROUP and spec.group_size and args.shape[1] % spec.group_size:
            spec = dataclasses.replace(spec, group_size=64)
        amax_of = (lambda w: None) if spec.dynamic else (lambda w: w.abs().amax().float())

        def eager(w, amax):
            return fake_quantize(w, spec, amax=amax)

        forward = compiled_fake_quant_forward(spec, False, False)

        def compiled(w, amax):
            return forward(w, amax)[0]
        inputs = [weight(0.02 * 2 ** i) for i in range(args.trials)]
        try:
            differing = sum(not torch.equal(eager(w, amax_of(w)), compiled(w, amax_of(w))) for w in inputs)
        except Exception as exc:  # noqa: BLE001 - the table reports what the compiler refused
            print(f"| {name} | compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:90]} | | | |")
            continue
        w, amax = inputs[0], amax_of(inputs[0])
        eager_ms = best_ms(lambda: eager(w, amax), args.repeats, sync)
        compiled_ms = best_ms(lambda: compiled(w, amax), args.repeats, sync)
        verdict = "yes" if differing == 0 else f"NO ({differing}/{len(inputs)} tensors differ)"
        print(f"| {name} | {verdict} | {eager_ms:.2f} | {compiled_ms:.2f} | {eager_ms / compiled_ms:.1f}x |")


if __name__ == "__main__":
    main()
