"""The command line: the command map, and stages that refuse rather than fake output."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from qadpipe.cli import cli

STAGES = ["generate", "distill", "export", "eval", "inspect", "demo"]


def test_help_lists_every_command():
    result = subprocess.run([sys.executable, "-m", "qadpipe.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in STAGES + ["config"]:
        assert f"\n  {command} " in result.stdout


@pytest.mark.parametrize("command", STAGES)
def test_every_stage_takes_config_and_set(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert "-c, --config" in result.output and "--set KEY=VALUE" in result.output


def test_a_bad_override_fails_before_any_stage_runs():
    for command in STAGES:
        result = CliRunner().invoke(cli, [command, "--set", "distill.lr=oops"])
        assert result.exit_code == 2, command
        assert result.stderr == "qadpipe: error: distill.lr: got 'oops' (str), expected a number\n"


@pytest.mark.parametrize("args, message", [
    (["config", "show", "-c", "."], "Invalid value for '-c' / '--config': File '.' is a directory. "
                                    "(`qadpipe config show -h` shows the usage)"),
    (["generate", "--num-shards", "abc"], "Invalid value for '--num-shards': 'abc' is not a valid integer. "
                                          "(`qadpipe generate -h` shows the usage)"),
    (["distill", "--bogus"], "--bogus"),   # click's wording varies by version
    (["export", "--output", ""], "Invalid value for '--output': got an empty path; leave the option out to use "
                                 "the config's (`qadpipe export -h` shows the usage)"),
    (["inspect", " "], "Invalid value for '[CACHE]': got an empty path; leave the argument out to use the config's "
                       "(`qadpipe inspect -h` shows the usage)"),
    (["eval", "my.yaml"], "Got unexpected extra argument (my.yaml); a config file goes after -c: qadpipe eval -c "
                          "my.yaml"),
])
def test_usage_errors_are_one_line_too(args, message):
    """click's own refusals printed a three-line usage block; an empty path silently meant the
    config's default (`--output ""` overwrote export.output_dir)."""
    result = subprocess.run([sys.executable, "-m", "qadpipe.cli", *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("qadpipe: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr


def test_no_command_shows_the_help():
    result = subprocess.run([sys.executable, "-m", "qadpipe.cli"], capture_output=True, text=True)
    assert result.stdout.startswith("Usage: qadpipe") or result.stderr.startswith("Usage: qadpipe")


def test_ctrl_c_before_a_stage_handles_it_exits_130_in_one_line(monkeypatch):
    """Model loading runs before a stage installs its signal handler: a Ctrl-C there reaches
    click as KeyboardInterrupt, which printed 'Aborted!' and exited 1 (the docs promise 130)."""
    import qadpipe.config

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(qadpipe.config, "load_config", interrupted)
    result = CliRunner().invoke(cli, ["distill"])
    assert result.exit_code == 130
    last = result.stderr.strip().splitlines()[-1]
    assert last == "qadpipe: interrupted (Ctrl-C); what was committed before it is kept"


def test_a_reader_closing_the_pipe_early_is_not_an_error():
    """`qadpipe inspect BIG | head`: the closed pipe was caught as an OSError and printed as
    'qadpipe: error: Broken pipe' (exit 2); click's own handling ends quietly."""
    run = subprocess.run(f"'{sys.executable}' -m qadpipe.cli config show -c configs/demo.yaml | true",
                         shell=True, capture_output=True, text=True, executable="/bin/bash")
    assert "error" not in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_a_broken_pipe_inside_a_stage_is_still_one_line(monkeypatch):
    """Only stdout's own reader going away ends quietly: a pipe or socket a stage writes to
    breaking is an error, said in one line with exit 2 (not swallowed by click with exit 1)."""
    from click.testing import CliRunner

    from qadpipe import cli as cli_module
    from qadpipe import generate

    def broken(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(generate, "run_generate", broken)
    result = CliRunner().invoke(cli_module.cli, ["generate"])
    assert result.exit_code == 2 and "qadpipe: error: Broken pipe (BrokenPipeError;" in result.output
