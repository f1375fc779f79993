"""`ldot index` / `ldot search` as a library: incremental, moved files, removal, damage, model mismatch."""

from __future__ import annotations

import os
import shutil
import sqlite3

import numpy as np
import pytest
from fakes import FakeDetector
from ldot_testing import install_tiny_model, make_photos

from ldot_cli.index.indexer import Indexer
from ldot_cli.index.layout import FAISS_FILE, IndexStoreError, index_path
from ldot_cli.index.options import IndexOptions
from ldot_cli.index.search import QueryError, Searcher
from ldot_cli.index.store import IndexStore


@pytest.fixture
def tiny(vocab_dir):
    install_tiny_model("tiny", vocab_dir)
    return "tiny"


def run_index(folder, name="default", model="tiny", detector=None, **kw):
    detector = detector or FakeDetector()
    indexer = Indexer(name, IndexOptions(model=model, num_workers=0, batch_size=4), detector=detector)
    return indexer.run([folder], **kw), detector


def brute_force(name, query_vec):
    with IndexStore(index_path(name)) as store:
        ids, vecs = store.vectors()
        scores = vecs @ query_vec[0]
        return [int(ids[i]) for i in np.argsort(-scores)]


def test_index_then_search_matches_brute_force(tmp_path, tiny):
    make_photos(tmp_path / "photos", 12)
    report, _ = run_index(tmp_path / "photos")
    assert (report.found, report.encoded, report.vectors) == (12, 12, 12)
    searcher = Searcher("default")
    hits = searcher.search("a dog on the beach", k=5)
    assert len(hits) == 5 and [h.rank for h in hits] == [1, 2, 3, 4, 5]
    assert all(h.score >= hits[i + 1].score for i, h in enumerate(hits[:-1]))
    order = brute_force("default", searcher.text_vector("a dog on the beach"))
    assert [h.vector_id for h in hits] == order[:5]
    assert all(os.path.exists(h.path) for h in hits)


def test_second_run_does_no_model_work_and_changes_are_picked_up(tmp_path, tiny):
    photos = make_photos(tmp_path / "photos", 6)
    run_index(tmp_path / "photos")
    report, detector = run_index(tmp_path / "photos")
    assert (report.unchanged, report.encoded, detector.calls) == (6, 0, [])
    # a changed file is re-encoded; a removed one leaves; a moved one reuses its vector
    make_photos(tmp_path / "tmp", 1, start=50)[0].replace(photos[0])
    photos[1].unlink()
    photos[2].rename(tmp_path / "photos" / "moved.png")
    shutil.copy(photos[3], tmp_path / "photos" / "copy.png")
    report, detector = run_index(tmp_path / "photos")
    assert report.encoded == 1 and report.reused == 2 and report.removed == 2
    assert sum(detector.calls) == 1
    with IndexStore(index_path("default")) as store:
        rows = {os.path.basename(r.display): r for r in store.file_rows("indexed")}
        assert set(rows) == {"img_000.png", "img_003.png", "img_004.png", "img_005.png", "moved.png", "copy.png"}
        assert rows["copy.png"].vector_id == rows["img_003.png"].vector_id
        assert store.counts()["vectors"] == 5  # the old img_000 and the removed img_001 vectors are gone


def test_broken_files_are_skipped_with_reasons(tmp_path, tiny):
    folder = tmp_path / "photos"
    make_photos(folder, 3)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    (folder / "._img_000.png").write_bytes(b"\0\0")  # macOS resource fork: never indexed
    report, _ = run_index(folder)
    assert report.encoded == 3
    reasons = dict((os.path.basename(p), r) for p, r in report.skipped)
    assert set(reasons) == {"empty.jpg", "notes.png"}
    with IndexStore(index_path("default")) as store:
        assert store.counts() == {"indexed": 3, "skipped": 2, "vectors": 3}
    again, _ = run_index(folder)
    # known-bad unchanged files are not retried, and count as skipped (not as unchanged)
    assert again.skipped == [] and (again.unchanged, again.skipped_before, again.found) == (3, 2, 5)


def test_another_model_is_refused_and_reindex_rebuilds(tmp_path, tiny, vocab_dir):
    make_photos(tmp_path / "photos", 3)
    run_index(tmp_path / "photos")
    install_tiny_model("other", vocab_dir, seed=1)
    with pytest.raises(IndexStoreError, match="`reindex`"):
        run_index(tmp_path / "photos", model="other")
    with pytest.raises(IndexStoreError, match="another model"):
        Searcher("default", model="other")
    report, _ = run_index(tmp_path / "photos", model="other", reindex=True)
    assert report.encoded == 3
    assert Searcher("default").model_source == "other"


