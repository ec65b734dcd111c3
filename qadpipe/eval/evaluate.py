"""``qadpipe eval``: teacher vs PTQ vs QAD (vs anything else) on held-out data, one report.

What is compared: every model in ``eval.models`` (default: the PTQ baseline and the QAD
student under ``distill.output_dir``) against the full-precision teacher, on either

* the cache's held-out rows — the first ``distill.eval_rows`` rows in reader order, which the
  trainer never trains on — scored from each row's ``target_start``; each model also gets the
  tail-bucket KL against the cached targets (what training optimized); or
* a data file (``eval.data``), read exactly like ``data.source``.

All models run in fp32 so the figures measure quantization, not bf16 rounding, and one
student at a time sits beside the teacher, so the device holds two models.  A model is a
directory: a distill ``final/`` or ``ptq/`` directory (rebuilt through the quant recipe it was
trained with), or any HF checkpoint (the teacher, a fake-quant export, a compressed-tensors
export that transformers can load).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from qadpipe.config import PipelineConfig
from qadpipe.eval.report import render_table, write_report
from qadpipe.eval.runner import compare_to_teacher
from qadpipe.errors import ConfigError, QadpipeError
from qadpipe.file_modes import check_writable_dir
from qadpipe.provenance import RUN_FILE, read_run_record, recorded_stage, save_run_record
from qadpipe.targets import SequenceTargets

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """The evaluated sequences: token ids, first scored position, and cached targets if any."""

    sequences: list[list[int]]
    starts: list[int]
    cache_rows: Optional[list[SequenceTargets]]
    description: str
    cache_fingerprint: Optional[str] = None   # of the cache the rows came from (None: eval.data)
    random_tokens: bool = False   # uniform random tokens: no text to have a perplexity on


def default_models(cfg: PipelineConfig) -> dict[str, str]:
    """PTQ baseline and QAD student of ``distill.output_dir``, those that exist."""
    from qadpipe.distill.student import FINAL_DIR, PTQ_DIR

    root = Path(cfg.distill.output_dir)
    found = {name: str(root / sub) for name, sub in (("ptq", PTQ_DIR), ("qad", FINAL_DIR)) if (root / sub).is_dir()}
    if not found:
        raise ConfigError(f"eval.models: empty and {root} holds no {PTQ_DIR}/ or {FINAL_DIR}/; run "
                          "`qadpipe distill` first or name models with --set eval.models.NAME=DIR")
    if "qad" not in found:
        log.warning("eval: %s has no %s/ yet (distill stopped before its last step?): evaluating the PTQ baseline "
                    "only; finish it with `qadpipe distill --resume`, or name a checkpoint with "
                    "--set eval.models.NAME=DIR", root, FINAL_DIR)
    return found


#: The report's reference row: a model of that name would replace the teacher's figures.
TEACHER_ROW = "teacher"


def check_model_paths(models: dict[str, str]) -> None:
    """Every model a directory it can load, checked before the first one loads (a typo in the last name
    would otherwise surface after the others were scored)."""
    from qadpipe.distill.student import is_student_dir

    for name, path in models.items():
        if name == TEACHER_ROW:
            raise ConfigError(f"eval.models.{TEACHER_ROW}: the name of the report's reference row (eval's teacher, "
                              "model.path); give this model another name")
        if not name.strip() or any(char in name for char in "|\n\r`"):   # a row name of report.md's table
            raise ConfigError(f"eval.models: name {name!r} cannot name a report row; expected a non-empty name "
                              "without '|', '`' or line breaks")
        if not str(path).strip():
            raise ConfigError(f"eval.models.{name}: empty; expected a distill final/ or ptq/ directory or an HF "
                              "checkpoint")
        if not Path(path).is_dir():
            raise ConfigError(f"eval.models.{name}: {path} is not a directory (expected a distill final/ or ptq/ "
                              "directory or an HF checkpoint)")
        if not is_student_dir(Path(path)) and not (Path(path) / "config.json").is_file():
            raise ConfigError(f"eval.models.{name}: {path} holds neither a distill student (model.safetensors or "
                              "model/ shards, and qadpipe_run.yaml) nor an HF checkpoint (config.json)")


def student_configs(models: dict[str, str]) -> dict[str, Any]:
    """The config each distill student among ``models`` was trained with, by name: read (and
    its base model located) once, for the tokenizer check and the load."""
    from qadpipe.distill.student import is_student_dir, trained_config

    return {name: trained_config(Path(path)) for name, path in models.items() if is_student_dir(Path(path))}


def check_model_tokenizers(models: dict[str, str], students: dict[str, Any], teacher_fingerprint: str,
                           trust_remote_code: bool) -> None:
    """KL and agreement compare id by id, so a model must read text as the teacher does: an
    HF checkpoint's own tokenizer (when it ships one), a student's (``students``: their
    :func:`student_configs`) that of the model it was built from.  Checked before any model
    loads; the vocab size alone misses a remapped id."""
    from qadpipe.models import load_tokenizer, tokenizer_fingerprint

    fingerprints: dict[str, str] = {}   # ptq/ and final/ share their model.path: its tokenizer loads once
    for name, path in models.items():
        if name in students:
            source = students[name].model.path
        elif any((Path(path) / file).is_file() for file in TOKENIZER_FILES):
            source = path
        else:
            continue   # another tool's checkpoint without a tokenizer: the vocab-size check still applies
        if source not in fingerprints:
            fingerprints[source] = tokenizer_fingerprint(load_tokenizer(source, trust_remote_code))
        if fingerprints[source] != teacher_fingerprint:
            raise ConfigError(f"eval.models.{name}: {path} reads text with another tokenizer than the teacher "
                              f"({source} vs model.path): its ids would be compared with the teacher's ids for "
                              "other tokens")


#: Files one of which an HF checkpoint ships its tokenizer in.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


#: What eval writes into its output directory (besides qadpipe_run.yaml).
EVAL_OUTPUTS = frozenset({"report.json", "report.md", "kl_by_model.png", "training_curves.png"})


def _written_by_eval(name: str) -> bool:
    """One of eval's files, or the temp name a killed atomic write of one leaves
    (``.report.json.<random>.tmp``, see :func:`~qadpipe.provenance.atomic_write_bytes`)."""
    owned = EVAL_OUTPUTS | {RUN_FILE}
    return name in owned or any(name.startswith(f".{own}.") and name.endswith(".tmp") for own in owned)


def check_output_dir(path: Path) -> Path:
    """``eval.output_dir`` is new, empty, or an earlier eval's: never another stage's output,
    a model, or a directory inside a cache (whose readers take every file in manifests/ for a
    manifest, and whose next generate refuses files it did not write)."""
    from qadpipe.cache.manifest import MANIFEST_DIR, SHARD_DIR

    out = check_writable_dir(Path(path).expanduser(), "eval.output_dir")
    for directory in (out, *out.parents):
        if (directory / MANIFEST_DIR).is_dir() and (directory / SHARD_DIR).is_dir():
            raise ConfigError(f"eval.output_dir: {out} is inside the cache {directory}; set another directory")
    stage = recorded_stage(out)
    if stage not in (None, "eval"):   # its run record would be replaced by eval's
        raise ConfigError(f"eval.output_dir: {out} holds the output of qadpipe {stage}; set another directory")
    if stage is None and out.is_dir():
        foreign = sorted(entry.name for entry in out.iterdir() if not _written_by_eval(entry.name))
        if foreign:
            raise ConfigError(f"eval.output_dir: {out} is a non-empty directory that is not an eval output (it holds "
                              f"{foreign[0]}); expected a new or empty directory, or an earlier eval output")
    return out


def load_model(path: str, device: torch.device, trained: Optional[Any] = None) -> nn.Module:
    """A distill student directory (``trained``: the config it was trained with, when already
    read) or an HF checkpoint, in fp32 eval mode."""
    from qadpipe.distill.student import is_student_dir, load_final_student
    from qadpipe.models import load_causal_lm

    if is_student_dir(Path(path)):
        model, _ = load_final_student(Path(path), device=str(device), config=trained)
        return model.float().eval()
    return _decompressed(load_causal_lm(path, dtype="float32", device=str(device)))


def _decompressed(model: nn.Module) -> nn.Module:
    """``model`` with its compressed-tensors weights decompressed, in fp32.  transformers loads
    such a checkpoint packed and decompresses it on its first forward, to its scales' dtype --
    bf16 for NVFP4 and MX, which eval's fp32 forward cannot mix (and a packed quantized
    ``lm_head`` has no ``weight`` to size the vocab by); one whose config asks for it
    (``run_compressed: false``) it decompresses while loading, to bf16 too, and keeps no
    compressor or quantization config.  So: decompressed here when still packed, then every
    bf16/fp16 tensor cast to fp32 (exact; a model loaded in fp32 has none else; transformers
    refuses ``.float()`` on a quantized model, and FP8 tensors stay FP8).  Input quantization
    (W4A4, W8A8) stays on, as compressed-tensors runs it.  W4A8 weights become the values vLLM
    serves (:func:`_w4a8_served_weights`), not the library's code x bf16 scale."""
    compressor = getattr(getattr(model, "hf_quantizer", None), "compressor", None)
    served = _w4a8_served_weights(model)
    if compressor is not None:
        compressor.decompress_model(model)
    for name, weight in served.items():
        model.get_submodule(name).weight.data = weight
    return model._apply(lambda t: t.float() if t.dtype in (torch.bfloat16, torch.float16) else t)


