"""Approximate indexes stored as parts (contiguous id ranges, clones of one trained empty index) and searched
with FAISS's IndexShards: the same results as one index holding every vector; adding rewrites only the last
part, removing only the parts that held the ids; a crash before the commit keeps the old set; a part is
re-hashed only when its (size, mtime, inode) stamp changed."""

from __future__ import annotations

import os

import numpy as np
import pytest
from ldot_testing import write_meta_rows

from ldot_cli.index import rescore as rescore_module
from ldot_cli.index import verified as verified_module
from ldot_cli.index.catalogue import FileRow
from ldot_cli.index.layout import IndexStoreError, index_path
from ldot_cli.index.store import IndexStore
from models.core import ann


def clustered(n: int, d: int = 32, clusters: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    return centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)


def add(store: IndexStore, vectors: np.ndarray, start: int) -> list[int]:
    with store.transaction() as db:
        ids, rows = [], []
        for i, vec in enumerate(vectors, start):
            vid = store.add_vector(db, f"{i:064x}", vec, 10)
            ids.append(vid)
            rows.append(FileRow(f"/p/{i}.jpg".encode(), b"/p", 1, 1, f"{i:064x}", "indexed", None, 0, vid))
        store.put_files(db, rows)
    return ids


def make(name: str, kind: str, vectors: np.ndarray, part_rows: int) -> IndexStore:
    store = IndexStore(index_path(name), create=True)
    store.update_meta(dim=vectors.shape[1], ann_mode=kind, part_rows=part_rows)
    add(store, vectors, 0)
    store.sync_faiss()
    return store


def one_index(store: IndexStore) -> object:
    """Every stored vector in ONE clone of the store's trained empty index, with the tuned nprobe."""
    import json

    meta = store.meta_rows()
    single = ann.clone(store.vector_files.load(json.loads(meta["faiss_trained"]), mmap=False))
    ids, vectors = store.vectors()
    ann.add(single, ids, vectors)
    ann.set_nprobe(single, int(meta["nprobe"]))
    if meta["faiss_kind"] == ann.PQ:
        single = ann.open_rescored(single, store.dir, int(meta["rescore_rows"]), int(meta["dim"]))
    return single


def assert_same_results(store: IndexStore, queries: np.ndarray, nprobes: tuple[int | None, ...] = (None,)) -> None:
    index, _ = store.read_faiss()
    single = one_index(store)
    assert index.ntotal == single.ntotal
    for nprobe in nprobes:  # None: the tuned width
        if nprobe:
            ann.set_nprobe(index, nprobe)
            ann.set_nprobe(single, nprobe)
        for batch in (queries, queries[:1]):  # a batch, and one query (one thread per part)
            got_s, got_i = ann.search(index, batch, 10)
            want_s, want_i = ann.search(single, batch, 10)
            assert np.array_equal(got_i, want_i)
            assert np.allclose(got_s, want_s, rtol=0, atol=1e-5)


def part_files(store: IndexStore) -> list[str]:
    return [p["file"] for p in store.vector_files.parts()]


@pytest.mark.parametrize("threaded", [False, True], ids=["one-thread", "thread-a-part"])
@pytest.mark.parametrize("kind", [ann.APPROX, pytest.param(ann.PQ, marks=pytest.mark.slow)])
def test_parts_search_equals_one_index_holding_every_vector(kind, threaded, monkeypatch):
    monkeypatch.setattr(ann, "THREADED_SHARDS_MIN_CPUS", 1 if threaded else 10**6)
    vectors = clustered(2000)
    rng = np.random.default_rng(5)
    queries = vectors[rng.integers(0, 2000, 40)] + 0.1 * rng.standard_normal((40, 32)).astype(np.float32)
    with make("p", kind, vectors, part_rows=600) as store:
        parts = store.vector_files.parts()
        assert [p["rows"] for p in parts] == [600, 600, 600, 200]
        assert [p["first_id"] for p in parts] == [0, 601, 1201, 1801]  # contiguous id ranges
        index, max_id = store.read_faiss()
        assert max_id == 2000 and len(ann.parts_of(index)) == 4
        import faiss

        inner = faiss.downcast_index(index.index.index) if kind == ann.PQ else index  # PQ: behind the OPQ rotation
        assert isinstance(inner, faiss.IndexShardsIVF)  # the quantizer is searched once, each part scans its cells
        assert {ivf.nprobe for ivf in ann.ivf_indexes(index)} == {int(store.meta_rows().get("nprobe"))}  # tuned once
        # one coarse quantizer in RAM, the trained index's: the part files are written without theirs
        assert len({int(ivf.quantizer.this) for ivf in ann.ivf_indexes(index)}) == 1
        assert all(faiss.extract_index_ivf(faiss.read_index(str(store.dir / p["file"]))).quantizer.ntotal == 0
                   for p in parts)
        assert ann.kind_of(index) == kind and ann.nlist_of(index) == ann.nlist_of(one_index(store))
        assert_same_results(store, queries, nprobes=(None, 1, 3))  # the width set applies to every part
        narrow = ann.search(index, queries, 10)[1]
        ann.set_nprobe(index, 1)
        assert not np.array_equal(ann.search(index, queries, 10)[1], narrow)  # ... and it is the one used
        if kind == ann.PQ:  # new rows go to the fp16 re-scoring file and the last part
            add(store, vectors[:50] * 2, 5000)
            store.sync_faiss()
            assert [p["rows"] for p in store.vector_files.parts()] == [600, 600, 600, 250]
            assert_same_results(store, queries)
    from ldot_cli.index.status import describe_index

    info = describe_index("p")
    assert info["parts"] == 4 and info["index_type"] == kind and info["bytes_per_image"]


