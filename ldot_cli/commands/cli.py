"""The full `ldot` command line (typer): the commands, and the one error boundary. `ldot_cli.main.run` comes
here for everything but a plain query to a running server. Heavy imports stay inside commands."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, TextIO

import click
import typer
from typer.core import TyperGroup

from models.core.version import __version__

if TYPE_CHECKING:  # the context `TyperGroup` is given: typer >= 0.20 vendors click as `typer._click`
    from typer._click import Context
    from typer._click.exceptions import ClickException as VendoredClickException
    from typer._click.exceptions import UsageError as VendoredUsageError

    UsageError = click.exceptions.UsageError | VendoredUsageError
    ClickError = click.exceptions.ClickException | VendoredClickException


def _typer_flow_exceptions() -> tuple[type[BaseException], ...]:
    """typer >= 0.20 vendors click: its --help / exit / usage errors are typer's own classes, not click's."""
    try:
        from typer.exceptions import Abort, Exit, TyperException
    except ImportError:  # pragma: no cover - older typer raises click's
        return ()
    return (Abort, Exit, TyperException)


_TYPER_FLOW = _typer_flow_exceptions()


def _usage_error_classes() -> tuple[tuple[type[UsageError], ...], tuple[type[ClickError], ...]]:
    """(usage errors, other click errors), as both click and typer's vendored click spell them."""
    usage: list[type[UsageError]] = [click.exceptions.UsageError]
    other: list[type[ClickError]] = [click.exceptions.ClickException]
    try:
        from typer._click import exceptions as vendored
    except ImportError:  # pragma: no cover - older typer raises click's
        pass
    else:
        usage.append(vendored.UsageError)
        other.append(vendored.ClickException)
    return tuple(usage), tuple(other)


_USAGE_ERRORS, _CLICK_ERRORS = _usage_error_classes()
_ABORTS: tuple[type[BaseException], ...] = (click.exceptions.Abort,
                                             *(c for c in _TYPER_FLOW if c.__name__ == "Abort"))
# what click raises to end a command on purpose (help, exit, abort, usage): never an ldot error
_CLICK_FLOW: tuple[type[BaseException], ...] = (click.exceptions.ClickException, click.exceptions.Exit,
                                                click.exceptions.Abort, *_TYPER_FLOW)


