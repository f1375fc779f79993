"""`ldot search` and its servers: the fast path that answers a plain query before the command line loads, the
announcements a client trusts (its user's own file, a live process that is the same process, the same index),
and the background server's life cycle (started by the first search, used by the next, gone when idle, when
stopped, when its index is removed, and cleaned up after a crash)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
from fakes import FakeDetector
from ldot_testing import install_tiny_model, make_photos

from ldot_cli.commands.quick import answer_quickly, parse
from ldot_cli.index.indexer import Indexer
from ldot_cli.index.options import IndexOptions
from ldot_cli.serve import client

QUERY = "a dog on the beach"


# -- the fast path's reading of the command line --------------------------------------------------------------
@pytest.mark.parametrize("args", [
    [QUERY], [QUERY, "-k", "3"], ["-k", "3", QUERY, "--json"], [QUERY, "--name=photos", "--paths"],
    [QUERY, "-n", "x", "-0", "--min-score", "auto"], [QUERY, "--rerank", "--rerank-k", "20", "--regions"],
])
def test_plain_queries_take_the_fast_path(args):
    assert parse(args) is not None


@pytest.mark.parametrize("args", [
    [], ["  "], [QUERY, "--image", "x.jpg"], [QUERY, "--html", "a.html"], [QUERY, "--preview"], ["--help"],
    [QUERY, "-h"], [QUERY, "--model", "m"], [QUERY, "--no-server"], ["--", QUERY], [QUERY, "other words"],
    [QUERY, "-k"], [QUERY, "-k", "x"], [QUERY, "-k", "0"], [QUERY, "-k", "-3"], [QUERY, "-k", "\u0663"],
    [QUERY, "--json", "--paths"], [QUERY, "--nme", "x"], [QUERY, "--device=cpu"], ["-q"],
])
def test_everything_else_goes_to_the_full_command_line(args):
    """Options it does not know, usage errors and odd numbers are the full path's to read and to report."""
    assert parse(args) is None


