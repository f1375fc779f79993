"""The `ldot` command. A plain text query to an index with a running server (`ldot search QUERY [-k N] [--name N]
[--json | --paths | -0] ...`) is answered before the command line loads (`ldot_cli.commands.quick`: no typer,
numpy or torch, ~0.1 s); everything else runs the full command line (`ldot_cli.commands.cli`)."""

from __future__ import annotations

import os
import sys
from typing import Any

# numpy's OpenBLAS threads spin after each call and starve torch's OpenMP pool: a 0.04 ms matrix-vector
# product right after a query encoding cost 75 ms (measured). The heavy maths runs in torch and FAISS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# torch's OpenMP threads spin between the hundreds of small parallel regions of one query encoding; on a CPU shared
# with other work a spinning thread holds a core that its sibling needs, and the prompt's base-size query took
# 1.5-1.7 s instead of 0.13-0.47 s with threads that sleep (2 cores at load ~9, benchmarks/serve.py). Set before
# torch loads; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run() -> None:
    """Console entry point."""
    if sys.argv[1:2] == ["search"]:
        from ldot_cli.commands.quick import answer_quickly

        if answer_quickly(sys.argv[2:]):
            sys.exit(0)
    from ldot_cli.commands.cli import app

    app()


def __getattr__(name: str) -> Any:
    """``ldot_cli.main.app``: the full command line, loaded when asked for."""
    if name == "app":
        from ldot_cli.commands.cli import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    run()