def _w4a8_served_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The fp32 weights of each int4-weight, FP8-input layer (W4A8) as vLLM serves them: its
    kernel turns the bf16 group scales into FP8 tables at load
    (:func:`~qadpipe.quant.formats.w4a8_served_values`), which the student trained with;
    compressed-tensors' decompression multiplies codes by the bf16 scales, weights up to a few
    % of a layer's largest off (another model than the one trained and served).  The codes come
    from the packed weight, or, where transformers decompressed it while loading
    (``run_compressed: false``), from that weight divided by its scale: code x scale is off its
    code by under 2**-9 of it (a bf16 rounding), and |code| <= 8 rounds back exactly."""
    from qadpipe.quant.formats import w4a8_served_values
    from qadpipe.quant.packing import unpack_int32
    from qadpipe.quant.recipe import PRESETS

    served = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        weights, inputs = getattr(scheme, "weights", None), getattr(scheme, "input_activations", None)
        if not (weights is not None and inputs is not None and weights.symmetric and hasattr(module, "weight_scale")
                and (weights.type, weights.num_bits, inputs.type, inputs.num_bits) == ("int", 4, "float", 8)):
            continue
        scale = module.weight_scale.float()
        if hasattr(module, "weight_packed"):
            rows, cols = (int(size) for size in module.weight_shape)
            codes = unpack_int32(module.weight_packed, 4, (rows, cols)).float()
        else:
            rows, cols = module.weight.shape
            codes = torch.round(module.weight.float().unflatten(-1, (scale.shape[-1], -1)) / scale.unsqueeze(-1))
        group = cols // scale.shape[-1]   # per channel: one group of the whole row
        spec = dataclasses.replace(PRESETS["w4a8_fp8"].weight, group_size=group)
        served[name] = w4a8_served_values(codes.reshape(rows, -1, group), scale, spec).reshape(rows, cols)
    return served


def release_memory(device: torch.device) -> None:
    """Return a freed model's memory now, so the next one loads into it (CUDA's caching
    allocator would otherwise hold the blocks; reference cycles in HF modules need a collect)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclasses.dataclass(frozen=True)
