"""Small random-but-valid cache rows and caches, for tests anywhere in the suite.

``tests/`` is on ``sys.path`` under pytest (rootdir conftest), so any test can do
``from cache_rows import cache_meta, random_rows, write_cache``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qadpipe.cache import CacheMeta, CacheWriter
from qadpipe.targets import TAIL_ID, SequenceTargets, tail_mass_from_logprobs

VOCAB = 49152


def cache_meta(kind: str = "topk", *, k: int = 8, num_samples: int = 50, encoding: str = "compact",
               vocab_size: int = VOCAB, **overrides: Any) -> CacheMeta:
    """Metadata for a synthetic cache (teacher 'synthetic', fixed tokenizer fingerprint)."""
    fields: dict[str, Any] = dict(teacher="synthetic", teacher_revision="", teacher_dtype="float32",
                                  tokenizer_fingerprint="sha256:synthetic", vocab_size=vocab_size,
                                  target_kind=kind, k=k if kind == "topk" else 0,
                                  num_samples=num_samples if kind == "sampled" else 0, encoding=encoding)
    fields.update(overrides)
    return CacheMeta(**fields)


def random_rows(meta: CacheMeta, num_rows: int = 4, *, seq_len: int = 16, target_start: int = 0,
                seed: int = 0, prefix: str = "row") -> list[SequenceTargets]:
    """Rows with random tokens and random (normalised, sorted) teacher distributions.

    Lengths vary between ``seq_len // 2`` and ``seq_len`` so batching code meets ragged rows.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(num_rows):
        length = int(rng.integers(max(seq_len // 2, target_start + 2), seq_len + 1))
        input_ids = rng.integers(0, meta.vocab_size, size=length).astype(np.int32)
        n = length - 1 - target_start
        row = SequenceTargets(id=f"{prefix}-{index:05d}", input_ids=input_ids, target_start=target_start)
        if meta.target_kind == "topk":
            row.topk_ids, row.topk_logprobs = _topk(rng, n, meta.k, meta.vocab_size)
            row.tail_mass = tail_mass_from_logprobs(row.topk_logprobs)
        else:
            row.sample_offsets, row.sample_ids, row.sample_counts = _sampled(rng, n, meta.num_samples,
                                                                            meta.vocab_size)
        rows.append(row)
    return rows


def _topk(rng: np.random.Generator, n: int, k: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(n)]).astype(np.int32)
    logits = np.sort(rng.normal(scale=3.0, size=(n, k + 1)), axis=1)[:, ::-1]
    logits[:, -1] += np.log(1000.0)  # the last bucket stands for the rest of the vocab: the tail
    logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    return ids.reshape(n, k), np.sort(logprobs[:, :k], axis=1)[:, ::-1].astype(np.float32).copy()


def _sampled(rng: np.random.Generator, n: int, num_samples: int,
             vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    offsets, ids, counts = [0], [], []
    for _ in range(n):
        candidates = np.append(rng.choice(vocab, size=20, replace=False), TAIL_ID)
        draws = rng.choice(candidates, size=num_samples, p=rng.dirichlet(np.ones(candidates.size)))
        unique, count = np.unique(draws, return_counts=True)
        ids.append(unique)
        counts.append(count)
        offsets.append(offsets[-1] + unique.size)
    return (np.array(offsets, dtype=np.int64), np.concatenate(ids).astype(np.int32),
            np.concatenate(counts).astype(np.int32))


def write_cache(root: Path | str, meta: CacheMeta, rows: list[SequenceTargets], *, task: str = "task-00000",
                rows_per_shard: int = 2) -> Path | str:
    """Write ``rows`` as one task of a cache at ``root`` and return ``root``."""
    with CacheWriter(str(root), meta, task=task, rows_per_shard=rows_per_shard) as writer:
        for row in rows:
            writer.write(row)
        writer.mark_complete()
    return root
