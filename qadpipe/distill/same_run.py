"""Whether ``--resume`` may continue a recorded run under the config given now.

A pure comparison of two configs, shared by the trainer (which refuses a checkpoint another
recipe wrote) and ``make demo`` (which moves such a run aside before it resumes), so the two
cannot drift apart: what the demo keeps, ``--resume`` takes.
"""

from __future__ import annotations

from typing import Any, Callable

from qadpipe.config import PipelineConfig, build_config, config_to_dict, flatten_config, recorded_config

#: Fields a resumed run may change among those it reads: when to stop, log, evaluate and
#: save, where the run lives, how much memory a step takes (the knobs a run that ran out of
#: memory is resumed with; pack_length only lays out the rows each micro-batch already holds;
#: checkpoints, full or sharded, load under any strategy, so DDP and FSDP2 continue each
#: other's runs, in either checkpoint format; a smaller batch_size with a larger grad_accum
#: keeps the global batch, and the loader shares out the rows left in the epoch as on another
#: number of ranks), and the lr and clipping (those a run that diverged is resumed with).  A
#: moved cache is recognised by its fingerprint, not its path.
RESUMABLE_CHANGES = frozenset({"distill.max_steps", "distill.lr", "distill.max_grad_norm",
                               "distill.batch_size", "distill.grad_accum",
                               "distill.log_every", "distill.eval_every", "distill.save_every",
                               "distill.save", "distill.save_in_background", "distill.checkpoint_format",
                               "distill.activation_checkpointing", "distill.loss_chunk_tokens", "distill.pack_length",
                               "distill.prefetch_batches", "distill.tensorboard",
                               "distill.device", "distill.output_dir", "distill.distributed"})

#: The teacher's fields that shape a run with the teacher in the loop.
_TEACHER_FIELDS = ("teacher.path", "teacher.dtype", "teacher.fp32_head")


def distill_reads(key: str, *, teacher_in_loop: bool, tokens_from_data: bool) -> bool:
    """Whether config field ``key`` can change what a distill run trains.  The cache's settings
    are not among them (its contents are fingerprinted instead), nor generate's, eval's or
    export's; the teacher's only with a teacher in the loop, the data's only when the tokens
    come from ``data.source`` rather than a cache."""
    section = key.partition(".")[0]
    if section in ("model", "quant", "distill"):
        return True
    if section == "teacher":
        return teacher_in_loop and key in _TEACHER_FIELDS
    return section == "data" and tokens_from_data


def unresumable_changes(recorded: dict[str, Any], config: PipelineConfig,
                        reads: Callable[[str], bool]) -> list[str]:
    """The fields, among those ``reads`` accepts, that ``config`` sets otherwise than a run
    record's ``recorded`` config did, other than :data:`RESUMABLE_CHANGES`: those make another
    run.  A field the record's qadpipe predates counts as what that version did (its default,
    or :func:`~qadpipe.config.recorded_config`'s value)."""
    saved = flatten_config(recorded_config(recorded))
    defaults = flatten_config(config_to_dict(build_config({})))
    return [key for key, value in flatten_config(config_to_dict(config)).items()
            if reads(key) and key not in RESUMABLE_CHANGES and saved.get(key, defaults.get(key)) != value]
