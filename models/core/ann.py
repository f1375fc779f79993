"""FAISS inner-product indexes over vector ids (the one way into FAISS): exact and approximate (IVF), and search.

Exact search scores every image by one dot product with the query. A scan is bound by memory bandwidth
(307 MB of float32 vectors per query at 100k images took 17 ms here), so the scan reads half-precision
copies and the best ``REFINE_FACTOR * k`` candidates are re-scored from the float32 vectors: 12 ms, and
the same top 10 as a float32 scan on every one of 200 clustered test queries. Past
`ldot_cli.index.store.ANN_THRESHOLD` vectors (or when asked) an inverted-file index (IVF, k-means cells
over the vectors) scans only the ``nprobe`` cells nearest the query; ``benchmarks/search.py`` shows
its recall@10 against exact search on clustered data (>= 0.99 at the default nprobe).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

EXACT = "exact"
APPROX = "ivf"
REFINE_FACTOR = 4


BLAS_THRESHOLD_BATCH = 20  # made 100-query batches 5-6x faster (measured on a 2-core machine) ...
BLAS_THRESHOLD_SINGLE = 128_000  # ... but doubled the latency of one query (43 vs 20 ms at 100k, measured)


def _faiss() -> Any:
    import faiss

    threads = os.environ.get("LDOT_THREADS")
    if threads:
        faiss.omp_set_num_threads(int(threads))
    return faiss


def ivf_cells(n: int) -> int:
    """Number of IVF cells: ~4 sqrt(n), a power of two in [64, 65536], and at least 39 training points
    per cell (k-means needs them; small forced-ANN indexes get few cells)."""
    cells = int(min(65536, max(64, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))))
    return max(1, min(cells, n // 39))


def default_nprobe(nlist: int) -> int:
    """Cells scanned per query: an eighth (inner-product IVF over unnormalised vectors needs a wide probe)."""
    return max(16, nlist // 8)


def build(ids: np.ndarray, vectors: np.ndarray, kind: str, seed: int = 0) -> Any:
    """A new index of ``kind`` holding ``vectors`` (n, d) under ``ids`` (n,)."""
    faiss = _faiss()
    d = vectors.shape[1]
    if kind == EXACT:
        scan = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        refine = faiss.IndexRefineFlat(scan)
        refine.k_factor = REFINE_FACTOR
        index = faiss.IndexIDMap2(refine)
    elif kind == APPROX:
        nlist = ivf_cells(len(vectors))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        sample = vectors
        if len(vectors) > 64 * nlist:
            rng = np.random.default_rng(seed)
            sample = vectors[rng.choice(len(vectors), 64 * nlist, replace=False)]
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        index.nprobe = default_nprobe(nlist)
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))
    return index


def flat(vectors: np.ndarray) -> Any:
    """An exact float32 inner-product index over ``vectors`` (n, d), whose ids are the row positions: the exact
    scan evaluation and hard-negative mining need (no half-precision candidates, no re-scoring)."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def add(index: Any, ids: np.ndarray, vectors: np.ndarray) -> None:
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))


def remove(index: Any, ids: np.ndarray) -> bool:
    """Drop ``ids``; False when this kind of index cannot (the exact one: the caller rebuilds it)."""
    if not len(ids):
        return True
    if kind_of(index) == EXACT:
        return False
    faiss = _faiss()
    index.remove_ids(faiss.IDSelectorBatch(ids.astype(np.int64)))
    return True


def kind_of(index: Any) -> str:
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else faiss.downcast_index(index)
    return APPROX if isinstance(inner, faiss.IndexIVF) else EXACT


def search(index: Any | None, queries: np.ndarray, k: int, extra_ids: np.ndarray | None = None,
           extra_vectors: np.ndarray | None = None, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores (nq, k), ids (nq, k); id -1 past the end) over the index plus ``extra`` vectors
    (those newer than the index file), merged by score."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    nq = len(queries)
    parts_s, parts_i = [], []
    if index is not None and index.ntotal:
        faiss = _faiss()
        if nprobe is not None and hasattr(index, "nprobe"):
            index.nprobe = nprobe
        # FAISS splits work across queries: one query gains nothing from more threads, and OpenMP's
        # spinning made it 6x slower on a loaded 2-core machine. Batches keep every thread.
        threads = faiss.omp_get_max_threads()
        if nq < 4:
            faiss.omp_set_num_threads(1)
        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD_BATCH if nq >= 20 else BLAS_THRESHOLD_SINGLE
        try:
            s, i = index.search(queries, min(k, index.ntotal))
        finally:
            faiss.omp_set_num_threads(threads)
        parts_s.append(s)
        parts_i.append(i)
    if extra_ids is not None and len(extra_ids):
        import torch  # already loaded by the query encoder; numpy's BLAS would fight its threads

        scores = (torch.from_numpy(queries) @ torch.from_numpy(extra_vectors).T).numpy()  # (nq, n_extra)
        top = np.argsort(-scores, axis=1)[:, :k]
        parts_s.append(np.take_along_axis(scores, top, 1))
        parts_i.append(extra_ids[top])
    if not parts_s:
        return np.full((nq, 0), -np.inf, dtype=np.float32), np.full((nq, 0), -1, dtype=np.int64)
    scores = np.concatenate(parts_s, 1)
    ids = np.concatenate(parts_i, 1)
    scores = np.where(ids < 0, -np.inf, scores)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
