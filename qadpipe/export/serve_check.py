"""Serve an exported checkpoint with vLLM once and print what it answers.

``python -m qadpipe.export.serve_check EXPORT_DIR [PROMPT]`` — the last step of ``make demo``:
proof that the directory ``qadpipe export`` wrote is something vLLM loads and runs, not just
files that look right.  A module with a main guard because vLLM spawns its engine process.

On CPU, vLLM's int4 compressed-tensors path defaults to a W4A8 kernel that quantizes the
activations too; ``VLLM_CPU_INT4_W4A8=0`` keeps it weight-only, i.e. what the student was
trained as.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_PROMPT = "Explain photosynthesis to a curious twelve-year-old."


def vllm_engine_args(export_dir: Path) -> dict[str, Any]:
    """What ``vllm.LLM`` must be told to serve ``export_dir`` as it was trained: an export
    whose ``quantization_config`` has a ``kv_cache_scheme`` needs ``kv_cache_dtype="fp8"``
    (without it vLLM keeps a bf16 cache and ignores the checkpoint's k/v scales)."""
    config = json.loads((Path(export_dir) / "config.json").read_text())
    kv_scheme = (config.get("quantization_config") or {}).get("kv_cache_scheme")
    return {"kv_cache_dtype": "fp8"} if kv_scheme else {}


def serve_once(export_dir: Path, prompt: str, max_tokens: int = 48) -> str:
    """Load ``export_dir`` in vLLM, answer ``prompt`` greedily, return the text."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_INT4_W4A8", "0")
    from vllm import LLM, SamplingParams

    from qadpipe.teacher.vllm_backend import shutdown_llm, use_private_ipc_dir

    use_private_ipc_dir()
    llm = LLM(model=str(export_dir), dtype="bfloat16", max_model_len=512, enforce_eager=True,
              **vllm_engine_args(export_dir))
    try:
        messages = [{"role": "user", "content": prompt}]
        (output,) = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
        return output.outputs[0].text
    finally:
        shutdown_llm(llm)


def main(argv: list[str]) -> int:
    if not argv or not Path(argv[0]).is_dir():
        print("usage: python -m qadpipe.export.serve_check EXPORT_DIR [PROMPT]", file=sys.stderr)
        return 2
    export_dir, prompt = Path(argv[0]), (argv[1] if len(argv) > 1 else DEFAULT_PROMPT)
    started = time.perf_counter()
    answer = serve_once(export_dir, prompt)
    print(f"vLLM served {export_dir} ({time.perf_counter() - started:.0f}s incl. engine start)")
    print(f"  prompt: {prompt}\n  answer: {answer.strip()}")
    return 0


if __name__ == "__main__":
    from qadpipe.teacher.vllm_backend import exit_now

    exit_now(main(sys.argv[1:]))
