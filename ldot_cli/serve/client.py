"""Finding a running `ldot serve` for an index, asking it, and starting one in the background (standard library
only: `ldot search` imports this before anything heavy, so a query through a server costs no torch import).

A server announces itself in ``<home>/serve/<index name>.json`` (pid, the process's start time, port, token)
while it runs; the folder is the user's only (0700) and the file too (0600). A client trusts an announcement
only when the file is its own user's and not writable by others, and the process it names is alive, is the
same process (its start time matches: a reused pid does not count) and is the user's. Anything else is stale
and removed. ``LDOT_NO_SERVER=1`` makes `ldot search` neither use nor start a server.

Background servers (``ldot serve --background``, started by the first `ldot search` of an index unless
``LDOT_AUTO_SERVER=0``): bound to 127.0.0.1 only, every request needs the token of the announcement, one per
index (``<name>.lock`` held while it starts and runs), gone after ``LDOT_SERVER_IDLE`` seconds without a query
(default 300), when its index is removed, or when another server of the index replaces its announcement.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
from pathlib import Path
from typing import Any

ENV_NO_SERVER = "LDOT_NO_SERVER"  # neither use nor start a server
ENV_AUTO = "LDOT_AUTO_SERVER"  # 0: use a running server, never start one
ENV_IDLE = "LDOT_SERVER_IDLE"  # seconds without a query before a background server exits
DEFAULT_IDLE_S = 300.0
NOTED_FILE = ".started-before"  # the one-line note about background servers is shown once per home


def _off(var: str) -> bool:
    """Set, and set to off (unset means the default, on)."""
    from models.core.env import flag

    return os.environ.get(var, "").strip() != "" and not flag(var)


def _on(var: str) -> bool:
    from models.core.env import flag

    return flag(var)


def serve_dir() -> Path:
    from models.core.home import serve_dir as home_serve_dir

    return home_serve_dir()


def announce_path(name: str) -> Path:
    """``<home>/serve/<name>.json``; ValueError for a name that would leave the folder (the command line says
    what a valid index name is)."""
    if not name or name.startswith(".") or os.path.basename(name) != name or "\0" in name or "/" in name:
        raise ValueError(f"not an index name: {name!r}")
    return serve_dir() / f"{name}.json"


def _private_dir() -> Path:
    directory = serve_dir()
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)  # the user's own: announcements hold tokens
    return directory


def _stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the name (state first), or None where that is unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
        return data[data.rindex(b")") + 2:].split()  # the name may hold spaces and parentheses
    except (OSError, ValueError):
        return None


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None where that is unknown. With the
    pid it names one process for good: a pid reused after a crash has another start time."""
    fields = _stat(pid)
    return fields[19].decode() if fields is not None and len(fields) > 19 else None  # field 22


def _owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def announce(name: str, host: str, port: int, token: str | None, background: bool = False) -> Path:
    """Write the announcement file of a server that is about to serve (readable by the user only)."""
    from models.core.fileio import PRIVATE, atomic_write_json

    path = _private_dir() / f"{name}.json"
    atomic_write_json(path, {"pid": os.getpid(), "pid_start": process_start(os.getpid()), "index": name,
                             "host": host, "port": port, "token": token, "background": background,
                             "started": time.time()}, mode=PRIVATE)
    return path


def is_ours(name: str) -> bool:
    """Whether the announcement of ``name`` is this process's."""
    info = _read(announce_path(name))
    return info is not None and info.get("pid") == os.getpid()


def withdraw(name: str) -> None:
    """Remove the announcement (only our own: another server may have replaced it)."""
    if is_ours(name):
        try:
            announce_path(name).unlink()
        except OSError:
            pass


