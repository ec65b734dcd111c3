"""Offline QAD (from a top-k or a sampled cache) vs online QAD (teacher in the loop), side by side.

Same student, same quant recipe, same random-token batches, same trainer: the only
difference is where the targets come from and how the online loss is computed.

* online_full_logits: the teacher (``--dtype``: bf16 on GPU, fp32 on CPU) runs a forward per micro-batch beside the student and
  the loss is the textbook online KD step (what ModelOpt's HF distillation and TRL's GKD
  without Liger compute): both models' full ``[N, vocab]`` logits (the teacher's head in
  ``--dtype``, as those tools run it), an fp32 log-softmax of each over the whole
  vocabulary, ``F.kl_div`` -- today's online tools;
* online:  the same teacher in the loop, through qadpipe's fused chunked head loss (no
  ``[N, vocab]`` tensor at all): a *strong* online baseline, what ``distill.mode=online`` runs;
* topk:    targets from a top-k cache (k=64, tail bucket);
* sampled: targets from a sampled cache (50 draws per position).

The online rows read their tokens from the top-k cache, whose targets the reader decodes and
the trainer then ignores (~1.2M positions/s of decoding: well under 1 % of a step, on the
online side).  The two online rows compute the same loss, up to the full-logits row's bf16 teacher head (their
last-step losses are printed to show it);
the ratios against each say what removing the teacher buys, and what the fused head buys on
top.  Each mode runs in its own process, so its peak memory is its own: CUDA
max_memory_allocated on GPU, peak RSS on CPU (which also counts the Python/torch baseline
every row shares).  A mode that runs out of memory is reported as such, not as a failure of
the bench.  ``--rounds R`` runs every mode R times, the order rotated each round, so a slow
spell of a shared machine does not land on one mode: tokens/s is the median, ratios the
median of each round's paired ratio, peak memory the largest.

    .venv/bin/python bench/distill_vs_online.py                       # CPU, SmolLM2-135M
    python bench/distill_vs_online.py --device cuda --model qwen3-1.7b-random --batch 4 --seq 2048
    python bench/distill_vs_online.py --activation-checkpointing      # the student's layers recomputed
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from random_models import QWEN3_SHAPES, save_random_qwen3

MODES = ("online_full_logits", "online", "topk", "sampled")


def model_dir(name: str, work: Path) -> Path:
    from qadpipe.models import embedded_smollm2_dir

    if name == "smollm2-135m":
        return embedded_smollm2_dir()
    if (Path(name) / "config.json").is_file():
        return Path(name)
    if name not in QWEN3_SHAPES:
        raise SystemExit(f"--model: got {name!r}, expected smollm2-135m, an HF directory or one of "
                         f"{', '.join(QWEN3_SHAPES)}")
    out = work / name
    if not (out / "tokenizer.json").is_file():
        save_random_qwen3(name, out)
    return out


def settings(args: argparse.Namespace, model: Path, mode: str) -> list[str]:
    work = Path(args.workdir)
    kind = "sampled" if mode == "sampled" else "topk"
    rows = args.batch * args.steps + args.batch
    cache = work / f"cache-{model.name}-{kind}-{rows}x{args.seq}"   # one per model and shape: never a stale one
    return [
        f"model.path={model}", f"model.dtype={args.dtype}", "teacher.backend=hf", f"teacher.dtype={args.dtype}",
        f"teacher.device={args.device}", "data.source=random", f"data.random.num_sequences={rows}",
        f"data.random.length={args.seq}", f"data.max_length={args.seq}", f"cache.path={cache}",
        f"cache.target={kind}", "cache.k=64", "cache.num_samples=50",
        "quant.preset=w4a16_int", "quant.group_size=32", f"distill.device={args.device}",
        f"distill.mode={'online' if mode.startswith('online') else 'qad'}",
        f"distill.loss={'sampled_ce' if mode == 'sampled' else 'forward_kl'}",
        f"distill.batch_size={args.batch}", f"distill.max_steps={args.steps}", "distill.log_every=1",
        "distill.eval_rows=0", f"distill.eval_every={args.steps + 1}",
        "distill.lr=1e-5", "distill.warmup_steps=0", "distill.shuffle_buffer=1", "distill.save=false",
        f"distill.activation_checkpointing={str(args.activation_checkpointing).lower()}",
        f"distill.prefetch_batches={args.prefetch_batches}",
        f"distill.output_dir={work / ('student-' + mode)}",
        # today's online tools run the teacher's head in bf16; qadpipe's teacher (and cache) in fp32
        f"teacher.fp32_head={str(mode != 'online_full_logits').lower()}",
    ]


def full_logits_loss_module():
    """``StudentLoss`` computing the online KD step as today's online tools do (see the docstring)."""
    import torch
    import torch.nn.functional as F

    from qadpipe.distill.head_loss import STAT_KEYS
    from qadpipe.distill.student import StudentLoss

    class FullLogitsStudentLoss(StudentLoss):
        def forward(self, inputs, target_mask, targets, spec, teacher_head=None):
            logits = self.student(**inputs).logits[target_mask]          # [N, vocab], kept for backward
            with torch.no_grad():
                teacher_logp = torch.log_softmax(teacher_head(targets.teacher_hidden).float(), dim=-1)
            logp = torch.log_softmax(logits.float(), dim=-1)
            kl = F.kl_div(logp, teacher_logp, log_target=True, reduction="none").sum(-1)
            stats = {key: torch.zeros((), dtype=torch.float64, device=logits.device) for key in STAT_KEYS}
            with torch.no_grad():
                stats["positions"] += kl.shape[0]
                stats["kl_positions"] += kl.shape[0]
                stats["loss"] += kl.double().sum()
                stats["kl"] += kl.double().sum()
                stats["ce"] -= logp.gather(1, targets.next_tokens[:, None]).double().sum()
                stats["top1"] += (logp.argmax(-1) == teacher_logp.argmax(-1)).sum()
            return kl.sum(), stats

    return FullLogitsStudentLoss


