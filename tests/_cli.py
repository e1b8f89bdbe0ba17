"""Helpers for command-line tests: invoke `nenni` in-process, and the one-line error contract."""

from __future__ import annotations

from click.testing import CliRunner

from nenni_deploy.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result) -> None:
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
