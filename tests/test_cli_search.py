"""`ldot search` / `ldot status` through the CLI: output modes, errors, hostile queries (long, emoji,
control characters, lone surrogates, invalid UTF-8: results, never a crash)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from fakes import FakeDetector
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ldot_testing import install_tiny_model, make_photos
from typer.testing import CliRunner

from ldot_cli.index.indexer import Indexer
from ldot_cli.index.options import IndexOptions
from ldot_cli.main import app

runner = CliRunner()


@pytest.fixture
def indexed(tmp_path, vocab_dir):
    install_tiny_model("tiny", vocab_dir)
    folder = tmp_path / "photos"
    make_photos(folder, 6)
    odd = folder / "caf\u00e9 \U0001F415.png"  # NFC + emoji
    make_photos(tmp_path / "tmp", 1, start=40)[0].rename(odd)
    raw = os.fsencode(folder) + b"/latin1-\xe9.png"  # not valid UTF-8
    make_photos(tmp_path / "tmp", 1, start=41)[0].rename(os.fsdecode(raw))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    Indexer("default", IndexOptions(model="tiny", num_workers=0), detector=FakeDetector()).run([folder])
    return folder, raw


def ldot(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from ldot_cli.main import run; run()", *args],
                          capture_output=True, timeout=120, **kw)


def test_table_json_paths_and_nul_outputs(indexed):
    folder, raw = indexed
    table = runner.invoke(app, ["search", "a dog on the beach", "-k", "3"], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    assert "rank" in table.output and "score" in table.output
    result = ldot("search", "a dog on the beach", "-k", "8", "--json")
    assert result.returncode == 0, result.stderr
    hits = json.loads(result.stdout)
    assert [h["rank"] for h in hits] == list(range(1, 9))
    assert set(hits[0]) == {"rank", "path", "score"}
    paths = ldot("search", "a dog on the beach", "-k", "8", "--paths").stdout.splitlines()
    nul = ldot("search", "a dog on the beach", "-k", "8", "-0").stdout.split(b"\0")[:-1]
    assert paths == nul and len(paths) == 8
    assert raw in nul  # the undecodable name comes out byte for byte (usable with xargs -0)
    assert [os.fsencode(h["path"]) for h in hits if "\\x" not in h["path"]] == \
        [p for p in nul if b"\xe9.png" not in p]


def test_status_counts_and_errors(indexed):
    result = runner.invoke(app, ["status", "--name", "default", "--errors"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "broken.jpg" in result.output
    listed = runner.invoke(app, ["status", "--json"])
    data = json.loads(listed.output)
    assert data[0]["name"] == "default" and data[0]["indexed"] == 8 and data[0]["skipped"] == 1


@pytest.mark.parametrize("args, message", [
    (["search", ""], "empty query"),
    (["search", "a dog", "--name", "nope"], "no index named 'nope'"),
    (["search", "a dog", "--json", "--paths"], "choose one of"),
    (["search", "a dog", "-k", "0"], "-k must be at least 1"),
])
def test_bad_input_is_one_line_exit_2(indexed, args, message):
    result = ldot(*args, text=True)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_no_query_without_a_terminal_is_an_error(indexed):
    result = ldot("search", text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "no query" in result.stderr


@pytest.mark.parametrize("query", ["a" * 10_000, "\U0001F415\U0001F3D6\ufe0f", "dog\x01\x02\x7f\u200b", "x\ud800y"])
def test_hostile_queries_give_results(indexed, query):
    from ldot_cli.index.search import Searcher

    assert len(Searcher("default").search(query, k=3)) == 3


def test_invalid_utf8_argv_is_searched_not_crashed(indexed):
    result = subprocess.run([sys.executable.encode(), b"-c", b"from ldot_cli.main import run; run()", b"search",
                             b"caf\xe9 \xff dog", b"--json"], capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == 8


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(min_size=1, max_size=300))
def test_query_fuzzing_never_raises_anything_but_a_clean_error(indexed, query):
    from ldot_cli.index.search import QueryError, Searcher

    searcher = Searcher("default")
    try:
        hits = searcher.search(query, k=2)
    except QueryError:
        assert not query.strip()
    else:
        assert len(hits) == 2
    finally:
        searcher.close()


def test_interactive_prompt_in_a_terminal(indexed, tmp_path):
    """No QUERY in a terminal: a prompt that answers several queries with the models loaded once, with the same
    options as a one-shot query (--html: the sheet of the latest query)."""
    import pty
    import select

    sheet = tmp_path / "sheet.html"
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", "from ldot_cli.main import run; run()", "search", "--paths",
                             "-k", "2", "--html", str(sheet)], stdin=follower, stdout=follower, stderr=follower,
                            close_fds=True,
                            env={**os.environ, "COLUMNS": "120"})
    os.close(follower)
    seen = b""

    def read_until(marker: bytes, count: int = 1, timeout: float = 120) -> None:
        """Read the terminal until ``marker`` has appeared ``count`` times in all output so far."""
        nonlocal seen
        deadline = time.monotonic() + timeout
        while seen.count(marker) < count and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(leader, 4096)
                except OSError:
                    break
        assert seen.count(marker) >= count, seen[-500:]

    read_until(b"ldot> ")
    os.write(leader, b"a dog on the beach\n")
    read_until(b"ms search", 1)
    read_until(b"ldot> ", 2)
    first = seen.count(b"/photos/")
    os.write(leader, b"a red car\n")  # the second query reuses the loaded models
    read_until(b"ms search", 2)
    read_until(b"ldot> ", 3)
    os.write(leader, b"\n")  # an empty line quits
    assert proc.wait(timeout=60) == 0
    os.close(leader)
    assert first >= 2 and seen.count(b"/photos/") >= 4
    assert "a red car" in sheet.read_text(encoding="utf-8")


def test_lxmert_rerank_on_uniter_regions_names_the_preset_it_learnt_from(indexed, tmp_path, vocab_dir):
    import torch
    from ldot_testing import install_tiny_reranker
    from transformers import LxmertConfig, LxmertForPreTraining

    torch.manual_seed(0)
    cfg = LxmertConfig(vocab_size=128, hidden_size=32, num_attention_heads=2, intermediate_size=64, l_layers=1,
                       x_layers=1, r_layers=1, visual_feat_dim=2048, num_object_labels=10, num_attr_labels=5,
                       num_qa_labels=3)
    LxmertForPreTraining(cfg).save_pretrained(tmp_path / "lxmert")
    (tmp_path / "lxmert" / "vocab.txt").write_text((vocab_dir / "vocab.txt").read_text())
    args = ["search", "a dog on the beach", "-k", "2", "--rerank", "--rerank-k", "3", "--device", "cpu", "--json"]
    lxmert = runner.invoke(app, [*args, "--reranker", str(tmp_path / "lxmert")])
    assert lxmert.exit_code == 0, lxmert.output
    assert "--preset lxmert36" in " ".join(lxmert.stderr.split())
    assert all(h["rerank_score"] is not None for h in json.loads(lxmert.stdout))
    install_tiny_reranker("uniter-base", vocab_dir)  # UNITER was trained on these regions: no note
    uniter = runner.invoke(app, [*args, "--reranker", "uniter-base"])
    assert uniter.exit_code == 0, uniter.output
    assert "lxmert36" not in uniter.stderr


def _prompt_session(leader_timeout: float = 120):
    """Start `ldot search --paths -k 2` on a pseudo-terminal; returns (process, leader fd, read_until, seen)."""
    import pty
    import select

    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", "from ldot_cli.main import run; run()", "search", "--paths",
                             "-k", "2"], stdin=follower, stdout=follower, stderr=follower, close_fds=True,
                            env={**os.environ, "COLUMNS": "120", "TERM": "xterm"})
    os.close(follower)
    state = {"seen": b""}

    def read_until(marker: bytes, count: int = 1, timeout: float = leader_timeout) -> bytes:
        deadline = time.monotonic() + timeout
        while state["seen"].count(marker) < count and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    state["seen"] += os.read(leader, 4096)
                except OSError:
                    break
        assert state["seen"].count(marker) >= count, state["seen"][-500:]
        return state["seen"]

    return proc, leader, read_until


def test_prompt_has_line_editing_and_history_across_sessions(indexed, ldot_home):
    """Up recalls the previous query (in the session and in the next one), arrows edit the line
    instead of printing ^[[A, and the history lives in $LDOT_HOME."""
    proc, leader, read_until = _prompt_session()
    read_until(b"ldot> ")
    os.write(leader, b"a dog on the beach\n")
    read_until(b"ms search", 1)
    read_until(b"ldot> ", 2)
    os.write(leader, b"\x1b[A")  # Up: the previous query comes back on the line
    seen = read_until(b"a dog on the beach", 2)
    os.write(leader, b"\x1b[D\x1b[Dxx\n")  # Left twice, insert: edited in place, then searched
    read_until(b"ms search", 2)
    read_until(b"ldot> ", 3)
    os.write(leader, b"\n")
    assert proc.wait(timeout=60) == 0
    os.close(leader)
    assert b"^[[A" not in seen and b"^[[D" not in seen
    history = (ldot_home / "search_history").read_text().splitlines()
    assert history[-2:] == ["a dog on the beach", "a dog on the beaxxch"]
    proc, leader, read_until = _prompt_session()  # a new session remembers
    read_until(b"ldot> ")
    os.write(leader, b"\x1b[A")
    read_until(b"a dog on the beaxxch")
    os.write(leader, b"\x15\n")  # Ctrl-U clears the line; an empty line quits
    assert proc.wait(timeout=60) == 0
    os.close(leader)
