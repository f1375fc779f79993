"""FAISS inner-product indexes over vector ids (the one way into FAISS): exact and approximate (IVF), and search.

Exact search scores every image by one dot product with the query. A scan is bound by memory bandwidth
(307 MB of float32 vectors per query at 100k images took 17 ms here), so the scan reads half-precision
copies and the best ``REFINE_FACTOR * k`` candidates are re-scored from the float32 vectors: 12 ms, and
the same top 10 as a float32 scan on every one of 200 clustered test queries. Past
`ldot_cli.index.layout.ANN_THRESHOLD` vectors (or when asked) an inverted-file index (IVF, k-means cells
over the vectors) scans only the ``nprobe`` cells nearest the query; ``benchmarks/search.py`` shows
its recall@10 against exact search on clustered data. How many cells a query scans is tuned when the
index is built: the fewest (a power of two, at least ``MIN_NPROBE``) whose recall@10 against exact search
reaches ``RECALL_TARGET`` on a sample of stored vectors; that width is saved in the index file, so a
search costs what the recall needs and not a fixed fraction of the collection (at 100M images a fixed
eighth of the cells would scan 12.5M codes per query).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

if TYPE_CHECKING:
    import faiss

EXACT = "exact"
APPROX = "ivf"
PQ = "ivfpq"  # OPQ + IVF-PQ codes in RAM, the top candidates re-scored exactly from fp16 vectors on disk
KINDS = (EXACT, APPROX, PQ)
REFINE_FACTOR = 4
# IVF-PQ: candidates re-scored exactly per result wanted (2,560 fp16 rows for a top 10). The codes' ranking, not
# nprobe, limits recall: on clustered 768-d vectors (clusters of ~1,000 near-ties) 64 capped recall@10 at 0.980 at
# 100k and 0.923 at 10M whatever the nprobe; 256 gave 0.999 at 100k, for 5-12 ms more per query of a 100-query
# batch at 100k (a one-off diagnostic on this 2-core machine; benchmarks/scale.py measures the tier as a whole)
RESCORE_FACTOR = 256
RESCORE_FILE = "vectors.f16"  # (n, dim) float16 rows in id order, memory-mapped for re-scoring
RESCORE_IDS = "vectors.f16.ids"  # (n,) int64, ascending: the id of each row
DEFAULT_BUDGET_FRACTION = 0.5  # without --memory-budget: half the machine's RAM for the vector index
# The approximate tiers are stored as parts (contiguous id ranges), all cloned from one trained empty index and
# searched together by `shards`: adding images rewrites only the last part, and FAISS searches the parts on one
# thread each. A part holds at most PART_ROWS vectors and about PART_BYTES of codes (`part_rows`).
PART_ROWS = 4_000_000
PART_BYTES = 1 << 30
# One thread a part only from this many cores. On 2 shared cores (1M x 128 in 8 parts, benchmarks/parts.py, two
# runs) one query took 0.83-0.86 ms with a thread a part, 0.69-0.71 ms with the parts one after another and
# 0.35-0.41 ms in one index (each part adds ~40 us of set-up and merging, small next to a scan of millions of
# codes); 100-query batches varied from run to run (threaded 82-156 ms, one after another 104-138, one index 38-48).
THREADED_SHARDS_MIN_CPUS = 4


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
    """Cells scanned per query before `tune_nprobe` has measured the index: an eighth (inner-product IVF over
    unnormalised vectors needs a wide probe)."""
    return max(MIN_NPROBE, nlist // 8)


RECALL_TARGET = 0.95  # recall@10 against exact search that the tuned nprobe must reach on the sample
MIN_NPROBE = 16  # never fewer cells: the sample queries are stored images, text queries lie farther away
PLATEAU = 0.002  # recall@10 gained by doubling nprobe below which the tuning stops short of its target


def pq_shape(dim: int) -> tuple[int, int]:
    """(bytes per code M, dimension after OPQ): 4 dimensions per byte, at most 64 bytes (768-d: 64, 256)."""
    m = max(4, min(64, dim // 4) // 4 * 4)
    return m, min(dim, 4 * m)


def pq_nlist(n: int) -> int:
    """IVF cells of an IVF-PQ index: as `ivf_cells` (4 sqrt(n): 16,384 at 10M, 32,768 at 100M), so that the
    codes a query scans grow with sqrt(n), not n. The cells are k-means centroids in OPQ's 256-d output."""
    return max(1, ivf_cells(n))


