"""What a resumed distill run pays to get back to its place in the epoch.

A requeued job resumes at (epoch, batches_done): the loader replays the epoch's shuffle
order and hands out the batches after that point.  The rows trained before it are known
before any is read (the order is drawn on indices), so the cache reader neither reads the
shards that hold only those nor decodes their row groups.  This script times the first
batch of a loader resumed at a fraction of the epoch, side by side in one run:

* ``fresh``: the same loader at the epoch's start (the floor: shuffle buffer fill);
* ``resume, skipping``: resumed as ``qadpipe distill --resume`` does;
* ``resume, decoding all``: resumed through a reader that reads and decodes every row, as
  qadpipe did before it skipped them;
* ``resume on 2 of 4 ranks``: rank 0 of 2 resuming where 4 ranks stopped, each the same
  fraction into its own range: the 4 saved shuffle orders are replayed to find the rows
  they left, which rank 0 then shares with rank 1.

The cache is synthetic (random top-k rows, compact encoding) and written to a temp dir.

    .venv/bin/python bench/resume_skip.py [--rows 8192] [--length 512] [--k 64] [--at 0.9]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any, Callable, Iterator, Optional

import numpy as np

from qadpipe.cache import CacheMeta, CacheReader, CacheWriter
from qadpipe.distill.loader import ROW_SPLIT, TargetLoader, state_on_other_ranks
from qadpipe.targets import SequenceTargets, tail_mass_from_logprobs

VOCAB = 49152


def random_row(rng: np.random.Generator, row_id: str, length: int, k: int) -> SequenceTargets:
    """A row of ``length`` tokens with k distinct, descending-probability targets a position."""
    n = length - 1
    ids = rng.integers(0, VOCAB - k, (n, 1)) + np.arange(k)
    probs = -np.sort(-rng.random((n, k)), axis=1)
    logprobs = np.log(0.9 * probs / probs.sum(1, keepdims=True)).astype(np.float32)
    return SequenceTargets(id=row_id, input_ids=rng.integers(0, VOCAB, length).astype(np.int32), target_start=0,
                           topk_ids=ids.astype(np.int32), topk_logprobs=logprobs,
                           tail_mass=tail_mass_from_logprobs(logprobs))


class DecodingAll:
    """The reader without ``needed``: every row read and decoded, as before the skip."""

    def __init__(self, reader: CacheReader) -> None:
        self.reader, self.num_rows = reader, reader.num_rows

    def iter_rows(self, start: int, end: int, needed: Optional[Callable[[int, int], bool]] = None
                  ) -> Iterator[Optional[SequenceTargets]]:
        return self.reader.iter_rows(start, end)


BATCH = 4


def first_batch_seconds(source: Any, batches_done: int, repeats: int, saved_ranks: int = 1, ranks: int = 1) -> float:
    """Best of ``repeats``: time from creating the loader of rank 0 of ``ranks``, resumed where
    ``saved_ranks`` stopped ``batches_done`` batches into the epoch between them, to its first batch."""
    saved = [{"epoch": 0, "batches_done": batches_done // saved_ranks, "split": ROW_SPLIT, "batch_size": BATCH}
             for _ in range(saved_ranks)]
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        loader = TargetLoader(source, list, batch_size=BATCH, seed=0, shuffle_buffer=256, world_size=ranks)
        loader.load_state_dict(saved[0] if saved_ranks == ranks else state_on_other_ranks(saved, BATCH, "bench"))
        batches = iter(loader)
        next(batches)
        best = min(best, time.perf_counter() - started)
        batches.close()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--length", type=int, default=512, help="tokens a row")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--at", type=float, default=0.9, help="resume point, a fraction of the epoch")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    meta = CacheMeta(teacher="random", teacher_revision="", teacher_dtype="float32", tokenizer_fingerprint="bench",
                     vocab_size=VOCAB, target_kind="topk", k=args.k, num_samples=0, encoding="compact")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="qadpipe-resume-skip-") as root:
        started = time.perf_counter()
        with CacheWriter(root, meta, rows_per_shard=1024) as writer:
            for index in range(args.rows):
                writer.write(random_row(rng, f"row-{index}", args.length, args.k))
            writer.mark_complete()
        reader = CacheReader(root)
        print(f"cache: {args.rows} rows x {args.length} tokens, k={args.k}, {len(reader.shards)} shards, written in "
              f"{time.perf_counter() - started:.1f} s")
        batches_done = int(args.at * args.rows) // BATCH
        fresh = first_batch_seconds(reader, 0, args.repeats)
        skipping = first_batch_seconds(reader, batches_done, args.repeats)
        decoding = first_batch_seconds(DecodingAll(reader), batches_done, args.repeats)
        moved = first_batch_seconds(reader, batches_done, args.repeats, saved_ranks=4, ranks=2)
    print(f"first batch (best of {args.repeats}), resumed {batches_done * BATCH} rows into the epoch:")
    print(f"  {'fresh start':<22} {fresh:7.2f} s")
    print(f"  {'resume, skipping':<22} {skipping:7.2f} s  ({skipping / fresh:.2f}x the fresh start)")
    print(f"  {'resume, decoding all':<22} {decoding:7.2f} s  ({decoding / fresh:.2f}x the fresh start, "
          f"{decoding / skipping:.1f}x skipping)")
    print(f"  {'resume on 2 of 4 ranks':<22} {moved:7.2f} s  ({moved / fresh:.2f}x the fresh start, "
          f"{moved / skipping:.1f}x skipping)")


if __name__ == "__main__":
    main()
