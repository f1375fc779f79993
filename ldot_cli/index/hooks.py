"""Seams of a running index: points where code outside ldot may watch the work at a known moment (the kill tests
stop a run, or find a worker process, there).

Each seam is a list of callables, empty in ldot itself; ldot only calls what was appended. Nothing reads the
environment here, so nothing a user sets can stall or slow an index.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# a run has committed this many contents (a local run after each batch; a Ray driver after each merged shard)
committed: list[Callable[[int], None]] = []
# a Ray extraction actor has loaded its models (called in the actor's process)
actor_ready: list[Callable[[], None]] = []
# a Ray extraction actor is about to extract a batch (called in the actor's process)
batch_start: list[Callable[[], None]] = []


def fire(seam: list[Callable[..., None]], *args: Any) -> None:
    """Call every hook of ``seam`` with ``args``, in the order they were added."""
    for hook in seam:
        hook(*args)
