"""Rendering helpers: results to stdout, diagnostics and progress to stderr."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console

out = Console(soft_wrap=True)  # results
err = Console(stderr=True)  # diagnostics, progress, errors


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
        columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn()]
    else:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=transient, disable=not progress_enabled()) as progress:
        yield progress


def download_progress(progress: Any) -> Any:
    """An adapter from `models.core.progress` byte reports (downloads) to one rich task per stage (file or
    batch), drawn by a `progress_bar("bytes")`: size done, bytes/s and ETA."""
    tasks: dict[str, Any] = {}

    def callback(p: Any) -> None:
        label = p.stage
        files = p.info.get("files") if p.info else None
        description = f"{label} ({files:,}/{p.info['of']:,} files)" if files is not None else label
        if label not in tasks:
            tasks[label] = progress.add_task(description, total=p.total)
        progress.update(tasks[label], completed=p.done, total=p.total, description=description)

    return callback


class StageProgress:
    """An adapter from a library ``progress(stage, done, total)`` callback to one rich task per stage,
    each with its count, rate and ETA."""

    def __init__(self, progress: Any, unit: str = "") -> None:
        import time

        self._time = time.monotonic
        self.progress, self.unit = progress, unit
        self.tasks: dict[str, Any] = {}
        self.starts: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total, rate="")
            self.starts[stage] = self._time()
        elapsed = self._time() - self.starts[stage]
        # a stage's clock starts at its first update; no rate until it has run a moment
        rate = f"{done / elapsed:.2f}{' ' + self.unit if self.unit else ''}/s" if done and elapsed > 0.5 else ""
        self.progress.update(self.tasks[stage], completed=done, total=total, rate=rate)


class TrainView:
    """Renders `models.training.loop.Progress`: one bar of optimizer steps with steps/s, loss and ETA; a line per
    validation and a dim line per checkpoint."""

    def __init__(self, progress: Any) -> None:
        import time

        self._time = time.monotonic
        self.progress = progress
        self.task: Any = None
        self.started = 0.0
        self.first_step = 0

    def __call__(self, p: Any) -> None:
        if p.event == "start":
            self.task = self.progress.add_task("train", total=p.total, completed=p.step, rate="")
            self.started, self.first_step = self._time(), p.step
        elif p.event == "step":
            elapsed = max(self._time() - self.started, 1e-9)
            losses = " ".join(f"{k} {v:.3f}" for k, v in sorted(p.task_losses.items()))
            self.progress.update(self.task, completed=p.step, description=f"epoch {p.epoch:.2f} {losses}",
                                 rate=f"{(p.step - self.first_step) / elapsed:.2f} steps/s lr {p.lr:.2e}")
        elif p.event == "eval":
            m = p.metrics
            t2i = "/".join(f"{v:.1f}" for v in m["text_to_image"].values())
            i2t = "/".join(f"{v:.1f}" for v in m["image_to_text"].values())
            self.progress.console.print(f"step {p.step}: mean recall {m['mean_recall']:.2f} "
                                        f"(text->image R@1/5/10 {t2i}; image->text {i2t})", highlight=False)
        elif p.event == "checkpoint":
            self.progress.console.print(f"[dim]step {p.step}: checkpoint saved[/]", highlight=False)
