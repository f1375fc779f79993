"""Rendering helpers: results to stdout, diagnostics and progress to stderr."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.text import Text

from models.core.progress import Progress

out = Console(soft_wrap=True)  # results
err = Console(stderr=True)  # diagnostics, progress, errors

# C0 and C1 control characters and the bidirectional overrides/isolates: never sent to a terminal raw
_UNSAFE = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)] if c not in (0x09,)}
_UNSAFE.update({c: f"\\u{c:04x}" for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F]})


def safe(text: str) -> str:
    """User data (a file name, a caption) made safe for a terminal: control characters escaped as ``\\xNN``.

    Print the result as plain text (``Text(...)``, or ``markup=False``), never as rich markup.
    """
    return text.translate(_UNSAFE)


def cli_message(exc: BaseException, flags: dict[str, str] | None = None) -> str:
    """An error's one-line message as the command line says it: settings the library names by their Python
    name (`models.core.errors.option`) shown as flags (``flags`` maps names to the running command's own)."""
    flags = flags or {}
    for_cli = getattr(exc, "for_cli", None)
    if for_cli is None:
        return " ".join(str(exc).split())
    return " ".join(for_cli(lambda name: flags.get(name, "--" + name.replace("_", "-"))).split())


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def progress_enabled() -> bool:
    return os.environ.get("LDOT_NO_PROGRESS", "") == ""


@contextmanager
def progress_bar(unit: str = "images", transient: bool = False) -> Iterator[Any]:
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
        columns = [TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=transient, disable=not progress_enabled()) as progress:
        yield progress


class ProgressView:
    """Draws `models.core.progress` reports: one rich task per stage with its count (or bytes), rate and ETA;
    training's validation and checkpoint events as lines above the bars."""

    def __init__(self, progress: Any) -> None:
        import time

        self._time = time.monotonic
        self.progress = progress
        self.tasks: dict[str, Any] = {}
        self.starts: dict[str, tuple[float, int]] = {}  # stage -> (clock, done) at its first report

    def __call__(self, p: Progress) -> None:
        if p.event == "eval":
            self._eval_line(p)
            return
        if p.event == "checkpoint":
            self.progress.console.print(Text(f"step {p.done}: checkpoint saved", style="dim"))
            return
        if p.stage not in self.tasks:
            self.tasks[p.stage] = self.progress.add_task(safe(p.stage), total=p.total, completed=p.done, rate="")
            self.starts[p.stage] = (self._time(), p.done)
        started, first = self.starts[p.stage]
        elapsed = self._time() - started
        # a stage's clock starts at its first report; no rate until it has run a moment
        rate = f"{(p.done - first) / elapsed:.2f} {p.unit}/s" if p.done > first and elapsed > 0.5 else ""
        description = safe(p.stage)
        if "task_losses" in p.info:  # training: where it is and how the losses go
            losses = " ".join(f"{k} {v:.3f}" for k, v in sorted(p.info["task_losses"].items()))
            description = f"epoch {p.info.get('epoch', 0.0):.2f} {losses}"
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
        self.progress.console.print(f"step {p.done}: mean recall {m['mean_recall']:.2f} "
                                    f"(text->image R@1/5/10 {t2i}; image->text {i2t})", highlight=False)