def test_damaged_vector_file_is_detected_and_rebuilt(tmp_path, tiny):
    make_photos(tmp_path / "photos", 8)
    run_index(tmp_path / "photos")
    before = [h.vector_id for h in Searcher("default").search("a red car", k=8)]
    path = index_path("default") / FAISS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    with IndexStore(index_path("default")) as store, pytest.raises(IndexStoreError, match="damaged"):
        store.read_faiss()
    after = [h.vector_id for h in Searcher("default").search("a red car", k=8)]  # repaired on the fly
    assert after == before
    with IndexStore(index_path("default")) as store:
        assert store.read_faiss() is not None


def test_truncated_vector_file_and_newer_format(tmp_path, tiny):
    make_photos(tmp_path / "photos", 4)
    run_index(tmp_path / "photos")
    path = index_path("default") / FAISS_FILE
    path.write_bytes(path.read_bytes()[:100])
    assert len(Searcher("default").search("a cat", k=4)) == 4
    db = sqlite3.connect(index_path("default") / "index.sqlite")
    db.execute("UPDATE meta SET value = '99' WHERE key = 'format_version'")
    db.commit()
    db.close()
    with pytest.raises(IndexStoreError, match="newer ldot"):
        Searcher("default")


def test_vectors_newer_than_the_faiss_file_are_still_found(tmp_path, tiny):
    make_photos(tmp_path / "photos", 4)
    run_index(tmp_path / "photos")
    with IndexStore(index_path("default")) as store:  # as if a crash happened before the file was rewritten
        rng = np.random.default_rng(0)
        with store.transaction() as db:
            vid = store.add_vector(db, "f" * 64, rng.standard_normal(48).astype(np.float32) * 100, 10)
            db.execute("INSERT INTO files (path, root, size, mtime_ns, content_hash, status, vector_id, updated) "
                       "VALUES (?, ?, 1, 1, ?, 'indexed', ?, 0)", (b"/x/new.png", b"/x", "f" * 64, vid))
    searcher = Searcher("default")
    vec = searcher.text_vector("a dog")
    hits = searcher.search_vector(vec, k=5)
    assert vid in [h.vector_id for h in hits]
    assert [h.vector_id for h in hits] == brute_force("default", vec)[:5]


@pytest.mark.parametrize("query", ["", "   "])
def test_empty_query_is_an_error(tmp_path, tiny, query):
    make_photos(tmp_path / "photos", 2)
    run_index(tmp_path / "photos")
    with pytest.raises(QueryError, match="empty query"):
        Searcher("default").search(query)


def test_unknown_index_is_an_error(tiny):
    with pytest.raises(IndexStoreError, match="no index named 'nope'"):
        Searcher("nope")


def test_rerank_rescores_the_top_m_with_the_stored_regions(tmp_path, tiny, vocab_dir):
    from fakes import expected_record
    from ldot_testing import install_tiny_reranker

    import models

    install_tiny_reranker("uniter-base", vocab_dir)
    make_photos(tmp_path / "photos", 10)
    run_index(tmp_path / "photos")
    searcher = Searcher("default", device="cpu")
    plain = searcher.search("a dog on the beach", k=10)
    reranked = searcher.search("a dog on the beach", k=3, rerank_k=6)
    assert len(reranked) == 3 and all(h.rerank_score is not None for h in reranked)
    assert {h.vector_id for h in reranked} <= {h.vector_id for h in plain[:6]}
    assert [h.rerank_score for h in reranked] == sorted((h.rerank_score for h in reranked), reverse=True)
    # the score is the cross-encoder's on the right image's regions, as the detector made them
    rr = models.load_reranker("uniter-base", device="cpu")
    for hit in reranked:
        rec = expected_record(hit.path.decode())
        want = rr.score(["a dog on the beach"], rec.features[None].astype(np.float32), rec.norm_bb[None])
        assert abs(float(want[0]) - hit.rerank_score) < 1e-3


def test_rerank_without_regions_is_a_clear_error(tmp_path, tiny, vocab_dir):
    from ldot_testing import install_tiny_reranker

    install_tiny_reranker("uniter-base", vocab_dir)
    make_photos(tmp_path / "photos", 3)
    Indexer("default", IndexOptions(model="tiny", num_workers=0, keep_regions=False), detector=FakeDetector()).run(
        [tmp_path / "photos"])
    assert not (index_path("default") / ".staging-regions").exists()
    with pytest.raises(IndexStoreError, match="`no_regions`"):
        Searcher("default", device="cpu").search("a dog", k=2, rerank_k=3)


def test_image_query_reuses_the_stored_vector(tmp_path, tiny):
    photos = make_photos(tmp_path / "photos", 6)
    run_index(tmp_path / "photos")
    searcher = Searcher("default")
    vec = searcher.image_vector(photos[2])
    hits = searcher.search_vector(vec, k=6)
    assert [h.vector_id for h in hits] == brute_force("default", vec)[:6]
    with pytest.raises(QueryError, match="not a readable file"):
        searcher.image_vector(tmp_path / "missing.png")
