"""The ``qadpipe`` command line: one click group, one subcommand per stage.

Every stage command takes ``-c CONFIG.yaml`` and repeated ``--set a.b=value``; user
errors (:class:`~qadpipe.errors.QadpipeError`) print as ONE line on stderr and exit 2.
The stage modules are imported inside each command so ``qadpipe --help`` stays fast and
a missing optional backend only matters to the command that needs it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import select
import sys
import traceback
from typing import Any, Callable

import click

from qadpipe import __version__
from qadpipe.errors import QadpipeError

EXIT_USER_ERROR = 2
INTERRUPTED = "qadpipe: interrupted (Ctrl-C); what was committed before it is kept"


def _fail(message: str) -> None:
    one_line = re.sub(r"\s*[\r\n]+\s*", " ", message).strip()   # line breaks only: a path's own spaces stay
    click.echo(f"qadpipe: error: {one_line}", err=True)
    sys.exit(EXIT_USER_ERROR)


def _stdout_closed() -> bool:
    """Whether the reader of stdout went away (a pipe's write end then polls POLLERR), rather
    than some other pipe or socket breaking inside a stage."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, ValueError, OSError):   # no real file behind stdout (a test runner's buffer)
        return False


def _user_errors_as_one_line(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except QadpipeError as exc:
            _fail(str(exc))
        except BrokenPipeError as exc:
            if _stdout_closed():   # `qadpipe inspect ... | head`: click ends quietly, not an error
                raise
            _fail(f"{exc.strerror or exc} ({type(exc).__name__}; `qadpipe -v ...` shows the traceback)")
        except OSError as exc:  # an output or input path the OS refuses: say which, not a traceback
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(f"{where}{exc.strerror or exc} ({type(exc).__name__}; `qadpipe -v ...` shows the traceback)")

    return wrapper


def _exit_at_once_under_torchrun(func: Callable[..., Any]) -> Callable[..., Any]:
    """A torchrun rank (WORLD_SIZE > 1) ends with ``os._exit`` once its command is done and
    its output flushed, skipping the interpreter's finalization.  Why: a Gloo worker thread
    releases a finished collective's tensors just after the caller resumes, taking the GIL to
    free their Python objects; when that lands in finalization, Python kills the thread inside
    a C++ destructor and the rank aborts ("terminate called without an active exception",
    exit -6, after everything was written: one 2-rank CPU run in ~20 here, seen in gdb).
    Every file qadpipe writes is closed, fsync'd and renamed before this point."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return func(*args, **kwargs)
        code = 0
        try:
            func(*args, **kwargs)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        except KeyboardInterrupt:
            click.echo(INTERRUPTED, err=True)
            code = 130
        except BaseException:
            traceback.print_exc()
            code = 1
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    return wrapper


def _config_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                        help="override a config field, e.g. --set distill.lr=2e-5 (repeatable)")(func)
    func = click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), callback=_non_empty,
                        help="YAML config file (defaults apply to every field it leaves out)")(func)
    return func


def _load(config_path: str | None, overrides: tuple[str, ...]) -> Any:
    from qadpipe.config import load_config

    config = load_config(config_path, overrides)
    if config_path is None:
        logging.getLogger("qadpipe.cli").info("no -c CONFIG.yaml: the built-in defaults%s (qadpipe config show "
                                              "prints them)", " and --set" if overrides else "")
    if config.model.trust_remote_code:
        logging.getLogger("qadpipe.cli").warning(
            "model.trust_remote_code is on: Python code shipped inside %s (and the teacher %s) will run "
            "with your permissions", config.model.path, config.teacher_path)
    return config


_HELP_FOR_NO_ARGS = getattr(click.exceptions, "NoArgsIsHelpError", ())   # click >= 8.2


class _OneLineUsageErrors(click.Group):
    """click's own refusals (an unknown option, a bad value, a path that is a directory) in the
    same one ``qadpipe: error:`` line as ours, instead of its three-line usage block."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            code = super().main(*args, **{**kwargs, "standalone_mode": False})
        except _HELP_FOR_NO_ARGS as exc:   # `qadpipe` alone: the help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            where = f" (`{exc.ctx.command_path} -h` shows the usage)" if getattr(exc, "ctx", None) else ""
            extra = re.match(r"Got unexpected extra argument \((\S+\.ya?ml)\)", exc.format_message())
            if extra:   # `qadpipe eval cfg.yaml`: the config goes after -c
                where = f"; a config file goes after -c: {exc.ctx.command_path} -c {extra.group(1)}"
            _fail(exc.format_message() + where)
        except click.Abort:   # click's form of a KeyboardInterrupt: before a stage's handler, or a second Ctrl-C
            click.echo(INTERRUPTED, err=True)
            sys.exit(130)
        if isinstance(code, int):   # ctx.exit(n) returns n here instead of exiting
            sys.exit(code)
        return code


def _non_empty(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An empty path would silently mean the config's default; say so instead."""
    if value is not None and not value.strip():
        what = "the argument" if isinstance(param, click.Argument) else "the option"
        raise click.BadParameter(f"got an empty path; leave {what} out to use the config's", ctx, param)
    return value


@click.group(cls=_OneLineUsageErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qadpipe")
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def cli(verbose: bool) -> None:
    """Quantization-Aware Distillation with an offline teacher-logit cache.

    generate (vLLM or HF teacher -> cache) -> distill (fake-quant student) -> export (vLLM
    checkpoint) -> eval.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


@cli.group("config")
def config_group() -> None:
    """Inspect the resolved configuration."""


@config_group.command("show")
@_config_options
@_user_errors_as_one_line
def config_show(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Print the fully resolved config (defaults + file + overrides) as YAML."""
    from qadpipe.config import config_to_dict, dump_yaml

    click.echo(dump_yaml(config_to_dict(_load(config_path, overrides))), nl=False)


@config_group.command("reference")
def config_reference() -> None:
    """Print every config field (type, default, meaning) as markdown."""
    from qadpipe.config.reference import render_reference

    click.echo(render_reference())


@cli.command()
@click.option("--num-shards", type=int, default=None,
              help="split records across this many tasks (default: generate.num_shards, SLURM_ARRAY_TASK_COUNT, 1)")
@click.option("--shard-index", type=int, default=None,
              help="this task's index (default: generate.shard_index, SLURM_ARRAY_TASK_ID, 0)")
@_config_options
@_user_errors_as_one_line
def generate(num_shards: int | None, shard_index: int | None, config_path: str | None,
             overrides: tuple[str, ...]) -> None:
    """Stage one: the teacher scores or generates data and fills the logit cache.

    Exits 0 when the task holds all its records. SIGTERM (a time limit, a preemption) and
    Ctrl-C stop it after committing the open shard, with exit 143 and 130: not a success,
    so a SLURM `afterok` dependency waits; rerun the same command to resume."""
    import signal

    from qadpipe.generate import run_generate

    summary = run_generate(_load(config_path, overrides), num_shards=num_shards, shard_index=shard_index)
    if summary.stopped_by:
        sys.exit(128 + signal.Signals[summary.stopped_by])


@cli.command()
@_config_options
@click.option("--resume", is_flag=True,
              help="continue exactly from the latest checkpoint in distill.output_dir")
@_exit_at_once_under_torchrun
@_user_errors_as_one_line
def distill(config_path: str | None, overrides: tuple[str, ...], resume: bool) -> None:
    """Stage two: train the fake-quantized student on the cached targets.

    Under torchrun (`torchrun --nproc_per_node N -m qadpipe.cli distill ...`) it trains with
    DDP or FSDP2 (distill.distributed). SIGTERM saves a checkpoint and exits 143; Ctrl-C
    does the same and exits 130 (a second Ctrl-C aborts at once).
    """
    import signal

    from qadpipe.distill.trainer import run_distill

    config = _load(config_path, overrides)
    result = run_distill(config, resume=resume)
    saved = config.distill.save
    if result.status == "preempted":
        click.echo(f"qadpipe: distill stopped by {result.stop_signal} at step {result.step}; "
                   + ("checkpoint saved, rerun with --resume" if saved else "nothing saved (distill.save=false)"),
                   err=True)
        sys.exit(128 + signal.Signals[result.stop_signal])
    ptq, last = result.ptq_eval.get("kl"), result.last_eval.get("kl")
    figures = (f"; held-out {result.eval_measure} {ptq:.4f} (PTQ) -> {last:.4f}"
               if ptq is not None and last is not None else "")
    if result.final_dir is not None:
        click.echo(f"distill: {result.step} steps{figures}; student in {result.final_dir}")
    elif not saved:
        click.echo(f"distill: {result.step} steps{figures}; nothing saved (distill.save=false)")


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["fake", "compressed-tensors"]), default=None,
              help="override export.format")
@click.option("--checkpoint", type=click.Path(file_okay=False), default=None, callback=_non_empty,
              help="a distill final/, ptq/ or checkpoints/step-N directory (default: <distill.output_dir>/final)")
@click.option("--output", type=click.Path(), default=None, callback=_non_empty, help="override export.output_dir")
@_config_options
@_user_errors_as_one_line
def export(fmt: str | None, checkpoint: str | None, output: str | None, config_path: str | None,
           overrides: tuple[str, ...]) -> None:
    """Write the student as a fake-quant BF16 or a real compressed-tensors checkpoint."""
    from qadpipe.export import run_export

    result = run_export(_load(config_path, overrides), checkpoint=checkpoint, output=output, fmt=fmt)
    click.echo(result.summary())


@cli.command("eval")
@_config_options
@_user_errors_as_one_line
def eval_command(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """KL, top-1 agreement and perplexity of students against the teacher."""
    from qadpipe.eval.evaluate import run_eval

    run_eval(_load(config_path, overrides))


@cli.command()
@click.argument("cache", required=False, callback=_non_empty)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--verify", is_flag=True, help="re-hash every shard against the manifest")
@_config_options
@_user_errors_as_one_line
def inspect(cache: str | None, as_json: bool, verify: bool, config_path: str | None,
            overrides: tuple[str, ...]) -> None:
    """What a logit cache holds (CACHE defaults to cache.path of the config)."""
    import json

    from qadpipe.cache.inspect import render, summarize
    from qadpipe.errors import CacheError

    config = _load(config_path, overrides)
    root = cache or config.cache.path
    summary = summarize(root, rehash=verify)
    click.echo(json.dumps(summary, indent=1) if as_json else render(summary))
    if summary["bad_shards"]:
        first = next(s for s in summary["shards"] if s["name"] == summary["bad_shards"][0])
        raise CacheError(f"{root}: {len(summary['bad_shards'])} of {len(summary['shards'])} shards failed their "
                         f"checks; first: {first['name']}: {first['state']}")


@cli.command()
@_config_options
@_user_errors_as_one_line
def demo(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """The whole pipeline on the embedded SmolLM2 (what `make demo` runs)."""
    from pathlib import Path

    from qadpipe.demo import run_demo
    from qadpipe.errors import ConfigError

    if config_path is None:
        config_path = "configs/demo.yaml"
        if not Path(config_path).is_file():
            raise ConfigError(f"{config_path}: not found under {Path.cwd()}; run `qadpipe demo` from the qadpipe "
                              "checkout (as `make demo` does), or pass -c CONFIG")
    run_demo(_load(config_path, overrides), config_path, overrides)


def main() -> None:
    cli(prog_name="qadpipe")


if __name__ == "__main__":
    main()
