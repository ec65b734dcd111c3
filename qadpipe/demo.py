"""``qadpipe demo``: the whole pipeline on the embedded SmolLM2, resumable step by step.

Each step runs as its own ``qadpipe`` subprocess with the same config, exactly as a user or a
cluster launcher would run it: vLLM's engine, the trainer and the evaluator never share a
process (or its memory), and what the demo proves is the CLI users will type.  A step whose
output is already complete -- made with this config, from what the steps before it hold now --
is skipped, so an interrupted demo resumes where it stopped and a changed input is followed
through to the report.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import click

from qadpipe.config import PipelineConfig
from qadpipe.errors import QadpipeError


@dataclass(frozen=True)
class DemoStep:
    name: str
    command: Callable[[PipelineConfig, list[str]], list[str]]  # (config, -c/--set args) -> argv
    output: Callable[[PipelineConfig], Path]
    done: Callable[[PipelineConfig], bool]
    what: str
    prepare: Callable[[PipelineConfig], None] = lambda cfg: None   # before the step runs


def _made_with(path_of: Callable[[PipelineConfig], Path], marker: str,
               *inputs: Callable[[PipelineConfig], Path]) -> Callable[[PipelineConfig], bool]:
    """Done: the step's output is there, its run record holds this very config (a demo rerun
    with another --set redoes the step instead of showing the old results), and its ``marker``
    is newer than each of ``inputs`` that exists (an earlier step that ran since -- in this
    demo or an interrupted one -- made what it was built from)."""

    def done(cfg: PipelineConfig) -> bool:
        from qadpipe.config import config_to_dict
        from qadpipe.provenance import read_run_record

        out = path_of(cfg)
        if not (out / marker).exists():
            return False
        record = read_run_record(out)
        made = (out / marker).stat().st_mtime_ns
        newer = [path for path in (source(cfg) for source in inputs)
                 if path.exists() and path.stat().st_mtime_ns > made]
        return record is not None and record.get("config") == config_to_dict(cfg) and not newer

    return done


def _cache_fingerprint(cfg: PipelineConfig) -> str | None:
    from qadpipe.cache import CacheReader

    try:
        return CacheReader(str(_cache(cfg))).view.fingerprint
    except QadpipeError:   # no readable cache: distill runs, and says why
        return None


def _trained_on_this_cache(cfg: PipelineConfig) -> bool:
    """Done: the student is there, made with this config, from the rows the cache holds now
    (generate always runs, and a cache regenerated since holds other rows)."""
    from qadpipe.distill.student import trained_cache_fingerprint

    return (_made_with(_student, "model.safetensors")(cfg)
            and trained_cache_fingerprint(_student(cfg)) == _cache_fingerprint(cfg))


def _move_aside_another_run(cfg: PipelineConfig) -> None:
    """``distill --resume`` continues what distill.output_dir holds, and refuses a run there
    made from another cache or recipe; the demo's own earlier run is then moved aside (never
    deleted) and the student trained afresh.  The test is the trainer's own
    (:mod:`qadpipe.distill.same_run`), so what a resume may change (max_steps, lr, ...) keeps
    the run.  The one field it cannot judge without loading the student,
    ``quant.moe_experts``, counts: an MoE run is never kept that --resume would refuse."""
    from qadpipe.distill.checkpoint import latest_checkpoint
    from qadpipe.distill.same_run import distill_reads, unresumable_changes
    from qadpipe.provenance import RUN_FILE, read_run_record

    out = Path(cfg.distill.output_dir)
    made = _student(cfg) if (_student(cfg) / RUN_FILE).is_file() else latest_checkpoint(out)
    record = read_run_record(made) if made is not None else None
    if not record or not isinstance(record.get("config"), dict):
        return   # nothing trained yet, or a record distill itself will name
    recipe = unresumable_changes(record["config"], cfg, lambda key: distill_reads(
        key, teacher_in_loop=cfg.distill.mode == "online", tokens_from_data=False))
    reason = (f"with other settings ({', '.join(recipe[:3])})" if recipe else
              "on other cache contents" if record.get("cache_fingerprint") != _cache_fingerprint(cfg) else None)
    if reason:
        aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(aside)
        click.echo(f"      {out} was trained {reason}; moved to {aside}")


def _cache(cfg: PipelineConfig) -> Path:
    return Path(cfg.cache.path)


def _student(cfg: PipelineConfig) -> Path:
    return Path(cfg.distill.output_dir) / "final"


def _export(cfg: PipelineConfig) -> Path:
    return Path(cfg.export.output_dir)


def _eval(cfg: PipelineConfig) -> Path:
    return Path(cfg.eval.output_dir)


def _student_weights(cfg: PipelineConfig) -> Path:
    return _student(cfg) / "model.safetensors"


def _export_config(cfg: PipelineConfig) -> Path:
    return _export(cfg) / "config.json"


def _stage(*args: str) -> Callable[[PipelineConfig, list[str]], list[str]]:
    return lambda cfg, common: ["-m", "qadpipe.cli", *args, *common]


STEPS = (
    # generate resumes on its own (it skips the records its shards hold), so it always runs.
    DemoStep("generate", _stage("generate"), _cache, lambda cfg: False,
             "the teacher (vLLM on CPU) answers the bundled prompts and caches its top-k log-probs"),
    DemoStep("distill", _stage("distill", "--resume"), _student, _trained_on_this_cache,
             "the fake-quantized student trains on the cache (PTQ baseline first)", _move_aside_another_run),
    DemoStep("export", _stage("export"), _export, _made_with(_export, "config.json", _student_weights),
             "the student is written as a compressed-tensors checkpoint"),
    DemoStep("serve", lambda cfg, common: ["-m", "qadpipe.export.serve_check", str(_export(cfg))], _export,
             lambda cfg: False, "vLLM (CPU) loads the export and answers one prompt"),
    DemoStep("eval", _stage("eval"), _eval, _made_with(_eval, "report.md", _student_weights, _export_config),
             "teacher vs PTQ vs QAD on the cache's held-out rows"),
)


def _run_step(command: list[str]) -> tuple[int, Optional[str]]:
    """Run one step's process to its end: (exit code, the stop signal the demo got, if any).

    The step runs in a process group of its own, and each SIGINT or SIGTERM the demo gets is
    passed on to it once, whoever sent it (the terminal's Ctrl-C, ``kill -INT``, a job
    scheduler): the step stops as it does when run alone -- generate commits its open shard,
    distill checkpoints the step it is in -- while the demo waits for it, and a second Ctrl-C
    is the step's own to act on (it aborts).  ``subprocess.call`` killed it instead, 0.25 s
    after the KeyboardInterrupt reached the demo."""
    child = subprocess.Popen(command, process_group=0)
    received: list[str] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signal.Signals(signum).name)
        child.send_signal(signum)

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code, received[0] if received else None


def run_demo(cfg: PipelineConfig, config_path: str, overrides: tuple[str, ...]) -> None:
    """Run every step in order; stop at the first that fails, saying which and why."""
    common = ["-c", config_path, *(arg for item in overrides for arg in ("--set", item))]
    started = time.perf_counter()
    for index, step in enumerate(STEPS, 1):
        header = f"[{index}/{len(STEPS)}] {step.name}: {step.what}"
        if step.done(cfg):
            click.echo(f"{header}\n      already done with this config -> {step.output(cfg)} (delete it to redo)")
            continue
        click.echo(header, err=False)
        step.prepare(cfg)
        step_start = time.perf_counter()
        code, stopped_by = _run_step([sys.executable, *step.command(cfg, common)])
        if stopped_by is not None:
            raise QadpipeError(f"demo stopped by {stopped_by} in step '{step.name}' (exit {code}); what it "
                               "committed is kept: rerun `make demo` to go on")
        if code != 0:
            raise QadpipeError(f"demo step '{step.name}' failed (exit {code}); fix the error above and rerun "
                               "`make demo`: finished steps are skipped")
        click.echo(f"      done in {time.perf_counter() - step_start:.0f}s -> {step.output(cfg)}")
    report = _eval(cfg) / "report.md"
    click.echo(f"\ndemo finished in {time.perf_counter() - started:.0f}s; the table ({report}):\n")
    click.echo(report.read_text())