def factory_string(kind: str, n: int, dim: int) -> str:
    """The FAISS factory string of the index ``build`` makes (what `ldot status` shows)."""
    if kind == EXACT:
        return f"IDMap2,SQfp16,RFlat (k_factor {REFINE_FACTOR})"
    if kind == APPROX:
        return f"IVF{ivf_cells(n)},Flat"
    if kind == PQ:
        m, dout = pq_shape(dim)
        return f"OPQ{m}_{dout},IVF{pq_nlist(n)}_HNSW32,PQ{m}x{_pq_bits(n)} + exact re-scoring of {RESCORE_FACTOR}k from fp16"
    raise ValueError(f"unknown index kind {kind!r}")


MIN_POINTS_PER_CENTROID = 39  # FAISS's k-means minimum: below it, it warns "please provide at least 39 k points"


def pq_min_training(dim: int, n: int) -> int:
    """The fewest training points OPQ + IVF-PQ for ``n`` vectors of ``dim`` may be given: 39 a centroid of each
    sub-quantizer's codebook (2^bits centroids: 624 for the 4-bit ones, 9,984 for 8-bit; FAISS's own minimum),
    and never fewer than OPQ's output dimension: FAISS 1.x aborts natively below it (measured: 768-d with 255
    points, double free; 32-d with 31 points, invalid cluster assignment; 256 and 32 points train)."""
    return max(pq_shape(dim)[1], MIN_POINTS_PER_CENTROID * 2 ** _pq_bits(n))


def _pq_bits(n: int) -> int:
    """8-bit codebooks (256 centroids per byte) from 50k vectors on; smaller sets (PQ only when forced
    or on a tiny budget) get 4-bit ones, 16x cheaper to train and needing ~620 training points."""
    return 8 if n >= 50_000 else 4


def ram_bytes(kind: str, n: int, dim: int) -> int:
    """Memory the index of ``kind`` takes for ``n`` vectors (what the automatic choice compares)."""
    if kind == EXACT:
        return n * (2 * dim + 4 * dim + 8)  # fp16 scan + float32 refine + id map
    if kind == APPROX:
        return n * (4 * dim + 8) + ivf_cells(n) * dim * 4
    m, dout = pq_shape(dim)
    return n * (m + 8) + pq_nlist(n) * dout * 4 * 2 + dim * dout * 4


def default_memory_budget() -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 << 30
    return int(total * DEFAULT_BUDGET_FRACTION)


def choose_kind(n: int, dim: int, threshold: int, memory_budget: int | None = None) -> str:
    """exact up to ``threshold`` vectors, IVF past it, IVF-PQ past what fits ``memory_budget`` bytes
    (default: half the machine's RAM)."""
    budget = memory_budget or default_memory_budget()
    if n <= threshold and ram_bytes(EXACT, n, dim) <= budget:
        return EXACT
    if ram_bytes(APPROX, n, dim) <= budget or n < pq_min_training(dim, n):
        return APPROX
    return PQ


