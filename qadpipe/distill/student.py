"""The fake-quantized student: how it is built, its training forward, and the final layout.

``<distill.output_dir>/final/`` is what ``qadpipe export`` reads (``ptq/``, the calibrated
student before training, has the same layout and is what ``qadpipe eval`` calls the PTQ
baseline)::

    final/model.safetensors   the student's state_dict: weights AND quantizer state
                              (tied aliases dropped; the metadata key "aliases" lists them)
    final/qadpipe_run.yaml    resolved config (model.path, quant.*) + package versions

To rebuild the trained student: the model of ``model.path`` built on the meta device →
``apply_recipe(model, quant)`` → ``load_state_dict(final/model.safetensors, assign=True)`` —
which :func:`load_final_student` does (the base model's weights are never read: ``final/``
holds them all, trained).  Master weights are kept in fp32 whatever ``model.dtype`` says: at
QAD learning rates (1e-5 relative to weights of ~1e-2) an update is below bf16's resolution
and would round away; ``model.dtype`` is the autocast compute dtype on GPU.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file
from torch import nn

from qadpipe.distill.checkpoint import MODEL_FILE, write_student_dir
from qadpipe.distill.head_loss import LossSpec, PositionTargets, head_loss, split_lm
from qadpipe.distill.sharded_checkpoint import MODEL_SHARDS, is_sharded, load_shards
from qadpipe.errors import ConfigError, DistillError, ModelError, first_line
from qadpipe.models import logit_transform
from qadpipe.provenance import RUN_FILE, read_run_record

log = logging.getLogger(__name__)

FINAL_DIR = "final"
#: The calibrated student before any training (the PTQ baseline), in the same layout.
PTQ_DIR = "ptq"


def build_student(config: Any, device: torch.device, *, rebuild: bool = False, packed: bool = False) -> nn.Module:
    """The student from ``model.path`` with the quant recipe applied (fp32 master weights).
    ``rebuild``: a student already trained with this recipe (see :func:`apply_recipe`);
    ``packed``: it will train on packed rows, which its attention must keep apart."""
    from qadpipe.models import check_logits_are_head_of_hidden, check_packed_rows_are_isolated, load_causal_lm
    from qadpipe.quant.recipe import apply_recipe

    model = load_causal_lm(config.model.path, dtype="float32", trust_remote_code=config.model.trust_remote_code)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        check_weights_fit(sum(p.numel() * p.element_size() for p in model.parameters()), free, device)
    model.to(device)
    check_logits_are_head_of_hidden(model, "model.path")   # before the recipe: no range to calibrate yet
    if packed:   # before it too: a per-tensor activation scale mixes the rows of any batch, packed or padded
        check_packed_rows_are_isolated(model, "model.path")
    apply_recipe(model, config.quant, rebuild=rebuild)
    return model.to(device)


def build_student_skeleton(config: Any) -> nn.Module:
    """The student's modules with the quant recipe applied, its parameters and the recipe's
    state on the meta device: every shape and name, no value.  What each rank of a sharded
    build (FSDP2 under torchrun) shards before it holds a weight; the values are rank 0's
    :func:`build_student` on the host (see :func:`~qadpipe.distill.distributed.load_sharded_from_main`),
    which also made the recipe's checks and its weight-derived state (ranges, LSQ steps): the
    skeleton's recipe is applied as a rebuild, refusing nothing rank 0 has not refused already,
    or a sharded checkpoint's.  The model's own buffers are real: those outside the state dict
    (rotary frequencies) come from the config, so a resume from shards needs no whole student."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from qadpipe.models import load_model_config, resolve_model_path
    from qadpipe.quant.recipe import apply_recipe

    path = resolve_model_path(config.model.path)
    trust = config.model.trust_remote_code
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(load_model_config(path, trust), dtype=torch.float32,
                                                     trust_remote_code=trust)
        model.tie_weights()   # init_empty_weights re-registers each parameter: a tied head came apart
    except Exception as exc:   # an architecture whose init computes on its weights' values
        raise ModelError(f"model.path: {path} cannot be built on the meta device for distill.distributed: fsdp2's "
                         f"sharded build ({type(exc).__name__}: {first_line(exc)}); use distill.distributed: ddp, "
                         "which builds the whole student on each GPU") from None
    apply_recipe(model, config.quant, rebuild=True)
    return model.eval()


