"""`ldot search QUERY` answered by a running server before the command line loads.

`ldot_cli.main.run` hands a plain text query here first: this module reads the options it knows (``-k``,
``--name``/``-n``, ``--json``, ``--paths``, ``-0``, ``--min-score``, ``--rerank``, ``--rerank-k``,
``--reranker``, ``--regions``), asks the index's running server and prints the answer exactly as the full
command would. Anything else (another option, a usage error, no server, an error answer) returns False and
the full command line (typer) runs instead, so that every output and exit code stays the full path's.
Imports: the standard library, `ldot_cli.serve.client`, `ldot_cli.index.hits`, and rich's console and table
only to print a table (not typer, click, pydantic, numpy or torch).
"""

from __future__ import annotations

import json
import sys
from typing import Any

_VALUE_OPTIONS = {"-k": "k", "--name": "name", "-n": "name", "--min-score": "min_score", "--rerank-k": "rerank_k",
                  "--reranker": "reranker"}
_FLAGS = {"--json": "json", "--paths": "paths", "-0": "null", "--rerank": "rerank", "--regions": "regions"}


def parse(args: list[str]) -> dict[str, Any] | None:
    """The options of a plain `ldot search QUERY ...` (``args``: what follows ``search``), or None when this is
    not one the fast path answers (the full command line then handles it, errors included)."""
    got: dict[str, Any] = {"k": "10", "name": "default", "min_score": None, "rerank_k": "50", "reranker": None,
                           "json": False, "paths": False, "null": False, "rerank": False, "regions": False}
    query = None
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" in arg:
            arg, value = arg.split("=", 1)
            if arg not in _VALUE_OPTIONS:
                return None
            got[_VALUE_OPTIONS[arg]] = value
        elif arg in _VALUE_OPTIONS:
            if i + 1 == len(args) or args[i + 1].startswith("-"):
                return None  # a missing value, or one click might read otherwise
            got[_VALUE_OPTIONS[arg]] = args[i + 1]
            i += 1
        elif arg in _FLAGS:
            got[_FLAGS[arg]] = True
        elif arg.startswith("-") or query is not None:
            return None  # another option, `--`, a second QUERY: the full command line
        else:
            query = arg
        i += 1
    if query is None or not query.strip():
        return None
    for number in ("k", "rerank_k"):
        if not (got[number].isascii() and got[number].isdigit() and int(got[number]) >= 1):
            return None  # click's reading of numbers (and the errors) stay the full path's
        got[number] = int(got[number])
    if sum((got["json"], got["paths"], got["null"])) > 1:
        return None
    got["query"] = query
    got["mode"] = "json" if got["json"] else "paths" if got["paths"] else "null" if got["null"] else "table"
    return got


def answer_quickly(args: list[str]) -> bool:
    """Answer `ldot search` ``args`` through a running server and print the results; False when it did not
    (nothing printed: run the full command)."""
    got = parse(args)
    if got is None:
        return False
    from ldot_cli.serve.client import (
        ServerRefused,
        ServerUnavailable,
        answer_from_json,
        find_server,
        post,
        search_body,
    )

    try:
        server = find_server(got["name"])
    except Exception:  # noqa: BLE001 - an unusable LDOT_HOME, say: the full path says what is wrong
        return False
    if server is None:
        return False
    body = search_body(got["query"], None, got["k"], got["rerank_k"] if got["rerank"] else None, got["reranker"],
                       got["min_score"], got["regions"])
    try:
        data = post(server, "/api/search", body)
    except (ServerUnavailable, ServerRefused):
        return False
    if data.get("boxes_note"):  # a warning line to print as the full command prints warnings: let it answer
        return False
    print_answer(answer_from_json(data), got["mode"])
    return True


def print_answer(answer: Any, mode: str) -> None:
    """Print an answer's results: a table (or "no good match"), ``--json``, ``--paths`` or ``-0``."""
    hits = answer.hits
    if mode == "json":
        sys.stdout.write(json.dumps([h.to_json() for h in hits], ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return
    if mode in ("paths", "null"):
        sep = b"\0" if mode == "null" else b"\n"
        sys.stdout.buffer.write(b"".join(h.path + sep for h in hits))
        sys.stdout.flush()
        return
    from ldot_cli.commands.console import cell, err, line, out

    if answer.no_match:
        out.print(line(f"no good match (none of the top results scores {answer.min_score:.3f} or more)"))
        return
    if not hits:
        err.print("no results")
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False)
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    if hits[0].rerank_score is not None:
        table.add_column("rerank", justify="right")
    with_boxes = any(h.regions is not None for h in hits)
    if with_boxes:  # --regions: the boxes driving each score, in pixels, with how much removing each costs
        table.add_column("boxes (x1,y1-x2,y2: score drop)", no_wrap=True)
    table.add_column("path", overflow="fold")
    for hit in hits:
        cells: list[str | Text] = [str(hit.rank), f"{hit.score:.3f}"]
        if hit.rerank_score is not None:
            cells.append(f"{hit.rerank_score:.3f}")
        if with_boxes:
            cells.append("\n".join(_box_text(box) for box in hit.pixel_regions()) or "-")
        cells.append(cell(hit.path))
        table.add_row(*cells)
    out.print(table)


def _box_text(box: list[float]) -> str:
    x1, y1, x2, y2, weight = box
    return f"{x1:.0f},{y1:.0f}-{x2:.0f},{y2:.0f}: {weight:.3f}"
