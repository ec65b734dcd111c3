"""QAD vs QAT vs PTQ on the real SmolLM2-135M-Instruct, on CPU (issue 6 quality target).

The teacher (vLLM, bf16 with an fp32 head; ``--teacher-backend hf`` without vLLM) writes
answers to the bundled prompts (configs/prompts/demo_prompts.jsonl) and caches its own top-k
distribution over the answers; its W4A16 students (INT4 group 32, NVFP4) are
calibrated (PTQ), then trained for the same steps either with QAD (tail-bucket KL to the
cached targets) or with QAT (cross-entropy on the same tokens).  All of them are scored on
the cache's held-out rows (never trained on) against the full-precision teacher, on the
*full* vocabulary (not the cached top-k): KL(teacher‖student), top-1 agreement, perplexity
of the teacher-written answers -- the positions the students train on (``target_start`` onward).
The same KL over every position, the chat-template prompt included, is printed beside it.

    .venv/bin/python bench/qad_quality.py                     # ~ the issue's run
    .venv/bin/python bench/qad_quality.py --steps 20 --prompts 64   # a quick look

Targets: QAD's held-out KL ≤ 0.6 × PTQ's, and QAD's KL < QAT's after the same steps.
``--qat-lr`` gives QAT its own learning rate (default: ``--lr``), so QAT can be tuned as QAD is.
Resumable: the cache and every finished student are reused, each only if it was made with
the settings asked for now (``<name>.settings.json`` beside it; another workdir otherwise).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from qadpipe.cache import CacheReader
from qadpipe.config import load_config
from qadpipe.distill.student import FINAL_DIR, PTQ_DIR, load_final_student
from qadpipe.distill.trainer import run_distill
from qadpipe.eval.runner import compare_to_teacher
from qadpipe.generate import run_generate
from qadpipe.models import load_causal_lm, load_tokenizer

log = logging.getLogger("qad_quality")

PRESETS = {"int4_g32": ["quant.preset=w4a16_int", "quant.group_size=32"],
           "nvfp4_w4a16": ["quant.preset=nvfp4_a16"]}


def settings(args: argparse.Namespace) -> list[str]:
    work = Path(args.workdir)
    return [
        "model.path=smollm2-135m", f"teacher.backend={args.teacher_backend}", "teacher.enforce_eager=true",
        "teacher.kv_cache_gib=1", "teacher.dtype=bfloat16",
        "data.source=configs/prompts/demo_prompts.jsonl", "data.field=prompt", "data.chat_template=true",
        f"data.limit={args.prompts}", "data.max_length=256", "generate.mode=generate",
        f"generate.max_new_tokens={args.max_new_tokens}", "generate.include_prompt=false",
        f"cache.path={work / 'cache'}", "cache.k=64", "distill.device=cpu", f"distill.batch_size={args.batch}",
        f"distill.max_steps={args.steps}", "distill.warmup_steps=5",
        f"distill.eval_rows={args.eval_rows}", f"distill.eval_every={args.steps}", "distill.log_every=5",
        f"distill.save_every={args.steps}", "distill.loss_chunk_tokens=512",
    ]


def reusable(directory: Path, wanted: dict) -> None:
    """Record the settings that make ``directory`` (in ``<directory>.settings.json`` beside it),
    or refuse to reuse it for other ones: its figures would be printed under the settings
    asked for now."""
    record = directory.with_name(directory.name + ".settings.json")
    if record.is_file():
        made = json.loads(record.read_text())
        changed = {key: (made.get(key), value) for key, value in wanted.items() if made.get(key) != value}
        if changed:
            raise SystemExit(f"{directory}: made with {', '.join(f'{k}={v[0]}' for k, v in changed.items())}, "
                             f"asked for {', '.join(f'{k}={v[1]}' for k, v in changed.items())}; "
                             "use another --workdir, or delete that directory")
    elif directory.exists():   # made before settings were recorded: what made it is unknown
        raise SystemExit(f"{directory}: exists but records no settings; use another --workdir, or delete it")
    else:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(wanted))


def train(args: argparse.Namespace, preset: str, mode: str) -> tuple[Path, float]:
    """Train one student (or reuse it) and return its directory and wall seconds, calibration,
    PTQ eval and saving included: the figure the issue's 20-minute budget is about."""
    lr = args.qat_lr if mode == "qat" else args.lr
    out = Path(args.workdir) / preset / f"{mode}-lr{lr:g}"
    reusable(out, {"steps": args.steps, "batch": args.batch, "lr": lr, "eval_rows": args.eval_rows})
    timing = out / "bench_seconds.json"   # wall seconds over every invocation, an interrupted one's too
    spent = json.loads(timing.read_text())["seconds"] if timing.exists() else 0.0
    if not (out / FINAL_DIR).is_dir():
        started = time.perf_counter()
        try:
            run_distill(load_config(None, settings(args) + PRESETS[preset] + [f"distill.mode={mode}",
                                                                                 f"distill.output_dir={out}",
                                                                                 f"distill.lr={lr}"]),
                        resume=True)  # an interrupted bench continues its run
        finally:
            spent += time.perf_counter() - started
            out.mkdir(parents=True, exist_ok=True)
            timing.write_text(json.dumps({"seconds": spent}))
    seconds = spent if timing.exists() else float("nan")
    log.info("%s %s: %d steps in %.0f s", preset, mode, args.steps, seconds)
    return out, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/bench/qad_quality")
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--qat-lr", type=float, default=None, help="QAT's learning rate (default: --lr)")
    parser.add_argument("--eval-rows", type=int, default=24)
    parser.add_argument("--teacher-backend", default="vllm", choices=["vllm", "hf"],
                        help="writes the cache; hf generates one prompt at a time (slow)")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    args = parser.parse_args()
    args.qat_lr = args.lr if args.qat_lr is None else args.qat_lr
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    work = Path(args.workdir)
    reusable(work / "cache", {"prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
                              "teacher_backend": args.teacher_backend})
    if not (work / "cache" / "manifests").is_dir():
        started = time.perf_counter()
        run_generate(load_config(None, settings(args)))
        log.info("generate: %d prompts in %.0f s", args.prompts, time.perf_counter() - started)

    rows = list(CacheReader(str(work / "cache")).iter_sequences())[: args.eval_rows]
    sequences = [row.input_ids.tolist() for row in rows]
    tokenizer = load_tokenizer("smollm2-135m")
    teacher = load_causal_lm("smollm2-135m", dtype="float32")
    table, whole, seconds = {}, {}, {}
    for preset in args.presets:
        trained = {mode: train(args, preset, mode) for mode in ("qad", "qat")}
        runs = {mode: out for mode, (out, _) in trained.items()}
        seconds[preset] = {mode: s for mode, (_, s) in trained.items()}
        students = {"ptq": load_final_student(runs["qad"] / PTQ_DIR)[0].float(),
                    "qat": load_final_student(runs["qat"] / FINAL_DIR)[0].float(),
                    "qad": load_final_student(runs["qad"] / FINAL_DIR)[0].float()}
        pad_id = tokenizer.pad_token_id or 0
        with torch.no_grad():
            table[preset] = compare_to_teacher(teacher, students, sequences, pad_id=pad_id, cache_rows=rows)
            whole[preset] = compare_to_teacher(teacher, students, sequences, pad_id=pad_id, with_perplexity=False)
    (work / "results.json").write_text(json.dumps({"metrics": table, "all_positions": whole,
                                                   "train_seconds": seconds}, indent=2))

    print(f"\nheld-out: the answers of {len(sequences)} teacher-written sequences (the positions trained on), "
          f"full-vocab KL vs the fp32 teacher; {args.steps} steps x {args.batch} sequences, lr {args.lr} "
          f"(QAT {args.qat_lr}). "
          "Last two columns: every position, the chat-template prompt included (never a training target)")
    print("| format | model | KL | KL / PTQ | top-1 | ppl | train min | all-pos KL | all-pos KL / PTQ |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for preset, results in table.items():
        ptq, ptq_whole = results["ptq"]["kl"], whole[preset]["ptq"]["kl"]
        for name in ("teacher", "ptq", "qat", "qad"):
            r, w = results[name], whole[preset][name]
            minutes = f"{seconds[preset][name] / 60:.1f}" if name in seconds[preset] else ""
            print(f"| {preset} | {name} | {r['kl']:.4f} | {r['kl'] / ptq:.2f} | {r['top1_agreement']:.3f} | "
                  f"{r['ppl']:.2f} | {minutes} | {w['kl']:.4f} | {w['kl'] / ptq_whole:.2f} |")
    for preset, results in table.items():
        ratio = results["qad"]["kl"] / results["ptq"]["kl"]
        print(f"{preset}: QAD KL = {ratio:.2f} x PTQ (target <= 0.6: {'met' if ratio <= 0.6 else 'NOT met'}); "
              f"QAD < QAT: {'yes' if results['qad']['kl'] < results['qat']['kl'] else 'NO'}")


if __name__ == "__main__":
    main()
