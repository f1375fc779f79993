"""Finding a running `ldot serve` for an index, and asking it (standard library only: `ldot search` imports
this before anything heavy, so a query through a server costs no torch import).

A server announces itself in ``<home>/serve/<index name>.json`` (pid, port, token; readable by its user
only) while it runs. ``LDOT_NO_SERVER=1`` makes `ldot search` ignore servers.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def announce_path(name: str) -> Path:
    from models.core.home import serve_dir

    return serve_dir() / f"{name}.json"


def announce(name: str, host: str, port: int, token: str | None) -> Path:
    """Write the announcement file of a server that is about to serve (readable by the user only)."""
    from models.core.fileio import PRIVATE, atomic_write_json

    path = announce_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"pid": os.getpid(), "host": host, "port": port, "token": token, "started": time.time()},
                      mode=PRIVATE)
    return path


def withdraw(name: str) -> None:
    """Remove the announcement (only our own: another server may have replaced it)."""
    path = announce_path(name)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_server(name: str) -> dict[str, Any] | None:
    """The announcement of a live server for index ``name``, or None."""
    from models.core.env import flag

    if flag("LDOT_NO_SERVER"):
        return None
    try:
        info = json.loads(announce_path(name).read_text())
        pid, port = int(info["pid"]), int(info["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if pid == os.getpid() or not _alive(pid):
        return None
    host = info.get("host") or "127.0.0.1"
    info["connect"] = "127.0.0.1" if host in ("0.0.0.0", "", "localhost") else ("::1" if host == "::" else host)
    info["port"] = port
    return info


class ServerUnavailable(Exception):
    """The server did not answer: search locally instead."""


class ServerRefused(Exception):
    """The server answered with an error (``status``, ``message``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def post(server: dict[str, Any], route: str, body: dict[str, Any], timeout: float = 3600.0) -> dict[str, Any]:
    """POST JSON to a running server; ServerUnavailable when it cannot be reached."""
    import http.client

    host = server["connect"]
    conn = http.client.HTTPConnection(host if ":" not in host else f"[{host}]", server["port"], timeout=2.0)
    headers = {"Content-Type": "application/json", "Host": f"127.0.0.1:{server['port']}"}
    if server.get("token"):
        headers["X-Ldot-Token"] = server["token"]
    payload = json.dumps(body).encode("utf-8", "surrogatepass")
    try:
        conn.connect()
        conn.sock.settimeout(timeout)  # connecting is quick or not at all; a query may take long (re-ranking)
        conn.request("POST", route, payload, headers)
        response = conn.getresponse()
        raw = response.read()
    except (TimeoutError, OSError, http.client.HTTPException) as exc:
        raise ServerUnavailable(str(exc)) from None
    finally:
        conn.close()
    try:
        data = json.loads(raw)
    except ValueError:
        raise ServerUnavailable(f"unreadable answer ({response.status})") from None
    if response.status != 200:
        message = data.get("raw") or data.get("error") if isinstance(data, dict) else None
        raise ServerRefused(response.status, str(message or response.status))
    return data
