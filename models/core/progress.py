"""The one progress protocol of ldot's long work: downloads, extraction, indexing, evaluation, training.

The library reports; it never draws. A long-running function takes ``progress: ProgressFn | None`` and calls it
with a :class:`Progress` as work advances; the command line turns each stage into a rich bar (count, rate, ETA),
and a test can simply collect the events in a list.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Progress:
    """One report: how far a stage of the work has come."""

    stage: str  # what is being done, shown as the bar's label: "extracting", "encoding", "flickr-ft.pt", "train"
    done: int  # units of this stage done so far
    total: int | None = None  # units this stage will do; None when not known (e.g. a download without a size)
    unit: str = "items"  # what a unit is: "bytes", "images", "captions", "pairs", "steps", ...
    # "update", or a moment worth its own line: "start", "eval", "checkpoint", "done", "note" (info["text"]: a line)
    event: str = "update"
    info: Mapping[str, Any] = field(default_factory=dict)  # further figures of the stage (loss, lr, failed, ...)


ProgressFn = Callable[[Progress], None]


def report(progress: ProgressFn | None, stage: str, done: int, total: int | None = None, unit: str = "items",
           event: str = "update", **info: Any) -> None:
    """Call ``progress`` (when there is one) with a :class:`Progress` built from the arguments."""
    if progress is not None:
        progress(Progress(stage, done, total, unit, event, info))