def test_adding_rewrites_only_the_last_part_and_removing_only_the_parts_holding_the_ids():
    vectors = clustered(1000)
    queries = clustered(30, seed=9)
    with make("p", ann.APPROX, vectors, part_rows=400) as store:
        first = part_files(store)
        assert len(first) == 3
        add(store, clustered(100, seed=2), 1000)
        assert store.sync_faiss().startswith("added 100, removed 0 (1 of 3 parts rewritten)")
        second = part_files(store)
        assert second[:2] == first[:2] and second[2] != first[2]
        assert [p["rows"] for p in store.vector_files.parts()] == [400, 400, 300]
        add(store, clustered(150, seed=3), 2000)  # fills the last part, starts a new one from the trained index
        store.sync_faiss()
        third = part_files(store)
        assert third[:2] == first[:2] and [p["rows"] for p in store.vector_files.parts()] == [400, 400, 400, 50]
        assert store.vector_files.parts()[3]["first_id"] == 1201  # ids 1101..1200 filled the third part
        with store.transaction() as db:  # ids 401..410 live in the second part
            db.execute("DELETE FROM files WHERE vector_id BETWEEN 401 AND 410")
            store.delete_vectors(db, list(range(401, 411)))
        assert store.sync_faiss().startswith("added 0, removed 10 (1 of 4 parts rewritten)")
        fourth = part_files(store)
        assert fourth[0] == first[0] and fourth[1] != first[1] and fourth[2:] == third[2:]
        assert [p["rows"] for p in store.vector_files.parts()] == [400, 390, 400, 50]
        assert not store.db.execute("SELECT COUNT(*) FROM removed").fetchone()[0]
        assert_same_results(store, queries)
        on_disk = sorted(p.name for p in store.dir.glob("vectors.*.faiss"))
        trained = __import__("json").loads(store.meta_rows().get("faiss_trained"))["file"]
        assert on_disk == sorted(fourth + [trained])  # replaced parts were deleted


@pytest.mark.parametrize("kind", [ann.APPROX, pytest.param(ann.PQ, marks=pytest.mark.slow)])
def test_a_crash_before_the_commit_keeps_the_old_set_of_parts(monkeypatch, kind):
    vectors = clustered(900)
    queries = clustered(20, seed=9)
    with make("p", kind, vectors, part_rows=400) as store:
        before_meta = store.meta_rows()
        before = ann.search(store.read_faiss()[0], queries, 10)
        add(store, clustered(300, seed=2), 1000)
        with store.transaction() as db:
            db.execute("DELETE FROM files WHERE vector_id = 1")
            store.delete_vectors(db, [1])

        def killed(*args, **kwargs):
            raise KeyboardInterrupt  # as if the process died after writing new parts, before the commit

        monkeypatch.setattr(IndexStore, "commit_vector_files", killed)
        with pytest.raises(KeyboardInterrupt):
            store.sync_faiss()
        monkeypatch.undo()
        assert len(list(store.dir.glob("vectors.part-*.faiss"))) > 3  # new parts written, not committed
        after_meta = store.meta_rows()
        for key in ("faiss_parts", "faiss_sha256", "faiss_rows", "faiss_max_id"):
            assert after_meta[key] == before_meta[key]
        index, max_id = store.read_faiss()  # the old set, intact: every file matches its record
        assert max_id == 900 and index.ntotal == 900
        got = ann.search(index, queries, 10)
        assert np.array_equal(got[1], before[1]) and np.allclose(got[0], before[0])
        assert store.sync_faiss().startswith("added 300, removed 1")  # the next run completes
        assert [p["rows"] for p in store.vector_files.parts()] == [399, 400, 400]
        assert len(list(store.dir.glob("vectors.part-*.faiss"))) == 3  # the leftovers were deleted
        assert_same_results(store, queries)
        if kind == ann.PQ:  # the fp16 rows the killed run appended are not appended twice
            rows = int(store.meta_rows().get("rescore_rows"))
            ids = np.fromfile(store.dir / ann.RESCORE_IDS, dtype="<i8", count=rows)
            assert rows == 1200 and (np.diff(ids) > 0).all()