class _ErrorBoundary(TyperGroup):
    """The one error boundary. Exit codes: 0 success; 1 an unexpected error (a bug: one line, a traceback only
    with LDOT_DEBUG=1), or `ldot models verify` finding damage, or a declined confirmation; 2 a usage error or an
    expected error (bad input, missing file or model, damaged data: one line saying what to do); 130 interrupted.
    Every error is one line on stderr starting with ``error:``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from ldot_cli.commands.console import clean_help

        clean_help(self)

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, windows_expand_args: bool = True, **extra: Any) -> Any:
        """click's own handling, except that a usage error is one ``error:`` line (no usage box) with exit 2."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False,
                                windows_expand_args=windows_expand_args, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False,
                                windows_expand_args=windows_expand_args, **extra)
        except _USAGE_ERRORS as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `ldot` or `ldot models` alone: the help
                exc.show()
                sys.exit(0)
            fail(_usage_line(exc), exc.exit_code)
        except _CLICK_ERRORS as exc:
            fail(exc.format_message(), exc.exit_code)
        except _ABORTS:
            fail("aborted", 1)
        sys.exit(code if isinstance(code, int) else 0)

    def get_params(self, ctx: Context) -> list[Any]:
        from ldot_cli.commands.console import clean_param

        params = super().get_params(ctx)
        for param in params:  # typer adds --install-completion / --show-completion after __init__
            clean_param(param)
        return params

    def invoke(self, ctx: Context) -> Any:
        from models.core.env import flag
        from models.core.errors import LdotError

        debug = flag("LDOT_DEBUG")
        args = [*getattr(ctx, "_protected_args", []), *ctx.args]  # invoking consumes them
        try:
            with _library_warnings_as_lines():
                return super().invoke(ctx)
        except _CLICK_FLOW:
            raise
        except LdotError as exc:
            if debug:
                raise
            from ldot_cli.commands.console import cli_message

            fail(cli_message(exc, _option_flags(self, ctx, args)), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as exc:
            from models.core.errors import as_storage_error
            from models.core.home import as_home_error

            if debug:
                raise
            home = as_home_error(exc)  # LDOT_HOME a file, read-only or not creatable: say so, name it
            if home is not None:
                fail(str(home), home.exit_code)
            storage = as_storage_error(exc)  # a full or failing disk is the user's to fix, not a bug
            if storage is not None:
                fail(str(storage), storage.exit_code)
            fail(f"unexpected {type(exc).__name__}: {exc} (run with LDOT_DEBUG=1 for the traceback, "
                 "and please report it)", 1)


def _option_flags(group: Any, ctx: Any, args: list[str]) -> dict[str, str]:
    """Python parameter name -> flag of the command being run: how the library's `option(...)` references in
    error messages are shown here (``name`` is ``--as`` for `ldot models import`, ``--name`` elsewhere)."""
    command: Any = group
    try:  # typer vendors click: its groups are not click.Group instances, so ask for the method
        while hasattr(command, "resolve_command") and args:
            _, sub, args = command.resolve_command(ctx, args)
            if sub is None:
                break
            command = sub
    except Exception:  # an unknown command: no flags to name
        pass
    flags = _own_flags(command)
    # a setting this command does not have (`ldot data get` meeting "pass --data"): name the commands that have it
    elsewhere: dict[str, list[str]] = {}
    for path, other in _commands(group, ""):
        if other is not command:
            for pname, flag in _own_flags(other).items():
                if pname not in flags:
                    elsewhere.setdefault(pname, []).append(f"`ldot {path} {flag}`")
    for pname, uses in elsewhere.items():
        flags[pname] = (uses[0] if len(uses) == 1 else " or ".join([", ".join(uses[:-1]), uses[-1]]))
    return flags


def _own_flags(command: object) -> dict[str, str]:
    flags = {}
    for param in getattr(command, "params", []):
        opts = [o for o in getattr(param, "opts", []) if o.startswith("-")]
        if param.name and opts:  # the long spelling when there is one (-k has none)
            flags[param.name] = next((o for o in opts if o.startswith("--")), opts[0])
    return flags


def _commands(group: object, prefix: str) -> Iterator[tuple[str, object]]:
    """(path, command) of every command under ``group`` (``index``, ``train finetune``...)."""
    for name, sub in sorted(getattr(group, "commands", {}).items()):
        path = f"{prefix} {name}".strip()
        if getattr(sub, "commands", None):
            yield from _commands(sub, path)
        if getattr(sub, "callback", None) is not None:
            yield path, sub


@contextlib.contextmanager
def _library_warnings_as_lines() -> Iterator[None]:
    """The library reports what did not stop it through `warnings.warn(LdotWarning(...))`: one line each."""
    import warnings

    from models.core.errors import LdotWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", LdotWarning)
        original = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
            if issubclass(category, LdotWarning):
                warn(str(message))
            else:
                original(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def warn(message: str) -> None:
    """Print ``warning: message`` as one line on stderr."""
    from ldot_cli.commands.console import err, line

    err.print(line(("warning: ", "bold yellow"), " ".join(str(message).split())), soft_wrap=True)


def _usage_line(exc: UsageError) -> str:
    """A usage error as one line: click's message and where to find the command's help."""
    message = exc.format_message()
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        message += f" (see `{ctx.command_path} --help`)"
    return message


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` as one line on stderr and exit with ``code``."""
    from ldot_cli.commands.console import err, line

    err.print(line(("error: ", "bold red"), " ".join(str(message).split())), soft_wrap=True)
    sys.exit(code)


app = typer.Typer(
    name="ldot",
    cls=_ErrorBoundary,
    help="Real-time image-text retrieval with LightningDOT: index photos offline, search them with one dot product.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ldot {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and "
                                                                                            "exit."),
) -> None:
    """ldot: LightningDOT retrieval from the command line. Files live in $LDOT_HOME (default: the user cache dir)."""


def _register() -> None:
    from ldot_cli.commands import data as cmd_data
    from ldot_cli.commands import eval as cmd_eval
    from ldot_cli.commands import extract as cmd_extract
    from ldot_cli.commands import index as cmd_index
    from ldot_cli.commands import models as cmd_models
    from ldot_cli.commands import search as cmd_search
    from ldot_cli.commands import serve as cmd_serve
    from ldot_cli.commands import train as cmd_train

    cmd_index.register(app)
    cmd_search.register(app)
    cmd_serve.register(app)
    app.add_typer(cmd_models.app, name="models")
    cmd_eval.register(app)
    cmd_train.register(app)
    cmd_extract.register(app)
    cmd_data.register(app)


_register()

