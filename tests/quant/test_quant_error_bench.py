"""bench/quant_error.py end to end on real SmolLM2 (slow: real weights, a real forward).

The bench once broke silently when the metrics API it calls changed; this run keeps it runnable
and checks what its table must show whatever the text: the unquantized-like 8-bit weights sit far
closer to the teacher than ternary ones."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "quant_error.py"


@pytest.mark.slow
def test_quant_error_bench_prints_a_row_per_preset():
    run = subprocess.run([sys.executable, str(BENCH), "--presets", "w8a16_int", "ternary_twn", "--windows", "1",
                          "--calib", "1", "--length", "64"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| (\w+) \| [^|]+ \| [^|]+ \| ([0-9.]+) \|",
                                                                run.stdout, re.M)}
    assert set(rows) == {"w8a16_int", "ternary_twn"}
    assert 0 <= rows["w8a16_int"] < 0.05 < 1.0 < rows["ternary_twn"]
