"""Reliability battery for indexing: kill -9 at random points and concurrent writers plus
searches. Index runs happen in real subprocesses that use the deterministic fake detector."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from ldot_testing import hooked_env, install_tiny_model, make_photos

from ldot_cli.index.layout import index_path
from ldot_cli.index.store import IndexStore

TESTS = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent("""
    import sys
    sys.path[:0] = [{tests!r}]
    from fakes import FakeDetector
    from ldot_cli.index.indexer import Indexer
    from ldot_cli.index.options import IndexOptions
    Indexer("default", IndexOptions(model="tiny", num_workers=0, batch_size=2), detector=FakeDetector(delay_s={delay})).run([{folder!r}])
""")


def start_indexer(folder: Path, delay: float = 0.05, pause_after: int | None = None,
                  marker: Path | None = None) -> subprocess.Popen:
    """An indexing run in a subprocess; with ``pause_after`` it stops itself (writing ``marker``) once it has
    committed that many images, to be killed at a known point of progress."""
    code = SCRIPT.format(tests=str(TESTS), delay=delay, folder=str(folder))
    env = dict(os.environ)
    if pause_after is not None:
        env = hooked_env(env, LDOT_TEST_PAUSE_AFTER=pause_after, LDOT_TEST_PAUSE_FILE=marker)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def wait_for(proc: subprocess.Popen, marker: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), proc.stderr.read().decode() if proc.poll() is not None else "no progress"


def vector_count() -> int:
    path = index_path("default") / "index.sqlite"
    if not path.exists():
        return 0
    db = sqlite3.connect(path, timeout=30)
    try:
        return db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
    except sqlite3.OperationalError:  # the schema is not there yet
        return 0
    finally:
        db.close()


def check_consistent(expect_complete: int | None = None) -> None:
    """The database is intact; file rows, vectors and the FAISS file agree."""
    db = sqlite3.connect(index_path("default") / "index.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    dangling = db.execute("SELECT COUNT(*) FROM files WHERE status = 'indexed' AND vector_id NOT IN "
                          "(SELECT id FROM vectors)").fetchone()[0]
    assert dangling == 0
    dup = db.execute("SELECT COUNT(*) - COUNT(DISTINCT content_hash) FROM vectors").fetchone()[0]
    assert dup == 0
    db.close()
    with IndexStore(index_path("default")) as store:
        loaded = store.read_faiss()  # never a damaged file: either none yet, or one matching its checksum
        if expect_complete is not None:
            counts = store.counts()
            assert counts.get("indexed") == expect_complete and counts["vectors"] == expect_complete
            index, max_id = loaded
            assert index.ntotal == expect_complete
            assert store.vectors(min_id=max_id)[0].size == 0


def check_vectors_belong_to_their_files() -> None:
    """Re-derive every stored vector from its own file: no vector is paired with another file."""
    from fakes import expected_record

    import models
    from feature_extraction.uniter_db import record_view, regions_to_record, resolve_cut

    encoder = models.load_bi_encoder("tiny")
    with IndexStore(index_path("default")) as store:
        rows = store.file_rows("indexed")
        ids, vectors = store.vectors()
        by_id = dict(zip(ids.tolist(), vectors))
        cut = resolve_cut("uniter")  # what the region store holds for a file, as the index read it
        records = [record_view(regions_to_record(expected_record(os.fsdecode(r.path)), cut)) for r in rows]
        fresh = encoder.encode_images(records).numpy()
        for row, vec in zip(rows, fresh):
            assert np.allclose(by_id[row.vector_id], vec, atol=1e-4), row.display


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_completes(tmp_path, vocab_dir):
    install_tiny_model("tiny", vocab_dir)
    folder = tmp_path / "photos"
    make_photos(folder, 24)
    rng = random.Random(1234)
    kills = 0
    # 4 kills at chosen points of progress (after 1-3 committed images of the run, between batches), driven
    # by the run's own progress so they happen on any machine; then 2 at random moments (mid-detector,
    # mid-encode or mid-commit), which a fast machine may outrun
    for trial in range(6):
        done = vector_count()
        if trial < 4:
            marker = tmp_path / f"paused-{trial}"
            proc = start_indexer(folder, delay=0.1, pause_after=rng.choice([1, 2, 3]), marker=marker)
            wait_for(proc, marker)
            assert proc.poll() is None
        else:
            proc = start_indexer(folder, delay=0.1)
            target = done + rng.choice([0, 1, 2])
            while proc.poll() is None and vector_count() < target:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        check_consistent()
        assert vector_count() >= done  # nothing committed is lost
    assert kills >= 4  # the runs really were interrupted
    proc = start_indexer(folder, delay=0.0)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()
    check_consistent(expect_complete=24)
    check_vectors_belong_to_their_files()


@pytest.mark.slow
def test_concurrent_indexers_and_searches(tmp_path, vocab_dir):
    from ldot_cli.index.search import Searcher

    install_tiny_model("tiny", vocab_dir)
    folder = tmp_path / "photos"
    make_photos(folder, 6)
    first = start_indexer(folder, delay=0.0)
    assert first.wait(timeout=300) == 0
    searcher = Searcher("default")
    searcher.search("a dog on the beach", k=5)  # models loaded before the runs start: every search is concurrent
    make_photos(folder, 14, start=6)  # more photos arrive; two runs start at once
    procs = [start_indexer(folder, delay=0.05) for _ in range(2)]
    searches = 0
    while any(p.poll() is None for p in procs):
        hits = searcher.search("a dog on the beach", k=5)
        assert len(hits) == 5 and all(Path(os.fsdecode(h.path)).exists() for h in hits)
        searches += 1
        time.sleep(0.05)
    for proc in procs:
        assert proc.returncode == 0, proc.stderr.read().decode()
    assert searches > 3
    check_consistent(expect_complete=20)
    check_vectors_belong_to_their_files()
