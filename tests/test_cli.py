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
