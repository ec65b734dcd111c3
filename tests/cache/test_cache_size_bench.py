"""bench/cache_size.py end to end on real SmolLM2 distributions (slow: a real teacher forward).

Asserts the issue's size/fidelity targets on a small run (sizes are deterministic, not timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "cache_size.py"


@pytest.mark.slow
def test_cache_size_bench_meets_targets_on_real_smollm2(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(BENCH), "--tokens", "2044", "--throughput-copies", "1", "--json", str(out)],
                   check=True, timeout=600)
    results = {(r["targets"], r["encoding"]): r for r in json.loads(out.read_text())["results"]}
    top64 = results[("top-64", "compact")]
    assert top64["bytes_per_token"] <= 128 and top64["bytes_per_token"] <= top64["raw_int32_fp16"] / 3
    assert top64["kl_mean"] <= 1e-4
    assert results[("top-64", "plain")]["max_abs_dlogprob"] == 0.0
    assert results[("sampled N=50", "compact")]["bytes_per_token"] <= 40
    assert results[("sampled N=50", "compact")]["lossless"]
