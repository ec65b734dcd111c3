"""Helpers for the stage-two tests (importable: pytest puts tests/distill on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path


def settings(model_dir: Path, cache: Path, *extra: str) -> list[str]:
    """--set overrides shared by the stage-two tests: tiny model, fp32 teacher, small steps."""
    return [f"model.path={model_dir}", f"cache.path={cache}", "teacher.backend=hf", "teacher.dtype=float32",
            "data.random.num_sequences=24", "data.random.length=24", "cache.k=16", "quant.group_size=32",
            "distill.device=cpu", "distill.batch_size=4", "distill.eval_rows=4", "distill.warmup_steps=1",
            "distill.lr=1e-4", "distill.log_every=1", "distill.loss_chunk_tokens=32", *extra]


def make_cache(root: Path, model_dir: Path, *extra: str) -> Path:
    from qadpipe.config import load_config
    from qadpipe.generate import run_generate

    cache = root / "cache"
    run_generate(load_config(None, settings(model_dir, cache, *extra)))
    return cache


def metrics(out: Path) -> list[dict]:
    """Every row of a run's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