def check_weights_fit(weight_bytes: int, free_bytes: int, device: torch.device, shards: int = 1) -> None:
    """Refuse, before the copy, a student whose fp32 weights (their 1/``shards``, FSDP2's
    sharded build) exceed the GPU's free memory: such a run could only fail, with a CUDA
    out-of-memory error, after minutes of loading."""
    need = weight_bytes / shards
    if need <= free_bytes:
        return
    if shards == 1:
        raise DistillError(f"model.path: the student's fp32 weights take {weight_bytes / 2**30:.1f} GiB, more than "
                           f"the {free_bytes / 2**30:.1f} GiB free on {device}; without FSDP2 each process holds the "
                           "whole student (4 bytes per parameter): set distill.distributed: fsdp2 under torchrun to "
                           "shard it over the GPUs, or use a larger GPU")
    raise DistillError(f"model.path: the student's fp32 weights take {weight_bytes / 2**30:.1f} GiB, "
                       f"{need / 2**30:.1f} GiB a GPU over {shards} ranks, more than the {free_bytes / 2**30:.1f} GiB "
                       f"free on {device}; run on more GPUs (torchrun --nnodes, --nproc_per_node)")


def enable_activation_checkpointing(student: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (``distill.activation_checkpointing``).

    What it buys: without it the backward keeps every layer's intermediates (attention,
    MLP, and the fake-quant's saved tensors) for the whole micro-batch; with it, one layer's
    input per layer, at the price of a second forward through each layer.  Non-reentrant,
    PyTorch's recommended kind (the reentrant one yields parameter gradients only when a
    layer's input requires grad, which ``trainable: quant``'s frozen embeddings would break
    but for a hook transformers adds).  Fake-quant is deterministic, so the recomputed forward
    is the one that ran."""
    if not getattr(student, "supports_gradient_checkpointing", False):
        raise DistillError(f"distill.activation_checkpointing: {type(student).__name__} does not support "
                           "activation checkpointing; set it to false")
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class StudentLoss(nn.Module):
    """Student forward for training: base → hidden states at target positions → fused head
    loss.  One module so DDP/FSDP2 wrap (and unshard) everything the step touches."""

    def __init__(self, student: nn.Module, chunk_tokens: int) -> None:
        super().__init__()
        split_lm(student)  # no decoder/LM-head split: refused now, not at the first step
        self.student = student  # the only submodule: state_dict keys are "student." + HF names
        self.chunk_tokens = chunk_tokens
        self.logit_transform = logit_transform(student.config)

    def forward(self, inputs: dict[str, Any], target_mask: Optional[torch.Tensor] = None,
                targets: Optional[PositionTargets] = None, spec: Optional[LossSpec] = None,
                teacher_head: Optional[nn.Module] = None) -> Any:
        """The summed loss and its figures; without ``target_mask``, the student's plain forward
        (calibration's), run here so that FSDP2's root gathers the embeddings and head for it."""
        if target_mask is None:
            return self.student(**inputs)
        base, head = self.student.get_decoder(), self.student.get_output_embeddings()
        hidden = base(**inputs).last_hidden_state[target_mask]
        return head_loss(hidden, head, targets, spec, self.chunk_tokens, teacher_head, self.logit_transform)


def save_student(output_dir: Path, model_state: dict[str, torch.Tensor], config: Any,
                 name: str = FINAL_DIR, cache_fingerprint: str = "", **facts: Any) -> Path:
    """Write ``<output_dir>/<name>/`` whole (temp dir → rename), replacing an older one.  Its
    run record keeps the fingerprint of the cache contents it trained on ("" without a cache),
    by which eval knows whether a cache's held-out rows are really unseen, and ``facts``
    (a resumed run's history)."""
    return write_student_dir(Path(output_dir), name, model_state, config, cache_fingerprint, facts=facts)


def load_state_into(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path, *,
                    assign: bool = False) -> None:
    """Load saved tensors (tied aliases restored by the model itself); every key must match.
    ``assign``: the tensors *become* the model's (cast to its dtypes), as a skeleton built on
    the meta device (:func:`build_student_skeleton`) needs; its tied aliases are re-tied."""
    expected = set(model.state_dict())
    tied = _tied_names(model)
    saved = set(tensors)
    missing = sorted(name for name in expected - saved if not (tied.get(name, set()) & saved))
    unexpected = sorted(saved - expected)
    if missing or unexpected:
        raise DistillError(f"{source}: state does not fit the student built from the config "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if not assign:
        model.load_state_dict(tensors, strict=False)
        return
    own = model.state_dict()
    model.load_state_dict({name: tensor.to(own[name].dtype) for name, tensor in tensors.items()}, strict=False,
                          assign=True)
    for name, others in tied.items():   # an alias still names its skeleton's meta parameter
        if name not in saved:
            holder = model.get_parameter(next(iter(others & saved)))
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, holder)


def _tied_names(model: nn.Module) -> dict[str, set[str]]:
    """name -> the other names of the same parameter object (tied embeddings), for tied ones."""
    groups: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), set()).add(name)
    return {name: names - {name} for names in groups.values() if len(names) > 1 for name in names}