class TrainingRecord:
    """What eval must know of how a model was trained: the cache rows it held out and the
    cache contents it trained on (None: trained before qadpipe recorded them; "": on no
    cache, online from ``data.source``, whose first rows it held out)."""

    eval_rows: int
    cache_fingerprint: Optional[str]


def training_record(path: str) -> Optional[TrainingRecord]:
    """How the model at ``path`` was trained, from its own run record: a distill student's,
    or an export's (which copies its student's when written; never read through the path of
    a checkpoint another run may have replaced since).  None: unknown -- another tool's
    model, or an export written before exports kept the record."""
    from qadpipe.distill.student import is_student_dir

    record = read_run_record(Path(path)) or {}
    if record.get("stage") == "distill" and is_student_dir(Path(path)):
        distill = (record.get("config") or {}).get("distill") or {}
        facts = {"eval_rows": distill.get("eval_rows"), "cache_fingerprint": record.get("cache_fingerprint")}
    elif record.get("stage") == "export":
        facts = record.get("training")
    else:
        return None
    if not isinstance(facts, dict) or type(facts.get("eval_rows")) is not int:
        return None
    fingerprint = facts.get("cache_fingerprint")
    return TrainingRecord(facts["eval_rows"], fingerprint if isinstance(fingerprint, str) else None)


