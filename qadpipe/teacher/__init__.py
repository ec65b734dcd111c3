"""Teacher backends (vLLM, transformers) behind one interface: :class:`base.Teacher`."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from qadpipe.errors import ModelError, TeacherError, first_line


@dataclass(frozen=True)
class TeacherInfo:
    """What stage one must know before loading the teacher: its vocab and context sizes."""

    vocab_size: int
    context_length: int
    model_type: str
    head_dim: Optional[int] = None  # attention head size, where the config says (vLLM-CPU supports a few)
    logit_transform_refusal: Optional[str] = None  # a transform after the LM head the HF backend does not apply


#: Positions a backend needs past the longest sequence it scores.  vLLM scores a sequence
#: as a request with ``max_tokens=1`` (it refuses 0), and that generated token needs a place
#: within ``max_model_len``, which vLLM refuses beyond the model's context.
POSITIONS_AFTER_SCORED_SEQUENCE = {"hf": 0, "vllm": 1}


def teacher_info(model_dir: Path, trust_remote_code: bool = False) -> TeacherInfo:
    """Read the teacher's config.json (cheap: no weights)."""
    from qadpipe.models import load_model_config, logit_transform

    config = load_model_config(model_dir, trust_remote_code).get_text_config()
    context = next((getattr(config, name) for name in ("max_position_embeddings", "max_seq_len", "n_positions")
                    if getattr(config, name, None)), None)
    if context is None:
        raise TeacherError(f"{model_dir}/config.json: no max_position_embeddings, cannot check sequence lengths")
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and getattr(config, "num_attention_heads", None) and getattr(config, "hidden_size", None):
        head_dim = config.hidden_size // config.num_attention_heads
    try:
        logit_transform(config, "teacher")
        refusal = None
    except ModelError as exc:
        refusal = str(exc)
    return TeacherInfo(int(config.vocab_size), int(context), str(config.model_type),
                       int(head_dim) if head_dim else None, refusal)


def require_vllm() -> None:
    """Fail with one line when teacher.backend=vllm but no vLLM is importable."""
    if importlib.util.find_spec("vllm") is None:
        raise TeacherError("teacher.backend: got 'vllm', but vLLM is not installed (pip install "
                           "'qadpipe[cpu]' or 'qadpipe[gpu]'), or set teacher.backend=hf")


def check_teacher_can_start(config: Any, model_dir: Path, info: TeacherInfo) -> None:
    """What would stop the configured backend from starting, said before any data is read
    or a cache directory is made: no vLLM, a CUDA device torch does not see, a logit transform
    the HF backend does not apply (from the config alone; HFTeacher checks a forward too), a
    head size vLLM-CPU has no attention kernel for.  ``make_teacher`` comes only after the
    cache is open (a rerun that finds its task done loads no teacher)."""
    if config.teacher.backend == "hf":
        from qadpipe.devices import resolve_device

        resolve_device(config.teacher.device, field="teacher.device")
        if info.logit_transform_refusal:
            raise TeacherError(f"{info.logit_transform_refusal}; use teacher.backend=vllm")
        return
    require_vllm()
    try:
        from vllm.platforms import current_platform
    except Exception as exc:   # installed, but not importable here: a torch it was not built
        # for (ImportError), or no platform it can resolve (its lazy current_platform raises RuntimeError)
        raise TeacherError(f"teacher.backend: got 'vllm', but vLLM does not import ({type(exc).__name__}: "
                           f"{first_line(exc)}); or set teacher.backend=hf") from None

    from qadpipe.teacher.vllm_backend import refuse_unsupported_cpu_head_size

    if current_platform.is_cpu():
        refuse_unsupported_cpu_head_size(str(model_dir), info.head_dim)


def make_teacher(config: Any, model_dir: Path, *, k: int, longest_sequence: int) -> Any:
    """The configured backend, loaded (the vLLM engine starts here)."""
    if config.teacher.backend == "hf":
        from qadpipe.teacher.hf_backend import HFTeacher

        return HFTeacher.from_config(str(model_dir), config.teacher, config.model.trust_remote_code)
    require_vllm()
    from qadpipe.teacher.vllm_backend import VLLMTeacher

    return VLLMTeacher.from_config(str(model_dir), config.teacher, k=k, longest_sequence=longest_sequence,
                                   trust_remote_code=config.model.trust_remote_code)