def has_student_weights(path: Path) -> bool:
    """Whether ``path`` holds a student's tensors: ``model.safetensors``, or the shards of a
    sharded checkpoint."""
    return (Path(path) / MODEL_FILE).is_file() or is_sharded(Path(path))


def is_student_dir(path: Path) -> bool:
    """Whether ``path`` holds a student in the ``final/`` layout, or a checkpoint (vs an HF checkpoint)."""
    return has_student_weights(path) and (Path(path) / RUN_FILE).is_file() \
        and not (Path(path) / "config.json").is_file()


def trained_cache_fingerprint(final_dir: Path) -> Optional[str]:
    """The cache fingerprint a student's run record holds (None: written before qadpipe kept it)."""
    return (read_run_record(final_dir) or {}).get("cache_fingerprint")


def recorded_run_config(directory: Path) -> dict[str, Any]:
    """The ``config`` mapping of the run record in a student or checkpoint ``directory``, as
    written (one line naming the file when it is missing or damaged)."""
    import yaml

    run_file = Path(directory) / RUN_FILE
    try:
        config = yaml.safe_load(run_file.read_text())["config"]
    except (OSError, yaml.YAMLError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise DistillError(f"{run_file}: not a qadpipe run record with a config ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise DistillError(f"{run_file}: not a qadpipe run record with a config (config: "
                           f"{type(config).__name__}, expected a mapping)")
    return config


def trained_config(final_dir: Path) -> Any:
    """The config a student in the ``final/`` layout was trained with (its run record), its
    ``model.path`` naming the model it was built from (see :func:`located_base_model`)."""
    from qadpipe.config import build_config, recorded_config

    final_dir = Path(final_dir)
    run_file = final_dir / RUN_FILE
    if not has_student_weights(final_dir) or not run_file.is_file():
        raise DistillError(f"{final_dir}: expected {MODEL_FILE} (or a sharded checkpoint's {MODEL_SHARDS}/) and "
                           f"{RUN_FILE} (a distill final/ directory)")
    try:
        config = build_config(recorded_config(recorded_run_config(final_dir)))
    except ConfigError as exc:   # a field this qadpipe no longer has, or no longer accepts: not the user's config
        raise DistillError(f"{run_file}: the recorded config does not load in this qadpipe version "
                           f"({exc})") from None
    path = located_base_model(read_run_record(final_dir) or {}, config.model.path, run_file)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, path=path))


#: Run-record fact: the model a student is built from, as the directory ``model.path`` named
#: when the run started (absolute, links resolved) and its :func:`~qadpipe.models.content_revision`
#: (a hub snapshot and a node-local copy of it are one model).  A relative
#: ``model.path`` names another directory from another working directory, and a directory can
#: be replaced in place: the trained weights loaded into another model would score as garbage,
#: or, same shapes, quietly wrong.
BASE_MODEL = "base_model"