def trained_models(models: dict[str, str]) -> dict[str, TrainingRecord]:
    """Name -> training record of the models whose training qadpipe recorded."""
    found = {name: training_record(path) for name, path in models.items()}
    return {name: record for name, record in found.items() if record is not None}


def held_out_rows(cfg: PipelineConfig, models: dict[str, str]) -> int:
    """``distill.eval_rows`` as the students were trained with: rows past the number a student
    held out were trained on, and scoring them would flatter it."""
    recorded = {name: record.eval_rows for name, record in trained_models(models).items()}
    if recorded and min(recorded.values()) < cfg.distill.eval_rows:
        fewest = min(recorded.values())
        names = ", ".join(models[name] for name, rows in recorded.items() if rows == fewest)
        log.warning("eval: distill.eval_rows is %d, but the run of %s held out only the first %d cache rows when "
                    "it trained; scoring those %d (the rest were trained on)", cfg.distill.eval_rows, names,
                    fewest, fewest)
        return fewest
    if cfg.distill.eval_rows == 0 and cfg.eval.data is None and recorded and min(recorded.values()) > 0:
        raise ConfigError(f"distill.eval_rows: 0 held-out cache rows to evaluate on, but the students held out "
                          f"the first {min(recorded.values())} when they trained: set distill.eval_rows="
                          f"{min(recorded.values())} to score those, or eval.data to a file")
    return cfg.distill.eval_rows


def held_out(cfg: PipelineConfig, tokenizer: Any, vocab_size: int, eval_rows: int) -> HeldOut:
    """The sequences to score: ``eval.data``, or the first ``eval_rows`` rows of the cache
    (checked against the teacher's tokenizer and vocabulary, as distill checks them)."""
    limit = cfg.eval.max_sequences
    if cfg.eval.data is not None:
        from qadpipe.data import load_sequences
        from qadpipe.teacher.base import target_start

        if cfg.eval.data == "random":   # data.random's seed: the very tokens the cache was made from
            raise ConfigError("eval.data: got 'random', which would draw the training sequences again "
                              "(data.random.seed); leave eval.data null to score the cache's held-out rows")
        data = dataclasses.replace(cfg.data, source=cfg.eval.data, limit=limit)
        gen = dataclasses.replace(cfg.generate, mode="score")
        loaded = load_sequences(data, gen, tokenizer, vocab_size, source_name="eval.data")
        seqs = loaded.sequences[:limit]
        if not seqs:
            raise ConfigError(f"eval.data: no sequences to score in {cfg.eval.data} (all {loaded.dropped} records "
                              f"dropped: {loaded.drop_summary()})")
        starts = [target_start(s, gen.include_prompt) for s in seqs]   # the cache's convention, as trained
        description = f"{len(seqs)} sequences of {cfg.eval.data}"
        trained_on = _training_source_among(cfg)
        if trained_on is not None:
            log.warning("eval: eval.data %s holds the same records as %s, the training data: the students "
                        "trained on them, so the figures flatter them; score the cache's held-out rows "
                        "(eval.data: null) or a file kept out of training", cfg.eval.data, trained_on)
            description += f" (NOT unseen: the same records as the training data {trained_on})"
        return HeldOut([s.input_ids.tolist() for s in seqs], starts, None, description)
    from qadpipe.cache.reader import CacheReader
    from qadpipe.models import tokenizer_fingerprint

    reader = CacheReader(cfg.cache.path)
    reader.check_compatible(tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), vocab_size=vocab_size)
    _warn_of_another_teacher(cfg, reader.meta)
    count = min(eval_rows, limit)
    if count == 0:
        raise ConfigError("distill.eval_rows: 0 held-out cache rows to evaluate on; set eval.data to a file "
                          "or distill.eval_rows > 0 (and retrain, so the rows stay unseen)")
    if count < eval_rows:
        log.warning("eval: scoring %d of the %d held-out cache rows (eval.max_sequences=%d); distill's held-out "
                    "figures are over all %d, so the two differ", count, eval_rows, limit, eval_rows)
    rows = list(itertools.islice(reader.iter_sequences(0, 1), count))
    cached = rows if reader.meta.target_kind == "topk" else None
    random_tokens = (reader.meta.config.get("data") or {}).get("source") == "random"
    return HeldOut([r.input_ids.tolist() for r in rows], [r.target_start for r in rows], cached,
                   f"{len(rows)} held-out rows of the cache {cfg.cache.path}", reader.view.fingerprint,
                   random_tokens)


