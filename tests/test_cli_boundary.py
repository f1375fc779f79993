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


def test_the_library_names_settings_and_the_cli_shows_the_running_commands_flags(tmp_path, ldot_home):
    from models.core.errors import LdotError, option

    err = LdotError(f"pass {option('force')} to replace it, or choose another {option('name')}")
    assert str(err) == "pass `force` to replace it, or choose another `name`"  # the Python API's words
    (tmp_path / "x.pt").write_bytes(b"not read: the name is taken")
    (ldot_home / "models" / "mine").mkdir(parents=True)
    (ldot_home / "models" / "mine" / "config.json").write_text("{}")  # a model (an empty folder is a half download)
    result = runner.invoke(app, ["models", "import", str(tmp_path / "x.pt"), "--as", "mine"])
    assert result.exit_code == 2
    assert "pass --force to replace it, or choose another --as" in " ".join(result.output.split())
