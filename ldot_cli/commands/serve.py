"""`ldot serve`: a local web page to search an index and look at the photos (models and index kept warm)."""

from __future__ import annotations

import typer

from ldot_cli.commands.console import err, out


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    name: str = typer.Option("default", "--name", "-n", help="Index to serve."),
    port: int = typer.Option(8765, "--port", "-p", min=0, max=65535, help="Port (0: any free one)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Anything but loopback needs the "
                             "access token printed in the URL."),
    model: str = typer.Option(None, help="Bi-encoder to encode queries (must be the index's model)."),
    device: str = typer.Option("auto", help="Device for re-ranking: auto, cpu or cuda."),
    reranker: str = typer.Option(None, help="Cross-encoder for re-ranking (name or path; default: uniter-base, "
                                 "else lxmert-base-uncased). Requests may name only it or a catalogue one."),
) -> None:
    """Serve a search page for an index on http://127.0.0.1:PORT/ (Ctrl-C stops it). `ldot search` on the
    same index uses the running server, so a query from the shell skips loading the models."""
    import secrets
    import signal
    import socket

    from rich.text import Text

    from ldot_cli.serve.app import ServeState, create_app, is_loopback
    from ldot_cli.serve.client import announce, withdraw
    from models.core.errors import LdotError

    try:
        import uvicorn
    except ImportError:
        raise LdotError("`ldot serve` needs the web extra: pip install '.[serve]' in ldot's folder") from None
    state = ServeState(name, model=model, device=device, reranker=reranker)
    with err.status("loading the index and the text model…"):
        state.warm()
    token = None if is_loopback(host) else secrets.token_urlsafe(18)
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
    announce(name, host, port, token)
    try:
        err.print(Text.assemble(("ldot serve", "bold"), f": index {name!r} ({info['images']:,} images, model ",
                                str(info["model"]), ")  Ctrl-C to stop"))
        if token:
            err.print(Text(f"bound to {host}: anyone who can reach this port needs the token in the URL"))
        out.print(Text(url), soft_wrap=True)
        # uvicorn stops gracefully on SIGINT/SIGTERM, then re-raises the signal: end quietly here instead
        signal.signal(signal.SIGTERM, _stop)
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        withdraw(name)
        state.close()
        sock.close()


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)