def _training_source_among(cfg: PipelineConfig) -> Optional[str]:
    """The training source (``data.source``, and the cache's own record of it) that holds the
    same bytes as ``eval.data``, if one does (a copy counts)."""
    import filecmp
    import os

    from qadpipe.cache.manifest import load_view
    from qadpipe.cache.store import Store

    sources = {cfg.data.source}
    try:   # its manifests alone: a reader would check every shard's footer and ids first
        sources.add((load_view(Store(cfg.cache.path)).meta.config.get("data") or {}).get("source"))
    except QadpipeError:   # no readable cache: eval.data needs none, data.source is still compared
        pass
    evaluated = Path(cfg.eval.data).expanduser()
    for source in sorted(str(s) for s in sources if s and s != "random"):
        path = Path(source).expanduser()
        if not path.exists() or path.is_dir() != evaluated.is_dir():
            continue
        if os.path.samefile(path, evaluated) or (not path.is_dir() and filecmp.cmp(path, evaluated, shallow=False)):
            return source
    return None


def _warn_of_another_teacher(cfg: PipelineConfig, meta: Any) -> None:
    """The cache-KL column scores each model against the targets the *cache's* teacher wrote:
    with another teacher in eval, that column and the teacher-KL columns disagree by design."""
    from qadpipe.models import model_revision, resolve_model_path

    revision = model_revision(resolve_model_path(cfg.teacher_path))   # the alias too, as generate resolves it
    if meta.teacher_revision and meta.teacher_revision != revision:
        log.warning("eval: the cache %s was written by the teacher %s (revision %s), this eval's teacher is %s "
                    "(revision %s): its cache-KL column compares against another model than the teacher columns",
                    cfg.cache.path, meta.teacher, meta.teacher_revision, cfg.teacher_path, revision)


def unseen_claim(data: HeldOut, models: dict[str, str]) -> str:
    """What the report may say of the cache rows: unseen only if every student trained on
    exactly these cache contents (rows past its held-out ones of *another* cache may be any
    rows of this one)."""
    if data.cache_fingerprint is None:
        return ""
    recorded = {name: record.cache_fingerprint for name, record in trained_models(models).items()}
    other = sorted(name for name, fingerprint in recorded.items() if fingerprint and fingerprint != data.cache_fingerprint)
    no_cache = sorted(name for name, fingerprint in recorded.items() if fingerprint == "")
    if other:
        log.warning("eval: %s trained on other cache contents than the %s: rows it held out there may not be the "
                    "rows scored here, so the figures may flatter it; evaluate on the cache it trained on, or on "
                    "eval.data", ", ".join(other), data.description)
    if no_cache:   # a generate array strides records over its tasks: cache order is not data order
        log.warning("eval: %s trained online without a cache, holding out the first rows of its data.source, which "
                    "need not be the rows scored here, so the figures may flatter it; evaluate on eval.data",
                    ", ".join(no_cache))
    if other or no_cache:
        said = [f"{', '.join(other)} trained on other cache contents"] if other else []
        said += [f"{', '.join(no_cache)} trained without a cache"] if no_cache else []
        return f" (NOT verified unseen: {'; '.join(said)})"
    unknown = sorted(set(models) - set(recorded))
    if unknown:
        log.warning("eval: %s: no qadpipe training record (not a distill student, nor an export that records "
                    "its training: another tool's model, or an export written before exports kept it -- export "
                    "it again), so whether it trained on the %s is unknown",
                    ", ".join(unknown), data.description)
    if not recorded:
        return f" (whether {', '.join(unknown)} trained on them is unknown)" if unknown else ""
    caveat = f"; unknown for {', '.join(unknown)}" if unknown else ""
    if all(fingerprint is not None for fingerprint in recorded.values()):
        return f" (never trained on{caveat})"
    return f" (held out in training by distill.eval_rows{caveat})"