def child(args: argparse.Namespace) -> None:
    """One mode in this process: train, then report throughput after warm-up and peak memory."""
    import torch

    from qadpipe.config import load_config
    from qadpipe.distill import trainer
    from qadpipe.distill.observe import METRICS_FILE
    from qadpipe.errors import DistillError

    config = load_config(None, settings(args, Path(args.model_path), args.child))
    shutil.rmtree(config.distill.output_dir, ignore_errors=True)  # this bench's scratch: a fresh run each time
    if args.child == "online_full_logits":
        trainer.StudentLoss = full_logits_loss_module()   # the name the trainer builds its loss module from
    try:
        trainer.run_distill(config)
    except DistillError as exc:
        if not isinstance(exc.__context__, torch.OutOfMemoryError):
            raise
        print(json.dumps({"mode": args.child, "error": "out of memory"}))
        return
    rows = [json.loads(line) for line in (Path(config.distill.output_dir) / METRICS_FILE).read_text().splitlines()]
    timed = [r for r in rows if "loss" in r][args.warmup:]
    tokens = args.batch * args.seq
    seconds = sum(tokens / r["tokens_per_s"] for r in timed)
    print(json.dumps({"mode": args.child, "tokens_per_s": tokens * len(timed) / seconds,
                      "peak_mem_gib": timed[-1]["mem_gib"], "steps_timed": len(timed),
                      "loader_wait": sum(r["loader_wait"] for r in timed) / len(timed),
                      "loss": timed[-1]["loss"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m, a bench/random_models.py shape (" + ", ".join(QWEN3_SHAPES) + "), "
                             "or a local HF directory")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the throughput")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute the student's layers in backward (every mode alike)")
    parser.add_argument("--prefetch-batches", type=int, default=2,
                        help="micro-batches the loader thread reads ahead (0: read in the training loop)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of every mode, order rotated each round")
    parser.add_argument("--workdir", default="runs/bench/distill_vs_online")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.child:
        child(args)
        return

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = model_dir(args.model, work)
    for kind in ("topk", "sampled"):   # a process each: the teacher leaves no memory behind in this one
        overrides = [part for item in settings(args, model, kind) for part in ("--set", item)]
        done = subprocess.run([sys.executable, "-m", "qadpipe.cli", "generate", *overrides],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"generate ({kind}) failed:\n{done.stderr[-3000:]}")
    rounds = []
    for index in range(args.rounds):
        shift = index % len(MODES)
        results = {}
        for mode in MODES[shift:] + MODES[:shift]:
            command = [sys.executable, __file__, *sys.argv[1:], "--child", mode, "--model-path", str(model)]
            done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))  # own peak memory
            for line in done.stderr.splitlines():   # a compiled fake-quant dropped to eager is said, not hidden
                if "differs from eager" in line:
                    print(f"{mode}: {line}", file=sys.stderr, flush=True)
            if done.returncode != 0:
                raise SystemExit(f"{mode} run failed:\n{done.stderr[-3000:]}")
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            # each mode's figures as soon as it ends: a run killed at its time limit keeps them
            print(json.dumps({"round": index + 1, **results[mode]}), flush=True)
            (work / "results.json").write_text(json.dumps(rounds + [results], indent=2))
        rounds.append(results)

    print(f"\n{args.model} on {args.device}, {args.batch} x {args.seq} tokens per step, "
          f"{args.steps - args.warmup} timed steps, W4A16 int4 g32 student"
          f"{', activation checkpointing' if args.activation_checkpointing else ''}, "
          f"loader reading {args.prefetch_batches} micro-batches ahead, {args.rounds} round(s)")
    if model.name.endswith("-random"):
        print("random weights: the teacher's distributions are near-uniform (its top-64 hold ~0.1% of the mass), "
              "so the loss's exact off-S path seldom runs; a trained teacher's targets cost the offline rows a few "
              "percent more (bench/tail_loss_cost.py)")
    print(table(rounds))


def table(rounds: list[dict[str, dict]]) -> str:
    """Tokens/s (median over rounds) and peak memory (largest) of every mode, and their ratios
    to each online row (the median of each round's paired ratio)."""
    def ratio(mode: str, base: str, key: str) -> str:
        pairs = [(r[mode], r[base]) for r in rounds]
        if any("error" in row or "error" in ref for row, ref in pairs):
            return "-"
        return f"{statistics.median(row[key] / ref[key] for row, ref in pairs):.2f}"

    lines = ["| mode | tokens/s | x online | x online full logits | peak memory GiB | x online "
             "| x online full logits | loader wait | last loss |", "|---|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        runs = [r[mode] for r in rounds]
        failed = next((row["error"] for row in runs if "error" in row), None)
        if failed:
            lines.append(f"| {mode} | {failed} | | | | | | | |")
            continue
        tokens = statistics.median(row["tokens_per_s"] for row in runs)
        memory = max(row["peak_mem_gib"] for row in runs)
        wait = statistics.median(row["loader_wait"] for row in runs)
        lines.append(f"| {mode} | {tokens:.0f} | {ratio(mode, 'online', 'tokens_per_s')} | "
                     f"{ratio(mode, 'online_full_logits', 'tokens_per_s')} | {memory:.2f} | "
                     f"{ratio(mode, 'online', 'peak_mem_gib')} | {ratio(mode, 'online_full_logits', 'peak_mem_gib')} | "
                     f"{100 * wait:.1f}% | {runs[-1]['loss']:.5f} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
