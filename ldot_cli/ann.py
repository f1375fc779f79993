"""FAISS inner-product indexes over vector ids: exact (flat) and approximate (IVF), and their search.

Exact search is a flat scan: every image scored by one dot product with the query. Past
`index_store.ANN_THRESHOLD` vectors (or with ``--ann``) an inverted-file index (IVF, k-means cells
over the vectors) scans only the ``nprobe`` cells nearest the query; ``benchmarks/search.py`` shows
its recall@10 against exact search on clustered data (>= 0.99 at the default nprobe).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

EXACT = "flat"
APPROX = "ivf"


def _faiss() -> Any:
    import faiss

    # Batched queries go through BLAS above this many queries; ~20 made 100-query batches 5-6x faster here.
    faiss.cvar.distance_compute_blas_threshold = 20
    threads = os.environ.get("LDOT_THREADS")
    if threads:
        faiss.omp_set_num_threads(int(threads))
    return faiss


def ivf_cells(n: int) -> int:
    """Number of IVF cells: ~4 sqrt(n), a power of two in [64, 65536]."""
    return int(min(65536, max(64, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))))


def default_nprobe(nlist: int) -> int:
    return max(16, nlist // 16)


def build(ids: np.ndarray, vectors: np.ndarray, kind: str, seed: int = 0) -> Any:
    """A new index of ``kind`` holding ``vectors`` (n, d) under ``ids`` (n,)."""
    faiss = _faiss()
    d = vectors.shape[1]
    if kind == EXACT:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
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


def add(index: Any, ids: np.ndarray, vectors: np.ndarray) -> None:
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))


def remove(index: Any, ids: np.ndarray) -> None:
    if len(ids):
        faiss = _faiss()
        index.remove_ids(faiss.IDSelectorBatch(ids.astype(np.int64)))


def kind_of(index: Any) -> str:
    faiss = _faiss()
    return APPROX if isinstance(faiss.downcast_index(index), faiss.IndexIVF) else EXACT


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
        try:
            s, i = index.search(queries, min(k, index.ntotal))
        finally:
            faiss.omp_set_num_threads(threads)
        parts_s.append(s)
        parts_i.append(i)
    if extra_ids is not None and len(extra_ids):
        scores = queries @ extra_vectors.T  # (nq, n_extra)
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
