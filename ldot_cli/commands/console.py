"""Rendering helpers: results to stdout, diagnostics and progress to stderr.

User data (file names, captions, queries, model names, error messages that quote them) is never interpreted as
rich markup and never reaches the terminal raw: both consoles have markup and highlighting off, styled lines are
built with :func:`line` (a `rich.text.Text`), and every piece of text goes through :func:`safe`, which writes
control characters (C0, DEL, C1), bidirectional overrides and undecodable bytes as visible escapes. Machine
outputs (``--json``, ``--paths``, ``-0``) do not come through here: they stay byte-exact.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from models.core.env import flag
from models.core.progress import Progress

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID

out = Console(soft_wrap=True, markup=False, highlight=False, emoji=False)  # results
err = Console(stderr=True, markup=False, highlight=False, emoji=False)  # diagnostics, progress, errors

# C0 controls (newline and tab included: a name is one line), DEL, C1 controls (0x9b is a one-byte CSI on some
# terminals), the Unicode line/paragraph separators, bidirectional marks, embeddings, overrides and isolates
# (U+202E makes "gpj.exe" read "exe.jpg"), and lone surrogates (undecodable bytes of a file name).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def safe(value: object) -> str:
    """``value`` as text that is safe to show on a terminal: control and bidi characters as ``\\xNN`` /
    ``\\uNNNN`` escapes, undecodable bytes as ``\\xNN``; everything else unchanged."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    elif isinstance(value, os.PathLike):
        value = os.fspath(value)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "backslashreplace")
    return _UNSAFE.sub(_escape, str(value))


def line(*parts: object) -> Text:
    """One line of output as a `Text`: each part is a value (shown literally, through :func:`safe`) or a
    ``(value, style)`` pair. Nothing in it is read as markup."""
    text = Text(no_wrap=False)
    for part in parts:
        if isinstance(part, tuple):
            value, style = part
            text.append(safe(value), style=style)
        else:
            text.append(safe(part))
    return text


def cell(value: object, style: str = "") -> Text:
    """A table cell holding ``value`` literally (see :func:`safe`); ``None`` shows as ``-``."""
    return Text(safe("-" if value is None else value), style=style)


def cli_message(exc: BaseException, flags: dict[str, str] | None = None) -> str:
    """An error's one-line message as the command line says it: settings the library names by their Python
    name (`models.core.errors.option`) shown as flags (``flags`` maps names to the running command's own)."""
    flags = flags or {}
    for_cli = getattr(exc, "for_cli", None)
    if for_cli is None:
        return " ".join(str(exc).split())
    return " ".join(for_cli(lambda name: flags.get(name, "--" + name.replace("_", "-"))).split())


# -- help ------------------------------------------------------------------------------------------------
def _type_word(param: Any) -> str:
    """A click-style metavar for an option's value: TEXT, INTEGER, FLOAT, PATH or the choices (a|b)."""
    desc = getattr(param, "type_descriptor", None)
    if desc is None:  # pragma: no cover - typer before 0.2x: click types
        choices = getattr(param.type, "choices", None)
        return "|".join(map(str, choices)) if choices else str(getattr(param.type, "name", "text")).upper()
    if getattr(desc, "is_choice", False) and desc.choices:
        return "|".join(str(getattr(c, "value", c)) for c in desc.choices)
    if getattr(desc, "is_path", False):
        return "PATH"
    annotation = desc.annotation
    if getattr(desc, "is_list", False):
        from typing import get_args

        annotation = (get_args(annotation) or (str,))[0]
    from pathlib import PurePath

    if isinstance(annotation, type) and issubclass(annotation, PurePath):
        return "PATH"
    return {int: "INTEGER", float: "FLOAT"}.get(annotation, "TEXT")


def interactive() -> bool:
    """Someone at a terminal who can answer a question (stdin is a terminal)."""
    return sys.stdin.isatty()


def clean_help(command: Any) -> None:
    """Help shows click-style metavars (PATHS..., TEXT, INTEGER; nothing after a flag) instead of Python types
    (``<list[Path]>``, ``<bool>``, ``{paths}...``), for every command and sub-command."""
    _escape_help(command, "help", "epilog", "short_help")
    for param in getattr(command, "params", []):
        clean_param(param)
    plain_help_option = command.get_help_option

    def help_option(ctx: Any) -> Any:
        option = plain_help_option(ctx)
        if option is not None:
            clean_param(option)
        return option

    command.get_help_option = help_option
    for sub in getattr(command, "commands", {}).values():
        clean_help(sub)


def _escape_help(thing: Any, *fields: str) -> None:
    """Help is plain text: typer shows it through rich markup, which ate ``[plot]`` in "pip install '.[plot]'" and
    ``[[x1,y1,...],...]``. Escaped once (a parameter is cleaned on every help call)."""
    from rich.markup import escape

    if getattr(thing, "_ldot_help_escaped", False):
        return
    for name in fields:
        value = getattr(thing, name, None)
        if isinstance(value, str):
            setattr(thing, name, escape(value))
    thing._ldot_help_escaped = True


