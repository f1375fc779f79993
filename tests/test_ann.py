"""The vector index tiers: exact results equal a brute-force scan; approximate recall@10 >= 0.99 on
clustered data (never measured on random Gaussian vectors, where ANN recall means nothing)."""

from __future__ import annotations

import numpy as np
import pytest

from ldot_cli.index.catalogue import FileRow
from ldot_cli.index.layout import index_path
from ldot_cli.index.store import IndexStore
from models.core import ann


def clustered(n: int, d: int = 64, clusters: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    return centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)


def near(vectors: np.ndarray, n: int, seed: int = 1) -> np.ndarray:
    """Queries near the data (aligned text queries land near the images they describe)."""
    rng = np.random.default_rng(seed)
    return vectors[rng.integers(0, len(vectors), n)] + 0.1 * rng.standard_normal((n, vectors.shape[1])).astype(np.float32)


def brute(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :k] + 1  # ids start at 1


def recall(truth: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean([len(set(t) & set(g)) / len(t) for t, g in zip(truth, got)]))


def test_exact_tier_equals_brute_force():
    vectors = clustered(3000)
    queries = near(vectors, 50)
    index = ann.build(np.arange(1, 3001), vectors, ann.EXACT)
    scores, ids = ann.search(index, queries, 10)
    assert np.array_equal(ids, brute(vectors, queries, 10))
    assert np.allclose(scores, np.sort(queries @ vectors.T, axis=1)[:, ::-1][:, :10], atol=1e-4)
    assert not ann.remove(index, np.array([1]))  # the store rebuilds this kind on removals


def test_approximate_tier_recall_on_clustered_data():
    vectors = clustered(20_000)
    queries = near(vectors, 200)
    index = ann.build(np.arange(1, 20_001), vectors, ann.APPROX)
    assert ann.kind_of(index) == ann.APPROX and index.nlist == ann.ivf_cells(20_000)
    _, ids = ann.search(index, queries, 10)
    assert recall(brute(vectors, queries, 10), ids) >= 0.99
    assert ann.remove(index, np.array([1, 2, 3])) and index.ntotal == 19_997


def test_small_forced_ann_index_still_trains():
    vectors = clustered(30)
    index = ann.build(np.arange(1, 31), vectors, ann.APPROX)
    _, ids = ann.search(index, vectors[:3], 5)
    assert ids.shape == (3, 5) and (ids > 0).all()


