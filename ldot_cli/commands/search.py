"""`ldot search`: text (or image) queries over an index; interactive when no query is given."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from ldot_cli.commands.console import cell, cli_message, err, line, out


def register(app: typer.Typer) -> None:
    app.command("search")(search)


def search(
    query: str = typer.Argument(None, help="What to look for, e.g. \"a dog on a beach\". Omit for a prompt."),
    k: int = typer.Option(10, "-k", help="Number of results."),
    name: str = typer.Option("default", "--name", "-n", help="Index to search."),
    json_: bool = typer.Option(False, "--json", help="Print a JSON list of {rank, path, score[, rerank_score]}."),
    paths: bool = typer.Option(False, "--paths", help="Print one path per line."),
    null: bool = typer.Option(False, "-0", help="Print paths separated by NUL bytes (for xargs -0)."),
    rerank: bool = typer.Option(False, "--rerank", help="Re-score the top results with a cross-encoder."),
    rerank_k: int = typer.Option(50, "--rerank-k", help="How many top results --rerank re-scores."),
    reranker: str = typer.Option(None, help="Cross-encoder (default: uniter-base, else lxmert-base-uncased)."),
    image: Path = typer.Option(None, "--image", help="Find images similar to this image file."),
    model: str = typer.Option(None, help="Bi-encoder to encode the query (must be the index's model)."),
    device: str = typer.Option("auto", help="Device for re-ranking and --image: auto, cpu or cuda."),
    min_score: str = typer.Option(None, "--min-score", help="Drop results scoring below this: a number, or "
                                  "'auto' (the model's calibrated level; 'no good match' when none passes)."),
    regions: bool = typer.Option(False, "--regions", help="Find the boxes that drive each score (--json: "
                                 "regions: [[x1,y1,x2,y2,weight],...] in pixels)."),
    html: Path = typer.Option(None, "--html", help="Also write a self-contained HTML contact sheet of the "
                              "results, with their regions, to this file."),
    preview: bool = typer.Option(False, "--preview", help="Show thumbnails in the terminal (kitty, iTerm, "
                                 "sixel; text-only elsewhere)."),
) -> None:
    """Search an index by text (or by --image); with no QUERY in a terminal, an interactive prompt.
    Uses a running `ldot serve` of the same index when there is one (LDOT_NO_SERVER=1: never)."""
    from models.core.errors import LdotError

    if sum((json_, paths, null)) > 1:
        raise LdotError("choose one of --json, --paths and -0")
    if query is not None and image is not None:
        raise LdotError("give either a text QUERY or --image FILE, not both")
    if query is None and image is None and not sys.stdin.isatty():
        raise LdotError("no query: give one, e.g. `ldot search \"a dog on a beach\"` (or run it in a terminal "
                        "for a prompt)")
    if preview and (json_ or paths or null):
        raise LdotError("--preview shows the table with thumbnails: leave out --json, --paths and -0")
    if rerank and rerank_k < 1:
        raise LdotError(f"--rerank-k must be at least 1 (got {rerank_k}): it is how many top results are re-scored")
    mode = "json" if json_ else "paths" if paths else "null" if null else "table"
    m = rerank_k if rerank else None
    want_regions = regions or html is not None
    if query is not None or image is not None:
        answer = _through_server(name, query, image, k, m, reranker, min_score, want_regions, model)
        if answer is not None:
            _show(answer, mode, html, preview, query)
            return
    from ldot_cli.index.search import Request, Searcher

    searcher = Searcher(name, model=model, device=device)
    try:
        if rerank and image is None:
            _rerank_note(m or 0, device)
            _preset_note(searcher, reranker)
        if query is None and image is None:
            _interactive(searcher, mode, html, preview, Request(text="", k=k, rerank_k=m, reranker=reranker,
                                                                min_score=min_score, regions=want_regions))
            return
        request = Request(text=query, image_path=str(image) if image is not None else None, k=k,
                          rerank_k=m, reranker=reranker, min_score=min_score, regions=want_regions)
        _show(searcher.answer(request), mode, html, preview, query)
    finally:
        searcher.close()


def _through_server(name: str, query: str | None, image: Path | None, k: int, rerank_k: int | None,
                    reranker: str | None, min_score: str | None, regions: bool, model: str | None) -> Any:
    """The answer of a running `ldot serve` for this index, or None (none runs, or it cannot answer this)."""
    from ldot_cli.serve.client import (
        ServerRefused,
        ServerUnavailable,
        find_server,
        post,
    )
    from models.core.errors import LdotError

    server = find_server(name)
    if server is None or model is not None:
        return None
    body: dict[str, Any] = {"k": k, "rerank": bool(rerank_k), "rerank_k": rerank_k or 50, "reranker": reranker,
                            "min_score": min_score, "regions": regions}
    if image is not None:
        from models.core.fileio import sha256_file

        if not image.is_file():
            return None  # the local path gives the error
        body["sha256"] = sha256_file(image)  # only indexed images: others need the detector, run here
    else:
        body["q"] = query
    try:
        data = post(server, "/api/search", body)
    except ServerUnavailable:
        return None
    except ServerRefused as exc:
        if exc.status in (404, 413, 422, 503):
            return None  # not indexed / too large for the server / index busy: answer it here
        raise LdotError(exc.message) from None
    if data.get("boxes_note"):  # asked for boxes the index does not have: said as a local search says it
        import warnings

        from models.core.errors import LdotWarning

        warnings.warn(LdotWarning(str(data["boxes_note"])), stacklevel=2)
    return _answer_from_json(data)


def _answer_from_json(data: dict[str, Any]) -> Any:
    from types import SimpleNamespace

    from ldot_cli.index.hits import hit_from_json

    timings = SimpleNamespace(**data.get("timings", {}))
    return SimpleNamespace(hits=[hit_from_json(h) for h in data["hits"]], min_score=data.get("min_score"),
                           no_match=bool(data.get("no_match")), below=int(data.get("below", 0)), timings=timings)


def _show(answer: Any, mode: str, html: Path | None, preview: bool, query: str | None) -> None:
    if html is not None:
        from ldot_cli.commands.sheet import write_sheet

        write_sheet(html, answer.hits, query)
    if answer.no_match and mode in ("table",):
        out.print(line(f"no good match (none of the top results scores {answer.min_score:.3f} or more)"))
        return
    if preview:
        from ldot_cli.commands.sheet import preview_table

        if preview_table(answer.hits):
            return
    _render(answer.hits, mode)


def _rerank_note(m: int, device: str) -> None:
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        # measured on 2 cores, base UNITER: 45 ms per pair with 36 regions, 123 ms with 100
        err.print(line((f"re-ranking {m} images on the CPU (no GPU): expect roughly {max(1, round(m * 0.045))}-"
                        f"{max(2, round(m * 0.13))} s per query with a base-size cross-encoder", "dim")))


def _preset_note(searcher: Any, reranker: str | None) -> None:
    """LXMERT learnt from exactly 36 boxes per image: say so when the index holds another box preset."""
    from models.nn.cross_encoder import LxmertReranker

    if isinstance(searcher.reranker(reranker), LxmertReranker) and searcher.preset != "lxmert36":
        err.print(line((f"note: LXMERT was trained on 36 boxes per image and this index holds `{searcher.preset}` "
                        "regions; for LXMERT re-ranking as published, re-index with `--preset lxmert36 --reindex`",
                        "dim")))


def _render(hits: list[Any], mode: str) -> None:
    if mode == "json":
        sys.stdout.write(json.dumps([h.to_json() for h in hits], ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return
    if mode in ("paths", "null"):
        sep = b"\0" if mode == "null" else b"\n"
        sys.stdout.buffer.write(b"".join(h.path + sep for h in hits))
        sys.stdout.flush()
        return
    if not hits:
        err.print("no results")
        return
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    if hits[0].rerank_score is not None:
        table.add_column("rerank", justify="right")
    table.add_column("path", overflow="fold")
    for hit in hits:
        cells = [str(hit.rank), f"{hit.score:.3f}"]
        if hit.rerank_score is not None:
            cells.append(f"{hit.rerank_score:.3f}")
        cells.append(cell(hit.path))
        table.add_row(*cells)
    out.print(table)


def _interactive(searcher: Any, mode: str, html: Path | None, preview: bool, template: Any) -> None:
    """The prompt: each line is answered like a one-shot query with the same options (``template``: -k,
    --rerank, --min-score, --regions; --html rewrites the sheet for the latest query, --preview shows it)."""
    import dataclasses

    from models.core.errors import LdotError

    err.print(line(("ldot", "bold"), " search over index ", (searcher.store.name, "bold"),
                   " — type a query (Up/Down: earlier ones), empty line or Ctrl-D to quit"))
    remember = _line_editor()
    searcher.encoder  # load the text tower before the first prompt
    while True:
        try:
            text = input("ldot> ")
        except (EOFError, KeyboardInterrupt):
            err.print()
            return
        if not text.strip():
            return
        remember()
        try:
            answer = searcher.answer(dataclasses.replace(template, text=text))
            _show(answer, mode, html, preview, text)
            t = answer.timings
            err.print(line((f"{t.encode_ms:.0f} ms encode, {t.search_ms:.0f} ms search"
                            + (f", {t.rerank_ms:.0f} ms re-rank" if template.rerank_k else ""), "dim")))
        except LdotError as exc:
            err.print(line(("error: ", "red"), cli_message(exc)))


HISTORY_FILE = "search_history"  # in $LDOT_HOME: the prompt's earlier queries, newest last
HISTORY_LENGTH = 1000


def _line_editor() -> Any:
    """Line editing for the prompt (GNU readline, through Python's `readline`: arrows, Ctrl-A/E/R, Up/Down through
    earlier queries), with the history kept in ``$LDOT_HOME/search_history`` across sessions. Returns a function
    that saves the history (called after each query, so a killed session keeps it). Without readline (e.g. on
    Windows) the prompt stays a plain line."""
    try:
        import readline
    except ImportError:  # pragma: no cover - Python built without readline
        return lambda: None
    from models.core.home import ldot_home

    path = ldot_home() / HISTORY_FILE
    readline.set_history_length(HISTORY_LENGTH)
    readline.clear_history()
    try:
        readline.read_history_file(path)
    except OSError:
        pass  # no history yet (or unreadable: start a new one)

    def save() -> None:
        import os

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
            os.chmod(path, 0o600)  # queries are the user's business
        except OSError:
            pass  # a read-only cache: the session still has its history

    return save
