"""``distill.temperature`` on a top-k cache: the demo recipe trained at each τ, side by side.

The README's "distill" paragraph quotes these figures.  Each τ trains the demo's INT4 student
(configs/demo.yaml: the same cache, lr, steps and seed) into ``<workdir>/tau<τ>``; the table is
each run's last held-out evaluation (the cache rows ``distill.eval_rows`` keeps out of
training), read from its metrics.jsonl:

- the tail-bucket KL and top-1 agreement to the cached teacher, always at τ = 1 whatever τ
  trained (a tempered loss is not comparable across τ);
- the perplexity of the data tokens;
- the student's probability mass on the teacher's top-k beside the teacher's own.  A τ
  handling that under-states the teacher's tail shows here first: the student's mass runs
  above the teacher's (it starves the tail) while its KL stalls.

    .venv/bin/python bench/temperature.py                      # τ = 1 and 2: ~5 min each on 2 cores
    .venv/bin/python bench/temperature.py --temperatures 1 2 4

The demo's cache is made first (vLLM on CPU, ~2 min) unless ``make demo`` already made it:
generate skips the records its shards hold.  An interrupted run resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from qadpipe.config import load_config
from qadpipe.distill.trainer import run_distill
from qadpipe.generate import run_generate

log = logging.getLogger("temperature")


def last_eval(metrics: Path) -> dict[str, float]:
    """The last held-out evaluation a run logged."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    evals = [record for record in records if record.get("tag") == "eval"]
    if not evals:
        raise SystemExit(f"{metrics}: no held-out evaluation logged; is distill.eval_rows > 0?")
    return evals[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--workdir", default="runs/bench/temperature")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    run_generate(load_config(args.config, []))
    figures = {}
    for tau in args.temperatures:
        out = Path(args.workdir) / f"tau{tau:g}"
        # resume=True: an interrupted bench continues; a finished run only reloads its checkpoint
        run_distill(load_config(args.config, [f"distill.temperature={tau}", f"distill.output_dir={out}"]),
                    resume=True)
        figures[tau] = last_eval(out / "metrics.jsonl")

    reference = figures[args.temperatures[0]]["eval_kl"]
    print(f"\n{args.config}: held-out cache rows, figures at τ = 1 after step {figures[args.temperatures[0]]['step']}"
          f"; KL ratio against τ = {args.temperatures[0]:g}")
    print("| τ | tail-bucket KL | KL ratio | top-1 | ppl | student top-k mass | teacher top-k mass |\n"
          "|---|---|---|---|---|---|---|")
    for tau, record in figures.items():
        print(f"| {tau:g} | {record['eval_kl']:.4f} | {record['eval_kl'] / reference:.2f} | {record['eval_top1']:.3f} "
              f"| {record['eval_ppl']:.2f} | {record['eval_topk_mass_student']:.3f} "
              f"| {record['eval_topk_mass_teacher']:.3f} |")


if __name__ == "__main__":
    main()
