"""The one writer of an index: a file lock, and who holds it in words."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ldot_cli.index.layout import LOCK_FILE, LOCK_INFO_FILE
from models.core.errors import LdotWarning
from models.core.fileio import atomic_write_json


def lock_holder(directory: Path) -> str:
    """Who holds an index's lock, in words (from the info file its holder wrote)."""
    import datetime

    try:
        info = json.loads((directory / LOCK_INFO_FILE).read_text("utf-8"))
        since = datetime.datetime.fromtimestamp(float(info["since"])).strftime("%H:%M:%S")
        command = " ".join(str(info.get("command", "")).split())[:120]
        return f"pid {int(info['pid'])} on {info.get('host', '?')} ({command}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def writer_lock(directory: Path, wait: bool = True) -> Iterator[bool]:
    """Hold the index's writer lock; while another process holds it, say who (an `LdotWarning`) and wait.

    With ``wait=False`` yields False at once when the lock is taken. The holder's pid, host and command
    are written beside the lock (released by the OS when a process dies; the info file is then stale but
    harmless: the next holder rewrites it).
    """
    import socket
    import sys
    import warnings

    from filelock import FileLock, Timeout

    lock = FileLock(str(directory / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if not wait:
            yield False
            return
        warnings.warn(LdotWarning(f"index {directory.name!r} is being updated by {lock_holder(directory)}: "
                                  "waiting for it to finish (Ctrl-C to stop waiting)"), stacklevel=3)
        lock.acquire()
    try:
        try:
            atomic_write_json(directory / LOCK_INFO_FILE, {
                "pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                "command": " ".join([os.path.basename(sys.argv[0]) or "python", *sys.argv[1:]])})
        except OSError:
            pass  # only informative
        yield True
    finally:
        (directory / LOCK_INFO_FILE).unlink(missing_ok=True)
        lock.release()
