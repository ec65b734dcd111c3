"""What a cache holds, for ``qadpipe inspect``: sizes, provenance, tail statistics, shard states."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qadpipe.cache import compact
from qadpipe.cache.encoding import column_values
from qadpipe.cache.manifest import load_view
from qadpipe.cache.reader import shard_meta_problem, shard_problem
from qadpipe.cache.schema import CacheMeta
from qadpipe.cache.store import Store
from qadpipe.errors import CacheError, folded
from qadpipe.targets import TAIL_ID


#: A good shard's state in ``--json``: listed, its size and footer as the manifest says ("ok"),
#: and with ``--verify`` its sha256 too ("verified").  Without the hash a same-size corruption
#: cannot be seen, which the text output says beside each such shard.
UNHASHED, VERIFIED = "ok", "verified"


def summarize(root: str, *, rehash: bool = False) -> dict:
    """A JSON-ready summary; shards that fail their checks are reported, not raised."""
    store = Store(root)
    view = load_view(store)
    meta = view.meta
    shards = []
    for task in view.tasks:
        for shard in task.shards:
            problem = shard_problem(store, shard, rehash=rehash)
            shards.append({"name": shard.name, "task": task.task, "rows": shard.rows, "tokens": shard.tokens,
                           "longest_row": shard.longest_row, "bytes": shard.bytes,
                           "state": problem or (VERIFIED if rehash else UNHASHED)})
    tally = TargetTally(meta)
    for shard, info in zip(view.shards, shards):
        if info["state"] not in (UNHASHED, VERIFIED):
            continue
        try:
            table = pq.read_table(store.open_input(shard.name), columns=tally.columns)
            problem = shard_meta_problem(meta, table.schema.metadata, shard.name)
            if problem:   # distill refuses such a shard
                info["state"] = problem
                continue
            shard_tally = TargetTally(meta)   # a shard that fails halfway adds nothing
            for batch in table.to_batches():
                shard_tally.add(batch)
            tally.merge(shard_tally)
        except (pa.ArrowException, OSError, ValueError, CacheError) as exc:
            info["state"] = f"unreadable ({folded(exc)})"
    tokens = sum(s["tokens"] for s in shards)
    total_bytes = sum(s["bytes"] for s in shards)
    return {
        "cache": root,
        "format_version": meta.format_version,
        # null where the kind has no such setting: a top-k cache has no draws, a full-vocab sampled one no k
        "target_kind": meta.target_kind,
        "k": meta.k if meta.target_kind == "topk" or meta.sampled_from == "topk+tail" else None,
        "num_samples": meta.num_samples if meta.target_kind == "sampled" else None, "encoding": meta.encoding,
        "sampled_from": meta.sampled_from, "draw_seed": meta.draw_seed if meta.draw_seed >= 0 else None,
        "teacher": {"name": meta.teacher, "revision": meta.teacher_revision, "dtype": meta.teacher_dtype,
                    "logprobs_mode": meta.logprobs_mode, "temperature": meta.temperature},
        "tokenizer_fingerprint": meta.tokenizer_fingerprint, "vocab_size": meta.vocab_size,
        "data_fingerprint": meta.data_fingerprint,
        "tasks": {"present": [task.task for task in view.tasks], "missing": view.missing_tasks,
                  "incomplete": view.incomplete_tasks, "split_ways": view.split_ways},
        "rows": sum(s["rows"] for s in shards), "tokens": tokens, "bytes": total_bytes,
        # the smallest distill.pack_length that packs every row; null when a manifest predates the field
        "longest_row": None if any(s["longest_row"] is None for s in shards) else max(s["longest_row"] for s in shards),
        "bytes_per_token": total_bytes / tokens if tokens else None,
        "targets": tally.statistics(),
        "shards": shards,
        "bad_shards": [s["name"] for s in shards if s["state"] not in (UNHASHED, VERIFIED)],
    }


class TargetTally:
    """Running target statistics over record batches: tail mass (top-k) or draws (sampled).

    Sums and a histogram of the tail's uint16 codes (:func:`compact.tail_codes`), never the
    positions themselves: a concatenated tail column took ~35 B a position, 70 GB for a cache
    of 1M rows of 2k tokens.  The tail percentiles are exact for a compact cache, which stores
    those codes; a plain cache's are read at the codes' resolution (0.2 % relative)."""

    #: tail code -> tail mass, and the codes in order of increasing mass (decoding is not monotone)
    _MASS = compact.decode_tail_codes(np.arange(2**16))
    _BY_MASS = np.argsort(_MASS, kind="stable")

    def __init__(self, meta: CacheMeta) -> None:
        self.meta = meta
        if meta.target_kind == "topk":
            self.columns = ["tail_mass" if meta.encoding == "plain" else "tail_codes"]
        else:
            self.columns = ["sample_unique", "sample_ids", "sample_counts"]
        self.positions, self.tail_sum, self.unique_ids = 0, 0.0, 0
        self.tail_histogram = np.zeros(2**16, dtype=np.int64)
        self.tail_draws, self.draws = 0, 0

    def add(self, batch: pa.RecordBatch) -> None:
        values = {column: column_values(batch, column, self.meta)[0] for column in self.columns}
        if self.meta.target_kind == "topk":
            if self.meta.encoding == "plain":
                tail = values["tail_mass"]
                codes = compact.tail_codes(tail)
            else:
                codes = values["tail_codes"]
                tail = self._MASS[codes]
            self.positions += tail.size
            self.tail_sum += float(tail.sum())
            self.tail_histogram += np.bincount(codes, minlength=2**16)
            return
        tail_id = TAIL_ID if self.meta.encoding == "plain" else self.meta.vocab_size   # raw column values
        counts = values["sample_counts"].astype(np.int64)
        self.positions += values["sample_unique"].size
        self.unique_ids += int(values["sample_unique"].sum())
        self.tail_draws += int(counts[values["sample_ids"] == tail_id].sum())
        self.draws += int(counts.sum())

    def merge(self, other: "TargetTally") -> None:
        self.positions += other.positions
        self.tail_sum += other.tail_sum
        self.unique_ids += other.unique_ids
        self.tail_histogram += other.tail_histogram
        self.tail_draws += other.tail_draws
        self.draws += other.draws

    def statistics(self) -> dict:
        if not self.positions:
            return {}
        if self.meta.target_kind == "topk":
            return {"tail_mass_mean": self.tail_sum / self.positions,
                    "tail_mass_p5": self._tail_percentile(5), "tail_mass_p50": self._tail_percentile(50)}
        return {"unique_ids_per_position": self.unique_ids / self.positions,
                "tail_draw_fraction": self.tail_draws / max(self.draws, 1)}

    def _tail_percentile(self, q: float) -> float:
        """``np.percentile``'s default (linear) over the tally's tail masses, from the histogram."""
        at = (self.positions - 1) * q / 100
        below, fraction = int(np.floor(at)), at - np.floor(at)
        counts = np.cumsum(self.tail_histogram[self._BY_MASS])
        low, high = (float(self._MASS[self._BY_MASS[np.searchsorted(counts, i, side="right")]])
                     for i in (below, min(below + 1, self.positions - 1)))
        return low + (high - low) * float(fraction)


def render(summary: dict) -> str:
    """The human-readable report."""
    s, teacher = summary, summary["teacher"]
    size = f"k={s['k']}" if s["target_kind"] == "topk" else f"N={s['num_samples']} draws"
    if s["sampled_from"]:
        size += " from the full vocabulary" if s["sampled_from"] == "vocab" else f" from the top-{s['k']} and a tail bucket"
    if s["draw_seed"] is not None:
        size += f" (seed {s['draw_seed']})"
    lines = [
        f"cache       {s['cache']}",
        f"format      v{s['format_version']}, {s['target_kind']} {size}, {s['encoding']} encoding",
        f"teacher     {teacher['name']} (revision {teacher['revision'] or '-'}, {teacher['dtype']}), "
        f"{teacher['logprobs_mode']}, T={teacher['temperature']}",
        f"tokenizer   {s['tokenizer_fingerprint']}, vocab {s['vocab_size']}",
        f"tasks       {_tasks_line(s['tasks'])}",
        f"rows        {s['rows']}{_in_bad_shards(s, 'rows')}",
        f"tokens      {s['tokens']} target positions{_in_bad_shards(s, 'tokens')}",
        f"longest row {s['longest_row']} input tokens (the least distill.pack_length)" if s["longest_row"] is not None
        else "longest row not recorded (manifests written before qadpipe recorded it)",
        f"on disk     {s['bytes'] / 2**20:.2f} MiB, {s['bytes_per_token'] or 0:.1f} bytes/token"
        + (" (as the manifests list them)" if s["bad_shards"] else ""),
    ]
    stats = s["targets"]
    over = " (readable shards only)" if s["bad_shards"] else ""
    if "tail_mass_mean" in stats:
        lines.append(f"tail mass   mean {stats['tail_mass_mean']:.4f}, p5 {stats['tail_mass_p5']:.4f}, "
                     f"p50 {stats['tail_mass_p50']:.4f}{over}")
    elif stats:
        lines.append(f"samples     {stats['unique_ids_per_position']:.1f} unique ids/position, "
                     f"{stats['tail_draw_fraction']:.2%} of draws in the tail{over}")
    lines.append(f"shards      {len(s['shards'])}")
    for shard in s["shards"]:
        state = "size ok, not hashed (--verify)" if shard["state"] == UNHASHED else shard["state"]
        lines.append(f"  {shard['name']}  rows {shard['rows']}  tokens {shard['tokens']}  "
                     f"bytes {shard['bytes']}  {state}")
    return "\n".join(lines)


def _in_bad_shards(summary: dict, field: str) -> str:
    """``", 5 of them in 1 bad shard"``: what the manifests list but cannot be read."""
    bad = [shard for shard in summary["shards"] if shard["name"] in summary["bad_shards"]]
    if not bad:
        return ""
    plural = "s" if len(bad) > 1 else ""
    return f", {sum(shard[field] for shard in bad)} of them in {len(bad)} bad shard{plural} (listed below)"


def _tasks_line(tasks: dict) -> str:
    present, missing, incomplete = len(tasks["present"]), tasks["missing"], tasks["incomplete"]
    line = f"{present} of {present + len(missing)}" if missing else str(present)
    notes = [f"{label}: {_names(names)}" for label, names in
             (("no manifest yet", missing), ("not marked complete: still running, or stopped before their last record", incomplete)) if names]
    if tasks["split_ways"]:
        notes.append(f"written by runs that split the records {' and '.join(map(str, tasks['split_ways']))} ways: some "
                     "records are in no task; regenerate into a new cache with one --num-shards")
    return line + (f" ({'; '.join(notes)})" if notes else "")


def _names(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
