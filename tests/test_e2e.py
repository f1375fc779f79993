"""`ldot index` and `ldot search` as real subprocesses, with a tiny random detector and bi-encoder:
the main job end to end, and at the command line: broken files, file-system oddities, kill -9 and resume,
concurrent runs with searches, and a damaged index."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from imagegen import save, truncate, write_png_bomb
from ldot_testing import hooked_env, install_tiny_detector, install_tiny_model, make_photos

ARGS = ["--model", "tiny", "--detector", "tiny-det", "--batch-size", "2", "--workers", "1"]


def ldot(*args: str, check: bool = False, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", "from ldot_cli.main import run; run()", *args],
                            capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from ldot_cli.main import run; run()", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def setup(tmp_path, vocab_dir):
    _, dim = install_tiny_detector()
    install_tiny_model("tiny", vocab_dir, img_dim=dim)
    return tmp_path


def stored_vectors_belong_to_their_files(name: str = "default", sample: int = 4) -> None:
    """Recompute a few files' vectors from scratch (detector + image tower) and compare with the index."""
    from ldot_cli.index.indexer import encode_image_file
    from ldot_cli.index.layout import index_path
    from ldot_cli.index.store import IndexStore

    with IndexStore(index_path(name)) as store:
        rows = store.file_rows("indexed")[:sample]
        ids, vectors = store.vectors(ids=[r.vector_id for r in rows])
        by_id = dict(zip(ids.tolist(), vectors))
        for row in rows:
            fresh = encode_image_file(Path(os.fsdecode(row.path)), store, device="cpu")
            assert np.allclose(by_id[row.vector_id], fresh, atol=1e-3), row.display


@pytest.mark.slow
def test_main_job_index_then_search(setup):
    photos = setup / "photos"
    make_photos(photos, 8, size=(64, 48))
    first = ldot("index", str(photos), *ARGS, check=True)
    assert "8 images found; 8 encoded" in " ".join(first.stderr.split())
    hits = json.loads(ldot("search", "a dog on the beach", "--json", "-k", "5", check=True).stdout)
    assert len(hits) == 5 and all(Path(h["path"]).parent == photos for h in hits)
    second = ldot("index", str(photos), *ARGS, check=True)
    assert "0 encoded" in second.stderr and "8 unchanged" in " ".join(second.stderr.split())
    table = ldot("search", "a dog on the beach", check=True, env={**os.environ, "COLUMNS": "200"})
    assert "img_" in table.stdout
    status = ldot("status", check=True, env={**os.environ, "COLUMNS": "200"})
    assert "default" in status.stdout and "8" in status.stdout
    stored_vectors_belong_to_their_files()


@pytest.mark.slow
def test_broken_files_among_good_ones(setup):
    """Bad files among good ones: the run finishes, each skipped file has a reason, vectors belong to their files."""
    photos = setup / "photos"
    good = make_photos(photos, 4, size=(64, 48))
    (photos / "zero.jpg").write_bytes(b"")
    truncate(save(np.full((200, 300, 3), 120, np.uint8), photos / "cut.jpg"), 0.3)
    write_png_bomb(photos / "bomb.png", 9000, 9000)
    good[0].rename(photos / "png-named.jpg")  # wrong extension: decoded by content
    (photos / "._img_001.png").write_bytes(good[1].read_bytes())  # macOS companion: never indexed
    (photos / "notes.png").write_text("hello")
    result = ldot("index", str(photos), *ARGS, check=True)
    errors = ldot("status", "--errors", "--json", check=True)
    skipped = {os.path.basename(p): reason for p, reason in json.loads(errors.stdout)["errors"]}
    assert set(skipped) == {"zero.jpg", "cut.jpg", "bomb.png", "notes.png"}
    assert "megapixels" in skipped["bomb.png"] and all(skipped.values())
    from ldot_cli.index.layout import index_path
    from ldot_cli.index.store import IndexStore

    with IndexStore(index_path("default")) as store:
        names = {os.path.basename(r.display) for r in store.file_rows("indexed")}
    assert names == {"png-named.jpg", "img_001.png", "img_002.png", "img_003.png"}
    assert "4 skipped" in result.stderr
    stored_vectors_belong_to_their_files()


@pytest.mark.slow
def test_file_system_oddities(setup):
    """File-system oddities: odd names, symlink loop, FIFO, unreadable file, the cache dir inside the root."""
    photos = setup / "photos"
    make_photos(photos, 2, size=(64, 48))
    (photos / "sub").mkdir()
    (photos / "sub" / "loop").symlink_to(photos, target_is_directory=True)
    make_photos(setup / "t", 3, start=20, size=(64, 48))
    (setup / "t" / "img_020.png").rename(photos / "sub" / "e\u0301te\u0301 \U0001F30A.png")  # NFD + emoji
    os.rename(setup / "t" / "img_021.png", os.fsencode(photos) + b"/sub/bad-\xff.png")  # not UTF-8
    os.mkfifo(photos / "pipe.png")
    home = photos / ".ldot-home-inside"  # the cache dir inside the scanned root: never indexed
    env = {**os.environ, "LDOT_HOME": str(home)}
    for path in Path(os.environ["LDOT_HOME"], "models").iterdir():
        (home / "models").mkdir(parents=True, exist_ok=True)
        os.symlink(path, home / "models" / path.name)
    make_photos(home / "indexes-junk", 1, start=30, size=(64, 48))
    result = ldot("index", str(photos), *ARGS, env=env, check=True)
    summary = " ".join(result.stderr.split())
    # 2 + NFD/emoji + non-UTF-8, each once, and the FIFO (skipped): the counts add up
    assert "5 images found; 4 encoded" in summary and "1 skipped; 4 images in the index" in summary
    out = subprocess.run([sys.executable, "-c", "from ldot_cli.main import run; run()", "search", "a dog", "-0",
                          "-k", "10"], capture_output=True, env=env, timeout=300)
    paths = out.stdout.split(b"\0")[:-1]
    assert len(paths) == 4 and os.fsencode(photos) + b"/sub/bad-\xff.png" in paths
    assert not any(b"indexes-junk" in p or b"/loop/" in p for p in paths)


