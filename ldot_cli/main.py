"""The `ldot` command: parse, call one library function, render. Heavy imports stay inside commands."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

# numpy's OpenBLAS threads spin after each call and starve torch's OpenMP pool: a 0.04 ms matrix-vector
# product right after a query encoding cost 75 ms (measured). The heavy maths runs in torch and FAISS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from typing import Any

import click
import typer
from typer.core import TyperGroup

from ldot_cli import __version__


def _typer_flow_exceptions() -> tuple[type[BaseException], ...]:
    """typer >= 0.20 vendors click: its --help / exit / usage errors are typer's own classes, not click's."""
    try:
        from typer.exceptions import Abort, Exit, TyperException
    except ImportError:  # pragma: no cover - older typer raises click's
        return ()
    return (Abort, Exit, TyperException)


_TYPER_FLOW = _typer_flow_exceptions()


class _ErrorBoundary(TyperGroup):
    """The one error boundary: an expected error prints one line on stderr and exits 2 (its own code);
    an unexpected one prints one line too, with a traceback only when LDOT_DEBUG=1."""

    def invoke(self, ctx: click.Context) -> Any:
        from models.core.errors import LdotError

        debug = os.environ.get("LDOT_DEBUG", "") not in ("", "0")
        args = [*getattr(ctx, "_protected_args", []), *ctx.args]  # invoking consumes them
        try:
            with _library_warnings_as_lines():
                return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort, *_TYPER_FLOW):
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

            if debug:
                raise
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
    flags = {}
    for param in command.params:
        long = [o for o in getattr(param, "opts", []) if o.startswith("--")]
        if param.name and long:
            flags[param.name] = long[0]
    return flags


@contextlib.contextmanager
def _library_warnings_as_lines() -> Iterator[None]:
    """The library reports what did not stop it through `warnings.warn(LdotWarning(...))`: one line each."""
    import warnings

    from models.core.errors import LdotWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", LdotWarning)
        original = warnings.showwarning

        def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if issubclass(category, LdotWarning):
                warn(str(message))
            else:
                original(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


def warn(message: str) -> None:
    """Print ``warning: message`` as one line on stderr."""
    from rich.text import Text

    from ldot_cli.commands.console import err

    err.print(Text.assemble(("warning: ", "bold yellow"), " ".join(str(message).split())), soft_wrap=True)


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` as one line on stderr and exit with ``code``."""
    from rich.text import Text

    from ldot_cli.commands.console import err

    err.print(Text.assemble(("error: ", "bold red"), " ".join(str(message).split())), soft_wrap=True)
    sys.exit(code)


app = typer.Typer(
    name="ldot",
    cls=_ErrorBoundary,
    help="Real-time image-text retrieval with LightningDOT: index photos offline, search them with one dot product.",
    no_args_is_help=True,
    add_completion=False,
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
    from ldot_cli.commands import train as cmd_train

    cmd_index.register(app)
    cmd_search.register(app)
    app.add_typer(cmd_models.app, name="models")
    cmd_eval.register(app)
    cmd_train.register(app)
    cmd_extract.register(app)
    cmd_data.register(app)


_register()


def run() -> None:
    """Console entry point."""
    app()