def _read(path: Path) -> dict[str, Any] | None:
    """An announcement's content, when the file is the user's own and nobody else can write it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 4096:
            return None
        if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
            return None  # someone else's (a shared LDOT_HOME): never send them a query
        data = json.loads(os.read(fd, 4096))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def _alive(pid: int, start: str | None) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not our server (its pid was reused)
    fields = _stat(pid)
    if fields is not None and fields[:1] in ([b"Z"], [b"X"]):
        return False  # killed, not yet reaped
    if start is not None and process_start(pid) not in (None, start):
        return False  # the pid now names another process
    owner = _owner(pid)
    return owner is None or not hasattr(os, "getuid") or owner == os.getuid()


def forget(name: str) -> None:
    """Remove what a server of index ``name`` left behind (announcement, lock, log) when no server holds them."""
    try:
        announce_path(name)
    except ValueError:
        return
    directory = serve_dir()
    lock = _try_lock(directory / f"{name}.lock")
    if lock is None:
        return  # a server is starting or running: its files stay
    try:
        for suffix in (".json", ".log", ".lock"):
            try:
                (directory / f"{name}{suffix}").unlink()
            except OSError:
                pass
    finally:
        os.close(lock)


def find_server(name: str, *, check_off: bool = True) -> dict[str, Any] | None:
    """The announcement of a live server of this user for index ``name``, or None (a stale one is removed)."""
    if check_off and _on(ENV_NO_SERVER):
        return None
    try:
        path = announce_path(name)
    except ValueError:
        return None
    info = _read(path)
    if info is None:
        return None
    try:
        pid, port = int(info["pid"]), int(info["port"])
        start = info.get("pid_start")
        if info.get("index", name) != name or not 0 < port < 65536:
            return None
    except (ValueError, KeyError, TypeError):
        return None
    if pid == os.getpid():
        return None
    if not _alive(pid, None if start is None else str(start)):
        forget(name)  # a crashed server's announcement (or a reused pid)
        return None
    info["index"] = name
    host = info.get("host") or "127.0.0.1"
    info["connect"] = "127.0.0.1" if host in ("0.0.0.0", "", "localhost") else ("::1" if host == "::" else host)
    info["port"] = port
    return info


def servers() -> list[dict[str, Any]]:
    """The live servers of this user in this home (stale announcements are removed on the way)."""
    try:
        names = sorted(p.name[:-5] for p in serve_dir().glob("*.json") if not p.name.startswith("."))
    except OSError:
        return []
    found = []
    for name in names:
        info = find_server(name, check_off=False)
        if info is not None:
            found.append(info)
    return found


def stop_server(name: str, timeout: float = 20.0) -> int | None:
    """Stop the server of index ``name`` (SIGTERM, after checking it is this user's live server). Returns its
    pid, or None when none runs."""
    info = find_server(name, check_off=False)
    if info is None:
        forget(name)
        return None
    pid = int(info["pid"])
    start = info.get("pid_start")
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid, None if start is None else str(start)):
        time.sleep(0.05)
    forget(name)
    return pid


class ServerUnavailable(Exception):
    """The server did not answer: search locally instead."""


class ServerRefused(Exception):
    """The server answered with an error (``status``, ``message``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


MAX_ANSWER_BYTES = 256 * 1024 * 1024  # k=1000 results with regions is ~1 MB: far more is not our server


def post(server: dict[str, Any], route: str, body: dict[str, Any], timeout: float = 3600.0) -> dict[str, Any]:
    """POST JSON to a running server; ServerUnavailable when it cannot be reached or its answer is not HTTP.
    (HTTP/1.1 over a socket by hand: `http.client` imports the `email` package, a third of a fast query's start.)"""
    import socket

    headers = {"Host": f"127.0.0.1:{server['port']}", "Content-Type": "application/json", "Connection": "close"}
    if server.get("token"):
        headers["X-Ldot-Token"] = str(server["token"])
    if server.get("index"):
        headers["X-Ldot-Index"] = str(server["index"])
    payload = json.dumps(body).encode("utf-8", "surrogatepass")
    headers["Content-Length"] = str(len(payload))
    lines = [f"POST {route} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
    if any(not line.isprintable() for line in lines):
        raise ServerUnavailable("a header holds control characters")  # from an announcement: not sent
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + payload
    try:
        sock = socket.create_connection((server["connect"], server["port"]), timeout=2.0)
    except OSError as exc:
        raise ServerUnavailable(str(exc)) from None
    chunks, size = [], 0
    try:
        sock.settimeout(timeout)  # connecting is quick or not at all; a query may take long (re-ranking)
        sock.sendall(request)
        while True:
            data = sock.recv(1 << 16)
            if not data:
                break
            size += len(data)
            if size > MAX_ANSWER_BYTES:
                raise ServerUnavailable("answer too large")
            chunks.append(data)
    except OSError as exc:
        raise ServerUnavailable(str(exc)) from None
    finally:
        sock.close()
    status, raw = _http_answer(b"".join(chunks))
    try:
        data = json.loads(raw)
    except ValueError:
        raise ServerUnavailable(f"unreadable answer ({status})") from None
    if status != 200:
        message = data.get("raw") or data.get("error") if isinstance(data, dict) else None
        raise ServerRefused(status, str(message or status))
    if not isinstance(data, dict):
        raise ServerUnavailable(f"unreadable answer ({status})")
    return data


def _http_answer(raw: bytes) -> tuple[int, bytes]:
    """(status, body) of a whole HTTP/1.1 response (Content-Length, chunked, or up to the end)."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(None, 2)
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ServerUnavailable("not an HTTP answer")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
        body, pos = bytearray(), 0
        while True:
            end = rest.find(b"\r\n", pos)
            size_text = rest[pos:end].split(b";")[0].strip() if end >= 0 else b""
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ServerUnavailable("a broken chunked answer") from None
            if size == 0:
                break
            body += rest[end + 2:end + 2 + size]
            pos = end + 2 + size + 2
        return int(parts[1]), bytes(body)
    length = fields.get(b"content-length")
    if length is not None:
        if not length.isdigit() or int(length) > len(rest):
            raise ServerUnavailable("a cut answer")
        return int(parts[1]), rest[:int(length)]
    return int(parts[1]), rest


# -- a query -------------------------------------------------------------------------------------------------
def search_body(query: str | None, sha256: str | None, k: int, rerank_k: int | None, reranker: str | None,
                min_score: str | None, regions: bool) -> dict[str, Any]:
    """The `/api/search` body of one `ldot search` (a text ``query``, or the content hash of an image)."""
    body: dict[str, Any] = {"k": k, "rerank": bool(rerank_k), "rerank_k": rerank_k or 50, "reranker": reranker,
                            "min_score": min_score, "regions": regions}
    if sha256 is not None:
        body["sha256"] = sha256
    else:
        body["q"] = query
    return body


# -- background servers --------------------------------------------------------------------------------------
def _try_lock(path: Path) -> int | None:
    """An exclusive lock on ``path`` (a file descriptor to close), or None when another process holds it."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def hold_lock(name: str) -> int | None:
    """The lock a background server of ``name`` holds while it starts and runs; None when another holds it."""
    return _try_lock(_private_dir() / f"{name}.lock")


def idle_seconds() -> float:
    try:
        value = float(os.environ.get(ENV_IDLE, "") or DEFAULT_IDLE_S)
    except ValueError:
        return DEFAULT_IDLE_S
    return value if value > 0 else DEFAULT_IDLE_S


def auto_start_allowed() -> bool:
    """Whether `ldot search` may start a background server: not turned off, and the web extra installed."""
    if _on(ENV_NO_SERVER) or _off(ENV_AUTO) or not hasattr(os, "getuid"):
        return False
    from importlib.util import find_spec

    return find_spec("uvicorn") is not None and find_spec("fastapi") is not None


def start_background(name: str, command: list[str], wait_s: float = 180.0) -> tuple[dict[str, Any] | None, bool]:
    """Start a background server of index ``name`` (``command``: the process to run, unless one is starting
    already) and wait until it answers. Returns (its announcement or None when it did not come up, whether this
    is the first one of this home)."""
    import subprocess

    directory = _private_dir()
    noted = directory / NOTED_FILE
    first = not noted.exists()
    proc = None
    lock = _try_lock(directory / f"{name}.lock")
    if lock is not None:  # nobody is starting one: start it (it takes the lock itself)
        os.close(lock)
        log = os.open(directory / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        env = {**os.environ, "LDOT_NO_PROGRESS": "1", "LDOT_HOME": str(directory.parent)}
        if env.get("PYTHONPATH"):  # it runs in / (no folder of the user's kept busy): paths made absolute
            env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p)
        try:
            proc = subprocess.Popen(command, cwd="/", stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True, close_fds=True, env=env)
        except OSError:
            return None, False
        finally:
            os.close(log)
        if first:
            try:
                os.close(os.open(noted, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
            except OSError:
                pass
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        info = find_server(name)
        if info is not None:
            return info, first and proc is not None
        if proc is not None and proc.poll() is not None:
            info = find_server(name)  # it may have lost the race to another starter: use that one
            return info, False
        if proc is None:
            held = _try_lock(directory / f"{name}.lock")
            if held is not None:  # the other starter gave up
                os.close(held)
                return find_server(name), False
        time.sleep(0.05)
    return None, False