@pytest.mark.slow
def test_kill_9_then_resume_at_the_command_line(setup):
    """A kill -9 mid-index, then a resume, through the CLI (the library-level loop kills at many more points)."""
    photos = setup / "photos"
    make_photos(photos, 12, size=(64, 48))
    db_path = Path(os.environ["LDOT_HOME"]) / "indexes" / "default" / "index.sqlite"

    def vectors() -> int:
        try:
            with sqlite3.connect(db_path, timeout=30) as db:
                return db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
        except sqlite3.Error:
            return 0

    # driven by progress, not time: the run stops itself once 2 images are committed, and is killed there
    marker = setup / "paused"
    proc = subprocess.Popen([sys.executable, "-c", "from ldot_cli.main import run; run()", "index", str(photos), *ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=hooked_env(LDOT_TEST_PAUSE_AFTER=2, LDOT_TEST_PAUSE_FILE=marker))
    deadline = time.monotonic() + 240
    while proc.poll() is None and not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "no progress in 240 s"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert vectors() == 2
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert len(json.loads(ldot("search", "a dog", "--json", "-k", "12", check=True).stdout)) == vectors()
    done_before = vectors()
    result = ldot("index", str(photos), *ARGS, check=True)
    summary = " ".join(result.stderr.split())
    assert f"{12 - done_before} encoded" in summary and "12 images in the index" in summary
    assert len(json.loads(ldot("search", "a dog", "--json", "-k", "20", check=True).stdout)) == 12


@pytest.mark.slow
def test_two_index_runs_and_searches_at_once(setup):
    """Two index runs at once plus searches, at the command line: no corruption, searches never crash."""
    photos = setup / "photos"
    make_photos(photos, 3, size=(64, 48))
    ldot("index", str(photos), *ARGS, check=True)
    make_photos(photos, 9, start=3, size=(64, 48))
    procs = [spawn("index", str(photos), *ARGS) for _ in range(2)]
    searches = 0
    while any(p.poll() is None for p in procs):
        result = ldot("search", "a dog", "--json", "-k", "3")
        assert result.returncode == 0, result.stderr
        assert len(json.loads(result.stdout)) == 3
        searches += 1
    for proc in procs:
        assert proc.wait() == 0, proc.stderr.read()
    assert searches >= 1
    assert len(json.loads(ldot("search", "a dog", "--json", "-k", "50", check=True).stdout)) == 12


@pytest.mark.slow
def test_index_corruption_is_detected_with_a_way_out(setup):
    """A damaged index: a damaged vector file is rebuilt; a damaged database names --reindex."""
    photos = setup / "photos"
    make_photos(photos, 4, size=(64, 48))
    ldot("index", str(photos), *ARGS, check=True)
    index_dir = Path(os.environ["LDOT_HOME"]) / "indexes" / "default"
    faiss_file = index_dir / "vectors.faiss"
    data = bytearray(faiss_file.read_bytes())
    data[-100] ^= 0xFF
    faiss_file.write_bytes(bytes(data))
    result = ldot("search", "a dog", "--json", "-k", "4", check=True)
    assert "damaged" in result.stderr and len(json.loads(result.stdout)) == 4
    db_file = index_dir / "index.sqlite"
    raw = bytearray(db_file.read_bytes())
    raw[:100] = os.urandom(100)  # the header: SQLite can no longer open it
    db_file.write_bytes(bytes(raw))
    broken = ldot("search", "a dog")
    assert broken.returncode == 2 and "--reindex" in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1
    ldot("index", str(photos), *ARGS, "--reindex", check=True)
    assert len(json.loads(ldot("search", "a dog", "--json", check=True).stdout)) == 4


@pytest.mark.slow
def test_extract_writes_a_uniter_db_and_resumes(setup):
    from feature_extraction.uniter_db import UniterImageDB

    photos = setup / "photos"
    make_photos(photos, 3, size=(64, 48))
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = setup / "img_db"
    first = ldot("extract", str(photos), "--out", str(out), "--detector", "tiny-det", "--workers", "1", check=True)
    summary = " ".join(first.stderr.split())
    assert "3 images written" in summary and "1 failed" in summary and "broken.jpg" in summary
    assert (out / "feat_th0.2_max100_min10").is_dir() and (out / "nbb_th0.2_max100_min10.json").is_file()
    with UniterImageDB(out, "uniter") as db:
        assert sorted(db.keys()) == ["img_000.png", "img_001.png", "img_002.png"]
        record = db["img_001.png"]
        assert 10 <= len(record.features) <= 100 and record.norm_bb.shape == (len(record.features), 6)
    again = ldot("extract", str(photos), "--out", str(out), "--detector", "tiny-det", "--workers", "1",
                 "--preset", "uniter", check=True)
    assert "0 images written" in again.stderr and "3 already there" in " ".join(again.stderr.split())
    lxmert = ldot("extract", str(photos), "--out", str(out), "--detector", "tiny-det", "--preset", "lxmert36",
                  "--workers", "1", check=True)
    assert "3 images written" in " ".join(lxmert.stderr.split()) and (out / "feat_numbb36").is_dir()
