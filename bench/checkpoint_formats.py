"""What a checkpoint costs rank 0: a full one (gathered there, written by it) vs a sharded one
(``distill.checkpoint_format: sharded``: every rank writes its own shards).

Two CPU processes (gloo) hold the SmolLM2-135M student (W4A16 INT, group 32) under FSDP2 with
AdamW's state initialised by one training step, and save it; ``--rounds`` times each format,
each save in fresh processes (an allocator keeps what an earlier save freed, which would hide
the next one's peak), the order alternating.  Per save: the wall time (barrier to barrier, the
commit included) and each rank's peak host memory above what it held just before (VmHWM,
reset there).  A full checkpoint is 12 bytes per parameter (fp32 weights and two moments)
gathered into rank 0's memory whatever the number of ranks; a sharded one is each rank's 1/N,
written in place from its shards (a tied embedding once, as the trainer writes it).  Run on a GPU cluster, the same script (``--device cuda``
under torchrun with more ranks) measures the host side of a real node.

    .venv/bin/python bench/checkpoint_formats.py            # 2 CPU ranks, 3 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORMATS = ("full", "sharded")


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _reset_peak() -> int:
    """Reset this process's peak resident memory (VmHWM) to its current size; returns that size (KiB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _kib("VmRSS")


def worker(name: str, out: Path) -> None:
    """One save of one format, in fresh processes (memory an earlier save freed would stay in
    the allocator and hide this one's peak); rank 0 writes the ranks' figures to out/result.json."""
    import torch
    import torch.distributed as dist

    from qadpipe.config import load_config
    from qadpipe.distill import distributed as dist_utils
    from qadpipe.distill.checkpoint import TrainerState, commit_sharded_checkpoint, save_checkpoint, staged_step_dir
    from qadpipe.distill.sharded_checkpoint import save_shards
    from qadpipe.distill.student import StudentLoss, build_student
    from qadpipe.models import embedded_smollm2_dir

    env = dist_utils.init_distributed("cpu")
    config = load_config(None, [f"model.path={embedded_smollm2_dir()}", "quant.preset=w4a16_int",
                                "quant.group_size=32"])
    student = build_student(config, env.device)
    model = StudentLoss(student, chunk_tokens=256)
    dist_utils.wrap(model, student.get_decoder().layers, "fsdp2", env)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    model({"input_ids": torch.randint(0, 1000, (1, 64)), "use_cache": False}).logits.float().mean().backward()
    optimizer.step()
    state = TrainerState(step=1, optimizer={}, scheduler={}, loader={})
    dist.barrier()
    before = _reset_peak()
    started = time.perf_counter()
    if name == "full":
        model_state = dist_utils.full_model_state(model)
        state.optimizer = dist_utils.full_optimizer_state(model, optimizer)
        if env.is_main:
            save_checkpoint(out, model_state, state, config)
    else:
        staged = dist_utils.computed_by_main(env.is_main, lambda: staged_step_dir(out, 1))
        save_shards(staged, dist_utils.stored_once(model, dist_utils.local_model_state(model)),
                    dist_utils.local_optimizer_state(model, optimizer))
        if env.is_main:
            commit_sharded_checkpoint(staged, state, config)
    dist.barrier()
    seconds = time.perf_counter() - started
    peaks = dist_utils.all_gather_objects((_kib("VmHWM") - before) / 2**20)
    if env.is_main:
        size = sum(f.stat().st_size for f in (out / "checkpoints").rglob("*") if f.is_file()) / 2**30
        (out / "result.json").write_text(json.dumps({"seconds": seconds, "peaks": peaks, "size": size}))
    dist_utils.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--worker", choices=FORMATS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.out)
        return
    results: dict[str, list[dict]] = {name: [] for name in FORMATS}
    for round_index in range(args.rounds):
        for name in FORMATS if round_index % 2 == 0 else reversed(FORMATS):
            out = Path(tempfile.mkdtemp(prefix="qadpipe-ckpt-bench-"))
            try:
                subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc_per_node={args.ranks}", __file__, f"--worker={name}", f"--out={out}"],
                               check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                results[name].append(json.loads((out / "result.json").read_text()))
            finally:
                shutil.rmtree(out, ignore_errors=True)
            print(f"round {round_index + 1} {name}: {results[name][-1]}", flush=True)
    median = {name: {"seconds": statistics.median(r["seconds"] for r in results[name]),
                     "peaks": [statistics.median(r["peaks"][rank] for r in results[name])
                               for rank in range(args.ranks)],
                     "size": results[name][0]["size"]} for name in FORMATS}
    print(f"\n{args.ranks} CPU ranks, SmolLM2-135M W4A16 under FSDP2, {args.rounds} saves of each format, each in "
          "fresh processes (medians)\n")
    print("| format | checkpoint size | save time | peak host memory above before, by rank |")
    print("|---|---|---|---|")
    for name in FORMATS:
        row = median[name]
        peaks = ", ".join(f"{peak:.2f}" for peak in row["peaks"])
        print(f"| {name} | {row['size']:.2f} GiB | {row['seconds']:.2f} s | {peaks} GiB |")
    full, sharded = median["full"], median["sharded"]
    print(f"\nsharded / full: save time {sharded['seconds'] / full['seconds']:.2f}x, rank 0's peak "
          f"{sharded['peaks'][0]:.2f} GiB vs {full['peaks'][0]:.2f} GiB")


if __name__ == "__main__":
    main()