def test_parts_are_rehashed_only_when_their_stamp_changes_and_damage_is_rebuilt(monkeypatch):
    vectors = clustered(900)
    queries = clustered(20, seed=9)
    with make("p", ann.APPROX, vectors, part_rows=400) as store:
        want = ann.search(store.read_faiss()[0], queries, 10)
        hashed = []
        real = verified_module.sha256_file
        monkeypatch.setattr(verified_module, "sha256_file", lambda path: hashed.append(path) or real(path))
        store.read_faiss()
        assert hashed == []  # every stamp as recorded when written: nothing re-hashed
        path = store.dir / part_files(store)[1]
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched (a copy, a backup tool...)
        store.read_faiss()
        assert hashed == [path]  # re-hashed once, matched, remembered ...
        store.read_faiss()
        assert hashed == [path]  # ... so not again
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))  # a write moves the mtime on
        with pytest.raises(IndexStoreError, match="damaged"):
            store.read_faiss()
        untouched = [part_files(store)[0], part_files(store)[2]]
        # `ldot index` stats every part: the damaged one alone is rebuilt from its id range in SQLite
        assert store.sync_faiss() == "added 0, removed 0, repaired 1 damaged part(s) (1 of 3 parts rewritten)"
        assert [part_files(store)[0], part_files(store)[2]] == untouched
        got = ann.search(store.read_faiss()[0], queries, 10)
        assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0])
        assert_same_results(store, queries)


def test_an_index_written_before_parts_is_read_and_converted_on_the_next_update():
    import json

    import faiss

    from models.core.fileio import sha256_file

    vectors = clustered(500)
    queries = clustered(20, seed=9)
    with make("p", ann.APPROX, vectors, part_rows=1000) as store:
        want = ann.search(store.read_faiss()[0], queries, 10)
        (only,) = part_files(store)
        trained = json.loads(store.meta_rows().get("faiss_trained"))["file"]
        faiss.write_index(store.read_faiss()[0], str(store.dir / "vectors.faiss"))  # earlier versions' layout:
        # one file, with its quantizer
        with store.transaction() as db:
            db.execute("DELETE FROM meta WHERE key IN ('faiss_parts', 'faiss_trained', 'faiss_generation')")
            write_meta_rows(store, {"faiss_sha256": sha256_file(store.dir / "vectors.faiss"), "part_rows": "400"}, db)
        (store.dir / only).unlink()
        (store.dir / trained).unlink()
        assert store.vector_files.parts()[0]["file"] == "vectors.faiss"
        got = ann.search(store.read_faiss()[0], queries, 10)
        assert np.array_equal(got[1], want[1])
        add(store, clustered(50, seed=2), 1000)
        store.sync_faiss()  # the old file is full (500 >= 400): a new part, cloned from it emptied
        assert [p["rows"] for p in store.vector_files.parts()] == [500, 50]
        assert not (store.dir / "vectors.faiss").exists() and store.meta_rows().get("faiss_trained")
        assert_same_results(store, queries)


def test_searcher_uses_the_parts_and_repairs_a_damaged_one_alone():
    from ldot_cli.index.search import Searcher
    from models.core.errors import LdotWarning

    vectors = clustered(900)
    queries = clustered(5, seed=9)
    with make("p", ann.APPROX, vectors, part_rows=400) as store:
        store.update_meta(model="tiny")
        single = one_index(store)
        names = part_files(store)
    searcher = Searcher("p")
    try:
        for q in queries:
            hits = searcher.search_vector(q[None], k=5)
            scores, ids = ann.search(single, q[None], 5)
            assert [h.vector_id for h in hits] == ids[0].tolist()
            assert np.allclose([h.score for h in hits], scores[0], atol=1e-5)
        path = index_path("p") / names[2]
        data = bytearray(path.read_bytes())
        data[-64] ^= 0x01
        path.write_bytes(bytes(data))
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        write_meta_rows(searcher.store, {"faiss_sha256": "x"})  # as after a concurrent write: the searcher reloads
        with pytest.warns(LdotWarning, match="rebuilt"):
            hits = searcher.search_vector(queries[0][None], k=5)
        assert [h.vector_id for h in hits] == ann.search(single, queries[0][None], 5)[1][0].tolist()
        assert part_files(searcher.store)[:2] == names[:2]  # the intact parts were kept
    finally:
        searcher.close()