def clean_param(param: Any) -> None:
    _escape_help(param, "help")
    if param.param_type_name == "argument":
        name = (param.name or "arg").upper() + ("..." if param.nargs != 1 else "")
        param.metavar = name
        param.display_type_rich = lambda ctx: None
        param._usage_display_name = lambda name=name, p=param: name if p.required else f"[{name}]"
        param._rich_display_name = lambda name=name: name
    elif getattr(param, "is_flag", False) or getattr(param, "count", False):
        param.display_type_rich = lambda ctx: None
    elif param.metavar is None:
        param.metavar = _type_word(param)


def verify_report(results: dict[str, list[str]], none: str, damaged: str) -> int:
    """Print ``ok NAME`` / ``FAILED NAME: problems`` per checked item; ``none`` when nothing was checked, and
    ``damaged`` (what to do, with ``{n}`` for the count) when something failed. Returns the number that failed."""
    bad = 0
    for name, problems in results.items():
        if problems:
            bad += 1
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            out.print(line(("FAILED", "red"), " ", name, ": ", shown))
        else:
            out.print(line(("ok", "green"), " ", name))
    if not results:
        err.print(line(none))
    if bad:
        err.print(line(damaged.format(n=bad)))
    return bad


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def progress_enabled() -> bool:
    return not flag("LDOT_NO_PROGRESS")


@contextmanager
def progress_bar(unit: str = "images", transient: bool = False) -> Iterator[RichProgress]:
    """A rich progress bar on stderr with count, rate and ETA (``unit`` ``bytes`` shows sizes)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    if unit == "bytes":
        columns = [TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
                   TransferSpeedColumn(), TimeRemainingColumn()]
    else:
        columns = [TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                   TaskProgressColumn(), TextColumn("{task.fields[rate]}", markup=False), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=transient, disable=not progress_enabled()) as progress:
        yield progress


class ProgressView:
    """Draws `models.core.progress` reports: one rich task per stage with its count (or bytes), rate and ETA;
    training's validation and checkpoint events as lines above the bars."""

    def __init__(self, progress: RichProgress) -> None:
        import time

        self._time = time.monotonic
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}
        self.starts: dict[str, tuple[float, int]] = {}  # stage -> (clock, done) at its first report

    def __call__(self, p: Progress) -> None:
        if p.event == "eval":
            self._eval_line(p)
            return
        if p.event == "checkpoint":
            self.progress.console.print(line((f"step {p.done}: checkpoint saved", "dim")))
            return
        if p.event == "note":
            if "message" in p.info:  # something the run decided that the user should know (the hard-negative gate)
                from models.core.errors import render

                message = render(str(p.info.get("message", "")), lambda name: "--" + name.replace("_", "-"))
                self.progress.console.print(line((f"step {p.done}: ", "yellow"), message))
            else:  # a line worth reading before the stage runs (e.g. how long it will take)
                self.progress.console.print(line((str(p.info.get("text", "")), "dim")))
            return
        if p.stage not in self.tasks:
            self.tasks[p.stage] = self.progress.add_task(safe(p.stage), total=p.total, completed=p.done, rate="")
            self.starts[p.stage] = (self._time(), p.done)
        elif p.done < self.progress.tasks[self.tasks[p.stage]].completed:  # the stage runs again (mining per epoch)
            self.progress.reset(self.tasks[p.stage], total=p.total, completed=p.done)
            self.starts[p.stage] = (self._time(), p.done)
        started, first = self.starts[p.stage]
        elapsed = self._time() - started
        # a stage's clock starts at its first report; no rate until it has run a moment
        rate = f"{(p.done - first) / elapsed:.2f} {p.unit}/s" if p.done > first and elapsed > 0.5 else ""
        description = safe(p.stage)
        if "task_losses" in p.info:  # training: where it is and how the losses go
            losses = " ".join(f"{k} {v:.3f}" for k, v in sorted(p.info["task_losses"].items()))
            description = safe(f"epoch {p.info.get('epoch', 0.0):.2f} {losses}")
        if "files" in p.info and "of" in p.info:  # a batch of downloads: files done of all
            description += f" ({p.info['files']:,}/{p.info['of']:,} files)"
        if "lr" in p.info and rate:
            rate += f" lr {p.info['lr']:.2e}"
        self.progress.update(self.tasks[p.stage], completed=p.done, total=p.total, rate=rate,
                             description=description)

    def _eval_line(self, p: Progress) -> None:
        m = p.info["metrics"]
        t2i = "/".join(f"{v:.1f}" for v in m["text_to_image"].values())
        i2t = "/".join(f"{v:.1f}" for v in m["image_to_text"].values())
        self.progress.console.print(line(f"step {p.done}: mean recall {m['mean_recall']:.2f} "
                                         f"(text->image R@1/5/10 {t2i}; image->text {i2t})"))
