"""A full disk or an I/O error mid-run gives one clear line, loses nothing already committed,
and the same command run again completes the work."""

from __future__ import annotations

import errno
import os
import sqlite3

import pytest
from ldot_testing import install_tiny_detector, install_tiny_model, make_photos
from typer.testing import CliRunner

from ldot_cli.index.layout import FAISS_FILE, index_path
from ldot_cli.index.store import IndexStore
from ldot_cli.main import app
from models.core.errors import StorageError, as_storage_error

ARGS = ["--model", "tiny", "--detector", "tiny-det", "--batch-size", "2", "--workers", "0"]


@pytest.fixture
def photos(tmp_path, vocab_dir):
    _, dim = install_tiny_detector()
    install_tiny_model("tiny", vocab_dir, img_dim=dim)
    make_photos(tmp_path / "photos", 6, size=(64, 48))
    return tmp_path / "photos"


def index(folder) -> object:
    return CliRunner().invoke(app, ["index", str(folder), *ARGS])


def assert_one_line_storage_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    assert "run the same command again" in lines[0]
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]


def assert_complete(expected: int) -> None:
    db = sqlite3.connect(index_path("default") / "index.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    with IndexStore(index_path("default")) as store:
        counts = store.counts()
        assert counts.get("indexed") == expected and counts["vectors"] == expected
        faiss_index, _ = store.read_faiss()
        assert faiss_index.ntotal == expected


def test_database_full_mid_run_keeps_committed_batches_and_resumes(photos, monkeypatch):
    real_add = IndexStore.add_vector
    calls = {"n": 0}

    def add_vector_then_full(self, db, digest, vector, num_boxes):
        calls["n"] += 1
        if calls["n"] == 3:  # the second batch (2 images each) hits a full disk
            raise sqlite3.OperationalError("database or disk is full")
        return real_add(self, db, digest, vector, num_boxes)

    monkeypatch.setattr(IndexStore, "add_vector", add_vector_then_full)
    assert_one_line_storage_error(index(photos), "database or disk is full")
    with IndexStore(index_path("default")) as store:
        assert store.counts().get("indexed") == 2 and store.counts()["vectors"] == 2  # batch 1 stayed committed
    monkeypatch.setattr(IndexStore, "add_vector", real_add)
    result = index(photos)
    assert result.exit_code == 0, result.output
    assert_complete(6)


def test_vector_file_write_failing_keeps_the_old_file_and_no_temp(photos, monkeypatch):
    import faiss

    assert index(photos).exit_code == 0
    before = (index_path("default") / FAISS_FILE).read_bytes()
    make_photos(photos, 2, start=6, size=(64, 48))
    real_write = faiss.write_index

    def write_half_then_fail(idx, path):  # what faiss does when the disk fills: a partial file, a C++ error
        with open(path, "wb") as handle:
            handle.write(b"IxM2partial")
        raise RuntimeError(f"Error in faiss::FileIOWriter: write error in {path}: 11 != 4096 "
                           f"({os.strerror(errno.ENOSPC)})")

    monkeypatch.setattr(faiss, "write_index", write_half_then_fail)
    assert_one_line_storage_error(index(photos), os.strerror(errno.ENOSPC).lower())
    assert (index_path("default") / FAISS_FILE).read_bytes() == before
    assert not [p for p in index_path("default").iterdir() if p.name.endswith(".tmp")]
    with IndexStore(index_path("default")) as store:  # the old file still verifies against its recorded checksum
        assert store.read_faiss() is not None
    monkeypatch.setattr(faiss, "write_index", real_write)
    assert index(photos).exit_code == 0
    assert_complete(8)


def test_read_only_home_is_one_line(photos, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(index_path("default")))

    monkeypatch.setattr("ldot_cli.index.store.IndexStore.__init__", refuse)
    assert_one_line_storage_error(index(photos), os.strerror(errno.EROFS), str(index_path("default")))


@pytest.mark.parametrize(("exc", "words"), [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/x.mdb"), [os.strerror(errno.ENOSPC), "/data/x.mdb"]),
    (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), [os.strerror(errno.EDQUOT)]),
    (sqlite3.OperationalError("disk I/O error"), ["disk i/o error"]),
    (RuntimeError("mdb_txn_commit: No space left on device"), ["no space left on device"]),
])
def test_storage_failures_are_recognised(exc, words):
    found = as_storage_error(exc)
    assert isinstance(found, StorageError)
    for word in words:
        assert word.lower() in str(found).lower()


def test_storage_failure_is_found_behind_a_wrapping_error():
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x")
        except OSError as inner:
            raise ValueError("could not save") from inner
    except ValueError as outer:
        assert isinstance(as_storage_error(outer), StorageError)


@pytest.mark.parametrize("exc", [OSError(errno.ENOENT, "No such file or directory", "/x"),
                                 RuntimeError("shape mismatch"), sqlite3.OperationalError("no such table: files")])
def test_other_failures_are_not_called_storage_errors(exc):
    assert as_storage_error(exc) is None