def test_the_fast_path_imports_nothing_heavy():
    """What a plain query through a server loads: no typer, click, rich, pydantic, numpy or torch (the table
    loads rich's console and table only when it prints one)."""
    code = ("import json, sys; from ldot_cli.main import run; from ldot_cli.commands.quick import answer_quickly, parse; "
            "from ldot_cli.serve.client import find_server, post; from ldot_cli.index.hits import Answer; "
            "Answer.from_json({'hits': [{'rank': 1, 'path_b64': 'YQ==', 'score': 1.0, 'id': 1}]}); "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    heavy = {"typer", "click", "rich", "pydantic", "numpy", "torch", "faiss", "fastapi", "http", "email"}
    assert not heavy & set(json.loads(loaded.stdout)), loaded.stdout


# -- the answer a server sends ----------------------------------------------------------------------------------
def test_an_answer_comes_back_from_json_as_it_was_sent():
    """`Answer.to_json` (the server) and `Answer.from_json` (`ldot search`) are inverses: any path bytes, scores
    unrounded, boxes and photo sizes, the level applied, how many fell below it, the timings."""
    from ldot_cli.index.hits import Answer, Hit, QueryTimings

    hits = [Hit(1, b"/photos/caf\xe9 \xff.jpg", 0.123456789, 7, 2.718281828,
                [(0.1, 0.2, 0.5, 0.75, 0.3333333), (0.0, 0.0, 1.0, 1.0, 0.01)], (640, 480)),
            Hit(2, b"/photos/b.png", -1.5, 9)]
    sent = Answer(hits, 0.1, QueryTimings(1.25, 2.5, 30.75, {"regions_ms": 4.0}), below=3)
    got = Answer.from_json(json.loads(json.dumps(sent.to_json())))
    assert got == sent and not got.no_match
    empty = Answer.from_json(json.loads(json.dumps(Answer([], 0.9, QueryTimings(), below=10).to_json())))
    assert empty.no_match and empty.below == 10 and empty.min_score == 0.9


@pytest.mark.parametrize("data", [
    None, [], {}, {"hits": "x"}, {"hits": [None]}, {"hits": [{"rank": 1, "score": 1.0, "id": 1}]},
    {"hits": [{"rank": 1, "path_b64": "not base64!", "score": 1.0, "id": 1}]},
    {"hits": [{"rank": "1", "path_b64": "YQ==", "score": 1.0, "id": 1}]},
    {"hits": [{"rank": 1, "path_b64": "YQ==", "score": float("nan"), "id": 1}]},
    {"hits": [{"rank": 1, "path_b64": "YQ==", "score": True, "id": 1}]},
    {"hits": [{"rank": 1, "path_b64": "YQ==", "score": 1.0, "id": 1, "boxes": [[0, 0, 1]]}]},
    {"hits": [{"rank": 1, "path_b64": "YQ==", "score": 1.0, "id": 1, "boxes": [], "size": [1.5, 2]}]},
    {"hits": [], "min_score": "auto"}, {"hits": [], "below": 1.5}, {"hits": [], "timings": {"encode_ms": "1"}},
])
def test_an_answer_that_is_not_one_is_refused(data):
    """What a server sends is checked before `ldot search` prints it: anything else is a ValueError (the
    caller then searches itself)."""
    from ldot_cli.index.hits import Answer

    with pytest.raises(ValueError):
        Answer.from_json(data)


def _answering(body: bytes):
    """A loopback server that answers every request with ``body`` (HTTP 200, JSON), and its port."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(1 << 16)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(body)).encode() + b"\r\n\r\n" + body)

    threading.Thread(target=serve, daemon=True).start()
    return listener, listener.getsockname()[1]


def test_the_fast_path_prints_a_server_s_answer_and_leaves_a_broken_one_to_the_full_command(ldot_home,
                                                                                         capsysbinary):
    from ldot_cli.index.hits import Answer, Hit, QueryTimings

    sent = Answer([Hit(1, b"/p/a.jpg", 0.5, 3), Hit(2, b"/p/b\xff.jpg", 0.25, 4)], None, QueryTimings())
    listener, port = _answering(json.dumps(sent.to_json()).encode())
    try:
        _announce(ldot_home, "default", port=port)
        assert answer_quickly([QUERY, "-0"]) is True
        assert capsysbinary.readouterr().out == b"/p/a.jpg\0/p/b\xff.jpg\0"  # the exact bytes of each path
    finally:
        listener.close()
    listener, port = _answering(json.dumps({"hits": [{"rank": 1, "path_b64": "YQ==", "score": "high"}]}).encode())
    try:
        _announce(ldot_home, "default", port=port)
        assert answer_quickly([QUERY, "--paths"]) is False
        assert capsysbinary.readouterr() == (b"", b"")
    finally:
        listener.close()


def test_no_server_means_the_full_command_line(ldot_home, capsys):
    assert answer_quickly([QUERY, "--paths"]) is False
    assert capsys.readouterr() == ("", "")


def _state(pid: int) -> str | None:
    """A process's state letter (Z: a zombie), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return None


# -- which announcements are trusted ----------------------------------------------------------------------------
def _announce(ldot_home, name: str, **fields) -> os.PathLike:
    directory = ldot_home / "serve"
    directory.mkdir(mode=0o700, exist_ok=True)
    info = {"pid": os.getppid(), "pid_start": client.process_start(os.getppid()), "index": name,
            "host": "127.0.0.1", "port": 9, "token": "t"}
    info.update(fields)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(info))
    os.chmod(path, 0o600)
    return path


def test_a_live_server_of_the_user_is_found(ldot_home):
    _announce(ldot_home, "default")
    found = client.find_server("default")
    assert found is not None and found["connect"] == "127.0.0.1" and found["index"] == "default"