def parse_bytes(text: str) -> int:
    """``8GB``, ``512M``, ``1.5 GiB``, ``2000000000`` -> bytes."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not match:
        raise ValueError(f"{text!r} is not a size: write e.g. 8GB, 512MB or 2000000000")
    unit = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[match.group(2)]
    return int(float(match.group(1)) * unit)


def build_pq(dim: int, n: int, sample: np.ndarray, seed: int = 0) -> faiss.Index:
    """An empty, trained OPQ + IVF-PQ index (train on ``sample``, a spread subset of the vectors). Raises
    ValueError when ``sample`` has fewer points than its codebooks need (`pq_min_training`): FAISS is never
    handed them (it can abort the process)."""
    need = pq_min_training(dim, n)
    if len(sample) < need:
        raise ValueError(f"IVF-PQ needs at least {need:,} training vectors for its codebooks, got {len(sample):,}")
    faiss = _faiss()
    m, dout = pq_shape(dim)
    nlist = min(pq_nlist(n), max(1, len(sample) // 39))
    index = faiss.index_factory(dim, f"OPQ{m}_{dout},IVF{nlist}_HNSW32,PQ{m}x{_pq_bits(n)}",
                                faiss.METRIC_INNER_PRODUCT)
    # training cost: OPQ alternates PQ k-means and a rotation; a few rounds on a 16k sample get most of
    # its gain (the exact re-scoring makes up the rest); k-means with 10 iterations everywhere
    opq = faiss.downcast_VectorTransform(index.chain.at(0))
    opq.niter, opq.niter_pq_0, opq.max_train_points = 8, 10, 16_384
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.seed = seed
    ivf.cp.niter = 10
    ivf.pq.cp.niter = 10
    ivf.do_polysemous_training = False  # the factory turns it on; only Hamming pre-filtering uses it (5x the PQ training)
    bits = _pq_bits(n)
    trainer = faiss.ProductQuantizer(dout, m, bits) if bits != 8 else None
    if trainer is not None:
        opq.pq = trainer  # OPQ's own quantizer would be 8-bit, and warn about a small sample on stderr
    try:
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    finally:
        if trainer is not None:
            opq.pq = None  # only borrowed for training
    ivf.nprobe = default_nprobe(ivf.nlist)  # the quantizer's search width stays small while vectors are added
    return index


class Rescored:
    """An IVF-PQ index whose top ``RESCORE_FACTOR * k`` candidates are re-scored exactly (inner products
    with float16 copies of the vectors, memory-mapped from disk: RAM holds only the PQ codes)."""

    def __init__(self, index: faiss.Index, ids: np.ndarray, vectors: np.ndarray, factor: int = RESCORE_FACTOR) -> None:
        self.index, self.ids, self.vectors, self.factor = index, ids, vectors, factor

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def nprobe(self) -> int:
        return int(ivf_indexes(self.index)[0].nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        set_nprobe(self.index, value)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        wanted = min(self.ntotal, k * self.factor)
        _, cand = self.index.search(queries, wanted)
        out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(queries), k), -1, dtype=np.int64)
        for q, row in enumerate(cand):
            row = row[row >= 0]
            pos = np.searchsorted(self.ids, row)
            ok = (pos < len(self.ids)) & (self.ids[np.minimum(pos, len(self.ids) - 1)] == row)
            row, pos = row[ok], pos[ok]
            order = np.argsort(pos)  # read the memory-mapped rows in file order
            exact = self.vectors[pos[order]].astype(np.float32) @ queries[q]
            top = np.argsort(-exact, kind="stable")[:k]
            out_s[q, : len(top)] = exact[top]
            out_i[q, : len(top)] = row[order][top]
        return out_s, out_i


# what the functions below search, add to and inspect: a FAISS index, or an IVF-PQ one wrapped for re-scoring
Searchable: TypeAlias = "faiss.Index | Rescored"
# (ids (n,), vectors (n, dim)) pieces of the stored vectors, in id order, and what streams them anew at each call
Chunks: TypeAlias = "Iterable[tuple[np.ndarray, np.ndarray]]"
ChunkSource: TypeAlias = "Callable[[], Chunks]"


def write_rescore_vectors(data: str | os.PathLike[str], ids_file: str | os.PathLike[str], chunks: Chunks,
                          rows: int = 0) -> tuple[int, str, str]:
    """Append (ids, vectors) chunks to the fp16 re-scoring files after their first ``rows`` committed rows
    (a crash's partial tail is cut off first); returns the rows now in them and the sha256 of the bytes appended
    to each file (the caller records them: `open_rescored` trusts only files that match)."""
    import hashlib

    hash_data, hash_ids = hashlib.sha256(), hashlib.sha256()
    for path in (data, ids_file):
        open(path, "ab").close()
    with open(data, "r+b") as fd, open(ids_file, "r+b") as fi:
        started = False
        for ids, vectors in chunks:
            if not started:
                fd.truncate(rows * vectors.shape[1] * 2)
                fi.truncate(rows * 8)
                fd.seek(0, 2)
                fi.seek(0, 2)
                started = True
            block, id_block = (np.ascontiguousarray(vectors, dtype="<f2").tobytes(),
                               np.ascontiguousarray(ids, dtype="<i8").tobytes())
            fd.write(block)
            fi.write(id_block)
            hash_data.update(block)
            hash_ids.update(id_block)
            rows += len(ids)
        fd.flush()
        fi.flush()
        os.fsync(fd.fileno())
        os.fsync(fi.fileno())
    return rows, hash_data.hexdigest(), hash_ids.hexdigest()


def open_rescored(index: faiss.Index, directory: str | os.PathLike[str], rows: int, dim: int) -> Rescored:
    """Wrap a read IVF-PQ index with its memory-mapped fp16 vectors (the first ``rows`` committed rows)."""
    from pathlib import Path

    directory = Path(directory)
    for path, need in ((directory / RESCORE_IDS, rows * 8), (directory / RESCORE_FILE, rows * dim * 2)):
        if rows and path.stat().st_size < need:
            raise ValueError(f"{path} holds {path.stat().st_size:,} bytes, fewer than its {rows:,} rows need")
    ids = np.fromfile(directory / RESCORE_IDS, dtype="<i8", count=rows) if rows else np.zeros(0, np.int64)
    vectors = (np.memmap(directory / RESCORE_FILE, dtype="<f2", mode="r", shape=(rows, dim)) if rows
               else np.zeros((0, dim), dtype=np.float16))
    return Rescored(index, ids, vectors)


def pq_training_size(n: int) -> int:
    """Training points for OPQ + IVF-PQ: 40 per IVF cell (k-means wants at least 39), at least the 8-bit
    codebooks' ~10k, at most 1.5M (about 6 GB of float32 768-d vectors)."""
    return int(min(n, max(10_000, min(1_500_000, 40 * pq_nlist(n)))))


RECALL_QUERIES = 100


def exact_top(chunks: ChunkSource, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """The ids of the exact top ``k`` of each query (rows of -1 past the end), streaming every vector once
    from ``chunks()`` (an iterable of (ids, vectors))."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for ids, vectors in chunks():
        scores = queries @ np.ascontiguousarray(vectors, dtype=np.float32).T
        all_s = np.concatenate([best_s, scores], 1)
        all_i = np.concatenate([best_i, np.broadcast_to(ids, scores.shape)], 1)
        top = np.argpartition(-all_s, k - 1, axis=1)[:, :k] if all_s.shape[1] > k else np.argsort(-all_s, axis=1)
        best_s, best_i = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_i, top, 1)
    return best_i


def recall_against(index: Searchable, queries: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Mean share of each query's exact top ``k`` (``truth``) that ``index`` returns in its top ``k``."""
    _, got = search(index, np.ascontiguousarray(queries, dtype=np.float32), k)
    hits = [len(set(t[t >= 0].tolist()) & set(g.tolist())) / max(1, int((t >= 0).sum())) for t, g in zip(truth, got)]
    return float(np.mean(hits)) if hits else 1.0


def sample_recall(index: Searchable, chunks: ChunkSource, queries: np.ndarray, k: int = 10) -> float:
    """recall@k of ``index`` against exact search, for ``queries`` (stored vectors: image-to-image),
    the exact top k found by streaming every vector once from ``chunks()``."""
    return recall_against(index, queries, exact_top(chunks, queries, k), k)


def parts_of(index: Searchable) -> list[faiss.Index]:
    """The part indexes of ``index``: those of a `shards` index (or of a `Rescored` one around it), else itself
    (IVF parts searched by `IndexShardsIVF` are given as their IVF indexes, without the OPQ rotation)."""
    found = index.index if isinstance(index, Rescored) else index
    faiss = _faiss()
    if isinstance(found, faiss.IndexPreTransform):
        inner = faiss.downcast_index(found.index)
        if isinstance(inner, faiss.IndexShards):
            found = inner
    if isinstance(found, faiss.IndexShards):
        return [faiss.downcast_index(found.at(i)) for i in range(found.count())]
    return [found]


def ivf_indexes(index: Searchable) -> list[faiss.IndexIVF]:
    """The IVF index inside each part of ``index`` (empty for an exact index)."""
    faiss = _faiss()
    out = []
    for part in parts_of(index):
        try:
            out.append(faiss.extract_index_ivf(part))
        except RuntimeError:  # not an IVF index
            return []
    return out


def nlist_of(index: Searchable) -> int | None:
    """Cells of an IVF index (or of a `Rescored` or `shards` one); None for an exact index."""
    ivfs = ivf_indexes(index)
    return int(ivfs[0].nlist) if ivfs else None


def set_nprobe(index: Searchable, nprobe: int) -> None:
    """Cells scanned per query, in every part; an HNSW coarse quantizer (IVF-PQ) explores twice as many
    centroids as it returns. At its default of 16, asked for 64 of 4,096 random centroids it found 66% of the
    nearest 64, and for all 4,096 only ~700 (measured): a wider probe then scanned the wrong cells."""
    faiss = _faiss()
    for ivf in ivf_indexes(index):
        ivf.nprobe = int(nprobe)
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            quantizer.hnsw.efSearch = max(16, 2 * int(nprobe))


def shards(parts: list[faiss.Index], threaded: bool | None = None) -> faiss.Index:
    """One index searching ``parts`` (indexes over disjoint ids, cloned from one trained index) with FAISS's own
    sharding, one thread a part (``threaded`` None: when the machine has at least `THREADED_SHARDS_MIN_CPUS`
    cores; on fewer the parts are searched one after another, each query batch still spread over the cores by
    OpenMP), keeping each part's own ids and merging the parts' top k by score. IVF parts
    (behind the same OPQ rotation, if any) go to `IndexShardsIVF`: the coarse quantizer (the same in every
    part) is searched once per query and each part scans the chosen cells (`search_preassigned`); anything
    else to `IndexShards`. The results equal those of one index holding every vector (same quantizer, same
    nprobe, which FAISS takes from the first part: the same cells are scanned and every vector is scored the
    same way). One part is returned as it is. The parts must outlive the index: it keeps references to them."""
    if len(parts) == 1:
        return parts[0]
    faiss = _faiss()
    if threaded is None:
        threaded = (os.cpu_count() or 1) >= THREADED_SHARDS_MIN_CPUS
    try:
        ivfs = [faiss.extract_index_ivf(p) for p in parts]
    except RuntimeError:  # not IVF
        ivfs = []
    if ivfs:
        index = faiss.IndexShardsIVF(ivfs[0].quantizer, ivfs[0].nlist, threaded, False)  # ids as stored
        index.metric_type = ivfs[0].metric_type
        for ivf in ivfs:
            index.add_shard(ivf)
        outer = faiss.downcast_index(parts[0])
        if isinstance(outer, faiss.IndexPreTransform):  # OPQ: rotate the query once, then search the shards
            index = faiss.IndexPreTransform(index)
            for i in reversed(range(outer.chain.size())):
                index.prepend_transform(outer.chain.at(i))
    else:
        index = faiss.IndexShards(parts[0].d, threaded, False)  # ids as stored
        index.metric_type = parts[0].metric_type
        for part in parts:
            index.add_shard(part)
    index.referenced_objects = [*getattr(index, "referenced_objects", []), *parts]  # they own what it uses
    return index


def write(index: Searchable, path: str, without_quantizer: bool = False) -> None:
    """Write a FAISS index (a `Rescored` one: its codes). ``without_quantizer``: an IVF part is written with an
    empty placeholder instead of its coarse quantizer (the same in every part, kept once in the trained index's
    file): at 100M IVF-PQ images that is 32,768 cells (~43 MB) not stored, nor held in RAM, once per part.
    `attach_quantizer` gives it back on reading."""
    faiss = _faiss()
    if isinstance(index, Rescored):
        index = index.index
    if not without_quantizer:
        faiss.write_index(index, path)
        return
    ivf = faiss.extract_index_ivf(index)
    own = ivf.quantizer
    placeholder = faiss.IndexFlat(ivf.d, ivf.metric_type)
    ivf.quantizer = placeholder
    try:
        faiss.write_index(index, path)
    finally:
        ivf.quantizer = own


def attach_quantizer(part: faiss.Index, trained: faiss.Index) -> faiss.Index:
    """Give a part read from a file written `without_quantizer` the coarse quantizer of ``trained`` (shared, not
    copied: the part keeps a reference to ``trained``). A part with its own quantizer is left as it is."""
    faiss = _faiss()
    ivf = faiss.extract_index_ivf(part)
    if ivf.quantizer.ntotal == ivf.nlist:
        return part
    ivf.quantizer = faiss.extract_index_ivf(trained).quantizer
    ivf.own_fields = False  # the placeholder read from the file (a few bytes) is left; the shared one is not freed
    # (faiss's Python wrapper keeps objects alive through this attribute; its stubs do not declare it)
    part.referenced_objects = [*getattr(part, "referenced_objects", []), trained]  # type: ignore[attr-defined]
    return part


def part_rows(kind: str, dim: int) -> int:
    """Most vectors a part of an approximate index holds: `PART_ROWS`, fewer when they would take more than
    `PART_BYTES` (768-d: IVF-PQ 4M vectors = 288 MB of codes; IVF 348k float32 rows = 1 GB). The parts share
    one coarse quantizer (`write` ``without_quantizer``, `attach_quantizer`)."""
    per_vector = (pq_shape(dim)[0] + 8) if kind == PQ else (4 * dim + 8)
    return int(max(1, min(PART_ROWS, PART_BYTES // max(1, per_vector))))


def train_empty(kind: str, dim: int, n: int, sample: np.ndarray, seed: int = 0) -> faiss.Index:
    """An empty approximate index of ``kind`` (IVF or IVF-PQ) for ``n`` vectors, trained on ``sample``
    (a spread subset: at most 64 points a cell for IVF, `pq_training_size` for IVF-PQ). Every part of a
    stored index is a clone of it."""
    faiss = _faiss()
    if kind == PQ:
        return build_pq(dim, n, sample, seed)
    if kind != APPROX:
        raise ValueError(f"no trained empty index for kind {kind!r}")
    nlist = ivf_cells(n)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    if len(sample) > 64 * nlist:
        sample = sample[np.random.default_rng(seed).choice(len(sample), 64 * nlist, replace=False)]
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    index.nprobe = default_nprobe(nlist)
    return index


def clone(index: faiss.Index) -> faiss.Index:
    """A copy of a (trained, usually empty) FAISS index."""
    return _faiss().clone_index(index)


def tune_nprobe(index: Searchable, chunks: ChunkSource, queries: np.ndarray, k: int = 10,
                target: float = RECALL_TARGET) -> tuple[int | None, float]:
    """Set an approximate index's nprobe to the fewest cells (a power of two from `MIN_NPROBE`, or all of
    them) whose recall@k against exact search reaches ``target`` for ``queries``; returns (nprobe, recall).
    When doubling the cells gains less than `PLATEAU` short of the target (the codes, not the probe, are the
    limit), the narrower width is kept. An exact index is left as it is: (None, 1.0)."""
    nlist = nlist_of(index)
    if nlist is None:
        return None, 1.0
    truth = exact_top(chunks, queries, k)
    nprobe = min(nlist, MIN_NPROBE)
    last: tuple[int, float] | None = None
    while True:
        set_nprobe(index, nprobe)
        recall = recall_against(index, queries, truth, k)
        if recall >= target or nprobe >= nlist:
            return nprobe, recall
        if last is not None and recall - last[1] < PLATEAU:
            # twice the cells bought nothing: the codes limit recall, not the probe; scanning more only costs
            set_nprobe(index, last[0])
            return last
        last = (nprobe, recall)
        nprobe = min(nlist, nprobe * 2)


def build(ids: np.ndarray, vectors: np.ndarray, kind: str, seed: int = 0) -> Searchable:
    """A new index of ``kind`` holding ``vectors`` (n, d) under ``ids`` (n,)."""
    faiss = _faiss()
    d = vectors.shape[1]
    if kind == EXACT:
        scan = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        refine = faiss.IndexRefineFlat(scan)
        refine.k_factor = REFINE_FACTOR
        index = faiss.IndexIDMap2(refine)
    elif kind == APPROX:
        index = train_empty(APPROX, d, len(vectors), vectors, seed)
    elif kind == PQ:
        sample = vectors
        if len(vectors) > pq_training_size(len(vectors)):
            rng = np.random.default_rng(seed)
            sample = vectors[rng.choice(len(vectors), pq_training_size(len(vectors)), replace=False)]
        index = build_pq(d, len(vectors), sample, seed)
        order = np.argsort(ids)
        add(index, ids, vectors)
        return Rescored(index, ids[order].astype(np.int64), vectors[order].astype(np.float16))
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))
    return index


def flat(vectors: np.ndarray) -> faiss.Index:
    """An exact float32 inner-product index over ``vectors`` (n, d), whose ids are the row positions: the exact
    scan evaluation and hard-negative mining need (no half-precision candidates, no re-scoring)."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def add(index: Searchable, ids: np.ndarray, vectors: np.ndarray) -> None:
    """Add vectors (to a `Rescored` index: its codes; the caller appends the fp16 rows on disk)."""
    if isinstance(index, Rescored):
        index = index.index
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))


def remove(index: Searchable, ids: np.ndarray) -> bool:
    """Drop ``ids``; False when this kind of index cannot (the exact one: the caller rebuilds it)."""
    if not len(ids):
        return True
    if kind_of(index) == EXACT:
        return False
    faiss = _faiss()
    if isinstance(index, Rescored):
        index = index.index  # its fp16 rows stay on disk, never a candidate again
    index.remove_ids(faiss.IDSelectorBatch(ids.astype(np.int64)))
    return True


def kind_of(index: Searchable) -> str:
    """EXACT, APPROX (IVF) or PQ (IVF-PQ: wrapped in `Rescored`, or one bare part of it behind its OPQ rotation)."""
    if isinstance(index, Rescored):
        return PQ
    faiss = _faiss()
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(parts_of(index)[0]))
    except RuntimeError:  # not IVF
        return EXACT
    return PQ if isinstance(ivf, faiss.IndexIVFPQ) else APPROX


def search(index: Searchable | None, queries: np.ndarray, k: int, extra_ids: np.ndarray | None = None,
           extra_vectors: np.ndarray | None = None, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores (nq, k), ids (nq, k); id -1 past the end) over the index plus ``extra`` vectors
    (those newer than the index file), merged by score."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    nq = len(queries)
    parts_s, parts_i = [], []
    if index is not None and index.ntotal:
        faiss = _faiss()
        if nprobe is not None:
            set_nprobe(index, nprobe)
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
