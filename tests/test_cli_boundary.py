"""The CLI's error boundary lets typer's own flow exceptions (--help, Exit, Abort) through untouched."""

from __future__ import annotations

from typer.testing import CliRunner

from ldot_cli.main import app

runner = CliRunner()


def test_subcommand_help_exits_0_without_an_error_line():
    result = runner.invoke(app, ["models", "list", "--help"])
    assert result.exit_code == 0, result.output
    assert "error" not in result.output and "Usage" in result.output


def test_abort_is_not_reported_as_unexpected():
    result = runner.invoke(app, ["models", "rm", "nope"], input="n\n")
    assert result.exit_code == 1 and "unexpected" not in result.output