@pytest.mark.parametrize("damage", ["flip a row", "change an id", "one row short", "no record"])
def test_the_rescoring_files_are_verified_and_rebuilt_from_sqlite(damage):
    """Before the fix: `vectors.f16` / `vectors.f16.ids` were trusted as they were: a flipped row silently dropped
    the top hit, a changed id a result, and a file one row short raised `ValueError: mmap length ...`."""
    import json

    vectors = clustered(900)
    queries = vectors[:20] + 0.01
    with make("r", ann.PQ, vectors, part_rows=400) as store:
        want = ann.search(store.read_faiss()[0], queries, 10)
        data, ids = store.dir / ann.RESCORE_FILE, store.dir / ann.RESCORE_IDS
        row = 2 * 32  # bytes of one fp16 row of 32 dimensions
        if damage == "flip a row":
            raw = bytearray(data.read_bytes())
            top = int(np.searchsorted(np.fromfile(ids, dtype="<i8"), want[1][0, 0]))
            raw[top * row: (top + 1) * row] = np.full(32, -1, dtype="<f2").tobytes()
            data.write_bytes(bytes(raw))
        elif damage == "change an id":
            raw = bytearray(ids.read_bytes())
            raw[8 * 5: 8 * 6] = np.asarray([10**9], dtype="<i8").tobytes()
            ids.write_bytes(bytes(raw))
        elif damage == "one row short":
            data.write_bytes(data.read_bytes()[:-row])
        else:  # written by an ldot that recorded no hashes of them: checked once against SQLite by rebuilding
            write_meta_rows(store, {"rescore_record": ""})
        with pytest.raises(IndexStoreError, match="older ldot" if damage == "no record" else "damaged"):
            store.read_faiss()
        said = store.sync_faiss()  # rebuilt from SQLite, the parts kept
        assert "re-scoring" in said and ("damaged" in said) == (damage != "no record"), said
        got = ann.search(store.read_faiss()[0], queries, 10)
        assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0], atol=1e-5)
        record = json.loads(store.meta_rows().get("rescore_record"))
        assert record["rows"] == 900 == int(store.meta_rows().get("rescore_rows"))


def test_rescoring_files_appended_to_stay_verified_without_rehashing(monkeypatch):
    vectors = clustered(1000)
    with make("r2", ann.PQ, vectors[:900], part_rows=400) as store:
        add(store, vectors[900:], 900)
        assert store.sync_faiss().startswith("added 100")
        hashed = []
        real = rescore_module.sha256_range
        monkeypatch.setattr(rescore_module, "sha256_range", lambda path, a, b: hashed.append(path) or real(path, a, b))
        index, _ = store.read_faiss()  # stamps as recorded when written: nothing re-hashed
        assert hashed == [] and index.ntotal == 1000 and len(index.ids) == 1000
        data = store.dir / ann.RESCORE_FILE
        st = data.stat()
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: re-hashed once (both segments) ...
        assert store.read_faiss()[0].ntotal == 1000
        assert len(hashed) == 4 and set(hashed) == {data, store.dir / ann.RESCORE_IDS}
        store.read_faiss()
        assert len(hashed) == 4  # ... matched and remembered: not again
        assert ann.search(store.read_faiss()[0], vectors[950:951], 1)[1][0, 0] == 951


def test_rescoring_files_of_an_older_ldot_are_recorded_without_a_damage_warning():
    """An IVF-PQ index written before the re-scoring files had a record: the first search rewrites them from
    SQLite and records them, silently (it is an upgrade, not damage), and finds the same hits."""
    import warnings

    from ldot_cli.index.search import Searcher
    from models.core.errors import LdotWarning

    vectors = clustered(900)
    with make("old", ann.PQ, vectors, part_rows=400) as store:
        store.update_meta(model="tiny")
        want = ann.search(store.read_faiss()[0], vectors[:3] + 0.01, 5)[1]
        store.db.execute("DELETE FROM meta WHERE key = 'rescore_record'")
        store.db.commit()
    searcher = Searcher("old")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", LdotWarning)
            hits = [searcher.search_vector(q[None], k=5) for q in vectors[:3] + 0.01]
        assert [[h.vector_id for h in row] for row in hits] == want.tolist()
        assert searcher.store.meta_rows().get("rescore_record")
    finally:
        searcher.close()
