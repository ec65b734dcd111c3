"""SIGKILL and SIGTERM at seeded random moments of generate, distill and export.

For each stage: one uninterrupted reference run measures the duration D; then the same
command runs again and again in a second output, each run killed (5 x SIGKILL, 5 x SIGTERM,
interleaved) after a seeded delay in [0.05 D, 0.9 D] and resuming from what the previous one
left; a last run finishes.  The result must equal the reference (cache rows and targets,
distill loss curve and weights, export files bit for bit) with no temp file left.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from killing import SIGNALS, Workers, temp_files
from qadpipe.cache import CacheReader

pytestmark = pytest.mark.slow

POINTS = ["SIGKILL", "SIGTERM"] * 5
SEED = 20261123


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    pool = Workers(tmp_path_factory.mktemp("workers"))
    yield pool
    pool.close()


def _config(root: Path, model: Path, out: str, max_steps: int = 12) -> Path:
    config = {
        "model": {"path": str(model), "dtype": "float32"},
        "teacher": {"backend": "hf", "dtype": "float32", "device": "cpu", "batch_size": 2},
        "data": {"source": "random", "random": {"num_sequences": 16, "length": 16, "seed": 5}},
        "cache": {"path": str(root / "cache"), "k": 8, "rows_per_shard": 2},
        "quant": {"group_size": 32, "calibration_batches": 1},
        "distill": {"output_dir": str(root / out / "student"), "max_steps": max_steps, "batch_size": 2, "eval_rows": 2,
                    "save_every": 1, "eval_every": 3, "shuffle_buffer": 4, "log_every": 1, "device": "cpu", "lr": 1e-3,
                    "warmup_steps": 1, "loss_chunk_tokens": 64},
        "export": {"format": "fake", "output_dir": str(root / out / "export")},
    }
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _kill_chain(workers: Workers, args: list[str], duration: float, seed: int,
                after: list | None = None) -> list[tuple[str, float, int]]:
    """Run ``args`` once per kill point (each killed at a seeded delay, counted from the
    start or from ``after[i]()`` first holding), then once to the end."""
    rng = np.random.default_rng(seed)
    outcomes = []
    for index, name in enumerate(POINTS):
        delay = float(rng.uniform(0.05, 0.9)) * duration
        code, _, log = workers.run(args, kill=(SIGNALS[name], delay), after=after[index] if after else None)
        assert "Traceback" not in log, log[-3000:]
        outcomes.append((name, round(delay, 2), code))
    code, _, log = workers.run(args)
    assert code == 0, log[-3000:]
    print(f"{args[0]}: delay scale {duration:.1f} s; kill points (signal, delay s, exit code): {outcomes}")
    return outcomes


def _canonical(cache: Path) -> dict[str, tuple]:
    """Rows by id, top-k entries sorted by (log-prob desc, id): see tests/test_stages.py."""
    out = {}
    for row in CacheReader(str(cache)).iter_sequences():
        order = np.lexsort((row.topk_ids, -row.topk_logprobs), axis=-1)
        out[row.id] = (row.input_ids.tolist(), row.target_start,
                       np.take_along_axis(row.topk_ids, order, -1).tolist(),
                       np.take_along_axis(row.topk_logprobs, order, -1).tolist(), row.tail_mass.tolist())
    return out


def _committed_shards(cache: Path) -> int:
    return sum(len(json.loads(p.read_text())["shards"]) for p in (cache / "manifests").glob("*.json"))


def test_generate_survives_kills(workers, tmp_path, tiny_llama_dir):
    """Like distill's: each kill is timed from the moment the chained run has committed a
    seeded number of shards (8 in all), plus a seeded delay within one shard's time, so the
    kills land mid-run however loaded the machine is."""
    ref, chained = tmp_path / "ref", tmp_path / "chained"
    for root in (ref, chained):
        root.mkdir()
    code, duration, log = workers.run(["generate", "-c", str(_config(ref, tiny_llama_dir, "out"))])
    assert code == 0, log[-3000:]
    shards = sorted(np.random.default_rng(SEED + 2).choice(np.arange(0, 7), size=len(POINTS), replace=True))
    after = [lambda s=int(s): s == 0 or ((chained / "cache" / "manifests").is_dir()
                                       and _committed_shards(chained / "cache") >= s)
             for s in shards]
    outcomes = _kill_chain(workers, ["generate", "-c", str(_config(chained, tiny_llama_dir, "out"))],
                           duration / 8, SEED, after)
    assert sum(code != 0 for name, _, code in outcomes if name == "SIGKILL") >= 4  # the kills did land
    expected, got = _canonical(ref / "cache"), _canonical(chained / "cache")
    assert len(expected) == 16
    assert got == expected  # 0 rows lost, none duplicated, targets identical
    assert temp_files(chained / "cache") == []


@pytest.fixture(scope="module")
def trained(workers, tmp_path_factory, tiny_llama_dir):
    """One cache and an uninterrupted distill + export of it: (root, distill seconds, export seconds)."""
    root = tmp_path_factory.mktemp("distill-ref")
    config = str(_config(root, tiny_llama_dir, "ref"))
    times = []
    for stage in ("generate", "distill", "export"):
        code, seconds, log = workers.run([stage, "-c", config])
        assert code == 0, log[-3000:]
        times.append(seconds)
    return root, times[1], times[2]


def _curve(student: Path) -> list[tuple[int, float]]:
    lines = (student / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def _file_hashes(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


def test_distill_survives_kills(workers, trained, tiny_llama_dir):
    """A resumed run only trains the remaining steps, so a kill is timed from the moment the
    chained run has logged a seeded random step (increasing over the chain), plus a seeded
    delay within one step's time: every kill lands mid-training, at a different step."""
    root, duration, _ = trained
    config = str(_config(root, tiny_llama_dir, "chained", max_steps=12))
    metrics = root / "chained" / "student" / "metrics.jsonl"
    steps = sorted(np.random.default_rng(SEED + 1).choice(np.arange(1, 12), size=len(POINTS), replace=False))
    after = [lambda s=int(s): metrics.is_file() and metrics.read_text().count('"loss"') >= s for s in steps]
    outcomes = _kill_chain(workers, ["distill", "-c", config, "--resume"], 0.5, SEED + 1, after)
    assert sum(code != 0 for _, _, code in outcomes) >= 8
    ref, got = root / "ref" / "student", root / "chained" / "student"
    assert len(_curve(ref)) == 12
    assert _curve(got) == _curve(ref)  # every step's loss, bit for bit
    assert _file_hashes(got / "final", skip=("qadpipe_run.yaml",)) == _file_hashes(ref / "final", skip=("qadpipe_run.yaml",))
    assert temp_files(got) == []


def test_export_survives_kills(workers, trained, tiny_llama_dir, tmp_path):
    """Export leaves no progress to time a kill from, so the delays scale with the shortest of
    its durations: the fixture's, taken minutes earlier, and two measured now.  The fixture's
    alone (the machine busier then, with the other test worker) let 3 of 10 kills land after
    the export had ended."""
    root, _, duration = trained
    final = str(root / "ref" / "student" / "final")
    export = ["export", "-c", str(root / "ref.yaml"), "--checkpoint", final, "--output"]
    for index in range(2):
        code, seconds, log = workers.run([*export, str(tmp_path / f"timed-{index}")])
        assert code == 0, log[-3000:]
        duration = min(duration, seconds)
    out = root / "chained-export"
    outcomes = _kill_chain(workers, [*export, str(out)], duration, SEED + 2)
    assert sum(code != 0 for _, _, code in outcomes) >= 8
    skip = ("qadpipe_run.yaml",)
    assert _file_hashes(out, skip) == _file_hashes(root / "ref" / "export", skip)
    assert temp_files(root) == []
