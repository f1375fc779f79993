"""`ldot serve`: a local web page to search an index and look at the photos (models and index kept warm)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import typer

from ldot_cli.commands.console import err, line, out

if TYPE_CHECKING:
    import uvicorn


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    name: str = typer.Option("default", "--name", "-n", help="Index to serve."),
    port: int = typer.Option(8765, "--port", "-p", min=0, max=65535, help="Port (0: any free one)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Anything but loopback needs the "
                             "access token printed in the URL."),
    model: str = typer.Option(None, help="Bi-encoder to encode queries (must be the index's model)."),
    device: str = typer.Option("auto", help="Device for re-ranking: auto, cpu or cuda."),
    reranker: str = typer.Option(None, help="Cross-encoder for re-ranking (a catalogue name or a path; default: "
                                 "the best present for the index). Requests may name only it or a catalogue one."),
    stop: bool = typer.Option(False, "--stop", help="Stop this user's running servers (the background ones "
                              "`ldot search` starts, too) and exit."),
    background: bool = typer.Option(False, "--background", hidden=True, help="What `ldot search` starts: "
                                    "loopback only, a token always, gone after LDOT_SERVER_IDLE idle seconds."),
) -> None:
    """Serve a search page for an index on http://127.0.0.1:PORT/ (Ctrl-C stops it). `ldot search` on the
    same index uses the running server, so a query from the shell skips loading the models (the first
    `ldot search` of an index starts one in the background; LDOT_AUTO_SERVER=0 turns that off)."""
    import secrets
    import signal
    import socket

    from rich.text import Text

    from ldot_cli.serve.client import announce, hold_lock, withdraw
    from models.core.errors import LdotError

    if stop:
        _stop_all()
        return
    try:
        import uvicorn
    except ImportError:
        raise LdotError("`ldot serve` needs the web extra: pip install '.[serve]' in ldot's folder") from None
    from ldot_cli.serve.app import ServeState, create_app, is_loopback

    lock = None
    if background:  # one per index; whoever holds the lock starts it, the others go
        host, port = "127.0.0.1", 0
        lock = hold_lock(name)
        if lock is None:
            return
    state = ServeState(name, model=model, device=device, reranker=reranker)
    try:
        with err.status("loading the index and the text model…"):
            state.warm()
    except BaseException:
        if background:
            _clean_up(name)  # it never served: its lock and log go
        raise
    # a background server is nobody's page: every request needs the token, which only this user can read
    token = secrets.token_urlsafe(18) if background or not is_loopback(host) else None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise LdotError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): choose another --port") from None
    sock.listen(128)
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}/" + (f"?token={token}" if token else "")
    info = state.info()
    config = uvicorn.Config(create_app(state, token, host), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    announce(name, host, port, token, background=background)
    try:
        err.print(Text.assemble(("ldot serve", "bold"), f": index {name!r} ({info['images']:,} images, model ",
                                str(info["model"]), ")  Ctrl-C to stop"))
        if token and not background:
            err.print(Text(f"bound to {host}: anyone who can reach this port needs the token in the URL"))
        if background:  # its log keeps no token: clients read it from the announcement
            _exit_when_idle(server, state, name)
        else:
            out.print(Text(url), soft_wrap=True)
        # uvicorn stops gracefully on SIGINT/SIGTERM, then re-raises the signal: end quietly here instead
        signal.signal(signal.SIGTERM, _stop)
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        ours = background and _is_ours_or_gone(name)
        withdraw(name)
        state.close()
        sock.close()
        if ours:
            _clean_up(name)
        if lock is not None:
            import os

            os.close(lock)


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _is_ours_or_gone(name: str) -> bool:
    from ldot_cli.serve.client import announce_path, is_ours

    return is_ours(name) or not announce_path(name).exists()


def _clean_up(name: str) -> None:
    """A background server leaves nothing behind: its log and lock go with it (the announcement: `withdraw`)."""
    from ldot_cli.serve.client import serve_dir

    for suffix in (".log", ".lock"):
        try:
            (serve_dir() / f"{name}{suffix}").unlink()
        except OSError:
            pass


class _Answering(Protocol):
    answered: int  # queries answered since start


def _exit_when_idle(server: uvicorn.Server, state: _Answering, name: str) -> None:
    """A background server ends itself after LDOT_SERVER_IDLE seconds without a query, when its index was
    removed, or when another server of the index took its announcement over."""
    import threading
    import time

    from ldot_cli.index.layout import DB_FILE, index_path
    from ldot_cli.serve.client import idle_seconds, is_ours

    idle = idle_seconds()
    db = index_path(name) / DB_FILE

    def watch() -> None:
        seen, last = -1, time.monotonic()
        while not server.should_exit:
            time.sleep(min(2.0, idle / 4))
            answered = state.answered
            if answered != seen:
                seen, last = answered, time.monotonic()
            if time.monotonic() - last > idle or not db.exists() or not is_ours(name):
                server.should_exit = True

    threading.Thread(target=watch, name="ldot-idle", daemon=True).start()


def _stop_all() -> None:
    from ldot_cli.serve.client import servers, stop_server

    running = servers()
    if not running:
        err.print(line("no ldot server is running"))
        return
    for info in running:
        pid = stop_server(str(info["index"]))
        if pid is not None:
            err.print(line(f"stopped the server of index {info['index']!r} (pid {pid})"))