def run_eval(cfg: PipelineConfig) -> dict[str, dict[str, float]]:
    """Score the models, write report.json / report.md / plots, return the results."""
    from qadpipe.devices import resolve_device
    from qadpipe.distill.student import FINAL_DIR
    from qadpipe.models import (check_logits_are_head_of_hidden, load_causal_lm, load_tokenizer, model_revision,
                                padding_id, resolve_model_path, tokenizer_fingerprint)
    from qadpipe.teacher import teacher_info

    device = resolve_device(cfg.eval.device, field="eval.device")
    out = check_output_dir(Path(cfg.eval.output_dir))
    models = dict(cfg.eval.models) or default_models(cfg)
    check_model_paths(models)
    teacher_dir = resolve_model_path(cfg.teacher_path, cfg.teacher_field)   # a wrong teacher.path named as such
    tokenizer = load_tokenizer(cfg.teacher_path, trust_remote_code=cfg.model.trust_remote_code)
    students = student_configs(models)
    check_model_tokenizers(models, students, tokenizer_fingerprint(tokenizer), cfg.model.trust_remote_code)
    # The data (a cache that does not fit, a bad eval.data) is refused before the teacher loads.
    vocab_size = teacher_info(teacher_dir, cfg.model.trust_remote_code).vocab_size
    data = held_out(cfg, tokenizer, vocab_size, held_out_rows(cfg, models))
    teacher = load_causal_lm(cfg.teacher_path, dtype="float32", device=str(device),
                             trust_remote_code=cfg.model.trust_remote_code)
    check_logits_are_head_of_hidden(teacher, "teacher.path")   # eval runs the LM head on hidden states
    pad_id = padding_id(tokenizer, teacher)   # the students' vocabularies are the teacher's (checked)
    results: dict[str, dict[str, float]] = {}
    for name, path in models.items():
        # One student beside the teacher at a time: all of them at once in fp32 would need
        # (1 + students) x 4 bytes a parameter (96 GB for an 8B teacher, PTQ and QAD).  The
        # teacher's forward is repeated per student instead; eval sets are small.
        student = load_model(path, device, students.get(name))
        _refuse_another_vocab(name, path, student, cfg.teacher_path, teacher)
        check_logits_are_head_of_hidden(student, f"eval.models.{name}")
        scored = compare_to_teacher(teacher, {name: student}, data.sequences, pad_id=pad_id, starts=data.starts,
                                    cache_rows=data.cache_rows, batch_size=cfg.eval.batch_size, device=device,
                                    with_perplexity=not data.random_tokens)
        results.setdefault(TEACHER_ROW, scored[TEACHER_ROW])
        results[name] = scored[name]
        broken = sorted(key for key, value in scored[name].items() if not math.isfinite(value))
        if broken:
            log.warning("eval.models.%s: %s is not finite (%s): the model's logits hold NaN or inf; the table shows "
                        "nan, report.json null", name, ", ".join(broken), path)
        del student, scored
        release_memory(device)
    positions = int(results[TEACHER_ROW]["positions"])
    context = {"teacher": cfg.teacher_path, "data": data.description + unseen_claim(data, models),
               "positions": f"{positions} scored per model: those a student trains on (each sequence's target "
                            "start onward; prompts only where generate.include_prompt was on)",
               **{f"model {name}": path for name, path in models.items()}}
    # A distill run's curve, once: from its final/ student (ptq/ beside it shares the run's file).
    metrics = {name: Path(path).parent / "metrics.jsonl" for name, path in models.items()
               if Path(path).name == FINAL_DIR}
    # The record first: a run killed while writing the report leaves a directory eval may write again.
    for name in EVAL_OUTPUTS:   # a rerun failing mid-write leaves no earlier figures beside its record
        (out / name).unlink(missing_ok=True)
    save_run_record(cfg, "eval", out, cache_fingerprint=data.cache_fingerprint,
                    teacher_revision=model_revision(teacher_dir))
    paths = write_report(out, results, context=context, metrics_files=metrics)
    print(render_table(results))
    log.info("eval report: %s", ", ".join(str(p) for p in paths.values()))
    return results


def _refuse_another_vocab(name: str, path: str, student: nn.Module, teacher_path: str, teacher: nn.Module) -> None:
    """KL and agreement compare the two distributions id by id: one line, naming the model,
    before any forward runs."""
    from qadpipe.models import output_rows

    rows, teacher_rows = output_rows(student), output_rows(teacher)
    if rows != teacher_rows:
        raise ConfigError(f"eval.models.{name}: {path} has {rows} output logits, the teacher {teacher_path} "
                          f"{teacher_rows}; evaluate students of the teacher's vocabulary")
