"""How long training waits for its checkpoints: a synchronous save vs one written in the background.

A checkpoint (fp32 weights and AdamW's two moments: 12 bytes a parameter) is taken at the end
of a step.  With ``distill.save_in_background=false`` every rank waits while rank 0 writes it
(sharded: while every rank writes its shards); with ``true`` (the default) the loop waits for
the snapshot (and for the previous checkpoint's write, if still under way), and rank 0 (every
rank) writes it on a thread while the next steps train.

Side by side in one run, on the same cache and config, ``--rounds`` times with the order
rotated: for each mode the loop's mean wait per checkpoint (the time spent in the trainer's
``save_checkpoint``, plus the wait for the last write before ``final/``) and the training
wall time.  On a machine with few cores the writer thread takes CPU from the training
threads, so the wall time gains less than the wait does; on a GPU node training runs on the
GPUs and the host's cores are idle.  The last write before ``final/`` is always waited for
whole, and it counts in the mean: with fewer than ~6 steps it dominates (3 steps measured the
background mode at 1.21x the synchronous wait).

    .venv/bin/python bench/checkpoint_stall.py                  # CPU, SmolLM2-135M, 6 steps, a save each
    .venv/bin/python bench/checkpoint_stall.py --checkpoint-format sharded
    .venv/bin/python bench/checkpoint_stall.py --model qwen3-1.7b-random --device cuda --steps 10
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from distill_vs_online import model_dir
from random_models import QWEN3_SHAPES

MODES = ("synchronous", "background")


def settings(args: argparse.Namespace, model: Path, cache: Path) -> list[str]:
    return [f"model.path={model}", "teacher.backend=hf", f"teacher.dtype={args.dtype}", f"teacher.device={args.device}",
            "data.source=random", f"data.random.num_sequences={args.batch * (args.steps + 1)}",
            f"data.random.length={args.seq}", f"data.max_length={args.seq}", f"cache.path={cache}", "cache.k=64",
            "quant.preset=w4a16_int", "quant.group_size=32", "quant.calibration_batches=1",
            f"model.dtype={args.dtype}", f"distill.device={args.device}", f"distill.batch_size={args.batch}",
            f"distill.max_steps={args.steps}", "distill.save_every=1", "distill.eval_rows=0",
            f"distill.eval_every={args.steps + 1}", "distill.log_every=1", "distill.warmup_steps=0",
            "distill.shuffle_buffer=1", "distill.lr=1e-5", f"distill.checkpoint_format={args.checkpoint_format}"]


def timed_run(config, output_dir: Path) -> dict[str, float]:
    """Train once; the seconds the loop spent waiting for checkpoints, and in all."""
    from qadpipe.distill import trainer
    from qadpipe.distill.background_save import BackgroundWriter
    from qadpipe.distill.checkpoint import latest_checkpoint

    waits: list[float] = []   # each save's, the finish() of the write before it included
    outside = {"seconds": 0.0, "in_save": False}   # the wait for the last write, before final/
    save, finish = trainer.DistillRecipe.save_checkpoint, BackgroundWriter.finish

    def timed_save(self, window):
        started, outside["in_save"] = time.perf_counter(), True
        try:
            save(self, window)
        finally:
            outside["in_save"] = False
        waits.append(time.perf_counter() - started)

    def timed_finish(self):
        started = time.perf_counter()
        finish(self)
        if not outside["in_save"]:
            outside["seconds"] += time.perf_counter() - started

    trainer.DistillRecipe.save_checkpoint, BackgroundWriter.finish = timed_save, timed_finish
    try:
        recipe = trainer.DistillRecipe(config)
        try:
            recipe.setup()
            started = time.perf_counter()
            result = recipe.train()
            wall = time.perf_counter() - started
        finally:
            recipe.cleanup()
    finally:
        trainer.DistillRecipe.save_checkpoint, BackgroundWriter.finish = save, finish
    assert result.status == "done", result
    last = latest_checkpoint(output_dir)
    size = sum(path.stat().st_size for path in last.rglob("*") if path.is_file())
    return {"wait": (sum(waits) + outside["seconds"]) / len(waits), "wall": wall, "saves": len(waits),
            "size_gb": size / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m",
                        help=f"smollm2-135m, an HF directory, or one of {', '.join(QWEN3_SHAPES)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--checkpoint-format", choices=("full", "sharded"), default="full",
                        help="sharded: every rank (here the one process) writes its shards, staged on the host "
                             "first when written in the background")
    parser.add_argument("--workdir", default=None, help="kept between runs (the cache); default: a temp dir")
    args = parser.parse_args()
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")

    from qadpipe.config import load_config
    from qadpipe.generate import run_generate

    work = Path(args.workdir or tempfile.mkdtemp(prefix="qadpipe-ckpt-stall-"))
    if not args.workdir:   # its checkpoints take gigabytes: gone with the run, however it ends
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    model = model_dir(args.model, work)
    cache = work / f"cache-{model.name}-{args.steps}x{args.batch}x{args.seq}"
    base = settings(args, model, cache)
    if not cache.is_dir():
        run_generate(load_config(None, base))
    figures: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for round_index in range(args.rounds):
        for mode in MODES[round_index % 2:] + MODES[:round_index % 2]:
            out = work / f"student-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            config = load_config(None, [*base, f"distill.output_dir={out}",
                                        f"distill.save_in_background={mode == 'background'}"])
            figures[mode].append(timed_run(config, out))
            print(f"round {round_index + 1} {mode}: {figures[mode][-1]}", flush=True)
    sync, background = ({key: statistics.median(run[key] for run in figures[mode]) for key in ("wait", "wall")}
                        for mode in MODES)
    size = figures["synchronous"][0]["size_gb"]
    print(f"\n{args.model} on {args.device}, {args.steps} steps of {args.batch}x{args.seq} tokens, a "
          f"{args.checkpoint_format} checkpoint ({size:.2f} GB) after each; medians of {args.rounds} round(s)\n")
    print("| mode | loop waits per checkpoint (s) | training wall (s) |\n|---|---|---|")
    for mode, row in zip(MODES, (sync, background)):
        print(f"| {mode} | {row['wait']:.2f} | {row['wall']:.1f} |")
    print(f"\nbackground / synchronous: wait {background['wait'] / sync['wait']:.2f}x, "
          f"wall {background['wall'] / sync['wall']:.2f}x")


if __name__ == "__main__":
    main()