def test_a_dead_server_is_stale_and_cleaned_up(ldot_home):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path = _announce(ldot_home, "default", pid=gone.pid, pid_start=None)
    (ldot_home / "serve" / "default.log").write_text("crashed")
    assert client.find_server("default") is None
    assert not path.exists() and not (ldot_home / "serve" / "default.log").exists()


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/stat"), reason="process states come from /proc")
def test_a_killed_server_not_yet_reaped_is_stale(ldot_home):
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        killed.kill()
        while _state(killed.pid) != "Z":
            time.sleep(0.01)
        _announce(ldot_home, "default", pid=killed.pid, pid_start=client.process_start(killed.pid))
        assert client.find_server("default") is None
    finally:
        killed.wait()


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/stat"), reason="start times come from /proc")
def test_a_reused_pid_is_not_the_server(ldot_home):
    """After a crash the pid may name another live process: its start time gives it away."""
    path = _announce(ldot_home, "default", pid_start="1")
    assert client.find_server("default") is None and not path.exists()


def test_another_users_or_writable_announcement_is_ignored(ldot_home):
    path = _announce(ldot_home, "default")
    os.chmod(path, 0o622)  # anyone may have written where it points
    assert client.find_server("default") is None
    os.chmod(path, 0o600)
    if os.getuid() == 0:
        os.chown(path, 65534, 65534)  # nobody's file: a query would go to their server
        assert client.find_server("default") is None


def test_the_announcement_of_another_index_is_not_used(ldot_home):
    _announce(ldot_home, "default", index="photos")
    assert client.find_server("default") is None


def test_index_names_never_leave_the_serve_folder(ldot_home):
    (ldot_home / "x.json").write_text("{}")
    for name in ("../x", "/etc/passwd", ".hidden", "", "a/b", "a\0b"):
        assert client.find_server(name) is None
        with pytest.raises(ValueError):
            client.announce_path(name)


def test_the_off_switch(ldot_home, monkeypatch):
    _announce(ldot_home, "default")
    monkeypatch.setenv("LDOT_NO_SERVER", "1")
    assert client.find_server("default") is None and not client.auto_start_allowed()
    monkeypatch.delenv("LDOT_NO_SERVER")
    monkeypatch.setenv("LDOT_AUTO_SERVER", "0")
    assert client.find_server("default") is not None and not client.auto_start_allowed()