def base_model_fact(model_path: str) -> dict[str, str]:
    """The :data:`BASE_MODEL` fact for ``model.path`` as it resolves now."""
    from qadpipe.models import content_revision, resolve_model_path

    directory = resolve_model_path(model_path).resolve()
    return {"dir": str(directory), "revision": content_revision(directory)}


def located_base_model(record: dict[str, Any], model_path: str, run_file: Path) -> str:
    """The ``model.path`` to rebuild a recorded student from: ``model_path`` (the recorded one)
    while it still names the model the run started from; else the directory it named then, if
    that still holds the model (a relative path, read from another working directory);
    DistillError otherwise.  A record from before qadpipe kept the fact: ``model_path``."""
    from qadpipe.models import content_revision, resolve_model_path

    base = record.get(BASE_MODEL)
    if not isinstance(base, dict) or not isinstance(base.get("dir"), str) or not isinstance(base.get("revision"), str):
        return model_path
    try:
        here: Optional[Path] = resolve_model_path(model_path).resolve()
        if content_revision(here) == base["revision"]:
            return model_path
    except (ModelError, OSError):
        here = None
    recorded = Path(base["dir"])
    try:   # where model.path still names that directory, its files were just hashed
        kept = recorded != here and (recorded / "config.json").is_file() \
            and content_revision(recorded) == base["revision"]
    except OSError:
        kept = False
    if kept:
        log.warning("%s: model.path '%s' names %s from here, not the model the student was trained from; it is "
                    "rebuilt from %s, where that model still is", run_file, model_path,
                    here or "no model directory", recorded)
        return str(recorded)
    raise DistillError(f"{run_file}: the student was trained from the model at {recorded} (revision "
                       f"{base['revision']}), which neither that directory nor model.path '{model_path}' "
                       f"({here or 'no model directory'} from here) holds now; put that model back at {recorded}")


def load_final_student(final_dir: Path, device: str = "cpu", config: Optional[Any] = None) -> tuple[nn.Module, Any]:
    """The trained student and the config it was trained with (``config``: already read by
    :func:`trained_config`), from ``final/``."""
    final_dir = Path(final_dir)
    config = config if config is not None else trained_config(final_dir)
    if is_sharded(final_dir):
        model = build_student(config, torch.device(device), rebuild=True)
        load_sharded_student(model, final_dir)
        return model.eval(), config
    try:
        tensors = load_file(str(final_dir / MODEL_FILE))
    except Exception as exc:  # safetensors' own error type; its message names no file
        raise DistillError(f"{final_dir / MODEL_FILE}: unreadable weights ({exc})") from None
    # final/ holds every weight: the base model's own would only be overwritten, so the student
    # is built on the meta device and takes the saved tensors (half the peak memory of export)
    try:
        model = build_student_skeleton(config)
    except ModelError as exc:
        log.warning("the student is built whole, then overwritten by %s (twice the memory): its architecture "
                    "cannot be built on the meta device (%s)", final_dir, first_line(exc))
        model = build_student(config, torch.device(device), rebuild=True)
        load_state_into(model, tensors, final_dir)
        return model.eval(), config
    load_state_into(model, tensors, final_dir, assign=True)
    target = torch.device(device)
    if target.type == "cuda":   # refused in one line, not a CUDA out-of-memory error after the copy
        check_weights_fit(sum(t.numel() * t.element_size() for t in tensors.values()),
                          torch.cuda.mem_get_info(target)[0], target)
    return model.to(target).eval(), config


def load_sharded_student(model: nn.Module, directory: Path) -> None:
    """Load a sharded checkpoint's student into ``model`` (built with its recipe), in this one
    process: every rank's shards are read and put together.  The shards are keyed by the
    trainer's names (:class:`StudentLoss`'s: ``student.`` + the model's)."""
    from qadpipe.distill.distributed import load_local_model_state, local_model_state, stored_once

    holder = nn.Module()
    holder.student = model
    state = local_model_state(holder)
    load_shards(directory, MODEL_SHARDS, stored_once(holder, state))
    load_local_model_state(holder, state)
