"""A cache writer task for the kill test: writes N synthetic rows, skipping ids already
committed; with --hang-after C it stops after C commits plus one buffered row and sleeps
(so the parent can SIGKILL it mid-shard)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache_rows import cache_meta, random_rows  # noqa: E402
from qadpipe.cache import CacheWriter  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--rows", type=int, default=9)
    parser.add_argument("--hang-after", type=int, default=None)
    args = parser.parse_args()
    meta = cache_meta("topk", k=16)
    writer = CacheWriter(args.root, meta, rows_per_shard=2)
    done = writer.done_ids()
    written = 0
    for row in random_rows(meta, args.rows, seq_len=32):
        if row.id in done:
            continue
        writer.write(row)
        written += 1
        if written == 2 * (args.hang_after or -1) + 1:   # `hang_after` shards committed, one row buffered
            print("HANGING", flush=True)
            time.sleep(600)
    writer.close()
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