def test_nprobe_is_tuned_to_the_fewest_cells_that_reach_the_recall_target():
    # unclustered vectors need a wide probe; clustered ones a narrow one: one fixed fraction fits neither
    rng = np.random.default_rng(0)
    for vectors, wide in ((rng.standard_normal((20_000, 32)).astype(np.float32), True), (clustered(20_000), False)):
        ids = np.arange(1, len(vectors) + 1)
        index = ann.build(ids, vectors, ann.APPROX)
        queries = vectors[rng.integers(0, len(vectors), 100)]
        chunks = [(ids, vectors)]
        nprobe, got = ann.tune_nprobe(index, chunks.__iter__, queries)
        assert index.nprobe == nprobe and got >= ann.RECALL_TARGET
        assert got == ann.sample_recall(index, chunks.__iter__, queries)
        assert (nprobe > ann.MIN_NPROBE) == wide and nprobe < index.nlist
        if wide:  # the next narrower width misses the target
            ann.set_nprobe(index, nprobe // 2)
            assert ann.sample_recall(index, chunks.__iter__, queries) < ann.RECALL_TARGET
    # a target the codes cannot reach: doubling the cells stops once it buys nothing (no full scan)
    vectors = clustered(20_000)
    ids = np.arange(1, len(vectors) + 1)
    index = ann.build(ids, vectors, ann.APPROX)
    nprobe, got = ann.tune_nprobe(index, lambda: iter([(ids, vectors)]), vectors[:50], target=1.01)
    assert nprobe < index.nlist // 4 and index.nprobe == nprobe and got == 1.0
    exact = ann.build(np.arange(1, 101), clustered(100), ann.EXACT)
    assert ann.tune_nprobe(exact, lambda: iter([]), clustered(5)) == (None, 1.0)


@pytest.mark.parametrize("mode", ["ivf", "exact"])
def test_store_switches_tier_and_searches_through_it(mode):
    vectors = clustered(2000)
    with IndexStore(index_path("t"), create=True) as store:
        store.update_meta(dim=64, ann_mode=mode)
        with store.transaction() as db:
            rows = []
            for i, vec in enumerate(vectors):
                vid = store.add_vector(db, f"{i:064x}", vec, 10)
                rows.append(FileRow(f"/p/{i}.jpg".encode(), b"/p", 1, 1, f"{i:064x}", "indexed", None, 0, vid))
            store.put_files(db, rows)
        store.sync_faiss()
        index, max_id = store.read_faiss()
        assert ann.kind_of(index) == mode and max_id == 2000 and index.ntotal == 2000
        queries = near(vectors, 100, seed=3)
        _, ids = ann.search(index, queries, 10)
        assert recall(brute(vectors, queries, 10), ids) >= (0.99 if mode == "ivf" else 1.0)


@pytest.mark.slow
def test_ivfpq_with_exact_rescoring_recall_on_clustered_data():
    """OPQ + IVF-PQ codes in RAM, the top candidates re-scored exactly from fp16 copies: recall@10 >= 0.95."""
    vectors = clustered(6000, d=32)
    queries = near(vectors, 200)
    index = ann.build(np.arange(1, 6001), vectors, ann.PQ)
    assert ann.kind_of(index) == ann.PQ and index.ntotal == 6000
    _, ids = ann.search(index, queries, 10)
    assert recall(brute(vectors, queries, 10), ids) >= 0.95
    index.factor = 1  # the PQ codes alone, without re-scoring: clearly worse (the re-scoring does the work)
    _, ids = ann.search(index, queries, 10)
    assert recall(brute(vectors, queries, 10), ids) < 0.9
    assert ann.remove(index, np.array([1, 2])) and index.ntotal == 5998


def test_automatic_choice_from_count_and_memory_budget():
    gb = 1 << 30
    assert ann.choose_kind(1000, 768, 250_000, 8 * gb) == ann.EXACT
    assert ann.choose_kind(1_000_000, 768, 250_000, 8 * gb) == ann.APPROX  # 3.1 GB of float32
    assert ann.choose_kind(10_000_000, 768, 250_000, 8 * gb) == ann.PQ  # 31 GB would not fit
    assert ann.choose_kind(100_000, 768, 250_000, 64 << 20) == ann.PQ  # a tiny budget
    assert ann.ram_bytes(ann.PQ, 100_000_000, 768) < 8 * gb
    assert ann.factory_string(ann.PQ, 10_000_000, 768).startswith("OPQ64_256,IVF16384_HNSW32,PQ64x8")
    assert ann.parse_bytes("8GB") == 8 * gb and ann.parse_bytes("512m") == 512 << 20
    with pytest.raises(ValueError):
        ann.parse_bytes("lots")


@pytest.mark.slow
def test_store_builds_ivfpq_past_the_memory_budget_and_rescores_from_disk():
    vectors = clustered(5000, d=32)
    with IndexStore(index_path("pq"), create=True) as store:
        store.update_meta(dim=32, memory_budget=256 << 10)  # 256 kB: only PQ codes fit
        with store.transaction() as db:
            for i, vec in enumerate(vectors):
                store.add_vector(db, f"{i:064x}", vec, 10)
        store.sync_faiss()
        meta = store.meta_rows()
        assert meta["faiss_kind"] == ann.PQ and meta["faiss_factory"].startswith("OPQ8_32,IVF")
        assert float(meta["recall_at_10"]) >= 0.95
        index, _ = store.read_faiss()
        assert index.nprobe == int(meta["nprobe"]) >= ann.MIN_NPROBE  # the tuned width is in the file
        import faiss

        quantizer = faiss.downcast_index(faiss.extract_index_ivf(ann.parts_of(index)[0]).quantizer)
        assert quantizer.hnsw.efSearch >= 2 * index.nprobe  # the HNSW quantizer looks wider than it returns
        assert isinstance(index.vectors, np.memmap) and len(index.ids) == 5000
        queries = near(vectors, 100, seed=3)
        _, ids = ann.search(index, queries, 10)
        assert recall(brute(vectors, queries, 10), ids) >= 0.95
        with store.transaction() as db:  # incremental: new rows appended to the fp16 file
            store.add_vector(db, "f" * 64, vectors[0] * 3, 10)
        store.sync_faiss()
        index, _ = store.read_faiss()
        assert index.ntotal == 5001 and ann.search(index, vectors[:1] * 3, 1)[1][0, 0] == 5001
    from ldot_cli.index.status import describe_index

    info = describe_index("pq")
    assert info["index_type"] == ann.PQ and info["recall_at_10"] >= 0.95 and info["shards"] == 0
    assert info["nprobe"] >= ann.MIN_NPROBE
    assert info["factory"].startswith("OPQ8_32,IVF") and 0 < info["bytes_per_image"] < 32 * 4 + 64


def _in_subprocess(code: str, home) -> "subprocess.CompletedProcess[str]":  # noqa: F821
    """Run ``code`` in a fresh interpreter: a native abort inside FAISS fails the test instead of killing pytest."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}", "LDOT_HOME": str(home),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("n, dim", [(28, 768), (200, 768), (20, 32)])
def test_a_forced_ivfpq_on_a_small_index_falls_back_instead_of_aborting_in_faiss(tmp_path, n, dim):
    """Before the fix: `ldot index --index-type ivfpq` on 28 images aborted inside FAISS's training (double free;
    fewer points than OPQ's output dimension), and the saved mode made every later run abort too."""
    code = f"""
import warnings
import numpy as np
from ldot_cli.index.layout import index_path
from ldot_cli.index.store import IndexStore
from models.core import ann
from models.core.errors import LdotWarning

rng = np.random.default_rng(0)
with IndexStore(index_path("small"), create=True) as store:
    store.update_meta(dim={dim}, ann_mode="ivfpq")
    with store.transaction() as db:
        for i in range({n}):
            store.add_vector(db, f"{{i:064x}}", rng.standard_normal({dim}).astype(np.float32), 10)
    for run in range(2):  # the saved mode does not brick the next run
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            print("ACTION", store.sync_faiss())
        print("WARN", [str(w.message) for w in caught if issubclass(w.category, LdotWarning)])
        index, _ = store.read_faiss()
        print("KIND", store.meta_rows().get("faiss_kind"), store.meta_rows().get("ann_mode"), index.ntotal)
"""
    result = _in_subprocess(code, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert out.count(f"KIND exact ivfpq {n}") == 2  # searched exactly, the ivfpq choice kept
    warned = [line for line in out.splitlines() if line.startswith("WARN")]
    need = ann.pq_min_training(dim, n)
    assert all(f"IVF-PQ needs at least {need:,} vectors" in w and f"has {n:,}" in w for w in warned)
    assert need >= max(ann.pq_shape(dim)[1], 39 * 16)  # OPQ's output dimension; FAISS's 39 points per centroid


def test_ivfpq_is_never_trained_on_fewer_points_than_its_codebooks_need(tmp_path):
    result = _in_subprocess("""
import numpy as np
from models.core import ann
try:
    ann.train_empty(ann.PQ, 768, 100, np.random.default_rng(0).standard_normal((100, 768)).astype(np.float32))
except ValueError as exc:
    print("REFUSED", exc)
""", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "REFUSED" in result.stdout and "624" in result.stdout and "\\n" not in result.stdout.strip()


@pytest.mark.slow
def test_a_forced_ivfpq_index_becomes_ivfpq_once_it_has_enough_vectors(tmp_path):
    with IndexStore(index_path("grows"), create=True) as store:
        store.update_meta(dim=32, ann_mode=ann.PQ)
        vectors = clustered(700, d=32)
        with store.transaction() as db:
            for i, vec in enumerate(vectors[:100]):
                store.add_vector(db, f"{i:064x}", vec, 10)
        with pytest.warns(Warning, match="IVF-PQ needs at least 624 vectors"):
            store.sync_faiss()
        assert store.meta_rows().get("faiss_kind") == ann.EXACT
        with store.transaction() as db:
            for i, vec in enumerate(vectors[100:], 100):
                store.add_vector(db, f"{i:064x}", vec, 10)
        store.sync_faiss()
        assert store.meta_rows().get("faiss_kind") == ann.PQ and store.read_faiss()[0].ntotal == 700