def test_http_answers_are_read_strictly():
    assert client._http_answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}trailing") == (200, b"{}")
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n"
    assert client._http_answer(chunked) == (200, b'{"a":1}')
    for broken in (b"garbage", b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n{}", b"SSH-2.0\r\n\r\n"):
        with pytest.raises(client.ServerUnavailable):
            client._http_answer(broken)


# -- the life cycle, with real processes ----------------------------------------------------------------------
def _ldot(*args: str, env: dict, full: bool = False) -> subprocess.CompletedProcess:
    code = "from ldot_cli.main import app; app()" if full else "from ldot_cli.main import run; run()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=300, env=env, check=False)


def _gone(pid: int, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _state(pid) in (None, "Z"):
            return True
        time.sleep(0.1)
    return False


def _leftovers(home) -> list[str]:
    return sorted(p.name for p in (home / "serve").iterdir() if p.name != client.NOTED_FILE)


@pytest.mark.slow
def test_background_server_life_cycle(ldot_home, vocab_dir, tmp_path):
    pytest.importorskip("uvicorn")
    install_tiny_model("tiny", vocab_dir)
    make_photos(tmp_path / "photos", 5)
    Indexer("default", IndexOptions(model="tiny", num_workers=0), detector=FakeDetector()).run([tmp_path / "photos"])
    env = {**os.environ, "LDOT_HOME": str(ldot_home), "LDOT_AUTO_SERVER": "1", "COLUMNS": "200",
           "LDOT_SERVER_IDLE": "600"}
    plain = {**env, "LDOT_NO_SERVER": "1"}

    first = _ldot("search", QUERY, "-k", "3", "--paths", env=env)  # no server yet: it starts one and asks it
    assert first.returncode == 0, first.stderr
    assert first.stdout == _ldot("search", QUERY, "-k", "3", "--paths", env=plain).stdout
    assert first.stderr.decode().count("\n") == 1 and "background `ldot serve`" in first.stderr.decode()
    info = client.find_server("default")
    assert info is not None and info["background"] and info["host"] == "127.0.0.1" and len(info["token"]) >= 20
    assert stat.S_IMODE(os.stat(ldot_home / "serve" / "default.json").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(ldot_home / "serve").st_mode) == 0o700
    assert os.getpgid(info["pid"]) != os.getpgid(0)  # its own session: not killed with the shell's job
    assert os.readlink(f"/proc/{info['pid']}/cwd") == "/"  # keeps no folder busy, imports nothing from one
    assert info["token"] not in (ldot_home / "serve" / "default.log").read_text()
    with pytest.raises(client.ServerRefused) as refused:  # the token is required, even on loopback
        client.post({**info, "token": None}, "/api/search", {"q": QUERY})
    assert refused.value.status == 403

    # the fast path, the full command line through the server, and a plain process print the same
    answered = client.post(info, "/api/search", {"q": QUERY})  # noqa: F841 - a warm server
    for args in (["-k", "4"], ["--json", "--min-score", "-5"], ["-0", "-k", "2"], ["--min-score", "auto"],
                 ["-k", "0"]):
        fast, full, alone = (_ldot("search", QUERY, *args, env=env), _ldot("search", QUERY, *args, env=env, full=True),
                             _ldot("search", QUERY, *args, env=plain))
        assert fast.stdout == full.stdout == alone.stdout, args
        assert fast.stderr == full.stderr == alone.stderr, args
        assert fast.returncode == full.returncode == alone.returncode, args
    assert "started" not in fast.stderr.decode()  # said once only

    # an announcement that names this server for another index: refused by the server, searched here
    other = json.loads((ldot_home / "serve" / "default.json").read_text())
    other["index"] = "photos"
    path = ldot_home / "serve" / "photos.json"
    path.write_text(json.dumps(other))
    os.chmod(path, 0o600)
    wrong = _ldot("search", QUERY, "--name", "photos", env={**env, "LDOT_AUTO_SERVER": "0"})
    assert wrong.returncode == 2 and b"no index named 'photos'" in wrong.stderr
    path.unlink()

    # a crash leaves a stale announcement: the next search cleans it up and starts a new server
    os.kill(info["pid"], signal.SIGKILL)
    assert _gone(info["pid"])
    again = _ldot("search", QUERY, "-k", "3", "--paths", env=env)
    assert again.returncode == 0 and again.stdout == first.stdout
    second = client.find_server("default")
    assert second is not None and second["pid"] != info["pid"]

    # `ldot index rm` takes the server and its files with it
    removed = _ldot("index", "rm", "default", env=env)
    assert removed.returncode == 0, removed.stderr
    assert _gone(second["pid"]) and _leftovers(ldot_home) == []


@pytest.mark.slow
def test_background_server_exits_when_idle_and_on_stop(ldot_home, vocab_dir, tmp_path):
    pytest.importorskip("uvicorn")
    install_tiny_model("tiny", vocab_dir)
    make_photos(tmp_path / "photos", 3)
    Indexer("default", IndexOptions(model="tiny", num_workers=0), detector=FakeDetector()).run([tmp_path / "photos"])
    env = {**os.environ, "LDOT_HOME": str(ldot_home), "LDOT_AUTO_SERVER": "1", "LDOT_SERVER_IDLE": "3"}
    assert _ldot("search", QUERY, "--paths", env=env).returncode == 0
    info = client.find_server("default")
    assert info is not None
    assert _gone(info["pid"], timeout=60) and _leftovers(ldot_home) == []  # 3 idle seconds: gone, files too

    env["LDOT_SERVER_IDLE"] = "600"
    assert _ldot("search", QUERY, "--paths", env=env).returncode == 0
    info = client.find_server("default")
    stopped = _ldot("serve", "--stop", env=env)
    assert stopped.returncode == 0 and f"pid {info['pid']}".encode() in stopped.stderr
    assert _gone(info["pid"]) and _leftovers(ldot_home) == []
    assert b"no ldot server is running" in _ldot("serve", "--stop", env=env).stderr

