"""What a cache holds, for ``qadpipe inspect``: sizes, provenance, tail statistics, shard states."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from qadpipe.cache import compact
from qadpipe.cache.manifest import load_view
from qadpipe.cache.reader import shard_problem
from qadpipe.cache.store import Store
from qadpipe.targets import TAIL_ID


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
                           "bytes": shard.bytes, "state": problem or ("verified" if rehash else "ok")})
    tokens = sum(s["tokens"] for s in shards)
    total_bytes = sum(s["bytes"] for s in shards)
    good = [shard for shard, info in zip(view.shards, shards) if info["state"] in ("ok", "verified")]
    return {
        "cache": root,
        "format_version": meta.format_version,
        "target_kind": meta.target_kind, "k": meta.k, "num_samples": meta.num_samples, "encoding": meta.encoding,
        "teacher": {"name": meta.teacher, "revision": meta.teacher_revision, "dtype": meta.teacher_dtype,
                    "logprobs_mode": meta.logprobs_mode, "temperature": meta.temperature},
        "tokenizer_fingerprint": meta.tokenizer_fingerprint, "vocab_size": meta.vocab_size,
        "data_fingerprint": meta.data_fingerprint,
        "rows": sum(s["rows"] for s in shards), "tokens": tokens, "bytes": total_bytes,
        "bytes_per_token": total_bytes / tokens if tokens else None,
        "targets": _target_statistics(store, meta, good),
        "shards": shards,
        "bad_shards": [s["name"] for s in shards if s["state"] not in ("ok", "verified")],
    }


def _target_statistics(store: Store, meta, shards) -> dict:
    """Tail mass (top-k) or draw statistics (sampled), reading only the needed columns."""
    if meta.target_kind == "topk":
        column = "tail_mass" if meta.encoding == "plain" else "tail_codes"
        parts = [_column(store, shard.name, column) for shard in shards]
        tail = np.concatenate(parts) if parts else np.zeros(0)
        if meta.encoding == "compact":
            tail = compact.decode_tail_codes(tail)
        if not tail.size:
            return {}
        return {"tail_mass_mean": float(tail.mean()), "tail_mass_p5": float(np.percentile(tail, 5)),
                "tail_mass_p50": float(np.percentile(tail, 50))}
    unique = [_column(store, shard.name, "sample_unique") for shard in shards]
    ids = [_column(store, shard.name, "sample_ids") for shard in shards]
    if not unique:
        return {}
    tail_id = TAIL_ID if meta.encoding == "plain" else meta.vocab_size
    all_ids = np.concatenate(ids)
    counts = np.concatenate([_column(store, shard.name, "sample_counts") for shard in shards])
    return {"unique_ids_per_position": float(np.concatenate(unique).mean()),
            "tail_draw_fraction": float(counts[all_ids == tail_id].sum() / max(counts.sum(), 1))}


def _column(store: Store, name: str, column: str) -> np.ndarray:
    table = pq.read_table(store.open_input(name), columns=[column])
    return table.column(column).combine_chunks().values.to_numpy(zero_copy_only=False)


def render(summary: dict) -> str:
    """The human-readable report."""
    s, teacher = summary, summary["teacher"]
    size = f"k={s['k']}" if s["target_kind"] == "topk" else f"N={s['num_samples']} draws"
    lines = [
        f"cache       {s['cache']}",
        f"format      v{s['format_version']}, {s['target_kind']} {size}, {s['encoding']} encoding",
        f"teacher     {teacher['name']} (revision {teacher['revision'] or '-'}, {teacher['dtype']}), "
        f"{teacher['logprobs_mode']}, T={teacher['temperature']}",
        f"tokenizer   {s['tokenizer_fingerprint']}, vocab {s['vocab_size']}",
        f"rows        {s['rows']}",
        f"tokens      {s['tokens']} target positions",
        f"on disk     {s['bytes'] / 2**20:.2f} MiB, {s['bytes_per_token'] or 0:.1f} bytes/token",
    ]
    stats = s["targets"]
    if "tail_mass_mean" in stats:
        lines.append(f"tail mass   mean {stats['tail_mass_mean']:.4f}, p5 {stats['tail_mass_p5']:.4f}, "
                     f"p50 {stats['tail_mass_p50']:.4f}")
    elif stats:
        lines.append(f"samples     {stats['unique_ids_per_position']:.1f} unique ids/position, "
                     f"{stats['tail_draw_fraction']:.2%} of draws in the tail")
    lines.append(f"shards      {len(s['shards'])}")
    for shard in s["shards"]:
        lines.append(f"  {shard['name']}  rows {shard['rows']}  tokens {shard['tokens']}  "
                     f"bytes {shard['bytes']}  {shard['state']}")
    return "\n".join(lines)
