"""The kill tests' hooks, installed in the processes the tests start (never in ldot itself).

The tests put this folder first on the PYTHONPATH of an `ldot` run (and of the Ray cluster, whose worker processes
inherit it), so Python imports this file at start-up. It reads the tests' own environment variables and, when one
is set, adds a hook to a seam of `ldot_cli.index.hooks`:

- ``LDOT_TEST_PAUSE_AFTER=N`` (+ ``LDOT_TEST_PAUSE_FILE``): once a run has committed N contents it writes the
  file and waits there forever, to be killed at a known point of progress;
- ``LDOT_RAY_PID_DIR``: each Ray extraction actor writes ``actor-<pid>`` there, so a test can kill its process;
- ``LDOT_RAY_BATCH_DELAY_S``: each actor waits that long before a batch, so work stays in flight to be killed.
"""

from __future__ import annotations

import os


def _install() -> None:
    after, marker = os.environ.get("LDOT_TEST_PAUSE_AFTER"), os.environ.get("LDOT_TEST_PAUSE_FILE")
    pid_dir, delay = os.environ.get("LDOT_RAY_PID_DIR"), os.environ.get("LDOT_RAY_BATCH_DELAY_S")
    if not (after or pid_dir or delay):
        return
    import time

    from ldot_cli.index import hooks

    if after:
        def pause(done: int) -> None:
            if done < int(after):
                return
            if marker:
                with open(marker, "w") as handle:
                    handle.write(str(done))
            while True:
                time.sleep(3600)

        hooks.committed.append(pause)
    if pid_dir:
        def announce() -> None:
            with open(os.path.join(pid_dir, f"actor-{os.getpid()}"), "w") as handle:
                handle.write(str(os.getpid()))

        hooks.actor_ready.append(announce)
    if delay:
        hooks.batch_start.append(lambda: time.sleep(float(delay)))


_install()
