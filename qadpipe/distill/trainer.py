"""Stage two, ``qadpipe distill``: train the fake-quantized student on the cached targets.

One recipe, read top to bottom (torchtune style): ``setup`` → ``train`` → ``save_checkpoint``
→ ``cleanup``.

* setup: process group (under torchrun) → source of rows (the cache; refuses another
  tokenizer, another vocabulary, or a target kind the loss cannot use) → student (load,
  quant recipe, fp32 master weights) → calibration on cache rows = the PTQ baseline, scored
  on the held-out rows → DDP/FSDP2 → AdamW + warmup/decay → ``--resume``.
* train: each step runs ``grad_accum`` micro-batches; a micro-batch's loss is its *sum* over
  target positions divided by the global count of positions of the step (all micro-batches,
  all ranks), so any split of one global batch yields the same gradient.

Modes (``distill.mode``): ``qad`` — loss on the cached targets; ``qat`` — cross-entropy on the
same tokens only (the baseline QAD beats); ``online`` — the teacher (``teacher.path`` or
``model.path``) runs beside the student and the loss is the full-vocabulary KL (the anchor of
``bench/distill_vs_online.py``, and the way to distil without a cache: tokens then come from
``data.source``).

Output under ``distill.output_dir``: ``checkpoints/`` (see :mod:`qadpipe.distill.checkpoint`),
``final/`` (see :mod:`qadpipe.distill.student`), ``metrics.jsonl`` (see
:mod:`qadpipe.distill.observe`), ``qadpipe_run.yaml``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import functools
import importlib.util
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from qadpipe.distill import distributed as dist_utils
from qadpipe.distill.background_save import BackgroundWriter, detached_snapshot, live_tensors
from qadpipe.distill.checkpoint import (CHECKPOINT_DIR, TrainerState, capture_rng, commit_sharded_checkpoint,
                                        latest_checkpoint, load_checkpoint_weights, load_trainer_state,
                                        remove_stale_temps, restore_rng, save_checkpoint, staged_step_dir)
from qadpipe.distill.collate import Batch, collate
from qadpipe.distill.head_loss import STAT_KEYS, LossSpec, PositionTargets, split_lm, summarize
from qadpipe.distill.loader import TargetLoader, state_on_other_ranks
from qadpipe.distill.optim import adamw, no_decay_names
from qadpipe.distill.same_run import RESUMABLE_CHANGES, distill_reads, unresumable_changes
from qadpipe.distill.observe import METRICS_FILE, TENSORBOARD_DIR, MetricsLog, peak_memory_gib
from qadpipe.distill.schedule import lr_multiplier
from qadpipe.distill.sharded_checkpoint import (MODEL_SHARDS, OPTIMIZER_SHARDS, is_sharded, load_shards, save_shards,
                                                staged_on_host)
from qadpipe.distill.student import (BASE_MODEL, FINAL_DIR, PTQ_DIR, StudentLoss, base_model_fact, build_student,
                                     build_student_skeleton, check_weights_fit, enable_activation_checkpointing,
                                     load_state_into, save_student)
from qadpipe.errors import DistillError, first_line
from qadpipe.file_lock import lock_for_one_run
from qadpipe.file_modes import check_writable_dir, missing_dirs
from qadpipe.models import LogitTransform, output_rows, padding_id
from qadpipe.provenance import RUN_FILE, recorded_stage, save_run_record
from qadpipe.quant.experts import has_fused_experts
from qadpipe.quant.quantizers import Quantizer
from qadpipe.quant.recipe import partly_quantized_groups, quant_parameters
from qadpipe.stop_signals import StopSignals
from qadpipe.targets import SequenceTargets
from qadpipe.teacher.hf_backend import head_logits

log = logging.getLogger(__name__)

#: Target rows read to measure CAKLD's β (the teacher's mean top-1 probability).
CAKLD_BETA_ROWS = 64


@dataclass
class TrainResult:
    """How a run ended: ``done`` (final/ written) or ``preempted`` (SIGTERM or Ctrl-C,
    checkpoint saved; ``stop_signal`` names it)."""

    status: str
    step: int
    ptq_eval: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    final_dir: Optional[Path] = None
    stop_signal: Optional[str] = None
    #: what the evals' "kl" measures: qadpipe eval's full-vocabulary KL only when the teacher is in the loop
    eval_measure: str = "KL"


class DataSource:
    """Token-only rows from ``data.source`` for online mode without a cache, split by index."""

    def __init__(self, rows: list[SequenceTargets]) -> None:
        self.rows = rows
        self.num_rows = len(rows)

    def iter_rows(self, start: int, end: int, needed: Any = None) -> Iterator[SequenceTargets]:
        """Rows ``[start, end)``; all of them (they are in memory: ``needed`` saves nothing)."""
        return iter(self.rows[start:end])


class _Window:
    """Figures summed over one log interval."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stats = {key: torch.zeros((), dtype=torch.float64, device=device) for key in STAT_KEYS}
        self.tokens = 0
        self.grad_norm = math.nan  # of the window's last step, before clipping
        self.lr = math.nan         # the learning rate the window's last step used
        self.loader_wait = 0.0     # seconds the loop waited for micro-batches
        self.started = time.perf_counter()

    def add(self, stats: dict[str, torch.Tensor], tokens: int) -> None:
        for key in STAT_KEYS:
            self.stats[key] += stats[key]
        self.tokens += tokens

    def sums(self) -> dict[str, float]:
        """The loss figures summed so far (float64, exact as Python floats), for a checkpoint.
        Tokens and timings are left out: tokens/s after a resume counts that run's work."""
        return {key: float(value) for key, value in self.stats.items()}

    def load_sums(self, sums: dict[str, float]) -> None:
        for key in STAT_KEYS:
            self.stats[key].fill_(sums[key])

    @contextlib.contextmanager
    def not_training(self) -> Iterator[None]:
        """Leave the time inside (an eval, a save) out of tokens/s.  The step's queued GPU work
        (the optimizer's) is waited for first: it is training, and the first sync inside would
        otherwise wait for it on the eval's clock."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - start


class DistillRecipe:
    """The ``qadpipe distill`` run."""

    def __init__(self, config: Any, *, resume: bool = False) -> None:
        self.config = config
        self.cfg = config.distill
        self.resume = resume
        self.output_dir = Path(self.cfg.output_dir)
        self.step = 0
        self.ptq_eval: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self._stop = StopSignals("saving a checkpoint at the end of this step")
        self._saved_distill: Optional[dict[str, Any]] = None   # the resumed checkpoint's schedule and batch
        self._resumed_window: Optional[dict[str, float]] = None   # the resumed checkpoint's log-interval sums
        # whether the resumed checkpoint is sharded: rank 0 looks once, every rank follows it
        self._from_shards = False
        self.resumes: list[dict[str, Any]] = []   # this run's resume history, see _record_resume

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.env = dist_utils.init_distributed(cfg.device)
        self.writer = BackgroundWriter(self.env.is_main)
        if self.env.device.type == "cuda" and self.config.model.dtype == "float16":
            # fp16 autocast needs loss scaling: the loss is divided by the batch's position
            # count, and activation gradients of ~1e-6 fall below fp16's normal range.
            raise DistillError("model.dtype: float16 on CUDA would train without loss scaling (gradients "
                               "underflow in fp16); expected bfloat16 or float32")
        torch.manual_seed(cfg.seed)
        _check_loss_weights(cfg)
        if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise DistillError("distill.tensorboard: true needs the tensorboard package (pip install tensorboard), "
                               "which is not installed; install it or set distill.tensorboard: false")
        _refuse_other_files(self.output_dir)
        if not self.resume:
            _refuse_previous_run(self.output_dir)
        check_writable_dir(self.output_dir, "distill.output_dir")
        if (self.output_dir / CHECKPOINT_DIR).is_dir():
            check_writable_dir(self.output_dir / CHECKPOINT_DIR, "distill.output_dir")
        self._made_dirs = missing_dirs(self.output_dir)
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:   # what the mode bits do not tell: a read-only mount, root on /sys
            raise DistillError(f"distill.output_dir: {self.output_dir} cannot be created ({exc.strerror})") from None
        dist_utils.computed_by_main(self.env.is_main, self._lock_output_dir)
        if self.env.is_main:
            remove_stale_temps(self.output_dir)
        self.metrics = MetricsLog(self.output_dir, enabled=self.env.is_main, tensorboard=cfg.tensorboard)
        # Tokenizer and cache first: a cache that does not fit refuses before any model loads.
        self.tokenizer = self._load_tokenizer()
        self.source, self.target_kind = self._open_source()
        self._check_rows_fit_packing()
        self.loader = TargetLoader(self.source, self._collate_train, batch_size=cfg.batch_size, seed=cfg.seed,
                                   rank=self.env.rank, world_size=self.env.world_size,
                                   shuffle_buffer=cfg.shuffle_buffer, holdout_rows=cfg.eval_rows,
                                   prefetch=cfg.prefetch_batches, pin_for=self.env.device)
        # Resuming, the recipe is the checkpoint's, no-op entries and all (a newer qadpipe's
        # refusals of those are for new recipes).  Rank 0 names the checkpoint for all: ranks
        # looking one by one could see different steps through a stale NFS directory cache.
        checkpoint = dist_utils.computed_by_main(self.env.is_main, lambda: latest_checkpoint(self.output_dir)) \
            if self.resume else None
        self.base_model = dist_utils.computed_by_main(self.env.is_main, lambda: base_model_fact(self.config.model.path))
        sharded = cfg.distributed == "fsdp2" and self.env.distributed
        # a sharded checkpoint holds every value of a sharded build: no whole student to load
        self._from_shards = checkpoint is not None and dist_utils.computed_by_main(self.env.is_main,
                                                                                    lambda: is_sharded(checkpoint))
        if sharded:   # the skeleton first: it refuses shards too large for the GPU at once
            student = self._skeleton()
            whole = None if self._from_shards else self._build_on_main_host(rebuild=checkpoint is not None)
        else:
            student, whole = build_student(self.config, self.env.device, rebuild=checkpoint is not None,
                                           packed=cfg.pack_length is not None), None
        vocab = output_rows(student)
        self._check_vocab(vocab)
        self.pad_id = padding_id(self.tokenizer, student)
        partial = partly_quantized_groups(student)
        if partial and checkpoint is None and self.config.export.format == "compressed-tensors":
            raise DistillError(f"quant: {', '.join(partial[0])} are fused by vLLM into one GEMM, but the recipe "
                               "quantizes only some of them, which the compressed-tensors export (export.format) "
                               "refuses after training; quantize all of them or none (quant.ignore, quant.rules), or "
                               "set export.format: fake")
        if checkpoint is None and self.config.export.format == "compressed-tensors" and self.env.is_main:
            from qadpipe.export.compressed_tensors import weight_groups_no_gpu_serves

            for caveat in weight_groups_no_gpu_serves(student):
                log.warning("quant.group_size: %s", caveat)
        self.spec = LossSpec(mode=cfg.mode, loss=cfg.loss, kd_weight=cfg.kd_loss_weight,
                             lm_weight=cfg.lm_loss_weight, cakld_beta=self._cakld_beta(), temperature=cfg.temperature)
        if cfg.temperature != 1.0 and cfg.mode == "qad":
            log.info("distill.temperature=%g: teacher and student are softened over the cache's k+1 buckets "
                     "(its top-k and the tail mass), the only temperature a cache without the tail's shape "
                     "applies without bias", cfg.temperature)
        self.eval_spec = LossSpec(mode="online" if self.target_kind is None else "qad")
        self.teacher = self._load_teacher(vocab) if self._needs_teacher() else None
        holdout = self.loader.holdout()
        self.holdout_batches = [self._collate_eval(holdout[i:i + cfg.batch_size])
                                for i in range(0, len(holdout), cfg.batch_size)]
        self.model = StudentLoss(student, cfg.loss_chunk_tokens)
        restored = self._restore_weights(student, checkpoint, into=whole if sharded else student) \
            if self.resume else None
        self._select_trainable(student)
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(student)
        no_decay = no_decay_names(self.model, quant_parameters(student))
        self.wrapped = dist_utils.wrap(self.model, student.get_decoder().layers, cfg.distributed, self.env)
        if sharded and self._from_shards:   # filled by _restore_state, once the optimizer exists
            dist_utils.materialize(self.model, self.env.device)
        elif sharded:
            dist_utils.load_sharded_from_main(self.model, whole, self.env.device, prefix="student.")
            del whole   # rank 0's host copy: the shards are the student now
        if restored is None:
            self._calibrate(student)
            if cfg.save:
                ptq_state = {_strip(k): v for k, v in dist_utils.full_model_state(self.model).items()}
                dist_utils.done_by_main(self.env.is_main,
                                        lambda: save_student(self.output_dir, ptq_state, self.config, PTQ_DIR,
                                                             self._cache_fingerprint(), **self._record_facts()))
                del ptq_state
            self.ptq_eval = self._evaluate(self.model)
            self._log_eval("ptq", self.ptq_eval)
        self._warn_if_training_state_outgrows_the_gpu()   # after FSDP2 has sharded the weights
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = adamw(self.model, cfg.lr, cfg.weight_decay, no_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_multiplier(cfg.schedule, cfg.warmup_steps, cfg.max_steps))
        last = lr_multiplier(cfg.schedule, cfg.warmup_steps, cfg.max_steps)(cfg.max_steps - 1)
        if cfg.schedule != "constant" and cfg.max_steps > 1 and last >= 1.0 or cfg.warmup_steps > cfg.max_steps:
            # the decay starts at step warmup_steps + 1: a warmup this long leaves none
            log.warning("distill.warmup_steps=%d with max_steps=%d: the lr never decays; the last step trains at "
                        "%.2g x distill.lr", cfg.warmup_steps, cfg.max_steps, last)
        if restored is not None:
            self._restore_state(*restored)
        if self.env.is_main:
            save_run_record(self.config, "distill", self.output_dir, **self._record_facts())

    def _build_on_main_host(self, rebuild: bool) -> Optional[torch.nn.Module]:
        """A sharded build's values: rank 0 builds the whole student on the host (recipe,
        checks and weight-derived quantizer state as any build), the other ranks wait for it
        on the control group (loading and initialising a large student on the host can outlast
        the collectives' timeout).  None on those ranks."""
        return dist_utils.done_by_main(
            self.env.is_main, lambda: build_student(self.config, torch.device("cpu"), rebuild=rebuild,
                                                    packed=self.cfg.pack_length is not None),
            what="build the student")

    def _skeleton(self) -> torch.nn.Module:
        """A sharded build's modules, on the meta device; refused before any shard is allocated
        when this rank's fp32 shards alone exceed its GPU's free memory."""
        skeleton = build_student_skeleton(self.config)
        device = self.env.device
        if device.type == "cuda":
            check_weights_fit(sum(p.numel() * p.element_size() for p in skeleton.parameters()),
                              torch.cuda.mem_get_info(device)[0], device, shards=self.env.world_size)
        return skeleton

    def _warn_if_training_state_outgrows_the_gpu(self) -> None:
        """Say before the first step what would make it run out of GPU memory (see
        :func:`training_state_bytes`)."""
        if self.env.device.type != "cuda":
            return
        trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        strategy = self.cfg.distributed if self.env.distributed else "single"
        need = training_state_bytes(trained, strategy, self.env.world_size)
        device = self.env.device
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if need > free:
            hint = ("distill.distributed: fsdp2 shards it" if strategy != "fsdp2" else "more GPUs shard it thinner") + \
                   (", distill.trainable: quant trains a fraction" if self.cfg.trainable == "all" else "")
            log.warning("gradients and AdamW state will take at least %.1f GiB on %s, more than its %.1f GiB free "
                        "beside the weights: the first step will likely run out of memory (%s)",
                        need / 2**30, device, free / 2**30, hint)

    def _lock_output_dir(self) -> None:
        """One live run per output_dir (rank 0 holds it): two -- a job submitted twice, a requeue
        racing the live run, ranks a killed torchrun left behind -- would both write, prune and
        log the same checkpoints, and either could delete the other's staging directories.
        stages/distill.sbatch always passes --resume, so the previous-run guard never sees them."""
        self._output_lock = lock_for_one_run(
            self.output_dir / OUTPUT_LOCK, where="distill.output_dir", error=DistillError,
            busy=lambda holder: f"{self.output_dir} is being trained by {holder}; two runs would overwrite each "
                                "other's checkpoints: wait for that run to end, or stop it, then rerun",
            unguarded=f"nothing stops a second distill run from writing into {self.output_dir} beside this one")

    def _release_output_dir(self) -> None:
        lock = getattr(self, "_output_lock", None)
        if lock is not None:
            lock.release()

    def _load_tokenizer(self) -> Any:
        from qadpipe.models import load_tokenizer

        return load_tokenizer(self.config.model.path, self.config.model.trust_remote_code)

    def _open_source(self) -> tuple[Any, Optional[str]]:
        """The cache (checked against the student's tokenizer and the loss), or, online
        without a cache, the data source's token sequences."""
        from qadpipe.cache import CacheReader
        from qadpipe.cache.manifest import load_view
        from qadpipe.cache.store import Store
        from qadpipe.models import tokenizer_fingerprint

        path = self.config.cache.path

        def snapshot() -> Optional[Any]:
            """The cache's committed shards as rank 0 sees them (None: online, and no cache),
            their footers and row ids checked: once, not by every rank (10M ids take ~20 s and
            ~1 GB to check; a node's 8 ranks held 8 copies)."""
            if self.cfg.mode == "online" and not _cache_exists(path):
                return None
            view = load_view(Store(path))
            CacheReader(path, view=view, check_footers=True)
            return view

        # One snapshot for every rank, and one decision whether there is a cache at all: a
        # generate array still committing shards would otherwise show ranks opening the cache
        # moments apart different rows (held-out rows trained on elsewhere, rows trained twice
        # or never, a fingerprint that is not what trained).
        view = dist_utils.computed_by_main(self.env.is_main, snapshot)
        if view is None:
            log.info("online mode: no cache at %s; tokens come from data.source=%s", path, self.config.data.source)
            return self._data_source(), None
        # rank 0 checked this view's footers and ids; every read still checks the shard's sha256
        reader = CacheReader(path, view=view, check_footers=False)
        missing, incomplete = reader.view.missing_tasks, reader.view.incomplete_tasks
        if missing:
            log.warning("%s: %d of the generate array's tasks have no manifest yet (%s...): training on the "
                        "rows the others committed", path, len(missing), missing[0])
        if incomplete:
            log.warning("%s: %d generate tasks stopped before their last record (%s...; a time limit or a "
                        "preemption): training on the rows they committed; rerun them to finish the cache",
                        path, len(incomplete), incomplete[0])
        if reader.view.split_ways:
            log.warning("%s: its generate tasks split the records %s ways (two arrays or resubmissions started "
                        "together): some records are in no task, and training covers only the rows committed; "
                        "regenerate into a new cache with one --num-shards for all of them", path,
                        " and ".join(map(str, reader.view.split_ways)))
        kind = reader.meta.target_kind
        if self.cfg.mode == "qad":
            wanted = "sampled" if self.cfg.loss == "sampled_ce" else "topk"
            if kind != wanted:
                hint = "distill.loss=sampled_ce" if kind == "sampled" else "a top-k loss (e.g. forward_kl)"
                raise DistillError(f"{path}: cache holds {kind} targets, but distill.loss={self.cfg.loss} needs "
                                   f"{wanted} targets; use {hint} or a {wanted} cache")
        reader.check_compatible(tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizer),
                                vocab_size=reader.meta.vocab_size)
        if self.cfg.mode == "online":
            log.info("online mode: tokens from the cache at %s (its targets only score the held-out rows)", path)
        return reader, kind

    def _check_rows_fit_packing(self) -> None:
        """Refuse a pack_length below the longest row now, not when the row is met hours into
        the run: the manifests record each shard's longest row (those written before qadpipe
        recorded it leave the check to collation), online rows from data.source are at hand."""
        limit = self.cfg.pack_length
        if limit is None:
            return
        view = getattr(self.source, "view", None)
        if view is None:
            row = max(self.source.rows, key=lambda row: len(row.input_ids))
            length, what = len(row.input_ids), f"data.source row {row.id!r} has"
        elif all(shard.longest_row is not None for shard in view.shards):
            shard = max(view.shards, key=lambda entry: entry.longest_row)
            length, what = shard.longest_row, f"{self.config.cache.path}: shard {shard.name} holds a row of"
        else:
            return
        if length > limit:
            raise DistillError(f"{what} {length} tokens, more than distill.pack_length={limit}; set pack_length to "
                               f"at least {length}, or to null (pad instead of pack)")

    def _data_source(self) -> DataSource:
        from qadpipe.data.loader import load_sequences
        from qadpipe.teacher.base import target_start

        gen = self.config.generate
        if gen.mode == "generate":   # its sequences would be the prompts alone: no answers to distil
            raise DistillError(f"distill.mode=online with no cache at {self.config.cache.path} trains on data.source's "
                               "token sequences, but generate.mode=generate makes them prompts without answers; "
                               "use generate.mode=score on existing answers, or run qadpipe generate first")
        rows = [SequenceTargets(id=s.id, input_ids=s.input_ids, target_start=target_start(s, gen.include_prompt))
                for s in load_sequences(self.config.data, gen, self.tokenizer, len(self.tokenizer)).sequences]
        return DataSource(rows)

    def _check_vocab(self, vocab: int) -> None:
        cached = getattr(getattr(self.source, "meta", None), "vocab_size", None)
        if cached is not None and cached != vocab:
            raise DistillError(f"{self.config.cache.path}: cache vocab_size={cached}, but the student "
                               f"{self.config.model.path} has {vocab} output logits; distil a student of the "
                               "teacher's vocabulary")

    def _needs_teacher(self) -> bool:
        return self.cfg.mode == "online" or self.target_kind is None

    def _load_teacher(self, student_vocab: int) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The teacher in the loop, refused unless it reads the tokens as the student does: the
        KL compares the two distributions id by id (the cache path checks the same)."""
        from qadpipe.models import (check_logits_are_head_of_hidden, check_packed_rows_are_isolated, load_causal_lm,
                                    load_tokenizer, resolve_model_path, tokenizer_fingerprint)

        path, trust = self.config.teacher_path, self.config.model.trust_remote_code
        resolve_model_path(path, self.config.teacher_field)   # a wrong teacher.path named as such
        if Path(path).resolve() != Path(self.config.model.path).resolve() and tokenizer_fingerprint(
                load_tokenizer(str(path), trust)) != tokenizer_fingerprint(self.tokenizer):
            raise DistillError(f"teacher.path: {path} has another tokenizer than the student {self.config.model.path}; "
                               "distillation compares the two distributions token by token, so they must share one")
        teacher = load_causal_lm(path, dtype=self.config.teacher.dtype, device=str(self.env.device),
                                 trust_remote_code=trust)
        teacher.requires_grad_(False)
        transform = check_logits_are_head_of_hidden(teacher, "teacher.path")
        if self.cfg.pack_length is not None:   # the teacher in the loop reads the same packed windows
            check_packed_rows_are_isolated(teacher, "teacher.path")
        base, head = split_lm(teacher)
        vocab = output_rows(teacher)
        if vocab != student_vocab:
            raise DistillError(f"teacher.path: {path} has {vocab} output logits, the student {self.config.model.path} "
                               f"{student_vocab}; distil a student of the teacher's vocabulary")
        fp32_head = self.config.teacher.fp32_head
        log.info("teacher in the loop: %s (%s%s)", path, self.config.teacher.dtype,
                 ", fp32 LM head" if fp32_head else "")
        return base, TeacherHead(head, fp32_head, transform)

    def _cakld_beta(self) -> float:
        """BitDistiller's β: the teacher's mean top-1 probability, measured on the cache's
        first training rows (past the held-out ones; identical on every rank and on resume)."""
        if self.cfg.loss != "cakld" or self.target_kind != "topk":
            return 0.5
        top1 = []
        first = min(self.cfg.eval_rows, self.source.num_rows)
        for index, row in enumerate(self.source.iter_rows(first, self.source.num_rows)):
            top1.append(np.exp(row.topk_logprobs[:, 0].astype(np.float64)))
            if index + 1 >= CAKLD_BETA_ROWS:
                break
        beta = float(np.concatenate(top1).mean())
        log.info("cakld: beta = %.4f (teacher's mean top-1 probability over %d training rows)", beta, len(top1))
        return beta

    def _collate_train(self, rows: list[SequenceTargets]) -> Batch:
        return collate(rows, pad_id=self.pad_id, pack_length=self.cfg.pack_length,
                       with_targets=self.cfg.mode == "qad")

    def _collate_eval(self, rows: list[SequenceTargets]) -> Batch:
        return collate(rows, pad_id=self.pad_id, with_targets=self.target_kind is not None)

    def _calibrate(self, student: torch.nn.Module) -> None:
        """PTQ calibration on training rows, the same on every rank (rank-independent order),
        run on the wrapped student (a sharded build has no other)."""
        from qadpipe.quant.calibrate import calibrate, static_input_quantizers

        count = self.config.quant.calibration_batches
        batches = []   # none at count 0: calibrate() itself refuses a recipe with static input ranges
        if count and static_input_quantizers(student):
            loader = TargetLoader(self.source, lambda rows: collate(rows, pad_id=self.pad_id, with_targets=False),
                                  batch_size=self.cfg.batch_size, seed=self.cfg.seed + 1,
                                  shuffle_buffer=self.cfg.shuffle_buffer, holdout_rows=self.cfg.eval_rows)
            for batch in loader:
                if loader.position.epoch:   # the training rows ran out: a second pass adds no range
                    log.warning("quant.calibration_batches=%d: the training rows make %d batches of %d; "
                                "calibrating on those", count, len(batches), self.cfg.batch_size)
                    count = len(batches)
                    break
                inputs = batch.to(self.env.device).model_inputs()
                inputs.pop("use_cache")
                batches.append(inputs)
                if len(batches) == count:
                    break
        with self._autocast():   # through the wrapped module: FSDP2's root gathers the embeddings and head
            calibrate(student, batches, count, percentile=self.config.quant.activation_percentile,
                      forward=lambda **inputs: self.model(inputs))
        dist_utils.reshard(self.model)
        # Every rank calibrated on the same rows, but GPUs need not sum them in one order: rank
        # 0's ranges (the ones its PTQ baseline and checkpoints save) are every rank's.
        dist_utils.broadcast_from_main(buffer for module in student.modules() if isinstance(module, Quantizer)
                                       for buffer in module.buffers(recurse=False))

    def _select_trainable(self, student: torch.nn.Module) -> None:
        """``all``: every parameter; ``quant``: quantization parameters and norms only."""
        if self.cfg.trainable == "all":
            student.requires_grad_(True)
            return
        quantizers = {id(p) for module in student.modules() if isinstance(module, Quantizer)
                      for p in module.parameters()}
        keep = {id(p) for p in quant_parameters(student)}
        keep |= {id(p) for name, p in student.named_parameters() if "norm" in name.lower()}
        for param in student.parameters():
            param.requires_grad_(id(param) in keep)
        if not any(p.requires_grad for p in student.parameters()):
            raise DistillError("distill.trainable=quant: the quant recipe has no trainable quantization "
                               "parameters and the student no norms; use distill.trainable=all")
        trained = [p for p in student.parameters() if p.requires_grad]
        quantizer_values = sum(p.numel() for p in trained if id(p) in quantizers)
        log.info("distill.trainable=quant: %d quantizer values (quant.learnable=%s) and %d norm values train, "
                 "%.2f%% of the student", quantizer_values, self.config.quant.learnable,
                 sum(p.numel() for p in trained) - quantizer_values,
                 100 * sum(p.numel() for p in trained) / sum(p.numel() for p in student.parameters()))
        if not quantizer_values:
            log.warning("distill.trainable=quant with quant.learnable=none: the recipe has no learnable scales, so "
                        "only the norms train; set quant.learnable (lsq or clip) for scale-only QAD, or "
                        "distill.trainable=all")
        if self.cfg.weight_decay:
            log.warning("distill.weight_decay=%g does nothing with distill.trainable=quant: it applies to weight "
                        "matrices only, and none train", self.cfg.weight_decay)

    def _restore_weights(self, student: torch.nn.Module, path: Optional[Path],
                         into: Optional[torch.nn.Module]) -> Optional[tuple[Path, TrainerState]]:
        """Load the latest checkpoint's (``path``) weights into ``into``, before wrapping: ``student``
        itself, or in a sharded build rank 0's whole student (None on the other ranks, which read
        the trainer state alone); None when there is no checkpoint."""
        if path is None:
            log.warning("--resume: no checkpoint under %s; starting from step 0", self.output_dir)
            self.metrics.truncate_after(-1)   # a killed first attempt's rows: this run writes its own
            return None
        saved = self._check_same_run(path, student)
        self._saved_distill = {key: saved.get(f"distill.{key}")
                               for key in ("max_steps", "lr", "batch_size", "grad_accum")}
        state = load_trainer_state(path)
        self._record_resume(path, state, saved)
        if state.cache_fingerprint != self._cache_fingerprint():
            raise DistillError(f"{path}: --resume of a checkpoint trained on other cache contents than "
                               f"{self.config.cache.path} now holds (another cache, or this one regenerated or "
                               "extended since); resume with the cache it trained on, or use a fresh "
                               "distill.output_dir")

        def load_weights() -> None:
            load_state_into(into, {_strip(k): v for k, v in load_checkpoint_weights(path).items()}, path)

        if self._from_shards:   # each rank reads its shards once the student is wrapped (_restore_state)
            return path, state
        if into is student:   # each rank its own whole student
            load_weights()
        else:   # a sharded build: rank 0's host copy, the other ranks waiting to learn that it loaded
            dist_utils.done_by_main(self.env.is_main, load_weights, what="load the checkpoint's weights")
        return path, state

    def _cache_fingerprint(self) -> str:
        view = getattr(self.source, "view", None)
        return view.fingerprint if view is not None else ""

    def _check_same_run(self, path: Path, student: torch.nn.Module) -> dict[str, Any]:
        """Refuse to continue a checkpoint that another recipe wrote: a stale run's checkpoint
        in the same output_dir would otherwise be resumed on other data or another recipe.
        Of the fields this run reads, only RESUMABLE_CHANGES may differ (see
        :mod:`qadpipe.distill.same_run`); ``quant.moe_experts`` matters only to a student with
        MoE experts.  Returns the checkpoint's flattened config."""
        from qadpipe.config import flatten_config, recorded_config
        from qadpipe.distill.student import recorded_run_config
        from qadpipe.provenance import read_run_record

        recorded = recorded_run_config(path)
        base = (read_run_record(path) or {}).get(BASE_MODEL)
        if isinstance(base, dict) and base.get("revision") not in (None, self.base_model["revision"]):
            raise DistillError(f"{path}: --resume of a run trained from the model at {base.get('dir')} (revision "
                               f"{base['revision']}), but model.path '{self.config.model.path}' names "
                               f"{self.base_model['dir']}, another model ({self.base_model['revision']}); resume with "
                               "model.path set to the model it trained from")
        saved = flatten_config(recorded_config(recorded))
        experts = has_fused_experts(student)
        # a run that recorded its model's revision is checked by it just above: model.path may then
        # name that model otherwise (a node-local copy, the same directory spelled another way)
        by_revision = isinstance(base, dict) and base.get("revision") is not None
        if by_revision and isinstance(base.get("dir"), str) and (Path(base["dir"]) / "config.json").is_file():
            # the records keep naming where the run started, which outlives a node-local copy:
            # export and eval follow it back there (located_base_model) once the copy is gone
            self.base_model = {"dir": base["dir"], "revision": base["revision"]}
        changed = unresumable_changes(recorded, self.config, lambda key: self._reads(key) and (
            experts or key != "quant.moe_experts") and not (by_revision and key == "model.path"))
        if changed:
            written = flatten_config(recorded)
            predated = [key for key in changed if key in saved and key not in written]
            hint = (f"; the checkpoint's qadpipe predates {predated[0]} and ran as {predated[0]}="
                    f"{saved[predated[0]]}: resume with --set {predated[0]}={saved[predated[0]]}" if predated else "")
            raise DistillError(f"{path}: --resume of a checkpoint written with another config ({', '.join(changed[:4])} "
                               f"differ); use a fresh distill.output_dir or resume with the config that made it{hint}")
        return saved

    def _record_resume(self, path: Path, state: TrainerState, saved: dict[str, Any]) -> None:
        """Add this resume to the run's history (``resumes`` in its run records): the
        checkpoint, and each field the resume changed with its value before, which the
        records' config (the latest) no longer shows; ``ranks`` too, when their number changed."""
        from qadpipe.config import config_to_dict, flatten_config
        from qadpipe.provenance import read_run_record

        now = flatten_config(config_to_dict(self.config))
        changed = {key: [saved[key], now[key]] for key in sorted(RESUMABLE_CHANGES)
                   if key in saved and key in now and saved[key] != now[key]}
        saved_ranks = len(state.loader.get("ranks", []))
        if saved_ranks != self.env.world_size:
            changed["ranks"] = [saved_ranks, self.env.world_size]
        earlier = (read_run_record(self.output_dir) or {}).get("resumes")
        self.resumes = [*(earlier if isinstance(earlier, list) else []),
                        {"checkpoint": path.name, "step": state.step,
                         "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "changed": changed}]

    def _reads(self, key: str) -> bool:
        """Whether config field ``key`` can change what this run trains (see
        :func:`~qadpipe.distill.same_run.distill_reads`)."""
        return distill_reads(key, teacher_in_loop=self._needs_teacher(), tokens_from_data=self.target_kind is None)

    def _restore_state(self, path: Path, state: TrainerState) -> None:
        optimizer_state = self._read_shards(path) if self._from_shards else state.optimizer
        saved_decay = [group["weight_decay"] for group in optimizer_state["param_groups"]]
        decay = [group["weight_decay"] for group in self.optimizer.param_groups]
        if saved_decay != decay:
            raise DistillError(f"{path}: AdamW groups with weight decay {saved_decay}, this run builds {decay} (a "
                               "qadpipe before 2026-12 decayed norms and quantizer parameters too); resume it with "
                               "the qadpipe that wrote it or start a fresh distill.output_dir")
        dist_utils.load_optimizer_state(self.model, self.optimizer, optimizer_state, full=not self._from_shards)
        if self.env.device.type == "cpu":
            # loaded on the device they live on, AdamW's moments stayed views of the checkpoint file's
            # memory map: pruned later, the file kept its disk space (on NFS, a .nfs file) all run
            for per_param in self.optimizer.state.values():
                for key, value in per_param.items():
                    if isinstance(value, torch.Tensor):
                        per_param[key] = value.clone()
        self.scheduler.load_state_dict(state.scheduler)
        self._restore_loader(path, state)
        restore_rng(state.rng)
        self.step = state.step
        if self.cfg.max_steps < self.step:   # final/ would record a horizon the weights went past
            raise DistillError(f"{path}: the checkpoint is at step {self.step}, past distill.max_steps="
                               f"{self.cfg.max_steps}; resume with max_steps >= {self.step}, or export "
                               f"this checkpoint as it is (qadpipe export --checkpoint {path})")
        self.metrics.truncate_after(self.step)
        log.info("resumed from %s at step %d", path, self.step)
        self._follow_new_schedule()

    def _read_shards(self, path: Path) -> dict[str, Any]:
        """A sharded checkpoint's student, loaded, and its optimizer state, read into this run's
        layout (resharded: it may have been written by another number of ranks or strategy)."""
        model_state = dist_utils.local_model_state(self.model)
        load_shards(path, MODEL_SHARDS, dist_utils.stored_once(self.model, model_state), dist_utils.control_group())
        dist_utils.load_local_model_state(self.model, model_state)
        optimizer_state = dist_utils.local_optimizer_state(self.model, self.optimizer)
        load_shards(path, OPTIMIZER_SHARDS, optimizer_state, dist_utils.control_group())
        return optimizer_state

    def _restore_loader(self, path: Path, state: TrainerState) -> None:
        """Each rank continues its saved loader position; on another number of ranks, or with
        another ``distill.batch_size``, the ranks share out what the saved ones had left to train
        instead (see :mod:`qadpipe.distill.loader`).  Either way, a step of another number of
        rows than the checkpoint's is said."""
        cfg, env = self.cfg, self.env
        ranks, window_ranks = state.loader.get("ranks", []), state.log_window.get("ranks")
        saved = self._saved_distill or {}
        saved_batch, saved_accum = saved.get("batch_size") or cfg.batch_size, saved.get("grad_accum") or cfg.grad_accum
        rows, saved_rows = cfg.batch_size * cfg.grad_accum * env.world_size, saved_batch * saved_accum * len(ranks)
        if len(ranks) == env.world_size and saved_batch == cfg.batch_size:
            self.loader.load_state_dict(ranks[env.rank])
            self._resumed_window = window_ranks[env.rank] if window_ranks else None
        else:
            self.loader.load_state_dict(state_on_other_ranks(ranks, saved_batch, str(path)))
            # the interval's sums, all on one rank: logging adds the ranks' sums up
            self._resumed_window = {key: sum(sums[key] for sums in window_ranks) for key in window_ranks[0]} \
                if window_ranks and env.is_main else None
            log.warning("--resume: %s was saved by %d rank(s) of %d-row micro-batches, this run has %d of %d: they "
                        "first train what those had left up to the end of their furthest epoch (in a new order), "
                        "then each epoch on the new split", path.name, len(ranks), saved_batch, env.world_size,
                        cfg.batch_size)
        if rows != saved_rows:
            log.warning("--resume: a step now takes %d rows (distill.batch_size x grad_accum x ranks: %d x %d x %d), "
                        "%s took %d", rows, cfg.batch_size, cfg.grad_accum, env.world_size, path.name, saved_rows)

    def _follow_new_schedule(self) -> None:
        """A resume with another ``distill.max_steps`` stretches (or shrinks) the decay; one with
        another ``distill.lr`` (a run that diverged) rescales it.  The loaded optimizer still
        holds the old schedule's lr for the next step: set the new one, and say where the lr
        jumps (an unchanged schedule resumes bit-exactly, untouched)."""
        cfg, saved = self.cfg, self._saved_distill
        if saved is None:
            return
        saved_steps, saved_lr = saved["max_steps"] or cfg.max_steps, saved["lr"] or cfg.lr
        if (saved_steps, saved_lr) == (cfg.max_steps, cfg.lr):
            return
        epoch = self.scheduler.last_epoch
        old = saved_lr * lr_multiplier(cfg.schedule, cfg.warmup_steps, saved_steps)(epoch)
        new = cfg.lr * lr_multiplier(cfg.schedule, cfg.warmup_steps, cfg.max_steps)(epoch)
        self.scheduler.base_lrs = [cfg.lr for _ in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["lr"] = cfg.lr, new
        changed = [f"distill.{key} changed from {saved_value:g} to {value:g}"
                   for key, saved_value, value in (("max_steps", saved_steps, cfg.max_steps), ("lr", saved_lr, cfg.lr))
                   if saved_value != value]
        log.warning("--resume: %s, so the %s schedule is recomputed: the lr of step %d is %.3g (the checkpoint's "
                    "schedule gave %.3g)", " and ".join(changed), cfg.schedule, self.step + 1, new, old)

    # ------------------------------------------------------------------ train
    def train(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        window = _Window(env.device)
        if self._resumed_window is not None:
            window.load_sums(self._resumed_window)
        self.wrapped.train()
        progress = tqdm(total=cfg.max_steps, initial=self.step, desc="distill", unit="step",
                        disable=not env.is_main, dynamic_ncols=True)
        # closing the bar first keeps an error on its own line; closing batches stops the read-ahead,
        # under the stop handlers still (it may wait for a shard's hash while rank 0 writes a checkpoint)
        with self._stop, contextlib.closing(iter(self.loader)) as batches, progress:
            while self.step < cfg.max_steps:
                waited = time.perf_counter()
                micro = [next(batches) for _ in range(cfg.grad_accum)]
                window.loader_wait += time.perf_counter() - waited
                try:
                    self._train_step(micro, window)
                except torch.OutOfMemoryError as exc:
                    raise DistillError(self._out_of_memory(exc, micro)) from None
                self.step += 1
                progress.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    self._log_train(window, progress)
                    window = _Window(env.device)
                evaluated = self.step % cfg.eval_every == 0 or self.step == cfg.max_steps
                if evaluated:
                    with window.not_training():
                        self.last_eval = self._evaluate(self.wrapped)
                        self._log_eval("eval", self.last_eval)
                stop = self._stop_requested()
                if cfg.save and (self.step % cfg.save_every == 0 or stop or self.step == cfg.max_steps):
                    with window.not_training():
                        self._refuse_unsound_weights(micro[-1], self.last_eval if evaluated else {})
                        self.save_checkpoint(window)
                    if not stop and self.step < cfg.max_steps:
                        # A signal during the save (an 8B student's takes minutes) stops at the
                        # checkpoint just written, not after one more step and a second save.
                        stop = self._stop_requested()
                if stop:
                    self.writer.finish()
                    outcome = ("checkpoint saved at step %d; rerun with --resume to continue" if cfg.save
                               else "stopped at step %d; nothing saved (distill.save=false)")
                    log.warning("%s: " + outcome, stop, self.step)
                    return TrainResult("preempted", self.step, self.ptq_eval, self.last_eval, stop_signal=stop,
                                       eval_measure=self._eval_measure())
            # still under the stop handlers: a SIGTERM now lets the last checkpoint and final/ be written
            self.writer.finish()
            final = self.save_final() if cfg.save else None
        return TrainResult("done", self.step, self.ptq_eval, self.last_eval, final, eval_measure=self._eval_measure())

    def _eval_measure(self) -> str:
        """The held-out "kl", named as ``qadpipe eval``'s report names it: against a top-k
        cache it is the tail-bucket KL (eval's last column, below its full-vocabulary KL)."""
        return {None: "KL to the teacher", "topk": "tail-bucket KL vs cache",
                "sampled": "KL vs the cache's sampled targets"}[self.target_kind]

    def _train_step(self, micro: list[Batch], window: _Window) -> None:
        env = self.env
        positions = dist_utils.all_reduce_number(sum(b.num_positions for b in micro), env.device)
        if positions == 0:
            raise DistillError(f"step {self.step + 1}: the global batch has no target positions")
        scale = env.world_size / positions
        self.optimizer.zero_grad(set_to_none=True)
        loss_sums = []
        for index, batch in enumerate(micro):
            batch = batch.to(env.device)
            # The backward too runs with sync off: FSDP2 reads the flag in its post-backward hook
            # (DDP in forward), so a backward outside reduce-scattered every micro-batch.
            with dist_utils.gradient_sync(self.wrapped, index == len(micro) - 1):
                loss_sum, stats = self._training_loss(batch)
                loss_sums.append(loss_sum.detach())
                (loss_sum * scale).backward()
            window.add(stats, batch.num_tokens)
        norm = dist_utils.clip_grad_norm(self.params, self.cfg.max_grad_norm)
        # Checked once per step, before the update: a non-finite loss leaves non-finite gradients,
        # which never reach the weights, and the GPU is not made to wait after every micro-batch.
        self._refuse_non_finite(loss=float(torch.stack(loss_sums).sum()), gradient_norm=norm)
        window.grad_norm, window.lr = norm, self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()

    def _training_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch's (on the device) summed training loss and figures; online, the
        teacher's hidden states come first."""
        targets = self._with_teacher(batch) if self.spec.mode == "online" else batch.targets
        with self._autocast():
            return self.wrapped(batch.model_inputs(), batch.target_mask, targets, self.spec, self._teacher_head())

    def _out_of_memory(self, exc: torch.OutOfMemoryError, micro: list[Batch]) -> str:
        """One line: where it ran out, what was kept, and the knobs that trade memory away
        (all of them RESUMABLE_CHANGES)."""
        cfg = self.cfg
        rows, width = micro[0].input_ids.shape
        knobs = [] if cfg.activation_checkpointing else ["distill.activation_checkpointing=true"]
        knobs.append(f"a smaller distill.loss_chunk_tokens (now {cfg.loss_chunk_tokens})")
        if cfg.distributed != "fsdp2":
            knobs.append("distill.distributed=fsdp2 under torchrun")
        if cfg.batch_size > 1:
            knobs.append(f"a smaller distill.batch_size with a larger distill.grad_accum (now {cfg.batch_size} x "
                         f"{cfg.grad_accum}: keep the product)")
        return (f"step {self.step + 1}: out of memory on {self.env.device} with micro-batches of {rows} x {width} "
                f"tokens ({first_line(exc)}); {self._kept_checkpoint('last')[0]}; try " + " or ".join(knobs)
                + f"; --resume accepts {('it', 'both', 'each')[min(len(knobs), 3) - 1]}")

    def _kept_checkpoint(self, which: str) -> tuple[str, bool]:
        """What a run that stops on an error leaves to --resume from: the words, and whether
        there is a checkpoint (or may be one: rank 0's write this rank cannot wait for)."""
        self.writer.wait()   # a checkpoint being written is the last one once it is
        last = latest_checkpoint(self.output_dir)
        kept = f"the {which} checkpoint is {last}" if last else "no checkpoint was written before it"
        if self.writer.unconfirmed:
            kept += f" (or {self.writer.unconfirmed}, if rank 0 finished writing it)"
        return kept, bool(last or self.writer.unconfirmed)

    def _recovery_from_non_finite(self) -> str:
        """The checkpoint a run stopped by a non-finite figure leaves, and what to do next: its
        checkpoints are all sound (:meth:`_refuse_unsound_weights`), and --resume replays the
        same batches, so only a gentler update gets past the step."""
        kept, any_checkpoint = self._kept_checkpoint("last good")
        resume = "--resume from it" if any_checkpoint else "rerun with --resume (it starts from step 0)"
        return f"{kept}; lower distill.lr (or set distill.max_grad_norm) and {resume}, or check the cache for broken targets"

    def _with_teacher(self, batch: Batch) -> PositionTargets:
        """The batch's targets plus the teacher's hidden states at the target positions.  The
        teacher runs in its own dtype, as generate runs it, not under the student's autocast:
        a float32 teacher's targets would be bf16 matmuls, a float16 one's head would fail."""
        base, _ = self.teacher
        with torch.no_grad(), torch.autocast(self.env.device.type, enabled=False):
            hidden = base(**batch.model_inputs()).last_hidden_state[batch.target_mask]
        targets = batch.targets.select(slice(None))
        targets.teacher_hidden = hidden
        return targets

    def _teacher_head(self) -> Optional[torch.nn.Module]:
        return self.teacher[1] if self.spec.mode == "online" else None

    def _autocast(self) -> contextlib.AbstractContextManager:
        enabled = self.env.device.type == "cuda" and self.config.model.dtype != "float32"
        dtype = getattr(torch, self.config.model.dtype)
        return torch.autocast(device_type=self.env.device.type, dtype=dtype, enabled=enabled)

    def _refuse_non_finite(self, **values: float) -> None:
        """Stop every rank when any rank's ``values`` (scalars, by name) hold a NaN or an infinity."""
        bad = next(((name, value) for name, value in values.items() if not math.isfinite(value)), None)
        if dist_utils.all_reduce_number(0.0 if bad is None else 1.0, self.env.device, op="max") == 0:
            return
        what = (f"training {bad[0].replace('_', ' ')} is {bad[1]:g}" if bad
                else "another rank's training loss or gradient norm")
        raise DistillError(f"step {self.step + 1}: {what} (not finite); stopped without saving this step, "
                           f"{self._recovery_from_non_finite()}")

    def _refuse_unsound_weights(self, batch: Batch, held_out: dict[str, float]) -> None:
        """Write no checkpoint (nor final/) from weights that give a non-finite loss.  A step's
        own check comes before its update, so an update that wrecks the weights (an lr far too
        high) shows only in the next loss: the weights about to be saved are scored on the
        step's last micro-batch (and ``held_out``, the figures of this step's eval if any), so every
        checkpoint a run leaves is one to resume from.  The RNG is forked around the forward
        (dropout draws from it): a run that saves, or stops, at a step trains on exactly the
        stream of one that does not."""
        devices = [self.env.device] if self.env.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            loss_sum, _ = self._training_loss(batch.to(self.env.device))
        problems = [] if math.isfinite(loss_sum) else [f"give a loss on its last micro-batch of {float(loss_sum):g}"]
        if not math.isfinite(held_out.get("loss", 0.0)):
            problems.append(f"give a held-out loss of {held_out['loss']:g}")
        # weights no batch reached (embedding rows of tokens it lacks); each rank checks its own shards
        # (a parameter's sum is non-finite iff one of its values is: no parameter-sized temporary, one sync)
        sums = [getattr(p, "to_local", lambda: p)().detach().sum() for p in self.params]
        if sums and not bool(torch.isfinite(torch.stack(sums)).all()):
            problems.append("hold non-finite values")
        if dist_utils.all_reduce_number(1.0 if problems else 0.0, self.env.device, op="max") == 0:
            return
        what = " and ".join(problems) or "give a non-finite loss or hold non-finite values on another rank"
        raise DistillError(f"step {self.step}: the weights after this step's update {what}; not saved, "
                           f"{self._recovery_from_non_finite()}")

    @torch.no_grad()
    def _evaluate(self, module: torch.nn.Module) -> dict[str, float]:
        """Held-out figures on the cache's held-out rows (identical on every rank)."""
        if not self.holdout_batches:
            return {}
        module.eval()
        totals = {key: torch.zeros((), dtype=torch.float64, device=self.env.device) for key in STAT_KEYS}
        head = self.teacher[1] if self.eval_spec.mode == "online" else None
        for batch in self.holdout_batches:
            batch = batch.to(self.env.device)
            targets = self._with_teacher(batch) if head is not None else batch.targets
            with self._autocast():
                _, stats = module(batch.model_inputs(), batch.target_mask, targets, self.eval_spec, head)
            for key in STAT_KEYS:
                totals[key] += stats[key]
        module.train()
        dist_utils.reshard(module)
        return summarize(totals)

    # ------------------------------------------------------------------ observability
    def _log_train(self, window: _Window, progress: tqdm) -> None:
        totals = {key: dist_utils.all_reduce(value.clone()) for key, value in window.stats.items()}
        tokens = dist_utils.all_reduce_number(window.tokens, self.env.device)
        if self.env.device.type == "cuda":   # the optimizer step, queued last, is this window's time too
            torch.cuda.synchronize(self.env.device)
        elapsed = time.perf_counter() - window.started
        row = {"step": self.step, **summarize(totals), "grad_norm": window.grad_norm,
               "lr": window.lr,
               "tokens_per_s": tokens / max(elapsed, 1e-9), "loader_wait": window.loader_wait / max(elapsed, 1e-9),
               "mem_gib": peak_memory_gib(self.env.device)}
        # QAT rows have no KL/top-1 against targets: leave them out rather than print "nan".
        shown = {key: row[key] for key in ("loss", "kl", "top1") if key in row}
        progress.set_postfix({key: f"{value:.4f}" for key, value in shown.items() if key != "top1"})
        if self.env.is_main:
            log.info("step %d/%d %s lr %.2e %.0f tok/s (loader wait %.0f%%) mem %.2f GiB", self.step,
                     self.cfg.max_steps, " ".join(f"{key} {value:.4f}" for key, value in shown.items()),
                     row["lr"], row["tokens_per_s"], 100 * row["loader_wait"], row["mem_gib"])
        self.metrics.write(row)

    def _log_eval(self, tag: str, figures: dict[str, float]) -> None:
        if not figures:
            return
        if self.env.is_main:
            log.info("%s (held-out, step %d): %s", tag, self.step,
                     " ".join(f"{k} {v:.4f}" for k, v in figures.items() if k != "positions"))
        self.metrics.write({"step": self.step, "tag": tag, **{f"eval_{k}": v for k, v in figures.items()}})

    def _stop_requested(self) -> Optional[str]:
        """The stop signal any rank received (SIGTERM wins over SIGINT), else None.  A failed
        background write stops the run too, at the step it is seen (the stop's save raises it),
        not up to ``save_every`` steps later at the next save."""
        mine = WRITE_FAILED if self.writer.failed else self._stop.signum
        signum = dist_utils.all_reduce_number(mine, self.env.device, op="max")
        if signum == WRITE_FAILED:
            return "a failed checkpoint write"
        return signal.Signals(int(signum)).name if signum else None

    # ------------------------------------------------------------------ save / cleanup
    def save_checkpoint(self, window: _Window) -> None:
        """Model + quantizer state, optimizer, scheduler, RNG, and every rank's loader position
        and log-interval sums.  With ``distill.save_in_background`` the loop waits for this
        step's snapshot only, and rank 0 writes it while training goes on (see
        :mod:`qadpipe.distill.background_save`)."""
        self.writer.finish()   # the previous checkpoint is committed before this one is taken
        taken = time.perf_counter()
        state = TrainerState(step=self.step, optimizer={}, scheduler=copy.deepcopy(self.scheduler.state_dict()),
                             loader={"ranks": dist_utils.all_gather_objects(self.loader.state_dict())},
                             rng=capture_rng(), cache_fingerprint=self._cache_fingerprint(),
                             log_window={"ranks": dist_utils.all_gather_objects(window.sums())})
        if self.cfg.checkpoint_format == "sharded":
            self._save_sharded_checkpoint(state, taken)
            return
        model_state = {_strip(k): v for k, v in dist_utils.full_model_state(self.model).items()}
        state.optimizer = dist_utils.full_optimizer_state(self.model, self.optimizer)
        if self.cfg.save_in_background:
            model_state, state.optimizer = detached_snapshot((model_state, state.optimizer),
                                                             live_tensors(self.model, self.optimizer))
        write = functools.partial(save_checkpoint, self.output_dir, model_state, state, self.config, **self._record_facts())
        if not self.cfg.save_in_background:
            dist_utils.done_by_main(self.env.is_main, write)
            return
        self.writer.start(write, f"checkpoint step {self.step}")
        log.info("checkpoint step %d: snapshot taken in %.1f s, written in the background", self.step,
                 time.perf_counter() - taken)

    def _save_sharded_checkpoint(self, state: TrainerState, taken: float) -> None:
        """Every rank writes its shards of the student and of AdamW's state into a staged step
        directory rank 0 made, then rank 0 adds ``state`` and commits it (see
        :mod:`qadpipe.distill.sharded_checkpoint`).  With ``distill.save_in_background`` every
        rank writes a host copy of its shards on its writer thread, and rank 0's commits."""
        staged = dist_utils.computed_by_main(self.env.is_main, lambda: staged_step_dir(self.output_dir, self.step))
        shards = (dist_utils.stored_once(self.model, dist_utils.local_model_state(self.model)),
                  dist_utils.local_optimizer_state(self.model, self.optimizer))
        commit = functools.partial(commit_sharded_checkpoint, staged, state, self.config, **self._record_facts())
        if not self.cfg.save_in_background:
            self._write_shards(staged, *shards, dist_utils.control_group())
            dist_utils.done_by_main(self.env.is_main, commit)
            log.info("checkpoint step %d: every rank wrote its shards in %.1f s", self.step,
                     time.perf_counter() - taken)
            return
        # Under DDP every rank holds the whole state: rank 0 alone copies it and writes it (DCP
        # takes a replicated tensor from any one rank), not a whole copy per rank on each host.
        copies_here = self.env.is_main or self.cfg.distributed != "ddp"
        try:
            shards = tuple(staged_on_host(part) if copies_here else {} for part in shards)
        except BaseException:   # the host out of memory: no staged directory left behind
            if self.env.is_main:
                shutil.rmtree(staged, ignore_errors=True)
            raise
        group = dist_utils.writer_group()

        def write_and_commit() -> None:
            self._write_shards(staged, *shards, group)
            if self.env.is_main:   # DCP returns on rank 0 once every rank's shards are written
                commit()

        self.writer.start(write_and_commit, f"checkpoint step {self.step}", every_rank=True)
        log.info("checkpoint step %d: shards copied to the host in %.1f s, written in the background", self.step,
                 time.perf_counter() - taken)

    def _write_shards(self, staged: Path, model_state: dict[str, Any], optimizer_state: dict[str, Any],
                      group: Optional[Any]) -> None:
        try:
            save_shards(staged, model_state, optimizer_state, group)
        except DistillError as exc:   # raised on every rank (DCP gathers their results)
            if self.env.is_main:
                shutil.rmtree(staged, ignore_errors=True)
            raise DistillError(f"{exc}; checkpoints/LATEST still names the previous checkpoint") from None

    def _record_facts(self) -> dict[str, Any]:
        """What the run records keep beyond the config: the model the student is built from
        (see :data:`~qadpipe.distill.student.BASE_MODEL`) and a resumed run's history."""
        return {BASE_MODEL: self.base_model, **({"resumes": self.resumes} if self.resumes else {})}

    def save_final(self) -> Optional[Path]:
        model_state = {_strip(k): v for k, v in dist_utils.full_model_state(self.model).items()}
        final = dist_utils.done_by_main(self.env.is_main,
                                        lambda: save_student(self.output_dir, model_state, self.config,
                                                             cache_fingerprint=self._cache_fingerprint(),
                                                             **self._record_facts()))
        if final is not None:
            log.info("final student written to %s (qadpipe export reads it)", final)
        return final

    def remove_output_dir_if_empty(self) -> None:
        """A run refused during setup (a bad cache, recipe or field) leaves nothing behind: the
        directories it created on the way to its output go again, leaf first, each only while
        empty -- a sibling another job made meanwhile under a new shared parent stops it there.
        Single process only: under torchrun another rank may be about to write into them."""
        self._release_output_dir()   # its lock file is the one entry a refused run made there
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return
        for directory in getattr(self, "_made_dirs", []):
            try:
                directory.rmdir()
            except OSError:   # not empty (or gone): what is above it is not ours to remove
                return

    def cleanup(self) -> None:
        if hasattr(self, "writer"):
            # a run stopping on an error (another rank's: torchrun then sends SIGTERM) still
            # commits the checkpoint it began
            with StopSignals("finishing the checkpoint being written"):
                self.writer.wait()
        if hasattr(self, "metrics"):
            self.metrics.close()
        self._release_output_dir()
        dist_utils.shutdown()


def training_state_bytes(trained_params: int, strategy: str, world_size: int) -> float:
    """GPU memory a rank needs for training state beyond the weights, a lower bound (activations
    left out): fp32 gradients and AdamW's two moments, 12 bytes per trained parameter; DDP's
    gradient buckets 4 more (``strategy`` ddp under torchrun; "single" alone); FSDP2 shards all
    of it over ``world_size``."""
    if strategy == "fsdp2":
        return 12 * trained_params / world_size
    return (16 if strategy == "ddp" else 12) * trained_params


def _check_loss_weights(cfg: Any) -> None:
    """qat's fixed loss is said when KD fields are set (a shared YAML flipped to qat for the
    baseline keeps them): a warning, not a refusal, so a student trained so still resumes."""
    if cfg.mode == "qat":
        unused = [f"distill.{name}={getattr(cfg, name)}" for name, default in
                  (("loss", "forward_kl"), ("kd_loss_weight", 1.0), ("lm_loss_weight", 0.0))
                  if getattr(cfg, name) != default]
        if unused:
            log.warning("distill.mode=qat trains on the data's cross-entropy alone, unweighted: %s not used",
                        ", ".join(unused))


class TeacherHead(torch.nn.Module):
    """The in-the-loop teacher's LM head, computed as generate's HF backend computes a cache's
    (``teacher.fp32_head``: fp32 logits from the bf16 weights), so online and cached targets
    are the same distribution; the architecture's logit transform after it."""

    def __init__(self, head: torch.nn.Module, fp32_head: bool, transform: LogitTransform) -> None:
        super().__init__()
        self.head, self.fp32_head, self.transform = head, fp32_head, transform

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return head_logits(self.head, hidden, fp32_head=self.fp32_head, transform=self.transform)


#: What :meth:`DistillRecipe._stop_requested` reduces for a failed background write (above any signal number).
WRITE_FAILED = 255

#: The lock file of the run writing an output_dir (hidden: not one of OUTPUT_ENTRIES).
OUTPUT_LOCK = ".distill.lock"

#: What distill writes into its output_dir (and hidden staging names, see remove_stale_temps).
OUTPUT_ENTRIES = frozenset({CHECKPOINT_DIR, FINAL_DIR, PTQ_DIR, METRICS_FILE, RUN_FILE, TENSORBOARD_DIR})


def _refuse_other_files(output_dir: Path) -> None:
    """A directory of other files (a model directory, an export, an eval report) would get
    checkpoints/, final/ and ptq/ mixed into it, and its own run record replaced."""
    if not output_dir.is_dir():
        return
    stage = recorded_stage(output_dir)
    foreign = sorted(p.name for p in output_dir.iterdir()
                     if p.name not in OUTPUT_ENTRIES and not p.name.startswith("."))
    if stage not in (None, "distill") or foreign:
        held = f"the output of qadpipe {stage}" if stage not in (None, "distill") else ", ".join(foreign[:3])
        raise DistillError(f"distill.output_dir: {output_dir} holds files distill does not write ({held}); set a new "
                           "or empty directory")


def _refuse_previous_run(output_dir: Path) -> None:
    """A fresh run into a directory another run wrote would mix their metrics, prune the old
    checkpoints under a LATEST that names a step it has not written yet, and replace final/."""
    found = [name for name in (CHECKPOINT_DIR, FINAL_DIR, METRICS_FILE) if (output_dir / name).exists()]
    if found:
        raise DistillError(f"{output_dir}: holds a previous distill run ({', '.join(found)}); pass --resume to "
                           "continue it, or set a new distill.output_dir (or delete this one)")


def _strip(name: str) -> str:
    """``student.model.layers.0...`` (StudentLoss) -> ``model.layers.0...`` (the HF model)."""
    return name[len("student."):] if name.startswith("student.") else name


def _cache_exists(path: str) -> bool:
    from qadpipe.cache.manifest import MANIFEST_DIR
    from qadpipe.cache.store import Store

    return bool(Store(path).list(MANIFEST_DIR))


def run_distill(config: Any, *, resume: bool = False) -> TrainResult:
    """setup → train → cleanup; what ``qadpipe distill`` runs."""
    recipe = DistillRecipe(config, resume=resume)
    try:
        try:
            recipe.setup()
        except BaseException:
            recipe.remove_output_dir_if_empty()
            raise
        return recipe.train()
    finally:
        recipe.cleanup()
