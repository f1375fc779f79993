"""`ldot search`: text (or image) queries over an index; interactive when no query is given."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ldot_cli.commands.console import cli_message, err, line
from ldot_cli.commands.quick import print_answer

if TYPE_CHECKING:
    from ldot_cli.index.hits import Answer


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
    reranker: str = typer.Option(None, help="Cross-encoder (default: the best present for the index: uniter-base, "
                                 "lxmert-base-uncased, then vilt-flickr30k, which reads the photos and re-ranks any "
                                 "index)."),
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
    no_server: bool = typer.Option(False, "--no-server", help="Search in this process: neither use a running "
                                   "server nor start one (LDOT_NO_SERVER=1 does the same)."),
) -> None:
    """Search an index by text (or by --image); with no QUERY in a terminal, an interactive prompt.
    Uses a running `ldot serve` of the same index when there is one, and the first search of an index starts
    one in the background that later searches use (it exits after 5 idle minutes; `ldot serve --stop` stops
    it; LDOT_AUTO_SERVER=0: never start one; LDOT_NO_SERVER=1 or --no-server: never use one)."""
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
    if (query is not None or image is not None) and not no_server:
        answer = _through_server(name, query, image, k, m, reranker, min_score, want_regions, model)
        if answer is not None:
            _show(answer, mode, html, preview, query)
            return
    from ldot_cli.index.search import Request, Searcher

    searcher = Searcher(name, model=model, device=device)
    try:
        if rerank and image is None:
            _preset_note(searcher, reranker)  # finds (and loads) the re-ranker first: no estimate for a missing one
            _rerank_note(searcher, reranker, min(m or 0, searcher.store.counts().get("indexed", 0)), device)
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
                    reranker: str | None, min_score: str | None, regions: bool, model: str | None) -> Answer | None:
    """The answer of a running `ldot serve` for this index (started in the background when none runs and that
    is allowed), or None (it cannot answer this: search here)."""
    from ldot_cli.index.hits import Answer
    from ldot_cli.serve.client import (
        ServerRefused,
        ServerUnavailable,
        find_server,
        post,
        search_body,
    )
    from models.core.errors import LdotError

    if model is not None:
        return None
    server = find_server(name)
    if server is None and image is None:  # image queries do not start one: unindexed images run the detector here
        server = _start_server(name)
    if server is None:
        return None
    sha256 = None
    if image is not None:
        from models.core.fileio import sha256_file

        if not image.is_file():
            return None  # the local path gives the error
        sha256 = sha256_file(image)  # only indexed images: others need the detector, run here
    body = search_body(query, sha256, k, rerank_k, reranker, min_score, regions)
    try:
        try:
            data = post(server, "/api/search", body)
        except ServerUnavailable:
            if find_server(name) is not None:  # alive but not answering: leave it be, search here
                return None
            server = _start_server(name) if image is None else None  # it died just now: once more, a new one
            if server is None:
                return None
            data = post(server, "/api/search", body)
    except ServerUnavailable:
        return None
    except ServerRefused as exc:
        if exc.status in (404, 409, 413, 422, 503):
            return None  # not indexed / another index / too large for the server / index busy: answer it here
        raise LdotError(exc.message) from None
    try:
        answer = Answer.from_json(data)
    except ValueError:
        return None  # not an answer this ldot reads (another version's server?): answer it here
    if data.get("boxes_note"):  # asked for boxes the index does not have: said as a local search says it
        import warnings

        from models.core.errors import LdotWarning

        warnings.warn(LdotWarning(str(data["boxes_note"])), stacklevel=2)
    return answer


def _start_server(name: str) -> Any:
    """Start a background server of this index for this and later searches; None when that is turned off, not
    installed, or it did not come up (then this search runs here)."""
    from ldot_cli.index.layout import DB_FILE, index_path
    from ldot_cli.serve.client import auto_start_allowed, idle_seconds, start_background

    if not auto_start_allowed() or not (index_path(name) / DB_FILE).is_file():
        return None  # no such index: the local path says so
    # -P: not the current folder on the module path (a shared /tmp must not supply its modules)
    try:
        server, first = start_background(name, [sys.executable, "-P", "-m", "ldot_cli.main", "serve",
                                                "--background", "--name", name])
    except OSError:  # a serve folder that is not ours (a shared LDOT_HOME), say: search here
        return None
    if first:
        minutes = idle_seconds() / 60
        err.print(line((f"started a background `ldot serve` for index {name!r} so that the next searches are fast; "
                        f"it exits after {minutes:g} idle minute{'' if minutes == 1 else 's'} (`ldot serve --stop` "
                        "stops it, LDOT_AUTO_SERVER=0 turns this off)", "dim")), soft_wrap=True)
    return server


def _show(answer: Answer, mode: str, html: Path | None, preview: bool, query: str | None) -> None:
    if html is not None:
        from ldot_cli.commands.sheet import write_sheet

        write_sheet(html, answer.hits, query)
    if preview and not (answer.no_match and mode == "table"):
        from ldot_cli.commands.sheet import preview_table

        if preview_table(answer.hits):
            return
    print_answer(answer, mode)


def _rerank_note(searcher: Any, reranker: str | None, m: int, device: str) -> None:
    """On a CPU, how long re-ranking will take per query (the re-ranker's measured range per pair)."""
    import torch

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        name = searcher.reranker_name(reranker)
        lo, hi = searcher.reranker(reranker).cpu_seconds_per_pair
        reads = "reading the photos" if getattr(searcher.reranker(reranker), "inputs", "") == "pixels" else "on regions"
        err.print(line((f"re-ranking {m} images with {name} ({reads}) on the CPU (no GPU): expect roughly "
                        f"{max(1, round(m * lo))}-{max(2, round(m * hi))} s per query", "dim")))


def _preset_note(searcher: Any, reranker: str | None) -> None:
    """LXMERT learnt from exactly 36 boxes per image: say so when the index holds another box preset."""
    from models.nn.cross_encoder import LxmertReranker

    if isinstance(searcher.reranker(reranker), LxmertReranker) and searcher.preset != "lxmert36":
        err.print(line((f"note: LXMERT was trained on 36 boxes per image and this index holds `{searcher.preset}` "
                        "regions; for LXMERT re-ranking as published, re-index with `--preset lxmert36 --reindex`",
                        "dim")))


def _interactive(searcher: Any, mode: str, html: Path | None, preview: bool, template: Any) -> None:
    """The prompt: each line is answered like a one-shot query with the same options (``template``: -k,
    --rerank, --min-score, --regions; --html rewrites the sheet for the latest query, --preview shows it)."""
    import dataclasses

    from models.core.errors import LdotError

    err.print(line(("ldot", "bold"), " search over index ", (searcher.store.name, "bold"),
                   " — type a query (Up/Down: earlier ones), empty line or Ctrl-D to quit"))
    remember = _line_editor()
    loaded = _load_in_background(searcher)
    while True:
        try:
            text = input("ldot> ")
        except (EOFError, KeyboardInterrupt):
            err.print()
            return
        if not text.strip():
            return
        remember()
        loaded()  # the first query waits for the text tower (and raises what loading it raised)
        try:
            answer = searcher.answer(dataclasses.replace(template, text=text))
            _show(answer, mode, html, preview, text)
            t = answer.timings
            err.print(line((f"{t.encode_ms:.0f} ms encode, {t.search_ms:.0f} ms search"
                            + (f", {t.rerank_ms:.0f} ms re-rank" if template.rerank_k else ""), "dim")))
        except LdotError as exc:
            err.print(line(("error: ", "red"), cli_message(exc)))


def _load_in_background(searcher: Any) -> Any:
    """Import torch and load the text tower and the vector index while the user types the first query (seconds
    on a busy CPU: the prompt is ready at once). Returns a function that waits for the loading and raises what it
    raised; only the loading thread touches ``searcher`` until then."""
    import threading

    failed: list[BaseException] = []

    def load() -> None:
        try:
            searcher.encoder  # noqa: B018 - load the text tower
            searcher.vectors.load()  # and the vector file, so that the first query costs what the others do
        except BaseException as exc:  # noqa: BLE001 - re-raised in the prompt's thread
            failed.append(exc)

    thread = threading.Thread(target=load, name="ldot-load", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failed:
            raise failed.pop()

    return wait


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
    from models.core.home import search_history_path

    path = search_history_path()
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
