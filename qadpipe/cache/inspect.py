"""What a cache holds, for ``qadpipe inspect``: sizes, provenance, tail statistics, shard states."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qadpipe.cache import compact
from qadpipe.cache.encoding import column_values
from qadpipe.cache.manifest import load_view
from qadpipe.cache.reader import shard_problem
from qadpipe.cache.schema import CacheMeta
from qadpipe.cache.store import Store
from qadpipe.errors import folded
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
    columns = _statistics_columns(meta)
    values: dict[str, list[np.ndarray]] = {column: [] for column in columns}
    for shard, info in zip(view.shards, shards):
        if info["state"] not in (UNHASHED, VERIFIED):
            continue
        try:
            table = pq.read_table(store.open_input(shard.name), columns=columns)
            for column in columns:
                values[column].extend(column_values(batch, column, meta)[0] for batch in table.to_batches())
        except (pa.ArrowException, OSError, ValueError) as exc:
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
        "sampled_from": meta.sampled_from,
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
        "targets": _target_statistics(meta, {c: np.concatenate(v) for c, v in values.items() if v}),
        "shards": shards,
        "bad_shards": [s["name"] for s in shards if s["state"] not in (UNHASHED, VERIFIED)],
    }


def _statistics_columns(meta: CacheMeta) -> list[str]:
    if meta.target_kind == "topk":
        return ["tail_mass" if meta.encoding == "plain" else "tail_codes"]
    return ["sample_unique", "sample_ids", "sample_counts"]


def _target_statistics(meta: CacheMeta, values: dict[str, np.ndarray]) -> dict:
    """Tail mass (top-k) or draw statistics (sampled) over the readable shards."""
    if not values:
        return {}
    if meta.target_kind == "topk":
        tail = values["tail_mass"] if meta.encoding == "plain" else compact.decode_tail_codes(values["tail_codes"])
        return {"tail_mass_mean": float(tail.mean()), "tail_mass_p5": float(np.percentile(tail, 5)),
                "tail_mass_p50": float(np.percentile(tail, 50))}
    tail_id = TAIL_ID if meta.encoding == "plain" else meta.vocab_size   # raw column values
    counts = values["sample_counts"]
    return {"unique_ids_per_position": float(values["sample_unique"].mean()),
            "tail_draw_fraction": float(counts[values["sample_ids"] == tail_id].sum() / max(counts.sum(), 1))}


def render(summary: dict) -> str:
    """The human-readable report."""
    s, teacher = summary, summary["teacher"]
    size = f"k={s['k']}" if s["target_kind"] == "topk" else f"N={s['num_samples']} draws"
    if s["sampled_from"]:
        size += " from the full vocabulary" if s["sampled_from"] == "vocab" else f" from the top-{s['k']} and a tail bucket"
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
